//! The client's error type: one enum whose `Display` is a one-line message fit for a terminal.

use parley_proto::api::ErrorBody;
use parley_proto::{DeviceId, MessageId, RoomId, UserId};

/// The server's error code for a request refused for lack of another user's consent.
const NO_CONSENT: &str = "no_consent";
/// The server's error code for an attachment over the domain's upload limit.
const ASSET_TOO_LARGE: &str = "asset_too_large";

/// Shorthand for results in this crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Everything that can go wrong on the device side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with an error body (`{"error", "message", "retryable"}`).
    #[error("server refused the request ({status} {code}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        retryable: bool,
    },
    /// The server refused for lack of another user's consent (`403 no_consent`): a claim of the
    /// KeyPackages of a user of another provider who has not accepted our contact request (or
    /// blocked us), or a message to a direct room whose other user blocked us. Carries the
    /// server's message. `Device::contact_request` asks for consent.
    #[error("server refused the request (403 no_consent): {0}")]
    NoConsent(String),
    /// The server no longer knows this device's token: the device was removed from its
    /// account (`parley account remove-device` on another device). Its profile is unusable.
    #[error("this device was removed from its account (the server revoked its access); log in again with a new profile")]
    DeviceRemoved,
    /// The user has no device with this id.
    #[error("your account has no device {0}; `parley account devices` lists them")]
    UnknownDevice(DeviceId),
    /// The provider refused an attachment as larger than its users may upload
    /// (`413 asset_too_large`). Carries the server's message, which names the limit.
    #[error("the file is too large for your provider: {0}")]
    AttachmentTooLarge(String),
    /// A file could not be sent or received (see [`crate::media::MediaError`]).
    #[error(transparent)]
    Media(#[from] crate::media::MediaError),
    /// The server could not be reached, or the connection broke mid-request.
    #[error("{0}")]
    Unreachable(String),
    /// The profile holds no account yet.
    #[error("this profile has no account yet: register or log in first")]
    NotRegistered,
    /// `register`/`login` into a profile that already holds an account.
    #[error("this profile already holds the account {0}; use a different profile directory")]
    AlreadyRegistered(String),
    /// The device is not (or no longer) a member of the room's MLS group.
    #[error("this device is not a member of room {0}")]
    NotMember(RoomId),
    /// The room is not known to this device.
    #[error("unknown room {0}")]
    UnknownRoom(RoomId),
    /// No message (or reaction) with this id, or id prefix, is in the room's local history:
    /// never received here, expired, or another room's.
    #[error("no message {id} in room {room}")]
    UnknownMessage { room: RoomId, id: String },
    /// An id prefix that fits several messages of the room.
    #[error("{prefix} fits several messages in room {room}; give more of the id")]
    AmbiguousMessage { room: RoomId, prefix: String },
    /// Only a message's author may edit or delete it (and only a reaction's author remove it).
    #[error("message {id} is by {author}; only its author may {action} it")]
    NotAuthor {
        id: MessageId,
        author: UserId,
        action: &'static str,
    },
    /// The room's policy does not allow it, as this device reads the room's state (its hub
    /// enforces the same rules, docs/mimi-profile.md §4): `code` is what the hub would answer
    /// (`not_admin`, `policy`), so callers treat both refusals alike.
    #[error("{message}")]
    Policy { code: &'static str, message: String },
    /// openmls refused an operation or a message.
    #[error("MLS error: {0}")]
    Mls(String),
    /// The profile database failed.
    #[error("profile storage error: {0}")]
    Storage(String),
    /// The caller passed something unusable (bad identifier, bad CA file, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// The server or a peer sent something that breaks the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Builds a [`ClientError::Api`] from the server's error body, or the typed variant of the
    /// few errors callers act on ([`ClientError::NoConsent`] for `403 no_consent`).
    pub fn from_body(status: u16, body: ErrorBody) -> Self {
        if status == 403 && body.error == NO_CONSENT {
            return Self::NoConsent(body.message);
        }
        if status == 413 && body.error == ASSET_TOO_LARGE {
            return Self::AttachmentTooLarge(body.message);
        }
        Self::Api {
            status,
            code: body.error,
            message: body.message,
            retryable: body.retryable,
        }
    }

    /// The server's error code (`wrong_epoch`, `not_member`, `no_consent`, ...), if the server
    /// refused the request (or, for [`ClientError::Policy`], would have).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            Self::NoConsent(_) => Some(NO_CONSENT),
            Self::AttachmentTooLarge(_) => Some(ASSET_TOO_LARGE),
            Self::Policy { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the server said trying again (after a sync) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Api {
                retryable: true,
                ..
            }
        )
    }

    /// The hub refused a commit or message because the room moved to a newer epoch.
    pub fn is_wrong_epoch(&self) -> bool {
        self.code() == Some("wrong_epoch")
    }

    /// The hub refused a commit because it leaves out pending proposals (a member leaving).
    pub fn is_pending_proposals(&self) -> bool {
        self.code() == Some("pending_proposals")
    }

    /// A retryable refusal that syncing resolves: the room moved on, or a proposal arrived.
    pub fn needs_sync(&self) -> bool {
        self.is_wrong_epoch() || self.is_pending_proposals()
    }

    /// A refusal by the room's policy that needs an admin (`403 not_admin` at the hub).
    pub(crate) fn not_admin(message: String) -> Self {
        Self::Policy {
            code: "not_admin",
            message,
        }
    }

    /// Any other refusal by the room's policy (`403 policy` at the hub).
    pub(crate) fn policy(message: String) -> Self {
        Self::Policy {
            code: "policy",
            message,
        }
    }

    pub(crate) fn mls(context: &str, e: impl std::fmt::Display) -> Self {
        Self::Mls(format!("{context}: {e}"))
    }
}

