//! Key material across providers: claims of KeyPackages for local clients, and MIMI
//! `keyMaterial` for peers.
//!
//! A claim goes to the room's hub when the room is hubbed elsewhere; otherwise a local user's
//! KeyPackages come from `accounts`, and another provider's user's from that provider, fetched
//! as the room's (future) hub, which records the keys it was given for the room (`hub`'s
//! `remote_claims`). Answering `keyMaterial`, the user's provider hands out KeyPackages only with
//! its user's consent and remembers the asking hub as the one that may notify it about the room
//! (`follower`); a hub relays a follower's request to the user's provider. Owns no table.

use crate::accounts::{unknown_device, Accounts, AuthDevice};
use crate::config::ServerConfig;
use crate::consent::Consent;
use crate::error::{ServiceError, ServiceResult};
use crate::follower::Follower;
use crate::hub::{no_consent, Hub};
use crate::mls::validate_key_package;
use crate::peers::{self, hub_garbled, PeerClient};
use parley_proto::api::{ClaimResponse, ClaimedKeyPackage};
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::{
    Body, ClientMaterial, IdentifierUri, KeyMaterialRequest, KeyMaterialResponse, UserCode,
};
use parley_proto::{DeviceId, Domain, RoomId, UserId};
use std::sync::Arc;

/// MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519.
const CIPHERSUITE: u16 = 1;

pub struct KeyMaterial {
    config: Arc<ServerConfig>,
    accounts: Arc<Accounts>,
    hub: Arc<Hub>,
    follower: Arc<Follower>,
    consent: Arc<Consent>,
    peers: Option<Arc<PeerClient>>,
}

fn bad_body(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::bad("invalid_body", e.to_string())
}

fn uri_text(u: &IdentifierUri) -> ServiceResult<&str> {
    u.as_str().map_err(bad_body)
}

