//! Checks without the peer's cooperation: the directory, and each endpoint's encoding and
//! answers for users and rooms the peer does not have (docs/mimi-profile.md §2, §5).

use super::{path_form, refused, refused_or, Kit};
use crate::report::{Outcome, Report};
use crate::transport::ENDPOINTS;
use parley_proto::mimi::Directory;
use parley_proto::mimi::{
    Body, ConsentOperation, GroupInfoResponse, GroupInfoResult, IdentifierRequest,
    IdentifierResponse, KeyMaterialResponse, NotifyRequest, QueryCode, QueryElement,
    SubmitMessageResponse, SubmitStatus, UpdateRoomResponse, UserCode,
};
use std::io::Write;

pub async fn run<W: Write>(kit: &mut Kit, report: &mut Report<'_, W>) -> std::io::Result<()> {
    report.record("directory", directory(kit).await)?;
    report.record(
        "keyMaterial.unknown-user",
        key_material_unknown_user(kit).await,
    )?;
    report.record(
        "identifierQuery.unknown-handle",
        identifier_unknown_handle(kit).await,
    )?;
    report.record(
        "identifierQuery.unsupported-type",
        identifier_unsupported_type(kit).await,
    )?;
    report.record(
        "requestConsent.unknown-user",
        request_consent_unknown_user(kit).await,
    )?;
    report.record("submitMessage.unknown-room", submit_unknown_room(kit).await)?;
    report.record("update.unknown-room", update_unknown_room(kit).await)?;
    report.record("groupInfo.unknown-room", group_info_unknown_room(kit).await)?;
    report.record(
        "reportAbuse.unknown-room",
        report_abuse_unknown_room(kit).await,
    )?;
    report.record("notify.room-hubbed-by-peer", notify_not_hub(kit).await)?;
    report.record(
        "notify.unknown-room-message",
        notify_unknown_room_message(kit).await,
    )?;
    report.record(
        "notify.unknown-room-welcome",
        notify_unknown_room_welcome(kit).await,
    )?;
    Ok(())
}

/// One directory template: `https://`, one `{param}`.
fn template_problem(name: &str, value: &serde_json::Value) -> Option<String> {
    let Some(s) = value.as_str() else {
        return Some(format!("{name} is not a string"));
    };
    if !s.starts_with("https://") {
        return Some(format!("{name} is not an https URL: {s}"));
    }
    let opens = s.matches('{').count();
    let closes = s.matches('}').count();
    if opens != 1 || closes != 1 || s.find('{') > s.find('}') {
        return Some(format!("{name} has no single {{parameter}}: {s}"));
    }
    None
}

/// `GET /.well-known/mimi-protocol-directory`: JSON with the draft's ten keys, each an https
/// template. Kept for the later calls.
async fn directory(kit: &mut Kit) -> Outcome {
    let answer = match kit.peer.fetch_directory().await {
        Ok(a) => a,
        Err(e) => return Outcome::fail(format!("no answer: {e}")),
    };
    if answer.status != 200 {
        return Outcome::fail(format!("expected 200, got {}", answer.describe()));
    }
    let json: serde_json::Value = match serde_json::from_slice(&answer.body) {
        Ok(v) => v,
        Err(e) => return Outcome::fail(format!("not JSON: {e}")),
    };
    let Some(map) = json.as_object() else {
        return Outcome::fail("not a JSON object");
    };
    let mut problems: Vec<String> = ENDPOINTS
        .iter()
        .filter(|k| !map.contains_key(**k))
        .map(|k| format!("missing {k}"))
        .collect();
    let mut directory = Directory::default();
    for name in ENDPOINTS {
        if let Some(value) = map.get(name) {
            match template_problem(name, value) {
                Some(p) => problems.push(p),
                None => {
                    if let Some(s) = value.as_str() {
                        directory.endpoints.insert(name.to_owned(), s.to_owned());
                    }
                }
            }
        }
    }
    kit.peer.set_directory(directory);
    let extra = map.len().saturating_sub(ENDPOINTS.len());
    if problems.is_empty() {
        Outcome::pass(format!(
            "ten endpoints, https templates ({extra} extension keys)"
        ))
    } else {
        Outcome::fail(problems.join("; "))
    }
}

fn user_code(v: u8) -> String {
    UserCode::from_u8(v).map_or_else(|| format!("code {v}"), |c| format!("{c:?}"))
}

