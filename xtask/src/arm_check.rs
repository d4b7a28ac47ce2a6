//! The ARM gateway check in `cargo xtask test`: the real `cairn` daemon, cross-compiled,
//! packaged and run under qemu-user.
//!
//! - aarch64: the binary and default config come out of the arm64 `.deb` (so the package
//!   is what gets tested). A one-node cluster bootstraps with a temp data dir; SQL goes in
//!   and comes out over HTTP; a device is registered with the emulated `cairn device add`;
//!   a host `cairn sim` fleet pushes records to it and each acknowledged record is queried;
//!   the node is killed with SIGKILL and started again with the same command line (as
//!   systemd would), and the rows and the device must still be there; SIGTERM then stops
//!   it cleanly (exit status 0).
//! - armv7: `--help` answers and `node` bootstraps and serves a query.
//!
//! CI has 30 minutes on two cores for everything, so these builds use [`TEST_PROFILE`]
//! rather than the `dist` profile (see its doc for the measurements behind the choice).

use crate::dist::{self, AARCH64, ARMV7, LinuxTarget};
use crate::util::{self, step};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Cargo profile of the emulated builds.
pub const TEST_PROFILE: &str = "dev";

/// How long a node under qemu may take to elect itself and answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

pub fn run() -> Result<()> {
    let mut binaries = Vec::new();
    step("arm: cross toolchains", || {
        dist::ensure_toolchains(&[&AARCH64, &ARMV7])
    })?;
    for target in [&AARCH64, &ARMV7] {
        step(
            &format!("arm: build {} ({TEST_PROFILE})", target.triple),
            || {
                binaries.push(dist::build_cairn(target, TEST_PROFILE)?);
                Ok(())
            },
        )?;
    }
    let work = crate::util::root().join("target").join("xtask-arm");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;

    let root = work.join("arm64-root");
    step("arm: package arm64", || {
        let package =
            crate::deb::build(&AARCH64, &binaries[0], &work, crate::deb::Compression::Gzip)?;
        crate::deb::verify(&package)?;
        crate::deb::extract(&package, &root)
    })?;
    let mut host_cairn = PathBuf::new();
    step("arm: host cairn (for cairn sim)", || {
        // The plain host build (target/debug), which the workspace tests have already built;
        // `--target x86_64-...` would compile the whole gateway a second time.
        util::cargo(&["build", "--locked", "-p", "cairn-gateway", "--bin", "cairn"])?;
        host_cairn = util::root().join("target/debug/cairn");
        Ok(())
    })?;
    step(
        "arm: aarch64 node under qemu (sim, kill -9, restart)",
        || aarch64_node(&root, &work, &host_cairn),
    )?;
    step("arm: armv7 --help and node under qemu", || {
        armv7_node(&binaries[1], &work)
    })?;
    Ok(())
}

/// One-node cluster from the unpacked arm64 package: write, read, SIGKILL, restart, read.
fn aarch64_node(root: &Path, work: &Path, host_cairn: &Path) -> Result<()> {
    let spec = NodeSpec {
        target: &AARCH64,
        binary: root.join("usr/bin/cairn"),
        config: Some(root.join(crate::deb::CONFIG_PATH)),
        data_dir: work.join("aarch64-data"),
        ports: free_ports()?,
        log: work.join("aarch64-node.log"),
    };
    let mut node = spec.start()?;
    node.wait_ready()?;
    let http = node.http;
    execute(
        http,
        &[
            "CREATE TABLE readings (id INTEGER PRIMARY KEY, sensor TEXT NOT NULL, value REAL)",
            "INSERT INTO readings (sensor, value) VALUES ('t1', 21.5)",
            "INSERT INTO readings (sensor, value) VALUES ('t2', -3.25)",
        ],
    )?;
    let expected = serde_json::json!([[1, "t1", 21.5], [2, "t2", -3.25]]);
    let sql = "SELECT id, sensor, value FROM readings ORDER BY id";
    ensure!(
        query(http, sql)? == expected,
        "rows read back differ from rows written"
    );
    // A device registered through the ARM CLI (so the client side runs emulated too).
    let key = "5a".repeat(32);
    let add = AARCH64
        .runner(&spec.binary)
        .args(["device", "add", "--id", "7", "--key", &key, "--host"])
        .arg(format!("http://{http}"))
        .output()?;
    ensure!(
        add.status.success(),
        "cairn device add failed: {}",
        String::from_utf8_lossy(&add.stderr)
    );
    ensure!(
        devices(http)? == [7],
        "device 7 not listed after `device add`"
    );
    // A fleet of host devices (the real firmware client in `cairn sim`) pushes records to
    // the emulated gateway's device port; every one must be acknowledged and stored once.
    let acked = sim(host_cairn, http, spec.ports[2])?;
    let count_sql = format!(
        "SELECT COUNT(*), COUNT(DISTINCT device_id || ':' || seq) FROM telemetry \
         WHERE device_id >= {SIM_FIRST_ID}"
    );
    ensure!(
        query(http, &count_sql)? == serde_json::json!([[acked, acked]]),
        "telemetry does not hold exactly the {acked} acknowledged records"
    );
    // A bad statement is an error result, and the node keeps serving.
    let bad = post_execute(http, &["INSERT INTO no_such_table VALUES (1)"])?;
    ensure!(
        bad.pointer("/results/0/error").is_some(),
        "bad SQL did not return an error result: {bad}"
    );

    node.kill9()?;
    println!("node killed with SIGKILL; restarting with the same command line");
    let mut node = spec.start()?;
    node.wait_ready()?;
    let rows = query(node.http, sql)?;
    ensure!(
        rows == expected,
        "after kill -9 and restart the rows are {rows}, expected {expected}"
    );
    ensure!(
        devices(node.http)? == [7, SIM_FIRST_ID, SIM_FIRST_ID + 1, SIM_FIRST_ID + 2],
        "devices lost in kill -9 and restart"
    );
    let records = query(node.http, &count_sql)?;
    ensure!(
        records == serde_json::json!([[acked, acked]]),
        "after kill -9 and restart telemetry counts are {records}, expected {acked}"
    );
    println!(
        "aarch64: rows, device registry and {acked} device records survived kill -9 and restart"
    );
    node.stop()
}

