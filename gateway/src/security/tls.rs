//! TLS for the HTTP API and between gateways: rustls with the ring provider only.
//!
//! - [`http_server_config`]: `--http-cert`/`--http-key`, optional client certificates
//!   (`--http-ca-cert`, `--http-verify-client`).
//! - [`node_server_config`] and [`node_client_config`]: mutual TLS on the Raft listener; both
//!   sides present their node certificate and check the other's against the cluster CA.
//! - Certificates and keys are read again when their files change ([`ReloadingCert`], checked
//!   at every handshake with one `stat` per file), so a renewed certificate is used by the next
//!   connection without a restart. A half-written pair (new certificate, old key) is ignored
//!   until both files match; the previous pair stays in use meanwhile.
//! - [`SecureListener`]: a listener that performs handshakes on their own tasks (a slow
//!   client cannot hold up others), bounds them by a timeout, and caps connections per
//!   listener and per peer address. [`serve`] runs a router on it, closing connections that
//!   stay idle or trickle their request heads ([`Limits::idle_timeout`]).
//! - [`node_connector`]: the hyper client connector for node-to-node requests (`https://`
//!   with node TLS, `http://` without).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::client::ResolvesClientCert;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The crypto provider every TLS config of Cairn uses: ring.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The certificates of a PEM file (leaf first for a chain).
pub fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(format!("certificate file {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "certificate file {}: no certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| invalid(format!("key file {}: {e}", path.display())))
}

/// The CA certificates of a PEM file as trust anchors.
pub fn load_roots(path: &Path) -> io::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots
            .add(c)
            .map_err(|e| invalid(format!("CA file {}: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

/// What identifies the contents of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino,
    })
}

struct Loaded {
    /// Stamps of the files the last load attempt saw (successful or not).
    seen: (Option<Stamp>, Option<Stamp>),
    key: Arc<CertifiedKey>,
}

/// A certificate and key read from files and read again when either file changes.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn certified_key(cert: &Path, key: &Path) -> io::Result<Arc<CertifiedKey>> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    CertifiedKey::from_der(chain, key_der, &provider())
        .map(Arc::new)
        .map_err(|e| {
            invalid(format!(
                "certificate {} and key {}: {e}",
                cert.display(),
                key.display()
            ))
        })
}

impl ReloadingCert {
    /// Loads the pair now; an error here is a start-up error.
    pub fn load(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> io::Result<Arc<Self>> {
        let (cert, key) = (cert.into(), key.into());
        let seen = (stamp(&cert), stamp(&key));
        let loaded = certified_key(&cert, &key)?;
        Ok(Arc::new(ReloadingCert {
            cert,
            key,
            loaded: Mutex::new(Loaded { seen, key: loaded }),
        }))
    }

    /// The pair to present now, read again first if a file changed since the last look.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut l = self.loaded.lock().expect("certificate state");
        let now = (stamp(&self.cert), stamp(&self.key));
        if now != l.seen {
            l.seen = now;
            match certified_key(&self.cert, &self.key) {
                Ok(k) => {
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    l.key = k;
                }
                // Typically the pair is being replaced one file at a time: keep the old one,
                // the next change of either file triggers another attempt.
                Err(e) => tracing::warn!("TLS certificate not reloaded, keeping the old one: {e}"),
            }
        }
        l.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// TLS of the HTTP API (`--http-cert`, `--http-key`, `--http-ca-cert`, `--http-verify-client`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA of client certificates. Without `verify_client`, a client certificate is optional
    /// but checked against it when presented.
    pub ca_cert: Option<PathBuf>,
    /// Require a client certificate of `ca_cert`.
    pub verify_client: bool,
}

/// Mutual TLS between gateways (`--node-cert`, `--node-key`, `--node-ca-cert`,
/// `--node-verify-client`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The cluster CA: peers' server certificates are checked against it, and so are client
    /// certificates on this node's Raft listener.
    pub ca_cert: PathBuf,
    /// Require a client certificate of the cluster CA on the Raft listener.
    pub verify_client: bool,
}

const HTTP1: &[u8] = b"http/1.1";

fn server_builder() -> io::Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>> {
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS protocol versions: {e}")))
}

