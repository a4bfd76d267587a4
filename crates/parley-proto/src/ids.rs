//! Validated identifiers: domains, handles, users, devices and rooms, in both the typed form people
//! use (`alice@chirp.test`) and MIMI's URI form (`mimi://chirp.test/u/alice`).

use std::fmt;
use std::str::FromStr;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "invalid domain {0:?}: use 1-253 characters a-z, 0-9, '-' and '.' in non-empty labels"
    )]
    Domain(String),
    #[error("invalid handle {0:?}: use 1-32 characters a-z, 0-9, '.', '_' or '-', starting with a letter or digit")]
    Handle(String),
    #[error("invalid user {0:?}: expected user@domain or mimi://domain/u/user")]
    User(String),
    #[error("invalid device id {0:?}: expected 16 lowercase hex characters")]
    Device(String),
    #[error("invalid room id {0:?}: expected 32 lowercase hex characters")]
    Room(String),
    #[error("invalid device URI {0:?}: expected mimi://domain/d/user/device")]
    DeviceUri(String),
}

/// A DNS-style domain naming one messaging service, e.g. `chirp.test`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(String);

impl Domain {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::Domain(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The local part of a user identifier, e.g. `alice`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(String);

impl Handle {
    pub const MAX_LEN: usize = 32;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let bytes = s.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= Self::MAX_LEN
            && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
            && bytes.iter().all(|&b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::Handle(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A user of one domain: `alice@chirp.test`, or as a URI `mimi://chirp.test/u/alice`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId {
    handle: Handle,
    domain: Domain,
}

impl UserId {
    pub fn new(handle: Handle, domain: Domain) -> Self {
        Self { handle, domain }
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// MIMI's user URI, `mimi://domain/u/handle`.
    pub fn to_uri(&self) -> String {
        format!("mimi://{}/u/{}", self.domain, self.handle.0)
    }

    /// Parses either `handle@domain` or `mimi://domain/u/handle`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let err = || IdError::User(s.to_owned());
        let (handle, domain) = if let Some(rest) = s.strip_prefix("mimi://") {
            let (domain, path) = rest.split_once('/').ok_or_else(err)?;
            (path.strip_prefix("u/").ok_or_else(err)?, domain)
        } else {
            s.split_once('@').ok_or_else(err)?
        };
        Ok(Self {
            handle: Handle::parse(handle)?,
            domain: Domain::parse(domain)?,
        })
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.handle.0, self.domain)
    }
}

impl FromStr for UserId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A device (MIMI "client") of a user: 16 lowercase hex characters chosen by its provider.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if is_lower_hex(s, 16) {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::Device(s.to_owned()))
        }
    }

    /// Builds a device id from 8 random bytes supplied by the caller.
    pub fn from_random(bytes: [u8; 8]) -> Self {
        Self(hex::encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identity one device puts in its MLS credential: `mimi://domain/d/handle/device`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceUri {
    pub user: UserId,
    pub device: DeviceId,
}

impl DeviceUri {
    pub fn new(user: UserId, device: DeviceId) -> Self {
        Self { user, device }
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let err = || IdError::DeviceUri(s.to_owned());
        let rest = s.strip_prefix("mimi://").ok_or_else(err)?;
        let mut parts = rest.split('/');
        let (Some(domain), Some("d"), Some(handle), Some(device), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(err());
        };
        Ok(Self {
            user: UserId::new(Handle::parse(handle)?, Domain::parse(domain)?),
            device: DeviceId::parse(device)?,
        })
    }
}

impl fmt::Display for DeviceUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mimi://{}/d/{}/{}",
            self.user.domain(),
            self.user.handle().as_str(),
            self.device
        )
    }
}

/// A room (one MLS group): 32 lowercase hex characters; its bytes are the MLS group id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(String);

impl RoomId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if is_lower_hex(s, 32) {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::Room(s.to_owned()))
        }
    }

    /// Builds a room id from 16 random bytes supplied by the caller.
    pub fn from_random(bytes: [u8; 16]) -> Self {
        Self(hex::encode(bytes))
    }

    /// The MLS group id of this room's group.
    pub fn group_id_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Recovers a room id from an MLS group id.
    pub fn from_group_id(bytes: &[u8]) -> Result<Self, IdError> {
        let s = std::str::from_utf8(bytes).map_err(|_| IdError::Room(hex::encode(bytes)))?;
        Self::parse(s)
    }

    /// MIMI's room URI; the hub domain is the domain of the provider that owns the room.
    pub fn to_uri(&self, hub: &Domain) -> String {
        format!("mimi://{hub}/r/{}", self.0)
    }

    /// Parses `mimi://hub/r/id` into the hub domain and the room id.
    pub fn parse_uri(s: &str) -> Result<(Domain, Self), IdError> {
        let err = || IdError::Room(s.to_owned());
        let rest = s.strip_prefix("mimi://").ok_or_else(err)?;
        let (domain, path) = rest.split_once('/').ok_or_else(err)?;
        let id = path.strip_prefix("r/").ok_or_else(err)?;
        Ok((Domain::parse(domain)?, Self::parse(id)?))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn user_forms_round_trip() {
        let u = UserId::parse("alice@chirp.test").unwrap();
        assert_eq!(u.to_uri(), "mimi://chirp.test/u/alice");
        assert_eq!(UserId::parse(&u.to_uri()).unwrap(), u);
        assert_eq!(u.to_string(), "alice@chirp.test");
    }

    #[test]
    fn room_uris_round_trip() {
        let hub = Domain::parse("chirp.test").unwrap();
        let room = RoomId::from_random([7; 16]);
        let uri = room.to_uri(&hub);
        assert_eq!(RoomId::parse_uri(&uri).unwrap(), (hub, room));
        for bad in [
            "",
            "mimi://chirp.test/u/x",
            "mimi://chirp.test/r/XY",
            "https://a/r/00",
        ] {
            assert!(RoomId::parse_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_identifiers_are_refused() {
        for bad in [
            "",
            "alice",
            "@chirp.test",
            "Alice@chirp.test",
            "alice@",
            "alice@chirp..test",
            "alice@-chirp.test",
            "al ice@chirp.test",
            "_alice@chirp.test",
            "mimi://chirp.test/r/alice",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@chirp.test",
        ] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn device_uri_round_trips() {
        let d = DeviceUri::new(
            UserId::parse("bob@wave.test").unwrap(),
            DeviceId::from_random([1, 2, 3, 4, 5, 6, 7, 8]),
        );
        assert_eq!(d.to_string(), "mimi://wave.test/d/bob/0102030405060708");
        assert_eq!(DeviceUri::parse(&d.to_string()).unwrap(), d);
        assert!(DeviceUri::parse("mimi://wave.test/d/bob/01/extra").is_err());
    }

    #[test]
    fn room_id_is_its_group_id() {
        let r = RoomId::from_random([7; 16]);
        assert_eq!(RoomId::from_group_id(r.group_id_bytes()).unwrap(), r);
        assert!(RoomId::from_group_id(&[0xff, 0xfe]).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,300}") {
            let _ = UserId::parse(&s);
            let _ = DeviceUri::parse(&s);
            let _ = RoomId::parse(&s);
            let _ = DeviceId::parse(&s);
        }

        #[test]
        fn valid_users_round_trip(h in "[a-z0-9][a-z0-9._-]{0,31}", d in "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,3}") {
            let u = UserId::parse(&format!("{h}@{d}")).unwrap();
            prop_assert_eq!(UserId::parse(&u.to_uri()).unwrap(), u.clone());
            prop_assert_eq!(u.to_string(), format!("{h}@{d}"));
        }
    }
}
