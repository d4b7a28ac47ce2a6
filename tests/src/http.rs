//! The harness's one HTTP client (ureq, blocking; HTTPS with rustls and ring when given a CA,
//! Basic credentials when given a user): used by the tests, the fault suite, the bench's SQL
//! load and the QEMU end-to-end. Statuses are never turned into errors and redirects are
//! never followed, so a test sees exactly what the node answered.
//! A [`Client`] keeps its connections alive between requests (ureq pools them, with
//! `TCP_NODELAY`), which the benchmark loops rely on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::Value as Json;

use crate::TIMEOUT;

/// An HTTP answer: status (0 when no answer came), `Location` header (if any) and the body
/// parsed as JSON (or a string: the body text, or the transport error).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub location: Option<String>,
    pub body: Json,
}

impl Reply {
    /// `200` and no statement of an rqlite `results` array answered with an `error`.
    pub fn succeeded(&self) -> bool {
        self.status == 200
            && self.body["results"]
                .as_array()
                .is_none_or(|rs| rs.iter().all(|r| r.get("error").is_none()))
    }

    /// The answer to a request that never got one.
    fn failed(e: ureq::Error) -> Reply {
        Reply {
            status: 0,
            location: None,
            body: Json::String(e.to_string()),
        }
    }
}

/// Who a [`Client`] is: Basic credentials and the CA it trusts for `https://` URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    /// (user, password), sent as Basic credentials with every request.
    pub user: Option<(String, String)>,
    /// PEM file of the CA that signed the nodes' HTTPS certificates.
    pub ca_cert: Option<PathBuf>,
}

impl Auth {
    /// These credentials, trusting the same CA.
    pub fn as_user(&self, user: &str, password: &str) -> Auth {
        Auth {
            user: Some((user.into(), password.into())),
            ca_cert: self.ca_cert.clone(),
        }
    }

    /// No credentials, trusting the same CA.
    pub fn anonymous(&self) -> Auth {
        Auth {
            user: None,
            ca_cert: self.ca_cert.clone(),
        }
    }

    /// The `Authorization` header value, if any.
    pub fn authorization(&self) -> Option<String> {
        self.user.as_ref().map(|(u, p)| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            format!("Basic {token}")
        })
    }
}

/// A blocking client; clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    authorization: Option<String>,
}

impl Default for Client {
    /// Requests may take up to [`TIMEOUT`].
    fn default() -> Client {
        Client::new(TIMEOUT, None)
    }
}

impl Client {
    /// A client whose requests give up after `timeout` (and, if given, whose connects give
    /// up after `connect`).
    pub fn new(timeout: Duration, connect: Option<Duration>) -> Client {
        Client::with_auth(timeout, connect, &Auth::default())
    }

    /// [`Client::new`] sending `auth`'s credentials and trusting its CA.
    pub fn with_auth(timeout: Duration, connect: Option<Duration>, auth: &Auth) -> Client {
        let mut b = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(timeout))
            .timeout_connect(connect);
        if let Some(ca) = &auth.ca_cert {
            b = b.tls_config(tls_config(ca));
        }
        Client {
            agent: b.build().into(),
            authorization: auth.authorization(),
        }
    }

    /// The underlying agent, for callers that classify transport errors themselves (it
    /// trusts the CA but sends no credentials: add [`Client::authorize`]).
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    /// Adds this client's credentials (if any) to a request built on [`Client::agent`].
    pub fn authorize<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(a) => req.header("authorization", a),
            None => req,
        }
    }

    pub fn get(&self, url: &str) -> Reply {
        reply(self.authorize(self.agent.get(url)).call())
    }

    /// `GET url?k=v&...` with the pairs encoded.
    pub fn get_query(&self, url: &str, pairs: &[(&str, &str)]) -> Reply {
        let mut req = self.authorize(self.agent.get(url));
        for (k, v) in pairs {
            req = req.query(*k, *v);
        }
        reply(req.call())
    }

    pub fn post(&self, url: &str, body: &Json) -> Reply {
        reply(self.authorize(self.agent.post(url)).send_json(body))
    }

    /// `POST` of JSON already serialised (benchmark loops build their bodies once).
    pub fn post_text(&self, url: &str, json: &str) -> Reply {
        reply(
            self.authorize(self.agent.post(url))
                .header("content-type", "application/json")
                .send(json),
        )
    }

    /// `POST` of raw bytes with the given `Content-Type`.
    pub fn post_bytes(&self, url: &str, content_type: &str, body: &[u8]) -> Reply {
        reply(
            self.authorize(self.agent.post(url))
                .header("content-type", content_type)
                .send(body),
        )
    }

    pub fn delete(&self, url: &str, body: &Json) -> Reply {
        reply(
            self.authorize(self.agent.delete(url))
                .force_send_body()
                .header("content-type", "application/json")
                .send(body.to_string()),
        )
    }
}

/// rustls with the ring provider, trusting only the CA in `ca` (a PEM file).
fn tls_config(ca: &std::path::Path) -> ureq::tls::TlsConfig {
    let pem = std::fs::read(ca).unwrap_or_else(|e| panic!("reading {}: {e}", ca.display()));
    let cert = ureq::tls::Certificate::from_pem(&pem)
        .unwrap_or_else(|e| panic!("CA {}: {e}", ca.display()));
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .root_certs(ureq::tls::RootCerts::new_with_certs(&[cert]))
        .build()
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    match r {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Json::String(text));
            Reply {
                status,
                location,
                body,
            }
        }
        Err(e) => Reply::failed(e),
    }
}

/// A fresh [`Client::default`]'s ureq agent, for requests its methods do not cover (raw
/// bodies, binary answers).
pub fn agent() -> ureq::Agent {
    Client::default().agent
}

/// `GET url` with a fresh [`Client::default`].
pub fn get(url: &str) -> Reply {
    Client::default().get(url)
}

/// `POST url` (JSON) with a fresh [`Client::default`].
pub fn post(url: &str, body: &Json) -> Reply {
    Client::default().post(url, body)
}

/// `DELETE url` (JSON body) with a fresh [`Client::default`].
pub fn delete(url: &str, body: &Json) -> Reply {
    Client::default().delete(url, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_succeeded_needs_200_and_no_error_result() {
        let r = |status, body| Reply {
            status,
            location: None,
            body,
        };
        assert!(r(200, json!({"results": [{"rows_affected": 1}]})).succeeded());
        assert!(r(200, json!({"devices": []})).succeeded());
        assert!(!r(200, json!({"results": [{}, {"error": "no such table"}]})).succeeded());
        assert!(!r(503, json!({"results": []})).succeeded());
    }

    #[test]
    fn test_no_answer_is_status_0() {
        // Port 1 on loopback: nothing listens, the connect is refused.
        let r = Client::new(Duration::from_secs(2), None).get("http://127.0.0.1:1/status");
        assert_eq!(r.status, 0);
        assert!(r.body.is_string());
    }
}
