//! Harness for end-to-end tests against real `cairn` processes.
//!
//! - [`cairn_bin`] builds the daemon once per test binary (`cargo build -p cairn-gateway
//!   --bin cairn`, a no-op when `cargo test --workspace` already built it) or takes `CAIRN_BIN`.
//! - [`Cluster`] starts real `cairn node` processes on ports the OS picks (`127.0.0.1:0`; each
//!   node writes the addresses it bound to `DATA_DIR/addrs.json`), in a temp dir removed on
//!   drop, where every process is killed too. Restarts reuse the node's ports and data.
//! - Faults are real signals: [`Cluster::kill9`] sends `SIGKILL`, [`Cluster::terminate`]
//!   `SIGTERM`.
//! - Nothing sleeps for a fixed time: [`poll`] retries until a condition holds or a timeout
//!   names what never happened.

pub mod faults;
pub mod history;
pub mod linearizability;
pub mod nemesis;
pub mod netns;
pub mod tmpfs;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

/// How long start-up, elections and catch-up may take before a test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the `cairn` binary, built on first use.
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

/// Retries `f` every 20 ms until it returns `Some`, panicking after `timeout` with `what`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small blocking HTTP client that never turns statuses into errors or follows redirects.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// An HTTP answer: status, `Location` header (if any) and the body parsed as JSON (or a string).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub location: Option<String>,
    pub body: Json,
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
        Err(e) => Reply {
            status: 0,
            location: None,
            body: Json::String(e.to_string()),
        },
    }
}

pub fn get(url: &str) -> Reply {
    reply(agent().get(url).call())
}

pub fn post(url: &str, body: &Json) -> Reply {
    reply(agent().post(url).send_json(body))
}

pub fn delete(url: &str, body: &Json) -> Reply {
    reply(
        agent()
            .delete(url)
            .force_send_body()
            .header("content-type", "application/json")
            .send(body.to_string()),
    )
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
}

