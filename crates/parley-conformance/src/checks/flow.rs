//! The cooperative full flow, with a test user `USER` at the peer whose operator follows the
//! `WAIT` lines. Two parts, each stopping (the rest `SKIP`) at the first step it cannot get past:
//!
//! **A, a room the kit hubs:** requestConsent from kit-alice to USER; the peer's updateConsent
//! grant at the kit's listener; now that USER consents, a keyMaterial with a flipped signature
//! bit and one whose URL names another user must still be refused; keyMaterial for USER
//! (signed by kit-alice's client); kit-alice creates the room (GroupContext per
//! docs/mimi-profile.md §4) and commits Add + GCE; the Welcome (with the full tree) by notify;
//! a message by notify; USER's reply through submitMessage at the kit, decrypted and its MIMI
//! content's senderUri checked; the hub's echo of the reply by notify; the first notify
//! replayed byte for byte (`201`; that nothing is processed twice the caller checks at USER's
//! clients); a commit adding kit-bob; a commit removing USER's clients (Remove + GCE).
//!
//! **B, a room the peer hubs:** USER asks kit-bob for consent (the kit grants) and creates a
//! room adding kit-bob: the peer's keyMaterial call, then its Welcome by notify, which kit-bob
//! joins; kit-bob's message by submitMessage; forgeries on that real room (a message and a
//! commit of another group, messages in the name of the peer's user and of a non-participant,
//! an abuse report by another provider's user, groupInfo for a non-participant, an external
//! commit by a non-participant); kit-bob's reportAbuse; groupInfo for a second client of
//! kit-bob (decrypted, the hub signature verified with the ExternalSender in the answer, which
//! must be the group's); that client's external commit through update; kit-bob's clients
//! leave by self-Remove proposals through update (the second proposed again at the hub's epoch
//! should USER's client commit the first one before it arrives).
//!
//! `tests/cooperative.rs` drives all of it against parley-server, USER played by Parley's own
//! client (`parley_client::Device`).

use super::basic::group_info_refusal;
use super::{now_ms, path_form, refused, refused_or, Kit};
use crate::listener::{Inbound, Listener};
use crate::mls::{random, random_hex, KitClient, Processed};
use crate::report::{Outcome, Report};
use crate::transport::PeerClient;
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::room_state::{RoomState, ROLE_MEMBER};
use parley_proto::mimi::{
    signing, Body, ClientKeyMaterial, ConsentOperation, FanoutExtra, FanoutMessage,
    GroupInfoOption, GroupInfoRatchetTreeTbe, GroupInfoResponse, GroupInfoResult, HandshakeBundle,
    IdentifierUri, KeyMaterialResponse, MlsMessage, NotifyRequest, RatchetTreeOption,
    SubmitMessageRequest, SubmitMessageResponse, SubmitStatus, UpdateRoomResponse, UserCode,
};
use parley_proto::{MimiContent, RoomId, UserId};
use std::io::Write;
use std::time::Instant;

/// Part A's checks, in order.
pub const HUB_STEPS: [&str; 12] = [
    "flow.consent-request",
    "flow.consent-grant",
    "forge.consented.keyMaterial-bad-signature",
    "forge.consented.keyMaterial-path-vs-body",
    "flow.keyMaterial",
    "flow.notify-welcome",
    "flow.notify-message",
    "flow.reply",
    "flow.notify-echo",
    "flow.notify-replay",
    "flow.commit-add",
    "flow.commit-remove",
];

/// Part B's checks, in order.
pub const FOLLOWER_STEPS: [&str; 15] = [
    "flow.reverse-consent",
    "flow.reverse-keyMaterial",
    "flow.reverse-welcome",
    "flow.reverse-submit",
    "forge.room-mismatch.submitMessage",
    "forge.room-mismatch.update",
    "forge.shared-room.sender-domain",
    "forge.shared-room.non-member-sender",
    "forge.shared-room.reportAbuse-reporter",
    "forge.shared-room.groupInfo-non-participant",
    "flow.reverse-reportAbuse",
    "flow.reverse-groupInfo",
    "forge.shared-room.external-commit-non-participant",
    "flow.reverse-external-commit",
    "flow.reverse-leave",
];

/// Every check of the flow (all `SKIP` without a peer user).
pub fn steps() -> impl Iterator<Item = &'static str> {
    HUB_STEPS.into_iter().chain(FOLLOWER_STEPS)
}

/// What a step found: its value and detail, or why it failed.
type Step<T> = Result<(T, String), String>;

/// Records a step; `Some(value)` when it passed.
fn record<T, W: Write>(
    report: &mut Report<'_, W>,
    name: &str,
    step: Step<T>,
) -> std::io::Result<Option<T>> {
    match step {
        Ok((value, detail)) => {
            report.record(name, Outcome::pass(detail))?;
            Ok(Some(value))
        }
        Err(detail) => {
            report.record(name, Outcome::fail(detail))?;
            Ok(None)
        }
    }
}

/// Records `SKIP` for the steps of `names` not recorded yet.
fn skip_rest<W: Write>(
    report: &mut Report<'_, W>,
    names: &[&str],
    why: &str,
) -> std::io::Result<()> {
    for name in names {
        if !report.has(name) {
            report.record(name, Outcome::skip(why))?;
        }
    }
    Ok(())
}

