//! Encrypted media end to end: a file is encrypted with a fresh key, uploaded to the sender's
//! provider, announced as a MIMI external part, and fetched by every receiver through its own
//! provider (locally, from the hosting provider, or via the hub's `proxyDownload`), checked
//! against its hash, decrypted and saved. Tampered files are discarded; oversized ones refused.

mod providers;

use parley_client::media::{self, Sealed};
use parley_client::{ClientError, Device, Event, SentFile};
use parley_proto::content::{ExternalPart, ENC_ALG_AES_128_GCM, HASH_ALG_SHA256};
use parley_proto::{Expiration, MimiContent, RoomId};
use providers::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LIMIT: u64 = 4 * 1024 * 1024;

/// Writes `data` to `dir/name` and returns the path.
fn file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// Syncs until the file message `id` arrives; returns its saved path and name.
async fn receive_file(device: &mut Device, id: &parley_proto::MessageId) -> (PathBuf, String) {
    let events = sync_until(
        device,
        |e| matches!(e, Event::Message { id: got, .. } if got == id),
    )
    .await;
    match events.last() {
        Some(Event::Message {
            file: Some(path),
            name: Some(name),
            ..
        }) => (PathBuf::from(path), name.clone()),
        other => panic!("{} got no file: {other:?}", device.user()),
    }
}

fn downloads(device: &Device) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(device.downloads_dir()) {
        Ok(dir) => dir
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn assets_in(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("assets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_cross_domains_tampering_is_caught_and_oversized_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::one_server(dir.path(), |c| {
        for d in &mut c.domains {
            d.max_upload_bytes = LIMIT;
        }
    })
    .await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    let room = alice
        .create_room(Some("files"), &[bob.user().clone()])
        .await
        .unwrap();
    join(&mut bob, &room).await;

    // A few MB across the two domains: bob gets the same bytes, saved under the name.
    let photo = noise(3 * 1024 * 1024 + 123, 7);
    let sent = alice
        .send_file(&room, &file(dir.path(), "holiday photo.jpg", &photo))
        .await
        .unwrap();
    assert_eq!(sent.name, "holiday photo.jpg");
    assert_eq!(
        sent.size,
        photo.len() as u64 + 16,
        "the GCM tag is uploaded too"
    );
    let (path, name) = receive_file(&mut bob, &sent.message.id).await;
    assert_eq!(name, "holiday photo.jpg");
    assert_eq!(path, bob.downloads_dir().join("holiday photo.jpg"));
    assert!(std::fs::read(&path).unwrap() == photo, "identical bytes");
    // The provider only ever had ciphertext.
    let stored = std::fs::read(
        net.data_of("chirp.test")
            .join("assets")
            .join(sent.url.rsplit('/').next().unwrap()),
    )
    .unwrap();
    assert!(!stored.windows(64).any(|w| w == &photo[1000..1064]));
    // Both histories show it; the sender's shows it as sent.
    for d in [&alice, &bob] {
        let history = d.history(&room, 10).unwrap();
        assert_eq!(history.last().unwrap().text, "[file holiday photo.jpg]");
    }
    // The same name again is saved next to the first, never over it.
    let again = alice
        .send_file(&room, &file(dir.path(), "holiday photo.jpg", b"second"))
        .await
        .unwrap();
    let (path, _) = receive_file(&mut bob, &again.message.id).await;
    assert_eq!(path, bob.downloads_dir().join("holiday photo (1).jpg"));
    assert_eq!(std::fs::read(&path).unwrap(), b"second");

    // Tampering with the stored ciphertext: bob's sync reports it and saves nothing.
    let secret = alice
        .send_file(&room, &file(dir.path(), "plans.pdf", &noise(100_000, 9)))
        .await
        .unwrap();
    let blob = net
        .data_of("chirp.test")
        .join("assets")
        .join(secret.url.rsplit('/').next().unwrap());
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[500] ^= 0x01;
    std::fs::write(&blob, bytes).unwrap();
    let events = sync_until(&mut bob, |e| matches!(e, Event::Error { .. })).await;
    let Some(Event::Error { room: r, detail }) = events.last() else {
        unreachable!()
    };
    assert_eq!(r.as_ref(), Some(&room));
    assert!(
        detail.contains("hash") && detail.contains("discarded"),
        "{detail}"
    );
    assert_eq!(
        downloads(&bob),
        vec!["holiday photo (1).jpg", "holiday photo.jpg"]
    );
    assert!(bob.sync(None).await.unwrap().is_empty(), "reported once");

    // Over the domain's limit: refused while uploading, with the limit in the error; nothing
    // is stored, nothing sent.
    let before = assets_in(&net.data_of("chirp.test"));
    let big = file(dir.path(), "big.bin", &noise(LIMIT as usize + 1, 3));
    match alice.send_file(&room, &big).await {
        Err(ClientError::AttachmentTooLarge(message)) => {
            assert!(message.contains(&LIMIT.to_string()), "{message}")
        }
        other => panic!("expected AttachmentTooLarge, got {other:?}"),
    }
    // Far over it: refused just the same, without sending all of it first.
    let huge = file(dir.path(), "huge.bin", &noise(3 * LIMIT as usize, 4));
    let outcome = alice.send_file(&room, &huge).await;
    assert!(
        matches!(outcome, Err(ClientError::AttachmentTooLarge(_))),
        "{outcome:?}"
    );
    assert_eq!(assets_in(&net.data_of("chirp.test")), before);
    assert!(bob.sync(None).await.unwrap().is_empty());
    net.shutdown().await;
}

