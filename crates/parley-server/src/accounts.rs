//! Accounts, devices, bearer tokens and KeyPackages. Owns the `users`, `devices`,
//! `invites_used` and `key_packages` tables.

use crate::config::{Registration, ServerConfig};
use crate::delivery::{enqueue, Outgoing, PushRegistry, Stored};
use crate::error::{ServiceError, ServiceResult};
use crate::limits::RateLimiter;
use crate::mls::validate_key_package;
use crate::store::{Store, StoreError};
use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use parley_proto::api::{ClaimResponse, ClaimedKeyPackage, DeviceInfo, EntryKind, KeyPackageCount};
use parley_proto::ids::DeviceUri;
use parley_proto::{DeviceId, UserId};
use rand::RngCore;
use rusqlite::{params, OptionalExtension};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

const MIN_PASSWORD: usize = 8;
const MAX_PASSWORD: usize = 1024;
const MAX_DEVICE_NAME: usize = 64;
const ED25519_KEY_LEN: usize = 32;
/// Stored in place of a hash for accounts created by invite without a password.
const NO_PASSWORD: &str = "!";

/// The device a request is authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthDevice {
    pub device: DeviceId,
    pub user: UserId,
}

impl AuthDevice {
    pub fn uri(&self) -> DeviceUri {
        DeviceUri::new(self.user.clone(), self.device.clone())
    }
}

/// A newly created device and its token (returned once, stored only hashed).
pub struct NewSession {
    pub device: DeviceId,
    pub token: String,
}

pub struct Accounts {
    store: Store,
    config: Arc<ServerConfig>,
    tokens: RwLock<HashMap<[u8; 32], AuthDevice>>,
    login_failures: RateLimiter,
    registrations: RateLimiter,
    requests: RateLimiter,
}

fn now_ms() -> u64 {
    crate::clock::now_ms()
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn new_device_id() -> DeviceId {
    let mut bytes = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut bytes);
    DeviceId::from_random(bytes)
}

fn check_device_name(name: Option<&str>) -> ServiceResult<String> {
    let name = name.unwrap_or("device");
    if name.is_empty()
        || name.chars().count() > MAX_DEVICE_NAME
        || name.chars().any(char::is_control)
    {
        return Err(ServiceError::bad(
            "invalid_device_name",
            format!("device names are 1-{MAX_DEVICE_NAME} printable characters"),
        ));
    }
    Ok(name.to_owned())
}

fn check_signature_key(key: &[u8]) -> ServiceResult<()> {
    if key.len() != ED25519_KEY_LEN {
        return Err(ServiceError::bad(
            "invalid_signature_key",
            "signature_key must be a 32-byte Ed25519 public key",
        ));
    }
    Ok(())
}

async fn hash_password(password: String) -> ServiceResult<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| ServiceError::Internal(format!("argon2: {e}")))
    })
    .await
    .map_err(|e| ServiceError::Internal(e.to_string()))?
}

async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

impl Accounts {
    pub fn new(store: Store, config: Arc<ServerConfig>) -> Self {
        let limits = &config.limits;
        Self {
            login_failures: RateLimiter::per_minute(limits.logins_per_minute),
            registrations: RateLimiter::per_minute(limits.registrations_per_minute),
            requests: RateLimiter::new(limits.requests_per_second, limits.request_burst),
            store,
            config,
            tokens: RwLock::new(HashMap::new()),
        }
    }

    /// Parses a user and checks its domain is one this server hosts.
    pub fn local_user(&self, user: &str) -> ServiceResult<UserId> {
        let user =
            UserId::parse(user).map_err(|e| ServiceError::bad("invalid_user", e.to_string()))?;
        if self.config.domain(user.domain().as_str()).is_none() {
            return Err(ServiceError::not_found(
                "unknown_domain",
                format!("this server does not host the domain {}", user.domain()),
            ));
        }
        Ok(user)
    }

    /// What registering and logging in a device both check: the user, the device name, the key.
    fn check_enrolment(
        &self,
        user: &str,
        device_name: Option<&str>,
        signature_key: &[u8],
    ) -> ServiceResult<(UserId, String)> {
        let user = self.local_user(user)?;
        let name = check_device_name(device_name)?;
        check_signature_key(signature_key)?;
        Ok((user, name))
    }