pub async fn run<W: Write>(
    kit: &mut Kit,
    user: &UserId,
    report: &mut Report<'_, W>,
) -> std::io::Result<()> {
    if user.domain() != &kit.config.peer {
        let why = format!("--peer-user {user} is not a user of {}", kit.config.peer);
        skip_rest(report, &HUB_STEPS, &why)?;
        return skip_rest(report, &FOLLOWER_STEPS, &why);
    }
    hub_part(kit, user, report).await?;
    skip_rest(report, &HUB_STEPS, "an earlier step of the flow failed")?;
    follower_part(kit, user, report).await?;
    skip_rest(
        report,
        &FOLLOWER_STEPS,
        "an earlier step of the flow failed",
    )
}

fn kit_error(e: impl std::fmt::Display) -> String {
    format!("kit error: {e}")
}

/// A POST expected to answer `201`.
async fn post_created(kit: &Kit, endpoint: &str, param: &str, body: Vec<u8>) -> Step<()> {
    match kit.peer.post(endpoint, param, body).await {
        Ok(a) if a.status == 201 => Ok(((), "201".into())),
        Ok(a) => Err(format!("expected 201, got {}", a.describe())),
        Err(e) => Err(format!("no answer: {e}")),
    }
}

async fn notify(kit: &Kit, room: &RoomId, messages: Vec<FanoutMessage>) -> Step<Vec<u8>> {
    let body = NotifyRequest { messages }.encode();
    post_created(kit, "notify", room.path_form(), body.clone())
        .await
        .map(|((), d)| (body, d))
}

fn text_content(sender: &UserId, room: &RoomId, text: &str) -> Vec<u8> {
    MimiContent::text(random::<16>(), &sender.to_uri(), room.as_str(), text).encode()
}

// --- part A: the kit hubs ----------------------------------------------------------------------

async fn hub_part<W: Write>(
    kit: &mut Kit,
    user: &UserId,
    report: &mut Report<'_, W>,
) -> std::io::Result<()> {
    let alice = kit.alice.user().clone();
    let step = consent_request(kit, &alice, user).await;
    if record(report, HUB_STEPS[0], step)?.is_none() {
        return Ok(());
    }
    report.say(
        "WAIT",
        &format!("as {user}, accept the contact request from {alice}"),
    )?;
    let step = consent_grant(kit, &alice, user).await;
    if record(report, HUB_STEPS[1], step)?.is_none() {
        return Ok(());
    }
    let room = match RoomId::new(&kit.config.as_domain, &format!("kit-flow-{}", kit.run_id)) {
        Ok(r) => r,
        Err(e) => return report.record(HUB_STEPS[4], Outcome::fail(kit_error(e))),
    };
    // Now that USER consents to kit-alice, a provider that ignored signatures or read the
    // target from the body would hand out USER's KeyPackages.
    let target = user.to_uri();
    let outcome = super::forge::bad_signature_claim(kit, &target, &room).await;
    report.record(HUB_STEPS[2], outcome)?;
    let outcome = super::forge::path_vs_body_claim(kit, &kit.nobody("path"), &target, &room).await;
    report.record(HUB_STEPS[3], outcome)?;
    let step = claim(kit, user, &room).await;
    let Some(packages) = record(report, HUB_STEPS[4], step)? else {
        return Ok(());
    };
    let step = welcome(kit, user, &room, packages).await;
    if record(report, HUB_STEPS[5], step)?.is_none() {
        return Ok(());
    }
    let step = first_message(kit, &room).await;
    let Some(notified) = record(report, HUB_STEPS[6], step)? else {
        return Ok(());
    };
    report.say(
        "WAIT",
        &format!(
            "as {user}, open the room {room} that {alice} invited you to, and reply to its message"
        ),
    )?;
    let step = reply(kit, user, &room).await;
    let Some(reply_message) = record(report, HUB_STEPS[7], step)? else {
        return Ok(());
    };
    let echo = FanoutMessage {
        timestamp: now_ms(),
        message: reply_message,
        extra: FanoutExtra::Application { frank: None },
    };
    let step = notify(kit, &room, vec![echo])
        .await
        .map(|(_, d)| ((), format!("{d}: the hub's echo of {user}'s own message")));
    record(report, HUB_STEPS[8], step)?;
    let step = post_created(kit, "notify", room.path_form(), notified)
        .await
        .map(|((), d)| ((), format!("{d} for a byte-identical retry")));
    if record(report, HUB_STEPS[9], step)?.is_some() {
        report.say(
            "NOTE",
            &format!(
                "check at {user}'s clients that {alice}'s message and {user}'s own reply each show exactly once (notified twice / echoed); the kit can only see 201"
            ),
        )?;
    }
    let step = add_bob(kit, &room).await;
    if record(report, HUB_STEPS[10], step)?.is_none() {
        return Ok(());
    }
    let step = remove_user(kit, user, &room).await;
    if record(report, HUB_STEPS[11], step)?.is_some() {
        report.say(
            "NOTE",
            &format!("check that {user}'s clients show they were removed from {room}"),
        )?;
    }
    Ok(())
}

