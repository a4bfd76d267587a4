//! Encrypted media end to end: a file is encrypted with a fresh key, uploaded to the sender's
//! provider, announced as a MIMI external part, and fetched by every receiver through its own
//! provider (locally, from the hosting provider, or via the hub's `proxyDownload`), checked
//! against its hash, decrypted and saved. Tampered files are discarded; oversized ones refused.

mod providers;

use parley_client::{ClientError, Device, Event, SentFile};
use parley_proto::RoomId;
use providers::*;
use std::path::{Path, PathBuf};

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