/// armv7: `--help` lists the subcommands; `node` bootstraps and serves a write and a read.
fn armv7_node(binary: &Path, work: &Path) -> Result<()> {
    let help = ARMV7
        .runner(binary)
        .arg("--help")
        .output()
        .context("running cairn --help under qemu-arm")?;
    let text = String::from_utf8_lossy(&help.stdout);
    ensure!(
        help.status.success() && text.contains("node"),
        "armv7 `cairn --help` failed ({}): {text}{}",
        help.status,
        String::from_utf8_lossy(&help.stderr)
    );
    let spec = NodeSpec {
        target: &ARMV7,
        binary: binary.to_path_buf(),
        config: None,
        data_dir: work.join("armv7-data"),
        ports: free_ports()?,
        log: work.join("armv7-node.log"),
    };
    let mut node = spec.start()?;
    node.wait_ready()?;
    execute(
        node.http,
        &[
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
            "INSERT INTO t (v) VALUES ('armv7')",
        ],
    )?;
    let rows = query(node.http, "SELECT id, v FROM t")?;
    ensure!(
        rows == serde_json::json!([[1, "armv7"]]),
        "armv7 read back {rows}"
    );
    println!("armv7: node bootstrapped and served a write and a read");
    node.stop()
}

/// How to start one node; `start` can be called again after a kill.
struct NodeSpec<'a> {
    target: &'a LinuxTarget,
    binary: PathBuf,
    config: Option<PathBuf>,
    data_dir: PathBuf,
    /// HTTP, Raft, device.
    ports: [u16; 3],
    log: PathBuf,
}

impl NodeSpec<'_> {
    fn start(&self) -> Result<Node> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let [http, raft, device] = self.ports;
        let mut cmd = self.target.runner(&self.binary);
        cmd.arg("node");
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.args(["--node-id", "1"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--raft-addr", &format!("127.0.0.1:{raft}")])
            .args(["--device-addr", &format!("127.0.0.1:{device}")])
            // Kept on restarts, as in a config file: a node that already holds a cluster
            // must ignore it.
            .arg("--bootstrap")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        println!("starting {cmd:?}");
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        Ok(Node {
            child,
            http: SocketAddr::from(([127, 0, 0, 1], http)),
            log: self.log.clone(),
        })
    }
}

/// A running `cairn node` under qemu-user; killed on drop.
struct Node {
    child: Child,
    http: SocketAddr,
    log: PathBuf,
}

