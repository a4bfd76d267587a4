//! # mimi-indie
//!
//! An independent, minimal MIMI provider (draft-ietf-mimi-protocol-06 read through Parley's
//! profile, `docs/mimi-profile.md`), written from the drafts without any Parley protocol code,
//! so that tests can show Parley interoperates with a stack it shares nothing with.
//!
//! An [`IndieProvider`] serves one domain over mutual TLS on 127.0.0.1, hosts a few users with
//! one in-memory openmls client each, and can be hub or follower of rooms. See the README.

pub mod components;
pub mod content;
mod hub;
pub mod ids;
mod inner;
pub mod mls;
mod peer;
mod provider;
mod server;
mod state;
pub mod tls;
pub mod wire;

pub use hub::Refusal;
pub use peer::PeerError;
pub use provider::{IndieError, IndieProvider, ProviderConfig, RoomView, SentNotify};
pub use state::{ConsentEvent, ReceivedMessage};
pub use tls::{DomainCerts, TestPki};
