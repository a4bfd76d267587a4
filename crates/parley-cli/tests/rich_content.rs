//! Rich content end to end, through the client library and an in-process server hosting two
//! domains: Markdown, replies, reactions, edits and deletes (and who may make them), expiring
//! messages leaving history and the server's queues, and content that does not decode.

mod providers;

use parley_client::{ClientError, Device, Event};
use parley_proto::api::SendRequest;
use parley_proto::{MessageId, MessageStatus, MimiContent, RoomId, StatusReport};
use providers::*;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Short, so a test can watch expired queue entries go.
const SWEEP_MS: u64 = 100;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Everything a sync returns about `room` (failing on entries that could not be processed),
/// but for the delivered receipts every sync sends by itself (tested in receipts.rs).
async fn events_in(device: &mut Device, room: &RoomId) -> Vec<Event> {
    sync_lenient(device)
        .await
        .into_iter()
        .filter(|e| e.room() == Some(room))
        .filter(|e| !matches!(e, Event::Joined { .. } | Event::Receipt { .. }))
        .collect()
}

/// [`send_raw`] from `device`'s profile in `dir`.
async fn send_raw_in(dir: &Path, device: &Device, room: &RoomId, plaintext: &[u8]) {
    send_raw(&profile_dir(dir, device.user()), device, room, plaintext).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_reactions_edits_and_deletes_reach_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), |c| c.expiry_sweep_ms = SWEEP_MS).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let mut carol = register(dir.path(), &server, "carol@chirp.test").await;
    let room = alice
        .create_room(Some("rich"), &[bob.user().clone(), carol.user().clone()])
        .await
        .unwrap();

    // Markdown travels as written, except that HTML tags are escaped (GFM for MIMI).
    let hello = alice
        .send_text(&room, "**hello** <b>team</b>")
        .await
        .unwrap();
    let text = "**hello** &lt;b>team&lt;/b>";
    for d in [&mut bob, &mut carol] {
        let got = events_in(d, &room).await;
        assert!(
            matches!(&got[..], [Event::Message { id, text: t, reply_to: None, expires_at: None, .. }]
                if *id == hello.id && t == text),
            "{got:?}"
        );
    }

    // A reply names the message it answers.
    let reply = bob.reply(&room, &hello.id, "hi _alice_").await.unwrap();
    for d in [&mut alice, &mut carol] {
        let got = events_in(d, &room).await;
        assert!(
            matches!(&got[..], [Event::Message { id, reply_to: Some(to), text, .. }]
                if *id == reply.id && *to == hello.id && text == "hi _alice_"),
            "{got:?}"
        );
    }

    // A reaction, seen by everyone else.
    let like = carol.react(&room, &hello.id, "\u{1f44d}").await.unwrap();
    let reaction = Event::Reaction {
        room: room.clone(),
        sender: carol.user().clone(),
        target: hello.id,
        emoji: "\u{1f44d}".into(),
    };
    for d in [&mut alice, &mut bob] {
        assert_eq!(events_in(d, &room).await, vec![reaction.clone()]);
    }

    // The author edits; everyone's history shows the new text, marked as edited.
    alice
        .edit(&room, &hello.id, "**hello**, team")
        .await
        .unwrap();
    let edit = Event::Edit {
        room: room.clone(),
        sender: alice.user().clone(),
        target: hello.id,
        text: "**hello**, team".into(),
    };
    for d in [&mut bob, &mut carol] {
        assert_eq!(events_in(d, &room).await, vec![edit.clone()]);
    }
    for d in [&alice, &bob, &carol] {
        let history = d.history(&room, 10).unwrap();
        let first = &history[0];
        assert_eq!(
            (first.id, first.text.as_str(), first.edited),
            (hello.id, "**hello**, team", true)
        );
        assert_eq!(first.reactions.len(), 1, "{first:?}");
        assert_eq!(history[1].reply_to, Some(hello.id));
    }

    // Nobody but the author may edit or delete: the client refuses to send it...
    let refused = bob.edit(&room, &hello.id, "hijacked").await.unwrap_err();
    assert!(
        matches!(refused, ClientError::NotAuthor { ref author, .. } if author == alice.user()),
        "{refused}"
    );
    assert!(matches!(
        bob.delete(&room, &hello.id).await,
        Err(ClientError::NotAuthor { .. })
    ));
    assert!(matches!(
        bob.delete(&room, &like.id).await,
        Err(ClientError::NotAuthor { .. })
    ));
    // ...and receivers ignore a forged edit or delete that a modified client sends anyway.
    let bob_uri = bob.user().to_uri();
    let room_uri = room.to_string();
    let forged_edit = MimiContent::edit([1; 16], &bob_uri, &room_uri, hello.id, "hijacked");
    let forged_delete = MimiContent::delete([2; 16], &bob_uri, &room_uri, like.id);
    send_raw_in(dir.path(), &bob, &room, &forged_edit.encode()).await;
    send_raw_in(dir.path(), &bob, &room, &forged_delete.encode()).await;
    for d in [&mut alice, &mut carol] {
        assert!(events_in(d, &room).await.is_empty());
        let first = d.history(&room, 10).unwrap().remove(0);
        assert_eq!(
            (first.text.as_str(), first.reactions.len()),
            ("**hello**, team", 1)
        );
    }

    // Unlike: carol deletes her reaction.
    carol.delete(&room, &like.id).await.unwrap();
    let unlike = Event::Delete {
        room: room.clone(),
        sender: carol.user().clone(),
        target: like.id,
    };
    for d in [&mut alice, &mut bob] {
        assert_eq!(events_in(d, &room).await, vec![unlike.clone()]);
        assert!(d.history(&room, 10).unwrap()[0].reactions.is_empty());
    }

    // The author deletes: the text is gone everywhere, a placeholder stays.
    alice.delete(&room, &hello.id).await.unwrap();
    let delete = Event::Delete {
        room: room.clone(),
        sender: alice.user().clone(),
        target: hello.id,
    };
    for d in [&mut bob, &mut carol] {
        assert_eq!(events_in(d, &room).await, vec![delete.clone()]);
    }
    for d in [&alice, &bob, &carol] {
        let first = d.history(&room, 10).unwrap().remove(0);
        assert!(first.deleted && first.text.is_empty(), "{first:?}");
    }
    // A deleted message can be neither edited nor reacted to any more.
    assert!(matches!(
        alice.edit(&room, &hello.id, "back").await,
        Err(ClientError::UnknownMessage { .. })
    ));
    assert!(matches!(
        bob.react(&room, &hello.id, "?").await,
        Err(ClientError::UnknownMessage { .. })
    ));
    // Ids by prefix, as the CLI takes them.
    let prefix = &reply.id.to_hex()[..10];
    assert_eq!(carol.find_message(&room, prefix).unwrap(), reply.id);
    assert!(carol.find_message(&room, "01").is_err(), "too short");
    server.shutdown().await;
}