/// Sends a file from `from` and checks every other device gets identical bytes.
async fn file_reaches_everyone(
    dir: &Path,
    room: &RoomId,
    from: &mut Device,
    to: &mut [&mut Device],
    seed: u64,
) -> SentFile {
    let data = noise(2 * 1024 * 1024 + seed as usize, seed);
    let name = format!("from-{}.bin", from.user().handle().as_str());
    let sent = from
        .send_file(room, &file(dir, &name, &data))
        .await
        .unwrap();
    for device in to.iter_mut() {
        let (path, got_name) = receive_file(device, &sent.message.id).await;
        assert_eq!(got_name, name);
        assert!(
            std::fs::read(&path).unwrap() == data,
            "{} got other bytes",
            device.user()
        );
    }
    sent
}

/// The asset id at the end of an asset URL: its file name in `DATA/assets/`.
fn asset_id(sent: &SentFile) -> String {
    sent.url.rsplit('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_cross_providers_through_the_rooms_hub() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::three(dir.path()).await;
    let (mut alice, mut bob, mut carol) = alice_bob_carol(&net).await;
    // Hubbed at chirp.test; wave.test and ping.test follow it.
    let room = alice
        .create_room(Some("media"), &[bob.user().clone(), carol.user().clone()])
        .await
        .unwrap();
    join(&mut bob, &room).await;
    join(&mut carol, &room).await;

    // Hosted at ping.test: the hub fetches it from there for alice, and for bob through
    // MIMI proxyDownload (wave.test → chirp.test → ping.test).
    let from_carol = file_reaches_everyone(
        dir.path(),
        &room,
        &mut carol,
        &mut [&mut alice, &mut bob],
        1,
    )
    .await;
    // Hosted at wave.test: carol's provider goes through the hub too.
    let from_bob = file_reaches_everyone(
        dir.path(),
        &room,
        &mut bob,
        &mut [&mut carol, &mut alice],
        2,
    )
    .await;
    // Hosted at the hub: followers fetch it from there.
    file_reaches_everyone(
        dir.path(),
        &room,
        &mut alice,
        &mut [&mut bob, &mut carol],
        3,
    )
    .await;

    // Its author deleting the message deletes the upload too: gone from wave.test's store,
    // no longer downloadable; carol's upload is untouched.
    assert!(assets_in(&net.data_of("wave.test")).contains(&asset_id(&from_bob)));
    bob.delete(&room, &from_bob.message.id).await.unwrap();
    assert!(!assets_in(&net.data_of("wave.test")).contains(&asset_id(&from_bob)));
    assert!(assets_in(&net.data_of("ping.test")).contains(&asset_id(&from_carol)));
    for device in [&mut alice, &mut carol] {
        sync_until(
            device,
            |e| matches!(e, Event::Delete { target, .. } if *target == from_bob.message.id),
        )
        .await;
    }
    let gone = carol.api().download(&from_bob.url, &room, u64::MAX).await;
    assert!(
        matches!(&gone, Err(e) if e.to_string().contains("unknown_asset")),
        "{gone:?}"
    );
    net.shutdown().await;
}

// --- files as other clients may send them ----------------------------------------------------

fn now_secs() -> u32 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u32::try_from(now.as_secs()).unwrap()
}

