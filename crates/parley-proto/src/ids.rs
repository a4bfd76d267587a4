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
    #[error("invalid device id {0:?}: expected 1-64 characters A-Z a-z 0-9 . _ ~ -")]
    Device(String),
    #[error("invalid room {0:?}: expected mimi://HUB/r/NAME (NAME: 1-128 characters A-Z a-z 0-9 . _ ~ -)")]
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

/// A device (MIMI "client") of a user. Parley's own providers pick 16 lowercase hex characters;
/// other providers' clients may use 1-64 of `A-Z a-z 0-9 . _ ~ -`, other than `.` and `..` (docs/mimi-profile.md §1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        if is_path_segment(s, Self::MAX_LEN) {
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

/// A room: MIMI's room URI `mimi://HUB/r/NAME`, where `HUB` is the domain of the provider that
/// owns it. Rooms Parley creates have a 32-lowercase-hex `NAME`; other hubs may pick any name of
/// 1-128 characters `A-Z a-z 0-9 . _ ~ -`, other than `.` and `..` (docs/mimi-profile.md §1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId {
    /// The full URI; `hub` and `name` are views of it.
    uri: String,
    hub: Domain,
    name_start: usize,
}

impl RoomId {
    pub const MAX_NAME: usize = 128;

    pub fn new(hub: &Domain, name: &str) -> Result<Self, IdError> {
        if !is_path_segment(name, Self::MAX_NAME) {
            return Err(IdError::Room(name.to_owned()));
        }
        let uri = format!("mimi://{hub}/r/{name}");
        Ok(Self {
            name_start: uri.len() - name.len(),
            uri,
            hub: hub.clone(),
        })
    }

    /// Parses the URI `mimi://HUB/r/NAME`, or the form request paths use, `HUB/r/NAME`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let err = || IdError::Room(s.to_owned());
        let rest = s.strip_prefix("mimi://").unwrap_or(s);
        let (domain, path) = rest.split_once('/').ok_or_else(err)?;
        let name = path.strip_prefix("r/").ok_or_else(err)?;
        let hub = Domain::parse(domain).map_err(|_| err())?;
        Self::new(&hub, name).map_err(|_| err())
    }

    /// A new room at `hub` named by 16 random bytes supplied by the caller.
    pub fn from_random(hub: &Domain, bytes: [u8; 16]) -> Self {
        let name = hex::encode(bytes);
        let uri = format!("mimi://{hub}/r/{name}");
        Self {
            name_start: uri.len() - name.len(),
            uri,
            hub: hub.clone(),
        }
    }

    /// The domain of the room's hub.
    pub fn hub(&self) -> &Domain {
        &self.hub
    }

    pub fn name(&self) -> &str {
        &self.uri[self.name_start..]
    }

    /// The room URI, `mimi://HUB/r/NAME`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The URI without `mimi://`, as the draft's examples put a room into a request path.
    pub fn path_form(&self) -> &str {
        &self.uri["mimi://".len()..]
    }

    /// The MLS group id of a room Parley creates: the bytes of `mimi://HUB/g/NAME` (the draft's
    /// example). A room hubbed elsewhere may use any group id.
    pub fn parley_group_id(&self) -> Vec<u8> {
        format!("mimi://{}/g/{}", self.hub, self.name()).into_bytes()
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for RoomId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// 1..=max characters of RFC 3986's unreserved set.
/// 1..=`max` URI-unreserved characters, and not a dot segment (`.` or `..`), which URL
/// libraries fold out of request paths.
fn is_path_segment(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
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
        let room = RoomId::from_random(&hub, [7; 16]);
        let uri = room.to_string();
        assert_eq!(uri, format!("mimi://chirp.test/r/{}", "07".repeat(16)));
        assert_eq!(RoomId::parse(&uri).unwrap(), room);
        assert_eq!(RoomId::parse(room.path_form()).unwrap(), room);
        assert_eq!(room.hub(), &hub);
        assert_eq!(room.name(), "07".repeat(16));
        let foreign = RoomId::parse("mimi://indie.test/r/Club_house~1").unwrap();
        assert_eq!(foreign.name(), "Club_house~1");
        assert_eq!(
            foreign.parley_group_id(),
            b"mimi://indie.test/g/Club_house~1"
        );
        for bad in [
            "",
            "mimi://chirp.test/u/x",
            "mimi://chirp.test/r/",
            "mimi://chirp.test/r/a/b",
            "mimi://chirp.test/r/a%20b",
            // Dot segments: a URL library would fold them out of a request path.
            "mimi://chirp.test/r/.",
            "mimi://chirp.test/r/..",
            "mimi://Chirp.test/r/x",
            "https://a/r/00",
        ] {
            assert!(RoomId::parse(bad).is_err(), "{bad}");
        }
        assert!(RoomId::new(&hub, &"x".repeat(129)).is_err());
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
    fn device_ids_of_other_providers_may_use_unreserved_characters() {
        assert!(DeviceId::parse("ClientA1").is_ok());
        assert!(DeviceId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a/b", "a b", ".", "..", &"a".repeat(65)] {
            assert!(DeviceId::parse(bad).is_err(), "{bad}");
        }
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