impl Node {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `GET /status`, or `None` if the node does not answer.
    pub fn status(&self) -> Option<Json> {
        let r = get(&self.url("/status"));
        (r.status == 200).then_some(r.body)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// `POST /db/execute` with `statements` (rqlite JSON), with query string `qs`.
    pub fn execute(&self, statements: &Json, qs: &str) -> Reply {
        post(&self.url(&format!("/db/execute{qs}")), statements)
    }

    /// `GET /db/query?q=SQL&level=LEVEL`.
    pub fn query(&self, sql: &str, level: &str) -> Reply {
        let r = agent()
            .get(self.url("/db/query"))
            .query("q", sql)
            .query("level", level)
            .call();
        reply(r)
    }

    /// The rows of a successful single-statement query (empty if none), panicking on errors.
    /// A `503` (no leader for a moment, e.g. an election on a loaded machine) is retried, as
    /// an rqlite client would.
    pub fn rows(&self, sql: &str, level: &str) -> Vec<Vec<Json>> {
        let mut last = None;
        let r = poll(
            TIMEOUT,
            &format!("query on node {} to answer", self.id),
            || {
                let r = self.query(sql, level);
                if r.status == 503 {
                    last = Some(r);
                    return None;
                }
                Some(r)
            },
        );
        let _ = last;
        assert_eq!(
            r.status, 200,
            "query on node {} failed: {:?}",
            self.id, r.body
        );
        let res = &r.body["results"][0];
        assert!(
            res.get("error").is_none(),
            "query error on node {}: {res}",
            self.id
        );
        res["values"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| r.as_array().cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn raft_u64(&self, key: &str) -> Option<u64> {
        self.status()?.get("raft")?.get(key)?.as_u64()
    }

    pub fn applied_index(&self) -> Option<u64> {
        self.raft_u64("applied_index")
    }

    /// A digest of every user table's rows, read locally (`level=none`).
    pub fn checksum(&self) -> u64 {
        let tables = self.rows(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' \
             AND substr(name, 1, 7) != '_cairn_' ORDER BY name",
            "none",
        );
        let mut h = DefaultHasher::new();
        for t in tables {
            let name = t[0].as_str().expect("table name").to_string();
            name.hash(&mut h);
            // Sorted here rather than `ORDER BY rowid`: device tables are WITHOUT ROWID.
            let mut rows: Vec<String> = self
                .rows(&format!("SELECT * FROM \"{name}\""), "none")
                .into_iter()
                .map(|r| Json::from(r).to_string())
                .collect();
            rows.sort();
            rows.hash(&mut h);
        }
        h.finish()
    }
}

/// Where a node runs, for fault tests: called before every start of node `id` with its data
/// dir and the command about to run; may adjust the command (enter a network namespace,
/// mount a tmpfs on the dir) and returns the address to bind instead of `127.0.0.1`.
pub type Place = std::sync::Arc<dyn Fn(u64, &Path, &mut Command) -> String + Send + Sync>;

/// Settings for a cluster's nodes.
#[derive(Clone, Default)]
pub struct Options {
    /// Extra `cairn node` flags for every node.
    pub extra: Vec<String>,
}

/// Real `cairn node` processes in a temp dir. Dropping it kills them and removes the dir.
pub struct Cluster {
    pub nodes: Vec<Node>,
    opts: Options,
    place: Option<Place>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes: node 1 bootstraps, the others join it; waits until all are voters
    /// and agree on a leader.
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, Options::default())
    }

    pub fn start_with(n: usize, opts: Options) -> Cluster {
        Self::start_placed(n, opts, None)
    }

    /// Like [`Cluster::start_with`], with every node (also those added later) placed by
    /// `place` (see [`Place`]).
    pub fn start_placed(n: usize, opts: Options, place: Option<Place>) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("cairn-test-")
            .tempdir()
            .expect("temp dir");
        let mut c = Cluster {
            nodes: Vec::new(),
            opts,
            place,
            dir,
        };
        c.spawn_new(&["--bootstrap"]);
        c.wait_ready(0);
        for _ in 1..n {
            c.add_node(&[]);
        }
        let ids: Vec<u64> = c.nodes.iter().map(|n| n.id).collect();
        poll(TIMEOUT, "all nodes to be voters", || {
            let s = c.nodes[c.leader()].status()?;
            let voters: Vec<u64> = serde_json::from_value(s["raft"]["voters"].clone()).ok()?;
            (voters == ids).then_some(())
        });
        c.leader();
        c
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a node that joins through node 1's (or the leader's) HTTP API, with extra flags.
    pub fn add_node(&mut self, extra: &[&str]) -> usize {
        let via = self.nodes[self.leader()].url("");
        let mut flags = vec!["--join".to_string(), via];
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let i = self.spawn_new(&flags);
        self.wait_ready(i);
        i
    }

