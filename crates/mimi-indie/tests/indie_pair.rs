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

    // A second user of the hub's own provider joins without keyMaterial; bob follows the commit.
    let amy = a.add_user("amy").await.expect("amy");
    a.add_to_room(&room, "alice", &amy).await.expect("add amy");
    assert_eq!(a.rooms("amy"), vec![room.clone()]);
    b.send("bob", &room, "welcome amy")
        .await
        .expect("bob sends");
    assert_eq!(
        texts(&a.wait_inbox("amy", &room, 1, WAIT).await),
        ["welcome amy"]
    );
    assert_eq!(a.wait_inbox("alice", &room, 2, WAIT).await.len(), 2);
    a.send("amy", &room, "thanks").await.expect("amy sends");
    assert_eq!(b.wait_inbox("bob", &room, 3, WAIT).await[2].sender, amy);

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
    assert_eq!(status, 403, "{body:?}");
    // A protocol other than mls10 is refused as such.
    let (status, body) = a
        .post_raw(B, "/v1/keyMaterial/indie-b.test/u/bob", A, vec![2, 0, 0])
        .await
        .expect("post");
    assert_eq!(status, 400);
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json error body");
    assert_eq!(json["error"], "unsupported_protocol");
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

const C: &str = "indie-c.test";

/// Starts providers for `domains`, each told where every other one listens.
async fn mesh(pki: &TestPki, domains: &[&str]) -> Vec<IndieProvider> {
    let mut providers = Vec::new();
    for domain in domains {
        providers.push(
            IndieProvider::start(config(pki, domain, BTreeMap::new()))
                .await
                .expect("start"),
        );
    }
    for p in &providers {
        for q in &providers {
            if p.domain() != q.domain() {
                p.add_peer(q.domain(), &q.base_url()).expect("peer");
            }
        }
    }
    providers
}

/// `target` at `theirs` consents to `requester` at `ours`.
async fn connect(
    ours: &IndieProvider,
    requester: &str,
    theirs: &IndieProvider,
    target: &str,
    target_uri: &str,
    requester_uri: &str,
) {
    ours.request_consent(requester, target_uri)
        .await
        .expect("request");
    theirs
        .grant_consent(target, requester_uri)
        .await
        .expect("grant");
}

fn texts(inbox: &[mimi_indie::ReceivedMessage]) -> Vec<&str> {
    inbox.iter().map(|m| m.text.as_str()).collect()
}