impl From<rusqlite::Error> for ClientError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_expose_code_and_retryability() {
        let e = ClientError::from_body(
            409,
            ErrorBody {
                error: "wrong_epoch".into(),
                message: "the room is at epoch 3".into(),
                retryable: true,
            },
        );
        assert!(e.is_wrong_epoch() && e.is_retryable() && e.needs_sync());
        let pending = ClientError::from_body(
            409,
            ErrorBody {
                error: "pending_proposals".into(),
                message: "a member asked to leave".into(),
                retryable: true,
            },
        );
        assert!(pending.is_pending_proposals() && pending.needs_sync());
        assert!(!pending.is_wrong_epoch());
        assert_eq!(
            e.to_string(),
            "server refused the request (409 wrong_epoch): the room is at epoch 3"
        );
        assert!(!ClientError::NotRegistered.is_retryable());
    }

    fn body(error: &str, message: &str) -> ErrorBody {
        ErrorBody {
            error: error.into(),
            message: message.into(),
            retryable: false,
        }
    }

    #[test]
    fn no_consent_is_a_typed_error() {
        let e = ClientError::from_body(403, body("no_consent", "bob@wave.test has not consented"));
        assert!(
            matches!(&e, ClientError::NoConsent(m) if m == "bob@wave.test has not consented"),
            "{e:?}"
        );
        assert_eq!(e.code(), Some("no_consent"));
        assert!(!e.is_retryable() && !e.needs_sync());
        assert_eq!(
            e.to_string(),
            "server refused the request (403 no_consent): bob@wave.test has not consented"
        );
        // Only the 403 with that code: other refusals stay generic.
        let other = ClientError::from_body(403, body("not_member", "not in the room"));
        assert!(
            matches!(other, ClientError::Api { status: 403, .. }),
            "{other:?}"
        );
        let big = ClientError::from_body(413, body("asset_too_large", "limited to 8 bytes"));
        assert!(
            matches!(&big, ClientError::AttachmentTooLarge(m) if m == "limited to 8 bytes"),
            "{big:?}"
        );
        assert_eq!(
            big.to_string(),
            "the file is too large for your provider: limited to 8 bytes"
        );
        let odd = ClientError::from_body(409, body("no_consent", "?"));
        assert!(
            matches!(odd, ClientError::Api { status: 409, .. }),
            "{odd:?}"
        );
    }
}
