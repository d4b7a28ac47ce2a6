//! Cairn's side of the bench: a 3-node cluster of release `cairn node` processes on loopback,
//! a device fleet speaking the real protocol ([`super::fleet`]), SQL over the HTTP API,
//! failover and restart by killing real processes with SIGKILL.

use super::http;
use super::names;
use super::proc::{Guarded, PerfRecord, cpu_seconds, percentile, rss_kib, scratch};
use super::report::{Measurement, Results};
use super::{Profile, fleet, wire};
use anyhow::{Context, Result, bail, ensure};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const SYSTEM: &str = "Cairn";
/// Cairn taking parameterised SQL writes over its rqlite-compatible HTTP API.
pub const SYSTEM_SQL: &str = "Cairn HTTP SQL";

const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the release `cairn` binary and returns its path.
pub fn build() -> Result<PathBuf> {
    crate::util::cargo(&[
        "build",
        "--release",
        "--quiet",
        "-p",
        "cairn-gateway",
        "--bin",
        "cairn",
    ])?;
    Ok(crate::util::root().join("target/release/cairn"))
}

/// One `cairn node` of the cluster: its addresses, data directory and process.
struct NodeSlot {
    id: u64,
    /// Bound addresses, read from `DATA_DIR/addrs.json` (first start: port 0, the OS chooses).
    http: SocketAddr,
    raft: String,
    device: SocketAddr,
    dir: PathBuf,
    proc: Option<Guarded>,
}

/// Three nodes on loopback with OS-chosen ports. Dropping it kills every node.
pub struct Cluster {
    bin: PathBuf,
    /// `--config` given to every node.
    config: Option<PathBuf>,
    nodes: Vec<NodeSlot>,
}

impl Cluster {
    pub fn start(bin: &Path, dir: &Path) -> Result<Cluster> {
        Self::start_with_config(bin, dir, None)
    }

