//! Interconnect end to end: three independent providers (each its own server, database and
//! federation listener with mutual TLS from a `parley dev-ca`), users on each, consent, 1:1 and
//! group rooms across providers, store-and-forward while a follower is down, and peers that
//! misbehave. Servers run in-process on loopback ports; certificates come from the real CLI.

mod providers;

use parley_client::mls::{DeviceMls, OutgoingCommit};
use parley_client::{ClientError, Device, Event};
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::room_state::{expiry_aad, RoomState};
use parley_proto::mimi::{
    Body, ConsentEntry, ConsentOperation, EphemeralMessage, FanoutExtra, FanoutMessage, GroupInfo,
    GroupInfoOption, HandshakeBundle, IdentifierUri, KeyMaterialResponse, MlsMessage,
    NotifyRequest, RatchetTree, RatchetTreeOption, SubmitMessageRequest, UpdateRoomResponse,
    UserCode,
};
use parley_proto::{Domain, RoomId};
use parley_server::now_ms;
use providers::*;
use reqwest::StatusCode;
use std::time::{Duration, Instant};

/// Syncs (waiting for pushes) until `want` messages of `room` arrived or [`PATIENCE`] passed.
async fn read_n(device: &mut Device, room: &RoomId, want: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + PATIENCE;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let events = device.sync(Some(Duration::from_millis(500))).await.unwrap();
        if let Some(Event::Error { detail, .. }) =
            events.iter().find(|e| matches!(e, Event::Error { .. }))
        {
            panic!("{} failed to process an entry: {detail}", device.user());
        }
        got.extend(messages_in(events, room));
    }
    got
}