fn client_verifier(ca: &Path, required: bool) -> io::Result<Arc<dyn ClientCertVerifier>> {
    let b = WebPkiClientVerifier::builder_with_provider(load_roots(ca)?, provider());
    let b = if required {
        b
    } else {
        b.allow_unauthenticated()
    };
    b.build()
        .map_err(|e| invalid(format!("client verifier for CA {}: {e}", ca.display())))
}

/// The server config of the HTTPS API.
pub fn http_server_config(t: &HttpTls) -> io::Result<Arc<ServerConfig>> {
    let cert = ReloadingCert::load(&t.cert, &t.key)?;
    let b = server_builder()?;
    let mut c = match (&t.ca_cert, t.verify_client) {
        (Some(ca), verify) => b
            .with_client_cert_verifier(client_verifier(ca, verify)?)
            .with_cert_resolver(cert),
        (None, true) => {
            return Err(invalid(
                "--http-verify-client needs --http-ca-cert (the CA of client certificates)".into(),
            ));
        }
        (None, false) => b.with_no_client_auth().with_cert_resolver(cert),
    };
    c.alpn_protocols = vec![HTTP1.to_vec()];
    Ok(Arc::new(c))
}

/// The server config of the Raft listener: with `verify_client`, peers must present a node
/// certificate of the cluster CA (see [`NodePeerVerifier`]).
pub fn node_server_config(t: &NodeTls) -> io::Result<Arc<ServerConfig>> {
    let cert = ReloadingCert::load(&t.cert, &t.key)?;
    let verifier = Arc::new(NodePeerVerifier {
        inner: client_verifier(&t.ca_cert, t.verify_client)?,
        roots: load_roots(&t.ca_cert)?,
    });
    let mut c = server_builder()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    c.alpn_protocols = vec![HTTP1.to_vec()];
    Ok(Arc::new(c))
}

/// The client-certificate check of the Raft listener: a certificate of the cluster CA that
/// is also valid for server authentication, i.e. a node certificate. A `cairn certs issue
/// --client` certificate (operators, HTTP clients) of the same CA is refused, so handing one
/// to a user never lets them speak Raft.
#[derive(Debug)]
pub struct NodePeerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    roots: Arc<RootCertStore>,
}

impl ClientCertVerifier for NodePeerVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_for_usage(
            provider().signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::InvalidPurpose))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client config for node-to-node requests: trusts only the cluster CA and presents this
/// node's certificate.
pub fn node_client_config(t: &NodeTls) -> io::Result<Arc<ClientConfig>> {
    let cert = ReloadingCert::load(&t.cert, &t.key)?;
    client_config(&t.ca_cert, Some(cert))
}

/// A client config trusting the CA in `ca` (the CLI's `--ca-cert`), optionally presenting a
/// client certificate.
pub fn client_config(
    ca: &Path,
    client_cert: Option<Arc<ReloadingCert>>,
) -> io::Result<Arc<ClientConfig>> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS protocol versions: {e}")))?
        .with_root_certificates(load_roots(ca)?);
    // No ALPN here: hyper-rustls sets it from the HTTP versions it enables.
    Ok(Arc::new(match client_cert {
        Some(r) => b.with_client_cert_resolver(r),
        None => b.with_no_client_auth(),
    }))
}

