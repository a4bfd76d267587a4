//! Key material across providers: claims of KeyPackages for local clients, and MIMI
//! `keyMaterial` for peers. Owns no table.
//!
//! Every claim carries a `KeyMaterialRequest` signed by the requesting client (draft §5.2),
//! checked here and forwarded unchanged. A claim for a room hubbed elsewhere goes to that hub
//! (the room URI names it); otherwise a local user's KeyPackages come from `accounts`, and
//! another provider's user's from that provider, fetched as the room's (future) hub, which
//! records what it was given for the room (`hub`'s `remote_claims`). Answering `keyMaterial`,
//! the user's provider hands out KeyPackages only with its user's consent and remembers each
//! one's KeyPackageRef for the room (`follower`), by which it routes the room's Welcome; a hub
//! relays a member's request to the user's provider.

use crate::accounts::{unknown_device, Accounts, AuthDevice};
use crate::config::ServerConfig;
use crate::consent::Consent;
use crate::crypto;
use crate::error::{ServiceError, ServiceResult};
use crate::follower::Follower;
use crate::hub::{no_consent, Hub};
use crate::mls::{check_key_package, credential_device};
use crate::peers::{self, hub_garbled, PeerClient};
use parley_proto::api::{ClaimRequest, ClaimResponse, ClaimedKeyPackage};
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::{
    self, Body, ClientKeyMaterial, IdentifierUri, KeyMaterialRequest, KeyMaterialResponse, UserCode,
};
use parley_proto::{DeviceId, Domain, RoomId, UserId};
use std::sync::Arc;

pub struct KeyMaterial {
    config: Arc<ServerConfig>,
    accounts: Arc<Accounts>,
    hub: Arc<Hub>,
    follower: Arc<Follower>,
    consent: Arc<Consent>,
    peers: Option<Arc<PeerClient>>,
}

fn bad_request(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::bad("invalid_key_material_request", e.to_string())
}

fn uri_text(u: &IdentifierUri) -> ServiceResult<&str> {
    u.as_str().map_err(bad_request)
}

fn parse_user(s: &str) -> ServiceResult<UserId> {
    UserId::parse(s).map_err(|e| ServiceError::bad("invalid_user", e.to_string()))
}

/// What a verified request asks: who (the signing client), for whom, in which room.
struct Checked {
    requester: DeviceUri,
    target: UserId,
    room: RoomId,
}

/// Verifies a `KeyMaterialRequest`: protocol, the signature with the requester's key over the
/// TBS, and that the credential names a client of `requestingUser`.
fn verify(request: &KeyMaterialRequest) -> ServiceResult<Checked> {
    request.check().map_err(bad_request)?;
    if !request.acceptable_ciphersuites.contains(&mimi::CIPHERSUITE) {
        return Err(bad_request(
            "the request accepts none of this provider's ciphersuites",
        ));
    }
    let content = request.tbs().sign_content().map_err(bad_request)?;
    crypto::verify(
        request.requester_signature_key.as_slice(),
        &content,
        request.signature.as_slice(),
    )
    .map_err(|_| {
        ServiceError::forbidden(
            "bad_signature",
            "the keyMaterial request's signature does not verify",
        )
    })?;
    let requester = request
        .requester_credential
        .parse()
        .ok()
        .and_then(|c| credential_device(&c))
        .ok_or_else(|| bad_request("the requester credential does not name a client"))?;
    let requesting_user = parse_user(uri_text(&request.requesting_user)?)?;
    if requester.user != requesting_user {
        return Err(bad_request(
            "the requester credential names a client of another user",
        ));
    }
    Ok(Checked {
        requester,
        target: parse_user(uri_text(&request.target_user)?)?,
        room: RoomId::parse(uri_text(&request.room_id)?)
            .map_err(|e| ServiceError::bad("invalid_room", e.to_string()))?,
    })
}

impl KeyMaterial {
    pub fn new(
        config: Arc<ServerConfig>,
        accounts: Arc<Accounts>,
        hub: Arc<Hub>,
        follower: Arc<Follower>,
        consent: Arc<Consent>,
        peers: Option<Arc<PeerClient>>,
    ) -> Self {
        Self {
            config,
            accounts,
            hub,
            follower,
            consent,
            peers,
        }
    }

    fn peers(&self) -> ServiceResult<&PeerClient> {
        peers::required(self.peers.as_deref())
    }

