//! MIMI identifiers as the profile fixes them (§1): users `mimi://DOMAIN/u/HANDLE`, clients
//! `mimi://DOMAIN/d/HANDLE/DEVICE`, rooms `mimi://HUB/r/NAME`, and their request-path form
//! (the URI without `mimi://`, or the whole URI percent-encoded, which axum decodes for us).

use thiserror::Error;

const SCHEME: &str = "mimi://";

/// A string that is not the identifier it should be.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("not a valid {kind} URI: {uri:?}")]
pub struct IdError {
    kind: &'static str,
    uri: String,
}

fn err(kind: &'static str, uri: &str) -> IdError {
    IdError {
        kind,
        uri: uri.chars().take(200).collect(),
    }
}

/// Splits `mimi://AUTHORITY/KIND/REST` into its parts.
fn split(uri: &str) -> Option<(&str, &str, &str)> {
    let rest = uri.strip_prefix(SCHEME)?;
    let (authority, rest) = rest.split_once('/')?;
    let (kind, rest) = rest.split_once('/')?;
    if !is_domain(authority) {
        return None;
    }
    Some((authority, kind, rest))
}

fn is_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

fn is_handle(handle: &str) -> bool {
    (1..=32).contains(&handle.len())
        && handle
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && handle.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

fn is_unreserved(value: &str, max: usize) -> bool {
    (1..=max).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

/// A user URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserUri {
    domain: String,
    handle: String,
}

impl UserUri {
    /// Parses `mimi://DOMAIN/u/HANDLE`.
    pub fn parse(uri: &str) -> Result<Self, IdError> {
        match split(uri) {
            Some((domain, "u", handle)) if is_handle(handle) => Ok(Self {
                domain: domain.to_owned(),
                handle: handle.to_owned(),
            }),
            _ => Err(err("user", uri)),
        }
    }

    /// Builds a user URI from a valid domain and handle.
    pub fn new(domain: &str, handle: &str) -> Result<Self, IdError> {
        Self::parse(&format!("{SCHEME}{domain}/u/{handle}"))
    }

    /// The provider's domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The handle.
    pub fn handle(&self) -> &str {
        &self.handle
    }
}

impl std::fmt::Display for UserUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}/u/{}", self.domain, self.handle)
    }
}

/// A client (device) URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientUri {
    user: UserUri,
    device: String,
}

impl ClientUri {
    /// Parses `mimi://DOMAIN/d/HANDLE/DEVICE`.
    pub fn parse(uri: &str) -> Result<Self, IdError> {
        let Some((domain, "d", rest)) = split(uri) else {
            return Err(err("client", uri));
        };
        match rest.split_once('/') {
            Some((handle, device)) if is_handle(handle) && is_unreserved(device, 64) => Ok(Self {
                user: UserUri {
                    domain: domain.to_owned(),
                    handle: handle.to_owned(),
                },
                device: device.to_owned(),
            }),
            _ => Err(err("client", uri)),
        }
    }

    /// The client `device` of `user`.
    pub fn new(user: &UserUri, device: &str) -> Result<Self, IdError> {
        Self::parse(&format!(
            "{SCHEME}{}/d/{}/{device}",
            user.domain, user.handle
        ))
    }

    /// The user this client belongs to.
    pub fn user(&self) -> &UserUri {
        &self.user
    }
}

impl std::fmt::Display for ClientUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{SCHEME}{}/d/{}/{}",
            self.user.domain, self.user.handle, self.device
        )
    }
}

/// A room URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomUri {
    hub: String,
    name: String,
}

impl RoomUri {
    /// Parses `mimi://HUB/r/NAME`.
    pub fn parse(uri: &str) -> Result<Self, IdError> {
        match split(uri) {
            Some((hub, "r", name)) if is_unreserved(name, 128) => Ok(Self {
                hub: hub.to_owned(),
                name: name.to_owned(),
            }),
            _ => Err(err("room", uri)),
        }
    }

    /// Builds a room URI.
    pub fn new(hub: &str, name: &str) -> Result<Self, IdError> {
        Self::parse(&format!("{SCHEME}{hub}/r/{name}"))
    }

    /// The hub's domain.
    pub fn hub(&self) -> &str {
        &self.hub
    }

    /// The MLS group id the profile uses for rooms a provider creates: `mimi://HUB/g/NAME`.
    pub fn default_group_id(&self) -> Vec<u8> {
        format!("{SCHEME}{}/g/{}", self.hub, self.name).into_bytes()
    }

    /// The form used in request paths: the URI without `mimi://`.
    pub fn path_form(&self) -> String {
        format!("{}/r/{}", self.hub, self.name)
    }
}

impl std::fmt::Display for RoomUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}/r/{}", self.hub, self.name)
    }
}

/// A (percent-decoded) path parameter back to a full URI: `chirp.test/r/x` and
/// `mimi://chirp.test/r/x` both give the latter.
pub fn uri_from_path(param: &str) -> String {
    let param = param.trim_start_matches('/');
    if param.starts_with(SCHEME) {
        param.to_owned()
    } else {
        format!("{SCHEME}{param}")
    }
}

/// A URI in request-path form (without `mimi://`).
pub fn path_form(uri: &str) -> &str {
    uri.strip_prefix(SCHEME).unwrap_or(uri)
}

/// Whether `domain` looks like a DNS domain this crate accepts.
pub fn valid_domain(domain: &str) -> bool {
    is_domain(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_profiles_forms() {
        let user = UserUri::parse("mimi://wave.test/u/bob").unwrap();
        assert_eq!(user.domain(), "wave.test");
        let client = ClientUri::parse("mimi://wave.test/d/bob/0123abcd").unwrap();
        assert_eq!(client.user(), &user);
        assert_eq!(client.to_string(), "mimi://wave.test/d/bob/0123abcd");
        let room = RoomUri::parse("mimi://chirp.test/r/clubhouse").unwrap();
        assert_eq!(room.hub(), "chirp.test");
        assert_eq!(room.path_form(), "chirp.test/r/clubhouse");
        assert_eq!(room.default_group_id(), b"mimi://chirp.test/g/clubhouse");
    }

    #[test]
    fn refuses_malformed_identifiers() {
        for bad in [
            "mimi://wave.test/u/Bob",
            "mimi://wave.test/u/",
            "mimi://wave.test/u/bob/x",
            "https://wave.test/u/bob",
            "mimi:///u/bob",
            "mimi://WAVE.test/u/bob",
        ] {
            assert!(UserUri::parse(bad).is_err(), "{bad}");
        }
        assert!(ClientUri::parse("mimi://wave.test/d/bob").is_err());
        assert!(ClientUri::parse("mimi://wave.test/d/bob/a/b").is_err());
        assert!(RoomUri::parse("mimi://chirp.test/r/a b").is_err());
    }

    #[test]
    fn path_parameters_take_both_forms() {
        assert_eq!(uri_from_path("chirp.test/r/x"), "mimi://chirp.test/r/x");
        assert_eq!(
            uri_from_path("mimi://chirp.test/r/x"),
            "mimi://chirp.test/r/x"
        );
        assert_eq!(path_form("mimi://wave.test/u/bob"), "wave.test/u/bob");
    }
}
