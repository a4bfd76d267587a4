//! The checks, in three groups: [`basic`] (the directory and each endpoint's encoding and
//! answers, no cooperation needed), [`forge`] (requests a correct provider must refuse) and
//! [`flow`] (the cooperative full flow with a test user at the peer). They share a [`Kit`]: the
//! client towards the peer, the kit's listener, its hub key, its MLS clients, and MLS material
//! from a scratch room no peer knows.

pub mod basic;
pub mod flow;
pub mod forge;

use crate::config::KitConfig;
use crate::error::KitError;
use crate::listener::Listener;
use crate::mls::{random_hex, HubKey, KitClient};
use crate::report::Outcome;
use crate::transport::{Answer, PeerClient};
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::{
    AbuseReport, AppDataDictionary, Body, ConsentEntry, ConsentOperation, FanoutMessage,
    GroupInfoOption, HandshakeBundle, IdentifierUri, MlsMessage, RatchetTreeOption,
    SubmitMessageRequest,
};
use parley_proto::{DeviceId, Domain, Handle, RoomId, UserId};

/// Everything the checks share.
pub struct Kit {
    pub config: KitConfig,
    pub peer: PeerClient,
    pub listener: Listener,
    pub hub: HubKey,
    /// `kit-alice`'s client.
    pub alice: KitClient,
    /// `kit-bob`'s client.
    pub bob: KitClient,
    pub material: Material,
    /// A suffix that makes this run's names new to the peer.
    pub run_id: String,
    /// The provider forged identities claim to be of ([`forge::OTHER_DOMAIN`]).
    pub other: Domain,
}

/// Valid MIMI material from a scratch room the kit hubs and nobody else knows.
pub struct Material {
    pub room: RoomId,
    pub application: MlsMessage,
    pub commit: HandshakeBundle,
    pub welcome: FanoutMessage,
}

/// A client URI `mimi://DOMAIN/d/HANDLE/DEVICE`.
pub fn device(domain: &Domain, handle: &str, device: &str) -> Result<DeviceUri, KitError> {
    let bad = |e: parley_proto::IdError| crate::mls::MlsError(e.to_string());
    Ok(DeviceUri::new(
        UserId::new(Handle::parse(handle).map_err(bad)?, domain.clone()),
        DeviceId::parse(device).map_err(bad)?,
    ))
}

/// A user URI of `domain`.
pub fn user_uri(domain: &Domain, handle: &str) -> String {
    format!("mimi://{domain}/u/{handle}")
}

/// A URI as request paths carry it (without `mimi://`).
pub fn path_form(uri: &str) -> &str {
    uri.strip_prefix("mimi://").unwrap_or(uri)
}

impl Kit {
    pub async fn start(config: KitConfig) -> Result<Self, KitError> {
        let run_id = random_hex::<4>();
        let peer = PeerClient::new(&config).await?;
        let listener = Listener::start(&config).await?;
        let hub = HubKey::new(&config.as_domain)?;
        let mut alice =
            KitClient::new(device(&config.as_domain, "kit-alice", &random_hex::<8>())?)?;
        let bob = KitClient::new(device(&config.as_domain, "kit-bob", &random_hex::<8>())?)?;
        {
            let mut hosted = listener.hosted();
            hosted.users.insert(alice.user().to_uri());
            hosted.users.insert(bob.user().to_uri());
        }
        let material = Material::new(&config.as_domain, &run_id, &mut alice, &bob, &hub)?;
        offer_key_packages(&listener, &bob, OFFERED_KEY_PACKAGES)?;
        Ok(Self {
            config,
            peer,
            listener,
            hub,
            alice,
            bob,
            material,
            run_id,
            other: Domain::parse(forge::OTHER_DOMAIN)
                .map_err(|e| crate::mls::MlsError(e.to_string()))?,
        })
    }

    /// A user URI at the peer that does not exist (this run's name).
    pub fn nobody(&self, tag: &str) -> String {
        user_uri(
            &self.config.peer,
            &format!("kit-nobody-{tag}-{}", self.run_id),
        )
    }

    /// A room URI at the peer that does not exist.
    pub fn peer_room(&self, tag: &str) -> String {
        format!("mimi://{}/r/kit-{tag}-{}", self.config.peer, self.run_id)
    }

    /// A room URI at the kit that the peer has never heard of.
    pub fn kit_room(&self, tag: &str) -> String {
        format!(
            "mimi://{}/r/kit-{tag}-{}",
            self.config.as_domain, self.run_id
        )
    }

    /// A consent entry from one of the kit's users.
    pub fn consent(&self, op: ConsentOperation, requester: &str, target: &str) -> ConsentEntry {
        ConsentEntry::new(op, requester, target)
    }