    /// `POST /v1/accounts`.
    pub async fn register(
        &self,
        user: &str,
        password: Option<String>,
        invite: Option<String>,
        device_name: Option<&str>,
        signature_key: Vec<u8>,
    ) -> ServiceResult<NewSession> {
        let (user, name) = self.check_enrolment(user, device_name, &signature_key)?;
        if !self.registrations.allow("register") {
            return Err(ServiceError::RateLimited(
                "too many registrations, try again later".into(),
            ));
        }
        let policy = self
            .config
            .domain(user.domain().as_str())
            .ok_or_else(|| ServiceError::Internal("domain vanished".into()))?;
        let invite = match (policy.registration, invite) {
            (Registration::InviteOnly, None) => {
                return Err(ServiceError::forbidden(
                    "invite_required",
                    format!(
                        "{} is invite-only: register with an invite code",
                        user.domain()
                    ),
                ))
            }
            (Registration::InviteOnly, Some(code)) if !policy.invites.contains(&code) => {
                return Err(ServiceError::forbidden(
                    "invalid_invite",
                    "unknown invite code",
                ))
            }
            (Registration::InviteOnly, Some(code)) => Some(code),
            (Registration::Open, _) => None,
        };
        let password_hash = match password {
            Some(pw) if pw.len() < MIN_PASSWORD || pw.len() > MAX_PASSWORD => {
                return Err(ServiceError::bad(
                    "weak_password",
                    format!("passwords are {MIN_PASSWORD}-{MAX_PASSWORD} bytes"),
                ))
            }
            Some(pw) => hash_password(pw).await?,
            None if invite.is_some() => NO_PASSWORD.to_owned(),
            None => return Err(ServiceError::bad("weak_password", "a password is required")),
        };
        let session = NewSession {
            device: new_device_id(),
            token: new_token(),
        };
        let (device, hash) = (session.device.clone(), token_hash(&session.token));
        let (domain, handle) = (
            user.domain().as_str().to_owned(),
            user.handle().as_str().to_owned(),
        );
        let outcome = self
            .store
            .write(move |c| {
                let exists: Option<i64> = c
                    .query_row(
                        "SELECT 1 FROM users WHERE domain = ?1 AND handle = ?2",
                        params![domain, handle],
                        |r| r.get(0),
                    )
                    .optional()?;
                if exists.is_some() {
                    return Ok(Err("user_exists"));
                }
                if let Some(code) = &invite {
                    let used = c.execute(
                        "INSERT OR IGNORE INTO invites_used VALUES (?1, ?2, ?3)",
                        params![domain, code, now_ms()],
                    )?;
                    if used == 0 {
                        return Ok(Err("invalid_invite"));
                    }
                }
                c.execute(
                    "INSERT INTO users VALUES (?1, ?2, ?3, ?4)",
                    params![domain, handle, password_hash, now_ms()],
                )?;
                insert_device(c, &device, &domain, &handle, &name, &signature_key, &hash)?;
                Ok(Ok(()))
            })
            .await?;
        match outcome {
            Ok(()) => {
                tracing::info!(%user, device = %session.device, "registered");
                Ok(session)
            }
            Err("user_exists") => Err(ServiceError::conflict(
                "user_exists",
                format!("{user} is already registered"),
            )),
            Err(_) => Err(ServiceError::forbidden(
                "invalid_invite",
                "this invite code was already used",
            )),
        }
    }