async fn consent_request(kit: &Kit, alice: &UserId, user: &UserId) -> Step<()> {
    let entry = kit.consent(ConsentOperation::Request, &alice.to_uri(), &user.to_uri());
    post_created(
        kit,
        "requestConsent",
        kit.config.peer.as_str(),
        entry.encode(),
    )
    .await
}

/// Waits for the peer's updateConsent for (requester, target).
async fn consent_grant(kit: &mut Kit, requester: &UserId, target: &UserId) -> Step<()> {
    let (r, t) = (requester.to_uri(), target.to_uri());
    let op = kit
        .listener
        .wait_for(kit.config.timeout, |e| match e {
            Inbound::UpdateConsent(c)
                if c.requester_uri.as_str().ok() == Some(r.as_str())
                    && c.target_uri.as_str().ok() == Some(t.as_str()) =>
            {
                Some(c.operation)
            }
            _ => None,
        })
        .await;
    match op {
        Some(ConsentOperation::Grant) => Ok(((), format!("updateConsent grant from {target}"))),
        Some(other) => Err(format!("updateConsent {other:?}, not grant")),
        None => Err(format!(
            "no updateConsent for {requester} from {target} within {:?}",
            kit.config.timeout
        )),
    }
}

/// keyMaterial for `user` in `room`: at least one valid KeyPackage of a client of `user`.
async fn claim(kit: &Kit, user: &UserId, room: &RoomId) -> Step<Vec<openmls::prelude::KeyPackage>> {
    let request = kit
        .alice
        .key_material_request(&user.to_uri(), room)
        .map_err(kit_error)?;
    let target = user.to_uri();
    let answer = kit
        .peer
        .post("keyMaterial", path_form(&target), request.encode())
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    if answer.status != 200 {
        return Err(format!("expected 200, got {}", answer.describe()));
    }
    let response = KeyMaterialResponse::decode(&answer.body)
        .map_err(|e| format!("the body is no KeyMaterialResponse: {e}"))?;
    if !matches!(
        response.code(),
        Some(UserCode::Success | UserCode::PartialSuccess)
    ) {
        return Err(format!("userStatus {:?}", response.code()));
    }
    let mut packages = Vec::new();
    let mut problems = Vec::new();
    for client in &response.clients {
        let ClientKeyMaterial::Success {
            client_uri,
            key_package,
        } = client
        else {
            continue;
        };
        match kit.alice.validate_key_package(key_package.bytes(), user) {
            Ok((device, kp)) if client_uri.as_str().ok() == Some(device.to_string().as_str()) => {
                packages.push(kp)
            }
            Ok((device, _)) => problems.push(format!(
                "{} carries a KeyPackage of {device}",
                client_uri.as_str().unwrap_or("?")
            )),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    if packages.is_empty() {
        return Err("no client KeyPackage in a successful answer".into());
    }
    let n = packages.len();
    Ok((
        packages,
        format!("{n} valid KeyPackages of {user}'s clients"),
    ))
}

/// kit-alice creates the room, adds `user`'s clients (Add + GCE) and notifies the Welcome.
async fn welcome(
    kit: &mut Kit,
    user: &UserId,
    room: &RoomId,
    packages: Vec<openmls::prelude::KeyPackage>,
) -> Step<()> {
    let mut state = RoomState::group(room.clone(), "MIMI conformance kit", kit.alice.user(), None);
    kit.alice
        .create_room(&state, kit.hub.external_sender())
        .map_err(kit_error)?;
    state.participants.insert(user.clone(), ROLE_MEMBER);
    let out = kit
        .alice
        .commit(room, packages, Vec::new(), Some(&state))
        .map_err(kit_error)?;
    kit.listener.hosted().rooms.insert(room.to_string());
    let welcome = out.welcome.ok_or("the add commit has no Welcome")?;
    let message = FanoutMessage {
        timestamp: now_ms(),
        message: MlsMessage::from_welcome(&welcome).map_err(kit_error)?,
        extra: FanoutExtra::Welcome {
            ratchet_tree: RatchetTreeOption::Full {
                ratchet_tree: out.ratchet_tree,
            },
        },
    };
    notify(kit, room, vec![message])
        .await
        .map(|(_, d)| ((), format!("{d} for the Welcome of {room}")))
}

/// kit-alice's first message, by notify; returns the body sent (for the replay).
async fn first_message(kit: &mut Kit, room: &RoomId) -> Step<Vec<u8>> {
    let text = format!("hello from the MIMI conformance kit (run {})", kit.run_id);
    let content = text_content(kit.alice.user(), room, &text);
    let message = kit.alice.message(room, &content).map_err(kit_error)?;
    let fanout = FanoutMessage::plain(now_ms(), message).ok_or("not an application message")?;
    notify(kit, room, vec![fanout]).await
}

/// Waits for `user`'s text reply through submitMessage, decrypting (in order) everything the
/// peer submits for `room` (receipts included); checks sendingUri and the content's senderUri.
async fn reply(kit: &mut Kit, user: &UserId, room: &RoomId) -> Step<MlsMessage> {
    let deadline = Instant::now() + kit.config.timeout;
    let key = room.to_string();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let request = kit
            .listener
            .wait_for(left, |e| match e {
                Inbound::SubmitMessage { room, request } if *room == key => Some(request.clone()),
                _ => None,
            })
            .await
            .ok_or_else(|| format!("no text reply from {user} within {:?}", kit.config.timeout))?;
        let sending = request.sending_uri.as_str().unwrap_or_default().to_owned();
        if !names_user(&sending, user) {
            return Err(format!(
                "sendingUri {sending} is not {user} or one of its clients"
            ));
        }
        let plaintext = match kit.alice.process(room, &request.app_message) {
            Ok(Processed::Application(bytes)) => bytes,
            Ok(other) => return Err(format!("submitMessage carried {other:?}")),
            Err(e) => return Err(format!("cannot decrypt the submitted message: {e}")),
        };
        let content = MimiContent::decode(&plaintext)
            .map_err(|e| format!("the message is no MIMI content: {e}"))?;
        let sender = content.sender_uri.clone().unwrap_or_default();
        if !names_user(&sender, user) {
            return Err(format!("the content's senderUri {sender:?} is not {user}"));
        }
        if let Some(uri) = &content.room_uri {
            if uri != room.as_str() {
                return Err(format!("the content's roomUri {uri} is not {room}"));
            }
        }
        if let Some(text) = content.text_body() {
            let text: String = text.chars().take(40).collect();
            return Ok((
                request.app_message,
                format!("decrypted {text:?} from {sender} (sendingUri {sending})"),
            ));
        }
    }
}

/// Whether `uri` is `user`'s URI or one of its client URIs.
fn names_user(uri: &str, user: &UserId) -> bool {
    UserId::parse(uri).is_ok_and(|u| u == *user)
        || DeviceUri::parse(uri).is_ok_and(|d| d.user == *user)
}

/// kit-alice adds kit-bob (a local client: its Welcome stays in the kit); the commit is
/// notified to the peer.
async fn add_bob(kit: &mut Kit, room: &RoomId) -> Step<()> {
    let (kp, _) = kit.bob.key_package().map_err(kit_error)?;
    let bob = kit.bob.user().clone();
    let (_, kp) = kit
        .alice
        .validate_key_package(kp.bytes(), &bob)
        .map_err(kit_error)?;
    let mut state = kit.alice.room_state(room).map_err(kit_error)?;
    state.participants.insert(bob.clone(), ROLE_MEMBER);
    let out = kit
        .alice
        .commit(room, vec![kp], Vec::new(), Some(&state))
        .map_err(kit_error)?;
    if let Some(w) = &out.welcome {
        kit.bob.join(w, &out.ratchet_tree).map_err(kit_error)?;
    }
    let fanout = FanoutMessage::plain(now_ms(), out.commit).ok_or("not a commit")?;
    notify(kit, room, vec![fanout])
        .await
        .map(|(_, d)| ((), format!("{d} for the commit adding {bob}")))
}

/// kit-alice removes every client of `user` (Remove + GCE dropping the user).
async fn remove_user(kit: &mut Kit, user: &UserId, room: &RoomId) -> Step<()> {
    let leaves: Vec<_> = kit
        .alice
        .members(room)
        .map_err(kit_error)?
        .into_iter()
        .filter(|(_, d)| d.user == *user)
        .map(|(i, _)| i)
        .collect();
    let mut state = kit.alice.room_state(room).map_err(kit_error)?;
    state.participants.remove(user);
    let n = leaves.len();
    let out = kit
        .alice
        .commit(room, Vec::new(), leaves, Some(&state))
        .map_err(kit_error)?;
    let fanout = FanoutMessage::plain(now_ms(), out.commit).ok_or("not a commit")?;
    notify(kit, room, vec![fanout]).await.map(|(_, d)| {
        (
            (),
            format!("{d} for the commit removing {n} clients of {user}"),
        )
    })
}

// --- part B: the peer hubs ---------------------------------------------------------------------

async fn follower_part<W: Write>(
    kit: &mut Kit,
    user: &UserId,
    report: &mut Report<'_, W>,
) -> std::io::Result<()> {
    let bob = kit.bob.user().clone();
    report.say(
        "WAIT",
        &format!(
            "as {user}, send a contact request to {bob}, then create a group room at {} and add {bob} to it",
            kit.config.peer
        ),
    )?;
    // The consent step fails softly: a peer may claim without asking first.
    let step = reverse_consent(kit, user).await;
    record(report, "flow.reverse-consent", step)?;
    let step = reverse_claim(kit, user).await;
    let Some(claimed_room) = record(report, "flow.reverse-keyMaterial", step)? else {
        return Ok(());
    };
    let step = reverse_welcome(kit, user, claimed_room).await;
    let Some(room) = record(report, "flow.reverse-welcome", step)? else {
        return Ok(());
    };
    let step = reverse_submit(kit, &room).await;
    record(report, "flow.reverse-submit", step)?;
    shared_room_forgeries(kit, user, &room, report).await?;
    let mut abuse = kit.abuse_report(&user.to_uri());
    abuse.reporting_user = IdentifierUri::new(&bob.to_uri());
    let step = post_created(kit, "reportAbuse", room.path_form(), abuse.encode())
        .await
        .map(|((), d)| ((), format!("{d} for {bob}'s report about {user}")));
    record(report, "flow.reverse-reportAbuse", step)?;
    let mut second = match super::device(&kit.config.as_domain, "kit-bob", &random_hex::<8>())
        .and_then(|d| Ok(KitClient::new(d)?))
    {
        Ok(c) => c,
        Err(e) => return report.record("flow.reverse-groupInfo", Outcome::fail(kit_error(e))),
    };
    let step = reverse_group_info(kit, &second, &room).await;
    let Some(tbe) = record(report, "flow.reverse-groupInfo", step)? else {
        return Ok(());
    };
    let outcome = outsider_external_commit(kit, &room, &tbe).await;
    report.record("forge.shared-room.external-commit-non-participant", outcome)?;
    let step = reverse_external_commit(kit, &mut second, &room, tbe).await;
    if record(report, "flow.reverse-external-commit", step)?.is_none() {
        return Ok(());
    }
    let step = reverse_leave(kit, &mut second, &room).await;
    if record(report, "flow.reverse-leave", step)?.is_some() {
        report.say(
            "NOTE",
            &format!("check that {user}'s client commits {bob}'s leaving and no longer lists {bob} in {room}"),
        )?;
    }
    Ok(())
}

/// What the peer's hub must refuse in a room where the kit has a member: a message or commit
/// of another group, messages in the name of the peer's own user or of a kit user who is no
/// participant, an abuse report by another provider's user, groupInfo for a non-participant.
async fn shared_room_forgeries<W: Write>(
    kit: &mut Kit,
    user: &UserId,
    room: &RoomId,
    report: &mut Report<'_, W>,
) -> std::io::Result<()> {
    let bob = kit.bob.user().to_uri();
    let body = SubmitMessageRequest::new(kit.material.application.clone(), &bob).encode();
    let answer = kit.peer.post("submitMessage", room.path_form(), body).await;
    report.record(
        "forge.room-mismatch.submitMessage",
        refused_or(&answer, submit_refusal),
    )?;
    let outcome = match mismatched_commit(kit, room) {
        Ok(bundle) => {
            let answer = kit
                .peer
                .post("update", room.path_form(), bundle.encode())
                .await;
            refused_or(&answer, update_refusal)
        }
        Err(e) => Outcome::fail(e),
    };
    report.record("forge.room-mismatch.update", outcome)?;
    let outcome = match submit_as(kit, &user.to_uri(), room).await {
        Ok(answer) => refused_or(&answer, submit_refusal),
        Err(e) => Outcome::fail(e),
    };
    report.record("forge.shared-room.sender-domain", outcome)?;
    let alice = kit.alice.user().to_uri();
    let outcome = match submit_as(kit, &alice, room).await {
        Ok(answer) => refused_or(&answer, submit_refusal),
        Err(e) => Outcome::fail(e),
    };
    report.record("forge.shared-room.non-member-sender", outcome)?;
    let mut forged = kit.abuse_report(&user.to_uri());
    forged.reporting_user = IdentifierUri::new(&super::user_uri(&kit.other, "mallory"));
    let answer = kit
        .peer
        .post("reportAbuse", room.path_form(), forged.encode())
        .await;
    report.record("forge.shared-room.reportAbuse-reporter", refused(&answer))?;
    let outcome =
        match crate::mls::HpkeKey::new().and_then(|k| kit.alice.group_info_request(&k.public)) {
            Ok(request) => {
                let answer = kit
                    .peer
                    .post("groupInfo", room.path_form(), request.encode())
                    .await;
                refused_or(&answer, group_info_refusal)
            }
            Err(e) => Outcome::fail(kit_error(e)),
        };
    report.record("forge.shared-room.groupInfo-non-participant", outcome)
}

/// A commit by a client of kit-bob in a group of its own, brought to the room's epoch, so only
/// the group (not the epoch or the signer's provider) tells it is not the room's.
fn mismatched_commit(kit: &mut Kit, room: &RoomId) -> Result<HandshakeBundle, String> {
    let epoch = kit.bob.epoch(room).map_err(kit_error)?;
    let device =
        super::device(&kit.config.as_domain, "kit-bob", &random_hex::<8>()).map_err(kit_error)?;
    let mut client = KitClient::new(device).map_err(kit_error)?;
    let other = RoomId::new(&kit.config.as_domain, &format!("kit-other-{}", kit.run_id))
        .map_err(kit_error)?;
    client.create_scratch(&other, &kit.hub).map_err(kit_error)?;
    for _ in 0..epoch.min(64) {
        client
            .commit(&other, Vec::new(), Vec::new(), None)
            .map_err(kit_error)?;
    }
    let out = client
        .commit(&other, Vec::new(), Vec::new(), None)
        .map_err(kit_error)?;
    Ok(HandshakeBundle::Commit {
        commit: out.commit,
        welcome: None,
        group_info: GroupInfoOption::Full {
            group_info: out.group_info,
        },
        ratchet_tree: RatchetTreeOption::Full {
            ratchet_tree: out.ratchet_tree,
        },
    })
}

/// kit-alice, no participant, joins by external commit with the GroupInfo kit-bob fetched.
async fn outsider_external_commit(
    kit: &mut Kit,
    room: &RoomId,
    tbe: &GroupInfoRatchetTreeTbe,
) -> Outcome {
    let RatchetTreeOption::Full { ratchet_tree } = &tbe.ratchet_tree else {
        return Outcome::skip("the groupInfo answer's tree is not full");
    };
    let out = match kit.alice.external_join(room, &tbe.group_info, ratchet_tree) {
        Ok(out) => out,
        Err(e) => return Outcome::fail(kit_error(e)),
    };
    let bundle = HandshakeBundle::Commit {
        commit: out.commit,
        welcome: None,
        group_info: GroupInfoOption::Full {
            group_info: out.group_info,
        },
        ratchet_tree: RatchetTreeOption::Full {
            ratchet_tree: out.ratchet_tree,
        },
    };
    let answer = kit
        .peer
        .post("update", room.path_form(), bundle.encode())
        .await;
    refused_or(&answer, update_refusal)
}

/// Waits for `user`'s contact request to kit-bob and grants it by updateConsent.
async fn reverse_consent(kit: &mut Kit, user: &UserId) -> Step<()> {
    let (r, t) = (user.to_uri(), kit.bob.user().to_uri());
    kit.listener
        .wait_for(kit.config.timeout, |e| match e {
            Inbound::RequestConsent(c)
                if c.operation == ConsentOperation::Request
                    && c.requester_uri.as_str().ok() == Some(r.as_str())
                    && c.target_uri.as_str().ok() == Some(t.as_str()) =>
            {
                Some(())
            }
            _ => None,
        })
        .await
        .ok_or_else(|| {
            format!(
                "no requestConsent from {user} for {t} within {:?}",
                kit.config.timeout
            )
        })?;
    let grant = kit.consent(ConsentOperation::Grant, &r, &t);
    post_created(
        kit,
        "updateConsent",
        kit.config.peer.as_str(),
        grant.encode(),
    )
    .await
    .map(|((), d)| {
        (
            (),
            format!("requestConsent received; our updateConsent grant: {d}"),
        )
    })
}

/// Waits for the peer's keyMaterial call for kit-bob (KeyPackages handed out); the room it
/// names must be hubbed by the peer.
async fn reverse_claim(kit: &mut Kit, user: &UserId) -> Step<RoomId> {
    let bob = kit.bob.user().to_uri();
    let (handed, requester, room) = kit
        .listener
        .wait_for(kit.config.timeout, |e| match e {
            Inbound::KeyMaterial {
                target,
                request,
                handed,
            } if *target == bob && *handed > 0 => Some((
                *handed,
                request
                    .requesting_user
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                request.room_id.as_str().unwrap_or_default().to_owned(),
            )),
            _ => None,
        })
        .await
        .ok_or_else(|| {
            format!(
                "no keyMaterial call for {bob} within {:?}",
                kit.config.timeout
            )
        })?;
    let room = RoomId::parse(&room).map_err(|e| format!("roomId {room:?}: {e}"))?;
    if room.hub() != &kit.config.peer {
        return Err(format!(
            "the claim's room {room} is not hubbed by {}",
            kit.config.peer
        ));
    }
    if !names_user(&requester, user) {
        return Err(format!(
            "the claim was requested by {requester}, not {user}"
        ));
    }
    Ok((
        room.clone(),
        format!("{handed} KeyPackage handed out for {room}, requested by {requester}"),
    ))
}

/// Waits for the Welcome of the claimed room by notify and joins it as kit-bob; the room's
/// state must list kit-bob and `user`, and its hub as external sender.
async fn reverse_welcome(kit: &mut Kit, user: &UserId, claimed: RoomId) -> Step<RoomId> {
    let key = claimed.to_string();
    let deadline = Instant::now() + kit.config.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let welcome = kit
            .listener
            .wait_for(left, |e| match e {
                Inbound::Notify { room, request } if *room == key => {
                    request.messages.iter().find_map(|m| match &m.extra {
                        FanoutExtra::Welcome { ratchet_tree } => {
                            Some((m.message.clone(), ratchet_tree.clone()))
                        }
                        _ => None,
                    })
                }
                _ => None,
            })
            .await
            .ok_or_else(|| format!("no Welcome for {claimed} within {:?}", kit.config.timeout))?;
        let (message, tree) = welcome;
        let RatchetTreeOption::Full { ratchet_tree } = tree else {
            return Err(
                "the Welcome's RatchetTreeOption is not full; the kit needs the tree".into(),
            );
        };
        let bare = message
            .to_welcome()
            .ok_or("a Welcome FanoutMessage without a Welcome")?;
        let Ok((room, state)) = kit.bob.join(&bare, &ratchet_tree) else {
            continue; // a Welcome for someone else
        };
        if room != claimed {
            return Err(format!(
                "the group's room state names {room}, not {claimed}"
            ));
        }
        if !state.is_participant(kit.bob.user()) || !state.is_participant(user) {
            return Err(format!(
                "the participant list lacks {} or {user}",
                kit.bob.user()
            ));
        }
        let hub_identity = format!("mimi://{}", kit.config.peer);
        let senders = kit.bob.external_senders(&room).map_err(kit_error)?;
        let hub_listed = senders.iter().any(|s| {
            s.credential
                .parse()
                .ok()
                .and_then(|c| crate::mls::credential_identity(&c))
                .as_deref()
                == Some(hub_identity.as_str())
        });
        if !hub_listed {
            return Err(format!("external_senders lacks {hub_identity}"));
        }
        return Ok((
            room.clone(),
            format!(
                "joined {room}: {} participants, hub {hub_identity} is external sender",
                state.participants.len()
            ),
        ));
    }
}

