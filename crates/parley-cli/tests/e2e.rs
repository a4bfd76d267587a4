//! End-to-end through the client library and an in-process server on an ephemeral loopback port
//! with real storage: groups with add/remove, offline catch-up, and a further device.

mod providers;

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::{
    BasicCredential, Extension, Extensions, ExternalSender, GroupContext, GroupId, MlsGroup,
    SignatureScheme,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider as _;
use parley_client::{Device, Event};
use parley_proto::api::CommitRequest;
use parley_proto::{RoomId, UserId};
use parley_server::config::ServerConfig;
use parley_server::Server;
use providers::*;
use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_four_with_add_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let mut carol = register(dir.path(), &server, "carol@chirp.test").await;
    let mut dave = register(dir.path(), &server, "dave@wave.test").await;

    let room = alice
        .create_room(Some("four"), &[bob.user().clone(), carol.user().clone()])
        .await
        .unwrap();
    alice.send_text(&room, "one").await.unwrap();
    assert_eq!(
        read_lenient(&mut bob, &room).await,
        from("alice@chirp.test", &["one"])
    );
    assert_eq!(
        read_lenient(&mut carol, &room).await,
        from("alice@chirp.test", &["one"])
    );
    assert!(
        read_lenient(&mut dave, &room).await.is_empty(),
        "dave is not a member yet"
    );

    // Only admins add users: bob is refused until alice (the creator, first admin) promotes him.
    let refused = bob.add_member(&room, dave.user()).await.unwrap_err();
    assert_eq!(refused.code(), Some("not_admin"), "{refused}");
    alice.promote(&room, bob.user()).await.unwrap();
    let admins = alice.api().room(&room).await.unwrap().admins;
    assert_eq!(admins, vec!["alice@chirp.test", "bob@wave.test"]);
    let not_admin = carol
        .promote(&room, &dave.user().clone())
        .await
        .unwrap_err();
    assert_eq!(not_admin.code(), Some("not_admin"), "{not_admin}");
    // Now a member other than the creator adds dave; dave joins and talks.
    bob.add_member(&room, dave.user()).await.unwrap();
    read_lenient(&mut dave, &room).await;
    dave.send_text(&room, "two").await.unwrap();
    for d in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(
            read_lenient(d, &room).await,
            from("dave@wave.test", &["two"])
        );
    }
    let info = alice
        .rooms()
        .unwrap()
        .into_iter()
        .find(|r| r.room == room)
        .unwrap();
    assert_eq!(info.members.len(), 4);

    // Remove carol: she sees the removal and cannot read anything after it.
    alice.remove_member(&room, carol.user()).await.unwrap();
    let removed = carol.sync(None).await.unwrap();
    assert!(
        removed
            .iter()
            .any(|e| matches!(e, Event::Removed { room: r } if r == &room)),
        "{removed:?}"
    );
    dave.send_text(&room, "three").await.unwrap();
    for d in [&mut alice, &mut bob] {
        assert_eq!(
            read_lenient(d, &room).await,
            from("dave@wave.test", &["three"])
        );
    }
    assert!(read_lenient(&mut carol, &room).await.is_empty());
    assert!(
        carol.send_text(&room, "let me in").await.is_err(),
        "a removed member cannot send"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_catches_up_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let bob_dir = dir.path().join("bob-profile");
    let bob_id = UserId::parse("bob@wave.test").unwrap();
    let bob = register_at(&bob_dir, &server.url(), &bob_id).await;
    let room = alice.direct_room(&bob_id).await.unwrap();
    drop(bob); // offline: no process, no connection
    let texts: Vec<String> = (0..40).map(|i| format!("message {i}")).collect();
    for t in &texts {
        alice.send_text(&room, t).await.unwrap();
    }
    let mut bob = Device::open(&bob_dir, None).unwrap();
    let got = read_lenient(&mut bob, &room).await;
    let want: Vec<(String, String)> = texts
        .iter()
        .map(|t| ("alice@chirp.test".to_owned(), t.clone()))
        .collect();
    assert_eq!(got, want);
    assert!(
        read_lenient(&mut bob, &room).await.is_empty(),
        "acked entries are not delivered again"
    );
    let history = bob.history(&room, 100).unwrap();
    assert_eq!(history.len(), 40);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_further_device_is_included_in_new_rooms() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let bob_id = UserId::parse("bob@wave.test").unwrap();
    let _bob1 = register_at(&dir.path().join("bob1"), &server.url(), &bob_id).await;
    let mut bob2 = login(dir.path(), &server, &bob_id, "bob2").await;
    assert_eq!(bob2.api().devices().await.unwrap().len(), 2);
    let room = alice
        .create_room(None, std::slice::from_ref(&bob_id))
        .await
        .unwrap();
    alice
        .send_text(&room, "to both of bob's devices")
        .await
        .unwrap();
    assert_eq!(
        read_lenient(&mut bob2, &room).await,
        from("alice@chirp.test", &["to both of bob's devices"])
    );
    let mut bob1 = Device::open(&dir.path().join("bob1"), None).unwrap();
    assert_eq!(
        read_lenient(&mut bob1, &room).await,
        from("alice@chirp.test", &["to both of bob's devices"])
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaves_and_the_others_commit_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let mut carol = register(dir.path(), &server, "carol@chirp.test").await;
    let dave = register(dir.path(), &server, "dave@wave.test").await;
    let room = alice
        .create_room(Some("leavers"), &[bob.user().clone(), carol.user().clone()])
        .await
        .unwrap();
    read_lenient(&mut bob, &room).await;
    read_lenient(&mut carol, &room).await;
    alice.promote(&room, carol.user()).await.unwrap();

    bob.leave(&room).await.unwrap();
    assert!(
        bob.send_text(&room, "still here?").await.is_err(),
        "a device that left cannot send"
    );

    // Carol has not seen the leave yet; her commit must include it, so the hub first refuses it
    // as pending_proposals, her client syncs, and the retry commits both the leave and the add.
    // (A leave needs no admin to commit; adding dave does: alice made carol one.)
    carol.add_member(&room, dave.user()).await.unwrap();
    let events = alice.sync(None).await.unwrap();
    let removed: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Members {
                room: r, removed, ..
            } if r == &room => Some(removed.iter().map(|u| u.to_string())),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(removed, vec!["bob@wave.test".to_string()], "{events:?}");
    let info = alice
        .rooms()
        .unwrap()
        .into_iter()
        .find(|r| r.room == room)
        .unwrap();
    let members: Vec<String> = info.members.iter().map(|u| u.to_string()).collect();
    assert_eq!(
        members,
        ["alice@chirp.test", "carol@chirp.test", "dave@wave.test"]
    );

    alice.send_text(&room, "bob is gone").await.unwrap();
    assert_eq!(
        read_lenient(&mut carol, &room).await,
        from("alice@chirp.test", &["bob is gone"])
    );
    assert!(
        read_lenient(&mut bob, &room).await.is_empty(),
        "the leaver reads nothing after leaving"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_commits_both_land_and_stale_commits_are_refused() {
    use parley_proto::api::{CommitRequest, EntryKind};
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let carol = register(dir.path(), &server, "carol@chirp.test").await;
    let dave = register(dir.path(), &server, "dave@wave.test").await;
    let room = alice
        .create_room(Some("race"), &[bob.user().clone()])
        .await
        .unwrap();
    read_lenient(&mut bob, &room).await;
    alice.promote(&room, bob.user()).await.unwrap();

    // Two members commit at the same time: the hub takes one, the other gets wrong_epoch,
    // catches up and retries on top of it.
    let (ra, rb) = (room.clone(), room.clone());
    let (carol_id, dave_id) = (carol.user().clone(), dave.user().clone());
    let a = tokio::spawn(async move { alice.add_member(&ra, &carol_id).await.map(|_| alice) });
    let b = tokio::spawn(async move { bob.add_member(&rb, &dave_id).await.map(|_| bob) });
    let mut alice = a.await.unwrap().unwrap();
    let mut bob = b.await.unwrap().unwrap();
    read_lenient(&mut alice, &room).await;
    read_lenient(&mut bob, &room).await;
    let info = bob
        .rooms()
        .unwrap()
        .into_iter()
        .find(|r| r.room == room)
        .unwrap();
    assert_eq!(info.members.len(), 4, "{info:?}");

    // A commit replayed after the room moved on is refused as stale, retryably.
    let mut carol = carol;
    read_lenient(&mut carol, &room).await;
    bob.remove_member(&room, dave.user()).await.unwrap();
    let queued = carol.api().queue(None).await.unwrap().entries;
    let old_commit = queued
        .iter()
        .find(|e| e.kind == EntryKind::Commit)
        .expect("a queued commit")
        .data
        .clone();
    read_lenient(&mut carol, &room).await;
    alice.send_text(&room, "still working").await.unwrap();
    let err = carol
        .api()
        .post_commit(
            &room,
            &CommitRequest {
                commit: old_commit.clone(),
                welcome: None,
                // Not at hand (bob's); the hub refuses the commit for its epoch regardless.
                group_info: Vec::new(),
                ratchet_tree: Vec::new(),
            },
        )
        .await
        .unwrap_err();
    // The replayed commit is for the epoch it was built for, which the room has left.
    assert!(
        err.code() == Some("wrong_epoch") && err.is_retryable(),
        "{err}"
    );
    // The room still works for everyone.
    assert_eq!(
        read_lenient(&mut carol, &room).await,
        from("alice@chirp.test", &["still working"])
    );
    server.shutdown().await;
}

/// With room for one room in memory, rooms are evicted and reloaded from the database between
/// requests, and nothing changes for the users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_reload_from_the_database_when_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().join("server"),
        ..Default::default()
    };
    config.add_domain("chirp.test");
    config.limits.max_cached_rooms = 1;
    let server = Server::start(config).await.unwrap();
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@chirp.test").await;
    let carol = register(dir.path(), &server, "carol@chirp.test").await;
    let mut rooms = Vec::new();
    for name in ["one", "two", "three"] {
        rooms.push(
            alice
                .create_room(Some(name), &[bob.user().clone()])
                .await
                .unwrap(),
        );
    }
    for round in 0..2 {
        for room in &rooms {
            alice
                .send_text(room, &format!("round {round}"))
                .await
                .unwrap();
        }
    }
    // A commit on an evicted room is verified against the reloaded public state.
    alice.add_member(&rooms[0], carol.user()).await.unwrap();
    alice.send_text(&rooms[0], "with carol").await.unwrap();
    let events = bob.sync(None).await.unwrap();
    for (i, room) in rooms.iter().enumerate() {
        let got: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message { room: r, text, .. } if r == room => Some(text.as_str()),
                Event::Error { detail, .. } => panic!("bob failed to process an entry: {detail}"),
                _ => None,
            })
            .collect();
        let mut want = vec!["round 0", "round 1"];
        if i == 0 {
            want.push("with carol");
        }
        assert_eq!(got, want, "room {i}");
    }
    server.shutdown().await;
}

