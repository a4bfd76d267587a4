//! Microbenchmarks of the server's per-message work (`cargo bench -p parley-server`): the hub's
//! check of an application message (size, cleartext MLS header, expiry hint) on a real MLS
//! PrivateMessage, and a group-commit batch of queue rows in the real store (SQLite WAL,
//! `synchronous=FULL`, on the machine's disk).

use criterion::{criterion_group, criterion_main, Criterion};
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use parley_proto::api::EntryKind;
use parley_proto::UserId;
use parley_server::config::ServerConfig;
use parley_server::delivery::{enqueue, Outgoing};
use parley_server::hub::check_application_message;
use parley_server::store::Store;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A real PrivateMessage of `len` bytes of plaintext from a one-member group.
fn private_message(len: usize) -> Vec<u8> {
    let suite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
    let provider = OpenMlsRustCrypto::default();
    let signer = SignatureKeyPair::new(suite.signature_algorithm()).unwrap();
    signer.store(provider.storage()).unwrap();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(b"mimi://chirp.test/d/alice/1".to_vec()).into(),
        signature_key: signer.public().into(),
    };
    let mut group = MlsGroup::builder()
        .ciphersuite(suite)
        .build(&provider, &signer, credential)
        .unwrap();
    let message = group
        .create_message(&provider, &signer, &vec![0x5a; len])
        .unwrap();
    message.tls_serialize_detached().unwrap()
}

fn header_check(c: &mut Criterion) {
    let mut config = ServerConfig::default();
    config.add_domain("chirp.test");
    let sender = UserId::parse("alice@chirp.test").unwrap();
    let message = private_message(300);
    c.bench_function("hub/check_application_message 300 B", |b| {
        b.iter(|| check_application_message(&config, &sender, black_box(&message)).unwrap())
    });
}

fn store_batch(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        store
            .write(|c| {
                c.execute("INSERT INTO users VALUES ('chirp.test', 'bob', 'h', 0)", [])?;
                for d in 0..1000 {
                    c.execute(
                        "INSERT INTO devices (device_id, domain, handle, name, signature_key, token_hash, created_at)
                         VALUES (?1, 'chirp.test', 'bob', 'n', x'00', ?2, 0)",
                        rusqlite::params![format!("d{d}"), (d as u32).to_be_bytes().to_vec()],
                    )?;
                }
                Ok(())
            })
            .await
            .unwrap();
    });
    let retention = 30 * 24 * 3600 * 1000;
    // 400 B: a 1:1 message. 100 KB to 1,000 devices: a commit to a big room (its UpdatePath holds
    // a ciphertext per member while the tree's parent nodes are blank), stored once and referenced.
    for (rows, size) in [(1usize, 400usize), (64, 400), (1000, 100_000)] {
        let data = Arc::new(vec![0x5a; size]);
        let items = move |data: &Arc<Vec<u8>>, now: u64| -> Vec<Outgoing> {
            (0..rows)
                .map(|d| Outgoing {
                    device: format!("d{d}"),
                    room_id: "mimi://chirp.test/r/bench".into(),
                    kind: EntryKind::Message,
                    event: 1,
                    ts: now,
                    data: data.clone(),
                    ratchet_tree: None,
                    expires_at: now + retention,
                })
                .collect()
        };
        // One durable transaction (fsync) holding `rows` queue rows, as one group commit. Each
        // batch is acked (deleted) afterwards, untimed, so queues stay as short as a live
        // server's and every row has its own expiry, as a live server's do.
        c.bench_function(
            &format!("store/commit {rows} queue rows of {size} B"),
            |b| {
                b.iter_custom(|iterations| {
                    let mut spent = Duration::ZERO;
                    for i in 0..iterations {
                        let batch = items(&data, 1_764_000_000_000 + i);
                        let started = Instant::now();
                        runtime
                            .block_on(store.write(move |c| enqueue(c, &batch)))
                            .unwrap();
                        spent += started.elapsed();
                        runtime
                            .block_on(store.write(|c| {
                                Ok(c.execute_batch("DELETE FROM queue; DELETE FROM payloads;")?)
                            }))
                            .unwrap();
                    }
                    spent
                })
            },
        );
    }
}

criterion_group!(benches, header_check, store_batch);
criterion_main!(benches);