fn submit_refusal(body: &[u8]) -> Result<String, String> {
    match SubmitMessageResponse::decode(body).map(|r| r.status) {
        Ok(SubmitStatus::NotAllowed) => Ok("SubmitMessageResponse notAllowed".into()),
        Ok(other) => Err(format!("SubmitMessageResponse {other:?}")),
        Err(e) => Err(format!("the body is no SubmitMessageResponse: {e}")),
    }
}

/// Anything but success refuses an update.
fn update_refusal(body: &[u8]) -> Result<String, String> {
    match UpdateRoomResponse::decode(body) {
        Ok(UpdateRoomResponse::Success { .. }) => Err("UpdateRoomResponse success".into()),
        Ok(other) => Ok(format!("UpdateRoomResponse {:?}", other.description())),
        Err(e) => Err(format!("the body is no UpdateRoomResponse: {e}")),
    }
}

/// kit-bob's message in the peer's room, through submitMessage.
async fn reverse_submit(kit: &mut Kit, room: &RoomId) -> Step<()> {
    let text = format!("kit-bob here (run {})", kit.run_id);
    let content = text_content(kit.bob.user(), room, &text);
    let message = kit.bob.message(room, &content).map_err(kit_error)?;
    let body = SubmitMessageRequest::new(message, &kit.bob.user().to_uri()).encode();
    let answer = kit
        .peer
        .post("submitMessage", room.path_form(), body)
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    if answer.status != 200 {
        return Err(format!("expected 200, got {}", answer.describe()));
    }
    match SubmitMessageResponse::decode(&answer.body).map(|r| r.status) {
        Ok(SubmitStatus::Accepted { .. }) => Ok(((), format!("accepted: {text:?}"))),
        Ok(other) => Err(format!("SubmitMessageResponse {other:?}")),
        Err(e) => Err(format!("the body is no SubmitMessageResponse: {e}")),
    }
}

