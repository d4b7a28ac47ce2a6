//! Real export destinations for the export tests, each a process of the Debian package
//! (`cargo xtask setup` installs them) on a port the OS picked, in a temp dir removed on drop:
//! [`Postgres`] (postgresql-15, run as the `postgres` user when the tests run as root),
//! [`NatsServer`] (nats-server with JetStream), [`Mosquitto`] with a [`MqttSubscriber`]
//! (`mosquitto_sub`), and [`WebhookReceiver`], an HTTP/1.1 endpoint in the test process that
//! counts the keys of rqlite CDC envelopes. Each can be stopped and started again on the
//! same port and data, to take a destination away for a while. And [`Moto`], moto's
//! S3-compatible server (PyPI), where the backup tests and the bench store backups.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;

use crate::{TIMEOUT, poll};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const NATS_SERVER: &str = "/usr/sbin/nats-server";
const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Where the servers listen unless a test names another address (`start_at`).
const LOOPBACK: &str = "127.0.0.1";

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port")
}

fn temp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

fn log_file(path: &Path) -> Stdio {
    Stdio::from(std::fs::File::create(path).expect("log file"))
}

fn stop_child(child: &mut Option<Child>, signal: i32) {
    if let Some(mut c) = child.take() {
        // SAFETY: plain kill(2) on a child we own.
        unsafe { libc::kill(c.id() as i32, signal) };
        let _ = c.wait();
    }
}

/// The `postgres` user's (uid, gid) when running as root (PostgreSQL refuses root).
fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions; getpwnam reads a static NUL-terminated name
    // and its result is used before any other passwd call.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let pw = libc::getpwnam(c"postgres".as_ptr());
        if pw.is_null() {
            return None;
        }
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

/// A PostgreSQL 15 server with `trust` auth on 127.0.0.1.
pub struct Postgres {
    dir: tempfile::TempDir,
    host: String,
    port: u16,
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

impl Postgres {
    pub fn start() -> Result<Postgres> {
        Self::start_at(LOOPBACK)
    }

    /// Listening on `host` (an address of the calling thread's network namespace).
    pub fn start_at(host: &str) -> Result<Postgres> {
        let dir = temp("cairn-pg-");
        let user = postgres_user();
        if let Some((uid, gid)) = user {
            let c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes())?;
            // SAFETY: chown(2) of a path we created.
            if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
                bail!(
                    "chown {}: {}",
                    dir.path().display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        let mut pg = Postgres {
            host: host.to_string(),
            port: free_port(),
            dir,
            user,
            child: None,
        };
        let mut init = pg.command("initdb");
        init.args(["-D", &pg.data().display().to_string()])
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(log_file(&pg.dir.path().join("initdb.log")))
            .stderr(log_file(&pg.dir.path().join("initdb.err")));
        let st = init.status().context("running initdb")?;
        if !st.success() {
            bail!(
                "initdb failed: {}",
                std::fs::read_to_string(pg.dir.path().join("initdb.err")).unwrap_or_default()
            );
        }
        if host != LOOPBACK {
            // initdb trusts loopback only; the test's private network is as closed.
            let hba = pg.data().join("pg_hba.conf");
            let mut f = std::fs::OpenOptions::new().append(true).open(&hba)?;
            writeln!(f, "host all all samenet trust")?;
        }
        pg.launch()?;
        Ok(pg)
    }

    fn command(&self, prog: &str) -> Command {
        let mut c = Command::new(format!("{PG_BIN}/{prog}"));
        c.env("LC_ALL", "C").current_dir(self.dir.path());
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn launch(&mut self) -> Result<()> {
        let mut c = self.command("postgres");
        c.args(["-D", &self.data().display().to_string()])
            .args(["-p", &self.port.to_string()])
            .args(["-k", &self.dir.path().display().to_string()])
            .args(["-c", &format!("listen_addresses={}", self.host)])
            .args(["-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(log_file(
                &self
                    .dir
                    .path()
                    .join(format!("postgres-{}.log", rand_suffix())),
            ));
        self.child = Some(c.spawn().context("starting postgres")?);
        poll(TIMEOUT, "postgres to accept connections", || {
            self.query("SELECT 1").ok()
        });
        Ok(())
    }

    /// A libpq connection string (what an `[[export]]` of kind postgres takes as `url`).
    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.host, self.port
        )
    }