    /// `POST /v1/users/{user}/key-packages/claim` from a local client. With `device`, only that
    /// device's package is answered. Locally only that one is consumed; through another provider
    /// all of the user's devices' packages are (MIMI `keyMaterial` names a user, not a client),
    /// and the others are dropped here.
    pub async fn claim(
        &self,
        requester: &AuthDevice,
        target: &UserId,
        req: ClaimRequest,
    ) -> ServiceResult<ClaimResponse> {
        let room = RoomId::parse(&req.room)
            .map_err(|e| ServiceError::bad("invalid_room", e.to_string()))?;
        let device = req
            .device
            .as_deref()
            .map(DeviceId::parse)
            .transpose()
            .map_err(|e| ServiceError::bad("invalid_device", e.to_string()))?;
        let request = KeyMaterialRequest::decode(&req.key_material_request).map_err(bad_request)?;
        let checked = verify(&request)?;
        let registered = self.accounts.device_key(&requester.uri()).await?;
        if checked.requester != requester.uri()
            || registered.as_deref() != Some(request.requester_signature_key.as_slice())
        {
            return Err(bad_request(
                "the request must be signed by the calling device with its registered key",
            ));
        }
        if checked.target != *target || checked.room != room {
            return Err(bad_request(
                "the request must name the claimed user and room",
            ));
        }
        if let Some(hub) = self.follower.hub_of(&room) {
            // The room's hub must see (and remember) every key used in its room.
            let answer = self
                .peers()?
                .call(
                    requester.user.domain(),
                    &hub,
                    "keyMaterial",
                    &target_param(target),
                    request.encode(),
                )
                .await?;
            let response =
                KeyMaterialResponse::decode(&answer).map_err(|e| hub_garbled(&hub, e))?;
            let claim = claim_of(target, &response)?.0;
            return match device {
                Some(device) => only_device(target, claim, &device),
                None => Ok(claim),
            };
        }
        if self.config.hosts(target.domain().as_str()) {
            return self
                .accounts
                .claim_key_packages(target, device.as_ref())
                .await;
        }
        let claim = self.fetch_for_hub(&request, target, &room).await?;
        match device {
            Some(device) => only_device(target, claim, &device),
            None => Ok(claim),
        }
    }

    /// As the (future) hub of `room`: claims `target`'s KeyPackages from its provider with the
    /// requester's signed request and records them, so the commit adding them can be checked.
    async fn fetch_for_hub(
        &self,
        request: &KeyMaterialRequest,
        target: &UserId,
        room: &RoomId,
    ) -> ServiceResult<ClaimResponse> {
        let answer = self
            .peers()?
            .call(
                room.hub(),
                target.domain(),
                "keyMaterial",
                &target_param(target),
                request.encode(),
            )
            .await?;
        let response =
            KeyMaterialResponse::decode(&answer).map_err(|e| hub_garbled(target.domain(), e))?;
        let (claim, keys) = claim_of(target, &response)?;
        self.hub.record_remote_claims(room, keys).await?;
        Ok(claim)
    }

    /// MIMI `keyMaterial/{targetUser}` from `peer`.
    pub async fn on_request(
        &self,
        peer: &Domain,
        target_param: &str,
        request: KeyMaterialRequest,
    ) -> ServiceResult<KeyMaterialResponse> {
        let checked = verify(&request)?;
        if parse_user(target_param)? != checked.target {
            return Err(ServiceError::bad(
                "target_mismatch",
                "the path and the body name different users",
            ));
        }
        let Checked {
            requester,
            target,
            room,
        } = checked;
        if requester.user.domain() != peer && room.hub() != peer {
            return Err(ServiceError::forbidden(
                "peer_domain_mismatch",
                format!("{peer} may not ask on behalf of {}", requester.user),
            ));
        }
        if self.config.hosts(requester.user.domain().as_str()) {
            // A hub relays requests of other providers' users (it cannot prove their keys, we
            // cannot check them), but ours we know: one in the name of a user of ours must
            // carry that device's registered key. Else any peer, naming itself the hub of a
            // room of its own, could claim our users' KeyPackages as another user of ours, who
            // needs no consent here.
            let registered = self.accounts.device_key(&requester).await?;
            if registered.as_deref() != Some(request.requester_signature_key.as_slice()) {
                return Err(ServiceError::forbidden(
                    "unknown_device",
                    format!("{requester} is not a device of this provider with that key"),
                ));
            }
        }
        let target_uri = target.to_uri();
        if self.config.hosts(target.domain().as_str()) {
            return self.answer_for_local(&requester.user, &target, &room).await;
        }
        // Relaying as the room's hub for a member of another provider.
        let hubbed_here = self.hub.hosts_room(&room).await?;
        if !hubbed_here || requester.user.domain() != peer {
            return Ok(KeyMaterialResponse::refused(
                UserCode::UserUnknown,
                &target_uri,
            ));
        }
        let key = self.hub.member_key(&room, &requester).await?;
        if key.as_deref() != Some(request.requester_signature_key.as_slice()) {
            return Err(ServiceError::forbidden(
                "not_member",
                format!("{requester} is not a member of room {room} with that key"),
            ));
        }
        match self.fetch_for_hub(&request, &target, &room).await {
            Ok(claim) => Ok(material_of(&target, claim)),
            Err(ServiceError::Forbidden {
                code: "no_consent", ..
            }) => Ok(KeyMaterialResponse::refused(
                UserCode::NoConsent,
                &target_uri,
            )),
            Err(ServiceError::NotFound { .. }) => Ok(KeyMaterialResponse::refused(
                UserCode::UserUnknown,
                &target_uri,
            )),
            Err(e) => Err(e),
        }
    }