/// A KeyMaterialResponse that refuses: any code but success/partialSuccess, and no clients.
pub fn key_material_refusal(body: &[u8]) -> Result<String, String> {
    let r = KeyMaterialResponse::decode(body)
        .map_err(|e| format!("the body is no KeyMaterialResponse: {e}"))?;
    let code = r.code();
    if matches!(code, Some(UserCode::Success | UserCode::PartialSuccess)) {
        return Err(format!(
            "{} with {} clients",
            user_code(r.user_status),
            r.clients.len()
        ));
    }
    if code.is_none() {
        return Err(format!("undefined {}", user_code(r.user_status)));
    }
    if !r.clients.is_empty() {
        return Err(format!(
            "{} but {} clients",
            user_code(r.user_status),
            r.clients.len()
        ));
    }
    Ok(format!(
        "KeyMaterialResponse {}, no clients",
        user_code(r.user_status)
    ))
}

/// keyMaterial for a user the peer does not have: a KeyMaterialResponse refusing, no clients.
async fn key_material_unknown_user(kit: &Kit) -> Outcome {
    let target = kit.nobody("km");
    let request = match kit.alice.key_material_request(&target, &kit.material.room) {
        Ok(r) => r,
        Err(e) => return Outcome::fail(format!("kit error: {e}")),
    };
    let answer = kit
        .peer
        .post("keyMaterial", path_form(&target), request.encode())
        .await;
    match answer {
        Ok(a) if a.status == 200 => match key_material_refusal(&a.body) {
            Ok(seen) => Outcome::pass(seen),
            Err(seen) => Outcome::fail(seen),
        },
        Ok(a) => Outcome::fail(format!(
            "expected 200 with a KeyMaterialResponse, got {}",
            a.describe()
        )),
        Err(e) => Outcome::fail(format!("no answer: {e}")),
    }
}

fn query_code(v: u8) -> &'static str {
    match v {
        0 => "success",
        1 => "notFound",
        2 => "ambiguous",
        3 => "forbidden",
        4 => "unsupportedField",
        _ => "an undefined code",
    }
}

async fn identifier_query(
    kit: &Kit,
    request: IdentifierRequest,
) -> Result<IdentifierResponse, String> {
    let answer = kit
        .peer
        .post(
            "identifierQuery",
            kit.config.peer.as_str(),
            request.encode(),
        )
        .await?;
    if answer.status != 200 {
        return Err(format!("expected 200, got {}", answer.describe()));
    }
    IdentifierResponse::decode(&answer.body)
        .map_err(|e| format!("the body is no IdentifierResponse: {e}"))
}

/// identifierQuery for a handle nobody has: `notFound`, no URIs.
async fn identifier_unknown_handle(kit: &Kit) -> Outcome {
    let handle = format!("im:kit-nobody-q-{}@{}", kit.run_id, kit.config.peer);
    match identifier_query(kit, IdentifierRequest::handle(&handle)).await {
        Ok(r) => Outcome::check(
            r.response_code == QueryCode::NotFound as u8 && r.uri.is_empty(),
            format!("{} with {} URIs", query_code(r.response_code), r.uri.len()),
        ),
        Err(e) => Outcome::fail(e),
    }
}

/// identifierQuery on a vCard property no provider searches: `unsupportedField` (or
/// `forbidden`, which the draft also allows for fields a provider does not allow).
async fn identifier_unsupported_type(kit: &Kit) -> Outcome {
    let request = IdentifierRequest {
        query_elements: vec![QueryElement {
            search_type: 8,
            field_name: parley_proto::mimi::opaque("X-MIMI-CONFORMANCE-UNSUPPORTED"),
            search_value: parley_proto::mimi::opaque("x"),
        }],
        id_request_extensions: Default::default(),
    };
    match identifier_query(kit, request).await {
        Ok(r) => Outcome::check(
            r.response_code == QueryCode::UnsupportedField as u8
                || r.response_code == QueryCode::Forbidden as u8,
            format!(
                "vcardField X-MIMI-CONFORMANCE-UNSUPPORTED: {}",
                query_code(r.response_code)
            ),
        ),
        Err(e) => Outcome::fail(e),
    }
}

/// requestConsent for a user the peer does not have: `201` (kept pending, revealing nothing)
/// or `404`.
async fn request_consent_unknown_user(kit: &Kit) -> Outcome {
    let entry = kit.consent(
        ConsentOperation::Request,
        &kit.alice.user().to_uri(),
        &kit.nobody("consent"),
    );
    match kit
        .peer
        .post("requestConsent", kit.config.peer.as_str(), entry.encode())
        .await
    {
        Ok(a) => Outcome::check(
            a.status == 201 || a.status == 404,
            format!("{} (201 or 404 expected)", a.describe()),
        ),
        Err(e) => Outcome::fail(format!("no answer: {e}")),
    }
}