/// A real message of the room from kit-bob's client, submitted in the name of `sender`.
async fn submit_as(
    kit: &mut Kit,
    sender: &str,
    room: &RoomId,
) -> Result<Result<crate::transport::Answer, String>, String> {
    let content = MimiContent::text(random::<16>(), sender, room.as_str(), "forged").encode();
    let message = kit.bob.message(room, &content).map_err(kit_error)?;
    let body = SubmitMessageRequest::new(message, sender).encode();
    Ok(kit.peer.post("submitMessage", room.path_form(), body).await)
}

/// groupInfo for a new client of kit-bob: decrypts the answer, verifies the hub's signature
/// with the ExternalSender in the answer, which must be one of the group's external senders.
async fn reverse_group_info(
    kit: &mut Kit,
    second: &KitClient,
    room: &RoomId,
) -> Step<GroupInfoRatchetTreeTbe> {
    let hpke = crate::mls::HpkeKey::new().map_err(kit_error)?;
    let request = second.group_info_request(&hpke.public).map_err(kit_error)?;
    let answer = kit
        .peer
        .post("groupInfo", room.path_form(), request.encode())
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    if answer.status != 200 {
        return Err(format!("expected 200, got {}", answer.describe()));
    }
    let response = GroupInfoResponse::decode(&answer.body)
        .map_err(|e| format!("the body is no GroupInfoResponse: {e}"))?;
    if response.room_id.as_slice() != room.as_str().as_bytes() {
        return Err("the answer names another room".into());
    }
    let content = response.sign_content().map_err(kit_error)?;
    let GroupInfoResult::Success {
        hub_sender,
        encrypted_groupinfo_and_tree,
        signature,
        ..
    } = response.result
    else {
        return Err(group_info_refusal(&answer.body).unwrap_or_else(|e| e));
    };
    let content = content.ok_or("no signed content")?;
    if !crate::mls::verify(
        hub_sender.signature_key.as_slice(),
        &content,
        signature.as_slice(),
    ) {
        return Err("the hub's signature does not verify with hubSender's key".into());
    }
    let senders = kit.bob.external_senders(room).map_err(kit_error)?;
    if !senders.contains(&hub_sender) {
        return Err("hubSender is not among the group's external_senders".into());
    }
    let plaintext = hpke
        .open(
            signing::GROUP_INFO_ENCRYPTION,
            room.as_str().as_bytes(),
            &encrypted_groupinfo_and_tree,
        )
        .map_err(|e| format!("cannot decrypt: {e}"))?;
    let tbe = GroupInfoRatchetTreeTbe::decode(&plaintext)
        .map_err(|e| format!("the plaintext is no GroupInfoRatchetTreeTBE: {e}"))?;
    let pending = tbe.pending_proposals.len();
    Ok((tbe, format!("signed by the hub's external sender, decrypted: GroupInfo, tree, {pending} pending proposals")))
}