    /// `POST /v1/sessions`: a further device for an existing user. The user's other devices get
    /// a `devices` queue entry in the same transaction (pushed via `push`), so they add the new
    /// device to their rooms.
    pub async fn login(
        &self,
        user: &str,
        password: String,
        device_name: Option<&str>,
        signature_key: Vec<u8>,
        push: &Arc<PushRegistry>,
    ) -> ServiceResult<NewSession> {
        let (user, name) = self.check_enrolment(user, device_name, &signature_key)?;
        let denied = || ServiceError::Unauthorized("wrong user or password".into());
        let (domain, handle) = (
            user.domain().as_str().to_owned(),
            user.handle().as_str().to_owned(),
        );
        let (d2, h2) = (domain.clone(), handle.clone());
        let stored: Option<(String, i64)> = self
            .store
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT password_hash, (SELECT COUNT(*) FROM devices WHERE domain = ?1 AND handle = ?2)
                     FROM users WHERE domain = ?1 AND handle = ?2",
                    params![d2, h2],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?)
            })
            .await?;
        let Some((hash, devices)) = stored else {
            return Err(denied());
        };
        if hash == NO_PASSWORD || !verify_password(password, hash).await {
            if !self.login_failures.allow(&user.to_string()) {
                return Err(ServiceError::RateLimited(
                    "too many failed logins, try again later".into(),
                ));
            }
            return Err(denied());
        }
        if devices as usize >= self.config.limits.max_devices_per_user {
            return Err(ServiceError::conflict(
                "too_many_devices",
                "this user has the maximum number of devices: remove one first",
            ));
        }
        let session = NewSession {
            device: new_device_id(),
            token: new_token(),
        };
        let (device, th) = (session.device.clone(), token_hash(&session.token));
        // Every device of the user (the new one too, harmlessly) learns of the change.
        let expires_at = self.signal_expiry(&user);
        let push = push.clone();
        self.store
            .write_then(
                move |c| {
                    insert_device(c, &device, &domain, &handle, &name, &signature_key, &th)?;
                    signal_device_change(c, &domain, &handle, expires_at)
                },
                move |stored: &Vec<Stored>| push.push(stored),
            )
            .await?;
        tracing::info!(%user, device = %session.device, "device logged in");
        Ok(session)
    }

    /// When a device-change signal expires unread: after the retention of the user's domain,
    /// like any queue entry.
    fn signal_expiry(&self, user: &UserId) -> u64 {
        now_ms().saturating_add(self.config.retention_ms(user.domain().as_str()))
    }

    /// Resolves a bearer token to its device and charges the device's request rate.
    pub async fn authenticate(&self, token: &str) -> ServiceResult<AuthDevice> {
        let device = self.lookup_token(token).await?;
        if !self.requests.allow(device.device.as_str()) {
            return Err(ServiceError::RateLimited(
                "this device is making requests too fast; slow down and retry".into(),
            ));
        }
        Ok(device)
    }

    /// Resolves a bearer token to its device (cached in memory after the first lookup).
    async fn lookup_token(&self, token: &str) -> ServiceResult<AuthDevice> {
        let hash = token_hash(token);
        if let Some(found) = self.tokens.read().ok().and_then(|t| t.get(&hash).cloned()) {
            return Ok(found);
        }
        let row: Option<(String, String, String)> = self
            .store
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT device_id, domain, handle FROM devices WHERE token_hash = ?1",
                    params![hash.to_vec()],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?)
            })
            .await?;
        let (device, domain, handle) =
            row.ok_or_else(|| ServiceError::Unauthorized("unknown or revoked token".into()))?;
        let auth = AuthDevice {
            device: DeviceId::parse(&device).map_err(|e| ServiceError::Internal(e.to_string()))?,
            user: UserId::parse(&format!("{handle}@{domain}"))
                .map_err(|e| ServiceError::Internal(e.to_string()))?,
        };
        if let Ok(mut cache) = self.tokens.write() {
            cache.insert(hash, auth.clone());
        }
        Ok(auth)
    }

    /// `GET /v1/users/{user}/devices` and `GET /v1/devices`.
    pub async fn devices(&self, user: &UserId) -> ServiceResult<Vec<DeviceInfo>> {
        let (domain, handle) = (
            user.domain().as_str().to_owned(),
            user.handle().as_str().to_owned(),
        );
        let (exists, devices) = self
            .store
            .read(move |c| {
                let exists = c
                    .query_row(
                        "SELECT 1 FROM users WHERE domain = ?1 AND handle = ?2",
                        params![domain, handle],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                let mut st = c.prepare(
                    "SELECT device_id, name, signature_key, created_at FROM devices
                     WHERE domain = ?1 AND handle = ?2 ORDER BY created_at, device_id",
                )?;
                let rows = st.query_map(params![domain, handle], |r| {
                    Ok(DeviceInfo {
                        device_id: r.get(0)?,
                        name: r.get(1)?,
                        signature_key: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                })?;
                Ok((exists, rows.collect::<Result<Vec<_>, _>>()?))
            })
            .await?;
        if !exists {
            return Err(ServiceError::not_found(
                "unknown_user",
                format!("no such user {user}"),
            ));
        }
        Ok(devices)
    }

    /// The registered signature key of a device, if the device exists and belongs to `uri.user`.
    pub async fn device_key(&self, uri: &DeviceUri) -> ServiceResult<Option<Vec<u8>>> {
        let (device, domain, handle) = (
            uri.device.as_str().to_owned(),
            uri.user.domain().as_str().to_owned(),
            uri.user.handle().as_str().to_owned(),
        );
        Ok(self
            .store
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT signature_key FROM devices WHERE device_id = ?1 AND domain = ?2 AND handle = ?3",
                    params![device, domain, handle],
                    |r| r.get(0),
                )
                .optional()?)
            })
            .await?)
    }

    /// `DELETE /v1/devices/{id}`: removes one of the caller's user's devices and revokes its
    /// token. The user's remaining devices get a `devices` queue entry in the same transaction,
    /// so they remove any leaf the device still has in their rooms.
    pub async fn remove_device(
        &self,
        caller: &AuthDevice,
        device: &str,
        push: &Arc<PushRegistry>,
    ) -> ServiceResult<()> {
        let device = DeviceId::parse(device)
            .map_err(|e| ServiceError::bad("invalid_device", e.to_string()))?;
        let (domain, handle) = (
            caller.user.domain().as_str().to_owned(),
            caller.user.handle().as_str().to_owned(),
        );
        let d = device.as_str().to_owned();
        let gone = d.clone();
        let expires_at = self.signal_expiry(&caller.user);
        let push = push.clone();
        let removed = self
            .store
            .write_then(
                move |c| {
                    let n = c.execute(
                        "DELETE FROM devices WHERE device_id = ?1 AND domain = ?2 AND handle = ?3",
                        params![d, domain, handle],
                    )?;
                    if n == 0 {
                        return Ok(None);
                    }
                    c.execute("DELETE FROM key_packages WHERE device_id = ?1", params![d])?;
                    c.execute("DELETE FROM queue WHERE device_id = ?1", params![d])?;
                    signal_device_change(c, &domain, &handle, expires_at).map(Some)
                },
                move |stored: &Option<Vec<Stored>>| {
                    push.push(stored.as_deref().unwrap_or(&[]));
                    if stored.is_some() {
                        push.disconnect(&gone);
                    }
                },
            )
            .await?
            .is_some();
        if !removed {
            return Err(unknown_device(&caller.user, &device));
        }
        if let Ok(mut cache) = self.tokens.write() {
            cache.retain(|_, a| a.device != device);
        }
        Ok(())
    }

    /// `POST /v1/key-packages`.
    pub async fn upload_key_packages(
        &self,
        caller: &AuthDevice,
        packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> ServiceResult<KeyPackageCount> {
        let limits = &self.config.limits;
        if packages.len() > limits.max_key_packages_per_upload {
            return Err(ServiceError::too_large(
                "too_many_key_packages",
                format!(
                    "at most {} KeyPackages per upload",
                    limits.max_key_packages_per_upload
                ),
            ));
        }
        let registered = self
            .device_key(&caller.uri())
            .await?
            .ok_or_else(|| ServiceError::Unauthorized("device no longer exists".into()))?;
        for bytes in packages.iter().chain(last_resort.iter()) {
            let leaf = validate_key_package(bytes)
                .map_err(|e| ServiceError::bad("invalid_key_package", e.to_string()))?;
            if leaf.device != caller.uri() || leaf.signature_key != registered {
                return Err(ServiceError::bad(
                    "invalid_key_package",
                    "a KeyPackage's credential or signature key is not this device's",
                ));
            }
        }
        let device = caller.device.as_str().to_owned();
        let max = limits.max_stored_key_packages as i64;
        let stored = self
            .store
            .write(move |c| {
                let have: i64 = c.query_row(
                    "SELECT COUNT(*) FROM key_packages WHERE device_id = ?1 AND last_resort = 0",
                    params![device],
                    |r| r.get(0),
                )?;
                if have + packages.len() as i64 > max {
                    return Ok(None);
                }
                for kp in &packages {
                    c.execute(
                        "INSERT INTO key_packages (device_id, data, last_resort) VALUES (?1, ?2, 0)",
                        params![device, kp],
                    )?;
                }
                if let Some(kp) = &last_resort {
                    c.execute(
                        "DELETE FROM key_packages WHERE device_id = ?1 AND last_resort = 1",
                        params![device],
                    )?;
                    c.execute(
                        "INSERT INTO key_packages (device_id, data, last_resort) VALUES (?1, ?2, 1)",
                        params![device, kp],
                    )?;
                }
                count_key_packages(c, &device).map(Some)
            })
            .await?;
        stored.ok_or_else(|| {
            ServiceError::too_large(
                "too_many_key_packages",
                format!(
                    "a device may hold at most {} unused KeyPackages",
                    limits.max_stored_key_packages
                ),
            )
        })
    }

    /// `GET /v1/key-packages`.
    pub async fn key_package_count(&self, caller: &AuthDevice) -> ServiceResult<KeyPackageCount> {
        let device = caller.device.as_str().to_owned();
        Ok(self
            .store
            .read(move |c| count_key_packages(c, &device))
            .await?)
    }

    /// `POST /v1/users/{user}/key-packages/claim`: one package per device, each consumed once;
    /// a device that has run out yields its last-resort package. With `only`, just that device's
    /// package (`?device=`), so adding one new device spends none of the others' packages.
    pub async fn claim_key_packages(
        &self,
        target: &UserId,
        only: Option<&DeviceId>,
    ) -> ServiceResult<ClaimResponse> {
        let devices = self.devices(target).await?;
        let ids: Vec<String> = devices
            .into_iter()
            .map(|d| d.device_id)
            .filter(|id| only.is_none_or(|only| only.as_str() == id))
            .collect();
        if let (Some(only), true) = (only, ids.is_empty()) {
            return Err(unknown_device(target, only));
        }
        let claimed = self
            .store
            .write(move |c| {
                let mut out = Vec::new();
                for device in ids {
                    let one_time: Option<(i64, Vec<u8>)> = c
                        .query_row(
                            "SELECT id, data FROM key_packages WHERE device_id = ?1 AND last_resort = 0
                             ORDER BY id LIMIT 1",
                            params![device],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .optional()?;
                    let data = match one_time {
                        Some((id, data)) => {
                            c.execute("DELETE FROM key_packages WHERE id = ?1", params![id])?;
                            Some(data)
                        }
                        None => c
                            .query_row(
                                "SELECT data FROM key_packages WHERE device_id = ?1 AND last_resort = 1",
                                params![device],
                                |r| r.get(0),
                            )
                            .optional()?,
                    };
                    if let Some(key_package) = data {
                        out.push(ClaimedKeyPackage {
                            device_id: device,
                            key_package,
                        });
                    }
                }
                Ok(out)
            })
            .await?;
        if claimed.is_empty() {
            return Err(ServiceError::conflict(
                "no_key_packages",
                format!("{target} has no KeyPackages available"),
            ));
        }
        Ok(ClaimResponse {
            user: target.to_string(),
            key_packages: claimed,
        })
    }
}

/// `404 unknown_device`: `user` has no device `device`.
pub fn unknown_device(user: &UserId, device: &DeviceId) -> ServiceError {
    ServiceError::not_found("unknown_device", format!("{user} has no device {device}"))
}

/// Queues a `devices` entry (no room, no data) for every device of the user, inside the
/// caller's transaction: the signal that the user's device list changed. Returns what to push.
fn signal_device_change(
    c: &rusqlite::Connection,
    domain: &str,
    handle: &str,
    expires_at: u64,
) -> Result<Vec<Stored>, StoreError> {
    let devices: Vec<String> = {
        let mut st =
            c.prepare_cached("SELECT device_id FROM devices WHERE domain = ?1 AND handle = ?2")?;
        let rows = st.query_map(params![domain, handle], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let now = now_ms();
    let data = Arc::new(Vec::new());
    let signals: Vec<Outgoing> = devices
        .into_iter()
        .map(|device| Outgoing {
            device,
            room_id: String::new(),
            kind: EntryKind::Devices,
            event: 0,
            ts: now,
            data: data.clone(),
            ratchet_tree: None,
            expires_at,
        })
        .collect();
    enqueue(c, &signals)
}

fn insert_device(
    c: &rusqlite::Connection,
    device: &DeviceId,
    domain: &str,
    handle: &str,
    name: &str,
    signature_key: &[u8],
    token_hash: &[u8; 32],
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO devices (device_id, domain, handle, name, signature_key, token_hash, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![device.as_str(), domain, handle, name, signature_key, token_hash.to_vec(), now_ms()],
    )?;
    Ok(())
}

fn count_key_packages(
    c: &rusqlite::Connection,
    device: &str,
) -> Result<KeyPackageCount, StoreError> {
    let (remaining, last): (i64, i64) = c.query_row(
        "SELECT COALESCE(SUM(last_resort = 0), 0), COALESCE(SUM(last_resort = 1), 0)
         FROM key_packages WHERE device_id = ?1",
        params![device],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(KeyPackageCount {
        remaining: remaining as u64,
        has_last_resort: last > 0,
    })
}