/// The connector of the node-to-node HTTP client: `https://` URLs go through TLS with `tls`,
/// `http://` URLs stay plain text. Without node TLS (`tls` = `None`) an `https://` URL fails.
pub type NodeConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Wraps `http` (with its timeouts and `TCP_NODELAY` already set) into a [`NodeConnector`].
pub fn node_connector(mut http: HttpConnector, tls: Option<Arc<ClientConfig>>) -> NodeConnector {
    http.enforce_http(false);
    let config = tls.map(|c| (*c).clone()).unwrap_or_else(|| {
        // No roots: any https:// URL fails its handshake, as it should without node TLS.
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth()
    });
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// Bounds on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections (handshaking or established) on the listener.
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_per_peer: usize,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a client has to send a request's head once the connection waits for one: an
    /// idle keep-alive connection, or a slow client trickling its headers, is closed after
    /// it ([`serve`]). Node-to-node clients close idle connections after 60 s themselves.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            // Peers pool up to 64 idle connections each (network.rs); leave room for bursts.
            max_per_peer: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// The peer of an accepted connection; handlers get it with
/// `axum::extract::ConnectInfo<Remote>` when served by [`serve`].
#[derive(Debug, Clone)]
pub struct Remote {
    pub addr: SocketAddr,
    /// The verified client certificate (leaf), with client-certificate TLS.
    pub client_cert: Option<CertificateDer<'static>>,
}

impl Connected<IncomingStream<'_, SecureListener>> for Remote {
    fn connect_info(stream: IncomingStream<'_, SecureListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A connection slot counted against [`Limits`]; freed when the connection is dropped.
struct Slot {
    counts: Arc<Counts>,
    ip: IpAddr,
}

#[derive(Default)]
struct Counts {
    total: AtomicUsize,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
}

impl Counts {
    fn take(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Option<Slot> {
        let mut per = self.per_peer.lock().expect("connection counts");
        let n = per.entry(ip).or_default();
        if *n >= limits.max_per_peer || self.total.load(Ordering::Relaxed) >= limits.max_connections
        {
            if *n == 0 {
                per.remove(&ip);
            }
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per = self.counts.per_peer.lock().expect("connection counts");
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
        self.counts.total.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection: plain TCP or TLS, holding its slot.
pub struct ServerIo {
    stream: Stream,
    _slot: Slot,
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().stream {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// A TCP listener that hands `axum::serve` only connections that finished their TLS handshake
/// (or plain ones, without TLS), within [`Limits`].
pub struct SecureListener {
    ready: tokio::sync::mpsc::Receiver<(ServerIo, Remote)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
    limits: Limits,
}

impl Drop for SecureListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl SecureListener {
    /// Starts accepting on `listener`; `tls` = `None` serves plain text.
    pub fn new(listener: TcpListener, tls: Option<Arc<ServerConfig>>, limits: Limits) -> Self {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        // A small queue: when the server is slow to take connections, accepting slows down too.
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = tls.map(TlsAcceptor::from);
        let accept_task = tokio::spawn(accept_loop(listener, acceptor, limits, tx));
        SecureListener {
            ready,
            local,
            accept_task,
            limits,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    limits: Limits,
    tx: tokio::sync::mpsc::Sender<(ServerIo, Remote)>,
) {
    let counts = Arc::new(Counts::default());
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = counts.take(addr.ip(), &limits) else {
            tracing::debug!(%addr, "connection refused: listener or peer at its connection cap");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = acceptor.clone() else {
            let io = ServerIo {
                stream: Stream::Plain(tcp),
                _slot: slot,
            };
            let remote = Remote {
                addr,
                client_cert: None,
            };
            if tx.send((io, remote)).await.is_err() {
                return;
            }
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out");
                        return;
                    }
                };
            let client_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            let io = ServerIo {
                stream: Stream::Tls(Box::new(tls)),
                _slot: slot,
            };
            let _ = tx.send((io, Remote { addr, client_cert })).await;
        });
    }
}

impl axum::serve::Listener for SecureListener {
    type Io = ServerIo;
    type Addr = Remote;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended (only by a panic): serve nothing more, without spinning.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Remote {
            addr: self.local,
            client_cert: None,
        })
    }
}

/// Serves `router` (HTTP/1.1) on `listener` until `shutdown` resolves, then lets open
/// requests finish. Handlers may extract `ConnectInfo<Remote>`. A connection that does not
/// send a complete request head within [`Limits::idle_timeout`] of waiting for one (idle
/// keep-alive, or headers trickled slowly) is closed; bodies are bounded by the routes'
/// limits and the callers' own timeouts.
pub async fn serve(
    mut listener: SecureListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let idle = listener.limits.idle_timeout;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every connection task holds a sender; `recv` ends once they are all gone.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, remote) = tokio::select! {
            c = listener.ready.recv() => match c {
                Some(c) => c,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(remote.clone()));
            let mut router = router.clone();
            tower_service::Service::call(&mut router, req)
        });
        let mut stop = stop_rx.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            let _open = open;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(idle);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("connection: {e}");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_tx);
    let _ = open_rx.recv().await;
    Ok(())
}
