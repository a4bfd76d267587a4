//! Parley's device side: MLS state over openmls, the durable profile, the client API client, and
//! [`Device`], the high-level API the CLI drives.
//!
//! Layering: [`api`] talks HTTP/WebSocket and knows nothing of MLS; [`mls`] is pure MLS over the
//! profile database with no network I/O; [`profile`] is Parley's own bookkeeping; [`device`]
//! combines them into the protocol of `docs/client-api.md`.

pub mod api;
pub mod device;
pub mod error;
pub mod media;
pub mod mls;
pub mod profile;

pub use api::{ApiClient, Push, PushConnection, PushOptions};
pub use device::{
    Device, Event, Live, ReceiptStatus, RoomSummary, SendOptions, SentFile, SentMessage,
    TYPING_SHOWN_FOR,
};
pub use error::{ClientError, Result};
pub use profile::{HistoryEntry, Reaction};

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

/// Identifiers that travel in their `Display` form and parse back.
pub(crate) trait Parse: Sized {
    fn parse_str(s: &str) -> Option<Self>;
}

impl Parse for parley_proto::RoomId {
    fn parse_str(s: &str) -> Option<Self> {
        Self::parse(s).ok()
    }
}

impl Parse for parley_proto::UserId {
    fn parse_str(s: &str) -> Option<Self> {
        Self::parse(s).ok()
    }
}

impl Parse for parley_proto::MessageId {
    fn parse_str(s: &str) -> Option<Self> {
        Self::from_hex(s)
    }
}

fn parse_or_error<T: Parse, E: serde::de::Error>(s: &str) -> std::result::Result<T, E> {
    T::parse_str(s).ok_or_else(|| E::custom(format!("invalid identifier {s:?}")))
}

/// The inverse of [`display`].
pub(crate) fn parsed<'de, T: Parse, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<T, D::Error> {
    let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
    parse_or_error(&s)
}

/// The inverse of [`display_opt`].
pub(crate) fn parsed_opt<'de, T: Parse, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    let s = <Option<std::borrow::Cow<'de, str>> as serde::Deserialize>::deserialize(d)?;
    s.map(|s| parse_or_error(&s)).transpose()
}

/// The inverse of [`display_seq`].
pub(crate) fn parsed_seq<'de, T: Parse, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<T>, D::Error> {
    let items = <Vec<String> as serde::Deserialize>::deserialize(d)?;
    items.iter().map(|s| parse_or_error(s)).collect()
}
