//! Credentials as clients send them: HTTP Basic (`Authorization: Basic base64(user:pass)`),
//! which is also what rqlite clients and curl make of `http://user:pass@host` URLs, and the
//! CLI's `--user`, `CAIRN_USER` and `CAIRN_PASSWORD`.

use std::fmt;

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

/// A username and password, from a Basic `Authorization` header or a URL's user-info.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// An `Authorization` header that is not valid Basic credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedAuthorization;

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    /// The Basic credentials of a request, `None` without an `Authorization` header.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, MalformedAuthorization> {
        match headers.get(header::AUTHORIZATION) {
            None => Ok(None),
            Some(v) => Self::from_authorization(v.as_bytes()).map(Some),
        }
    }

    /// Parses `Basic base64(user:password)` (the scheme name in any case, RFC 7617).
    pub fn from_authorization(value: &[u8]) -> Result<Self, MalformedAuthorization> {
        let value = std::str::from_utf8(value).map_err(|_| MalformedAuthorization)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(MalformedAuthorization)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(MalformedAuthorization);
        }
        let raw = BASE64
            .decode(token.trim())
            .map_err(|_| MalformedAuthorization)?;
        let text = String::from_utf8(raw).map_err(|_| MalformedAuthorization)?;
        let (user, pass) = text.split_once(':').ok_or(MalformedAuthorization)?;
        Ok(Credentials::new(user, pass))
    }

    /// The `Authorization` header value a client sends (the CLI, `--join-as`, forwarding).
    pub fn authorization(&self) -> HeaderValue {
        let token = BASE64.encode(format!("{}:{}", self.username, self.password));
        let mut v = HeaderValue::from_str(&format!("Basic {token}"))
            .expect("base64 is a valid header value");
        v.set_sensitive(true);
        v
    }

    /// Splits `http://user:pass@host:4001/x` into the URL without user-info and the
    /// (percent-decoded) credentials, as rqlite clients and curl read such URLs.
    pub fn split_url(url: &str) -> (String, Option<Credentials>) {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (Some(s), r),
            None => (None, url),
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let Some(at) = rest[..authority_end].rfind('@') else {
            return (url.to_string(), None);
        };
        let userinfo = &rest[..at];
        let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let stripped = match scheme {
            Some(s) => format!("{s}://{}", &rest[at + 1..]),
            None => rest[at + 1..].to_string(),
        };
        (
            stripped,
            Some(Credentials::new(percent_decode(user), percent_decode(pass))),
        )
    }

    /// The credentials a CLI command sends, and its host without user-info: `user:pass@` in
    /// `host` first, then `--user` (password from `CAIRN_PASSWORD`), then `CAIRN_USER` and
    /// `CAIRN_PASSWORD`. `env` looks a variable up (`|k| std::env::var(k).ok()`).
    pub fn for_cli(
        host: &str,
        user: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> (String, Option<Credentials>) {
        let (host, in_url) = Credentials::split_url(host);
        if in_url.is_some() {
            return (host, in_url);
        }
        let user = user.map(str::to_string).or_else(|| env("CAIRN_USER"));
        let creds = user.map(|u| Credentials::new(u, env("CAIRN_PASSWORD").unwrap_or_default()));
        (host, creds)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_basic_header_parsing() {
        let c = Credentials::from_authorization(b"Basic dXNlcjpwYTpzcw==").unwrap();
        assert_eq!(c, Credentials::new("user", "pa:ss"));
        let c = Credentials::from_authorization(b"basic dXNlcjo=").unwrap();
        assert_eq!(c, Credentials::new("user", ""));
        for bad in [
            &b"Bearer abc"[..],
            b"Basic",
            b"Basic !!!",
            b"Basic dXNlcg==", // "user", no colon
            b"\xff\xfe",
        ] {
            assert_eq!(
                Credentials::from_authorization(bad),
                Err(MalformedAuthorization)
            );
        }
        let c = Credentials::new("a", "b:c");
        let v = c.authorization();
        assert!(v.is_sensitive());
        assert_eq!(Credentials::from_authorization(v.as_bytes()).unwrap(), c);
    }

    #[test]
    fn test_split_url_userinfo() {
        assert_eq!(
            Credentials::split_url("http://bob:s%40cret@10.0.0.1:4001/db/query?q=1"),
            (
                "http://10.0.0.1:4001/db/query?q=1".to_string(),
                Some(Credentials::new("bob", "s@cret"))
            )
        );
        assert_eq!(
            Credentials::split_url("https://bob@host:4001"),
            (
                "https://host:4001".to_string(),
                Some(Credentials::new("bob", ""))
            )
        );
        assert_eq!(
            Credentials::split_url("http://host:4001/x@y"),
            ("http://host:4001/x@y".to_string(), None)
        );
        assert_eq!(
            Credentials::split_url("u:p@host:4001"),
            ("host:4001".to_string(), Some(Credentials::new("u", "p")))
        );
    }

    #[test]
    fn test_cli_credentials_precedence() {
        let env = |k: &str| match k {
            "CAIRN_USER" => Some("envuser".to_string()),
            "CAIRN_PASSWORD" => Some("envpw".to_string()),
            _ => None,
        };
        let none = |_: &str| None;
        assert_eq!(
            Credentials::for_cli("http://u:p@h:4001", Some("flag"), env),
            ("http://h:4001".into(), Some(Credentials::new("u", "p")))
        );
        assert_eq!(
            Credentials::for_cli("http://h:4001", Some("flag"), env),
            (
                "http://h:4001".into(),
                Some(Credentials::new("flag", "envpw"))
            )
        );
        assert_eq!(
            Credentials::for_cli("http://h:4001", None, env),
            (
                "http://h:4001".into(),
                Some(Credentials::new("envuser", "envpw"))
            )
        );
        assert_eq!(
            Credentials::for_cli("http://h:4001", None, none),
            ("http://h:4001".into(), None)
        );
    }
}
