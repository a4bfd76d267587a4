//! Two indie providers talking MIMI to each other over mutual TLS: `indie-a.test` hubs a room,
//! `indie-b.test` follows it. Consent, keyMaterial, add (Welcome via notify), messages both
//! ways, a replayed notify applied once, impersonation and missing consent refused.

use std::collections::BTreeMap;
use std::time::Duration;

use mimi_indie::wire::ConsentOperation;
use mimi_indie::{IndieProvider, ProviderConfig, TestPki};

const A: &str = "indie-a.test";
const B: &str = "indie-b.test";
const WAIT: Duration = Duration::from_secs(10);

fn config(pki: &TestPki, domain: &str, peers: BTreeMap<String, String>) -> ProviderConfig {
    ProviderConfig {
        domain: domain.to_owned(),
        certs: pki.domain(domain).expect("certificates"),
        peer_ca_pem: pki.ca_pem().to_owned(),
        peers,
    }
}

/// Starts both providers and tells each where the other listens.
async fn pair(pki: &TestPki) -> (IndieProvider, IndieProvider) {
    let a = IndieProvider::start(config(pki, A, BTreeMap::new()))
        .await
        .expect("start a");
    let b = IndieProvider::start(config(pki, B, BTreeMap::new()))
        .await
        .expect("start b");
    a.add_peer(B, &b.base_url()).expect("a knows b");
    b.add_peer(A, &a.base_url()).expect("b knows a");
    (a, b)
}

#[tokio::test]
async fn hub_and_follower_interoperate() {
    let pki = TestPki::new().expect("ca");
    let (a, b) = pair(&pki).await;
    let alice = a.add_user("alice").await.expect("alice");
    let bob = b.add_user("bob").await.expect("bob");

    let room = a.create_room("alice", "clubhouse").await.expect("room");
    assert_eq!(room, "mimi://indie-a.test/r/clubhouse");

    // Without consent, keyMaterial answers noConsent and nothing is added.
    let refused = a.add_to_room(&room, "alice", &bob).await;
    assert!(
        format!("{refused:?}").contains("NoConsent"),
        "expected noConsent, got {refused:?}"
    );

    // alice asks bob (requestConsent + bilateral updateConsent grant), bob grants.
    a.request_consent("alice", &bob)
        .await
        .expect("request consent");
    let events = b.consent_events();
    assert!(events
        .iter()
        .any(|e| e.operation == ConsentOperation::Request
            && e.requester == alice
            && e.target == bob));
    assert!(
        b.has_consent_from("bob", &alice),
        "bilateral grant recorded at b"
    );
    b.grant_consent("bob", &alice).await.expect("grant");
    assert!(a.has_consent_from("alice", &bob));

    // alice adds bob: keyMaterial at b, commit at the hub, Welcome to b via notify.
    a.add_to_room(&room, "alice", &bob).await.expect("add bob");
    assert_eq!(b.rooms("bob"), vec![room.clone()]);
    let view = a.room_members(&room).expect("members");
    assert_eq!(view.clients.len(), 2);
    assert_eq!(
        view.participants,
        vec![(alice.clone(), 3), (bob.clone(), 2)],
        "participant list with roles"
    );

    // Messages both ways.
    let id = a
        .send("alice", &room, "hello bob")
        .await
        .expect("alice sends");
    let inbox = b.wait_inbox("bob", &room, 1, WAIT).await;
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].sender, alice);
    assert_eq!(inbox[0].text, "hello bob");
    assert_eq!(inbox[0].message_id, id);

    b.send("bob", &room, "hi alice").await.expect("bob sends");
    let inbox = a.wait_inbox("alice", &room, 1, WAIT).await;
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].sender, bob);
    assert_eq!(inbox[0].text, "hi alice");
    // The hub does not send bob's own message back to bob's provider.
    assert_eq!(b.inbox("bob", &room).len(), 1);

    // A replayed notify is accepted (201) and applied once.
    let last = a.sent_notifies().pop().expect("a notified b");
    assert_eq!(last.domain, B);
    let path = a
        .peer_endpoint(B, "notify", "indie-a.test/r/clubhouse")
        .await
        .expect("directory");
    assert_eq!(path, "/v1/notify/indie-a.test/r/clubhouse");
    let (status, _) = a
        .post_raw(B, &path, A, last.body.clone())
        .await
        .expect("replay");
    assert_eq!(status, 201);
    assert_eq!(b.inbox("bob", &room).len(), 1, "replay not delivered again");
    // The percent-encoded full URI form reaches the same room.
    let (status, _) = a
        .post_raw(
            B,
            "/v1/notify/mimi%3A%2F%2Findie-a.test%2Fr%2Fclubhouse",
            A,
            last.body,
        )
        .await
        .expect("replay, encoded path");
    assert_eq!(status, 201);
    assert_eq!(b.inbox("bob", &room).len(), 1);

    a.send("alice", &room, "second")
        .await
        .expect("alice sends again");
    let inbox = b.wait_inbox("bob", &room, 2, WAIT).await;
    assert_eq!(
        inbox.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["hello bob", "second"]
    );

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn requests_the_certificate_does_not_prove_are_refused() {
    let pki = TestPki::new().expect("ca");
    let (a, b) = pair(&pki).await;
    b.add_user("bob").await.expect("bob");
    // a's certificate names indie-a.test, not indie-c.test.
    let (status, body) = a
        .post_raw(
            B,
            "/v1/requestConsent/indie-b.test",
            "indie-c.test",
            vec![1, 2, 3],
        )
        .await
        .expect("post");
    assert_eq!(status, 403);
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json error body");
    assert_eq!(json["error"], "peer_domain_mismatch");
    // A notify for a room b does not follow from a is refused too.
    let (status, body) = a
        .post_raw(B, "/v1/notify/indie-a.test/r/nowhere", A, vec![0; 8])
        .await
        .expect("post");
    assert!(status == 400 || status == 403, "status {status}: {body:?}");
    // Trailing bytes in a body are refused.
    let entry = mimi_indie::wire::encode(&mimi_indie::wire::ConsentEntry {
        operation: ConsentOperation::Request,
        requester_uri: mimi_indie::wire::IdentifierUri::new("mimi://indie-a.test/u/alice"),
        target_uri: mimi_indie::wire::IdentifierUri::new("mimi://indie-b.test/u/bob"),
        room_id: None,
        client_key_packages: Vec::new(),
        consent_extensions: Default::default(),
    })
    .expect("encode");
    let mut trailing = entry.clone();
    trailing.push(0);
    let (status, _) = a
        .post_raw(B, "/v1/requestConsent/indie-b.test", A, trailing)
        .await
        .expect("post");
    assert_eq!(status, 400);
    let (status, _) = a
        .post_raw(B, "/v1/requestConsent/indie-b.test", A, entry)
        .await
        .expect("post");
    assert_eq!(status, 201);
    a.shutdown().await;
    b.shutdown().await;
}
