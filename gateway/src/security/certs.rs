//! `cairn certs`: a cluster CA and the certificates of nodes and clients, made with rcgen.
//!
//! ```text
//! cairn certs init /etc/cairn/ca                       # ca.crt, ca.key (0600)
//! cairn certs issue --ca /etc/cairn/ca --name gw1 --ip 192.168.1.10 --out /etc/cairn/tls
//! cairn certs issue --ca /etc/cairn/ca --name ops --client --out ./ops-cert
//! ```
//!
//! A node certificate (`NAME.crt`, `NAME.key`) serves both sides of mutual TLS (server and
//! client authentication) and names its addresses (`--ip`, `--dns`; the name itself too when
//! it is a DNS name), because peers check the address they dialled against it. A `--client`
//! certificate only authenticates a client (the CLI, an HTTP client with `--http-verify-client`).
//! `issue` copies `ca.crt` next to the certificate, so one directory is all a node needs.
//!
//! Keys are ECDSA P-256 (fast to verify on small ARM boards). `issue` signs only with a CA made
//! by `init` (its distinguished name is fixed); it checks every certificate it writes against
//! the CA before writing it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// The subject of a cluster CA made by `cairn certs init` is this plus a fingerprint of its
/// key: two clusters' CAs never share a name (a certificate of the other cluster is then an
/// unknown issuer, not a bad signature), and `issue` rebuilds the name from `ca.key` alone.
const CA_COMMON_NAME: &str = "Cairn cluster CA";
const CA_ORGANIZATION: &str = "Cairn";

/// `cairn certs ...`
#[derive(Debug, clap::Subcommand)]
pub enum CertsCmd {
    /// Create a cluster CA in DIR (ca.crt, and ca.key readable only by its owner).
    Init {
        dir: PathBuf,
        /// Years the CA is valid.
        #[arg(long, default_value_t = 10)]
        years: u32,
    },
    /// Issue a node (or, with --client, a client) certificate signed by the cluster CA.
    Issue(IssueArgs),
}

/// `cairn certs issue` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct IssueArgs {
    /// Directory of the CA made by `cairn certs init`.
    #[arg(long)]
    pub ca: PathBuf,
    /// Certificate name: its common name and file names (NAME.crt, NAME.key).
    #[arg(long)]
    pub name: String,
    /// IP address the node is reached at (repeat for several).
    #[arg(long)]
    pub ip: Vec<IpAddr>,
    /// DNS name the node is reached at (repeat for several).
    #[arg(long)]
    pub dns: Vec<String>,
    /// A client certificate (CLI users, HTTP clients) instead of a node certificate.
    #[arg(long)]
    pub client: bool,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 825)]
    pub days: u32,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `cairn certs ...`, printing what it wrote.
pub fn run(cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init { dir, years } => {
            let ca = Ca::generate(years)?;
            let (crt, key) = ca.write(&dir)?;
            println!(
                "cluster CA written: {} and {}",
                crt.display(),
                key.display()
            );
            println!("keep ca.key off the gateways; copy ca.crt to every node and client");
        }
        CertsCmd::Issue(a) => {
            let ca = Ca::read(&a.ca)?;
            let issued = ca.issue(&a)?;
            let (crt, key) = issued.write(&a.out, &a.name, &ca.cert_pem)?;
            println!(
                "certificate written: {} and {}",
                crt.display(),
                key.display()
            );
            if !a.client {
                let d = a.out.display();
                let n = &a.name;
                println!(
                    "node flags: --node-cert {d}/{n}.crt --node-key {d}/{n}.key --node-ca-cert {d}/ca.crt --node-verify-client"
                );
            }
        }
    }
    Ok(())
}

/// A cluster CA: its certificate and the key that signs with it.
pub struct Ca {
    pub cert_pem: String,
    key: KeyPair,
}

/// A certificate and its private key, in PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn ca_params(key: &KeyPair, years: u32) -> anyhow::Result<CertificateParams> {
    use rcgen::PublicKeyData;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let digest = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
    let fingerprint: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(
        DnType::CommonName,
        format!("{CA_COMMON_NAME} {fingerprint}"),
    );
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(365 * i64::from(years.max(1)));
    Ok(p)
}

fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