fn submit_refusal(body: &[u8]) -> Result<String, String> {
    match SubmitMessageResponse::decode(body).map(|r| r.status) {
        Ok(SubmitStatus::NotAllowed) => Ok("SubmitMessageResponse notAllowed".into()),
        Ok(other) => Err(format!("SubmitMessageResponse {other:?}")),
        Err(e) => Err(format!("the body is no SubmitMessageResponse: {e}")),
    }
}

fn update_refusal(body: &[u8]) -> Result<String, String> {
    match UpdateRoomResponse::decode(body) {
        Ok(r @ UpdateRoomResponse::NotAllowed { .. }) => Ok(format!(
            "UpdateRoomResponse notAllowed ({})",
            r.description()
        )),
        Ok(other) => Err(format!("UpdateRoomResponse {other:?}")),
        Err(e) => Err(format!("the body is no UpdateRoomResponse: {e}")),
    }
}

pub fn group_info_refusal(body: &[u8]) -> Result<String, String> {
    match GroupInfoResponse::decode(body).map(|r| r.result) {
        Ok(GroupInfoResult::NoSuchRoom) => Ok("GroupInfoResponse noSuchRoom".into()),
        Ok(GroupInfoResult::NotAuthorized) => Ok("GroupInfoResponse notAuthorized".into()),
        Ok(GroupInfoResult::Success { .. }) => Err("GroupInfoResponse success".into()),
        Err(e) => Err(format!("the body is no GroupInfoResponse: {e}")),
    }
}

/// submitMessage for a room the peer does not hub: refused (404, or notAllowed).
async fn submit_unknown_room(kit: &Kit) -> Outcome {
    let room = kit.peer_room("unknown");
    let body = kit.submit_body(&kit.alice.user().to_uri());
    let answer = kit.peer.post("submitMessage", path_form(&room), body).await;
    refused_or(&answer, submit_refusal)
}

/// update (a real commit with Welcome, GroupInfo and tree) for a room the peer does not hub.
async fn update_unknown_room(kit: &Kit) -> Outcome {
    let room = kit.peer_room("unknown");
    let body = kit.material.commit.encode();
    let answer = kit.peer.post("update", path_form(&room), body).await;
    refused_or(&answer, update_refusal)
}

/// groupInfo (signed request) for a room the peer does not hub: noSuchRoom (or 404).
async fn group_info_unknown_room(kit: &Kit) -> Outcome {
    let room = kit.peer_room("unknown");
    let hpke = match crate::mls::HpkeKey::new() {
        Ok(k) => k,
        Err(e) => return Outcome::fail(format!("kit error: {e}")),
    };
    let request = match kit.alice.group_info_request(&hpke.public) {
        Ok(r) => r,
        Err(e) => return Outcome::fail(format!("kit error: {e}")),
    };
    let answer = kit
        .peer
        .post("groupInfo", path_form(&room), request.encode())
        .await;
    refused_or(&answer, group_info_refusal)
}

/// reportAbuse for a room the peer does not hub: 4xx.
async fn report_abuse_unknown_room(kit: &Kit) -> Outcome {
    let room = kit.peer_room("unknown");
    let body = kit.abuse_report(&kit.nobody("abuser")).encode();
    let answer = kit.peer.post("reportAbuse", path_form(&room), body).await;
    refused(&answer)
}

/// notify for a room whose URI names the peer itself as hub: only the hub notifies, so 403.
async fn notify_not_hub(kit: &Kit) -> Outcome {
    let room = kit.peer_room("nothub");
    let body = NotifyRequest {
        messages: vec![kit.material.application_fanout()],
    }
    .encode();
    match kit.peer.post("notify", path_form(&room), body).await {
        Ok(a) => Outcome::check(a.status == 403, format!("{} (403 expected)", a.describe())),
        Err(e) => Outcome::fail(format!("no answer: {e}")),
    }
}

/// notify of a message in a room the kit "hubs" but never sent the peer a Welcome for.
async fn notify_unknown_room_message(kit: &Kit) -> Outcome {
    let room = kit.kit_room("unwelcomed");
    let body = NotifyRequest {
        messages: vec![kit.material.application_fanout()],
    }
    .encode();
    refused(&kit.peer.post("notify", path_form(&room), body).await)
}

/// notify of a Welcome naming no KeyPackage the peer handed out for that room.
async fn notify_unknown_room_welcome(kit: &Kit) -> Outcome {
    let room = kit.kit_room("unclaimed");
    let body = NotifyRequest {
        messages: vec![kit.material.welcome.clone()],
    }
    .encode();
    refused(&kit.peer.post("notify", path_form(&room), body).await)
}
