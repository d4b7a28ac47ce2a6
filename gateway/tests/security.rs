//! The security layer over real loopback sockets: permissions on a route table, HTTPS with
//! certificates from `cairn certs`, reloading them without a restart, node mutual TLS, and
//! listener limits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use cairn_gateway::security::certs::{Ca, IssueArgs, Issued};
use cairn_gateway::security::tls::{self, HttpTls, Limits, NodeTls, Remote, SecureListener};
use cairn_gateway::security::{Access, Authenticator, Credentials, Need, Perm, require};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A running server; dropping it stops it.
struct Server {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(router: Router, tls: Option<Arc<rustls::ServerConfig>>, limits: Limits) -> Server {
    let tcp = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = SecureListener::new(tcp, tls, limits);
    tokio::spawn(tls::serve(listener, router, async {
        let _ = stopped.await;
    }));
    Server { addr, _stop: stop }
}

type TestClient = Client<tls::NodeConnector, Full<Bytes>>;

fn client(tls: Option<Arc<rustls::ClientConfig>>) -> TestClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    // Every request on a fresh connection, so handshakes (and reloads) are exercised.
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(tls::node_connector(http, tls))
}

async fn send(
    c: &TestClient,
    method: Method,
    url: &str,
    creds: Option<&Credentials>,
    body: &str,
) -> Result<(StatusCode, HeaderMap, String), String> {
    let mut b = hyper::Request::builder().method(method).uri(url);
    if let Some(c) = creds {
        b = b.header(header::AUTHORIZATION, c.authorization());
    }
    if !body.is_empty() {
        b = b.header(header::CONTENT_TYPE, "application/json");
    }
    let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let fut = async {
        let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

fn issue_args(name: &str, ips: &[IpAddr], client: bool) -> IssueArgs {
    IssueArgs {
        ca: PathBuf::new(),
        name: name.into(),
        ip: ips.to_vec(),
        dns: Vec::new(),
        client,
        days: 30,
        out: PathBuf::new(),
    }
}

/// A CA and a directory holding `NAME.crt`/`NAME.key` pairs and `ca.crt`.
struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate(1).unwrap();
        std::fs::write(dir.path().join("ca.crt"), &ca.cert_pem).unwrap();
        Pki { ca, dir }
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Issues `name` and writes it; returns (cert path, key path, issued).
    fn issue(&self, name: &str, ips: &[IpAddr], client: bool) -> (PathBuf, PathBuf, Issued) {
        let issued = self.ca.issue(&issue_args(name, ips, client)).unwrap();
        let (crt, key) = issued
            .write(self.dir.path(), name, &self.ca.cert_pem)
            .unwrap();
        (crt, key, issued)
    }

    fn node_tls(&self, name: &str, verify_client: bool) -> NodeTls {
        let (cert, key, _) = self.issue(name, &[LOCAL], false);
        NodeTls {
            cert,
            key,
            ca_cert: self.ca_path(),
            verify_client,
        }
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// Replaces `path` atomically, as certificate renewal tools do.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// The certificate a TLS server presents to a new connection.
async fn presented_cert(addr: SocketAddr, ca: &Path) -> CertificateDer<'static> {
    let cfg = tls::client_config(ca, None).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let s = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::IpAddress(LOCAL.into()), tcp)
        .await
        .unwrap();
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

async fn hello_router() -> Router {
    Router::new().route(
        "/hello",
        get(|ConnectInfo(r): ConnectInfo<Remote>| async move {
            match r.client_cert {
                Some(_) => "hello, certified client",
                None => "hello",
            }
        }),
    )
}

/// An HTTPS server of the hello router with `cert`/`key`, no client certificates.
async fn https_hello(cert: &Path, key: &Path, limits: Limits) -> Server {
    let cfg = tls::http_server_config(&HttpTls {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        ca_cert: None,
        verify_client: false,
    })
    .unwrap();
    start(hello_router().await, Some(cfg), limits).await
}

/// `GET https://{addr}/hello`.
async fn get_hello(
    c: &TestClient,
    addr: SocketAddr,
) -> Result<(StatusCode, HeaderMap, String), String> {
    send(c, Method::GET, &format!("https://{addr}/hello"), None, "").await
}

// ---------------------------------------------------------------------------------------------
// Permissions on a route table
// ---------------------------------------------------------------------------------------------

/// The route table of `security/mod.rs`, each handler counting the requests that reach it.
fn guarded_api(auth: &Arc<Authenticator>, reached: Arc<AtomicUsize>) -> Router {
    let hit = move || {
        let reached = reached.clone();
        move || {
            let reached = reached.clone();
            async move {
                reached.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        }
    };
    let join_reached = hit();
    Router::new()
        .route("/db/execute", require(auth, Perm::Execute, post(hit())))
        .route(
            "/db/query",
            require(auth, Perm::Query, get(hit()).post(hit())),
        )
        .route(
            "/db/request",
            require(
                auth,
                Need::AllOf(&[Perm::Query, Perm::Execute]),
                post(hit()),
            ),
        )
        .route("/db/backup", require(auth, Perm::Backup, get(hit())))
        .route("/db/load", require(auth, Perm::Load, post(hit())))
        .route("/status", require(auth, Perm::Status, get(hit())))
        .route("/readyz", require(auth, Perm::Ready, get(hit())))
        .route(
            "/leader",
            require(auth, Perm::Status, get(hit())).merge(require(
                auth,
                Perm::LeaderOps,
                post(hit()),
            )),
        )
        .route("/remove", require(auth, Perm::Remove, delete(hit())))
        .route("/snapshot", require(auth, Perm::Snapshot, post(hit())))
        .route("/devices", require(auth, Perm::Devices, get(hit())))
        .route(
            "/join",
            require(
                auth,
                Need::AnyOf(&[Perm::Join, Perm::JoinReadOnly]),
                post(move |access: Access, body: String| async move {
                    let voter = serde_json::from_str::<serde_json::Value>(&body).unwrap()["voter"]
                        .as_bool()
                        .unwrap_or(true);
                    if voter && !access.has(Perm::Join) {
                        return access.forbidden(Perm::Join);
                    }
                    join_reached().await;
                    axum::response::IntoResponse::into_response("joined")
                }),
            ),
        )
}

const ROUTES: &[(&str, &str, Perm)] = &[
    ("POST", "/db/execute", Perm::Execute),
    ("GET", "/db/query", Perm::Query),
    ("POST", "/db/query", Perm::Query),
    ("POST", "/db/request", Perm::Execute), // and query
    ("GET", "/db/backup", Perm::Backup),
    ("POST", "/db/load", Perm::Load),
    ("GET", "/status", Perm::Status),
    ("GET", "/readyz", Perm::Ready),
    ("GET", "/leader", Perm::Status),
    ("POST", "/leader", Perm::LeaderOps),
    ("DELETE", "/remove", Perm::Remove),
    ("POST", "/snapshot", Perm::Snapshot),
    ("GET", "/devices", Perm::Devices),
];

#[tokio::test]
async fn test_route_table_answers_401_403_and_never_reaches_refused_handlers() {
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let file = serde_json::json!([
        {"username": "root", "password": hash, "perms": ["all"]},
        {"username": "reader", "password": "r", "perms": ["query"]},
        {"username": "rw", "password": "rw", "perms": ["query", "execute"]},
        {"username": "joiner", "password": "j", "perms": ["join"]},
        {"username": "learner", "password": "l", "perms": ["join-read-only"]},
        {"username": "*", "perms": ["status", "ready"]}
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.json");
    std::fs::write(&path, file.to_string()).unwrap();
    let auth = Arc::new(Authenticator::from_file(&path).unwrap());
    let reached = Arc::new(AtomicUsize::new(0));
    let server = start(guarded_api(&auth, reached.clone()), None, Limits::default()).await;
    let c = client(None);
    let url = |p: &str| format!("http://{}{p}", server.addr);
    let mut allowed = 0;

    let root = Credentials::new("root", "s3cret");
    let reader = Credentials::new("reader", "r");
    let wrong = Credentials::new("root", "s3creT");
    for (m, p, perm) in ROUTES {
        let m: Method = m.parse().unwrap();
        // Anonymous: only what "*" grants.
        let (s, h, b) = send(&c, m.clone(), &url(p), None, "").await.unwrap();
        if matches!(perm, Perm::Status | Perm::Ready) {
            assert_eq!(s, StatusCode::OK, "anonymous {m} {p}");
            allowed += 1;
        } else {
            assert_eq!(s, StatusCode::UNAUTHORIZED, "anonymous {m} {p}");
            assert_eq!(h[header::WWW_AUTHENTICATE], "Basic realm=\"cairn\"");
            let j: serde_json::Value = serde_json::from_str(&b).unwrap();
            assert_eq!(
                j["results"][0]["error"],
                "unauthorized: credentials required"
            );
        }
        // Wrong password: 401 everywhere, even where anonymous would pass.
        let (s, _, b) = send(&c, m.clone(), &url(p), Some(&wrong), "")
            .await
            .unwrap();
        assert_eq!(s, StatusCode::UNAUTHORIZED, "wrong password {m} {p}");
        assert!(b.contains("invalid username or password"), "{b}");
        // The query-only user: 403 except for query and "*".
        let (s, _, b) = send(&c, m.clone(), &url(p), Some(&reader), "")
            .await
            .unwrap();
        if matches!(perm, Perm::Query | Perm::Status | Perm::Ready) && *p != "/db/request" {
            assert_eq!(s, StatusCode::OK, "reader {m} {p}");
            allowed += 1;
        } else {
            assert_eq!(s, StatusCode::FORBIDDEN, "reader {m} {p}");
            let j: serde_json::Value = serde_json::from_str(&b).unwrap();
            assert!(
                j["results"][0]["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("forbidden: user reader lacks permission "),
                "{b}"
            );
        }
        // `all` (bcrypt password, cached after the first request).
        let (s, _, _) = send(&c, m.clone(), &url(p), Some(&root), "").await.unwrap();
        assert_eq!(s, StatusCode::OK, "root {m} {p}");
        allowed += 1;
    }
    // /db/request needs both query and execute.
    let rw = Credentials::new("rw", "rw");
    let (s, _, _) = send(&c, Method::POST, &url("/db/request"), Some(&rw), "")
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    allowed += 1;

    // /join: join-read-only may join as a non-voter only; the handler decides on the body.
    let join = url("/join");
    let learner = Credentials::new("learner", "l");
    let joiner = Credentials::new("joiner", "j");
    let voter = r#"{"id": 2, "addr": "x", "voter": true}"#;
    let non_voter = r#"{"id": 2, "addr": "x", "voter": false}"#;
    let (s, _, _) = send(&c, Method::POST, &join, None, voter).await.unwrap();
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = send(&c, Method::POST, &join, Some(&reader), voter)
        .await
        .unwrap();
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, b) = send(&c, Method::POST, &join, Some(&learner), voter)
        .await
        .unwrap();
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("user learner lacks permission join"), "{b}");
    let (s, _, b) = send(&c, Method::POST, &join, Some(&learner), non_voter)
        .await
        .unwrap();
    assert_eq!((s, b.as_str()), (StatusCode::OK, "joined"));
    let (s, _, _) = send(&c, Method::POST, &join, Some(&joiner), voter)
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    allowed += 2;

    assert_eq!(reached.load(Ordering::SeqCst), allowed);
    // A wrong method is not an auth question.
    let (s, _, _) = send(&c, Method::GET, &url("/db/execute"), None, "")
        .await
        .unwrap();
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn test_without_auth_file_everything_is_open() {
    let auth = Arc::new(Authenticator::disabled());
    let reached = Arc::new(AtomicUsize::new(0));
    let server = start(guarded_api(&auth, reached.clone()), None, Limits::default()).await;
    let c = client(None);
    for (m, p, _) in ROUTES {
        let url = format!("http://{}{p}", server.addr);
        let (s, _, _) = send(&c, m.parse().unwrap(), &url, None, "").await.unwrap();
        assert_eq!(s, StatusCode::OK, "{m} {p}");
    }
    assert_eq!(reached.load(Ordering::SeqCst), ROUTES.len());
}

// ---------------------------------------------------------------------------------------------
// HTTPS, reload, mutual TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_https_with_certs_issue_and_a_client_trusting_the_ca() {
    let pki = Pki::new();
    let (cert, key, _) = pki.issue("gw1", &[LOCAL], false);
    let server = https_hello(&cert, &key, Limits::default()).await;
    let trusting = client(Some(tls::client_config(&pki.ca_path(), None).unwrap()));
    let url = format!("https://{}/hello", server.addr);
    let (s, _, b) = send(&trusting, Method::GET, &url, None, "").await.unwrap();
    assert_eq!((s, b.as_str()), (StatusCode::OK, "hello"));

    // A client trusting another CA refuses the server.
    let other = Pki::new();
    let stranger = client(Some(tls::client_config(&other.ca_path(), None).unwrap()));
    let e = send(&stranger, Method::GET, &url, None, "")
        .await
        .unwrap_err();
    assert!(
        e.contains("UnknownIssuer") || e.contains("certificate"),
        "{e}"
    );

    // Plain text to the TLS listener gets no HTTP answer.
    let plain = client(None);
    let http_url = format!("http://{}/hello", server.addr);
    assert!(
        send(&plain, Method::GET, &http_url, None, "")
            .await
            .is_err()
    );
    let mut raw = TcpStream::connect(server.addr).await.unwrap();
    raw.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut buf)).await;
    assert!(
        !buf.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    // Still serving after that.
    let (s, _, _) = send(&trusting, Method::GET, &url, None, "").await.unwrap();
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn test_server_certificate_must_name_the_dialled_address() {
    let pki = Pki::new();
    let (cert, key, _) = pki.issue("gw9", &["192.0.2.9".parse().unwrap()], false);
    let server = https_hello(&cert, &key, Limits::default()).await;
    let c = client(Some(tls::client_config(&pki.ca_path(), None).unwrap()));
    let e = get_hello(&c, server.addr).await.unwrap_err();
    assert!(e.contains("NotValidForName"), "{e}");
}

#[tokio::test]
async fn test_certificate_reload_without_restart() {
    let pki = Pki::new();
    let (cert, key, first) = pki.issue("gw1", &[LOCAL], false);
    let server = https_hello(&cert, &key, Limits::default()).await;
    assert_eq!(
        presented_cert(server.addr, &pki.ca_path()).await,
        der(&first.cert_pem)
    );

    let second = pki.ca.issue(&issue_args("gw1", &[LOCAL], false)).unwrap();
    assert_ne!(first.cert_pem, second.cert_pem);
    // Half-way through a renewal (new certificate, old key) the old pair stays in use.
    replace(&cert, &second.cert_pem);
    assert_eq!(
        presented_cert(server.addr, &pki.ca_path()).await,
        der(&first.cert_pem)
    );
    replace(&key, &second.key_pem);
    assert_eq!(
        presented_cert(server.addr, &pki.ca_path()).await,
        der(&second.cert_pem)
    );

    // Garbage in the files does not take the server down.
    replace(&cert, "not a certificate");
    assert_eq!(
        presented_cert(server.addr, &pki.ca_path()).await,
        der(&second.cert_pem)
    );
}

#[tokio::test]
async fn test_node_mtls_refuses_clients_without_a_cluster_certificate() {
    let pki = Pki::new();
    let gw1 = pki.node_tls("gw1", true);
    let server = start(
        hello_router().await,
        Some(tls::node_server_config(&gw1).unwrap()),
        Limits::default(),
    )
    .await;
    let url = format!("https://{}/hello", server.addr);

    // A peer with a node certificate of the cluster CA gets through, and the handler sees it.
    let gw2 = pki.node_tls("gw2", true);
    let peer = client(Some(tls::node_client_config(&gw2).unwrap()));
    let (s, _, b) = send(&peer, Method::GET, &url, None, "").await.unwrap();
    assert_eq!((s, b.as_str()), (StatusCode::OK, "hello, certified client"));

    // No client certificate: refused at the handshake.
    let anonymous = client(Some(tls::client_config(&pki.ca_path(), None).unwrap()));
    let e = send(&anonymous, Method::GET, &url, None, "")
        .await
        .unwrap_err();
    assert!(e.contains("AlertReceived(CertificateRequired)"), "{e}");

    // A certificate of another CA (that trusts our CA for the server side): refused.
    let rogue_pki = Pki::new();
    let (rc, rk, _) = rogue_pki.issue("rogue", &[LOCAL], false);
    let rogue_cert = tls::ReloadingCert::load(rc, rk).unwrap();
    let rogue = client(Some(
        tls::client_config(&pki.ca_path(), Some(rogue_cert)).unwrap(),
    ));
    let e = send(&rogue, Method::GET, &url, None, "").await.unwrap_err();
    assert!(e.contains("AlertReceived(UnknownCA)"), "{e}");

    // A client-only certificate of the cluster CA (an operator's): refused on the Raft port.
    let (oc, ok, _) = pki.issue("ops", &[], true);
    let operator = client(Some(
        tls::client_config(
            &pki.ca_path(),
            Some(tls::ReloadingCert::load(oc, ok).unwrap()),
        )
        .unwrap(),
    ));
    let e = get_hello(&operator, server.addr).await.unwrap_err();
    assert!(e.contains("AlertReceived(UnsupportedCertificate)"), "{e}");

    // Plain text: refused.
    let plain = client(None);
    let http_url = format!("http://{}/hello", server.addr);
    assert!(
        send(&plain, Method::GET, &http_url, None, "")
            .await
            .is_err()
    );

    // And the cluster peer still gets through afterwards.
    let (s, _, _) = send(&peer, Method::GET, &url, None, "").await.unwrap();
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn test_node_client_refuses_a_server_of_another_ca() {
    let pki = Pki::new();
    let rogue_pki = Pki::new();
    // The rogue server asks for no client certificate and presents a certificate of its own CA.
    let (cert, key, _) = rogue_pki.issue("rogue", &[LOCAL], false);
    let server = https_hello(&cert, &key, Limits::default()).await;
    let node = client(Some(
        tls::node_client_config(&pki.node_tls("gw1", true)).unwrap(),
    ));
    let e = get_hello(&node, server.addr).await.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
}

#[tokio::test]
async fn test_http_client_certificates_optional_or_required() {
    let pki = Pki::new();
    let (cert, key, _) = pki.issue("gw1", &[LOCAL], false);
    let (ccert, ckey, _) = pki.issue("ops", &[], true);
    let with_cert = client(Some(
        tls::client_config(
            &pki.ca_path(),
            Some(tls::ReloadingCert::load(ccert, ckey).unwrap()),
        )
        .unwrap(),
    ));
    let without = client(Some(tls::client_config(&pki.ca_path(), None).unwrap()));
    for verify_client in [false, true] {
        let cfg = tls::http_server_config(&HttpTls {
            cert: cert.clone(),
            key: key.clone(),
            ca_cert: Some(pki.ca_path()),
            verify_client,
        })
        .unwrap();
        let server = start(hello_router().await, Some(cfg), Limits::default()).await;
        let url = format!("https://{}/hello", server.addr);
        let (s, _, b) = send(&with_cert, Method::GET, &url, None, "").await.unwrap();
        assert_eq!((s, b.as_str()), (StatusCode::OK, "hello, certified client"));
        let r = send(&without, Method::GET, &url, None, "").await;
        if verify_client {
            assert!(r.is_err(), "{r:?}");
        } else {
            assert_eq!(r.unwrap().2, "hello");
        }
    }
    // --http-verify-client without a CA is a configuration error.
    let e = tls::http_server_config(&HttpTls {
        cert,
        key,
        ca_cert: None,
        verify_client: true,
    })
    .unwrap_err();
    assert!(e.to_string().contains("--http-ca-cert"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Listener limits
// ---------------------------------------------------------------------------------------------

/// Reads until EOF or error; true when the server closed the connection without a byte.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn test_handshake_timeout_closes_silent_clients() {
    let pki = Pki::new();
    let (cert, key, _) = pki.issue("gw1", &[LOCAL], false);
    let limits = Limits {
        handshake_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let server = https_hello(&cert, &key, limits).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_by_server(&mut silent).await);
}

#[tokio::test]
async fn test_idle_and_slow_clients_are_closed() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = start(hello_router().await, None, limits).await;
    // A client that trickles its request head and never finishes it.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /hello HTTP/1.1\r\nHo").await.unwrap();
    assert!(closed_by_server(&mut slow).await);
    // A keep-alive connection that goes idle after its request.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    while !buf.ends_with(b"hello") {
        let mut chunk = [0u8; 256];
        let n = idle.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before answering");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(buf.starts_with(b"HTTP/1.1 200"));
    assert!(closed_by_server(&mut idle).await);
}

#[tokio::test]
async fn test_connection_cap_per_peer() {
    let limits = Limits {
        max_per_peer: 1,
        ..Limits::default()
    };
    let server = start(hello_router().await, None, limits).await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    first
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The first connection is still open (keep-alive): a second one from the same address
    // is closed at once.
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_by_server(&mut second).await);
    // Once the first goes, the slot is free again.
    drop(first);
    let c = client(None);
    let url = format!("http://{}/hello", server.addr);
    let mut ok = false;
    for _ in 0..100 {
        if let Ok((StatusCode::OK, _, _)) = send(&c, Method::GET, &url, None, "").await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "slot never freed");
}

// ---------------------------------------------------------------------------------------------
// Figures (not a test of speed: run by hand, in release)
//   cargo test --release -p cairn-gateway --test security -- --ignored --nocapture
// ---------------------------------------------------------------------------------------------

/// `GET /hello` with `Connection: close`, read to the end.
async fn one_request<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    assert!(buf.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run by hand in release"]
async fn measure_bcrypt_and_handshakes() {
    use std::time::Instant;
    for cost in [10, 12] {
        let h = bcrypt::hash("correct horse", cost).unwrap();
        let t = Instant::now();
        let n = 5;
        for _ in 0..n {
            assert!(bcrypt::verify("correct horse", &h).unwrap());
        }
        println!(
            "bcrypt cost {cost}: {:.1} ms per verification",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    }
    let file = serde_json::json!([
        {"username": "u", "password": bcrypt::hash("pw", 10).unwrap(), "perms": ["all"]}
    ]);
    let auth = Authenticator::from_json(file.to_string().as_bytes()).unwrap();
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        Credentials::new("u", "pw").authorization(),
    );
    assert!(matches!(
        auth.authorize(&h, Perm::Query.into()).await,
        cairn_gateway::security::Decision::Allow(_)
    ));
    let t = Instant::now();
    let n = 10_000;
    for _ in 0..n {
        assert!(matches!(
            auth.authorize(&h, Perm::Query.into()).await,
            cairn_gateway::security::Decision::Allow(_)
        ));
    }
    println!(
        "cached bcrypt user: {:.2} us per request",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );

    let pki = Pki::new();
    let gw1 = pki.node_tls("gw1", true);
    let server = start(
        hello_router().await,
        Some(tls::node_server_config(&gw1).unwrap()),
        Limits::default(),
    )
    .await;
    let gw2 = pki.node_tls("gw2", true);
    let resumed = tls::node_client_config(&gw2).unwrap();
    let mut full = (*resumed).clone();
    full.resumption = rustls::client::Resumption::disabled();
    let n = 200;
    for (what, cfg) in [
        ("full handshake", Arc::new(full)),
        ("resumed session", resumed),
    ] {
        let t = Instant::now();
        for _ in 0..n {
            let tcp = TcpStream::connect(server.addr).await.unwrap();
            let mut s = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(ServerName::IpAddress(LOCAL.into()), tcp)
                .await
                .unwrap();
            // The server's verdict on our certificate arrives with the first answer (TLS 1.3).
            one_request(&mut s).await;
        }
        println!(
            "mutual TLS ({what}) connection + one request on loopback: {:.2} ms",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    }
    let plain = start(hello_router().await, None, Limits::default()).await;
    let t = Instant::now();
    for _ in 0..n {
        one_request(&mut TcpStream::connect(plain.addr).await.unwrap()).await;
    }
    println!(
        "plain TCP connection + one request on loopback: {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}
