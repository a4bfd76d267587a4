//! The client API against a real server on an ephemeral loopback port, with real storage:
//! registration rules, authentication, and bad input answered with 4xx + JSON errors.

use parley_server::config::{DomainConfig, Registration, ServerConfig};
use parley_server::Server;
use reqwest::StatusCode;
use serde_json::{json, Value};

const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="; // 32 zero bytes, base64

async fn start(dir: &std::path::Path) -> Server {
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.to_owned(),
        ..Default::default()
    };
    config.add_domain("chirp.test");
    let mut wave = DomainConfig::with_defaults("wave.test");
    wave.registration = Registration::InviteOnly;
    wave.invites = vec!["let-me-in".into()];
    config.domains.push(wave);
    Server::start(config).await.unwrap()
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(server: &Server) -> Self {
        Self {
            base: server.url(),
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: Value, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn register(&self, user: &str, password: &str) -> (StatusCode, Value) {
        self.post(
            "/v1/accounts",
            json!({"user": user, "password": password, "signature_key": KEY}),
            None,
        )
        .await
    }
}

/// A 4xx answer with the documented JSON error body.
fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "body: {}", got.1);
    assert_eq!(got.1["error"], code, "body: {}", got.1);
    assert!(got.1["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn registration_and_login_rules() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);

    let (status, body) = api.register("alice@chirp.test", "correct horse").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["user"], "alice@chirp.test");
    let token = body["token"].as_str().unwrap().to_owned();

    assert_error(
        &api.register("alice@chirp.test", "another pw").await,
        StatusCode::CONFLICT,
        "user_exists",
    );
    assert_error(
        &api.register("Alice!@chirp.test", "password1").await,
        StatusCode::BAD_REQUEST,
        "invalid_user",
    );
    assert_error(
        &api.register("bob@nowhere.test", "password1").await,
        StatusCode::NOT_FOUND,
        "unknown_domain",
    );
    assert_error(
        &api.register("bob@chirp.test", "short").await,
        StatusCode::BAD_REQUEST,
        "weak_password",
    );
    let bad_key = api
        .post(
            "/v1/accounts",
            json!({"user": "bob@chirp.test", "password": "password1", "signature_key": "AAEC"}),
            None,
        )
        .await;
    assert_error(&bad_key, StatusCode::BAD_REQUEST, "invalid_signature_key");

    // Invite-only domain.
    assert_error(
        &api.register("carol@wave.test", "password1").await,
        StatusCode::FORBIDDEN,
        "invite_required",
    );
    let with = |code: &str| json!({"user": "carol@wave.test", "invite": code, "password": "password1", "signature_key": KEY});
    assert_error(
        &api.post("/v1/accounts", with("nope"), None).await,
        StatusCode::FORBIDDEN,
        "invalid_invite",
    );
    assert_eq!(
        api.post("/v1/accounts", with("let-me-in"), None).await.0,
        StatusCode::CREATED
    );
    let reuse = json!({"user": "dave@wave.test", "invite": "let-me-in", "password": "password1", "signature_key": KEY});
    assert_error(
        &api.post("/v1/accounts", reuse, None).await,
        StatusCode::FORBIDDEN,
        "invalid_invite",
    );

    // A further device.
    let login = |pw: &str| json!({"user": "alice@chirp.test", "password": pw, "signature_key": KEY, "device_name": "laptop"});
    assert_error(
        &api.post("/v1/sessions", login("wrong password"), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (status, second) = api.post("/v1/sessions", login("correct horse"), None).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(second["device_id"], body["device_id"]);

    let (status, devices) = api.get("/v1/devices", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(devices.as_array().unwrap().len(), 2);
    assert_eq!(devices[1]["name"], "laptop");

    // Removing the second device revokes its token.
    let second_token = second["token"].as_str().unwrap();
    let del = api
        .http
        .delete(format!(
            "{}/v1/devices/{}",
            api.base,
            second["device_id"].as_str().unwrap()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    assert_error(
        &api.get("/v1/devices", Some(second_token)).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );

    // Each change of alice's devices queued a `devices` signal (no room) for her first device.
    let (status, queue) = api.get("/v1/queue", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    let signals: Vec<(&str, &str)> = queue["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["room_id"].as_str().unwrap()))
        .collect();
    assert_eq!(signals, [("devices", ""), ("devices", "")]);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_4xx_json_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let token = api.register("alice@chirp.test", "password1").await.1["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = Some(token.as_str());

    // Authentication.
    assert_error(
        &api.get("/v1/rooms", None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &api.get("/v1/rooms", Some("forged")).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    // Routing.
    assert_error(
        &api.get("/v1/nothing", t).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.get("/v1/accounts", None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    // Malformed JSON, wrong types, bad base64.
    let raw = api
        .http
        .post(format!("{}/v1/accounts", api.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    assert_eq!(raw.json::<Value>().await.unwrap()["error"], "invalid_json");
    assert_error(
        &api.post("/v1/accounts", json!({"user": 5}), None).await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_error(
        &api.post("/v1/key-packages", json!({"key_packages": ["%%%"]}), t)
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    // Oversized body.
    let huge = "A".repeat(2 << 20);
    assert_error(
        &api.post("/v1/key-packages", json!({"key_packages": [huge]}), t)
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    );
    // MLS garbage everywhere it is accepted.
    let garbage = "AAECAwQFBgcICQ==";
    assert_error(
        &api.post("/v1/key-packages", json!({"key_packages": [garbage]}), t)
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_key_package",
    );
    // A room is a MIMI room URI; in a path, one percent-encoded segment.
    let room_uri = "mimi://chirp.test/r/00112233445566778899aabbccddeeff";
    let room = "mimi%3A%2F%2Fchirp.test%2Fr%2F00112233445566778899aabbccddeeff";
    assert_error(
        &api.post(
            "/v1/rooms",
            json!({"room_id": room_uri, "group_info": garbage, "ratchet_tree": garbage}),
            t,
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_group_info",
    );
    assert_error(
        &api.post("/v1/rooms", json!({"room_id": "00112233445566778899aabbccddeeff", "group_info": garbage, "ratchet_tree": garbage}), t)
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_room",
    );
    assert_error(
        &api.post(
            &format!("/v1/rooms/{room}/messages"),
            json!({"message": garbage}),
            t,
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_message",
    );
    assert_error(
        &api.post(
            &format!("/v1/rooms/{room}/commits"),
            json!({"commit": garbage, "group_info": garbage, "ratchet_tree": garbage}),
            t,
        )
        .await,
        StatusCode::NOT_FOUND,
        "unknown_room",
    );
    assert_error(
        &api.get(&format!("/v1/rooms/{room}"), t).await,
        StatusCode::NOT_FOUND,
        "unknown_room",
    );
    assert_error(
        &api.get("/v1/queue?limit=abc", t).await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
    assert_error(
        &api.post(
            "/v1/users/nobody@chirp.test/key-packages/claim",
            json!({"room": room_uri, "key_material_request": garbage}),
            t,
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_key_material_request",
    );
    assert_error(
        &api.post(
            "/v1/users/nobody@chirp.test/key-packages/claim",
            json!({}),
            t,
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_error(
        &api.post(&format!("/v1/rooms/{room}/left"), json!({}), t)
            .await,
        StatusCode::NOT_FOUND,
        "unknown_room",
    );
    assert_error(
        &api.get("/v1/ws", t).await,
        StatusCode::BAD_REQUEST,
        "websocket_required",
    );

    // Random bytes as every binary field: always a 4xx, never a 5xx or a dropped connection.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..200 {
        let len = (i * 7) % 300;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        for (path, body) in [
            (
                "/v1/key-packages".to_string(),
                json!({"key_packages": [b64]}),
            ),
            (
                "/v1/rooms".to_string(),
                json!({"room_id": room_uri, "group_info": b64, "ratchet_tree": b64}),
            ),
            (
                format!("/v1/rooms/{room}/messages"),
                json!({"message": b64}),
            ),
        ] {
            let (status, body) = api.post(&path, body, t).await;
            assert!(status.is_client_error(), "{path}: {status} {body}");
        }
    }
    let (status, health) = api.get("/health", None).await;
    assert_eq!((status, health), (StatusCode::OK, json!({"status": "ok"})));
    let (status, queue) = api.get("/v1/queue", t).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(queue["entries"], json!([]));
    server.shutdown().await;
}

#[tokio::test]
async fn client_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().join("data"),
        tls_cert: Some(cert_path),
        tls_key: Some(key_path),
        ..Default::default()
    };
    let server = Server::start(config).await.unwrap();
    assert!(server.url().starts_with("https://"));
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/health", server.local_addr().port());
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Plain HTTP to the TLS port gets nothing useful.
    let plain = reqwest::get(format!(
        "http://127.0.0.1:{}/health",
        server.local_addr().port()
    ))
    .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    server.shutdown().await;
}

#[tokio::test]
async fn per_device_request_rate_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().to_owned(),
        ..Default::default()
    };
    config.add_domain("chirp.test");
    config.limits.requests_per_second = 0.01;
    config.limits.request_burst = 5.0;
    let server = Server::start(config).await.unwrap();
    let api = Api::new(&server);
    let token = api.register("alice@chirp.test", "password1").await.1["token"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..5 {
        assert_eq!(api.get("/v1/devices", Some(&token)).await.0, StatusCode::OK);
    }
    let limited = api.get("/v1/devices", Some(&token)).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(limited.1["retryable"], true);
    // Another device is not affected.
    let other = api.register("bob@chirp.test", "password1").await.1["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(api.get("/v1/devices", Some(&other)).await.0, StatusCode::OK);
    server.shutdown().await;
}