/// An external part for `sealed`, stored at `url`, named `name`, without a deadline.
fn file_part(url: &str, sealed: &Sealed, name: &str) -> ExternalPart {
    ExternalPart {
        content_type: "application/octet-stream".into(),
        url: url.into(),
        expires: 0,
        size: sealed.ciphertext.len() as u64,
        enc_alg: ENC_ALG_AES_128_GCM,
        key: sealed.key.to_vec(),
        nonce: sealed.nonce.to_vec(),
        aad: Vec::new(),
        hash_alg: HASH_ALG_SHA256,
        content_hash: sealed.hash.to_vec(),
        description: String::new(),
        filename: name.into(),
    }
}

/// Sends `part` from `device` (whose profile is in `profile`) as a file message, expiring at
/// `expires` if given: encrypted through a second connection to its profile, as a client other
/// than Parley's may build it (a URL anywhere, its own deadlines).
async fn send_part(
    profile: &Path,
    device: &Device,
    room: &RoomId,
    part: ExternalPart,
    expires: Option<Expiration>,
) {
    let mut content =
        MimiContent::attachment(rand_salt(), &device.user().to_uri(), room.as_str(), part);
    if let Some(expires) = expires {
        content = content.expiring(expires);
    }
    send_raw(profile, device, room, &content.encode()).await;
}

fn rand_salt() -> [u8; 16] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    nanos.to_le_bytes()
}

/// How many files `device`'s profile still has to download.
fn pending_downloads(profile: &Path) -> i64 {
    let conn = rusqlite::Connection::open(profile.join(parley_client::profile::DB_FILE)).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row("SELECT count(*) FROM parley_downloads", [], |r| r.get(0))
        .unwrap()
}

