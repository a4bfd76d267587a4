//! The cooperative flow against a real Parley provider, with the peer user played by a script:
//! a client of `carol@chirp.test` on Parley's client API, its MLS done by the kit's own
//! [`KitClient`] (the Parley client does not compile on this branch). The script does, in
//! order, what the kit's `WAIT` lines ask of a person:
//!
//! 1. accept kit-alice's contact request;
//! 2. join the kit's room from the Welcome in carol's queue, read kit-alice's message, reply;
//! 3. follow the kit's commits until one removes carol, then report leaving (`/left`);
//! 4. ask kit-bob for consent, create a group room at chirp.test, claim kit-bob's KeyPackages
//!    and commit adding kit-bob;
//! 5. follow kit-bob's message, its second client's external commit and both leave proposals,
//!    then commit kit-bob's removal.
//!
//! It also checks what the kit cannot see: every message reached carol once (the kit notifies
//! its first message twice and echoes carol's reply).

mod common;

use common::{free_addr, kit_config, TestCa};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls_basic_credential::SignatureKeyPair;
use parley_conformance::mls::{KitClient, Processed};
use parley_conformance::Verdict;
use parley_proto::api::{
    AckRequest, ClaimRequest, ClaimResponse, CommitRequest, ContactInfo, CreateRoomRequest,
    EntryKind, ProviderInfo, QueuePage, RegisterRequest, SendRequest, SessionResponse,
    UploadKeyPackages,
};
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::room_state::{RoomState, ROLE_MEMBER};
use parley_proto::{Domain, MimiContent, RoomId, UserId};
use parley_server::config::ServerConfig;
use parley_server::Server;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long the script keeps going before it gives up.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(50);

/// A room URI as one path segment.
fn seg(room: &RoomId) -> String {
    room.as_str().replace(':', "%3A").replace('/', "%2F")
}

struct Carol {
    http: reqwest::Client,
    base: String,
    token: String,
    me: UserId,
    mls: KitClient,
    after: u64,
    /// How often each message's bytes reached carol.
    seen: HashMap<Vec<u8>, usize>,
    log: Vec<String>,
}