    /// One KeyPackage per client of a local user, with consent, each remembered by its
    /// KeyPackageRef for the room (so its Welcome can be routed).
    async fn answer_for_local(
        &self,
        requester: &UserId,
        target: &UserId,
        room: &RoomId,
    ) -> ServiceResult<KeyMaterialResponse> {
        let target_uri = target.to_uri();
        if !self.consent.allows(requester, target).await? {
            tracing::info!(%requester, %target, "keyMaterial refused: no consent");
            return Ok(KeyMaterialResponse::refused(
                UserCode::NoConsent,
                &target_uri,
            ));
        }
        let claim = match self.accounts.claim_key_packages(target, None).await {
            Ok(claim) => claim,
            Err(ServiceError::NotFound { .. }) => {
                return Ok(KeyMaterialResponse::refused(
                    UserCode::UserUnknown,
                    &target_uri,
                ))
            }
            Err(ServiceError::Conflict { .. }) => {
                return Ok(KeyMaterialResponse::refused(
                    UserCode::NoCompatibleMaterial,
                    &target_uri,
                ))
            }
            Err(e) => return Err(e),
        };
        let mut handed = Vec::new();
        for k in &claim.key_packages {
            if let Ok(checked) = check_key_package(&k.key_package) {
                handed.push((checked.reference, k.device_id.clone()));
            }
        }
        self.follower.record_handed_out(room, handed).await?;
        Ok(material_of(target, claim))
    }
}

/// A user URI as the draft's examples put it into a path (without `mimi://`).
fn target_param(user: &UserId) -> String {
    format!("{}/u/{}", user.domain(), user.handle().as_str())
}

/// Clients, their signature keys and KeyPackageRefs, as claimed.
type ClaimedKeys = Vec<(DeviceUri, Vec<u8>, Vec<u8>)>;

/// A claim answer from a `KeyMaterialResponse`: only packages that validate and belong to the
/// client the response names, a client of `target`. Also returns (client, key, ref) to record.
fn claim_of(
    target: &UserId,
    response: &KeyMaterialResponse,
) -> ServiceResult<(ClaimResponse, ClaimedKeys)> {
    match response.code() {
        Some(UserCode::Success | UserCode::PartialSuccess) => {}
        Some(UserCode::NoConsent | UserCode::NoConsentForThisRoom) => {
            return Err(no_consent(target))
        }
        Some(UserCode::UserUnknown | UserCode::UserDeleted) => {
            return Err(ServiceError::not_found(
                "unknown_user",
                format!("no such user {target}"),
            ))
        }
        _ => {
            return Err(ServiceError::conflict(
                "no_key_packages",
                format!("{target} has no usable KeyPackages"),
            ))
        }
    }
    let mut claimed = Vec::new();
    let mut keys = Vec::new();
    for client in &response.clients {
        let ClientKeyMaterial::Success {
            client_uri,
            key_package,
        } = client
        else {
            continue;
        };
        let Ok(device) = client_uri.as_str().map(DeviceUri::parse) else {
            continue;
        };
        let Ok(device) = device else { continue };
        let Ok(checked) = check_key_package(key_package.bytes()) else {
            tracing::warn!(%device, "peer sent an invalid KeyPackage; skipped");
            continue;
        };
        if device.user != *target || checked.leaf.device != device {
            tracing::warn!(%device, "peer sent a KeyPackage for another client; skipped");
            continue;
        }
        claimed.push(ClaimedKeyPackage {
            device_id: device.device.as_str().to_owned(),
            key_package: checked.bare,
        });
        keys.push((device, checked.leaf.signature_key, checked.reference));
    }
    if claimed.is_empty() {
        return Err(ServiceError::conflict(
            "no_key_packages",
            format!("{target} has no usable KeyPackages"),
        ));
    }
    Ok((
        ClaimResponse {
            user: target.to_string(),
            key_packages: claimed,
        },
        keys,
    ))
}

/// The part of `claim` for `device` alone.
fn only_device(
    target: &UserId,
    mut claim: ClaimResponse,
    device: &DeviceId,
) -> ServiceResult<ClaimResponse> {
    claim
        .key_packages
        .retain(|k| k.device_id == device.as_str());
    if claim.key_packages.is_empty() {
        return Err(unknown_device(target, device));
    }
    Ok(claim)
}

/// A claim as a `KeyMaterialResponse` (bare KeyPackages).
fn material_of(target: &UserId, claim: ClaimResponse) -> KeyMaterialResponse {
    let clients = claim
        .key_packages
        .into_iter()
        .filter_map(|k| {
            let bare = check_key_package(&k.key_package).ok()?.bare;
            Some(ClientKeyMaterial::Success {
                client_uri: IdentifierUri::new(&format!(
                    "mimi://{}/d/{}/{}",
                    target.domain(),
                    target.handle().as_str(),
                    k.device_id
                )),
                key_package: mimi::KeyPackage::from_bytes(bare).ok()?,
            })
        })
        .collect();
    KeyMaterialResponse {
        protocol: mimi::MLS10,
        user_status: UserCode::Success as u8,
        user_uri: IdentifierUri::new(&target.to_uri()),
        clients,
    }
}
