//! The cooperative flow against Parley's own server *and* client: carol@chirp.test, the peer
//! user, is a real [`parley_client::Device`] at an in-process parley-server, driven the way a
//! person follows the kit's `WAIT` lines with the `parley` CLI. Carol's loop syncs (waiting
//! briefly for pushes) and reacts to what arrived:
//!
//! 1. she accepts the contact requests of kit-alice (and of kit-bob, should one come);
//! 2. her client joins the kit's room from the Welcome; she answers kit-alice's first message;
//! 3. her client follows the kit's commits (adding kit-bob, then removing her) and tells its
//!    provider it was removed (`/left`);
//! 4. once removed, she asks kit-bob for consent, creates a group room and adds kit-bob,
//!    trying again while kit-bob's consent is missing;
//! 5. her client follows kit-bob's message, his second client's external commit and both of
//!    his clients' leave proposals, and commits his leaving.
//!
//! Besides every flow check passing, it checks what the kit cannot see: each message shows
//! once at carol's (the kit notifies its first message twice and echoes carol's reply), she was
//! removed from the kit's room, and kit-bob is no longer in hers.

mod common;

use common::{free_addr, kit_config, TestCa};
use parley_client::{ClientError, Device, Event};
use parley_conformance::Verdict;
use parley_proto::{RoomId, UserId};
use parley_server::config::ServerConfig;
use parley_server::Server;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long carol keeps going at most.
const DEADLINE: Duration = Duration::from_secs(120);
/// How long carol may still take, once the kit is done, to commit kit-bob's leaving.
const AFTER_THE_KIT: Duration = Duration::from_secs(20);
/// How long one sync waits for a push when nothing is queued.
const SYNC_WAIT: Duration = Duration::from_millis(300);
const REPLY: &str = "hi kit, carol here";

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

/// What carol has seen and done so far.
#[derive(Debug, Default)]
struct Progress {
    /// The kit's room, joined from its Welcome.
    kit_room: Option<RoomId>,
    replied: bool,
    /// Removed from the kit's room.
    removed: bool,
    asked_bob: bool,
    /// Her own room, for kit-bob.
    own_room: Option<RoomId>,
    bob_added: bool,
    /// kit-bob's leaving committed.
    bob_left: bool,
}

struct Carol {
    device: Device,
    alice: UserId,
    bob: UserId,
    progress: Progress,
    /// Every event her syncs returned, in order.
    events: Vec<Event>,
    log: Vec<String>,
}

