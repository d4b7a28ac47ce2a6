//! The cluster launcher: real `cairn node` processes, their addresses, signals, and the one
//! definition of "the leader" ([`leader_of`]) that the tests, the fault suite, the bench and
//! the QEMU end-to-end all use.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value as Json;

use crate::http::{Auth, Client, Reply};
use crate::{TIMEOUT, poll};

/// How long one `/status` read of a leader lookup may take: a paused or overloaded node is
/// skipped for that round rather than stalling it.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Path of the debug `cairn` binary, built on first use (`cargo build -p cairn-gateway --bin
/// cairn`, a no-op when `cargo test --workspace` already built it), or `CAIRN_BIN`.
pub fn cairn_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("CAIRN_BIN") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "cairn-gateway", "--bin", "cairn"])
            .current_dir(root)
            .status()
            .expect("running cargo build for the cairn binary");
        assert!(status.success(), "building the cairn binary failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        let bin = target.join("debug").join("cairn");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// What one node says about leadership, from its `GET /status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Index of the node in [`Cluster::nodes`].
    pub index: usize,
    pub id: u64,
    pub term: u64,
    /// The leader this node names, if it knows one.
    pub leader_id: Option<u64>,
    /// The node's Raft state is `Leader`.
    pub leads: bool,
}

impl View {
    /// The view of node `id` (at `index`) from its `/status`.
    pub fn of(index: usize, id: u64, status: &Json) -> Option<View> {
        let raft = &status["raft"];
        Some(View {
            index,
            id,
            term: raft["term"].as_u64()?,
            leader_id: raft["leader_id"].as_u64(),
            leads: raft["state"] == "Leader",
        })
    }
}

/// The leader among the nodes that answered: the node that says it leads (state `Leader`,
/// naming itself) in the highest term any of them reports, and that, when any other node
/// answered, at least one other node names as its leader.
///
/// The highest term rules out a deposed leader cut off in a minority (it still says it leads,
/// in its old term) and a restarted node that still names the leader it knew; the naming
/// rules out a node that has just won an election nobody has heard from yet. This is the
/// harness's only definition of "the leader"; it returns an index into `views`' nodes.
pub fn leader_of(views: &[View]) -> Option<usize> {
    let top = views.iter().map(|v| v.term).max()?;
    let l = views
        .iter()
        .find(|v| v.leads && v.term == top && v.leader_id == Some(v.id))?;
    let named = views.len() == 1
        || views
            .iter()
            .any(|v| v.id != l.id && v.leader_id == Some(l.id));
    named.then_some(l.index)
}

/// Builds the command that runs the daemon; arguments (`node --node-id ...`) are appended.
pub type Launcher = Arc<dyn Fn() -> Command + Send + Sync>;

/// Where a node runs, for fault tests: called before every start of node `id` with its data
/// dir and the command about to run; may adjust the command (enter a network namespace,
/// mount a tmpfs on the dir) and returns the address to bind instead of `127.0.0.1`.
pub type Place = Arc<dyn Fn(u64, &Path, &mut Command) -> String + Send + Sync>;

/// Settings for a cluster's nodes; `Options::default()` runs [`cairn_bin`] in a temp dir.
#[derive(Clone, Default)]
pub struct Options {
    /// Extra `cairn node` flags for every node.
    pub extra: Vec<String>,
    /// `cairn.toml` text every node reads (`--config`), written into the cluster's directory.
    pub config: Option<String>,
    /// How to run the daemon instead of `Command::new(cairn_bin())`: the bench runs a release
    /// build, the ARM check a cross-built binary under qemu-user.
    pub launcher: Option<Launcher>,
    /// `RUST_LOG` of the nodes (default `info,openraft=error`).
    pub log: Option<String>,
    /// Keep data and logs in this directory (emptied first, left in place afterwards) instead
    /// of a temp dir removed on drop.
    pub dir: Option<PathBuf>,
    /// How long start-up, readiness, a leader, an accepted write and a clean exit may take
    /// (default [`TIMEOUT`]; a node under qemu-user is slower).
    pub timeout: Option<Duration>,
    /// Authentication and TLS on every node (default: none, loopback nodes run open).
    pub security: Option<Security>,
}