    /// One SQL statement through `psql`, its unaligned output.
    pub fn query(&self, sql: &str) -> Result<String> {
        let out = Command::new("psql")
            .args([
                "-h",
                &self.host,
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-tAXc", sql])
            .env("LC_ALL", "C")
            .output()?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Fast shutdown (clients disconnected), data kept.
    pub fn stop(&mut self) {
        stop_child(&mut self.child, libc::SIGINT);
    }

    /// Starts again on the same port and data.
    pub fn restart(&mut self) -> Result<()> {
        self.launch()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// nats-server with JetStream (store in a temp dir) and its monitoring port.
pub struct NatsServer {
    dir: tempfile::TempDir,
    host: String,
    port: u16,
    monitor: u16,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> Result<NatsServer> {
        Self::start_at(LOOPBACK)
    }

    /// Listening on `host` (an address of the calling thread's network namespace).
    pub fn start_at(host: &str) -> Result<NatsServer> {
        let mut n = NatsServer {
            dir: temp("cairn-nats-"),
            host: host.to_string(),
            port: free_port(),
            monitor: free_port(),
            child: None,
        };
        n.launch()?;
        Ok(n)
    }

    fn launch(&mut self) -> Result<()> {
        let child = Command::new(NATS_SERVER)
            .args(["-a", &self.host, "-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string(), "-js"])
            .args(["-sd", &self.dir.path().display().to_string()])
            .stdout(Stdio::null())
            .stderr(log_file(
                &self.dir.path().join(format!("nats-{}.log", rand_suffix())),
            ))
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        poll(TIMEOUT, "nats-server to serve", || {
            (crate::get(&format!("http://{}:{}/healthz", self.host, self.monitor)).status == 200)
                .then_some(())
        });
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }

    /// Messages the JetStream stream `name` holds (0 if it does not exist yet).
    pub fn messages(&self, name: &str) -> u64 {
        let r = crate::get(&format!(
            "http://{}:{}/jsz?streams=true",
            self.host, self.monitor
        ));
        let accounts = r.body["account_details"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        accounts
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .filter(|s| s["name"] == name)
            .map(|s| s["state"]["messages"].as_u64().unwrap_or(0))
            .sum()
    }

    pub fn stop(&mut self) {
        stop_child(&mut self.child, libc::SIGKILL);
    }

    pub fn restart(&mut self) -> Result<()> {
        self.launch()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A mosquitto broker on 127.0.0.1 (anonymous, no persistence).
pub struct Mosquitto {
    dir: tempfile::TempDir,
    host: String,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Result<Mosquitto> {
        Self::start_at(LOOPBACK)
    }

    /// Listening on `host` (an address of the calling thread's network namespace).
    pub fn start_at(host: &str) -> Result<Mosquitto> {
        let dir = temp("cairn-mqtt-");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            // No cap on the subscriber's queue: by default mosquitto drops QoS 1 messages
            // past 1000 queued for a slow subscriber, which a loaded test machine can be.
            format!(
                "listener {port} {host}\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\n"
            ),
        )?;
        let child = Command::new(MOSQUITTO)
            .args(["-c", &conf.display().to_string()])
            .stdout(Stdio::null())
            .stderr(log_file(&dir.path().join("mosquitto.log")))
            .spawn()
            .context("starting mosquitto")?;
        poll(TIMEOUT, "mosquitto to listen", || {
            TcpStream::connect((host, port)).ok()
        });
        Ok(Mosquitto {
            dir,
            host: host.to_string(),
            port,
            child: Some(child),
        })
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.host, self.port)
    }

    /// Subscribes (`mosquitto_sub`, QoS 1) to `topic`, counting each message's `key`.
    pub fn subscribe(&self, topic: &str) -> Result<MqttSubscriber> {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", &self.host, "-p", &self.port.to_string()])
            .args(["-t", topic, "-q", "1"])
            .stdout(Stdio::piped())
            .stderr(log_file(&self.dir.path().join("sub.log")))
            .spawn()
            .context("starting mosquitto_sub")?;
        let keys = Arc::new(Mutex::new(HashMap::new()));
        let out = child.stdout.take().expect("piped stdout");
        let counting = keys.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Json>(&line)
                    && let Some(k) = v["key"].as_str()
                {
                    *counting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(k.to_string())
                        .or_insert(0u32) += 1;
                }
            }
        });
        // Wait until the subscription is in place: a retained probe would be simpler, but
        // the broker has no persistence; a short poll on the process suffices.
        std::thread::sleep(Duration::from_millis(300));
        Ok(MqttSubscriber {
            child: Some(child),
            keys,
        })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGKILL);
    }
}

/// `mosquitto_sub` and the keys it has printed, with how often each came.
pub struct MqttSubscriber {
    child: Option<Child>,
    keys: Arc<Mutex<HashMap<String, u32>>>,
}

impl MqttSubscriber {
    /// (distinct keys, messages).
    pub fn counts(&self) -> (u64, u64) {
        count(&self.keys)
    }
}

impl Drop for MqttSubscriber {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGKILL);
    }
}

fn count(keys: &Mutex<HashMap<String, u32>>) -> (u64, u64) {
    let k = keys.lock().unwrap_or_else(|p| p.into_inner());
    (k.len() as u64, k.values().map(|n| *n as u64).sum())
}

/// An HTTP endpoint in this process receiving rqlite CDC envelopes: answers 200 (or 503
/// while [`WebhookReceiver::set_down`]), counts every event's `key` and keeps every event in
/// arrival order. Envelopes that do not have rqlite's shape are kept in `malformed`.
pub struct WebhookReceiver {
    pub url: String,
    keys: Arc<Mutex<HashMap<String, u32>>>,
    events: Arc<Mutex<Vec<Json>>>,
    down: Arc<AtomicBool>,
    malformed: Arc<Mutex<Vec<String>>>,
    posts: Arc<std::sync::atomic::AtomicU64>,
    tls_failures: Arc<std::sync::atomic::AtomicU64>,
}

/// A CA and a server certificate it issued for `127.0.0.1` and `localhost` (rcgen), for
/// [`WebhookReceiver::start_https`]: PEM texts and the server's rustls config.
pub struct TestCa {
    /// The CA certificate (what a client must trust).
    pub ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    pub fn new(name: &str) -> Result<TestCa> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, name);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])?
            .signed_by(&key, &issuer)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            )?;
        Ok(TestCa {
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
        })
    }
}