/// A user who blocked someone cannot be put back into that someone's room with a KeyPackage
/// claimed before the block: alice keeps one of bob's, adds bob (with another), removes him;
/// bob blocks alice; the hub refuses alice's commit adding bob again with the kept package.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_blocked_the_committer_is_not_added_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let room = alice.create_room(Some("again"), &[]).await.unwrap();
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
        profile_dir(dir.path(), alice.user()).join(parley_client::profile::DB_FILE),
    )
    .unwrap();
    let alice_mls =
        parley_client::mls::DeviceMls::load(&alice_db, alice.device_uri().clone(), &alice_key)
            .unwrap();
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
        Err(e) => assert_eq!(e.code(), Some("no_consent"), "{e}"),
        Ok(accepted) => panic!("bob was added back past his block: {accepted:?}"),
    }
}

/// A commit of `device` (its MLS state read from its profile, `key` its signature key) whose
/// only proposal replaces the room's GroupContext extensions with what `edit` makes of them:
/// what a client other than Parley's could send.
fn commit_with_extensions(
    dir: &Path,
    device: &Device,
    key: &[u8],
    room: &RoomId,
    edit: impl FnOnce(&mut Extensions<GroupContext>),
) -> CommitRequest {
    let db = rusqlite::Connection::open(
        profile_dir(dir, device.user()).join(parley_client::profile::DB_FILE),
    )
    .unwrap();
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let provider = parley_client::mls::MlsProvider::new(&crypto, &db);
    let mut group = MlsGroup::load(
        provider.storage(),
        &GroupId::from_slice(&room.parley_group_id()),
    )
    .unwrap()
    .unwrap();
    let signer = SignatureKeyPair::read(provider.storage(), key, SignatureScheme::ED25519).unwrap();
    let mut extensions = group.extensions().clone();
    edit(&mut extensions);
    let bundle = group
        .commit_builder()
        .propose_group_context_extensions(extensions)
        .unwrap()
        .load_psks(provider.storage())
        .unwrap()
        .create_group_info(true)
        .use_ratchet_tree_extension(false)
        .build(provider.rand(), provider.crypto(), &signer, |_| true)
        .unwrap()
        .stage_commit(&provider)
        .unwrap();
    let tree = group
        .pending_commit()
        .unwrap()
        .export_ratchet_tree(provider.crypto(), group.export_ratchet_tree())
        .unwrap()
        .unwrap();
    // Left unmerged for the hub to judge; the device's own client never sees it.
    group.clear_pending_commit(provider.storage()).unwrap();
    let (commit, _, group_info) = bundle.into_messages();
    CommitRequest {
        commit: commit.tls_serialize_detached().unwrap(),
        welcome: None,
        group_info: group_info.unwrap().tls_serialize_detached().unwrap(),
        ratchet_tree: tree.tls_serialize_detached().unwrap(),
    }
}