/// The harness's administrator in [`Security::users`]: every permission.
pub const ADMIN: (&str, &str) = ("admin", "admin-pw");
/// The user nodes join as (`--join-as`): `join` only.
pub const JOINER: (&str, &str) = ("joiner", "joiner-pw");

/// Authentication and TLS for a cluster's nodes: an `--auth` file, certificates from
/// `cairn certs` (one cluster CA in the cluster's directory, one node certificate per node
/// naming the address it binds), HTTPS on the API and mutual TLS between nodes. The harness
/// talks to the nodes as [`ADMIN`], trusting the cluster CA; nodes join as [`JOINER`].
#[derive(Debug, Clone)]
pub struct Security {
    /// rqlite's auth file (a JSON list); must list [`ADMIN`] and [`JOINER`] as they are.
    /// `Json::Null`: no `--auth` (TLS alone, the API open as on any loopback node).
    pub users: Json,
    /// `--http-cert`/`--http-key` (the node certificate) on every node.
    pub http_tls: bool,
    /// `--node-cert`, `--node-key`, `--node-ca-cert`, `--node-verify-client` on every node.
    pub node_tls: bool,
}

impl Security {
    /// Auth, HTTPS and node mutual TLS, with [`ADMIN`], [`JOINER`] and nothing for anonymous.
    pub fn full() -> Security {
        Security {
            users: serde_json::json!([
                {"username": ADMIN.0, "password": ADMIN.1, "perms": ["all"]},
                {"username": JOINER.0, "password": JOINER.1, "perms": ["join"]},
            ]),
            http_tls: true,
            node_tls: true,
        }
    }
}

impl Options {
    /// Runs `bin` for every node.
    pub fn binary(bin: impl Into<PathBuf>) -> Options {
        let bin = bin.into();
        Options {
            launcher: Some(Arc::new(move || Command::new(&bin))),
            ..Options::default()
        }
    }

    /// Elections after 1.5–3 s of silence ([`crate::SLOW_ELECTIONS`]) instead of the
    /// product's 150–300 ms, for a test that asserts who leads or asks the leader for
    /// something a follower answers differently.
    pub fn slow_elections() -> Options {
        Options {
            config: Some(crate::SLOW_ELECTIONS.into()),
            ..Options::default()
        }
    }

    /// Snapshots every `threshold` applied entries, keeping `keep` entries behind them, so a
    /// stopped node soon needs a snapshot to catch up.
    pub fn snapshot_often(threshold: u64, keep: u64) -> Options {
        Options {
            extra: vec![
                "--snapshot-threshold".into(),
                threshold.to_string(),
                "--snapshot-keep-logs".into(),
                keep.to_string(),
            ],
            ..Options::default()
        }
    }
}

/// One `cairn node` process (or its remains, when stopped).
pub struct Node {
    pub id: u64,
    pub dir: PathBuf,
    /// `host:port` of the HTTP API.
    pub http: String,
    /// `host:port` of the Raft transport.
    pub raft: String,
    /// `host:port` of the device port (kept across restarts, like the others).
    pub device: String,
    extra: Vec<String>,
    place: Option<Place>,
    child: Option<Child>,
    /// How the harness talks to it (credentials, CA) and its API's scheme.
    auth: Auth,
    scheme: &'static str,
}