    fn spawn_new(&mut self, flags: &[&str]) -> usize {
        let id = self.nodes.len() as u64 + 1;
        let node_dir = self.dir.path().join(format!("node{id}"));
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let mut extra: Vec<String> = self.opts.extra.clone();
        extra.extend(flags.iter().map(|s| s.to_string()));
        let mut node = Node {
            id,
            dir: node_dir,
            http: "127.0.0.1:0".into(),
            raft: "127.0.0.1:0".into(),
            extra,
            device: String::new(),
            place: self.place.clone(),
            child: None,
        };
        Self::spawn(&mut node);
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn spawn(node: &mut Node) {
        let mut cmd = Command::new(cairn_bin());
        let host = match &node.place {
            Some(place) => place(node.id, &node.dir, &mut cmd),
            None => "127.0.0.1".into(),
        };
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
        let child = cmd
            .arg("node")
            .args(["--node-id", &node.id.to_string()])
            .arg("--data-dir")
            .arg(&node.dir)
            .args(["--http-addr", &node.http, "--raft-addr", &node.raft])
            .args(["--device-addr", &node.device])
            .args(&node.extra)
            .env("RUST_LOG", "info,openraft=error")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning cairn node");
        node.child = Some(child);
        let bound: Json = poll(TIMEOUT, "the node to write addrs.json", || {
            serde_json::from_slice(&std::fs::read(&addrs).ok()?).ok()
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
        let url = n.url("/readyz");
        poll(TIMEOUT, &format!("node {} to be ready", n.id), || {
            assert!(n.is_running(), "node {} exited:\n{}", n.id, n.log());
            (get(&url).status == 200).then_some(())
        });
    }

    /// Index (into `nodes`) of the leader that every running node agrees on.
    pub fn leader(&self) -> usize {
        poll(TIMEOUT, "a leader all running nodes agree on", || {
            self.agreed_leader()
        })
    }

    fn agreed_leader(&self) -> Option<usize> {
        let mut leader = None;
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let l = n.status()?["raft"]["leader_id"].as_u64()?;
            if leader.is_some_and(|x| x != l) {
                return None;
            }
            leader = Some(l);
        }
        let i = self.nodes.iter().position(|n| Some(n.id) == leader)?;
        let s = self.nodes[i].status()?;
        (s["raft"]["state"] == "Leader").then_some(i)
    }

    /// Waits for a leader other than node id `old` and returns its index.
    pub fn wait_for_new_leader(&self, old: u64) -> usize {
        poll(TIMEOUT, "a new leader", || {
            let i = self.agreed_leader()?;
            (self.nodes[i].id != old).then_some(i)
        })
    }

    /// Indexes of running nodes other than the leader.
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

    /// `SIGTERM` and wait (up to [`TIMEOUT`]) for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self, i: usize) -> bool {
        let Some(mut c) = self.nodes[i].child.take() else {
            return false;
        };
        // SAFETY: plain kill(2) on a child we own.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = poll(TIMEOUT, "the node to exit after SIGTERM", || {
            c.try_wait().ok().flatten()
        });
        status.success()
    }

    /// Starts a stopped node again on the same ports and data (no bootstrap or join flags
    /// needed: it already holds its membership).
    pub fn restart(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "node {} is still running",
            self.nodes[i].id
        );
        Self::spawn(&mut self.nodes[i]);
        self.wait_ready(i);
    }

    /// Starts a stopped node again without waiting for it to become ready.
    pub fn relaunch(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "node {} is still running",
            self.nodes[i].id
        );
        Self::spawn(&mut self.nodes[i]);
    }

    /// Waits (up to [`TIMEOUT`]) for node `i`'s process to exit on its own.
    pub fn wait_exit(&mut self, i: usize) -> std::process::ExitStatus {
        let mut c = self.nodes[i].child.take().expect("node is not running");
        poll(TIMEOUT, "the node to exit", || c.try_wait().ok().flatten())
    }

    /// Waits until every running node has applied what the leader has committed.
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

    /// Asserts every running node holds identical table contents; returns the checksum.
    pub fn assert_identical(&self) -> u64 {
        self.wait_converged();
        let sums: Vec<(u64, u64)> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| (n.id, n.checksum()))
            .collect();
        assert!(
            sums.windows(2).all(|w| w[0].1 == w[1].1),
            "replicas differ: {sums:?}"
        );
        sums[0].1
    }

    /// Executes on the leader, retrying while a new leader refuses writes for a moment.
    pub fn execute(&self, statements: &Json) -> Json {
        poll(TIMEOUT, "an accepted write", || {
            let l = self.agreed_leader()?;
            let r = self.nodes[l].execute(statements, "");
            (r.status == 200).then_some(r.body)
        })
    }
}

impl Cluster {
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

/// `["CREATE TABLE ...", ...]` as rqlite JSON.
pub fn stmts(sqls: &[&str]) -> Json {
    json!(sqls)
}