impl WebhookReceiver {
    /// Plain HTTP on 127.0.0.1.
    pub fn start() -> Result<WebhookReceiver> {
        Self::start_on(LOOPBACK, None)
    }

    /// Plain HTTP on `host` (an address of the calling thread's network namespace).
    pub fn start_at(host: &str) -> Result<WebhookReceiver> {
        Self::start_on(host, None)
    }

    /// HTTPS on 127.0.0.1 with a certificate of `ca` (`url` is `https://`); connections whose
    /// handshake fails (the client did not trust it) are counted in [`Self::tls_failures`].
    pub fn start_https(ca: &TestCa) -> Result<WebhookReceiver> {
        Self::start_on(LOOPBACK, Some(ca.server.clone()))
    }

    fn start_on(host: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Result<WebhookReceiver> {
        let listener = TcpListener::bind((host, 0))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}/cdc", listener.local_addr()?);
        let r = WebhookReceiver {
            url,
            keys: Arc::default(),
            events: Arc::default(),
            down: Arc::default(),
            malformed: Arc::default(),
            posts: Arc::default(),
            tls_failures: Arc::default(),
        };
        let seen = Seen {
            keys: r.keys.clone(),
            events: r.events.clone(),
            down: r.down.clone(),
            malformed: r.malformed.clone(),
            posts: r.posts.clone(),
        };
        let tls_failures = r.tls_failures.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let seen = seen.clone();
                let tls_failures = tls_failures.clone();
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let Some(config) = tls else {
                        let _ = serve(conn, &seen);
                        return;
                    };
                    let Ok(session) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut stream = rustls::StreamOwned::new(session, conn);
                    while stream.conn.is_handshaking() {
                        if stream.conn.complete_io(&mut stream.sock).is_err() {
                            tls_failures.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    let _ = serve(stream, &seen);
                });
            }
        });
        Ok(r)
    }

    /// HTTPS connections whose handshake failed.
    pub fn tls_failures(&self) -> u64 {
        self.tls_failures.load(Ordering::Relaxed)
    }

    /// While `true`, every POST is answered 503 (the destination is away).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// (distinct keys, events).
    pub fn counts(&self) -> (u64, u64) {
        count(&self.keys)
    }

    pub fn posts(&self) -> u64 {
        self.posts.load(Ordering::Relaxed)
    }

    /// Every event received, in arrival order (repeats included).
    pub fn events(&self) -> Vec<Json> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn malformed(&self) -> Vec<String> {
        self.malformed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What the receiver's connections record.
#[derive(Clone)]
struct Seen {
    keys: Arc<Mutex<HashMap<String, u32>>>,
    events: Arc<Mutex<Vec<Json>>>,
    down: Arc<AtomicBool>,
    malformed: Arc<Mutex<Vec<String>>>,
    posts: Arc<std::sync::atomic::AtomicU64>,
}

fn serve(conn: impl Read + Write, seen: &Seen) -> Result<()> {
    let mut reader = BufReader::new(conn);
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        if seen.down.load(Ordering::Relaxed) {
            reader
                .get_mut()
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")?;
            continue;
        }
        seen.posts.fetch_add(1, Ordering::Relaxed);
        match check_envelope(&body) {
            Ok(events) => {
                let mut m = seen.keys.lock().unwrap_or_else(|p| p.into_inner());
                for e in &events {
                    *m.entry(e["key"].as_str().unwrap_or_default().to_string())
                        .or_insert(0) += 1;
                }
                drop(m);
                seen.events
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(events);
            }
            Err(e) => seen
                .malformed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.to_string()),
        }
        reader
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
    }
}

