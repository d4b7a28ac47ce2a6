//! Who may talk to a gateway: HTTP authentication and permissions ([`auth`]), TLS on the
//! HTTP API and mutual TLS between gateways ([`tls`]), the cluster CA ([`certs`]) and the
//! secure-by-default start-up check ([`check_exposure`]).
//!
//! # How the rest of the gateway calls it
//!
//! **Start-up (`daemon::Security::build`).** `NodeConfig::resolve` runs [`check_exposure`]
//! (a node beyond loopback without `--auth` / node mutual TLS refuses to start unless
//! `--insecure`, which is then logged as a warning at every start). `daemon::start` builds
//! the [`Authenticator`], the HTTPS server config, the Raft listener's server config
//! ([`tls::node_server_config`]), this node's client config ([`tls::node_client_config`]),
//! the join client and the `--join-as` credentials once.
//!
//! **Listeners (`daemon::start`).** Both the API and the Raft listener are a
//! [`tls::SecureListener`] (TLS when configured, plain otherwise; handshakes bounded, caps per
//! listener and per peer) served by [`tls::serve`] (idle and slow request heads closed).
//!
//! **HTTP route table (`http::router`).** Every public route declares its permission with
//! [`auth::require`] and its body type with `http::body_type`; rqlite's mapping plus
//! `devices`:
//!
//! | route | permission |
//! |---|---|
//! | `POST /db/execute` | `execute` |
//! | `GET,POST /db/query` | `query` |
//! | `POST /db/request` | `Need::AllOf(&[Query, Execute])` |
//! | `GET /db/backup` | `backup` |
//! | `POST /db/load`, `POST /boot` | `load` |
//! | `GET /status`, `/nodes`, `/metrics`, `GET /leader` | `status` |
//! | `GET /readyz` | `ready` |
//! | `POST /join` | `Need::AnyOf(&[Join, JoinReadOnly])`, then in `http::admin::join`: a voter needs `join`; re-pointing an existing member to new addresses needs `all` |
//! | `DELETE /remove` | `remove` |
//! | `POST /snapshot` | `snapshot` |
//! | `POST /leader` | `leader-ops` |
//! | `/devices`, `/devices/{id}` (and its `/reset`, `/revoke`, `/rekey`, `/protocol`), downlink | `devices` |
//! | `GET /streams` | `status` |
//! | `POST /streams/reload`, `POST /streams/{id}/replay` | `devices` |
//!
//! A route added later takes its line in `http::router` the same way:
//! `.route(path, require(a, Perm::X, body_type(JSON, post(handler))))`.
//!
//! **Forwarding (`http::to_leader`).** A follower sends a request that needs the leader to the
//! leader's Raft listener (node mutual TLS) under `/api`, carrying the client's own
//! `Authorization` header and nothing that identifies the follower as anything but a
//! transport: the leader runs the same route table on it, so a forwarded request gets exactly
//! what the client would get from the leader directly (never more).
//!
//! **Raft listener (`raft::network::routes`, `ingress::forward::routes`).** No [`auth`] check
//! on node-to-node routes: mutual TLS is the check (`--node-verify-client`: no node
//! certificate of the cluster CA, no connection; a `--client` certificate of the same CA is
//! refused too, see `tls::NodePeerVerifier`). None of them is on the public router.
//!
//! **Node-to-node client (`raft::network::HttpClient::new`).** `tls::node_connector` with the
//! node client config; URLs are `https://` with node TLS (`HttpClient::url`). Peers'
//! certificates must name the address dialled (`cairn certs issue --ip`).
//!
//! **Joining (`daemon::join_loop`, `cluster::membership`).** With `--join-as USER` the join
//! carries `USER`'s password from this node's own auth file (as in rqlite); the join client
//! trusts `--http-ca-cert` (or the cluster CA) and presents the node certificate. The leader
//! adds a node (or new addresses) only after it answered `/raft/ping` on its Raft address, so
//! with node TLS a joiner must hold a node certificate of the cluster CA for that address.
//!
//! **CLI (`cli::ConnArgs`, `cli::Api`; `cairn sim` alike).** [`Credentials::for_cli`] gives the
//! host and the credentials (URL, then `--user` + `CAIRN_PASSWORD`, then `CAIRN_USER`);
//! `--ca-cert` makes ureq trust that CA (rustls with ring, no bundled roots).

pub mod auth;
pub mod certs;
pub mod credentials;
pub mod listener;
pub mod tls;