/// The second client joins by external commit through update; kit-bob's first client follows.
async fn reverse_external_commit(
    kit: &mut Kit,
    second: &mut KitClient,
    room: &RoomId,
    tbe: GroupInfoRatchetTreeTbe,
) -> Step<()> {
    let RatchetTreeOption::Full { ratchet_tree } = tbe.ratchet_tree else {
        return Err("the groupInfo answer's tree is not full".into());
    };
    let out = second
        .external_join(room, &tbe.group_info, &ratchet_tree)
        .map_err(kit_error)?;
    let bundle = HandshakeBundle::Commit {
        commit: out.commit.clone(),
        welcome: None,
        group_info: GroupInfoOption::Full {
            group_info: out.group_info,
        },
        ratchet_tree: RatchetTreeOption::Full {
            ratchet_tree: out.ratchet_tree,
        },
    };
    expect_update_success(kit, room, bundle).await?;
    kit.bob.process(room, &out.commit).map_err(kit_error)?;
    Ok(((), format!("external commit of {} accepted", second.device)))
}

async fn expect_update_success(
    kit: &Kit,
    room: &RoomId,
    bundle: HandshakeBundle,
) -> Result<(), String> {
    let answer = kit
        .peer
        .post("update", room.path_form(), bundle.encode())
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    if answer.status != 200 {
        return Err(format!("expected 200, got {}", answer.describe()));
    }
    match UpdateRoomResponse::decode(&answer.body) {
        Ok(UpdateRoomResponse::Success { .. }) => Ok(()),
        Ok(other) => Err(format!(
            "UpdateRoomResponse {:?}: {}",
            other,
            other.description()
        )),
        Err(e) => Err(format!("the body is no UpdateRoomResponse: {e}")),
    }
}