/// The events of an rqlite CDC envelope (each with its `key`), or what is wrong with its shape:
/// `INSERT` has `after`, `DELETE` `before`, `UPDATE` both.
fn check_envelope(body: &[u8]) -> Result<Vec<Json>> {
    let v: Json = serde_json::from_slice(body)?;
    if !v["node_id"].is_string() {
        bail!("no node_id: {v}");
    }
    let mut events = Vec::new();
    for m in v["payload"].as_array().context("no payload")? {
        if !m["index"].is_u64() || !m["commit_timestamp"].is_i64() {
            bail!("message without index/commit_timestamp: {m}");
        }
        for e in m["events"].as_array().context("no events")? {
            let (before, after) = match e["op"].as_str() {
                Some("INSERT") => (false, true),
                Some("UPDATE") => (true, true),
                Some("DELETE") => (true, false),
                _ => bail!("event with an unknown op: {e}"),
            };
            if !e["table"].is_string()
                || e["before"].is_object() != before
                || e["after"].is_object() != after
            {
                bail!("event without table, or before/after not as its op says: {e}");
            }
            if !e["key"].is_string() {
                bail!("event without key: {e}");
            }
            events.push(e.clone());
        }
    }
    Ok(events)
}

/// moto's standalone S3-compatible server (PyPI `moto[server]`, `cargo xtask setup` installs
/// it) on a free loopback port with one bucket; killed on drop. moto checks no signatures.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Moto {
    /// Starts it and creates `bucket`; its output (a line per request) goes to `log`.
    pub fn start(bucket: &str, log: Option<&Path>) -> Result<Moto> {
        let port = free_port();
        let (out, err) = match log {
            Some(path) => {
                let f = std::fs::File::create(path).context("moto log")?;
                (Stdio::from(f.try_clone()?), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(out)
            .stderr(err)
            .spawn()
            .context(
                "python3 -m moto.server (PyPI moto[server]; `cargo xtask setup` installs it)",
            )?;
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        poll(TIMEOUT, "moto_server to answer", || {
            let r = crate::agent()
                .put(format!("{}/{bucket}", moto.endpoint))
                .send_empty()
                .ok()?;
            r.status().is_success().then_some(())
        });
        Ok(moto)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