pub use auth::{Access, Authenticator, Decision, Need, Perm, Perms, require};
pub use credentials::Credentials;

/// Whether `addr` (`host:port`) listens only on the loopback interface. Host names other
/// than `localhost` count as exposed: what they resolve to can change.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return sa.ip().is_loopback();
    }
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What [`check_exposure`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Exposure<'a> {
    pub http_addr: &'a str,
    pub raft_addr: &'a str,
    /// An `--auth` file is set.
    pub auth: bool,
    /// Node TLS is complete: certificate, key, cluster CA and client verification.
    pub node_mtls: bool,
    pub insecure: bool,
}

/// Secure by default: a node listening beyond loopback needs `--auth` for its HTTP API and
/// mutual node TLS for its Raft port, unless `--insecure`. The error says what to configure.
pub fn check_exposure(e: &Exposure<'_>) -> Result<(), String> {
    if e.insecure {
        return Ok(());
    }
    let mut missing = Vec::new();
    if !e.auth && !is_loopback(e.http_addr) {
        missing.push(format!(
            "the HTTP API listens on {} (not loopback) without authentication: set --auth FILE \
             (rqlite's JSON list of users and permissions; TOML key `auth`)",
            e.http_addr
        ));
    }
    if !e.node_mtls && !is_loopback(e.raft_addr) {
        missing.push(format!(
            "the Raft port listens on {} (not loopback) without mutual TLS: set --node-cert, \
             --node-key, --node-ca-cert and --node-verify-client (`cairn certs init` and \
             `cairn certs issue` make them)",
            e.raft_addr
        ));
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "refusing to start: {}; or pass --insecure to run open anyway (not for shared networks)",
        missing.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposure<'a>(http: &'a str, raft: &'a str) -> Exposure<'a> {
        Exposure {
            http_addr: http,
            raft_addr: raft,
            auth: false,
            node_mtls: false,
            insecure: false,
        }
    }

    #[test]
    fn test_loopback_addresses() {
        for a in [
            "127.0.0.1:4001",
            "127.1.2.3:4001",
            "[::1]:4001",
            "localhost:4001",
            "LOCALHOST:4001",
        ] {
            assert!(is_loopback(a), "{a}");
        }
        for a in [
            "0.0.0.0:4001",
            "[::]:4001",
            "192.168.1.10:4001",
            ":4001",
            "gw1.local:4001",
            "10.0.2.2:4001",
        ] {
            assert!(!is_loopback(a), "{a}");
        }
    }

    #[test]
    fn test_loopback_runs_open() {
        assert_eq!(
            check_exposure(&exposure("127.0.0.1:4001", "127.0.0.1:4002")),
            Ok(())
        );
    }

    #[test]
    fn test_exposed_http_needs_auth() {
        let e = check_exposure(&exposure("0.0.0.0:4001", "127.0.0.1:4002")).unwrap_err();
        assert!(e.contains("--auth FILE"), "{e}");
        assert!(!e.contains("--node-cert"), "{e}");
        assert!(e.contains("--insecure"), "{e}");
        let ok = Exposure {
            auth: true,
            ..exposure("0.0.0.0:4001", "127.0.0.1:4002")
        };
        assert_eq!(check_exposure(&ok), Ok(()));
    }

    #[test]
    fn test_exposed_raft_needs_node_mtls() {
        let e = check_exposure(&Exposure {
            auth: true,
            ..exposure("192.168.1.10:4001", "192.168.1.10:4002")
        })
        .unwrap_err();
        assert!(e.contains("--node-verify-client"), "{e}");
        assert!(!e.contains("--auth FILE"), "{e}");
        let ok = Exposure {
            auth: true,
            node_mtls: true,
            ..exposure("192.168.1.10:4001", "192.168.1.10:4002")
        };
        assert_eq!(check_exposure(&ok), Ok(()));
    }

    #[test]
    fn test_both_missing_named_together() {
        let e = check_exposure(&exposure("[::]:4001", "0.0.0.0:4002")).unwrap_err();
        assert!(
            e.contains("--auth FILE") && e.contains("--node-cert"),
            "{e}"
        );
    }

    #[test]
    fn test_insecure_overrides() {
        let e = Exposure {
            insecure: true,
            ..exposure("0.0.0.0:4001", "0.0.0.0:4002")
        };
        assert_eq!(check_exposure(&e), Ok(()));
    }
}
