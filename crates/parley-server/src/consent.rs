//! Consent before first contact (MIMI `requestConsent` / `updateConsent`). Owns `consent`.
//!
//! A row `(requester, target, state)` is the target's stance on the requester fetching the
//! target's key material (which adding them to a room needs) and on receiving the requester's
//! messages. It is authoritative for local targets; for local requesters of remote targets it
//! mirrors what the target's provider told us. Users of the domains one deployment hosts count
//! as one provider and need no consent between them.

use crate::accounts::AuthDevice;
use crate::clock::now_ms;
use crate::config::ServerConfig;
use crate::error::{ServiceError, ServiceResult};
use crate::limits::RateLimiter;
use crate::outbox::{self, Outbox, OutboxItem};
use crate::store::{Store, StoreError};
use parley_proto::api::{ContactDirection, ContactInfo, ContactState};
use parley_proto::mimi::{Body, ConsentEntry, ConsentOperation};
use parley_proto::{Domain, UserId};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

fn state_name(s: ContactState) -> &'static str {
    match s {
        ContactState::Pending => "pending",
        ContactState::Granted => "granted",
        ContactState::Blocked => "blocked",
    }
}

fn state_from(s: &str) -> ContactState {
    match s {
        "granted" => ContactState::Granted,
        "blocked" => ContactState::Blocked,
        _ => ContactState::Pending,
    }
}

fn read_state(
    c: &Connection,
    requester: &str,
    target: &str,
) -> Result<Option<ContactState>, StoreError> {
    Ok(
        c.prepare_cached("SELECT state FROM consent WHERE requester = ?1 AND target = ?2")?
            .query_row(params![requester, target], |r| r.get::<_, String>(0))
            .optional()?
            .map(|s| state_from(&s)),
    )
}

fn write_state(
    c: &Connection,
    requester: &str,
    target: &str,
    state: ContactState,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO consent (requester, target, state, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (requester, target) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
    )?
    .execute(params![requester, target, state_name(state), now_ms() as i64])?;
    Ok(())
}

pub struct Consent {
    store: Store,
    config: Arc<ServerConfig>,
    outbox: Arc<Outbox>,
    requests: RateLimiter,
    /// `(sender, recipient)` pairs where the recipient blocked the sender; small, read on
    /// every fan-out, so kept in memory.
    blocks: RwLock<HashSet<(String, String)>>,
}

impl Consent {
    pub async fn new(
        store: Store,
        config: Arc<ServerConfig>,
        outbox: Arc<Outbox>,
    ) -> Result<Self, StoreError> {
        let blocks = store
            .read(|c| {
                let mut st =
                    c.prepare("SELECT requester, target FROM consent WHERE state = 'blocked'")?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(rows.collect::<Result<HashSet<_>, _>>()?)
            })
            .await?;
        Ok(Self {
            requests: RateLimiter::per_minute(config.limits.contact_requests_per_minute),
            store,
            config,
            outbox,
            blocks: RwLock::new(blocks),
        })
    }

    fn is_local(&self, user: &UserId) -> bool {
        self.config.hosts(user.domain().as_str())
    }

    /// Whether `recipient` blocked `sender`.
    pub fn blocked(&self, sender: &UserId, recipient: &UserId) -> bool {
        self.blocks.read().is_ok_and(|b| {
            !b.is_empty() && b.contains(&(sender.to_string(), recipient.to_string()))
        })
    }

    /// Whether `requester` may fetch `target`'s key material (add them, message them).
    pub async fn allows(&self, requester: &UserId, target: &UserId) -> ServiceResult<bool> {
        if self.blocked(requester, target) {
            return Ok(false);
        }
        if self.is_local(requester) && self.is_local(target) {
            return Ok(true);
        }
        let (r, t) = (requester.to_string(), target.to_string());
        let state = self.store.read(move |c| read_state(c, &r, &t)).await?;
        Ok(state == Some(ContactState::Granted))
    }