/// Drains what is queued for a device and returns its messages in `room` (no waiting, and no
/// checks: whatever else the sync returns passes).
async fn read_now(device: &mut Device, room: &RoomId) -> Vec<(String, String)> {
    messages_in(device.sync(None).await.unwrap(), room)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_providers_consent_direct_and_group_rooms() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::three(dir.path()).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    let mut carol = net.register("carol@ping.test").await;
    let mut dave = net.register("dave@ping.test").await;

    // No consent yet: alice cannot open a direct room with bob.
    let refused = alice.direct_room(bob.user()).await;
    assert!(
        matches!(refused, Err(ClientError::NoConsent(_))),
        "{refused:?}"
    );

    // Bob consents; a 1:1 across providers, both ways.
    consent(&bob, &alice).await;
    let direct = alice.direct_room(bob.user()).await.unwrap();
    alice.send_text(&direct, "hi bob").await.unwrap();
    assert_eq!(
        read_n(&mut bob, &direct, 1).await,
        from("alice@chirp.test", &["hi bob"])
    );
    assert_eq!(bob.direct_room(alice.user()).await.unwrap(), direct);
    bob.send_text(&direct, "hi alice").await.unwrap();
    assert_eq!(
        read_n(&mut alice, &direct, 1).await,
        from("bob@wave.test", &["hi alice"])
    );

    // A group hubbed at chirp spanning all three providers.
    consent(&carol, &alice).await;
    let group = alice
        .create_room(Some("three"), &[bob.user().clone(), carol.user().clone()])
        .await
        .unwrap();
    alice.send_text(&group, "welcome").await.unwrap();
    assert_eq!(
        read_n(&mut bob, &group, 1).await,
        from("alice@chirp.test", &["welcome"])
    );
    assert_eq!(
        read_n(&mut carol, &group, 1).await,
        from("alice@chirp.test", &["welcome"])
    );

    // A follower-side member sends; everyone else reads it.
    carol.send_text(&group, "from ping").await.unwrap();
    for d in [&mut alice, &mut bob] {
        assert_eq!(
            read_n(d, &group, 1).await,
            from("carol@ping.test", &["from ping"])
        );
    }

    // Room policy holds for remote participants: bob (wave) is no admin yet, so the hub refuses
    // his commit adding dave and his promotion of carol; alice promotes him.
    consent(&dave, &bob).await;
    let refused = bob.add_member(&group, dave.user()).await.unwrap_err();
    assert!(
        refused.to_string().contains("only an admin may add"),
        "{refused}"
    );
    assert!(bob.promote(&group, carol.user()).await.is_err());
    alice.promote(&group, bob.user()).await.unwrap();
    // A follower-side admin promotes (relayed to the hub) and commits: bob adds dave (ping).
    bob.promote(&group, carol.user()).await.unwrap();
    let admins = alice.api().room(&group).await.unwrap().admins;
    assert_eq!(
        admins,
        vec!["alice@chirp.test", "bob@wave.test", "carol@ping.test"]
    );
    bob.add_member(&group, dave.user()).await.unwrap();
    join(&mut dave, &group).await;
    dave.send_text(&group, "dave here").await.unwrap();
    for d in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(
            read_n(d, &group, 1).await,
            from("dave@ping.test", &["dave here"])
        );
    }
    let info = alice
        .rooms()
        .unwrap()
        .into_iter()
        .find(|r| r.room == group)
        .unwrap();
    assert_eq!(info.members.len(), 4);

    // Remove carol: she reads nothing sent after the removal.
    alice.remove_member(&group, carol.user()).await.unwrap();
    alice.send_text(&group, "after carol").await.unwrap();
    for d in [&mut bob, &mut dave] {
        assert_eq!(
            read_n(d, &group, 1).await,
            from("alice@chirp.test", &["after carol"])
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(read_now(&mut carol, &group).await.is_empty());
    assert!(carol.send_text(&group, "still here?").await.is_err());

    // Blocking: bob blocks alice; her next direct message is refused with no_consent.
    bob.api().contact_block(alice.user()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match alice.send_text(&direct, "are you there?").await {
            Err(ClientError::Api { code, .. }) if code == "no_consent" => break,
            Err(e) if e.to_string().contains("no_consent") => break,
            other => {
                assert!(Instant::now() < deadline, "never refused: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen: Vec<_> = read_now(&mut bob, &direct).await;
    assert!(
        seen.iter().all(|(s, _)| s != "alice@chirp.test"),
        "bob saw a blocked sender: {seen:?}"
    );

    // In the group they share, the block hides alice's messages from bob, but her commits still
    // reach his device, so his copy of the group stays in step and he can keep talking.
    alice.send_text(&group, "bob won't see this").await.unwrap();
    alice.remove_member(&group, dave.user()).await.unwrap();
    bob.send_text(&group, "still here").await.unwrap();
    assert_eq!(
        read_n(&mut alice, &group, 1).await,
        from("bob@wave.test", &["still here"])
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(read_now(&mut bob, &group).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_was_down_gets_everything_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = Providers::three(dir.path()).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    consent(&bob, &alice).await;
    let room = alice.direct_room(bob.user()).await.unwrap();
    alice.send_text(&room, "before").await.unwrap();
    assert_eq!(read_n(&mut bob, &room, 1).await.len(), 1);

    net.stop("wave.test").await;
    let texts: Vec<String> = (0..50).map(|i| format!("m{i:02}")).collect();
    for t in &texts {
        alice.send_text(&room, t).await.unwrap();
    }
    // The hub holds them durably while the follower is away.
    let metrics = reqwest::get(format!("{}/metrics", net.server_of("chirp.test").url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("parley_peer_queue_depth{peer=\"wave.test\"} 50"),
        "{metrics}"
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    net.start("wave.test").await;
    let got = read_n(&mut bob, &room, 50).await;
    let want: Vec<(String, String)> = texts
        .iter()
        .map(|t| ("alice@chirp.test".to_owned(), t.clone()))
        .collect();
    assert_eq!(got, want);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(read_now(&mut bob, &room).await.is_empty(), "nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_peer_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::three(dir.path()).await;
    net.certify("evil.test"); // a peer with no provider: the test plays it
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    consent(&bob, &alice).await;
    let room = alice.direct_room(bob.user()).await.unwrap();
    alice.send_text(&room, "one").await.unwrap();
    assert_eq!(read_n(&mut bob, &room, 1).await.len(), 1);
    let epoch_before = alice.rooms().unwrap()[0].epoch;

    // evil.test has a valid certificate for evil.test only.
    let evil = net.peer_client("evil.test");
    let chirp_fed = |path: &str| {
        format!(
            "https://chirp.test:{}/v1/{path}",
            net.fed["chirp.test"].port()
        )
    };
    let post = |url: String, body: Vec<u8>| {
        let evil = evil.clone();
        async move {
            evil.post(url)
                .header("From", "mimi@evil.test")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let error_code = |resp: reqwest::Response| async move {
        let status = resp.status();
        let v: serde_json::Value = resp.json().await.unwrap();
        (status, v["error"].as_str().unwrap_or_default().to_owned())
    };

    // Federation paths name a room the way the draft's examples do: HUB/r/NAME.
    let room_path = room.path_form();
    // A real application message of the room (alice's), never delivered as such.
    let ciphertext = MlsMessage::from_bytes(alice.encrypt_text(&room, "forged").unwrap()).unwrap();

    // Claims to be a chirp.test user (From proves evil.test only).
    let spoofed = evil
        .post(chirp_fed(&format!("submitMessage/{room_path}")))
        .header("From", "mimi@chirp.test")
        .body(
            SubmitMessageRequest::new(
                ciphertext.clone(),
                "mimi://chirp.test/d/alice/0000000000000001",
            )
            .encode(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(spoofed).await,
        (StatusCode::FORBIDDEN, "peer_domain_mismatch".into())
    );

    // Speaks as evil.test but sends as a chirp.test client.
    let as_alice = post(
        chirp_fed(&format!("submitMessage/{room_path}")),
        SubmitMessageRequest::new(
            ciphertext.clone(),
            "mimi://chirp.test/d/alice/0000000000000001",
        )
        .encode(),
    )
    .await;
    assert_eq!(
        error_code(as_alice).await,
        (StatusCode::FORBIDDEN, "peer_domain_mismatch".into())
    );

    // Posts a real-looking message to a room it takes no part in (alice's ciphertext replayed,
    // with an evil sender): not a member → refused.
    let not_member = post(
        chirp_fed(&format!("submitMessage/{room_path}")),
        SubmitMessageRequest::new(ciphertext.clone(), "mimi://evil.test/u/eve").encode(),
    )
    .await;
    assert_eq!(
        error_code(not_member).await,
        (StatusCode::NOT_FOUND, "unknown_room".into())
    );

    // A typing indicator "from" a chirp.test client: the same answer whether that client is
    // a member of the room or not, so it reveals nothing about another provider's members.
    for sender in [
        alice.device_uri().to_string(),
        "mimi://chirp.test/d/alice/0000000000000001".to_owned(),
    ] {
        let typing = EphemeralMessage {
            sender: IdentifierUri::new(&sender),
            recipients: Vec::new(),
            message: ciphertext.clone(),
        };
        let resp = post(
            chirp_fed(&format!("x-parley-ephemeral/{room_path}")),
            typing.encode(),
        )
        .await;
        assert_eq!(
            error_code(resp).await,
            (StatusCode::NOT_FOUND, "unknown_room".into()),
            "{sender}"
        );
    }

    // An expiry hint (Safe AAD) in the past, or beyond the retention, is refused before
    // anything else.
    for hint in [1, u64::MAX] {
        let expiring = private_message(&room.parley_group_id(), epoch_before, &expiry_aad(hint));
        let bad_expiry = post(
            chirp_fed(&format!("submitMessage/{room_path}")),
            SubmitMessageRequest::new(expiring, "mimi://evil.test/u/eve").encode(),
        )
        .await;
        assert_eq!(
            error_code(bad_expiry).await,
            (StatusCode::BAD_REQUEST, "invalid_expiry".into())
        );
    }

    // URL room different from the room of the MLS message's group.
    let other_room = RoomId::from_random(&Domain::parse("chirp.test").unwrap(), [9; 16]);
    let mismatch = post(
        chirp_fed(&format!("submitMessage/{}", other_room.path_form())),
        SubmitMessageRequest::new(ciphertext.clone(), "mimi://evil.test/u/eve").encode(),
    )
    .await;
    assert!(mismatch.status().is_client_error(), "{}", mismatch.status());

    // A notify for a room evil.test does not hub (bob's provider follows chirp for it).
    let wave_fed = |room: &RoomId| {
        format!(
            "https://wave.test:{}/v1/notify/{}",
            net.fed["wave.test"].port(),
            room.path_form()
        )
    };
    let fake = NotifyRequest {
        messages: vec![FanoutMessage::plain(1, ciphertext.clone()).unwrap()],
    };
    let hijack = post(wave_fed(&room), fake.encode()).await;
    assert_eq!(
        error_code(hijack).await,
        (StatusCode::FORBIDDEN, "not_hub".into())
    );

    // Squatting a room wave.test does not follow yet. Only a hub that fetched KeyPackages of
    // wave.test's users for that room may start notifying about it, so this is refused and
    // nothing reaches bob.
    let fresh = RoomId::from_random(&Domain::parse("evil.test").unwrap(), [7; 16]);
    let squatted = post(wave_fed(&fresh), fake.encode()).await;
    assert_eq!(
        error_code(squatted).await,
        (StatusCode::FORBIDDEN, "not_hub".into())
    );

    // A commit that is no MLS commit at all.
    let garbage = post(chirp_fed(&format!("update/{room_path}")), vec![0, 1, 0, 1]).await;
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);

    // A notify the real hub repeats (the very same FanoutMessage) is accepted each time and
    // applied once: bob reads it once (checked at the end).
    let as_chirp = net.peer_client("chirp.test");
    let twice = MlsMessage::from_bytes(alice.encrypt_text(&room, "twice").unwrap()).unwrap();
    let repeated = NotifyRequest {
        messages: vec![FanoutMessage::plain(now_ms(), twice).unwrap()],
    };
    for _ in 0..2 {
        let resp = as_chirp
            .post(wave_fed(&room))
            .header("From", "mimi@chirp.test")
            .body(repeated.encode())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
    }

    // Truncated and oversized bodies.
    let mut body = SubmitMessageRequest::new(ciphertext, "mimi://evil.test/u/eve").encode();
    body.truncate(body.len() - 10);
    let truncated = post(chirp_fed(&format!("submitMessage/{room_path}")), body).await;
    assert_eq!(
        error_code(truncated).await,
        (StatusCode::BAD_REQUEST, "invalid_body".into())
    );
    // The listener answers 413 from the Content-Length without reading the 5 MiB; the client may
    // see that answer, or the connection closed under its still-uploading request. (Its own
    // client: the closed connection must not be reused by the requests below.)
    let oversized = net
        .peer_client("evil.test")
        .post(chirp_fed(&format!("submitMessage/{room_path}")))
        .header("From", "mimi@evil.test")
        .body(vec![0; 5 << 20])
        .send()
        .await;
    match oversized {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE),
        Err(e) => assert!(e.is_request() || e.is_body(), "unexpected failure: {e:?}"),
    }

    // Key material for bob on behalf of a chirp.test user (alice's own signed request):
    // evil may not speak for chirp.test.
    let km = alice
        .claim_request(bob.user(), &room, None)
        .unwrap()
        .key_material_request;
    let wave_km = format!(
        "https://wave.test:{}/v1/keyMaterial/{}",
        net.fed["wave.test"].port(),
        "wave.test/u/bob"
    );
    let stolen = post(wave_km.clone(), km).await;
    assert_eq!(
        error_code(stolen).await,
        (StatusCode::FORBIDDEN, "peer_domain_mismatch".into())
    );
    // As itself (a request signed by a client of eve@evil.test), without bob's consent:
    // noConsent, and no KeyPackage handed out.
    let eve = forged_client("mimi://evil.test/d/eve/0000000000000001");
    let own = eve
        .key_material_request(
            bob.user(),
            &RoomId::parse("mimi://evil.test/r/0123456789abcdef0123456789abcdef").unwrap(),
        )
        .unwrap();
    let resp = post(wave_km, own).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let answer = KeyMaterialResponse::decode(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(answer.code(), Some(UserCode::NoConsent));
    assert!(answer.clients.is_empty());

    // A consent answer on behalf of a user evil.test does not host.
    let forged = ConsentEntry::new(
        ConsentOperation::Grant,
        "mimi://chirp.test/u/alice",
        "mimi://wave.test/u/bob",
    );
    let resp = post(
        format!(
            "https://chirp.test:{}/v1/updateConsent/chirp.test",
            net.fed["chirp.test"].port()
        ),
        forged.encode(),
    )
    .await;
    assert_eq!(
        error_code(resp).await,
        (StatusCode::FORBIDDEN, "peer_domain_mismatch".into())
    );

    // Random bytes to every endpoint: clear 4xx answers, never a 5xx, and the server keeps serving.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random_body = |len: usize| {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
    };
    for path in [
        "keyMaterial/chirp.test/u/alice".to_owned(),
        format!("update/{room_path}"),
        format!("submitMessage/{room_path}"),
        format!("notify/{room_path}"),
        "requestConsent/chirp.test".to_owned(),
        "updateConsent/chirp.test".to_owned(),
        "identifierQuery/chirp.test".to_owned(),
        format!("reportAbuse/{room_path}"),
    ] {
        for len in [0, 1, 7, 64, 300, 4096] {
            let resp = post(chirp_fed(&path), random_body(len)).await;
            assert!(
                resp.status().is_client_error(),
                "{path} with {len} random bytes: {}",
                resp.status()
            );
        }
    }

    // Nothing changed: same epoch, the room still works, bob got no forged message and the
    // repeated one once.
    let rooms = alice.rooms().unwrap();
    assert_eq!(rooms[0].epoch, epoch_before);
    alice.send_text(&room, "two").await.unwrap();
    assert_eq!(
        read_n(&mut bob, &room, 2).await,
        from("alice@chirp.test", &["twice", "two"])
    );
    assert!(
        read_now(&mut bob, &room).await.is_empty(),
        "the repeat delivered nothing more"
    );
}

/// A peer may relay a `keyMaterial` request as the hub named in its `roomId`, so it can name
/// itself the hub of a room of its own. It must still not speak for the target provider's own
/// users, who need no consent between them there: a request "from" one of them is signed with a
/// key evil.test made up, which wave.test knows is not that device's. Nothing is handed out, so
/// no Welcome of evil.test's can ever reach bob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_claim_key_material_in_the_name_of_the_target_providers_users() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::three(dir.path()).await;
    net.certify("evil.test");
    let bob = net.register("bob@wave.test").await;
    let carol = net.register("carol@wave.test").await;
    let evil = net.peer_client("evil.test");
    let evil_room = RoomId::parse("mimi://evil.test/r/0123456789abcdef0123456789abcdef").unwrap();
    let wave_km = format!(
        "https://wave.test:{}/v1/keyMaterial/wave.test/u/bob",
        net.fed["wave.test"].port()
    );
    // carol's real client URI, a made-up client of carol's, and a made-up wave.test user.
    for requester in [
        carol.device_uri().to_string(),
        "mimi://wave.test/d/carol/00000000000000ee".to_owned(),
        "mimi://wave.test/d/nobody/00000000000000ee".to_owned(),
    ] {
        let forged = forged_client(&requester)
            .key_material_request(bob.user(), &evil_room)
            .unwrap();
        let resp = evil
            .post(&wave_km)
            .header("From", "mimi@evil.test")
            .body(forged)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.bytes().await.unwrap();
        if status == StatusCode::OK {
            let answer = KeyMaterialResponse::decode(&body).unwrap();
            assert!(
                answer.clients.is_empty(),
                "{requester}: bob's KeyPackages were handed to evil.test ({:?})",
                answer.code()
            );
        } else {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                (status, v["error"].as_str().unwrap_or_default()),
                (StatusCode::FORBIDDEN, "unknown_device"),
                "{requester}"
            );
        }
    }
}

/// A follower provider that is itself malicious: evil.test has a real user (eve) in a room hubbed
/// at chirp.test, then submits a commit adding a KeyPackage it forged for a client of bob@wave.test
/// with a key of its own choosing. The hub never fetched that key for the room, so it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_key_package_for_someone_elses_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::federated(
        dir.path(),
        &["chirp.test", "wave.test", "evil.test"],
        |_| {},
    )
    .await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    let mut eve = net.register("eve@evil.test").await;
    consent(&bob, &alice).await;
    consent(&eve, &alice).await;
    let room = alice
        .create_room(Some("mixed"), &[bob.user().clone(), eve.user().clone()])
        .await
        .unwrap();
    join(&mut bob, &room).await;
    join(&mut eve, &room).await;
    let epoch = alice.rooms().unwrap()[0].epoch;

    // The forged client: a credential naming a client of bob@wave.test, a key evil.test holds.
    let (forger, forger_db) = forged_client_with_db("mimi://wave.test/d/bob/00000000000000ee");
    let forged_kp = forger.key_packages(&forger_db, 1).unwrap().remove(0);

    // Eve's own MLS state signs the commit adding it.
    let eve_key = eve.api().devices().await.unwrap().remove(0).signature_key;
    let eve_db = rusqlite::Connection::open(
        net.dir
            .join("profile-eve@evil.test")
            .join(parley_client::profile::DB_FILE),
    )
    .unwrap();
    let eve_mls =
        parley_client::mls::DeviceMls::load(&eve_db, eve.device_uri().clone(), &eve_key).unwrap();
    let validated = eve_mls
        .validate_key_package(&forged_kp, bob.user())
        .unwrap();
    let commit = eve_mls
        .add_members(&eve_db, &room, &[validated])
        .unwrap()
        .expect("a commit adding the forged client");

    let resp = net
        .peer_client("evil.test")
        .post(format!(
            "https://chirp.test:{}/v1/update/{}",
            net.fed["chirp.test"].port(),
            room.path_form()
        ))
        .header("From", "mimi@evil.test")
        .body(handshake_bundle(&commit).encode())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    match UpdateRoomResponse::decode(&resp.bytes().await.unwrap()).unwrap() {
        UpdateRoomResponse::NotAllowed { error_description } => {
            let text = String::from_utf8_lossy(error_description.as_slice()).into_owned();
            assert!(text.starts_with("unknown_device"), "{text}");
        }
        other => panic!("the forged add was not refused: {other:?}"),
    }

    // Unchanged: same epoch and members; the room keeps working for everyone.
    let info = alice.rooms().unwrap().remove(0);
    assert_eq!((info.epoch, info.members.len()), (epoch, 3));
    alice.send_text(&room, "still fine").await.unwrap();
    assert_eq!(
        read_n(&mut bob, &room, 1).await,
        from("alice@chirp.test", &["still fine"])
    );
}

/// A KeyPackage claimed for a room lets its claimer add that device once. alice claims one of
/// bob's KeyPackages and keeps it, adds bob (with another), removes him; bob then blocks her.
/// Re-adding bob with the kept package would need no new claim, so no consent check: the hub
/// must refuse it, having spent its record of bob's key on the first add.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_key_package_adds_its_device_once() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::three(dir.path()).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    consent(&bob, &alice).await;
    let room = alice.create_room(Some("once"), &[]).await.unwrap();
    let kept = alice
        .api()
        .claim_key_packages(
            bob.user(),
            &alice.claim_request(bob.user(), &room, None).unwrap(),
        )
        .await
        .unwrap()
        .key_packages
        .remove(0)
        .key_package;
    alice.add_member(&room, bob.user()).await.unwrap();
    join(&mut bob, &room).await;
    alice.remove_member(&room, bob.user()).await.unwrap();
    sync_until(
        &mut bob,
        |e| matches!(e, Event::Removed { room: r } if *r == room),
    )
    .await;
    bob.contact_block(alice.user()).await.unwrap();

    let alice_key = alice.api().devices().await.unwrap().remove(0).signature_key;
    let alice_db = rusqlite::Connection::open(
        net.dir
            .join("profile-alice@chirp.test")
            .join(parley_client::profile::DB_FILE),
    )
    .unwrap();
    let alice_mls = DeviceMls::load(&alice_db, alice.device_uri().clone(), &alice_key).unwrap();
    let validated = alice_mls.validate_key_package(&kept, bob.user()).unwrap();
    let commit = alice_mls
        .add_members(&alice_db, &room, &[validated])
        .unwrap()
        .expect("a commit adding bob again");
    let request = parley_proto::api::CommitRequest {
        commit: commit.commit,
        welcome: commit.welcome,
        group_info: commit.group_info,
        ratchet_tree: commit.ratchet_tree,
    };
    match alice.api().post_commit(&room, &request).await {
        Err(e) => assert_eq!(e.code(), Some("unknown_device"), "{e}"),
        Ok(accepted) => panic!("bob was added again without a new claim: {accepted:?}"),
    }
}

/// A follower routes a Welcome to its device by a KeyPackageRef it handed out for the room,
/// and each ref once: a KeyPackage serves one Welcome (draft §5.2 lets the association go once
/// its Welcome is forwarded). A hub that sends a second Welcome for the same package (after
/// bob left, say) does not reach bob again. The test plays chirp.test, the room's hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_out_key_package_routes_one_welcome() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::three(dir.path()).await;
    let alice = net.register("alice@chirp.test").await;
    let bob = net.register("bob@wave.test").await;
    consent(&bob, &alice).await;
    let room = RoomId::from_random(&Domain::parse("chirp.test").unwrap(), [5; 16]);
    let kp = alice
        .api()
        .claim_key_packages(
            bob.user(),
            &alice.claim_request(bob.user(), &room, None).unwrap(),
        )
        .await
        .unwrap()
        .key_packages
        .remove(0)
        .key_package;
    let hub_sender = alice.api().provider().await.unwrap().external_sender;
    // Two groups of the room, made by two clients of alice's, each adding bob with that package.
    let welcome = |device: &str| {
        // A profile database of its own: groups need the profile's room ↔ group table.
        let profile = net.dir.join(format!("forged-{device}"));
        drop(parley_client::profile::Profile::create_or_open(&profile).unwrap());
        let db = rusqlite::Connection::open(profile.join(parley_client::profile::DB_FILE)).unwrap();
        let signer = DeviceMls::generate_signer(&db).unwrap();
        let uri = DeviceUri::parse(&format!("mimi://chirp.test/d/alice/{device}")).unwrap();
        let client = DeviceMls::load(&db, uri, signer.public()).unwrap();
        let state = RoomState::group(room.clone(), "twice", alice.user(), None);
        client.create_group(&db, &state, &hub_sender).unwrap();
        let validated = client.validate_key_package(&kp, bob.user()).unwrap();
        let out = client
            .add_members(&db, &room, &[validated])
            .unwrap()
            .unwrap();
        FanoutMessage {
            timestamp: now_ms(),
            message: MlsMessage::from_bytes(out.welcome.unwrap()).unwrap(),
            extra: FanoutExtra::Welcome {
                ratchet_tree: RatchetTreeOption::Full {
                    ratchet_tree: RatchetTree::from_bytes(out.ratchet_tree).unwrap(),
                },
            },
        }
    };
    let as_chirp = net.peer_client("chirp.test");
    let notify = format!(
        "https://wave.test:{}/v1/notify/{}",
        net.fed["wave.test"].port(),
        room.path_form()
    );
    for device in ["00000000000000a1", "00000000000000a2"] {
        let body = NotifyRequest {
            messages: vec![welcome(device)],
        }
        .encode();
        let resp = as_chirp
            .post(&notify)
            .header("From", "mimi@chirp.test")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED, "{device}");
    }
    let welcomes = bob
        .api()
        .queue(None)
        .await
        .unwrap()
        .entries
        .iter()
        .filter(|e| e.kind == parley_proto::api::EntryKind::Welcome)
        .count();
    assert_eq!(welcomes, 1, "one KeyPackage, one Welcome");
}

/// An MLS client of a user the test makes up (its state in memory), with its database.
fn forged_client_with_db(uri: &str) -> (DeviceMls, rusqlite::Connection) {
    let mut db = rusqlite::Connection::open_in_memory().unwrap();
    parley_client::mls::init_storage(&mut db).unwrap();
    let signer = DeviceMls::generate_signer(&db).unwrap();
    let client = DeviceMls::load(&db, DeviceUri::parse(uri).unwrap(), signer.public()).unwrap();
    (client, db)
}

/// [`forged_client_with_db`], for signing only.
fn forged_client(uri: &str) -> DeviceMls {
    forged_client_with_db(uri).0
}

/// An MLS PrivateMessage of the group that no member wrote: framing a provider can read (group,
/// epoch, content type, authenticated data) around bytes that decrypt to nothing.
fn private_message(group_id: &[u8], epoch: u64, aad: &[u8]) -> MlsMessage {
    // `opaque<V>` with RFC 9420's variable-length size (lengths below 2^14 here).
    fn opaque(out: &mut Vec<u8>, bytes: &[u8]) {
        match u16::try_from(bytes.len()).unwrap() {
            n @ 0..=63 => out.push(n as u8),
            n => out.extend_from_slice(&(0x4000 | n).to_be_bytes()),
        }
        out.extend_from_slice(bytes);
    }
    let mut bytes = vec![0, 1, 0, 2]; // mls10, mls_private_message
    opaque(&mut bytes, group_id);
    bytes.extend_from_slice(&epoch.to_be_bytes());
    bytes.push(1); // content_type: application
    opaque(&mut bytes, aad);
    opaque(&mut bytes, &[0x5a; 16]); // encrypted_sender_data
    opaque(&mut bytes, &[0xa5; 64]); // ciphertext
    MlsMessage::from_bytes(bytes).unwrap()
}

/// The MIMI `update` body of a commit the Parley client built.
fn handshake_bundle(commit: &OutgoingCommit) -> HandshakeBundle {
    let commit_message = MlsMessage::from_bytes(commit.commit.clone()).unwrap();
    let welcome = commit
        .welcome
        .clone()
        .map(|w| MlsMessage::from_bytes(w).unwrap().to_welcome().unwrap());
    // An MLSMessage is version and wire format (4 bytes), then the bare GroupInfo.
    let group_info = GroupInfo::from_bytes(commit.group_info[4..].to_vec()).unwrap();
    HandshakeBundle::Commit {
        commit: commit_message,
        welcome,
        group_info: GroupInfoOption::Full { group_info },
        ratchet_tree: RatchetTreeOption::Full {
            ratchet_tree: RatchetTree::from_bytes(commit.ratchet_tree.clone()).unwrap(),
        },
    }
}

/// Syncs until an event of `room` that `wanted` accepts arrives (or [`PATIENCE`] passed);
/// returns it.
async fn wait_for(device: &mut Device, room: &RoomId, wanted: impl Fn(&Event) -> bool) -> Event {
    let mut seen = sync_until(device, |e| e.room() == Some(room) && wanted(e)).await;
    seen.pop().unwrap()
}

/// Replies, reactions, edits, deletes and expiring messages between a hub's user and a
/// follower's user: the follower relays its user's messages (with their expiry hint) through
/// `submitMessage`, the hub notifies the follower (with the hint), and both providers drop the
/// expiring entries at the expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rich_content_across_providers() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::federated(dir.path(), &["chirp.test", "wave.test"], |_| {}).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    consent(&bob, &alice).await;
    let room = alice.direct_room(bob.user()).await.unwrap(); // hubbed at chirp.test
    let hello = alice.send_text(&room, "*hello* bob").await.unwrap();
    assert_eq!(
        read_n(&mut bob, &room, 1).await,
        from("alice@chirp.test", &["*hello* bob"])
    );

    // bob (follower side) replies; alice (hub side) reacts to the reply.
    let reply = bob.reply(&room, &hello.id, "hi **alice**").await.unwrap();
    let got = wait_for(&mut alice, &room, |e| matches!(e, Event::Message { .. })).await;
    assert!(
        matches!(&got, Event::Message { id, reply_to: Some(to), text, .. }
            if *id == reply.id && *to == hello.id && text == "hi **alice**"),
        "{got:?}"
    );
    let like = alice.react(&room, &reply.id, "\u{2764}").await.unwrap();
    let got = wait_for(&mut bob, &room, |e| matches!(e, Event::Reaction { .. })).await;
    assert_eq!(
        got,
        Event::Reaction {
            room: room.clone(),
            sender: alice.user().clone(),
            target: reply.id,
            emoji: "\u{2764}".into(),
        }
    );

    // bob edits his reply, alice takes her reaction back, bob deletes the reply.
    bob.edit(&room, &reply.id, "hi alice!").await.unwrap();
    let got = wait_for(&mut alice, &room, |e| matches!(e, Event::Edit { .. })).await;
    assert!(
        matches!(&got, Event::Edit { target, text, .. } if *target == reply.id && text == "hi alice!"),
        "{got:?}"
    );
    alice.delete(&room, &like.id).await.unwrap();
    let got = wait_for(&mut bob, &room, |e| matches!(e, Event::Delete { .. })).await;
    assert!(matches!(&got, Event::Delete { target, .. } if *target == like.id));
    assert!(bob.history(&room, 10).unwrap()[1].reactions.is_empty());
    bob.delete(&room, &reply.id).await.unwrap();
    let got = wait_for(&mut alice, &room, |e| matches!(e, Event::Delete { .. })).await;
    assert!(matches!(&got, Event::Delete { target, .. } if *target == reply.id));
    assert!(alice.history(&room, 10).unwrap()[1].deleted);

    // Expiring messages both ways; neither receiver syncs before they expire.
    let lifetime = Duration::from_secs(2);
    bob.send_expiring(&room, "from wave, brief", lifetime)
        .await
        .unwrap();
    alice
        .send_expiring(&room, "from chirp, brief", lifetime)
        .await
        .unwrap();
    let soon = now_ms() + 3_000;
    // The hub queued bob's message for alice, and notified wave.test of alice's, each with the
    // hint (the follower writes its row when the notify arrives).
    let alice_rows = queued_for(&net.data_of("chirp.test"), &alice);
    assert!(
        alice_rows.len() == 1 && alice_rows[0] <= soon,
        "{alice_rows:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let bob_rows = loop {
        let rows = queued_for(&net.data_of("wave.test"), &bob);
        if !rows.is_empty() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(bob_rows.len() == 1 && bob_rows[0] <= soon, "{bob_rows:?}");

    let expiry = alice_rows[0].max(bob_rows[0]);
    tokio::time::sleep(Duration::from_millis(expiry.saturating_sub(now_ms()) + 50)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(queued_for(&net.data_of("chirp.test"), &alice).is_empty()
        && queued_for(&net.data_of("wave.test"), &bob).is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "expired entries were never swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(read_now(&mut alice, &room).await.is_empty());
    assert!(read_now(&mut bob, &room).await.is_empty());
    for d in [&alice, &bob] {
        let texts: Vec<String> = d
            .history(&room, 10)
            .unwrap()
            .into_iter()
            .filter(|h| !h.deleted)
            .map(|h| h.text)
            .collect();
        assert_eq!(texts, ["*hello* bob"], "{}", d.user());
    }
}

/// Syncs until the device is in every room of `rooms` (their Welcomes arrived), or [`PATIENCE`]
/// passed.
async fn join_all(device: &mut Device, rooms: &[&RoomId]) {
    let deadline = Instant::now() + PATIENCE;
    while rooms.iter().any(|r| device.room_devices(r).is_err()) {
        assert!(
            Instant::now() < deadline,
            "{} never joined",
            device.device_uri()
        );
        for e in device.sync(Some(Duration::from_millis(500))).await.unwrap() {
            if let Event::Error { detail, .. } = e {
                panic!("{} failed to process an entry: {detail}", device.user());
            }
        }
    }
}

/// Multi-device across providers: carol@ping.test logs in a second device, and her first device
/// adds it to a group and a direct room hubbed at chirp.test (its KeyPackage claimed through the
/// hub, the commit relayed as MIMI `update`, the Welcome delivered by `notify`). The new device
/// reads and sends in both; removing it takes it out of both, and the rooms go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_device_on_a_follower_joins_rooms_hubbed_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::federated(dir.path(), &["chirp.test", "ping.test"], |_| {}).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut carol = net.register("carol@ping.test").await;
    consent(&carol, &alice).await;
    let group = alice
        .create_room(Some("across"), std::slice::from_ref(carol.user()))
        .await
        .unwrap();
    let direct = alice.direct_room(carol.user()).await.unwrap();
    join_all(&mut carol, &[&group, &direct]).await;

    let mut phone = net.login(carol.user(), "carol-phone").await;
    carol.sync(None).await.unwrap(); // adds the phone to both rooms, through chirp.test
    join_all(&mut phone, &[&group, &direct]).await;

    alice.send_text(&group, "to both of carol's").await.unwrap();
    for device in [&mut carol, &mut phone] {
        assert_eq!(
            read_n(device, &group, 1).await,
            from("alice@chirp.test", &["to both of carol's"])
        );
    }
    phone
        .send_text(&direct, "from carol's phone")
        .await
        .unwrap();
    for device in [&mut alice, &mut carol] {
        assert_eq!(
            read_n(device, &direct, 1).await,
            from("carol@ping.test", &["from carol's phone"])
        );
    }

    let phone_uri = phone.device_uri().clone();
    carol.remove_device(phone.device_id()).await.unwrap();
    assert!(matches!(
        phone.sync(None).await,
        Err(ClientError::DeviceRemoved)
    ));
    alice.sync(None).await.unwrap();
    for room in [&group, &direct] {
        assert!(!alice.room_devices(room).unwrap().contains(&phone_uri));
    }
    alice.send_text(&direct, "just you now").await.unwrap();
    assert_eq!(
        read_n(&mut carol, &direct, 1).await,
        from("alice@chirp.test", &["just you now"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_is_named_without_transport_details() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::federated(dir.path(), &["chirp.test"], |_| {}).await;
    let mut alice = net.register("alice@chirp.test").await;
    let room = alice.create_room(Some("files"), &[]).await.unwrap();
    let url = "https://nowhere.test/v1/assets/00112233445566778899aabbccddeeff";
    let err = alice.api().download(url, &room, 100).await.unwrap_err();
    assert_eq!(err.code(), Some("peer_unreachable"), "{err}");
    assert!(err.is_retryable(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("nowhere.test") && text.contains("try again later"),
        "{text}"
    );
    // DNS, TLS and socket details stay in the provider's log.
    for detail in ["dns", "error sending request", "lookup", "127.0.0.1"] {
        assert!(!text.contains(detail), "{text}");
    }
    net.shutdown().await;
}
