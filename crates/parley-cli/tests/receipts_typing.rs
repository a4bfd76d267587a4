//! Receipts (draft-mahy-mimi-message-status) end to end: receiving devices report messages
//! delivered by themselves, one report per room per sync, never for their own messages nor for
//! receipts; `mark_read` reports what a device has as read; across providers too.

mod providers;

use parley_client::{Device, Event, ReceiptStatus};
use parley_proto::api::EntryKind;
use parley_proto::{MessageId, RoomId, UserId};
use providers::*;
use std::collections::BTreeSet;

/// The receipts among `events`, as (sender, target, status).
fn receipts(events: &[Event]) -> BTreeSet<(UserId, MessageId, ReceiptStatus)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Receipt {
                sender,
                target,
                status,
                ..
            } => Some((sender.clone(), *target, *status)),
            _ => None,
        })
        .collect()
}

/// The application messages waiting in `device`'s queue at its provider.
async fn queued_messages(device: &Device) -> usize {
    let page = device.api().queue(None).await.unwrap();
    page.entries
        .iter()
        .filter(|e| e.kind == EntryKind::Message)
        .count()
}

fn of(
    user: &Device,
    ids: &[MessageId],
    status: ReceiptStatus,
) -> Vec<(UserId, MessageId, ReceiptStatus)> {
    ids.iter()
        .map(|id| (user.user().clone(), *id, status))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_receipts_come_by_themselves_and_read_receipts_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::one_server(dir.path(), |_| {}).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    let mut carol = net.register("carol@chirp.test").await;
    let room = alice
        .create_room(
            Some("receipts"),
            &[bob.user().clone(), carol.user().clone()],
        )
        .await
        .unwrap();
    join(&mut bob, &room).await;
    join(&mut carol, &room).await;
    let ids = [
        alice.send_text(&room, "one").await.unwrap().id,
        alice.send_text(&room, "two").await.unwrap().id,
    ];

    // Bob's sync reports both delivered, in one message.
    bob.sync(None).await.unwrap();
    assert_eq!(
        queued_messages(&alice).await,
        1,
        "one report per room per sync"
    );
    // Carol sees bob's receipts too (they go to the room), and reports her own.
    let seen = receipts(&carol.sync(None).await.unwrap());
    assert_eq!(
        seen,
        of(&bob, &ids, ReceiptStatus::Delivered)
            .into_iter()
            .collect()
    );
    let mut want: BTreeSet<_> = of(&bob, &ids, ReceiptStatus::Delivered)
        .into_iter()
        .collect();
    want.extend(of(&carol, &ids, ReceiptStatus::Delivered));
    assert_eq!(receipts(&alice.sync(None).await.unwrap()), want);
    // No receipts for receipts, nor for one's own messages: once everyone has synced, nothing
    // more is sent.
    bob.sync(None).await.unwrap();
    for d in [&alice, &bob, &carol] {
        assert_eq!(queued_messages(d).await, 0, "{} got more", d.user());
    }

    // Bob reads: once, for everything he has; everyone else sees it.
    assert_eq!(bob.mark_read(&room).await.unwrap(), 2);
    assert_eq!(bob.mark_read(&room).await.unwrap(), 0, "nothing new");
    let read = of(&bob, &ids, ReceiptStatus::Read).into_iter().collect();
    assert_eq!(receipts(&alice.sync(None).await.unwrap()), read);
    assert_eq!(receipts(&carol.sync(None).await.unwrap()), read);
    // Bob's own messages are never his to report; alice's new one is.
    bob.send_text(&room, "mine").await.unwrap();
    let three = alice.send_text(&room, "three").await.unwrap().id;
    bob.sync(None).await.unwrap();
    assert_eq!(bob.mark_read(&room).await.unwrap(), 1);
    let got = receipts(&alice.sync(None).await.unwrap());
    assert_eq!(
        got,
        [
            (bob.user().clone(), three, ReceiptStatus::Delivered),
            (bob.user().clone(), three, ReceiptStatus::Read)
        ]
        .into_iter()
        .collect()
    );

    // A second device of bob's learns what bob read from his first device's report, and
    // reports nothing read again; the others see bob's receipts once per user.
    let mut phone = net.login(bob.user(), "bob-phone").await;
    bob.sync(None).await.unwrap(); // adds the phone to the room
    join(&mut phone, &room).await;
    let four = alice.send_text(&room, "four").await.unwrap().id;
    bob.sync(None).await.unwrap();
    phone.sync(None).await.unwrap();
    assert_eq!(bob.mark_read(&room).await.unwrap(), 1);
    phone.sync(None).await.unwrap();
    assert_eq!(
        phone.mark_read(&room).await.unwrap(),
        0,
        "bob read it already"
    );
    let got = receipts(&alice.sync(None).await.unwrap());
    assert_eq!(
        got,
        [
            (bob.user().clone(), four, ReceiptStatus::Delivered),
            (bob.user().clone(), four, ReceiptStatus::Read)
        ]
        .into_iter()
        .collect(),
        "bob's two devices, one receipt each"
    );
    net.shutdown().await;
}