    /// `POST /v1/contacts/{user}/request`: ask `other` for consent. Idempotent. Also grants
    /// `other` consent to contact the caller (a bilateral connection, as the draft suggests).
    pub async fn request(&self, me: &AuthDevice, other: &str) -> ServiceResult<ContactInfo> {
        let other = parse_user(other)?;
        if other == me.user {
            return Err(ServiceError::bad(
                "invalid_user",
                "you cannot ask yourself for consent",
            ));
        }
        let info = |state| ContactInfo {
            user: other.to_string(),
            direction: ContactDirection::Outgoing,
            state,
        };
        if self.is_local(&other) {
            return Ok(info(ContactState::Granted));
        }
        let (mine, theirs) = (me.user.to_string(), other.to_string());
        let current = {
            let (m, t) = (mine.clone(), theirs.clone());
            self.store.read(move |c| read_state(c, &m, &t)).await?
        };
        if let Some(state @ (ContactState::Granted | ContactState::Blocked)) = current {
            return Ok(info(state));
        }
        if !self.requests.allow(&mine) {
            return Err(ServiceError::RateLimited(
                "too many contact requests; try again in a minute".into(),
            ));
        }
        let entry = ConsentEntry::new(
            ConsentOperation::Request,
            &me.user.to_uri(),
            &other.to_uri(),
        );
        let item = OutboxItem {
            peer: other.domain().to_string(),
            as_domain: me.user.domain().to_string(),
            endpoint: outbox::REQUEST_CONSENT,
            param: other.domain().to_string(),
            body: entry.encode(),
            expires_at: None,
        };
        self.store
            .write(move |c| {
                write_state(c, &mine, &theirs, ContactState::Pending)?;
                if read_state(c, &theirs, &mine)? != Some(ContactState::Blocked) {
                    write_state(c, &theirs, &mine, ContactState::Granted)?;
                }
                outbox::insert(c, &[item])
            })
            .await?;
        self.outbox.wake(other.domain().as_str());
        tracing::info!(from = %me.user, to = %other, "contact request sent");
        Ok(info(ContactState::Pending))
    }

