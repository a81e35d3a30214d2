//! Which browser origins may open `/ws` (`--allowed-origins`): a page elsewhere must not read
//! the readings with a visitor's browser.

use axum::http::{HeaderMap, header};

use crate::error::{Error, Result};

/// Which browser origins may open `/ws`.
#[derive(Debug, Default)]
pub(crate) struct Origins {
    allowed: Vec<String>,
}

impl Origins {
    pub(crate) fn new(allowed: &[String]) -> Result<Self> {
        let mut list = Vec::new();
        for origin in allowed.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            let valid = ["http://", "https://"].iter().any(|scheme| {
                origin
                    .strip_prefix(scheme)
                    .is_some_and(|host| !host.is_empty() && !host.contains('/'))
            });
            if !valid {
                return Err(Error::BadOrigin(origin));
            }
            list.push(origin);
        }
        Ok(Self { allowed: list })
    }

    /// No Origin header (not a browser): allowed. Same host as the request: allowed. Listed: allowed.
    pub(crate) fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.to_ascii_lowercase();
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if let (Some(origin_host), Some(host)) = (origin_host, host) {
            if origin_host == host {
                return true;
            }
        }
        self.allowed.contains(&origin)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn same_origin_and_listed_origins_only() {
        let o = Origins::new(&["https://Sensors.example.org/".to_owned()]).unwrap();
        assert!(o.allows(&headers(None, "gw:8080")));
        assert!(o.allows(&headers(Some("http://gw:8080"), "gw:8080")));
        assert!(o.allows(&headers(Some("https://sensors.example.org"), "gw:8080")));
        assert!(!o.allows(&headers(Some("http://evil.example"), "gw:8080")));
        assert!(!o.allows(&headers(Some("http://gw:8081"), "gw:8080")));
        assert!(!o.allows(&headers(Some("null"), "gw:8080")));
    }

    #[test]
    fn rejects_non_origins_in_the_allow_list() {
        for bad in ["example.org", "https://", "https://a/b", "ftp://x"] {
            assert!(Origins::new(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