/// Syncs `device` until it holds every receipt in `want` (others may come too).
async fn await_receipts(device: &mut Device, want: &BTreeSet<(UserId, MessageId, ReceiptStatus)>) {
    let mut got = BTreeSet::new();
    sync_until(device, |e| {
        if let Event::Receipt {
            sender,
            target,
            status,
            ..
        } = e
        {
            got.insert((sender.clone(), *target, *status));
        }
        want.is_subset(&got)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_cross_providers() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::three(dir.path()).await;
    let (mut alice, mut bob, mut carol) = alice_bob_carol(&net).await;
    let room: RoomId = alice
        .create_room(Some("far"), &[bob.user().clone(), carol.user().clone()])
        .await
        .unwrap();
    join(&mut bob, &room).await;
    join(&mut carol, &room).await;

    // Carol (a follower) writes; the hub's user and the other follower's report it delivered.
    let hello = carol.send_text(&room, "hello from ping").await.unwrap().id;
    for d in [&mut alice, &mut bob] {
        sync_until(
            d,
            |e| matches!(e, Event::Message { id, .. } if *id == hello),
        )
        .await;
    }
    let mut want: BTreeSet<_> = of(&alice, &[hello], ReceiptStatus::Delivered)
        .into_iter()
        .collect();
    want.extend(of(&bob, &[hello], ReceiptStatus::Delivered));
    await_receipts(&mut carol, &want).await;

    // Bob reads it: carol and alice both hear of it.
    assert_eq!(bob.mark_read(&room).await.unwrap(), 1);
    let read = of(&bob, &[hello], ReceiptStatus::Read)
        .into_iter()
        .collect();
    await_receipts(&mut carol, &read).await;
    await_receipts(&mut alice, &read).await;
    net.shutdown().await;
}

// --- typing indicators ----------------------------------------------------------------------

/// Waits (up to `within`) for a typing indicator on a live session; `None` if none came.
async fn typing_on(
    device: &Device,
    live: &mut parley_client::Live,
    within: std::time::Duration,
) -> Option<(RoomId, UserId)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let push = tokio::time::timeout_at(deadline, live.next()).await.ok()?;
        if let parley_client::Push::Ephemeral { room, data } = push.unwrap() {
            if let Some(Event::Typing { room, sender }) = device.open_ephemeral(&room, &data) {
                return Some((room, sender));
            }
        }
    }
}

async fn queue_len(device: &Device) -> usize {
    device.api().queue(None).await.unwrap().entries.len()
}

async fn queued_total(net: &Providers, domain: &str) -> u64 {
    let api = parley_client::ApiClient::new(&net.server_of(domain).url(), None).unwrap();
    let metrics = api.metrics().await.unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("parley_queue_entries_total "))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_connected_devices_only_and_is_never_stored() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::three(dir.path()).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut erin = net.register("erin@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    let mut carol = net.register("carol@ping.test").await;
    consent(&bob, &alice).await;
    consent(&carol, &alice).await;
    let members = [
        erin.user().clone(),
        bob.user().clone(),
        carol.user().clone(),
    ];
    let room = alice.create_room(Some("typing"), &members).await.unwrap();
    for d in [&mut erin, &mut bob, &mut carol] {
        join(d, &room).await;
    }
    for d in [&mut alice, &mut erin, &mut bob, &mut carol] {
        d.sync(None).await.unwrap(); // settle receipts and key top-ups
    }
    let queued_before: Vec<u64> = futures_util::future::join_all(
        ["chirp.test", "wave.test", "ping.test"].map(|d| queued_total(&net, d)),
    )
    .await;

    // Carol (a follower) types: the hub's connected member and the other follower's see it,
    // by way of the hub. Erin is offline.
    let mut alice_live = alice.live().await.unwrap();
    let mut bob_live = bob.live().await.unwrap();
    let mut carol_live = carol.live().await.unwrap();
    carol.send_typing(&room).await.unwrap();
    let from_carol = Some((room.clone(), carol.user().clone()));
    let patience = Duration::from_secs(10);
    assert_eq!(
        typing_on(&alice, &mut alice_live, patience).await,
        from_carol
    );
    assert_eq!(typing_on(&bob, &mut bob_live, patience).await, from_carol);
    // The hub's user types: both followers see it; nobody sees their own.
    alice.send_typing(&room).await.unwrap();
    let from_alice = Some((room.clone(), alice.user().clone()));
    assert_eq!(typing_on(&bob, &mut bob_live, patience).await, from_alice);
    assert_eq!(
        typing_on(&carol, &mut carol_live, patience).await,
        from_alice
    );
    let short = Duration::from_millis(500);
    assert_eq!(typing_on(&alice, &mut alice_live, short).await, None);

    // Never queued, at any provider; erin, connecting later, never gets it.
    for d in [&alice, &erin, &bob, &carol] {
        assert_eq!(queue_len(d).await, 0, "{} has it queued", d.user());
    }
    let queued_after: Vec<u64> = futures_util::future::join_all(
        ["chirp.test", "wave.test", "ping.test"].map(|d| queued_total(&net, d)),
    )
    .await;
    assert_eq!(queued_after, queued_before, "no provider queued anything");
    let mut erin_live = erin.live().await.unwrap();
    assert_eq!(typing_on(&erin, &mut erin_live, short).await, None);
    assert!(!erin
        .sync(None)
        .await
        .unwrap()
        .iter()
        .any(|e| matches!(e, Event::Typing { .. })));

    // An indicator that overtakes queued messages of its sender changes nothing stored: bob's
    // messages, sent before it but read after it, all decrypt.
    for i in 0..8 {
        bob.send_text(&room, &format!("queued {i}")).await.unwrap();
    }
    bob.send_typing(&room).await.unwrap();
    let from_bob = Some((room.clone(), bob.user().clone()));
    assert_eq!(typing_on(&carol, &mut carol_live, patience).await, from_bob);
    let mut texts = Vec::new();
    sync_until(&mut carol, |e| {
        if let Event::Message { text, .. } = e {
            texts.push(text.clone());
        }
        texts.len() == 8
    })
    .await;
    assert_eq!(texts.last().map(String::as_str), Some("queued 7"));
    for live in [alice_live, bob_live, carol_live, erin_live] {
        live.close().await;
    }
    net.shutdown().await;
}