/// Waits (briefly) until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_messages_leave_history_and_the_servers_queues() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), |c| c.expiry_sweep_ms = SWEEP_MS).await;
    let server_dir = dir.path().join("server");
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let room = alice.direct_room(bob.user()).await.unwrap();
    events_in(&mut bob, &room).await;

    // Bob reads one expiring message in time; the other waits in his queue. (Two seconds leave
    // a slow machine room to check everything before the expiry.)
    let lifetime = Duration::from_secs(2);
    let read = alice
        .send_expiring(&room, "read in time", lifetime)
        .await
        .unwrap();
    let got = events_in(&mut bob, &room).await;
    let Some(Event::Message {
        id,
        expires_at: Some(deadline),
        ..
    }) = got.first()
    else {
        panic!("{got:?}");
    };
    assert_eq!(*id, read.id);
    let sent_at = now_ms();
    assert!(
        *deadline > sent_at && *deadline <= sent_at + 3_000,
        "whole seconds, rounded up: {deadline} vs {sent_at}"
    );
    assert_eq!(bob.history(&room, 10).unwrap().len(), 1);
    alice
        .send_expiring(&room, "never read", lifetime)
        .await
        .unwrap();
    alice.send_text(&room, "stays").await.unwrap();

    // The server keeps the expiring entry only until the message's expiry, not 30 days.
    let queued = queued_for(&server_dir, &bob);
    assert_eq!(queued.len(), 2, "{queued:?}");
    assert!(queued[0] <= now_ms() + 3_000, "{queued:?}");
    assert!(queued[1] > now_ms() + 86_400_000, "{queued:?}");

    // Past the expiry: gone from both histories, and swept from the server's queue.
    let expiry = queued[0];
    tokio::time::sleep(Duration::from_millis(expiry.saturating_sub(now_ms()) + 50)).await;
    assert!(bob.history(&room, 10).unwrap().is_empty());
    let alice_history: Vec<String> = alice
        .history(&room, 10)
        .unwrap()
        .into_iter()
        .map(|h| h.text)
        .collect();
    assert_eq!(alice_history, ["stays"]);
    eventually("the sweep drops the expired entry", || {
        queued_for(&server_dir, &bob).len() == 1
    })
    .await;
    let got = events_in(&mut bob, &room).await;
    assert!(
        matches!(&got[..], [Event::Message { text, .. }] if text == "stays"),
        "{got:?}"
    );

    // The server checks the hint it reads in the message's authenticated data.
    for bad in [now_ms() - 1, now_ms() + 31 * 86_400_000] {
        let request = SendRequest {
            message: alice.encrypt_text_expiring(&room, "x", bad).unwrap(),
        };
        let e = alice.api().send_message(&room, &request).await.unwrap_err();
        assert_eq!(e.code(), Some("invalid_expiry"), "{e}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_content_is_shown_and_the_room_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), |c| c.expiry_sweep_ms = SWEEP_MS).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let room = alice.direct_room(bob.user()).await.unwrap();
    events_in(&mut bob, &room).await;

    // Not CBOR; CBOR that is no MIMI content (the array [1, 2, 3]); MIMI content cut short.
    let valid_but_wrong = vec![0x83, 0x01, 0x02, 0x03];
    let mut truncated = MimiContent::text([5; 16], &alice.user().to_uri(), "x", "hi").encode();
    truncated.truncate(truncated.len() / 2);
    for garbage in [vec![0xff, 0x00, 0x13], valid_but_wrong, truncated] {
        send_raw_in(dir.path(), &alice, &room, &garbage).await;
    }
    alice.send_text(&room, "still fine").await.unwrap();
    let got = bob.sync(None).await.unwrap();
    let undecodable = got
        .iter()
        .filter(|e| matches!(e, Event::Undecodable { sender, .. } if sender == alice.user()))
        .count();
    assert_eq!(undecodable, 3, "{got:?}");
    assert!(
        matches!(got.last(), Some(Event::Message { text, .. }) if text == "still fine"),
        "{got:?}"
    );
    // The room keeps working both ways.
    bob.send_text(&room, "and back").await.unwrap();
    let back = events_in(&mut alice, &room).await;
    assert!(
        matches!(&back[..], [Event::Message { text, .. }] if text == "and back"),
        "{back:?}"
    );
    assert_eq!(bob.history(&room, 10).unwrap().len(), 2);
    let unknown = MessageId([9; 32]);
    assert!(matches!(
        bob.reply(&room, &unknown, "?").await,
        Err(ClientError::UnknownMessage { .. })
    ));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_never_outlives_the_expiring_message_it_edits() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), |c| c.expiry_sweep_ms = SWEEP_MS).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let room = alice.direct_room(bob.user()).await.unwrap();
    events_in(&mut bob, &room).await;
    let secret = alice
        .send_expiring(&room, "meet at 5", Duration::from_secs(2))
        .await
        .unwrap();
    assert!(events_in(&mut bob, &room)
        .await
        .iter()
        .any(|e| matches!(e, Event::Message { id, .. } if *id == secret.id)));

    // Edited while it lives; bob is offline until after it expired. The edit expires with
    // the message: the server drops its queue entry at the message's deadline.
    alice
        .edit(&room, &secret.id, "meet at 6, room 12")
        .await
        .unwrap();
    let queued = queued_for(&dir.path().join("server"), &bob);
    assert_eq!(queued.len(), 1);
    assert!(queued[0] <= now_ms() + 3000, "{queued:?}");
    // Deadlines are whole seconds, rounded up: 2 s from now is gone within 3 s.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let late = events_in(&mut bob, &room).await;
    assert!(
        !late.iter().any(|e| matches!(e, Event::Edit { .. })),
        "{late:?}"
    );
    assert!(bob.history(&room, 10).unwrap().is_empty());
    // Neither can a forged edit arriving after the expiry revive the text.
    let forged = MimiContent::edit(
        [6; 16],
        &alice.user().to_uri(),
        room.as_str(),
        secret.id,
        "revived",
    );
    send_raw_in(dir.path(), &alice, &room, &forged.encode()).await;
    alice.send_text(&room, "after").await.unwrap();
    let after = events_in(&mut bob, &room).await;
    assert!(
        matches!(&after[..], [Event::Message { text, .. }] if text == "after"),
        "{after:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_and_reactions_naming_no_message_here_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut alice = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let room = alice.direct_room(bob.user()).await.unwrap();
    events_in(&mut bob, &room).await;
    let real = alice.send_text(&room, "real").await.unwrap();
    events_in(&mut bob, &room).await;
    events_in(&mut alice, &room).await;

    // From bob's device, bypassing his client's checks: a read receipt for the real message
    // and for one that does not exist; a reaction to nothing; an oversized reaction.
    let uri = room.to_string();
    let ghost = MessageId([7; 32]);
    let report = StatusReport(vec![
        (ghost, MessageStatus::Read),
        (real.id, MessageStatus::Read),
    ]);
    let me = bob.user().to_uri();
    for content in [
        MimiContent::status([1; 16], &me, &uri, &report),
        MimiContent::reaction([2; 16], &me, &uri, ghost, "👍"),
        MimiContent::reaction([3; 16], &me, &uri, real.id, &"👍".repeat(100)),
    ] {
        send_raw_in(dir.path(), &bob, &room, &content.encode()).await;
    }
    let got = sync_lenient(&mut alice).await;
    let receipts: Vec<_> = got
        .iter()
        .filter_map(|e| match e {
            Event::Receipt { target, .. } => Some(*target),
            _ => None,
        })
        .collect();
    assert_eq!(receipts, vec![real.id], "{got:?}");
    assert!(
        !got.iter().any(|e| matches!(e, Event::Reaction { .. })),
        "{got:?}"
    );
    assert!(alice.history(&room, 10).unwrap()[0].reactions.is_empty());
    server.shutdown().await;
}