    /// A submitMessage body with the scratch room's application message.
    pub fn submit_body(&self, sending_uri: &str) -> Vec<u8> {
        SubmitMessageRequest::new(self.material.application.clone(), sending_uri).encode()
    }

    /// An abuse report from kit-alice.
    pub fn abuse_report(&self, alleged: &str) -> AbuseReport {
        AbuseReport {
            reporting_user: IdentifierUri::new(&self.alice.user().to_uri()),
            alleged_abuser_uri: IdentifierUri::new(alleged),
            reason_code: 0,
            note: parley_proto::mimi::opaque("conformance kit test report"),
            messages: Vec::new(),
            abuse_extensions: AppDataDictionary::default(),
        }
    }
}

/// How many KeyPackages of kit-bob's client the kit's keyMaterial hands out, one per call.
pub const OFFERED_KEY_PACKAGES: usize = 3;

/// Offers `n` KeyPackages of `client` through the kit's keyMaterial (from the start, so a peer
/// claiming early finds them).
fn offer_key_packages(listener: &Listener, client: &KitClient, n: usize) -> Result<(), KitError> {
    let mut offers = Vec::new();
    for _ in 0..n {
        let (kp, _) = client.key_package()?;
        offers.push((client.device.to_string(), kp));
    }
    listener
        .hosted()
        .offers
        .insert(client.user().to_uri(), offers);
    Ok(())
}

impl Material {
    /// alice creates the scratch room and adds bob (a commit with a Welcome), then writes a
    /// message in the new epoch.
    fn new(
        domain: &Domain,
        run_id: &str,
        alice: &mut KitClient,
        bob: &KitClient,
        hub: &HubKey,
    ) -> Result<Self, KitError> {
        let room = RoomId::new(domain, &format!("kit-scratch-{run_id}"))
            .map_err(|e| crate::mls::MlsError(e.to_string()))?;
        alice.create_scratch(&room, hub)?;
        let (kp, _) = bob.key_package()?;
        let (_, kp) = alice.validate_key_package(kp.bytes(), bob.user())?;
        let mut state = alice.room_state(&room)?;
        state.participants.insert(
            bob.user().clone(),
            parley_proto::mimi::room_state::ROLE_MEMBER,
        );
        let out = alice.commit(&room, vec![kp], vec![], Some(&state))?;
        let welcome = out
            .welcome
            .clone()
            .ok_or_else(|| crate::mls::MlsError("the add commit has no Welcome".into()))?;
        let application = alice.message(&room, b"conformance kit scratch message")?;
        Ok(Self {
            welcome: FanoutMessage {
                timestamp: now_ms(),
                message: MlsMessage::from_welcome(&welcome)
                    .map_err(|e| crate::mls::MlsError(e.to_string()))?,
                extra: parley_proto::mimi::FanoutExtra::Welcome {
                    ratchet_tree: RatchetTreeOption::Full {
                        ratchet_tree: out.ratchet_tree.clone(),
                    },
                },
            },
            commit: HandshakeBundle::Commit {
                commit: out.commit,
                welcome: Some(welcome),
                group_info: GroupInfoOption::Full {
                    group_info: out.group_info,
                },
                ratchet_tree: RatchetTreeOption::Full {
                    ratchet_tree: out.ratchet_tree,
                },
            },
            application,
            room,
        })
    }

    /// The scratch message as a FanoutMessage.
    pub fn application_fanout(&self) -> FanoutMessage {
        FanoutMessage {
            timestamp: now_ms(),
            message: self.application.clone(),
            extra: parley_proto::mimi::FanoutExtra::Application { frank: None },
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A request a correct provider refuses: any 4xx passes; a success, a 5xx or no answer fails.
pub fn refused(result: &Result<Answer, String>) -> Outcome {
    match result {
        Ok(a) if a.is_client_error() => Outcome::pass(format!("refused: {}", a.describe())),
        Ok(a) => Outcome::fail(format!("expected a 4xx refusal, got {}", a.describe())),
        Err(e) => Outcome::fail(format!("no answer: {e}")),
    }
}

/// Like [`refused`], but also accepting a `200` whose MIMI body `refusal` reads as a refusal
/// (it returns what it saw, `Ok` for a refusal).
pub fn refused_or(
    result: &Result<Answer, String>,
    refusal: impl Fn(&[u8]) -> Result<String, String>,
) -> Outcome {
    match result {
        Ok(a) if a.is_client_error() => Outcome::pass(format!("refused: {}", a.describe())),
        Ok(a) if a.status == 200 => match refusal(&a.body) {
            Ok(seen) => Outcome::pass(format!("refused in the body: {seen}")),
            Err(seen) => Outcome::fail(format!("HTTP 200 but {seen}")),
        },
        Ok(a) => Outcome::fail(format!("expected a refusal, got {}", a.describe())),
        Err(e) => Outcome::fail(format!("no answer: {e}")),
    }
}