    /// Like [`Cluster::start`], every node reading `config` (TOML text) via `--config`.
    pub fn start_with_config(bin: &Path, dir: &Path, config: Option<&str>) -> Result<Cluster> {
        let config = match config {
            Some(text) => {
                std::fs::create_dir_all(dir)?;
                let path = dir.join("cairn.toml");
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            nodes.push(NodeSlot {
                id,
                http: SocketAddr::from(([127, 0, 0, 1], 0)),
                raft: "127.0.0.1:0".into(),
                device: SocketAddr::from(([127, 0, 0, 1], 0)),
                dir: dir.join(format!("node{id}")),
                proc: None,
            });
        }
        let mut cluster = Cluster {
            bin: bin.to_path_buf(),
            config,
            nodes,
        };
        cluster.spawn(1, true)?;
        cluster.wait_leader(None, Duration::from_secs(30))?;
        for id in 2..=3 {
            cluster.spawn(id, true)?;
            cluster.wait_voters(id as usize, Duration::from_secs(60))?;
        }
        Ok(cluster)
    }

    /// Node `id`'s HTTP API address.
    pub(crate) fn http_addr(&self, id: u64) -> SocketAddr {
        self.slot(id).http
    }

    /// Node `id`'s device ingress address.
    pub(crate) fn device_addr(&self, id: u64) -> SocketAddr {
        self.slot(id).device
    }

    fn slot(&self, id: u64) -> &NodeSlot {
        &self.nodes[(id - 1) as usize]
    }

    /// Starts node `id` on its previous addresses (port 0 the first time); `first` adds
    /// `--bootstrap` (node 1) or `--join` (the others). Returns once it wrote `addrs.json`.
    pub(crate) fn spawn(&mut self, id: u64, first: bool) -> Result<()> {
        let join = format!("http://{}", self.slot(1).http);
        let bin = self.bin.clone();
        let config = self.config.clone();
        let s = &mut self.nodes[(id - 1) as usize];
        std::fs::create_dir_all(&s.dir)?;
        let addrs = s.dir.join("addrs.json");
        let _ = std::fs::remove_file(&addrs);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.dir.join("node.log"))?;
        let mut cmd = Command::new(bin);
        cmd.args(["node", "--node-id", &id.to_string(), "--data-dir"])
            .arg(&s.dir)
            .args(["--http-addr", &s.http.to_string()])
            .args(["--raft-addr", &s.raft])
            .args(["--device-addr", &s.device.to_string()])
            // `CAIRN_BENCH_LOG=info` (any RUST_LOG filter) for the nodes' node.log files.
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(c) = &config {
            cmd.arg("--config").arg(c);
        }
        if first && id == 1 {
            cmd.arg("--bootstrap");
        } else if first {
            cmd.args(["--join", &join]);
        }
        let mut proc = Guarded::spawn(&format!("cairn node {id}"), &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let bound: serde_json::Value = loop {
            if let Ok(v) = std::fs::read(&addrs).map(|b| serde_json::from_slice(&b))
                && let Ok(v) = v
            {
                break v;
            }
            proc.check_alive()
                .with_context(|| format!("see {}", s.dir.join("node.log").display()))?;
            ensure!(Instant::now() < deadline, "node {id} wrote no addrs.json");
            std::thread::sleep(Duration::from_millis(10));
        };
        s.http = bound["http_addr"]
            .as_str()
            .context("addrs.json: http_addr")?
            .parse()?;
        s.raft = bound["raft_addr"]
            .as_str()
            .context("addrs.json: raft_addr")?
            .to_string();
        s.device = bound["device_addr"]
            .as_str()
            .filter(|d| !d.is_empty())
            .context("addrs.json: device_addr")?
            .parse()?;
        s.proc = Some(proc);
        Ok(())
    }

    fn status(&self, id: u64) -> Result<serde_json::Value> {
        let r = http::get(self.slot(id).http, "/status", Duration::from_secs(2))?;
        ensure!(r.status == 200, "/status on node {id}: {}", r.status);
        r.json()
    }

    fn alive(&self) -> impl Iterator<Item = &NodeSlot> {
        self.nodes.iter().filter(|n| n.proc.is_some())
    }

    /// The leader id as seen by any live node, waiting until one is known and is not `not`.
    pub(crate) fn wait_leader(&self, not: Option<u64>, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            // The node that says it leads in the highest term any live node knows, named by
            // at least one other node when there are others: a restarted node can still
            // believe in an older leader. One /status read per node per round.
            let views: Vec<(u64, u64, Option<u64>, bool)> = self
                .alive()
                .filter_map(|n| {
                    let s = self.status(n.id).ok()?;
                    Some((
                        n.id,
                        s["raft"]["term"].as_u64()?,
                        s["raft"]["leader_id"].as_u64(),
                        s["raft"]["state"].as_str() == Some("Leader"),
                    ))
                })
                .collect();
            let top = views.iter().map(|v| v.1).max();
            let leader = views.iter().find_map(|&(id, term, l, leads)| {
                (leads && Some(term) == top && l == Some(id)).then_some(id)
            });
            if let Some(l) = leader
                && Some(l) != not
                && (views.len() == 1 || views.iter().any(|&(id, _, f, _)| id != l && f == Some(l)))
            {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no leader after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_voters(&self, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self.alive().all(|n| {
                http::get(n.http, "/readyz", Duration::from_secs(2))
                    .map(|r| r.status == 200)
                    .unwrap_or(false)
            });
            let voters = self
                .status(1)
                .ok()
                .and_then(|s| s["raft"]["voters"].as_array().map(Vec::len))
                .unwrap_or(0);
            if ready && voters >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("cluster not ready with {count} voters after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn kill(&mut self, id: u64) {
        if let Some(mut p) = self.nodes[(id - 1) as usize].proc.take() {
            p.kill();
        }
    }

    fn pid(&self, id: u64) -> u32 {
        self.slot(id).proc.as_ref().map(Guarded::pid).unwrap_or(0)
    }

    /// SQL write through node `id`'s HTTP API (rqlite's `/db/execute`).
    fn execute(&self, id: u64, sql: &str) -> Result<serde_json::Value> {
        let r = http::post_json(
            self.slot(id).http,
            "/db/execute",
            &serde_json::json!([sql]),
            Duration::from_secs(120),
        )?;
        let v = r.json()?;
        if r.status != 200 || v["results"][0]["error"].is_string() {
            bail!("execute on node {id}: {} {}", r.status, r.body);
        }
        Ok(v)
    }

    /// First column of the first row of a query on node `id`, read locally (`level=none`).
    fn query_local_i64(&self, id: u64, sql: &str) -> Result<i64> {
        let r = http::post_json(
            self.slot(id).http,
            "/db/query?level=none",
            &serde_json::json!([sql]),
            HTTP_TIMEOUT,
        )?;
        let v = r.json()?;
        v["results"][0]["values"][0][0]
            .as_i64()
            .with_context(|| format!("query {sql:?} on node {id}: {}", r.body))
    }
}

pub fn run(profile: &Profile, results: &mut Results, bin: &Path) -> Result<()> {
    // Bytes on the wire do not need a cluster: they come from the protocol encoder itself.
    let w = wire::three_value_record()?;
    results.push(Measurement::new(
        "records in a full batch frame",
        SYSTEM,
        f64::from(w.records_per_batch),
        "records",
    ));
    results.push(Measurement::new(
        "record bytes in a full batch body",
        SYSTEM,
        w.body_per_record,
        "bytes",
    ));
    results.push(Measurement::new(
        names::BYTES_PER_RECORD,
        SYSTEM,
        w.wire_per_record,
        "bytes",
    ));

    let dir = scratch("cairn")?;
    let mut cluster = Cluster::start_with_config(bin, &dir, Some(&stream_config()))?;

    // `CAIRN_BENCH_STEPS=devices,failover-devices` (any of sql, devices, failover-http,
    // failover-devices, restart) runs a subset, for investigating one figure.
    let steps = std::env::var("CAIRN_BENCH_STEPS").ok();
    let wants = |step: &str| {
        steps
            .as_deref()
            .is_none_or(|s| s.split(',').any(|x| x.trim() == step))
    };
    // SQL over HTTP: the same kind of write dqlite and hiqlite take.
    if wants("sql") {
        http_sql(profile, &cluster, results)?;
    }
    if wants("devices") {
        devices(profile, &cluster, results)?;
    }
    if wants("failover-http") {
        failover_http(&mut cluster, results)?;
    }
    if wants("failover-devices") {
        failover_devices(&mut cluster, results)?;
    }
    if wants("restart") {
        restart(profile, &mut cluster, results)?;
    }
    Ok(())
}

/// The fleet's stream declared as a table of three reals, the shape of a typical sensor.
fn stream_config() -> String {
    format!(
        "{}[[stream]]\nid = {}\ntable = \"climate\"\ncolumns = [\
         {{ name = \"temperature\", type = \"real\" }}, \
         {{ name = \"humidity\", type = \"real\" }}, \
         {{ name = \"pressure\", type = \"real\" }}]\n",
        std::env::var("CAIRN_BENCH_TOML").unwrap_or_default(),
        fleet::STREAM
    )
}

/// Device ingest from the protocol-level fleet connected to the leader's device port: ack
/// latency with one record in flight, throughput against device count, the leader's RSS
/// under the largest load and bytes counted on the devices' sockets.
fn devices(profile: &Profile, cluster: &Cluster, results: &mut Results) -> Result<()> {
    let leader = cluster.wait_leader(None, Duration::from_secs(10))?;
    let (http_addr, device_addr) = (cluster.slot(leader).http, cluster.slot(leader).device);

    let lat_seconds = if profile.quick { 3.0 } else { 8.0 };
    fleet::register(http_addr, 1..2)?;
    let r = fleet::run(&fleet::Plan {
        gateways: vec![device_addr],
        ids: 1..2,
        mode: fleet::Mode::OneInFlight,
        duration: Duration::from_secs_f64(lat_seconds),
        probe: None,
    })?;
    ensure!(
        !r.latencies_ms.is_empty(),
        "latency run: nothing acknowledged"
    );
    // Where the time goes, from the leader's own counters (means over the run).
    if let Ok(s) = cluster.status(leader) {
        let us = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        println!(
            "    leader, one record in flight: read-to-Ack {} us, proposal-to-applied {} us, \
             apply {} us, log write+fsync {} us (means)",
            us(&s["ingress"]["ack_latency"]["mean_us"]),
            us(&s["ingress"]["commit_latency"]["mean_us"]),
            us(&s["ingress"]["apply_latency"]["mean_us"]),
            us(&s["log_store"]["write_us_mean"]),
        );
    }
    results.push(Measurement::new(
        names::LAT_P50,
        SYSTEM,
        percentile(&r.latencies_ms, 0.5),
        "ms",
    ));
    results.push(Measurement::new(
        names::LAT_P99,
        SYSTEM,
        percentile(&r.latencies_ms, 0.99),
        "ms",
    ));

    let mut best = 0.0f64;
    for (devices, first_id) in [(1u64, 10u64), (100, 100), (1000, 1000)] {
        let ids = first_id..first_id + devices;
        fleet::register(http_addr, ids.clone())?;
        let sampler = RssSampler::start(cluster.pid(leader));
        let cpu_before = cpu_seconds(cluster.pid(leader)).unwrap_or(f64::NAN);
        // The followers and the fleet (this process) share the same two cores.
        let followers: Vec<u32> = (1..=3)
            .filter(|&id| id != leader)
            .map(|id| cluster.pid(id))
            .collect();
        let others = || -> f64 {
            followers
                .iter()
                .map(|&p| cpu_seconds(p).unwrap_or(0.0))
                .sum()
        };
        let (followers_before, fleet_before) = (
            others(),
            cpu_seconds(std::process::id()).unwrap_or(f64::NAN),
        );
        let perf = (profile.perf && devices == 1000)
            .then(|| PerfRecord::start(cluster.pid(leader), profile.cairn_seconds, "ingest"))
            .transpose()?;
        let r = fleet::run(&fleet::Plan {
            gateways: vec![device_addr],
            ids,
            mode: fleet::Mode::Saturate,
            duration: Duration::from_secs_f64(profile.cairn_seconds),
            probe: None,
        })?;
        let peak_kib = sampler.stop();
        // How busy the leader was: CPU-seconds per second (2.0 = both cores of this machine).
        let cpu = (cpu_seconds(cluster.pid(leader)).unwrap_or(f64::NAN) - cpu_before)
            / r.elapsed.as_secs_f64();
        results.push(Measurement::new(
            &format!("leader CPU use, {devices} devices"),
            SYSTEM,
            cpu,
            "cores",
        ));
        let secs = r.elapsed.as_secs_f64();
        results.push(Measurement::new(
            &format!("followers' CPU use (both), {devices} devices"),
            SYSTEM,
            (others() - followers_before) / secs,
            "cores",
        ));
        results.push(Measurement::new(
            &format!("device fleet CPU use, {devices} devices"),
            SYSTEM,
            (cpu_seconds(std::process::id()).unwrap_or(f64::NAN) - fleet_before) / secs,
            "cores",
        ));
        if let Some(p) = perf {
            println!("    profile: {}", p.finish()?.display());
        }
        // Zero is a result too (recorded, shown against the goals); the run goes on.
        if r.reconnects > 0 {
            println!(
                "    {devices} devices: {} reconnects, first because: {}",
                r.reconnects,
                r.first_reconnect_reason.as_deref().unwrap_or("?")
            );
        }
        let tput = r.acked as f64 / r.elapsed.as_secs_f64();
        results.push(Measurement::new(
            &format!("device reconnects, {devices} devices"),
            SYSTEM,
            r.reconnects as f64,
            "connections",
        ));
        results.push(Measurement::new(
            &format!("throughput, {devices} devices"),
            SYSTEM,
            tput,
            "records/s",
        ));
        best = best.max(tput);
        if devices == 1000 {
            results.push(Measurement::new(
                names::RSS,
                SYSTEM,
                peak_kib as f64 / 1024.0,
                "MiB",
            ));
            results.push(Measurement::new(
                names::BYTES_ON_SOCKETS,
                SYSTEM,
                (r.bytes_out + r.bytes_in) as f64 / r.acked.max(1) as f64,
                "bytes",
            ));
        }
    }
    results.push(Measurement::new(
        names::TPUT_BEST,
        SYSTEM,
        best,
        "records/s",
    ));
    firmware_client(profile, cluster, leader, results)
}

/// The same leader loaded by `cairn sim`: the real `cairn-firmware` client (outbox,
/// batching, credit, retry) on tokio, 100 devices pushing as fast as their outboxes allow.
/// Its records are `[U64, F32]` on an undeclared stream (the JSON `telemetry` table), so this
/// row shows the device SDK's own ceiling next to the protocol-level fleet's.
fn firmware_client(
    profile: &Profile,
    cluster: &Cluster,
    leader: u64,
    results: &mut Results,
) -> Result<()> {
    let devices = 100u64;
    let out = crate::util::output(
        Command::new(&cluster.bin)
            .args(["sim", "--devices", &devices.to_string(), "--rate", "5000"])
            .args(["--gateways", &cluster.slot(leader).device.to_string()])
            .args(["--host", &format!("http://{}", cluster.slot(leader).http)])
            .args(["--duration", &format!("{}", profile.cairn_seconds)])
            .args([
                "--drain",
                "5",
                "--json",
                "--first-id",
                "20000",
                "--stream",
                "9",
            ]),
    )
    .context("cairn sim")?;
    let summary: serde_json::Value = serde_json::from_str(
        out.lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("cairn sim printed no JSON summary")?,
    )?;
    let tput = summary["records_per_s"].as_f64().unwrap_or(0.0);
    println!(
        "    cairn sim: {} pushed, {} acked, {} dropped, p50 {} ms, p99 {} ms",
        summary["pushed"],
        summary["acked"],
        summary["dropped"],
        summary["p50_ms"],
        summary["p99_ms"]
    );
    results.push(Measurement::new(
        &format!("throughput, {devices} devices, firmware client (cairn sim)"),
        SYSTEM,
        tput,
        "records/s",
    ));
    Ok(())
}

const SQL_TABLE: &str = "CREATE TABLE IF NOT EXISTS bench_sql (device_id INTEGER NOT NULL, \
    seq INTEGER NOT NULL, time TEXT NOT NULL, received_at TEXT NOT NULL, v0 REAL, v1 REAL, \
    v2 REAL, PRIMARY KEY (device_id, seq))";

/// One parameterised INSERT of a three-value record, as rqlite's JSON statement array.
fn sql_insert(device: u64, seq: u64) -> serde_json::Value {
    serde_json::json!([
        "INSERT INTO bench_sql VALUES (?, ?, ?, ?, ?, ?, ?)",
        device,
        seq,
        "2026-11-25T18:44:00.000Z",
        "2026-11-25T18:44:00.100Z",
        21.5,
        48.25,
        1013.0
    ])
}

/// Parameterised SQL writes over kept-alive HTTP connections to the leader.
fn http_sql(profile: &Profile, cluster: &Cluster, results: &mut Results) -> Result<()> {
    let leader = cluster.wait_leader(None, Duration::from_secs(10))?;
    cluster.execute(leader, SQL_TABLE)?;
    let addr = cluster.slot(leader).http;
    let mut conn = http::Conn::open(addr, HTTP_TIMEOUT)?;
    let mut lat = Vec::with_capacity(profile.latency_samples);
    for seq in 0..profile.latency_samples as u64 {
        let body = serde_json::json!([sql_insert(0, seq)]).to_string();
        let t = Instant::now();
        let r = conn.post_json("/db/execute", &body)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(
            r.status == 200 && !r.body.contains("\"error\""),
            "SQL write: {} {}",
            r.status,
            r.body
        );
    }
    lat.sort_by(f64::total_cmp);
    results.push(Measurement::new(
        names::LAT_P50,
        SYSTEM_SQL,
        percentile(&lat, 0.5),
        "ms",
    ));
    results.push(Measurement::new(
        names::LAT_P99,
        SYSTEM_SQL,
        percentile(&lat, 0.99),
        "ms",
    ));

    let next_device = AtomicU64::new(1);
    let mut best = 0.0f64;
    for (writers, rows) in [(16usize, 1u64), (64, 1), (4, 100), (16, 100)] {
        let perf = (profile.perf && writers == 16 && rows == 100)
            .then(|| PerfRecord::start(cluster.pid(leader), profile.peer_seconds, "sql"))
            .transpose()?;
        let tput = sql_throughput(addr, &next_device, writers, rows, profile.peer_duration())?;
        if let Some(p) = perf {
            println!("    profile: {}", p.finish()?.display());
        }
        let shape = if rows == 1 {
            "1 row".to_string()
        } else {
            format!("{rows}-row transaction")
        };
        results.push(Measurement::new(
            &format!("throughput, {writers} writers x {shape}"),
            SYSTEM_SQL,
            tput,
            "records/s",
        ));
        best = best.max(tput);
    }
    results.push(Measurement::new(
        names::TPUT_BEST,
        SYSTEM_SQL,
        best,
        "records/s",
    ));
    Ok(())
}

/// Rows/s committed by `writers` threads, each posting `rows` INSERTs per request (as one
/// `?transaction` when more than one) back to back for `duration`.
fn sql_throughput(
    addr: SocketAddr,
    next_device: &AtomicU64,
    writers: usize,
    rows: u64,
    duration: Duration,
) -> Result<f64> {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::new();
        for _ in 0..writers {
            let device = next_device.fetch_add(1, Ordering::Relaxed);
            let (stop, done) = (&stop, &done);
            handles.push(scope.spawn(move || -> Result<()> {
                let mut conn = http::Conn::open(addr, HTTP_TIMEOUT)?;
                let path = if rows > 1 {
                    "/db/execute?transaction"
                } else {
                    "/db/execute"
                };
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let stmts: Vec<_> = (seq..seq + rows).map(|q| sql_insert(device, q)).collect();
                    let r = conn.post_json(path, &serde_json::Value::from(stmts).to_string())?;
                    ensure!(
                        r.status == 200 && !r.body.contains("\"error\""),
                        "SQL write: {} {}",
                        r.status,
                        r.body
                    );
                    seq += rows;
                    done.fetch_add(rows, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        Ok(())
    })?;
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// HTTP clients keep writing through a follower while the leader is SIGKILLed; the figure
/// is the time from the kill to the first write acknowledged afterwards.
fn failover_http(cluster: &mut Cluster, results: &mut Results) -> Result<()> {
    let old = cluster.wait_leader(None, Duration::from_secs(10))?;
    cluster.execute(old, SQL_TABLE)?;
    let survivor = (1..=3).find(|&id| id != old).expect("three nodes");
    let addr = cluster.slot(survivor).http;
    let stop = AtomicBool::new(false);
    let killed_at: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let first_ack: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let seq = AtomicU64::new(1_000_000);
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..4 {
            let (stop, killed_at, first_ack, seq) = (&stop, &killed_at, &first_ack, &seq);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let q = seq.fetch_add(1, Ordering::Relaxed);
                    let body = serde_json::json!([sql_insert(0, q)]);
                    let ok = http::post_json(addr, "/db/execute", &body, Duration::from_secs(5))
                        .map(|r| r.status == 200 && !r.body.contains("\"error\""))
                        .unwrap_or(false);
                    let kill = *killed_at.lock().expect("lock");
                    if ok
                        && let Some(k) = kill
                        && sent >= k
                    {
                        let mut f = first_ack.lock().expect("lock");
                        if f.is_none() {
                            *f = Some(Instant::now());
                        }
                    }
                    if !ok {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        *killed_at.lock().expect("lock") = Some(Instant::now());
        cluster.kill(old);
        let deadline = Instant::now() + Duration::from_secs(30);
        while first_ack.lock().expect("lock").is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })?;
    let k = killed_at.into_inner().expect("lock").expect("killed");
    let f = first_ack
        .into_inner()
        .expect("lock")
        .context("no SQL write acknowledged within 30 s of killing the leader")?;
    results.push(Measurement::new(
        names::FAILOVER,
        SYSTEM_SQL,
        (f - k).as_secs_f64() * 1e3,
        "ms",
    ));
    cluster.spawn(old, false)?;
    cluster.wait_voters(3, Duration::from_secs(60))?;
    Ok(())
}

/// Peak VmRSS of one process, sampled every 100 ms on a thread.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(kib) = rss_kib(pid) {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            stop,
            peak,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Ten saturating devices on the leader; the leader is SIGKILLed and the devices reconnect
/// to the survivors on their own. The figure is the time from the kill to the first Ack any
/// device receives afterwards.
fn failover_devices(cluster: &mut Cluster, results: &mut Results) -> Result<()> {
    let old = cluster.wait_leader(None, Duration::from_secs(10))?;
    let http_addr = cluster.slot(old).http;
    let mut gateways = vec![cluster.slot(old).device];
    gateways.extend(
        cluster
            .nodes
            .iter()
            .filter(|n| n.id != old)
            .map(|n| n.device),
    );
    fleet::register(http_addr, 5000..5010)?;
    let probe = fleet::AckProbe::default();
    let plan = fleet::Plan {
        gateways,
        ids: 5000..5010,
        mode: fleet::Mode::Saturate,
        duration: Duration::from_secs(8),
        probe: Some(&probe),
    };
    std::thread::scope(|scope| -> Result<()> {
        let fleet = scope.spawn(|| fleet::run(&plan));
        std::thread::sleep(Duration::from_secs(2));
        probe.arm();
        cluster.kill(old);
        let r = fleet
            .join()
            .map_err(|_| anyhow::anyhow!("fleet panicked"))?
            .context("devices during failover")?;
        println!(
            "    failover: {} records acked, {} reconnects, first because: {}",
            r.acked,
            r.reconnects,
            r.first_reconnect_reason.as_deref().unwrap_or("-")
        );
        Ok(())
    })?;
    let f = probe
        .first_ack_after_arm()
        .context("no device got an Ack within 6 s of killing the leader")?;
    results.push(Measurement::new(
        names::FAILOVER,
        SYSTEM,
        f.as_secs_f64() * 1e3,
        "ms",
    ));
    cluster.spawn(old, false)?;
    cluster.wait_voters(3, Duration::from_secs(60))?;
    Ok(())
}

/// Loads `profile.restart_rows` rows through Raft in one statement, SIGKILLs a follower and
/// times its restart until it serves again with every row.
fn restart(profile: &Profile, cluster: &mut Cluster, results: &mut Results) -> Result<()> {
    let rows = profile.restart_rows;
    let leader = cluster.wait_leader(None, Duration::from_secs(10))?;
    cluster.execute(
        leader,
        "CREATE TABLE IF NOT EXISTS bench_rows (device_id INTEGER NOT NULL, seq INTEGER NOT NULL, \
         time TEXT NOT NULL, received_at TEXT NOT NULL, v0 REAL, v1 REAL, v2 REAL, \
         PRIMARY KEY (device_id, seq))",
    )?;
    let t = Instant::now();
    cluster.execute(
        leader,
        &format!(
            "WITH RECURSIVE n(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM n WHERE x < {}) \
             INSERT INTO bench_rows SELECT x / 1000, x % 1000, '2026-11-25T18:44:00.000Z', \
             '2026-11-25T18:44:00.100Z', 21.5, 48.25, 1013.0 FROM n",
            rows - 1
        ),
    )?;
    results.push(Measurement::new(
        &format!("bulk insert of {rows} rows in one SQL write"),
        SYSTEM,
        t.elapsed().as_secs_f64(),
        "s",
    ));
    let follower = (1..=3).rev().find(|&id| id != leader).expect("three nodes");
    let count_sql = "SELECT count(*) FROM bench_rows";
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster.query_local_i64(follower, count_sql).unwrap_or(0) < rows as i64 {
        ensure!(
            Instant::now() < deadline,
            "follower never applied the bulk insert"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.kill(follower);
    let t = Instant::now();
    cluster.spawn(follower, false)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ready = http::get(
            cluster.slot(follower).http,
            "/readyz",
            Duration::from_secs(1),
        )
        .map(|r| r.status == 200)
        .unwrap_or(false);
        if ready && cluster.query_local_i64(follower, count_sql).ok() == Some(rows as i64) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "restarted node not ready after 300 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    results.push(Measurement::new(
        names::RESTART,
        SYSTEM,
        t.elapsed().as_secs_f64(),
        "s",
    ));
    Ok(())
}