impl Node {
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.http, path)
    }

    /// What the harness authenticates with (the cluster's administrator and CA, if any).
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// A client with the harness's credentials and CA, requests bounded by [`TIMEOUT`].
    pub fn client(&self) -> Client {
        Client::with_auth(TIMEOUT, None, &self.auth)
    }

    /// The device address this node reports in `/status`.
    pub fn device_addr(&self) -> String {
        self.status().expect("status")["device_addr"]
            .as_str()
            .expect("device_addr")
            .to_string()
    }

    /// Device records this node applied (`/status` `ingress.records_applied`), 0 if it does
    /// not answer.
    pub fn records_applied(&self) -> u64 {
        self.status()
            .and_then(|s| s["ingress"]["records_applied"].as_u64())
            .unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Whether the harness holds a process for this node (not killed, terminated or exited).
    pub fn is_started(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `GET /status`, or `None` if the node does not answer.
    pub fn status(&self) -> Option<Json> {
        let r = self.client().get(&self.url("/status"));
        (r.status == 200).then_some(r.body)
    }

    /// `GET /status` giving up after `timeout` (a paused node must not stall the caller).
    pub fn status_within(&self, timeout: Duration) -> Option<Json> {
        let r = Client::with_auth(timeout, None, &self.auth).get(&self.url("/status"));
        (r.status == 200).then_some(r.body)
    }

    /// Whether `GET /readyz` answers 200 (the node knows a leader).
    pub fn is_ready(&self) -> bool {
        self.client().get(&self.url("/readyz")).status == 200
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// `POST /db/execute` with `statements` (rqlite JSON), with query string `qs`.
    pub fn execute(&self, statements: &Json, qs: &str) -> Reply {
        self.client()
            .post(&self.url(&format!("/db/execute{qs}")), statements)
    }

    /// `GET /db/query?q=SQL&level=LEVEL`.
    pub fn query(&self, sql: &str, level: &str) -> Reply {
        self.client()
            .get_query(&self.url("/db/query"), &[("q", sql), ("level", level)])
    }

    /// The rows of a successful single-statement query (empty if none), panicking on errors.
    /// A `503` (no leader for a moment, e.g. an election on a loaded machine) is retried, as
    /// an rqlite client would.
    pub fn rows(&self, sql: &str, level: &str) -> Vec<Vec<Json>> {
        self.try_rows(sql, level)
            .unwrap_or_else(|res| panic!("query error on node {}: {res}", self.id))
    }

    /// Like [`Node::rows`], but a SQL error comes back as the result object (`{"error":
    /// ...}`) instead of a panic; anything but HTTP 200 or 503 still panics.
    pub fn try_rows(&self, sql: &str, level: &str) -> Result<Vec<Vec<Json>>, Json> {
        let r = poll(
            TIMEOUT,
            &format!("query on node {} to answer", self.id),
            || Some(self.query(sql, level)).filter(|r| r.status != 503),
        );
        assert_eq!(
            r.status, 200,
            "query on node {} failed: {:?}",
            self.id, r.body
        );
        let res = &r.body["results"][0];
        if res.get("error").is_some() {
            return Err(res.clone());
        }
        Ok(res["values"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| r.as_array().cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn raft_u64(&self, key: &str) -> Option<u64> {
        self.status()?.get("raft")?.get(key)?.as_u64()
    }

    pub fn applied_index(&self) -> Option<u64> {
        self.raft_u64("applied_index")
    }

    /// A digest of every user table's rows, read locally (`level=none`).
    pub fn checksum(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.table_digests().hash(&mut h);
        h.finish()
    }

    /// Per user table: (name, row count, digest of its rows), read locally (`level=none`).
    pub fn table_digests(&self) -> Vec<TableDigest> {
        let tables = self.rows(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' \
             AND substr(name, 1, 7) != '_cairn_' ORDER BY name",
            "none",
        );
        let mut out = Vec::new();
        for t in tables {
            let name = t[0].as_str().expect("table name").to_string();
            // Sorted here rather than `ORDER BY rowid`: device tables are WITHOUT ROWID.
            let mut rows: Vec<String> = self
                .rows(&format!("SELECT * FROM \"{name}\""), "none")
                .into_iter()
                .map(|r| Json::from(r).to_string())
                .collect();
            rows.sort();
            let mut h = DefaultHasher::new();
            rows.hash(&mut h);
            out.push((name, rows.len(), h.finish()));
        }
        out
    }
}

/// One user table as [`Node::table_digests`] reads it: (name, row count, digest of its rows).
pub type TableDigest = (String, usize, u64);

/// The cluster's directory: a temp dir removed on drop, or one the caller keeps.
enum Dir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

/// Real `cairn node` processes. Dropping it kills them (and removes a temp dir).
pub struct Cluster {
    pub nodes: Vec<Node>,
    extra: Vec<String>,
    launcher: Launcher,
    log: String,
    timeout: Duration,
    place: Option<Place>,
    dir: Dir,
    security: Option<Security>,
}

impl Cluster {
    /// Starts `n` nodes: node 1 bootstraps, the others join it; waits until all are voters
    /// and a leader is known.
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, Options::default())
    }

    pub fn start_with(n: usize, opts: Options) -> Cluster {
        Self::start_placed(n, opts, None)
    }

    /// Like [`Cluster::start_with`], with every node (also those added later) placed by
    /// `place` (see [`Place`]).
    pub fn start_placed(n: usize, opts: Options, place: Option<Place>) -> Cluster {
        let mut c = Self::unformed(opts, place);
        c.spawn_new(&["--bootstrap"]);
        c.wait_ready(0);
        for _ in 1..n {
            c.add_node(&[]);
        }
        let ids: Vec<u64> = c.nodes.iter().map(|n| n.id).collect();
        poll(c.timeout, "all nodes to be voters", || {
            let s = c.nodes[c.leader()].status()?;
            let voters: Vec<u64> = serde_json::from_value(s["raft"]["voters"].clone()).ok()?;
            (voters == ids).then_some(())
        });
        c
    }

    /// A cluster with no node yet, for tests that form it themselves ([`Cluster::spawn_at`]).
    pub fn empty(opts: Options) -> Cluster {
        Self::unformed(opts, None)
    }

    fn unformed(opts: Options, place: Option<Place>) -> Cluster {
        let dir = match opts.dir {
            Some(d) => {
                if d.exists() {
                    std::fs::remove_dir_all(&d)
                        .unwrap_or_else(|e| panic!("clearing {}: {e}", d.display()));
                }
                std::fs::create_dir_all(&d)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
                Dir::Kept(d)
            }
            None => Dir::Temp(
                tempfile::Builder::new()
                    .prefix("cairn-test-")
                    .tempdir()
                    .expect("temp dir"),
            ),
        };
        let mut c = Cluster {
            nodes: Vec::new(),
            extra: opts.extra,
            launcher: opts
                .launcher
                .unwrap_or_else(|| Arc::new(|| Command::new(cairn_bin()))),
            log: opts.log.unwrap_or_else(|| "info,openraft=error".into()),
            timeout: opts.timeout.unwrap_or(TIMEOUT),
            place,
            dir,
            security: opts.security,
        };
        c.prepare_security();
        if let Some(text) = opts.config {
            let path = c.dir().join("cairn.toml");
            std::fs::write(&path, text).expect("writing cairn.toml");
            c.extra
                .extend(["--config".to_string(), path.display().to_string()]);
        }
        c
    }

    pub fn dir(&self) -> &Path {
        match &self.dir {
            Dir::Temp(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }

    /// Writes the auth file and creates the cluster CA (`cairn certs init`), if secure.
    fn prepare_security(&mut self) {
        let Some(sec) = &self.security else {
            return;
        };
        if !sec.users.is_null() {
            let auth = self.dir().join("auth.json");
            std::fs::write(&auth, sec.users.to_string()).expect("writing auth.json");
            self.extra.extend([
                "--auth".to_string(),
                auth.display().to_string(),
                "--join-as".to_string(),
                JOINER.0.to_string(),
            ]);
        }
        if sec.http_tls || sec.node_tls {
            let ca = self.dir().join("ca");
            self.certs(&["init", &ca.display().to_string()]);
        }
    }

    /// Runs `cairn certs ARGS` (the same binary as the nodes), panicking on failure.
    pub fn certs(&self, args: &[&str]) {
        let out = (self.launcher)()
            .arg("certs")
            .args(args)
            .output()
            .expect("running cairn certs");
        assert!(
            out.status.success(),
            "cairn certs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Where `cairn certs issue` put the cluster's certificates (`NAME.crt`, `ca.crt`).
    pub fn tls_dir(&self) -> PathBuf {
        self.dir().join("tls")
    }

    /// The cluster CA's directory (`ca.crt`, `ca.key`), for issuing more certificates.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir().join("ca")
    }

    /// The harness's client identity: [`ADMIN`] and the cluster CA, when secure.
    pub fn auth(&self) -> Auth {
        match &self.security {
            None => Auth::default(),
            Some(sec) => Auth {
                user: (!sec.users.is_null()).then(|| (ADMIN.0.into(), ADMIN.1.into())),
                ca_cert: sec.http_tls.then(|| self.tls_dir().join("ca.crt")),
            },
        }
    }

    /// The TLS flags of node `id` bound on `host`, issuing its certificate first.
    fn tls_flags(&self, id: u64, host: &str) -> Vec<String> {
        let Some(sec) = self.security.as_ref().filter(|s| s.http_tls || s.node_tls) else {
            return Vec::new();
        };
        let dir = self.tls_dir();
        let name = format!("node{id}");
        let (crt, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        if !crt.exists() {
            self.certs(&[
                "issue",
                "--ca",
                &self.ca_dir().display().to_string(),
                "--name",
                &name,
                "--ip",
                host,
                "--out",
                &dir.display().to_string(),
            ]);
        }
        let (crt, key) = (crt.display().to_string(), key.display().to_string());
        let ca = dir.join("ca.crt").display().to_string();
        let mut flags = Vec::new();
        if sec.http_tls {
            flags.extend([
                "--http-cert".into(),
                crt.clone(),
                "--http-key".into(),
                key.clone(),
            ]);
        }
        if sec.node_tls {
            flags.extend([
                "--node-cert".into(),
                crt,
                "--node-key".into(),
                key,
                "--node-ca-cert".into(),
                ca,
                "--node-verify-client".into(),
            ]);
        }
        flags
    }

    /// Adds a node that joins through the leader's HTTP API, with extra flags.
    pub fn add_node(&mut self, extra: &[&str]) -> usize {
        let via = self.nodes[self.leader()].url("");
        let mut flags = vec!["--join".to_string(), via];
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let i = self.spawn_new(&flags);
        self.wait_ready(i);
        i
    }

    /// Starts the next node with `flags` on the given HTTP and Raft addresses (chosen before
    /// start, so nodes can name each other, as `--bootstrap-expect` needs), without waiting
    /// for it to be ready.
    pub fn spawn_at(&mut self, http: &str, raft: &str, flags: &[&str]) -> usize {
        let i = self.spawn_node(flags, Some((http, raft)));
        self.spawn(i);
        i
    }

    /// Replaces the flags node `i` was started with (`--bootstrap`, `--join`, ...) for its
    /// next start; the cluster's own flags stay.
    pub fn set_flags(&mut self, i: usize, flags: &[&str]) {
        let mut extra = self.extra.clone();
        extra.extend(flags.iter().map(|s| s.to_string()));
        self.nodes[i].extra = extra;
    }

    fn spawn_new(&mut self, flags: &[&str]) -> usize {
        let i = self.spawn_node(flags, None);
        self.spawn(i);
        i
    }

    fn spawn_node(&mut self, flags: &[&str], at: Option<(&str, &str)>) -> usize {
        let id = self.nodes.len() as u64 + 1;
        let node_dir = self.dir().join(format!("node{id}"));
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let mut extra: Vec<String> = self.extra.clone();
        extra.extend(flags.iter().map(|s| s.to_string()));
        self.nodes.push(Node {
            id,
            dir: node_dir,
            http: at.map_or("127.0.0.1:0", |a| a.0).into(),
            raft: at.map_or("127.0.0.1:0", |a| a.1).into(),
            extra,
            device: at.map_or_else(String::new, |_| "127.0.0.1:0".into()),
            place: self.place.clone(),
            child: None,
            auth: self.auth(),
            scheme: if self.security.as_ref().is_some_and(|s| s.http_tls) {
                "https"
            } else {
                "http"
            },
        });
        self.nodes.len() - 1
    }

    /// Starts node `i`'s process (same flags, ports and data as before) and waits until it
    /// wrote the addresses it bound.
    fn spawn(&mut self, i: usize) {
        let mut cmd = (self.launcher)();
        let host = match &self.nodes[i].place {
            Some(place) => place(self.nodes[i].id, &self.nodes[i].dir, &mut cmd),
            None => "127.0.0.1".into(),
        };
        let tls_flags = self.tls_flags(self.nodes[i].id, &host);
        let node = &mut self.nodes[i];
        if node.http == "127.0.0.1:0" {
            // First start: bind where the placement says; restarts reuse the bound ports.
            node.http = format!("{host}:0");
            node.raft = format!("{host}:0");
            node.device = format!("{host}:0");
        }
        let addrs = node.dir.join("addrs.json");
        let _ = std::fs::remove_file(&addrs);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("node.log"))
            .expect("log file");
        cmd.arg("node");
        // A node's own `--node-id` (an rqlite-style name) wins over the harness's number.
        if !node.extra.iter().any(|a| a == "--node-id") {
            cmd.args(["--node-id", &node.id.to_string()]);
        }
        let child = cmd
            .arg("--data-dir")
            .arg(&node.dir)
            .args(["--http-addr", &node.http, "--raft-addr", &node.raft])
            .args(["--device-addr", &node.device])
            .args(&node.extra)
            .args(&tls_flags)
            .env("RUST_LOG", &self.log)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        node.child = Some(child);
        let bound: Json = poll(self.timeout, "the node to write addrs.json", || {
            // Checked before the read: a node may write the file and exit right after.
            let running = node.is_running();
            let bound = std::fs::read(&addrs)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            assert!(
                bound.is_some() || running,
                "node {} exited:\n{}",
                node.id,
                node.log()
            );
            bound
        });
        node.http = bound["http_addr"].as_str().expect("http_addr").to_string();
        node.raft = bound["raft_addr"].as_str().expect("raft_addr").to_string();
        if let Some(d) = bound["device_addr"].as_str().filter(|d| !d.is_empty()) {
            node.device = d.to_string();
        }
    }

    /// Waits until node `i` answers `/readyz` (it knows a leader).
    pub fn wait_ready(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        poll(self.timeout, &format!("node {} to be ready", n.id), || {
            assert!(n.is_running(), "node {} exited:\n{}", n.id, n.log());
            n.is_ready().then_some(())
        });
    }

    /// What every started node not in `skip` says about leadership (one `/status` each;
    /// nodes that do not answer within 2 s are left out).
    pub fn views(&self, skip: &[usize]) -> Vec<View> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].child.is_some() && !skip.contains(i))
            .filter_map(|i| {
                let n = &self.nodes[i];
                View::of(i, n.id, &n.status_within(STATUS_TIMEOUT)?)
            })
            .collect()
    }

    /// Index of the leader ([`leader_of`]) among started nodes not in `skip`, if one is
    /// known right now.
    pub fn find_leader(&self, skip: &[usize]) -> Option<usize> {
        leader_of(&self.views(skip))
    }

    /// Index (into `nodes`) of the leader, waiting up to [`TIMEOUT`] (or
    /// [`Options::timeout`]) for one.
    pub fn leader(&self) -> usize {
        poll(self.timeout, "a leader", || self.find_leader(&[]))
    }

    /// The first column of the first row of `sql` on the leader, read linearizably, as a
    /// count (0 if it is not one).
    pub fn count(&self, sql: &str) -> u64 {
        self.nodes[self.leader()].rows(sql, "linearizable")[0][0]
            .as_u64()
            .unwrap_or(0)
    }

    /// Waits for a leader other than node id `old` and returns its index.
    pub fn wait_for_new_leader(&self, old: u64) -> usize {
        poll(self.timeout, "a new leader", || {
            let i = self.find_leader(&[])?;
            (self.nodes[i].id != old).then_some(i)
        })
    }

    /// Indexes of started nodes other than the leader.
    pub fn followers(&self) -> Vec<usize> {
        let l = self.leader();
        (0..self.nodes.len())
            .filter(|&i| i != l && self.nodes[i].child.is_some())
            .collect()
    }

    /// `SIGKILL`: the process gets no chance to clean up.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            // SAFETY: plain kill(2) on a child we own.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// `SIGTERM` and wait for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self, i: usize) -> bool {
        let Some(mut c) = self.nodes[i].child.take() else {
            return false;
        };
        // SAFETY: plain kill(2) on a child we own.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = poll(self.timeout, "the node to exit after SIGTERM", || {
            c.try_wait().ok().flatten()
        });
        status.success()
    }

    /// Starts a stopped node again on the same ports, data and flags, and waits until it is
    /// ready (it already holds its membership, so `--bootstrap`/`--join` change nothing).
    pub fn restart(&mut self, i: usize) {
        self.relaunch(i);
        self.wait_ready(i);
    }

    /// Deletes everything in stopped node `i`'s data dir but its log (`node.log`): a gateway
    /// whose disk was lost or replaced.
    pub fn wipe(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "node {} is running",
            self.nodes[i].id
        );
        for e in std::fs::read_dir(&self.nodes[i].dir).expect("node dir") {
            let p = e.expect("dir entry").path();
            if p.file_name().is_some_and(|n| n == "node.log") {
                continue;
            }
            if p.is_dir() {
                std::fs::remove_dir_all(&p).expect("wiping");
            } else {
                std::fs::remove_file(&p).expect("wiping");
            }
        }
    }

    /// Starts a stopped node again without waiting for it to become ready.
    pub fn relaunch(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "node {} is still running",
            self.nodes[i].id
        );
        self.spawn(i);
    }

    /// Waits for node `i`'s process to exit on its own.
    pub fn wait_exit(&mut self, i: usize) -> std::process::ExitStatus {
        let mut c = self.nodes[i].child.take().expect("node is not running");
        poll(self.timeout, "the node to exit", || {
            c.try_wait().ok().flatten()
        })
    }

    /// Waits until every started node has applied what the leader has committed.
    pub fn wait_converged(&self) {
        let l = self.leader();
        let target = poll(TIMEOUT, "the leader's commit index", || {
            self.nodes[l].status()?["raft"]["commit_index"].as_u64()
        });
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            poll(
                TIMEOUT,
                &format!("node {} to apply index {target}", n.id),
                || (n.applied_index()? >= target).then_some(()),
            );
        }
    }

    /// Asserts every started node holds identical table contents; returns the checksum.
    ///
    /// The nodes are read one after the other, so an entry committed after the convergence
    /// target was taken (a load's last entry, a leader's own entry) can be applied between two
    /// reads: the comparison is taken again, after converging again, a few times; replicas
    /// that still differ then are a divergence.
    pub fn assert_identical(&self) -> u64 {
        let mut sums: Vec<(u64, u64)> = Vec::new();
        for attempt in 0..10 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            self.wait_converged();
            sums = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .map(|n| (n.id, n.checksum()))
                .collect();
            if sums.windows(2).all(|w| w[0].1 == w[1].1) {
                break;
            }
            eprintln!("replicas differ (attempt {attempt}, comparing again): {sums:?}");
        }
        if !sums.windows(2).all(|w| w[0].1 == w[1].1) {
            let tables: Vec<(u64, Vec<TableDigest>)> = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .map(|n| (n.id, n.table_digests()))
                .collect();
            panic!("replicas differ: {sums:?}; per table (name, rows, digest): {tables:?}");
        }
        sums[0].1
    }

    /// Executes on the leader, retrying while a new leader refuses writes for a moment.
    pub fn execute(&self, statements: &Json) -> Json {
        poll(self.timeout, "an accepted write", || {
            let l = self.find_leader(&[])?;
            let r = self.nodes[l].execute(statements, "");
            (r.status == 200).then_some(r.body)
        })
    }

    /// Prints the last lines of every node's log (done on drop when a test panics).
    pub fn print_log_tails(&self) {
        for n in &self.nodes {
            let log = n.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "---- last lines of node {} ({}) ----\n{}",
                n.id,
                n.dir.display(),
                tail.join("\n")
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
        if std::thread::panicking() {
            self.print_log_tails();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(id: u64, term: u64, leader_id: Option<u64>, leads: bool) -> View {
        View {
            index: id as usize - 1,
            id,
            term,
            leader_id,
            leads,
        }
    }

    #[test]
    fn test_leader_is_named_and_of_the_highest_term() {
        // Settled: everyone names node 2.
        let settled = [
            v(1, 4, Some(2), false),
            v(2, 4, Some(2), true),
            v(3, 4, Some(2), false),
        ];
        assert_eq!(leader_of(&settled), Some(1));
        // A deposed leader in a minority still says it leads in term 4; node 3 leads term 5.
        let deposed = [
            v(1, 4, Some(1), true),
            v(2, 5, Some(3), false),
            v(3, 5, Some(3), true),
        ];
        assert_eq!(leader_of(&deposed), Some(2));
        // A restarted node still names the old leader: not enough to make it the leader.
        let restarted = [v(1, 4, Some(2), false), v(3, 5, Some(3), true)];
        assert_eq!(leader_of(&restarted), None);
        // Just elected, nobody has heard from it yet.
        let fresh = [v(1, 6, None, false), v(2, 6, Some(2), true)];
        assert_eq!(leader_of(&fresh), None);
        // A single answering node may name itself.
        assert_eq!(leader_of(&[v(1, 1, Some(1), true)]), Some(0));
        // Nobody leads, or nobody answered.
        assert_eq!(
            leader_of(&[v(1, 2, None, false), v(2, 2, None, false)]),
            None
        );
        assert_eq!(leader_of(&[]), None);
    }
}
