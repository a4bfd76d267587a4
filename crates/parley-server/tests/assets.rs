//! Attachments at the provider: streamed uploads with the domain's size limit (refused before the
//! upload completes), streamed downloads, deletion by the uploader only, and expiry.

use futures_util::StreamExt;
use parley_server::config::{DomainConfig, ServerConfig};
use parley_server::Server;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="; // 32 zero bytes, base64
const LIMIT: u64 = 8 * 1024 * 1024;

/// Each user's stored attachments, at most.
const QUOTA: u64 = 16 * 1024 * 1024;

async fn start(dir: &std::path::Path) -> Server {
    let mut chirp = DomainConfig::with_defaults("chirp.test");
    chirp.max_upload_bytes = LIMIT;
    chirp.max_stored_bytes_per_user = QUOTA;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.to_owned(),
        domains: vec![chirp],
        ..Default::default()
    };
    Server::start(config).await.unwrap()
}

async fn token(http: &reqwest::Client, base: &str, user: &str) -> String {
    let resp: Value = http
        .post(format!("{base}/v1/accounts"))
        .json(&json!({"user": user, "password": "password-123", "signature_key": KEY}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    resp["token"].as_str().unwrap().to_owned()
}

/// A deterministic pseudo-random body of `len` bytes, produced in chunks (never whole in memory).
fn chunks(len: usize) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    futures_util::stream::iter((0..len).step_by(64 * 1024).map(move |start| {
        let n = (len - start).min(64 * 1024);
        Ok((0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect())
    }))
}

async fn sha_of(len: usize) -> Vec<u8> {
    let mut h = Sha256::new();
    let mut s = Box::pin(chunks(len));
    while let Some(c) = s.next().await {
        h.update(c.unwrap());
    }
    h.finalize().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_stream_to_disk_within_the_limit_and_download_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let base = server.url();
    let http = reqwest::Client::new();
    let alice = token(&http, &base, "alice@chirp.test").await;
    let bob = token(&http, &base, "bob@chirp.test").await;

    // 5 MiB, streamed without a Content-Length.
    let len = 5 * 1024 * 1024 + 17;
    let resp = http
        .post(format!("{base}/v1/assets"))
        .bearer_auth(&alice)
        .body(reqwest::Body::wrap_stream(chunks(len)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let up: Value = resp.json().await.unwrap();
    assert_eq!(up["size"], len as u64);
    assert_eq!(up["sha256"], hex::encode(sha_of(len).await));
    let url = up["url"].as_str().unwrap().to_owned();
    let id = url.rsplit('/').next().unwrap().to_owned();
    assert!(url.starts_with("https://chirp.test/v1/assets/"));

    // Any local user in the room can fetch it (here: directly by id, and through /downloads).
    let mut got = Sha256::new();
    let resp = http
        .get(format!("{base}/v1/downloads"))
        .query(&[
            ("url", url.as_str()),
            ("room", "00000000000000000000000000000000"),
        ])
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.content_length(), Some(len as u64));
    let mut stream = resp.bytes_stream();
    while let Some(c) = stream.next().await {
        got.update(c.unwrap());
    }
    assert_eq!(got.finalize().to_vec(), sha_of(len).await);

    // Over the limit: refused at once by Content-Length, and mid-stream without it.
    let declared = http
        .post(format!("{base}/v1/assets"))
        .bearer_auth(&alice)
        .header("content-length", (LIMIT + 1).to_string())
        .body(vec![0u8; 10])
        .send()
        .await;
    if let Ok(resp) = declared {
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    let resp = http
        .post(format!("{base}/v1/assets"))
        .bearer_auth(&alice)
        .body(reqwest::Body::wrap_stream(chunks(LIMIT as usize + 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "asset_too_large");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("assets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(leftovers, vec![id.clone()], "refused uploads leave nothing");

    // Unauthenticated: 401. Only the uploader deletes; then it is gone.
    let anon = http
        .get(format!("{base}/v1/assets/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    let not_yours = http
        .delete(format!("{base}/v1/assets/{id}"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(not_yours.status(), StatusCode::NOT_FOUND);
    let deleted = http
        .delete(format!("{base}/v1/assets/{id}"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let gone = http
        .get(format!("{base}/v1/assets/{id}"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        std::fs::read_dir(dir.path().join("assets"))
            .unwrap()
            .count(),
        0
    );

    // Bad ids and URLs are 400s, not lookups.
    for path in ["/v1/assets/..%2Fparley.db", "/v1/assets/xyz"] {
        let resp = http
            .get(format!("{base}{path}"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
    }
    server.shutdown().await;
}

/// Uploads `len` streamed bytes (no Content-Length); the status and the JSON answer.
async fn upload(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    len: usize,
) -> (StatusCode, Value) {
    let resp = http
        .post(format!("{base}/v1/assets"))
        .bearer_auth(token)
        .body(reqwest::Body::wrap_stream(chunks(len)))
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_has_a_storage_quota() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let base = server.url();
    let http = reqwest::Client::new();
    let alice = token(&http, &base, "alice@chirp.test").await;
    let bob = token(&http, &base, "bob@chirp.test").await;
    let mib = 1024 * 1024;

    // 7 + 7 MiB fit in alice's 16 MiB; a further 3 MiB does not, streamed or declared.
    let (status, first) = upload(&http, &base, &alice, 7 * mib).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        upload(&http, &base, &alice, 7 * mib).await.0,
        StatusCode::CREATED
    );
    let (status, refused) = upload(&http, &base, &alice, 3 * mib).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(refused["error"], "quota_exceeded");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains(&QUOTA.to_string()),
        "{refused}"
    );
    let declared = http
        .post(format!("{base}/v1/assets"))
        .bearer_auth(&alice)
        .header("content-length", (3 * mib).to_string())
        .body(vec![0u8; 3 * mib])
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Still under the quota: 1 MiB fits. Nothing of the refused uploads is left on disk.
    assert_eq!(
        upload(&http, &base, &alice, mib).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("assets"))
            .unwrap()
            .count(),
        3
    );

    // The quota is per user: bob has all of his.
    assert_eq!(
        upload(&http, &base, &bob, 7 * mib).await.0,
        StatusCode::CREATED
    );
    // A file over the per-file limit is still asset_too_large, quota or not.
    let (status, big) = upload(&http, &base, &bob, LIMIT as usize + 1).await;
    assert_eq!(
        (status, big["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("asset_too_large"))
    );

    // Declared over the per-file limit: asset_too_large even when the quota is tighter too.
    let (status, body) = {
        let resp = http
            .post(format!("{base}/v1/assets"))
            .bearer_auth(&alice)
            .header("content-length", (LIMIT + 1).to_string())
            .body(vec![0u8; LIMIT as usize + 1])
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json::<Value>().await.unwrap())
    };
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("asset_too_large"))
    );

    // Deleting gives the space back.
    let id = first["url"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let deleted = http
        .delete(format!("{base}/v1/assets/{id}"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        upload(&http, &base, &alice, 3 * mib).await.0,
        StatusCode::CREATED
    );
    server.shutdown().await;
}