impl Ca {
    /// A new CA valid for `years`.
    pub fn generate(years: u32) -> anyhow::Result<Ca> {
        let key = KeyPair::generate()?;
        let cert = ca_params(&key, years)?.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Writes `DIR/ca.crt` and `DIR/ca.key` (0600); refuses to overwrite an existing CA.
    pub fn write(&self, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        if crt.exists() {
            bail!(
                "{} exists already; not replacing a cluster CA",
                crt.display()
            );
        }
        write_private(&key, &self.key.serialize_pem())?;
        std::fs::write(&crt, &self.cert_pem)?;
        Ok((crt, key))
    }

    /// Reads a CA written by [`Ca::write`].
    pub fn read(dir: &Path) -> anyhow::Result<Ca> {
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let key = KeyPair::from_pem(&read("ca.key")?).context("ca.key")?;
        Ok(Ca {
            cert_pem: read("ca.crt")?,
            key,
        })
    }

    fn cert_der(&self) -> anyhow::Result<CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).context("ca.crt is not PEM")
    }

    /// Issues a certificate as `cairn certs issue` describes.
    pub fn issue(&self, a: &IssueArgs) -> anyhow::Result<Issued> {
        if a.name.is_empty() {
            bail!("--name must not be empty");
        }
        if !a.client && a.ip.is_empty() && a.dns.is_empty() && !is_dns_name(&a.name) {
            bail!("a node certificate needs the addresses peers dial it at: --ip or --dns");
        }
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, a.name.as_str());
        dn.push(DnType::OrganizationName, CA_ORGANIZATION);
        p.distinguished_name = dn;
        let mut dns: Vec<String> = a.dns.clone();
        if is_dns_name(&a.name) && !dns.contains(&a.name) {
            dns.insert(0, a.name.clone());
        }
        for d in dns {
            let name = d
                .clone()
                .try_into()
                .with_context(|| format!("{d:?} is not a DNS name"))?;
            p.subject_alt_names.push(SanType::DnsName(name));
        }
        p.subject_alt_names
            .extend(a.ip.iter().map(|ip| SanType::IpAddress(*ip)));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = if a.client {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        };
        p.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(i64::from(a.days.max(1)));

        let issuer = Issuer::new(ca_params(&self.key, 1)?, &self.key);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        self.check_signed(cert.der(), a)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Verifies a freshly issued certificate against this CA the way peers will, so a CA that
    /// `init` did not make (another distinguished name) fails here and not at a handshake.
    fn check_signed(&self, cert: &CertificateDer<'_>, a: &IssueArgs) -> anyhow::Result<()> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der()?)?;
        let roots = std::sync::Arc::new(roots);
        let provider = super::tls::provider();
        let now = UnixTime::now();
        let fail = |e: rustls::Error| {
            anyhow::anyhow!(
                "the issued certificate does not verify against ca.crt ({e}); \
                 `cairn certs issue` signs only with a CA made by `cairn certs init`"
            )
        };
        let client = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()?;
        client.verify_client_cert(cert, &[], now).map_err(fail)?;
        if !a.client {
            let server =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()?;
            let name = match a.ip.first() {
                Some(ip) => ServerName::IpAddress((*ip).into()),
                None => ServerName::try_from(a.dns.first().unwrap_or(&a.name).clone())?,
            };
            server
                .verify_server_cert(cert, &[], &name, &[], now)
                .map_err(fail)?;
        }
        Ok(())
    }
}

fn is_dns_name(s: &str) -> bool {
    s.parse::<IpAddr>().is_err() && ServerName::try_from(s.to_string()).is_ok()
}