/// Every Parley client refuses a commit that changes the room's `external_senders` (only the
/// hub may propose from outside the group), so the hub must refuse it too: a commit it
/// accepted and the members cannot merge would leave them behind the hub's epoch for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_changing_the_external_senders_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let room = alice
        .create_room(Some("senders"), &[bob.user().clone()])
        .await
        .unwrap();
    join(&mut bob, &room).await;
    let key = alice.api().devices().await.unwrap().remove(0).signature_key;
    let extra = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
    let request = commit_with_extensions(dir.path(), &alice, &key, &room, |extensions| {
        let mut senders = extensions.external_senders().unwrap().clone();
        senders.push(ExternalSender::new(
            extra.public().into(),
            BasicCredential::new(b"mimi://evil.test".to_vec()).into(),
        ));
        extensions
            .add_or_replace(Extension::ExternalSenders(senders))
            .unwrap();
    });
    match alice.api().post_commit(&room, &request).await {
        Err(e) => assert_eq!(e.code(), Some("policy"), "{e}"),
        Ok(accepted) => {
            let seen = read_lenient(&mut bob, &room).await;
            panic!("accepted ({accepted:?}); bob then read {seen:?}")
        }
    }
}

/// A room's name is checked when the room is created (at most 128 printable characters); a
/// commit renaming it later is held to the same rule, or any member could put control
/// characters (terminal escapes) or a name of any length in front of every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_renaming_the_room_keeps_to_the_naming_rules() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let room = alice
        .create_room(Some("plain"), &[bob.user().clone()])
        .await
        .unwrap();
    join(&mut bob, &room).await;
    let key = alice.api().devices().await.unwrap().remove(0).signature_key;
    let rename = |name: String| {
        commit_with_extensions(dir.path(), &alice, &key, &room, move |extensions| {
            use parley_proto::mimi::room_state::{RoomState, APP_DATA_DICTIONARY};
            let data = &extensions.unknown(APP_DATA_DICTIONARY).unwrap().0;
            let mut state = RoomState::decode(data).unwrap();
            state.name = name;
            extensions
                .add_or_replace(Extension::Unknown(
                    APP_DATA_DICTIONARY,
                    openmls::prelude::UnknownExtension(state.encode().unwrap()),
                ))
                .unwrap();
        })
    };
    for name in ["\u{1b}]0;pwned\u{7}\u{1b}[2J".to_owned(), "x".repeat(129)] {
        match alice.api().post_commit(&room, &rename(name.clone())).await {
            Err(e) => assert_eq!(e.code(), Some("invalid_name"), "{name:?}: {e}"),
            Ok(accepted) => panic!("renamed to {name:?}: {accepted:?}"),
        }
    }
}