impl Carol {
    /// Plays carol until kit-bob's leaving is committed; gives up at [`DEADLINE`], or
    /// [`AFTER_THE_KIT`] after `kit_done` says the kit finished.
    async fn play(&mut self, mut kit_done: watch::Receiver<bool>) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        let mut cutoff = deadline;
        while !self.progress.bob_left {
            if *kit_done.borrow_and_update() {
                cutoff = cutoff.min(Instant::now() + AFTER_THE_KIT);
            }
            if Instant::now() > cutoff {
                return Err(format!("carol did not finish in time: {:?}", self.progress));
            }
            let events = self
                .device
                .sync(Some(SYNC_WAIT))
                .await
                .map_err(|e| format!("sync: {e}"))?;
            for event in events {
                self.log.push(format!("event {event:?}"));
                self.react(&event).await?;
                self.events.push(event);
            }
            self.accept_contact_requests().await?;
            self.host_kit_bob().await?;
        }
        Ok(())
    }

    /// What an event asks of carol.
    async fn react(&mut self, event: &Event) -> Result<(), String> {
        let p = &mut self.progress;
        match event {
            Event::Joined { room, .. } if room.hub().as_str() == "kit.test" => {
                p.kit_room = Some(room.clone());
            }
            Event::Message { room, sender, .. }
                if Some(room) == p.kit_room.as_ref() && *sender == self.alice && !p.replied =>
            {
                p.replied = true;
                let room = room.clone();
                self.device
                    .send_text(&room, REPLY)
                    .await
                    .map_err(|e| format!("reply: {e}"))?;
                self.log.push(format!("replied in {room}"));
            }
            Event::Removed { room } if Some(room) == p.kit_room.as_ref() => p.removed = true,
            Event::Members { room, removed, .. }
                if Some(room) == p.own_room.as_ref() && removed.contains(&self.bob) =>
            {
                p.bob_left = true;
            }
            _ => {}
        }
        Ok(())
    }

    async fn accept_contact_requests(&mut self) -> Result<(), String> {
        let pending = self
            .device
            .contact_requests()
            .await
            .map_err(|e| format!("contact requests: {e}"))?;
        for request in pending {
            let from = user(&request.user);
            if from == self.alice || from == self.bob {
                self.device
                    .contact_accept(&from)
                    .await
                    .map_err(|e| format!("accept {from}: {e}"))?;
                self.log.push(format!("accepted {from}"));
            }
        }
        Ok(())
    }

    /// Once removed from the kit's room: consent from kit-bob, a room, kit-bob in it.
    async fn host_kit_bob(&mut self) -> Result<(), String> {
        let p = &mut self.progress;
        if !p.removed || p.bob_added {
            return Ok(());
        }
        if !p.asked_bob {
            let answer = self
                .device
                .contact_request(&self.bob)
                .await
                .map_err(|e| format!("contact request to kit-bob: {e}"))?;
            self.log.push(format!("asked kit-bob: {:?}", answer.state));
            p.asked_bob = true;
        }
        let room = match &p.own_room {
            Some(room) => room.clone(),
            None => {
                let room = self
                    .device
                    .create_room(Some("carol's room"), &[])
                    .await
                    .map_err(|e| format!("create room: {e}"))?;
                self.log.push(format!("created {room}"));
                p.own_room = Some(room.clone());
                room
            }
        };
        match self.device.add_member(&room, &self.bob).await {
            Ok(()) => {
                p.bob_added = true;
                self.log.push(format!("added kit-bob to {room}"));
                Ok(())
            }
            // Not yet: kit-bob's consent is on its way.
            Err(ClientError::NoConsent(why)) => {
                self.log.push(format!("kit-bob not addable yet: {why}"));
                Ok(())
            }
            Err(e) => Err(format!("add kit-bob: {e}")),
        }
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
    let me = user("carol@chirp.test");
    kit.peer_user = Some(me.clone());
    let device = Device::register(
        &dir.path().join("profile-carol"),
        &server.url(),
        &me,
        Some("carol's password"),
        None,
        None,
    )
    .await
    .unwrap();
    let mut carol = Carol {
        device,
        alice: user("kit-alice@kit.test"),
        bob: user("kit-bob@kit.test"),
        progress: Progress::default(),
        events: Vec::new(),
        log: Vec::new(),
    };

    let (kit_done, kit_done_rx) = watch::channel(false);
    let player = tokio::spawn(async move {
        let outcome = carol.play(kit_done_rx).await;
        (outcome, carol)
    });
    let mut out = Vec::new();
    let summary = parley_conformance::run(kit, &mut out).await.unwrap();
    kit_done.send(true).unwrap();
    let text = String::from_utf8(out).unwrap();
    println!("{text}");
    let (outcome, carol) = tokio::time::timeout(DEADLINE + AFTER_THE_KIT, player)
        .await
        .expect("carol's loop ends")
        .unwrap();
    println!("carol: {outcome:?}\n{}", carol.log.join("\n"));
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

    let errors: Vec<_> = carol
        .events
        .iter()
        .filter(|e| matches!(e, Event::Error { .. } | Event::Undecodable { .. }))
        .collect();
    assert!(errors.is_empty(), "carol's client failed on: {errors:?}");
    let mut shown: BTreeMap<_, usize> = BTreeMap::new();
    for e in &carol.events {
        if let Event::Message { id, .. } = e {
            *shown.entry(*id).or_default() += 1;
        }
    }
    assert!(
        shown.values().all(|n| *n == 1),
        "a message reached carol twice: {:?}",
        carol.events
    );
    let kit_room = carol.progress.kit_room.clone().unwrap();
    let history: Vec<_> = carol
        .device
        .history(&kit_room, 100)
        .unwrap()
        .into_iter()
        .map(|h| (h.sender.to_string(), h.text))
        .collect();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0].0, "kit-alice@kit.test");
    assert_eq!(history[1], ("carol@chirp.test".into(), REPLY.into()));
    assert!(
        carol.device.room_info(&kit_room).is_err(),
        "still in {kit_room}"
    );
    // Her client told her provider (`/left`), which no longer delivers the kit's room to it.
    let followed = carol.device.api().rooms().await.unwrap();
    assert!(
        followed.iter().all(|r| r.room_id != kit_room.as_str()),
        "the provider still delivers {kit_room}: {followed:?}"
    );
    let own_room = carol.progress.own_room.clone().unwrap();
    let history = carol.device.history(&own_room, 100).unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].sender, carol.bob);
    let info = carol.device.room_info(&own_room).unwrap();
    assert_eq!(info.members, vec![me], "kit-bob still in {own_room}");
    server.shutdown().await;
}
