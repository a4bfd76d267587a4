//! Microbenchmarks of the per-message work in `parley-proto` (`cargo bench -p parley-proto`):
//! MIMI content encode/decode (every message a client sends or shows) and push frames (every
//! entry a server pushes) as JSON and as CBOR.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use parley_proto::api::{EntryKind, QueueEntry, WsFrame};
use parley_proto::content::MimiContent;
use std::hint::black_box;

fn content(c: &mut Criterion) {
    let text = "x".repeat(200);
    let content = MimiContent::markdown(
        [7; 16],
        "mimi://chirp.test/u/alice",
        "mimi://chirp.test/r/bench",
        &text,
    );
    let bytes = content.encode();
    c.bench_function("content/encode 200 B markdown", |b| {
        b.iter(|| black_box(&content).encode())
    });
    c.bench_function("content/decode 200 B markdown", |b| {
        b.iter(|| MimiContent::decode(black_box(&bytes)).unwrap())
    });
}

/// A push frame of `n` entries of 400-byte ciphertexts, like the ones a busy device gets.
fn entries(n: usize) -> WsFrame {
    let entry = |seq| QueueEntry {
        seq,
        room_id: "mimi://chirp.test/r/bench".into(),
        kind: EntryKind::Message,
        event: seq,
        ts: 1_764_000_000_000,
        data: vec![0x5a; 400],
        ratchet_tree: None,
    };
    WsFrame::Entries {
        entries: (1..=n as u64).map(entry).collect(),
    }
}

fn push_frames(c: &mut Criterion) {
    for n in [1, 32] {
        let frame = entries(n);
        let json = serde_json::to_string(&frame).unwrap();
        let cbor = frame.to_cbor();
        c.bench_function(&format!("push frame/json encode {n} entries"), |b| {
            b.iter(|| serde_json::to_string(black_box(&frame)).unwrap())
        });
        c.bench_function(&format!("push frame/cbor encode {n} entries"), |b| {
            b.iter(|| black_box(&frame).to_cbor())
        });
        c.bench_function(&format!("push frame/json decode {n} entries"), |b| {
            b.iter(|| serde_json::from_str::<WsFrame>(black_box(&json)).unwrap())
        });
        c.bench_function(&format!("push frame/cbor decode {n} entries"), |b| {
            b.iter(|| WsFrame::from_cbor(black_box(&cbor)).unwrap())
        });
    }
    let send = WsFrame::Send {
        id: 1,
        room: "mimi://chirp.test/r/bench".into(),
        message: vec![0x5a; 400],
    };
    c.bench_function("send frame/cbor encode+decode", |b| {
        b.iter_batched(
            || send.clone(),
            |f| WsFrame::from_cbor(&f.to_cbor()).unwrap(),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, content, push_frames);
criterion_main!(benches);