impl Node {
    /// Polls `GET /readyz` until it answers 200 (the node has a leader and its store is open).
    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "node exited with {status} before it was ready\n{}",
                    self.log_tail()
                );
            }
            if let Ok((200, _)) = http(self.http, "GET", "/readyz", None) {
                println!("node ready in {:.1} s", start.elapsed().as_secs_f64());
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "node not ready after {READY_TIMEOUT:?}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn kill9(&mut self) -> Result<()> {
        // Under qemu-user the emulated program is the qemu process itself.
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then the node must exit on its own, successfully, within 30 s.
    fn stop(mut self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -TERM failed");
        let status = self.wait_exit(Duration::from_secs(30))?;
        ensure!(
            status.success(),
            "node exited with {status} on SIGTERM\n{}",
            self.log_tail()
        );
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > timeout {
                bail!(
                    "node still running {timeout:?} after SIGTERM\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- last lines of {} ---\n{tail}", self.log.display())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Three ports the OS considers free right now. They are released before the node binds
/// them; on loopback nobody else is racing for them in practice.
fn free_ports() -> Result<[u16; 3]> {
    let listeners = [
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    ];
    Ok([
        listeners[0].local_addr()?.port(),
        listeners[1].local_addr()?.port(),
        listeners[2].local_addr()?.port(),
    ])
}

/// `POST /db/execute`, retried while a fresh leader refuses writes; every statement must
/// succeed.
fn execute(addr: SocketAddr, statements: &[&str]) -> Result<()> {
    let body = retry(|| post_execute(addr, statements))?;
    let results = body["results"]
        .as_array()
        .with_context(|| format!("execute answer has no results: {body}"))?;
    ensure!(
        results.len() == statements.len() && results.iter().all(|r| r.get("error").is_none()),
        "execute failed: {body}"
    );
    Ok(())
}

fn post_execute(addr: SocketAddr, statements: &[&str]) -> Result<Value> {
    let (status, body) = http(
        addr,
        "POST",
        "/db/execute",
        Some(&serde_json::to_string(statements)?),
    )?;
    let json: Value = serde_json::from_str(&body)
        .with_context(|| format!("execute answered {status} with non-JSON: {body}"))?;
    Ok(json)
}

/// A linearizable `GET /db/query`; returns `results[0].values`.
fn query(addr: SocketAddr, sql: &str) -> Result<Value> {
    let path = format!("/db/query?level=linearizable&q={}", url_encode(sql));
    let body = retry(|| {
        let (status, body) = http(addr, "GET", &path, None)?;
        ensure!(status == 200, "query answered {status}: {body}");
        Ok(serde_json::from_str::<Value>(&body)?)
    })?;
    ensure!(
        body.pointer("/results/0/error").is_none(),
        "query failed: {body}"
    );
    Ok(body
        .pointer("/results/0/values")
        .cloned()
        .unwrap_or(Value::Array(Vec::new())))
}

/// First device id of the simulated fleet.
const SIM_FIRST_ID: u64 = 100;

/// Runs `cairn sim` on the host against the node: 3 devices, 20 records/s each for 3 s.
/// Returns how many records were acknowledged, after checking none was dropped or left.
fn sim(host_cairn: &Path, http: SocketAddr, device_port: u16) -> Result<u64> {
    let out = Command::new(host_cairn)
        .args(["sim", "--devices", "3", "--rate", "20", "--duration", "3"])
        .args(["--drain", "60", "--json", "--quiet"])
        .args(["--first-id", &SIM_FIRST_ID.to_string()])
        .args(["--gateways", &format!("127.0.0.1:{device_port}")])
        .args(["--host", &format!("http://{http}")])
        .output()
        .context("running cairn sim")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "cairn sim failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("cairn sim printed no JSON summary: {stdout}"))?;
    println!("cairn sim: {summary}");
    let field = |name: &str| summary[name].as_u64().unwrap_or(u64::MAX);
    let acked = field("acked");
    ensure!(
        acked > 0 && acked == field("pushed") && field("dropped") == 0 && field("queued") == 0,
        "not every pushed record was acknowledged: {summary}"
    );
    Ok(acked)
}

/// Sorted ids from `GET /devices` (read linearizably on the leader).
fn devices(addr: SocketAddr) -> Result<Vec<u64>> {
    let body = retry(|| {
        let (status, body) = http(addr, "GET", "/devices", None)?;
        ensure!(status == 200, "GET /devices answered {status}: {body}");
        Ok(serde_json::from_str::<Value>(&body)?)
    })?;
    let mut ids = body["devices"]
        .as_array()
        .with_context(|| format!("GET /devices: {body}"))?
        .iter()
        .map(|d| d["device_id"].as_u64().context("device without device_id"))
        .collect::<Result<Vec<u64>>>()?;
    ids.sort_unstable();
    Ok(ids)
}

/// Retries `f` for up to 20 s: a new leader may refuse requests for a moment.
fn retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > Duration::from_secs(20) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// A minimal HTTP/1.0 client (one request per connection, so no chunked encoding) that
/// keeps xtask free of an HTTP stack. Returns status and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response: {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("malformed status line: {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Percent-encodes a query-string value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