#[tokio::test]
async fn a_hub_fans_out_to_every_other_follower_and_takes_followers_commits() {
    use mimi_indie::wire::{
        decode, decode_notify_body, encode, FanoutExtra, IdentifierUri, Protocol,
        SubmitMessageRequest, SubmitMessageResponse, SubmitStatus,
    };

    let pki = TestPki::new().expect("ca");
    let providers = mesh(&pki, &[A, B, C]).await;
    let (a, b, c) = (&providers[0], &providers[1], &providers[2]);
    let alice = a.add_user("alice").await.expect("alice");
    let bob = b.add_user("bob").await.expect("bob");
    let carol = c.add_user("carol").await.expect("carol");
    connect(a, "alice", b, "bob", &bob, &alice).await;
    connect(a, "alice", c, "carol", &carol, &alice).await;

    let room = a.create_room("alice", "plaza").await.expect("room");
    a.add_to_room(&room, "alice", &bob).await.expect("add bob");
    a.add_to_room(&room, "alice", &carol)
        .await
        .expect("add carol");
    assert_eq!(c.rooms("carol"), vec![room.clone()]);
    assert_eq!(a.room_members(&room).expect("view").clients.len(), 3);

    // carol's message reaches alice (hub) and bob (another follower), not carol's provider again.
    c.send("carol", &room, "from carol")
        .await
        .expect("carol sends");
    assert_eq!(
        texts(&a.wait_inbox("alice", &room, 1, WAIT).await),
        ["from carol"]
    );
    assert_eq!(
        texts(&b.wait_inbox("bob", &room, 1, WAIT).await),
        ["from carol"]
    );
    assert!(c.inbox("carol", &room).is_empty());
    let stale = a
        .sent_notifies()
        .into_iter()
        .rev()
        .find(|n| n.domain == B)
        .expect("notify to b");
    let (stale, _) = decode_notify_body(&stale.body).expect("notify body")[0].clone();
    assert!(matches!(stale.extra, FanoutExtra::Application { .. }));

    // bob (a follower) commits a self-update through `update`; alice and carol follow it.
    b.update_keys("bob", &room).await.expect("bob updates");
    a.send("alice", &room, "after update")
        .await
        .expect("alice sends");
    assert_eq!(
        texts(&b.wait_inbox("bob", &room, 2, WAIT).await),
        ["from carol", "after update"]
    );
    assert_eq!(
        texts(&c.wait_inbox("carol", &room, 1, WAIT).await),
        ["after update"]
    );
    b.send("bob", &room, "bob after update")
        .await
        .expect("bob sends");
    assert_eq!(
        texts(&c.wait_inbox("carol", &room, 2, WAIT).await),
        ["after update", "bob after update"]
    );

    // submitMessage: a message of the old epoch is epochTooOld, another provider's user or a
    // non-participant is notAllowed.
    let submit = |sender: &str| {
        encode(&SubmitMessageRequest {
            protocol: Protocol::Mls10,
            app_message: stale.message.clone(),
            sending_uri: IdentifierUri::new(sender),
        })
        .expect("encode")
    };
    let path = c
        .peer_endpoint(A, "submitMessage", "indie-a.test/r/plaza")
        .await
        .expect("directory");
    let answer = |body: Vec<u8>| async {
        let (status, body) = c.post_raw(A, &path, C, body).await.expect("post");
        assert_eq!(status, 200);
        decode::<SubmitMessageResponse>(&body)
            .expect("answer")
            .status
    };
    assert!(matches!(
        answer(submit(&carol)).await,
        SubmitStatus::EpochTooOld(3)
    ));
    assert_eq!(answer(submit(&bob)).await, SubmitStatus::NotAllowed);
    assert_eq!(
        answer(submit("mimi://indie-c.test/u/dave")).await,
        SubmitStatus::NotAllowed
    );

    // A follower's user claims KeyPackages through the hub, which relays the signed request:
    // refused without the target's consent, answered with it.
    let refused = b.claim_key_packages("bob", &carol, &room).await;
    assert!(format!("{refused:?}").contains("NoConsent"), "{refused:?}");
    c.grant_consent("carol", &bob)
        .await
        .expect("carol grants bob");
    assert_eq!(
        b.claim_key_packages("bob", &carol, &room)
            .await
            .expect("claim"),
        1
    );

    // Only the room's hub may notify its followers.
    let (status, _) = c
        .post_raw(
            B,
            "/v1/notify/indie-a.test/r/plaza",
            C,
            encode(&stale).expect("encode"),
        )
        .await
        .expect("post");
    assert_eq!(status, 403);
    assert_eq!(b.inbox("bob", &room).len(), 2);

    // carol leaves (a Remove proposal for her own leaf through `update`); the hub's local
    // member commits it, dropping carol from the participant list; carol gets the commit.
    c.leave("carol", &room).await.expect("carol leaves");
    assert!(c.rooms("carol").is_empty(), "carol is out");
    let view = a.room_members(&room).expect("view");
    assert_eq!(view.clients.len(), 2);
    assert_eq!(
        view.participants,
        vec![(alice.clone(), 3), (bob.clone(), 2)]
    );
    a.send("alice", &room, "after carol left")
        .await
        .expect("alice sends");
    assert_eq!(
        texts(&b.wait_inbox("bob", &room, 3, WAIT).await),
        ["from carol", "after update", "after carol left"]
    );
    b.send("bob", &room, "bye").await.expect("bob sends");
    assert_eq!(a.wait_inbox("alice", &room, 3, WAIT).await.len(), 3);
    assert_eq!(c.inbox("carol", &room).len(), 2, "nothing after leaving");

    for p in providers {
        p.shutdown().await;
    }
}
