//! The MIMI endpoint directory (`GET /.well-known/mimi-protocol-directory`, draft §5.1), and the
//! `https://` URLs operators configure peers by.

use std::collections::HashMap;

/// A provider's endpoint directory: endpoint name → URL template with one `{…}` parameter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    pub endpoints: HashMap<String, String>,
}

impl Directory {
    /// `endpoint`'s template split around its parameter: (before, after).
    pub fn template(&self, endpoint: &str) -> Option<(&str, &str)> {
        let (head, rest) = self.endpoints.get(endpoint)?.split_once('{')?;
        let (_, tail) = rest.split_once('}')?;
        Some((head, tail))
    }

    /// The URL of `endpoint` with its parameter replaced by `param` exactly as given: what may
    /// go into a path is the caller's to decide.
    pub fn fill(&self, endpoint: &str, param: &str) -> Option<String> {
        let (head, tail) = self.template(endpoint)?;
        Some(format!("{head}{param}{tail}"))
    }
}

/// `https://host[:port][/path]` → (host, port, path without trailing slash); `None` for another
/// scheme or a URL that does not parse. An IPv6 host comes without its brackets.
pub fn https_url_parts(url: &str) -> Option<(String, u16, String)> {
    let url = url::Url::parse(url)
        .ok()
        .filter(|u| u.scheme() == "https")?;
    let host = url
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = url.port_or_known_default()?;
    Some((
        host.to_owned(),
        port,
        url.path().trim_end_matches('/').to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_and_directory_templates() {
        assert_eq!(
            https_url_parts("https://127.0.0.1:8421"),
            Some(("127.0.0.1".into(), 8421, String::new()))
        );
        assert_eq!(
            https_url_parts("https://wave.example/mimi/"),
            Some(("wave.example".into(), 443, "/mimi".into()))
        );
        assert_eq!(
            https_url_parts("https://[::1]:9/"),
            Some(("::1".into(), 9, String::new()))
        );
        assert_eq!(https_url_parts("http://x"), None);
        assert_eq!(https_url_parts("https://x:notaport"), None);
        let d = Directory {
            endpoints: [(
                "notify".to_string(),
                "https://w.test/v1/notify/{roomId}".to_string(),
            )]
            .into(),
        };
        assert_eq!(
            d.template("notify"),
            Some(("https://w.test/v1/notify/", ""))
        );
        assert_eq!(
            d.fill("notify", "w.test/r/x").as_deref(),
            Some("https://w.test/v1/notify/w.test/r/x")
        );
        assert_eq!(d.fill("update", "x"), None);
    }
}