/// The failed attempts of each pending download.
fn download_attempts(profile: &Path) -> Vec<u32> {
    let conn = rusqlite::Connection::open(profile.join(parley_client::profile::DB_FILE)).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut st = conn
        .prepare("SELECT attempts FROM parley_downloads ORDER BY rowid")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// As if the waits before retrying failed downloads had passed.
fn retry_downloads_now(profile: &Path) {
    let conn = rusqlite::Connection::open(profile.join(parley_client::profile::DB_FILE)).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute("UPDATE parley_downloads SET retry_at = 0", [])
        .unwrap();
}

/// The error events among `events`.
fn errors(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Error { detail, .. } => Some(detail.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_deleted_before_it_was_fetched_is_a_delete_and_a_vanished_one_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::one_server(dir.path(), |_| {}).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    let room = alice.direct_room(bob.user()).await.unwrap();
    join(&mut bob, &room).await;

    // Sent to the wrong room and deleted at once, before bob synced: bob sees a delete, not
    // an error, and the message stands deleted in his history as if he had fetched it first.
    let oops = alice
        .send_file(&room, &file(dir.path(), "oops.txt", b"wrong room"))
        .await
        .unwrap();
    alice.delete(&room, &oops.message.id).await.unwrap();
    let events = bob.sync(None).await.unwrap();
    assert!(errors(&events).is_empty(), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Delete { target, .. } if *target == oops.message.id)),
        "{events:?}"
    );
    let history = bob.history(&room, 10).unwrap();
    assert_eq!(history.len(), 1);
    assert!(history[0].deleted && history[0].text.is_empty());
    assert!(downloads(&bob).is_empty());
    assert_eq!(pending_downloads(&net.dir.join("profile-bob@wave.test")), 0);

    // Its upload gone while the message stands (deleted at the provider, or expired there):
    // discarded, with an error that says so.
    let gone = alice
        .send_file(&room, &file(dir.path(), "gone.txt", b"not for long"))
        .await
        .unwrap();
    alice.api().delete_asset(&gone.url).await.unwrap();
    let events = bob.sync(None).await.unwrap();
    let errs = errors(&events);
    assert_eq!(errs.len(), 1, "{events:?}");
    assert!(
        errs[0].contains("gone.txt") && errs[0].contains("no longer available"),
        "{}",
        errs[0]
    );
    assert!(downloads(&bob).is_empty());
    assert!(bob.sync(None).await.unwrap().is_empty(), "reported once");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_cannot_be_fetched_hold_up_no_other_and_are_given_up_on() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::federated(dir.path(), &["chirp.test"], |_| {}).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut mallory = net.register("mallory@chirp.test").await;
    let room = mallory
        .create_room(Some("r"), &[alice.user().clone()])
        .await
        .unwrap();
    join(&mut alice, &room).await;
    let mallory_profile = net.dir.join("profile-mallory@chirp.test");
    let alice_profile = net.dir.join("profile-alice@chirp.test");

    // Any member can send a file at a provider that does not exist: every download of it is
    // `503 peer_unreachable`, "retryable".
    let sealed = media::seal(b"bait".to_vec()).unwrap();
    let nowhere = "https://nowhere.test/v1/assets/00112233445566778899aabbccddeeff";
    send_part(
        &mallory_profile,
        &mallory,
        &room,
        file_part(nowhere, &sealed, "bait.bin"),
        None,
    )
    .await;
    // The same, but its provider's deadline has passed: given up on at the first failure.
    let mut stale = file_part(nowhere, &sealed, "stale.bin");
    stale.expires = now_secs() - 1;
    send_part(&mallory_profile, &mallory, &room, stale, None).await;
    // The same in a message that expires soon: dropped, quietly, with its message.
    let brief = file_part(nowhere, &sealed, "brief.bin");
    send_part(
        &mallory_profile,
        &mallory,
        &room,
        brief,
        Some(Expiration::at(now_secs() + 2)),
    )
    .await;
    // A genuine file afterwards arrives all the same, at the first sync.
    let real = mallory
        .send_file(&room, &file(dir.path(), "real.txt", b"the real thing"))
        .await
        .unwrap();
    let events = alice.sync(None).await.unwrap();
    assert!(
        events.iter().any(|e| matches!(e,
            Event::Message { id, file: Some(_), .. } if *id == real.message.id)),
        "the genuine file was held up: {events:?}"
    );
    let errs = errors(&events);
    assert_eq!(errs.len(), 1, "{events:?}");
    assert!(
        errs[0].contains("stale.bin") && errs[0].contains("expired at its provider"),
        "{}",
        errs[0]
    );
    assert_eq!(pending_downloads(&alice_profile), 2, "bait and brief wait");

    // A failed file waits (5 s at first) before it is tried again: syncing at once does not
    // count as an attempt.
    alice.sync(None).await.unwrap();
    assert_eq!(download_attempts(&alice_profile), vec![1, 1], "bait, brief");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The bait is given up on after a bounded number of attempts (the waits between them
    // skipped here), with the reason.
    let mut attempts = 1;
    let detail = loop {
        retry_downloads_now(&alice_profile);
        let events = alice.sync(None).await.unwrap();
        attempts += 1;
        if let [detail] = errors(&events)[..] {
            break detail.to_owned();
        }
        assert!(events.is_empty(), "{events:?}");
        assert!(attempts < 20, "never given up on");
    };
    assert!(
        detail.contains("bait.bin") && detail.contains(&format!("after {attempts} attempts")),
        "{detail}"
    );
    assert_eq!(pending_downloads(&alice_profile), 0);
    assert_eq!(downloads(&alice), vec!["real.txt"]);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_files_go_with_their_expired_or_deleted_message() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::one_server(dir.path(), |_| {}).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    let room = alice.direct_room(bob.user()).await.unwrap();
    join(&mut bob, &room).await;

    // A self-destructing photo: saved while its message lives, deleted from disk with it.
    let sealed = media::seal(b"self-destructing photo".to_vec()).unwrap();
    let uploaded = alice
        .api()
        .upload_asset(sealed.ciphertext.clone())
        .await
        .unwrap();
    send_part(
        &net.dir.join("profile-alice@chirp.test"),
        &alice,
        &room,
        file_part(&uploaded.url, &sealed, "photo.jpg"),
        Some(Expiration::at(now_secs() + 2)),
    )
    .await;
    let photo = sync_until(&mut bob, |e| matches!(e, Event::Message { .. })).await;
    let Some(Event::Message {
        file: Some(photo), ..
    }) = photo.last()
    else {
        panic!("no file: {photo:?}")
    };
    let photo = PathBuf::from(photo);
    assert!(photo.is_file());
    // A file of bob's own in the folder, and one received that does not expire.
    std::fs::write(bob.downloads_dir().join("mine.txt"), b"bob's").unwrap();
    let kept = alice
        .send_file(&room, &file(dir.path(), "kept.txt", b"stays"))
        .await
        .unwrap();
    receive_file(&mut bob, &kept.message.id).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sync(&mut bob).await;
    assert!(bob.history(&room, 10).unwrap().len() == 1, "expired");
    assert!(!photo.exists(), "the expired file is still on disk");
    assert_eq!(downloads(&bob), vec!["kept.txt", "mine.txt"]);

    // Its author retracting a file deletes the receiver's copy too.
    alice.delete(&room, &kept.message.id).await.unwrap();
    sync_until(
        &mut bob,
        |e| matches!(e, Event::Delete { target, .. } if *target == kept.message.id),
    )
    .await;
    assert_eq!(downloads(&bob), vec!["mine.txt"]);
    net.shutdown().await;
}