fn parse_user(s: &str) -> ServiceResult<UserId> {
    UserId::parse(s).map_err(|e| ServiceError::bad("invalid_user", e.to_string()))
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

    /// `POST /v1/users/{user}/key-packages/claim?room=[&device=]` from a local client. With
    /// `device`, only that device's package is answered. Locally only that one is consumed;
    /// through another provider all of the user's devices' packages are (MIMI `keyMaterial`
    /// names a user, not a client), and the others are dropped here.
    pub async fn claim(
        &self,
        requester: &AuthDevice,
        target: &UserId,
        room: Option<RoomId>,
        device: Option<DeviceId>,
    ) -> ServiceResult<ClaimResponse> {
        let remote_hub = match &room {
            Some(r) => self.follower.hub_of(r).await?,
            None => None,
        };
        if remote_hub.is_none() && self.config.hosts(target.domain().as_str()) {
            return self
                .accounts
                .claim_key_packages(target, device.as_ref())
                .await;
        }
        let claim = self
            .claim_across(requester, target, room, remote_hub)
            .await?;
        match device {
            Some(device) => only_device(target, claim, &device),
            None => Ok(claim),
        }
    }

    /// A claim that involves another provider: through the room's hub when the room is hubbed
    /// elsewhere, else from the target's provider as the room's (future) hub.
    async fn claim_across(
        &self,
        requester: &AuthDevice,
        target: &UserId,
        room: Option<RoomId>,
        remote_hub: Option<Domain>,
    ) -> ServiceResult<ClaimResponse> {
        if let (Some(hub), Some(room)) = (remote_hub, &room) {
            // The room's hub must see (and remember) every key used in its room.
            let request = KeyMaterialRequest::new(
                &requester.user.to_uri(),
                &target.to_uri(),
                &room.to_uri(&hub),
                CIPHERSUITE,
            );
            let answer = self
                .peers()?
                .call(
                    requester.user.domain(),
                    &hub,
                    "keyMaterial",
                    &target.to_uri(),
                    request.encode(),
                )
                .await?;
            let response =
                KeyMaterialResponse::decode(&answer).map_err(|e| hub_garbled(&hub, e))?;
            return Ok(claim_of(target, &response)?.0);
        }
        let room = room.ok_or_else(|| {
            ServiceError::bad(
                "missing_room",
                "claiming KeyPackages of another provider's user needs ?room=ROOM_ID",
            )
        })?;
        let hub_domain = match self.hub.hub_domain_of(&room).await? {
            Some(d) => d,
            None => requester.user.domain().clone(), // a room about to be created here
        };
        self.fetch_for_hub(&requester.user, target, &room, &hub_domain)
            .await
    }

    /// As the (future) hub of `room`: claims `target`'s KeyPackages from its provider and records
    /// them, so the commit adding them can be checked.
    async fn fetch_for_hub(
        &self,
        requester: &UserId,
        target: &UserId,
        room: &RoomId,
        hub_domain: &Domain,
    ) -> ServiceResult<ClaimResponse> {
        let request = KeyMaterialRequest::new(
            &requester.to_uri(),
            &target.to_uri(),
            &room.to_uri(hub_domain),
            CIPHERSUITE,
        );
        let answer = self
            .peers()?
            .call(
                hub_domain,
                target.domain(),
                "keyMaterial",
                &target.to_uri(),
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
        request.check().map_err(bad_body)?;
        let target = parse_user(uri_text(&request.target_user)?)?;
        if parse_user(target_param)? != target {
            return Err(ServiceError::bad(
                "target_mismatch",
                "the path and the body name different users",
            ));
        }
        let requester = parse_user(uri_text(&request.requesting_user)?)?;
        let (room_hub, room) = RoomId::parse_uri(uri_text(&request.room_id)?)
            .map_err(|e| ServiceError::bad("invalid_room", e.to_string()))?;
        if requester.domain() != peer && room_hub != *peer {
            return Err(ServiceError::forbidden(
                "peer_domain_mismatch",
                format!("{peer} may not ask on behalf of {requester}"),
            ));
        }
        let target_uri = target.to_uri();
        if self.config.hosts(target.domain().as_str()) {
            if !self.consent.allows(&requester, &target).await? {
                tracing::info!(%requester, %target, "keyMaterial refused: no consent");
                return Ok(KeyMaterialResponse::refused(
                    UserCode::NoConsent,
                    &target_uri,
                ));
            }
            return Ok(
                match self.accounts.claim_key_packages(&target, None).await {
                    Ok(claim) => {
                        self.follower.expect_hub(&room, &room_hub).await?;
                        material_of(&target, claim)
                    }
                    Err(ServiceError::NotFound { .. }) => {
                        KeyMaterialResponse::refused(UserCode::UserUnknown, &target_uri)
                    }
                    Err(ServiceError::Conflict { .. }) => {
                        KeyMaterialResponse::refused(UserCode::NoCompatibleMaterial, &target_uri)
                    }
                    Err(e) => return Err(e),
                },
            );
        }
        // Relaying as the room's hub for a follower's user.
        let hubbed_here = self.config.hosts(room_hub.as_str())
            && self.hub.hub_domain_of(&room).await? == Some(room_hub.clone());
        if !hubbed_here || requester.domain() != peer {
            return Ok(KeyMaterialResponse::refused(
                UserCode::UserUnknown,
                &target_uri,
            ));
        }
        if !self.hub.has_member_user(&room, &requester).await? {
            return Err(ServiceError::forbidden(
                "not_member",
                format!("{requester} is not in room {room}"),
            ));
        }
        match self
            .fetch_for_hub(&requester, &target, &room, &room_hub)
            .await
        {
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
}

/// Clients and the signature keys of the KeyPackages claimed for them.
type ClaimedKeys = Vec<(DeviceUri, Vec<u8>)>;

/// A claim answer from a `KeyMaterialResponse`: only packages that validate and belong to the
/// client the response names, a client of `target`. Also returns (client, key) for recording.
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
        let ClientMaterial::Success {
            client_uri,
            key_package,
        } = client
        else {
            continue;
        };
        let Ok(uri) = client_uri.as_str() else {
            continue;
        };
        let Ok(device) = DeviceUri::parse(uri) else {
            continue;
        };
        let Ok(leaf) = validate_key_package(key_package.as_slice()) else {
            tracing::warn!(%device, "peer sent an invalid KeyPackage; skipped");
            continue;
        };
        if device.user != *target || leaf.device != device {
            tracing::warn!(%device, "peer sent a KeyPackage for another client; skipped");
            continue;
        }
        claimed.push(ClaimedKeyPackage {
            device_id: device.device.as_str().to_owned(),
            key_package: key_package.as_slice().to_vec(),
        });
        keys.push((device, leaf.signature_key));
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

/// A local claim as a `KeyMaterialResponse`.
fn material_of(target: &UserId, claim: ClaimResponse) -> KeyMaterialResponse {
    let clients = claim
        .key_packages
        .into_iter()
        .map(|k| ClientMaterial::Success {
            client_uri: IdentifierUri::new(&format!(
                "mimi://{}/d/{}/{}",
                target.domain(),
                target.handle().as_str(),
                k.device_id
            )),
            key_package: k.key_package.into(),
        })
        .collect();
    KeyMaterialResponse {
        protocol: parley_proto::mimi::MLS10,
        user_status: UserCode::Success as u8,
        user_uri: IdentifierUri::new(&target.to_uri()),
        clients,
    }
}
