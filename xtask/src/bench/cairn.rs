//! Cairn's side of the bench: a 3-node cluster of release `cairn node` processes on loopback
//! (the test harness's [`Cluster`]), a device fleet speaking the real protocol
//! ([`cairn_tests::fleet`]), SQL over the HTTP API, failover and restart by killing real
//! processes with SIGKILL.

use super::names;
use super::proc::{PerfRecord, cpu_seconds, percentile, rss_kib};
use super::report::{Measurement, Results};
use super::{Profile, wire};
use anyhow::{Context, Result, ensure};
use cairn_tests::device::{self, sim_command, sim_summary};
use cairn_tests::{Client, Cluster, Options, Security, fleet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const SYSTEM: &str = "Cairn";
/// Cairn taking parameterised SQL writes over its rqlite-compatible HTTP API.
pub const SYSTEM_SQL: &str = "Cairn HTTP SQL";

const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the release `cairn` binary and returns its path.
/// `CAIRN_BENCH_BIN=PATH` measures that binary instead (another commit's release build, to
/// bisect a regression); otherwise this tree's release `cairn`, built here.
pub fn build() -> Result<PathBuf> {
    if let Ok(bin) = std::env::var("CAIRN_BENCH_BIN") {
        println!("bench: measuring {bin} (CAIRN_BENCH_BIN)");
        return Ok(PathBuf::from(bin));
    }
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

/// Three release `cairn node` processes on loopback with OS-chosen ports, through the test
/// harness's launcher, their data and `node.log` files kept in `target/bench/work/cairn`.
/// Every node reads `config` (TOML text).
fn start_cluster(bin: &Path, config: String) -> Cluster {
    start_cluster_with(bin, config, None)
}

/// The cluster's scratch directory under `target/bench/work`.
pub(super) const WORK: &str = "cairn";

/// [`start_cluster`] with the harness's `security` settings.
fn start_cluster_with(bin: &Path, config: String, security: Option<Security>) -> Cluster {
    let dir = crate::util::root().join("target/bench/work").join(WORK);
    Cluster::start_with(
        3,
        Options {
            config: Some(config),
            security,
            // `CAIRN_BENCH_LOG=info` (any RUST_LOG filter) for the nodes' node.log files.
            log: Some(std::env::var("CAIRN_BENCH_LOG").unwrap_or_else(|_| "warn".into())),
            dir: Some(dir),
            ..Options::binary(bin)
        },
    )
}

/// Node `i`'s process id (0 once stopped).
fn pid(cluster: &Cluster, i: usize) -> u32 {
    cluster.nodes[i].pid().unwrap_or(0)
}

/// Node `i`'s device port.
pub(super) fn device_addr(cluster: &Cluster, i: usize) -> Result<SocketAddr> {
    let d = &cluster.nodes[i].device;
    d.parse()
        .with_context(|| format!("node {} device address {d:?}", cluster.nodes[i].id))
}

/// SQL write through node `i`'s HTTP API (rqlite's `/db/execute`).
fn execute(cluster: &Cluster, i: usize, sql: &str) -> Result<serde_json::Value> {
    let r = Client::new(Duration::from_secs(120), None).post(
        &cluster.nodes[i].url("/db/execute"),
        &serde_json::json!([sql]),
    );
    ensure!(
        r.succeeded(),
        "execute on node {i}: {} {}",
        r.status,
        r.body
    );
    Ok(r.body)
}

/// First column of the first row of a query on node `i`, read locally (`level=none`).
pub(super) fn query_local_i64(cluster: &Cluster, i: usize, sql: &str) -> Result<i64> {
    let r = cluster.nodes[i].query(sql, "none");
    r.body["results"][0]["values"][0][0]
        .as_i64()
        .with_context(|| format!("query {sql:?} on node {i}: {} {}", r.status, r.body))
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

    let mut cluster = start_cluster(bin, stream_config());

    // `CAIRN_BENCH_STEPS=devices,failover-devices` (any of sql, latency, devices, failover-http,
    // failover-devices, restart, node-tls) runs a subset, for investigating one figure.
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
        devices(profile, &cluster, bin, results)?;
    } else if wants("latency") {
        latency(profile, &cluster, results)?;
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
    if wants("node-tls") {
        drop(cluster);
        node_tls(profile, bin, results)?;
    }
    Ok(())
}

/// SQL and device figures again on a cluster with node mutual TLS (Raft, forwarding), beside
/// the plain ones: the same runs, reported as system "... , node TLS" (latency p50 and best
/// throughput). The API stays plain HTTP without auth, as for the plain figures.
fn node_tls(profile: &Profile, bin: &Path, results: &mut Results) -> Result<()> {
    let security = Security {
        users: serde_json::Value::Null,
        http_tls: false,
        node_tls: true,
    };
    let cluster = start_cluster_with(bin, stream_config(), Some(security));
    let mut tls = Results::default();
    http_sql(profile, &cluster, &mut tls)?;
    devices(profile, &cluster, bin, &mut tls)?;
    for m in tls.0 {
        if m.name == names::LAT_P50 || m.name == names::TPUT_BEST {
            results.push(Measurement {
                system: format!("{}, node TLS", m.system),
                ..m
            });
        }
    }
    Ok(())
}

/// The fleet's stream declared as a table of three reals, the shape of a typical sensor.
fn stream_config() -> String {
    format!(
        "{}{}",
        std::env::var("CAIRN_BENCH_TOML").unwrap_or_default(),
        fleet::stream_toml()
    )
}

/// Ack latency with one record in flight from one device on the leader's device port (step
/// `latency` alone; `devices` runs it first).
fn latency(profile: &Profile, cluster: &Cluster, results: &mut Results) -> Result<()> {
    let leader = cluster.leader();
    let http = cluster.nodes[leader].url("");
    let leader_device = device_addr(cluster, leader)?;

    let lat_seconds = if profile.quick { 3.0 } else { 8.0 };
    device::register(&http, 1..2)?;
    let r = fleet::run(&fleet::Plan {
        gateways: vec![leader_device],
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
    if let Some(s) = cluster.nodes[leader].status() {
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
    Ok(())
}

/// Device ingest from the protocol-level fleet connected to the leader's device port: ack
/// latency with one record in flight, throughput against device count, the leader's RSS
/// under the largest load and bytes counted on the devices' sockets.
fn devices(profile: &Profile, cluster: &Cluster, bin: &Path, results: &mut Results) -> Result<()> {
    latency(profile, cluster, results)?;
    let leader = cluster.leader();
    let http = cluster.nodes[leader].url("");
    let leader_device = device_addr(cluster, leader)?;

    let mut best = 0.0f64;
    for (devices, first_id) in [(1u64, 10u64), (100, 100), (1000, 1000)] {
        let ids = first_id..first_id + devices;
        device::register(&http, ids.clone())?;
        let sampler = RssSampler::start(pid(cluster, leader));
        let cpu_before = cpu_seconds(pid(cluster, leader)).unwrap_or(f64::NAN);
        // The followers and the fleet (this process) share the same two cores.
        let followers: Vec<u32> = (0..cluster.nodes.len())
            .filter(|&i| i != leader)
            .map(|i| pid(cluster, i))
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
            .then(|| PerfRecord::start(pid(cluster, leader), profile.cairn_seconds, "ingest"))
            .transpose()?;
        let r = fleet::run(&fleet::Plan {
            gateways: vec![leader_device],
            ids,
            mode: fleet::Mode::Saturate,
            duration: Duration::from_secs_f64(profile.cairn_seconds),
            probe: None,
        })?;
        let peak_kib = sampler.stop();
        // How busy the leader was: CPU-seconds per second (2.0 = both cores of this machine).
        let cpu = (cpu_seconds(pid(cluster, leader)).unwrap_or(f64::NAN) - cpu_before)
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
    disk_per_record(cluster, leader, results)?;
    firmware_client(profile, cluster, bin, leader, results)
}

/// The parts of a node's data directory, by what they hold.
pub(super) const DISK_PARTS: [&str; 5] = ["database", "Raft log", "snapshots", "WALs", "other"];

/// Which of [`DISK_PARTS`] a file of a node's data directory belongs to.
fn disk_part(rel: &Path) -> usize {
    let name = rel.to_string_lossy();
    if name.ends_with("-wal") || name.ends_with("-shm") {
        3
    } else if rel.starts_with("sm/snapshots") {
        2
    } else if name == "sm/db.sqlite" {
        0
    } else if name == "raft.db" {
        1
    } else {
        4
    }
}

/// Bytes of every file under `dir`, summed per [`DISK_PARTS`]. A file or directory that
/// goes away while it is read (a snapshot swapped in) counts as gone.
pub(super) fn disk_usage(dir: &Path) -> Result<[u64; 5]> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut parts = [0u64; 5];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = match std::fs::read_dir(&d) {
            Err(e) if gone(&e) && d != dir => continue,
            r => r.with_context(|| format!("reading {}", d.display()))?,
        };
        for e in entries {
            let e = e?;
            let meta = match e.metadata() {
                Err(e) if gone(&e) => continue,
                r => r?,
            };
            if meta.is_dir() {
                todo.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir)?.to_path_buf();
                parts[disk_part(&rel)] += meta.len();
            }
        }
    }
    Ok(parts)
}

/// Bytes on disk per stored device record on every node, split by what holds them, once the
/// followers have applied what the leader has (the target: at most 64 per node at
/// 6 M records, everything in the data directory counted; node logs are "other").
fn disk_per_record(cluster: &Cluster, leader: usize, results: &mut Results) -> Result<()> {
    let target = cluster.nodes[leader].applied_index().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && cluster
            .nodes
            .iter()
            .any(|n| n.applied_index().unwrap_or(0) < target)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut worst = [0f64; 6];
    for (i, node) in cluster.nodes.iter().enumerate() {
        let records = query_local_i64(cluster, i, "SELECT count(*) FROM climate")?.max(1) as f64;
        let parts = disk_usage(&node.dir)?;
        let total: u64 = parts.iter().sum();
        let mut line = format!(
            "    node {} disk: {records} records, {:.1} B/record in all ({:.1} MB):",
            node.id,
            total as f64 / records,
            total as f64 / 1e6
        );
        for (k, name) in DISK_PARTS.iter().enumerate() {
            let per = parts[k] as f64 / records;
            line.push_str(&format!(" {name} {per:.1}"));
            worst[k] = worst[k].max(per);
        }
        worst[5] = worst[5].max(total as f64 / records);
        println!("{line}");
    }
    results.push(Measurement::new(
        names::DISK_PER_RECORD,
        SYSTEM,
        worst[5],
        "bytes",
    ));
    for (k, name) in DISK_PARTS.iter().enumerate() {
        results.push(Measurement::new(
            &format!("{} ({name})", names::DISK_PER_RECORD),
            SYSTEM,
            worst[k],
            "bytes",
        ));
    }
    Ok(())
}

/// The same leader loaded by `cairn sim`: the real `cairn-firmware` client (outbox,
/// batching, credit, retry) on tokio, 100 devices pushing as fast as their outboxes allow.
/// Its records are `[U64, F32]` on an undeclared stream (the JSON `telemetry` table), so this
/// row shows the device SDK's own ceiling next to the protocol-level fleet's.
fn firmware_client(
    profile: &Profile,
    cluster: &Cluster,
    bin: &Path,
    leader: usize,
    results: &mut Results,
) -> Result<()> {
    let devices = 100u64;
    let node = &cluster.nodes[leader];
    let out = crate::util::output(
        sim_command(bin, &[&node.device], &node.url(""))
            .args(["--devices", &devices.to_string(), "--rate", "5000"])
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
    let summary = sim_summary(out.as_bytes()).context("cairn sim printed no JSON summary")?;
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

pub(super) const SQL_TABLE: &str = "CREATE TABLE IF NOT EXISTS bench_sql (device_id INTEGER NOT NULL, \
    seq INTEGER NOT NULL, time TEXT NOT NULL, received_at TEXT NOT NULL, v0 REAL, v1 REAL, \
    v2 REAL, PRIMARY KEY (device_id, seq))";

/// One parameterised INSERT of a three-value record, as rqlite's JSON statement array.
pub(super) fn sql_insert(device: u64, seq: u64) -> serde_json::Value {
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
    let leader = cluster.leader();
    execute(cluster, leader, SQL_TABLE)?;
    let url = cluster.nodes[leader].url("/db/execute");
    let client = Client::new(HTTP_TIMEOUT, None);
    let mut lat = Vec::with_capacity(profile.latency_samples);
    for seq in 0..profile.latency_samples as u64 {
        let body = serde_json::json!([sql_insert(0, seq)]).to_string();
        let t = Instant::now();
        let r = client.post_text(&url, &body);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(r.succeeded(), "SQL write: {} {}", r.status, r.body);
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
            .then(|| PerfRecord::start(pid(cluster, leader), profile.peer_seconds, "sql"))
            .transpose()?;
        let tput = sql_throughput(&url, &next_device, writers, rows, profile.peer_duration())?;
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
    url: &str,
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
                let client = Client::new(HTTP_TIMEOUT, None);
                let url = if rows > 1 {
                    format!("{url}?transaction")
                } else {
                    url.to_string()
                };
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let stmts: Vec<_> = (seq..seq + rows).map(|q| sql_insert(device, q)).collect();
                    let r = client.post_text(&url, &serde_json::Value::from(stmts).to_string());
                    ensure!(r.succeeded(), "SQL write: {} {}", r.status, r.body);
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
    let old = cluster.leader();
    execute(cluster, old, SQL_TABLE)?;
    let survivor = (0..cluster.nodes.len())
        .find(|&i| i != old)
        .expect("three nodes");
    let url = cluster.nodes[survivor].url("/db/execute");
    let stop = AtomicBool::new(false);
    let killed_at: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let first_ack: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let seq = AtomicU64::new(1_000_000);
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..4 {
            let (stop, killed_at, first_ack, seq, url) =
                (&stop, &killed_at, &first_ack, &seq, &url);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let q = seq.fetch_add(1, Ordering::Relaxed);
                    let body = serde_json::json!([sql_insert(0, q)]);
                    // A fresh connection per write, as a client reconnecting after errors.
                    let ok = Client::new(Duration::from_secs(5), None)
                        .post(url, &body)
                        .succeeded();
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
        cluster.kill9(old);
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
    cluster.restart(old);
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
    let old = cluster.leader();
    let mut gateways = vec![device_addr(cluster, old)?];
    for i in (0..cluster.nodes.len()).filter(|&i| i != old) {
        gateways.push(device_addr(cluster, i)?);
    }
    device::register(&cluster.nodes[old].url(""), 5000..5010)?;
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
        cluster.kill9(old);
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
    cluster.restart(old);
    Ok(())
}

/// Loads `profile.restart_rows` rows through Raft in one statement, SIGKILLs a follower and
/// times its restart until it serves again with every row.
fn restart(profile: &Profile, cluster: &mut Cluster, results: &mut Results) -> Result<()> {
    let rows = profile.restart_rows;
    let leader = cluster.leader();
    execute(
        cluster,
        leader,
        "CREATE TABLE IF NOT EXISTS bench_rows (device_id INTEGER NOT NULL, seq INTEGER NOT NULL, \
         time TEXT NOT NULL, received_at TEXT NOT NULL, v0 REAL, v1 REAL, v2 REAL, \
         PRIMARY KEY (device_id, seq))",
    )?;
    let t = Instant::now();
    execute(
        cluster,
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
    let follower = (0..cluster.nodes.len())
        .rev()
        .find(|&i| i != leader)
        .expect("three nodes");
    let count_sql = "SELECT count(*) FROM bench_rows";
    let deadline = Instant::now() + Duration::from_secs(120);
    while query_local_i64(cluster, follower, count_sql).unwrap_or(0) < rows as i64 {
        ensure!(
            Instant::now() < deadline,
            "follower never applied the bulk insert"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.kill9(follower);
    let t = Instant::now();
    cluster.relaunch(follower);
    let deadline = Instant::now() + Duration::from_secs(300);
    let readyz = cluster.nodes[follower].url("/readyz");
    let probe = Client::new(Duration::from_secs(1), None);
    loop {
        let ready = probe.get(&readyz).status == 200;
        if ready && query_local_i64(cluster, follower, count_sql).ok() == Some(rows as i64) {
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