impl Issued {
    /// Writes `DIR/NAME.crt`, `DIR/NAME.key` (0600) and `DIR/ca.crt`.
    pub fn write(
        &self,
        dir: &Path,
        name: &str,
        ca_pem: &str,
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (crt, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        write_private(&key, &self.key_pem)?;
        std::fs::write(&crt, &self.cert_pem)?;
        let ca = dir.join("ca.crt");
        match std::fs::read_to_string(&ca) {
            Ok(existing) if existing != ca_pem => {
                bail!("{} holds another CA; not replacing it", ca.display())
            }
            Ok(_) => {}
            Err(_) => std::fs::write(&ca, ca_pem)?,
        }
        Ok((crt, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path, name: &str, ip: &[&str], client: bool) -> IssueArgs {
        IssueArgs {
            ca: dir.join("ca"),
            name: name.into(),
            ip: ip.iter().map(|s| s.parse().unwrap()).collect(),
            dns: Vec::new(),
            client,
            days: 30,
            out: dir.join("out"),
        }
    }

    #[test]
    fn test_init_and_issue_write_files() {
        let d = tempfile::tempdir().unwrap();
        run(CertsCmd::Init {
            dir: d.path().join("ca"),
            years: 1,
        })
        .unwrap();
        // A second init never replaces a CA.
        let e = run(CertsCmd::Init {
            dir: d.path().join("ca"),
            years: 1,
        })
        .unwrap_err();
        assert!(e.to_string().contains("not replacing"), "{e}");
        run(CertsCmd::Issue(args(
            d.path(),
            "gw2",
            &["192.168.1.11"],
            false,
        )))
        .unwrap();
        run(CertsCmd::Issue(args(d.path(), "ops", &[], true))).unwrap();
        let out = d.path().join("out");
        for f in ["gw2.crt", "gw2.key", "ops.crt", "ops.key", "ca.crt"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        assert_eq!(
            std::fs::read(out.join("ca.crt")).unwrap(),
            std::fs::read(d.path().join("ca/ca.crt")).unwrap()
        );
        #[cfg(unix)]
        for key in [d.path().join("ca/ca.key"), out.join("gw2.key")] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        // The written pair loads as a TLS certificate.
        crate::security::tls::ReloadingCert::load(out.join("gw2.crt"), out.join("gw2.key"))
            .unwrap();
        // Issuing the same name again does not overwrite its key.
        assert!(
            run(CertsCmd::Issue(args(
                d.path(),
                "gw2",
                &["192.168.1.11"],
                false
            )))
            .is_err()
        );
    }

    #[test]
    fn test_node_certificate_needs_an_address() {
        let ca = Ca::generate(1).unwrap();
        let d = tempfile::tempdir().unwrap();
        let e = ca
            .issue(&args(d.path(), "10.0.0.1", &[], false))
            .err()
            .unwrap();
        assert!(e.to_string().contains("--ip or --dns"), "{e}");
        // A DNS-like name is its own address.
        ca.issue(&args(d.path(), "gw1", &[], false)).unwrap();
        // Client certificates need none.
        ca.issue(&args(d.path(), "10.0.0.1", &[], true)).unwrap();
    }

    #[test]
    fn test_client_certificate_cannot_serve() {
        let ca = Ca::generate(1).unwrap();
        let d = tempfile::tempdir().unwrap();
        let issued = ca
            .issue(&args(d.path(), "ops", &["127.0.0.1"], true))
            .unwrap();
        use rustls::pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().unwrap()).unwrap();
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::security::tls::provider(),
        )
        .build()
        .unwrap();
        let name = ServerName::IpAddress("127.0.0.1".parse::<IpAddr>().unwrap().into());
        let e = v
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(format!("{e:?}").contains("Purpose"), "{e:?}");
    }

    #[test]
    fn test_issue_refuses_a_foreign_ca_pair() {
        // ca.crt of one CA with ca.key of another: what issue signs would not verify.
        let a = Ca::generate(1).unwrap();
        let b = Ca::generate(1).unwrap();
        let mixed = Ca {
            cert_pem: a.cert_pem.clone(),
            key: b.key,
        };
        let d = tempfile::tempdir().unwrap();
        let e = mixed
            .issue(&args(d.path(), "gw1", &["10.0.0.1"], false))
            .err()
            .unwrap();
        assert!(e.to_string().contains("cairn certs init"), "{e}");
    }

    #[test]
    fn test_two_cas_have_different_names() {
        let a = Ca::generate(1).unwrap();
        let b = Ca::generate(1).unwrap();
        assert_ne!(a.cert_pem, b.cert_pem);
        let sub = |c: &Ca| ca_params(&c.key, 1).unwrap().distinguished_name;
        assert_ne!(sub(&a), sub(&b));
        assert_eq!(sub(&a), sub(&a));
    }
}