impl Carol {
    async fn register(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let signer = SignatureKeyPair::new(openmls::prelude::SignatureScheme::ED25519).unwrap();
        let resp = http
            .post(format!("{base}/v1/accounts"))
            .json(&RegisterRequest {
                user: "carol@chirp.test".into(),
                password: Some("carol's password".into()),
                invite: None,
                device_name: Some("script".into()),
                signature_key: signer.public().to_vec(),
            })
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "register: {status} {text}");
        let session: SessionResponse = serde_json::from_str(&text).unwrap();
        let device =
            DeviceUri::parse(&format!("mimi://chirp.test/d/carol/{}", session.device_id)).unwrap();
        let mut carol = Self {
            http,
            base: base.to_owned(),
            token: session.token,
            me: device.user.clone(),
            mls: KitClient::with_signer(device, signer),
            after: 0,
            seen: HashMap::new(),
            log: Vec::new(),
        };
        let key_packages = (0..4)
            .map(|_| carol.mls.key_package().unwrap().0.into_bytes())
            .collect();
        carol
            .post::<_, serde_json::Value>(
                "/v1/key-packages",
                &UploadKeyPackages {
                    key_packages,
                    last_resort: None,
                },
            )
            .await
            .unwrap();
        carol
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &B,
    ) -> Result<R, String> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        self.log.push(format!("POST {path}: {status}"));
        if !status.is_success() {
            return Err(format!("POST {path}: {status} {text}"));
        }
        serde_json::from_str(if text.is_empty() { "null" } else { &text })
            .map_err(|e| format!("POST {path}: {e}: {text}"))
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, String> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("GET {path}: {}", resp.status()));
        }
        resp.json().await.map_err(|e| e.to_string())
    }

    /// The next queue entries (acknowledged).
    async fn queue(&mut self) -> Vec<parley_proto::api::QueueEntry> {
        let Ok(page) = self
            .get::<QueuePage>(&format!("/v1/queue?after={}", self.after))
            .await
        else {
            return Vec::new();
        };
        if let Some(last) = page.entries.last() {
            self.after = last.seq;
            let up_to = last.seq;
            let _ = self
                .post::<_, serde_json::Value>("/v1/queue/ack", &AckRequest { up_to })
                .await;
        }
        for e in page.entries.iter().filter(|e| !e.data.is_empty()) {
            *self.seen.entry(e.data.clone()).or_default() += 1;
        }
        page.entries
    }

    async fn send_text(&mut self, room: &RoomId, text: &str) -> Result<(), String> {
        let content = MimiContent::text([9; 16], &self.me.to_uri(), room.as_str(), text).encode();
        let message = self
            .mls
            .message(room, &content)
            .map_err(|e| e.to_string())?;
        self.post::<_, serde_json::Value>(
            &format!("/v1/rooms/{}/messages", seg(room)),
            &SendRequest {
                message: message.into_bytes(),
            },
        )
        .await
        .map(|_| ())
    }

    /// Steps 1–3: the kit's room, until carol is removed from it.
    async fn follow_the_kit(&mut self, deadline: Instant) -> Result<RoomId, String> {
        while Instant::now() < deadline {
            let requests: Vec<ContactInfo> = self.get("/v1/contacts/requests").await?;
            if requests.iter().any(|c| c.user == "kit-alice@kit.test") {
                self.post::<_, ContactInfo>("/v1/contacts/kit-alice@kit.test/accept", &())
                    .await?;
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let mut room: Option<RoomId> = None;
        let mut replied = false;
        while Instant::now() < deadline {
            for entry in self.queue().await {
                let id = RoomId::parse(&entry.room_id).ok();
                match entry.kind {
                    EntryKind::Welcome => {
                        let welcome = parley_proto::mimi::MlsMessage::from_bytes(entry.data)
                            .ok()
                            .and_then(|m| m.to_welcome())
                            .ok_or("a Welcome entry without a Welcome")?;
                        let tree = parley_proto::mimi::RatchetTree::from_bytes(
                            entry.ratchet_tree.ok_or("a Welcome without its tree")?,
                        )
                        .map_err(|e| e.to_string())?;
                        let (joined, _) =
                            self.mls.join(&welcome, &tree).map_err(|e| e.to_string())?;
                        self.log.push(format!("joined {joined}"));
                        room = Some(joined);
                    }
                    EntryKind::Message | EntryKind::Commit => {
                        let id = id.ok_or("an entry without a room")?;
                        let message = parley_proto::mimi::MlsMessage::from_bytes(entry.data)
                            .map_err(|e| e.to_string())?;
                        match self.mls.process(&id, &message) {
                            Ok(Processed::Application(_)) if !replied => {
                                self.send_text(&id, "hi kit, carol here").await?;
                                replied = true;
                            }
                            Ok(Processed::Commit) if !self.mls.is_active(&id) => {
                                self.post::<_, serde_json::Value>(
                                    &format!("/v1/rooms/{}/left", seg(&id)),
                                    &(),
                                )
                                .await?;
                                return Ok(id);
                            }
                            Ok(_) => {}
                            Err(e) => return Err(format!("processing in {id}: {e}")),
                        }
                    }
                    other => self.log.push(format!("ignored {other:?}")),
                }
            }
            tokio::time::sleep(POLL).await;
        }
        Err(format!("carol was not removed from {room:?} in time"))
    }

    /// Steps 4–5: carol's room with kit-bob.
    async fn host_kit_bob(&mut self, deadline: Instant) -> Result<(), String> {
        let bob = UserId::parse("kit-bob@kit.test").unwrap();
        self.post::<_, ContactInfo>("/v1/contacts/kit-bob@kit.test/request", &())
            .await?;
        let provider: ProviderInfo = self.get("/v1/provider").await?;
        let hub =
            openmls::prelude::ExternalSender::tls_deserialize_exact(&provider.external_sender)
                .map_err(|e| e.to_string())?;
        let chirp = Domain::parse("chirp.test").unwrap();
        let room = RoomId::new(&chirp, "0123456789abcdef0123456789abcdef").unwrap();
        let mut state = RoomState::group(room.clone(), "carol's room", &self.me, None);
        self.mls
            .create_room(&state, hub)
            .map_err(|e| e.to_string())?;
        let (group_info, ratchet_tree) = self
            .mls
            .group_info_and_tree(&room)
            .map_err(|e| e.to_string())?;
        self.post::<_, serde_json::Value>(
            "/v1/rooms",
            &CreateRoomRequest {
                room_id: room.to_string(),
                group_info,
                ratchet_tree,
            },
        )
        .await?;
        let request = self
            .mls
            .key_material_request(&bob.to_uri(), &room)
            .map_err(|e| e.to_string())?;
        let claim: ClaimResponse = self
            .post(
                "/v1/users/kit-bob@kit.test/key-packages/claim",
                &ClaimRequest {
                    room: room.to_string(),
                    device: None,
                    key_material_request: parley_proto::mimi::Body::encode(&request),
                },
            )
            .await?;
        let mut packages = Vec::new();
        for k in &claim.key_packages {
            let (_, kp) = self
                .mls
                .validate_key_package(&k.key_package, &bob)
                .map_err(|e| e.to_string())?;
            packages.push(kp);
        }
        state.participants.insert(bob.clone(), ROLE_MEMBER);
        self.commit(&room, packages, Some(&state)).await?;
        let mut proposals = 0;
        while Instant::now() < deadline {
            for entry in self.queue().await {
                let message = parley_proto::mimi::MlsMessage::from_bytes(entry.data)
                    .map_err(|e| e.to_string())?;
                match self.mls.process(&room, &message) {
                    Ok(Processed::Proposal) => proposals += 1,
                    Ok(other) => self.log.push(format!("in carol's room: {other:?}")),
                    Err(e) => return Err(format!("processing in {room}: {e}")),
                }
            }
            if proposals == 2 {
                state.participants.remove(&bob);
                return self.commit(&room, Vec::new(), Some(&state)).await;
            }
            tokio::time::sleep(POLL).await;
        }
        Err(format!(
            "kit-bob's clients did not both leave ({proposals} proposals)"
        ))
    }

    /// Commits adds (and the pending proposals) through the client API.
    async fn commit(
        &mut self,
        room: &RoomId,
        adds: Vec<openmls::prelude::KeyPackage>,
        state: Option<&RoomState>,
    ) -> Result<(), String> {
        let out = self
            .mls
            .commit(room, adds, Vec::new(), state)
            .map_err(|e| e.to_string())?;
        let wrap = |tag: u8, bare: Vec<u8>| [vec![0, 1, 0, tag], bare].concat();
        self.post::<_, serde_json::Value>(
            &format!("/v1/rooms/{}/commits", seg(room)),
            &CommitRequest {
                commit: out.commit.into_bytes(),
                welcome: out.welcome.map(|w| wrap(3, w.into_bytes())),
                group_info: wrap(4, out.group_info.into_bytes()),
                ratchet_tree: out.ratchet_tree.into_bytes(),
            },
        )
        .await
        .map(|_| ())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cooperative_flow_passes_against_parley() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (cert, key) = ca.leaf(dir.path(), "chirp.test");
    let kit_listen = free_addr();
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().join("chirp"),
        federation_listen: Some("127.0.0.1:0".parse().unwrap()),
        federation_cert: vec![cert],
        federation_key: vec![key],
        peer_ca: Some(ca.path.clone()),
        peer_retry_cap_secs: 1,
        ..Default::default()
    };
    config.add_domain("chirp.test");
    config
        .peers
        .insert("kit.test".into(), format!("https://{kit_listen}"));
    let server = Server::start(config).await.unwrap();
    let mut kit = kit_config(
        dir.path(),
        &ca,
        "chirp.test",
        server.federation_addr().unwrap(),
        kit_listen,
    );
    kit.peer_user = Some(UserId::parse("carol@chirp.test").unwrap());
    let mut carol = Carol::register(&server.url()).await;

    let script = tokio::spawn(async move {
        let deadline = Instant::now() + SCRIPT_DEADLINE;
        let outcome = match carol.follow_the_kit(deadline).await {
            Ok(_) => carol.host_kit_bob(deadline).await,
            Err(e) => Err(e),
        };
        (outcome, carol)
    });
    let mut out = Vec::new();
    let summary = parley_conformance::run(kit, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    println!("{text}");
    let (outcome, carol) = tokio::time::timeout(SCRIPT_DEADLINE, script)
        .await
        .expect("the script ends")
        .unwrap();
    println!("script: {outcome:?}\n{}", carol.log.join("\n"));
    for line in &summary.lines {
        assert_eq!(
            line.verdict,
            Verdict::Pass,
            "{}: {}\n{text}",
            line.name,
            line.detail
        );
    }
    outcome.unwrap();
    let twice: Vec<_> = carol.seen.values().filter(|n| **n > 1).collect();
    assert!(twice.is_empty(), "a message reached carol twice");
    server.shutdown().await;
}
