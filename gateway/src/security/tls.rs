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

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use hyper_util::client::legacy::connect::HttpConnector;
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

pub use super::listener::{Limits, Remote, SecureListener, ServerIo, serve};

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

/// TLS of an export destination's `https://` endpoint (a webhook's `ca_file`, `cert_file`,
/// `key_file`, `server_name`, `insecure_skip_verify`; rqlite's CDC `tls` options).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationTls {
    /// CA certificates to trust; `None`: the system's bundle ([`system_roots`]).
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key to present.
    pub client: Option<(PathBuf, PathBuf)>,
    /// The name the endpoint's certificate must carry instead of the URL's host.
    pub server_name: Option<String>,
    /// Accept any certificate (rqlite's `insecure_skip_verify`; for tests only).
    pub insecure_skip_verify: bool,
}

/// Where the system's CA bundle is looked for when `SSL_CERT_FILE` is not set (Debian and
/// derivatives, then Fedora and derivatives).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// The system's trust anchors: the PEM bundle named by `SSL_CERT_FILE`, or the first of
/// [`SYSTEM_BUNDLES`] present (certificates rustls cannot parse are skipped).
pub fn system_roots() -> io::Result<Arc<RootCertStore>> {
    let path = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .or_else(|| {
            SYSTEM_BUNDLES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .ok_or_else(|| {
            invalid(format!(
                "no system CA bundle ({}; or set SSL_CERT_FILE): name a ca_file",
                SYSTEM_BUNDLES.join(", ")
            ))
        })?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(load_certs(&path)?);
    if added == 0 {
        return Err(invalid(format!(
            "CA bundle {}: no usable certificate",
            path.display()
        )));
    }
    Ok(Arc::new(roots))
}

/// The hyper connector for an export destination: `https://` with `t`, `http://` plain.
/// Files are read now (an error names the file).
pub fn destination_connector(
    mut http: HttpConnector,
    t: &DestinationTls,
) -> io::Result<NodeConnector> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS protocol versions: {e}")))?;
    let b = if t.insecure_skip_verify {
        b.dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert))
    } else {
        let roots = match &t.ca_file {
            Some(ca) => load_roots(ca)?,
            None => system_roots()?,
        };
        b.with_root_certificates(roots)
    };
    let config = match &t.client {
        Some((cert, key)) => b.with_client_cert_resolver(ReloadingCert::load(cert, key)?),
        None => b.with_no_client_auth(),
    };
    http.enforce_http(false);
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    let b = match &t.server_name {
        Some(name) => {
            let name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|e| invalid(format!("server_name {name:?}: {e}")))?;
            b.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => b,
    };
    Ok(b.enable_http1().wrap_connector(http))
}

/// `insecure_skip_verify`: any certificate is accepted (the handshake's signatures are still
/// checked, so the connection is encrypted, but to whoever answers).
#[derive(Debug)]
struct AnyServerCert;

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
