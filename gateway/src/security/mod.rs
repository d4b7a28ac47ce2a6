//! Who may talk to a gateway: HTTP authentication and permissions ([`auth`]), TLS on the
//! HTTP API and mutual TLS between gateways ([`tls`]), the cluster CA ([`certs`]) and the
//! secure-by-default start-up check ([`check_exposure`]).
//!
//! # How the rest of the gateway calls it
//!
//! Nothing below is wired yet; each step is mechanical.
//!
//! **Start-up (`daemon.rs`).** `NodeConfig::resolve` already runs [`check_exposure`] (a node
//! beyond loopback without `--auth` / node mutual TLS refuses to start unless `--insecure`).
//! `daemon::start` then builds, once:
//! ```ignore
//! let auth = Arc::new(match &config.auth {
//!     Some(f) => Authenticator::from_file(f)?,
//!     None => Authenticator::disabled(),
//! });
//! let http_tls = config.http_tls()?.map(|t| tls::http_server_config(&t)).transpose()?;
//! let node_tls = config.node_tls()?;
//! let raft_server_tls = node_tls.as_ref().map(tls::node_server_config).transpose()?;
//! let raft_client_tls = node_tls.as_ref().map(tls::node_client_config).transpose()?;
//! if config.insecure { tracing::warn!("--insecure: ...") }   // at every start
//! ```
//!
//! **Listeners (`daemon.rs`, the loop over the Raft and HTTP listeners).** Replace the
//! `tap_io` + `axum::serve(listener, router).with_graceful_shutdown(graceful)` with
//! ```ignore
//! let l = tls::SecureListener::new(tcp_listener, tls_config, tls::Limits::default());
//! tls::serve(l, router, graceful).await
//! ```
//! (`raft_server_tls` for the Raft listener, `http_tls` for the API). `SecureListener` sets
//! `TCP_NODELAY` itself. Handlers that care who is calling extract `ConnectInfo<tls::Remote>`.
//!
//! **HTTP route table (`http::router`).** Every public route declares its permission with
//! [`auth::require`] (the router gets `auth` next to the `Cluster`); rqlite's mapping plus
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
//! | `POST /join` | `Need::AnyOf(&[Join, JoinReadOnly])`, then in `http::admin::join`: `voter` needs `access.has(Join)`; re-pointing an existing member to new addresses needs `access.has(All)`, else `access.forbidden(Perm::All)` |
//! | `DELETE /remove` | `remove` |
//! | `POST /snapshot` | `snapshot` |
//! | `POST /leader` | `leader-ops` |
//! | `/devices`, `/devices/{id}`, downlink | `devices` |
//! | `GET /streams` | `status` |
//! | `POST /streams/reload`, `POST /streams/{id}/replay` | `devices` |
//!
//! ```ignore
//! Router::new()
//!     .route("/db/execute", require(&auth, Perm::Execute, post(sql::execute)))
//!     .route("/join", require(&auth, Need::AnyOf(&[Perm::Join, Perm::JoinReadOnly]), post(admin::join)))
//! // in the handler: async fn join(access: Access, ...) {
//! //     if jr.voter && !access.has(Perm::Join) { return access.forbidden(Perm::Join) } ... }
//! ```
//! The route layer refuses before the body is read; `tests/security.rs` runs this very table.
//!
//! **Forwarding (`cluster::client::call_leader`).** A forwarded request must carry the
//! client's `Authorization` header (add it to `LeaderRequest`; the leader decides again). With
//! node TLS, forward to the leader's Raft port over mutual TLS rather than to its public port.
//!
//! **Raft listener (`raft::network::routes`, `ingress::forward::routes`).** No [`auth`] check
//! there: mutual TLS is the check (`--node-verify-client`: no node certificate of the cluster
//! CA, no connection; a `--client` certificate of the same CA is refused too, see
//! `tls::NodePeerVerifier`). None of these routes may be merged into the public router.
//!
//! **Node-to-node client (`raft::network::HttpClient::new`).** Build the connector with
//! `tls::node_connector(http_connector, raft_client_tls)` (type `tls::NodeConnector`) and the
//! URLs as `https://{raft_addr}` when node TLS is on, `http://` otherwise (`post` and
//! `cluster::client` both format `http://` today). Peers' certificates must name the address
//! dialled (`cairn certs issue --ip`); hyper-rustls checks it.
//!
//! **Joining (`daemon::join_loop`).** With `--join-as USER`, the request carries
//! `Credentials::new(USER, auth.plain_password(USER)?).authorization()` as its
//! `Authorization` header (the password comes from this node's own auth file, as in rqlite);
//! with HTTP TLS the join URL is `https://` and the client trusts `--http-ca-cert` (or
//! `--node-ca-cert`).
//!
//! **CLI (`cli/`).** `Credentials::for_cli(host, --user, |k| std::env::var(k).ok())` gives
//! the host without user-info and the credentials (URL, then `--user` + `CAIRN_PASSWORD`, then
//! `CAIRN_USER`/`CAIRN_PASSWORD`); each request carries `creds.authorization()`.
//! For `--ca-cert`: the hyper client takes `tls::node_connector(http, Some(tls::client_config(
//! ca_cert, None)?))` as it is; ureq (built without TLS today) needs its `rustls-no-provider`
//! feature plus ring through rustls, and its own `TlsConfig` with the CA from
//! `tls::load_certs` (its `rustls` feature would also pull webpki-roots, unwanted here).

pub mod auth;
pub mod certs;
pub mod credentials;
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
