//! The harness's one HTTP client (ureq, blocking, no TLS): used by the tests, the fault
//! suite, the bench's SQL load and the QEMU end-to-end. Statuses are never turned into
//! errors and redirects are never followed, so a test sees exactly what the node answered.
//! A [`Client`] keeps its connections alive between requests (ureq pools them, with
//! `TCP_NODELAY`), which the benchmark loops rely on.

use std::time::Duration;

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

/// A blocking client; clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
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
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(timeout))
            .timeout_connect(connect)
            .build()
            .into();
        Client { agent }
    }

    /// The underlying agent, for callers that classify transport errors themselves.
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    pub fn get(&self, url: &str) -> Reply {
        reply(self.agent.get(url).call())
    }

    /// `GET url?k=v&...` with the pairs encoded.
    pub fn get_query(&self, url: &str, pairs: &[(&str, &str)]) -> Reply {
        let mut req = self.agent.get(url);
        for (k, v) in pairs {
            req = req.query(*k, *v);
        }
        reply(req.call())
    }

    pub fn post(&self, url: &str, body: &Json) -> Reply {
        reply(self.agent.post(url).send_json(body))
    }

    /// `POST` of JSON already serialised (benchmark loops build their bodies once).
    pub fn post_text(&self, url: &str, json: &str) -> Reply {
        reply(
            self.agent
                .post(url)
                .header("content-type", "application/json")
                .send(json),
        )
    }

    pub fn delete(&self, url: &str, body: &Json) -> Reply {
        reply(
            self.agent
                .delete(url)
                .force_send_body()
                .header("content-type", "application/json")
                .send(body.to_string()),
        )
    }
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
