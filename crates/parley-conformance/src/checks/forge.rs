//! Requests a correct provider must refuse, each its own check: headers that lie about who is
//! calling or whom, bodies speaking for another provider's users, URL and body disagreeing, bad
//! signatures, and broken bodies (truncated, oversized, random), which must get a 4xx and never
//! a 5xx.

use super::basic::key_material_refusal;
use super::{path_form, refused, refused_or, user_uri, Kit};
use crate::mls::{random, KitClient};
use crate::report::{Outcome, Report};
use crate::transport::{Answer, Forge};
use parley_proto::mimi::{
    Body, ConsentOperation, IdentifierRequest, KeyMaterialRequest, NotifyRequest,
    SubmitMessageResponse, SubmitStatus,
};
use parley_proto::RoomId;
use std::io::Write;

/// The provider no one in a run is: forged identities claim to be of it.
pub const OTHER_DOMAIN: &str = "other.test";

pub async fn run<W: Write>(kit: &mut Kit, report: &mut Report<'_, W>) -> std::io::Result<()> {
    report.record(
        "forge.from-not-certificate",
        from_not_certificate(kit).await,
    )?;
    report.record("forge.wrong-host", wrong_host(kit).await)?;
    report.record(
        "forge.requestConsent-requester-domain",
        consent_requester_domain(kit).await,
    )?;
    report.record(
        "forge.updateConsent-target-domain",
        consent_target_domain(kit).await,
    )?;
    report.record(
        "forge.keyMaterial-requester-domain",
        key_material_requester_domain(kit).await,
    )?;
    report.record(
        "forge.submitMessage-sender-domain",
        submit_sender_domain(kit, &kit.peer_room("unknown")).await,
    )?;
    report.record(
        "forge.keyMaterial-path-vs-body",
        key_material_path_vs_body(kit).await,
    )?;
    report.record(
        "forge.keyMaterial-bad-signature",
        key_material_bad_signature(kit).await,
    )?;
    let bodies = valid_bodies(kit);
    for (endpoint, param, body) in &bodies {
        let cut = body[..body.len() / 2].to_vec();
        let answer = kit.peer.post(endpoint, param, cut).await;
        report.record(&format!("forge.truncated.{endpoint}"), refused(&answer))?;
    }
    for endpoint in ["notify", "submitMessage"] {
        let (_, param, _) = bodies
            .iter()
            .find(|(e, _, _)| *e == endpoint)
            .cloned()
            .unwrap_or_default();
        let big = vec![0u8; parley_proto::mimi::MAX_BODY + 1];
        let answer = kit.peer.post(endpoint, &param, big).await;
        report.record(&format!("forge.oversized.{endpoint}"), oversized(&answer))?;
    }
    for (endpoint, param, _) in &bodies {
        let answer = kit.peer.post(endpoint, param, junk()).await;
        report.record(&format!("forge.random-bytes.{endpoint}"), refused(&answer))?;
    }
    let answer = kit.peer.get("proxyDownload", &hex(&random::<16>())).await;
    report.record("forge.random-bytes.proxyDownload", refused(&answer))?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 256 bytes no MIMI body starts with (`0xff`: no protocol, operation or MLS version is 255),
/// then random ones.
fn junk() -> Vec<u8> {
    let mut bytes = vec![0xff];
    bytes.extend_from_slice(&random::<255>());
    bytes
}

/// A body over the 4 MiB limit: a 4xx (413), or the connection closed after the refusal was
/// sent; never a 5xx or a success.
fn oversized(result: &Result<Answer, String>) -> Outcome {
    match result {
        Ok(a) if a.is_client_error() => Outcome::pass(format!("refused: {}", a.describe())),
        Ok(a) => Outcome::fail(format!(
            "a body over 4 MiB got {} (4xx expected)",
            a.describe()
        )),
        Err(e) => Outcome::fail(format!("no answer to a body over 4 MiB: {e}")),
    }
}

/// A valid body (for rooms and users the peer does not have) for every POST endpoint, with
/// the URL parameter it goes to.
fn valid_bodies(kit: &Kit) -> Vec<(&'static str, String, Vec<u8>)> {
    let peer = kit.config.peer.as_str().to_owned();
    let unknown_room = path_form(&kit.peer_room("unknown")).to_owned();
    let target = kit.nobody("trunc");
    let mut out = Vec::new();
    if let Ok(r) = kit.alice.key_material_request(&target, &kit.material.room) {
        out.push(("keyMaterial", path_form(&target).to_owned(), r.encode()));
    }
    out.push(("update", unknown_room.clone(), kit.material.commit.encode()));
    out.push((
        "notify",
        path_form(&kit.kit_room("trunc")).to_owned(),
        NotifyRequest {
            messages: vec![kit.material.welcome.clone()],
        }
        .encode(),
    ));
    out.push((
        "submitMessage",
        unknown_room.clone(),
        kit.submit_body(&kit.alice.user().to_uri()),
    ));
    if let Ok(hpke) = crate::mls::HpkeKey::new() {
        if let Ok(r) = kit.alice.group_info_request(&hpke.public) {
            out.push(("groupInfo", unknown_room.clone(), r.encode()));
        }
    }
    let alice = kit.alice.user().to_uri();
    out.push((
        "requestConsent",
        peer.clone(),
        kit.consent(ConsentOperation::Request, &alice, &target)
            .encode(),
    ));
    out.push((
        "updateConsent",
        peer.clone(),
        kit.consent(ConsentOperation::Grant, &target, &alice)
            .encode(),
    ));
    out.push((
        "identifierQuery",
        peer,
        IdentifierRequest::handle(&format!("im:{}", target.replace("mimi://", ""))).encode(),
    ));
    out.push((
        "reportAbuse",
        unknown_room,
        kit.abuse_report(&target).encode(),
    ));
    out
}

/// An honest identifierQuery, for the header forgeries.
fn query_body(kit: &Kit) -> Vec<u8> {
    IdentifierRequest::handle(&format!("im:kit-nobody-{}@{}", kit.run_id, kit.config.peer)).encode()
}

/// `From: mimi@other.test` on the kit's own certificate.
async fn from_not_certificate(kit: &Kit) -> Outcome {
    forged_query(
        kit,
        Forge {
            from: Some(format!("mimi@{OTHER_DOMAIN}")),
            host: None,
        },
    )
    .await
}

/// `Host: not-the-peer.test`: the request is not for this provider (421 is the HTTP answer).
async fn wrong_host(kit: &Kit) -> Outcome {
    forged_query(
        kit,
        Forge {
            from: None,
            host: Some("not-the-peer.test".into()),
        },
    )
    .await
}

/// An honest identifierQuery sent with forged headers: a correct provider refuses it.
async fn forged_query(kit: &Kit, forge: Forge) -> Outcome {
    let answer = kit
        .peer
        .post_forged(
            "identifierQuery",
            kit.config.peer.as_str(),
            query_body(kit),
            &forge,
        )
        .await;
    refused(&answer)
}

/// requestConsent whose requester is another provider's user.
async fn consent_requester_domain(kit: &Kit) -> Outcome {
    let target = target_or_nobody(kit, "forge");
    let entry = kit.consent(
        ConsentOperation::Request,
        &user_uri(&kit.other, "mallory"),
        &target,
    );
    let answer = kit
        .peer
        .post("requestConsent", kit.config.peer.as_str(), entry.encode())
        .await;
    refused(&answer)
}

/// updateConsent granting in the name of another provider's user.
async fn consent_target_domain(kit: &Kit) -> Outcome {
    let requester = target_or_nobody(kit, "forge");
    let entry = kit.consent(
        ConsentOperation::Grant,
        &requester,
        &user_uri(&kit.other, "mallory"),
    );
    let answer = kit
        .peer
        .post("updateConsent", kit.config.peer.as_str(), entry.encode())
        .await;
    refused(&answer)
}

/// A signed keyMaterial request from a client of another provider, for a room of that
/// provider (so the kit is neither the requester's provider nor the room's hub).
async fn key_material_requester_domain(kit: &Kit) -> Outcome {
    let other = kit.other.clone();
    let mallory = match super::device(&other, "mallory", "m1").and_then(|d| Ok(KitClient::new(d)?))
    {
        Ok(c) => c,
        Err(e) => return Outcome::fail(format!("kit error: {e}")),
    };
    let target = target_or_nobody(kit, "forge");
    let room = match RoomId::new(&other, "kit-forge") {
        Ok(r) => r,
        Err(e) => return Outcome::fail(format!("kit error: {e}")),
    };
    let request = match mallory.key_material_request(&target, &room) {
        Ok(r) => r,
        Err(e) => return Outcome::fail(format!("kit error: {e}")),
    };
    key_material_refused(kit, &target, request).await
}

/// keyMaterial answers that refuse: a 4xx, or a refusal code without clients.
async fn key_material_refused(
    kit: &Kit,
    path_target: &str,
    request: KeyMaterialRequest,
) -> Outcome {
    let answer = kit
        .peer
        .post("keyMaterial", path_form(path_target), request.encode())
        .await;
    refused_or(&answer, key_material_refusal)
}

/// submitMessage to `room` in the name of one of the peer's own users.
pub async fn submit_sender_domain(kit: &Kit, room: &str) -> Outcome {
    let victim = target_or_nobody(kit, "victim");
    let answer = kit
        .peer
        .post("submitMessage", path_form(room), kit.submit_body(&victim))
        .await;
    refused_or(&answer, |body| {
        match SubmitMessageResponse::decode(body).map(|r| r.status) {
            Ok(SubmitStatus::NotAllowed) => Ok("SubmitMessageResponse notAllowed".into()),
            Ok(other) => Err(format!("SubmitMessageResponse {other:?}")),
            Err(e) => Err(format!("the body is no SubmitMessageResponse: {e}")),
        }
    })
}

/// The peer user when one is given, else a user the peer does not have.
fn target_or_nobody(kit: &Kit, tag: &str) -> String {
    kit.config
        .peer_user
        .as_ref()
        .map_or_else(|| kit.nobody(tag), |u| u.to_uri())
}

/// keyMaterial whose URL names one user and whose (signed) body another.
async fn key_material_path_vs_body(kit: &Kit) -> Outcome {
    let body_target = target_or_nobody(kit, "body");
    path_vs_body_claim(kit, &kit.nobody("path"), &body_target, &kit.material.room).await
}

/// A claim signed for `body_target` sent to the URL of `path_target`.
pub async fn path_vs_body_claim(
    kit: &Kit,
    path_target: &str,
    body_target: &str,
    room: &RoomId,
) -> Outcome {
    match kit.alice.key_material_request(body_target, room) {
        Ok(request) => key_material_refused(kit, path_target, request).await,
        Err(e) => Outcome::fail(format!("kit error: {e}")),
    }
}

/// keyMaterial whose signature has one bit flipped.
async fn key_material_bad_signature(kit: &Kit) -> Outcome {
    let target = target_or_nobody(kit, "sig");
    bad_signature_claim(kit, &target, &kit.material.room).await
}

/// A claim for `target` in `room` signed by kit-alice, one bit of the signature flipped.
pub async fn bad_signature_claim(kit: &Kit, target: &str, room: &RoomId) -> Outcome {
    let mut request = match kit.alice.key_material_request(target, room) {
        Ok(r) => r,
        Err(e) => return Outcome::fail(format!("kit error: {e}")),
    };
    let mut sig = request.signature.as_slice().to_vec();
    if let Some(b) = sig.first_mut() {
        *b ^= 0x01;
    }
    request.signature = sig.into();
    key_material_refused(kit, target, request).await
}
