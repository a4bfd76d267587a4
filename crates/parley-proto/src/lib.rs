//! Parley's protocol vocabulary: identifiers, MIMI message content and the client API's wire types.
//!
//! **Architecture invariant:** this crate does no I/O and reads no clock or randomness; callers pass
//! salts and timestamps in, so everything here is deterministic and testable in isolation.

pub mod api;
pub mod content;
pub mod ids;
pub mod markdown;
pub mod mimi;

pub use content::{
    ContentError, Expiration, Meaning, MessageId, MessageStatus, MimiContent, StatusReport,
};
pub use ids::{DeviceId, Domain, Handle, IdError, RoomId, UserId};

/// The only MLS ciphersuite Parley speaks (RFC 9420 §17.1, value 0x0001).
pub const CIPHERSUITE_NAME: &str = "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519";
