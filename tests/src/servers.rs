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
    port: u16,
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

impl Postgres {
    pub fn start() -> Result<Postgres> {
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
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
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
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// One SQL statement through `psql`, its unaligned output.
    pub fn query(&self, sql: &str) -> Result<String> {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
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
    port: u16,
    monitor: u16,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> Result<NatsServer> {
        let mut n = NatsServer {
            dir: temp("cairn-nats-"),
            port: free_port(),
            monitor: free_port(),
            child: None,
        };
        n.launch()?;
        Ok(n)
    }

    fn launch(&mut self) -> Result<()> {
        let child = Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
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
            (crate::get(&format!("http://127.0.0.1:{}/healthz", self.monitor)).status == 200)
                .then_some(())
        });
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Messages the JetStream stream `name` holds (0 if it does not exist yet).
    pub fn messages(&self, name: &str) -> u64 {
        let r = crate::get(&format!(
            "http://127.0.0.1:{}/jsz?streams=true",
            self.monitor
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
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Result<Mosquitto> {
        let dir = temp("cairn-mqtt-");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )?;
        let child = Command::new(MOSQUITTO)
            .args(["-c", &conf.display().to_string()])
            .stdout(Stdio::null())
            .stderr(log_file(&dir.path().join("mosquitto.log")))
            .spawn()
            .context("starting mosquitto")?;
        poll(TIMEOUT, "mosquitto to listen", || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Ok(Mosquitto {
            dir,
            port,
            child: Some(child),
        })
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Subscribes (`mosquitto_sub`, QoS 1) to `topic`, counting each message's `key`.
    pub fn subscribe(&self, topic: &str) -> Result<MqttSubscriber> {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
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
/// while [`WebhookReceiver::set_down`]), and counts every event's `key`. Envelopes that do
/// not have rqlite's shape are kept in `malformed`.
pub struct WebhookReceiver {
    pub url: String,
    keys: Arc<Mutex<HashMap<String, u32>>>,
    down: Arc<AtomicBool>,
    malformed: Arc<Mutex<Vec<String>>>,
    posts: Arc<std::sync::atomic::AtomicU64>,
}

impl WebhookReceiver {
    pub fn start() -> Result<WebhookReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}/cdc", listener.local_addr()?);
        let r = WebhookReceiver {
            url,
            keys: Arc::default(),
            down: Arc::default(),
            malformed: Arc::default(),
            posts: Arc::default(),
        };
        let (keys, down, malformed, posts) = (
            r.keys.clone(),
            r.down.clone(),
            r.malformed.clone(),
            r.posts.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (keys, down, malformed, posts) =
                    (keys.clone(), down.clone(), malformed.clone(), posts.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &keys, &down, &malformed, &posts);
                });
            }
        });
        Ok(r)
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

    pub fn malformed(&self) -> Vec<String> {
        self.malformed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn serve(
    conn: TcpStream,
    keys: &Mutex<HashMap<String, u32>>,
    down: &AtomicBool,
    malformed: &Mutex<Vec<String>>,
    posts: &std::sync::atomic::AtomicU64,
) -> Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
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
        if down.load(Ordering::Relaxed) {
            conn.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")?;
            continue;
        }
        posts.fetch_add(1, Ordering::Relaxed);
        match check_envelope(&body) {
            Ok(ks) => {
                let mut m = keys.lock().unwrap_or_else(|p| p.into_inner());
                for k in ks {
                    *m.entry(k).or_insert(0) += 1;
                }
            }
            Err(e) => malformed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.to_string()),
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
    }
}

/// The keys of an rqlite CDC envelope, or what is wrong with its shape.
fn check_envelope(body: &[u8]) -> Result<Vec<String>> {
    let v: Json = serde_json::from_slice(body)?;
    if !v["node_id"].is_string() {
        bail!("no node_id: {v}");
    }
    let mut keys = Vec::new();
    for m in v["payload"].as_array().context("no payload")? {
        if !m["index"].is_u64() || !m["commit_timestamp"].is_i64() {
            bail!("message without index/commit_timestamp: {m}");
        }
        for e in m["events"].as_array().context("no events")? {
            if e["op"] != "INSERT" || !e["table"].is_string() || !e["after"].is_object() {
                bail!("event not an INSERT with table and after: {e}");
            }
            keys.push(e["key"].as_str().context("event without key")?.to_string());
        }
    }
    Ok(keys)
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