    /// `GET /v1/contacts/requests`: requests to the caller that await an answer.
    pub async fn pending_for(&self, me: &AuthDevice) -> ServiceResult<Vec<ContactInfo>> {
        let target = me.user.to_string();
        let requesters: Vec<String> = self
            .store
            .read(move |c| {
                let mut st = c.prepare(
                    "SELECT requester FROM consent WHERE target = ?1 AND state = 'pending'
                     ORDER BY updated_at, requester",
                )?;
                let rows = st.query_map(params![target], |r| r.get(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await?;
        Ok(requesters
            .into_iter()
            .map(|user| ContactInfo {
                user,
                direction: ContactDirection::Incoming,
                state: ContactState::Pending,
            })
            .collect())
    }

    /// `GET /v1/contacts/blocked`: the users the caller's user blocked.
    pub async fn blocked_by(&self, me: &AuthDevice) -> ServiceResult<Vec<ContactInfo>> {
        let target = me.user.to_string();
        let blocked: Vec<String> = self
            .store
            .read(move |c| {
                let mut st = c.prepare(
                    "SELECT requester FROM consent WHERE target = ?1 AND state = 'blocked'
                     ORDER BY requester",
                )?;
                let rows = st.query_map(params![target], |r| r.get(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await?;
        Ok(blocked
            .into_iter()
            .map(|user| ContactInfo {
                user,
                direction: ContactDirection::Incoming,
                state: ContactState::Blocked,
            })
            .collect())
    }

    /// `POST /v1/contacts/{user}/accept` and `…/block`: the caller's answer to `other`.
    pub async fn answer(
        &self,
        me: &AuthDevice,
        other: &str,
        state: ContactState,
    ) -> ServiceResult<ContactInfo> {
        let other = parse_user(other)?;
        if other == me.user {
            return Err(ServiceError::bad("invalid_user", "that is yourself"));
        }
        let op = match state {
            ContactState::Granted => ConsentOperation::Grant,
            _ => ConsentOperation::Revoke,
        };
        let item = (!self.is_local(&other)).then(|| OutboxItem {
            peer: other.domain().to_string(),
            as_domain: me.user.domain().to_string(),
            endpoint: outbox::UPDATE_CONSENT,
            param: other.domain().to_string(),
            body: ConsentEntry::new(op, &other.to_uri(), &me.user.to_uri()).encode(),
            expires_at: None,
        });
        let (requester, target) = (other.to_string(), me.user.to_string());
        let queued = item.is_some();
        {
            let (r, t) = (requester.clone(), target.clone());
            self.store
                .write(move |c| {
                    write_state(c, &r, &t, state)?;
                    match item {
                        Some(item) => outbox::insert(c, &[item]),
                        None => Ok(()),
                    }
                })
                .await?;
        }
        self.remember_block(requester, target, state == ContactState::Blocked);
        if queued {
            self.outbox.wake(other.domain().as_str());
        }
        tracing::info!(user = %me.user, other = %other, state = state_name(state), "contact answered");
        Ok(ContactInfo {
            user: other.to_string(),
            direction: ContactDirection::Incoming,
            state,
        })
    }

    fn remember_block(&self, requester: String, target: String, blocked: bool) {
        if let Ok(mut b) = self.blocks.write() {
            if blocked {
                b.insert((requester, target));
            } else {
                b.remove(&(requester, target));
            }
        }
    }

    /// `requestConsent/{targetDomain}` from `peer`: a request (or its cancellation) from a user
    /// of the peer to one of ours. Unknown targets are accepted silently (no user enumeration).
    pub async fn on_request(&self, peer: &Domain, entry: ConsentEntry) -> ServiceResult<()> {
        let (requester, target) = parties(&entry)?;
        if requester.domain() != peer {
            return Err(ServiceError::forbidden(
                "peer_domain_mismatch",
                format!("{peer} may not ask on behalf of {requester}"),
            ));
        }
        if !self.is_local(&target) {
            return Err(ServiceError::not_found(
                "unknown_domain",
                format!("this provider does not host {}", target.domain()),
            ));
        }
        let (r, t) = (requester.to_string(), target.to_string());
        match Some(entry.operation) {
            Some(ConsentOperation::Request) => {
                self.store
                    .write(move |c| {
                        if read_state(c, &r, &t)?.is_none() {
                            write_state(c, &r, &t, ContactState::Pending)?;
                        }
                        Ok(())
                    })
                    .await?;
                tracing::info!(from = %requester, to = %target, "contact request received");
            }
            Some(ConsentOperation::Cancel) => {
                self.store
                    .write(move |c| {
                        c.execute(
                            "DELETE FROM consent WHERE requester = ?1 AND target = ?2 AND state = 'pending'",
                            params![r, t],
                        )?;
                        Ok(())
                    })
                    .await?;
            }
            _ => {
                return Err(ServiceError::bad(
                    "invalid_operation",
                    "requestConsent carries request or cancel",
                ))
            }
        }
        Ok(())
    }

    /// `updateConsent/{requesterDomain}` from `peer`: one of the peer's users granted or revoked
    /// consent for one of ours.
    pub async fn on_update(&self, peer: &Domain, entry: ConsentEntry) -> ServiceResult<()> {
        let (requester, target) = parties(&entry)?;
        if target.domain() != peer {
            return Err(ServiceError::forbidden(
                "peer_domain_mismatch",
                format!("{peer} may not answer on behalf of {target}"),
            ));
        }
        if !self.is_local(&requester) {
            return Err(ServiceError::not_found(
                "unknown_domain",
                format!("this provider does not host {}", requester.domain()),
            ));
        }
        let state = match Some(entry.operation) {
            Some(ConsentOperation::Grant) => ContactState::Granted,
            Some(ConsentOperation::Revoke) => ContactState::Blocked,
            _ => {
                return Err(ServiceError::bad(
                    "invalid_operation",
                    "updateConsent carries grant or revoke",
                ))
            }
        };
        let (r, t) = (requester.to_string(), target.to_string());
        {
            let (r, t) = (r.clone(), t.clone());
            self.store
                .write(move |c| write_state(c, &r, &t, state))
                .await?;
        }
        self.remember_block(r, t, state == ContactState::Blocked);
        tracing::info!(requester = %requester, target = %target, state = state_name(state), "consent updated by peer");
        Ok(())
    }
}

fn parse_user(s: &str) -> ServiceResult<UserId> {
    UserId::parse(s).map_err(|e| ServiceError::bad("invalid_user", e.to_string()))
}

fn parties(entry: &ConsentEntry) -> ServiceResult<(UserId, UserId)> {
    let uri = |u: &parley_proto::mimi::IdentifierUri| {
        u.as_str()
            .map_err(|e| ServiceError::bad("invalid_body", e.to_string()))
            .and_then(parse_user)
    };
    Ok((uri(&entry.requester_uri)?, uri(&entry.target_uri)?))
}
