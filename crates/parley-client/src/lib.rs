//! Parley's device side: MLS state over openmls, the durable profile, the client API client, and
//! [`Device`], the high-level API the CLI drives.
//!
//! Layering: [`api`] talks HTTP/WebSocket and knows nothing of MLS; [`mls`] is pure MLS over the
//! profile database with no network I/O; [`profile`] is Parley's own bookkeeping; [`device`]
//! combines them into the protocol of `docs/client-api.md`.

pub mod api;
pub mod device;
pub mod error;
pub mod mls;
pub mod profile;

pub use api::{ApiClient, PushConnection};
pub use device::{Device, Event, Live, RoomSummary, SentMessage};
pub use error::{ClientError, Result};
pub use profile::HistoryEntry;

/// Serialises a value through its `Display` form (ids, users, rooms).
pub(crate) fn display<T: std::fmt::Display, S: serde::Serializer>(
    value: &T,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// [`display`] for an optional value (`null` when absent).
pub(crate) fn display_opt<T: std::fmt::Display, S: serde::Serializer>(
    value: &Option<T>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match value {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// [`display`] for a list.
pub(crate) fn display_seq<T: std::fmt::Display, S: serde::Serializer>(
    values: &[T],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(values.iter().map(ToString::to_string))
}