/// Both of kit-bob's clients propose their own removal through update, kit-bob's first client
/// first; the kit hands that proposal to the second client itself (the hub need not send a
/// client's own message back to its provider). A proposal belongs to its epoch: should the
/// peer's client commit the first client's leaving before the second proposal reaches the hub,
/// as a prompt client may, the hub answers wrongEpoch; the second client then follows the
/// room's commits, as notified, to the hub's epoch and proposes again.
async fn reverse_leave(kit: &mut Kit, second: &mut KitClient, room: &RoomId) -> Step<()> {
    let Kit {
        peer,
        listener,
        bob,
        config,
        ..
    } = kit;
    let deadline = Instant::now() + config.timeout;
    let (first, _) = leave(peer, listener, bob, room, &[], deadline).await?;
    second.process(room, &first).map_err(kit_error)?;
    let (_, retries) = leave(peer, listener, second, room, &[first], deadline).await?;
    let detail = match retries {
        0 => "both clients' self-Remove proposals accepted".to_owned(),
        n => format!(
            "both clients' self-Remove proposals accepted (the second proposed again after the peer committed the first, {n}x)"
        ),
    };
    Ok(((), detail))
}

/// `client`'s self-Remove proposal through update, proposed again at the hub's epoch after a
/// wrongEpoch (following the room's notified commits first) until `deadline`; returns the
/// accepted proposal and how often it was proposed again. `own`: messages of the kit's
/// clients that `client` already processed.
async fn leave(
    peer: &PeerClient,
    listener: &mut Listener,
    client: &mut KitClient,
    room: &RoomId,
    own: &[MlsMessage],
    deadline: Instant,
) -> Result<(MlsMessage, usize), String> {
    let mut retries = 0;
    loop {
        let proposal = client.leave(room).map_err(kit_error)?;
        let bundle = HandshakeBundle::Proposal {
            proposal: proposal.clone(),
            more_proposals: Vec::new(),
        };
        let answer = peer
            .post("update", room.path_form(), bundle.encode())
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        let epoch = match UpdateRoomResponse::decode(&answer.body) {
            Ok(UpdateRoomResponse::Success { .. }) if answer.status == 200 => {
                return Ok((proposal, retries))
            }
            Ok(UpdateRoomResponse::WrongEpoch { current_epoch, .. })
                if answer.status == 200 && Instant::now() < deadline =>
            {
                current_epoch
            }
            Ok(other) => return Err(format!("{} left: {}", client.device, other.description())),
            Err(_) => return Err(format!("{} left: {}", client.device, answer.describe())),
        };
        follow_to_epoch(listener, client, room, epoch, own, deadline).await?;
        retries += 1;
    }
}

/// Processes the room's notified messages with `client`, in order, until it reached `epoch`.
/// Those in `own` are skipped; messages from before the client joined, or its own, do not
/// process and are passed over.
async fn follow_to_epoch(
    listener: &mut Listener,
    client: &mut KitClient,
    room: &RoomId,
    epoch: u64,
    own: &[MlsMessage],
    deadline: Instant,
) -> Result<(), String> {
    let key = room.to_string();
    while client.epoch(room).map_err(kit_error)? < epoch {
        let left = deadline.saturating_duration_since(Instant::now());
        let messages = listener
            .wait_for(left, |e| match e {
                Inbound::Notify { room, request } if *room == key => Some(request.messages.clone()),
                _ => None,
            })
            .await
            .ok_or_else(|| {
                format!(
                    "{} left: wrong_epoch, and no commit to the hub's epoch {epoch} was notified in time",
                    client.device
                )
            })?;
        for m in messages {
            if !own.iter().any(|o| o.bytes() == m.message.bytes()) {
                let _ = client.process(room, &m.message);
            }
        }
    }
    Ok(())
}
