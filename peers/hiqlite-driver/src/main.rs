//! Peer driver for `cargo xtask bench`: runs a 3-node hiqlite cluster on loopback (three
//! processes, like a real deployment) and writes records shaped like Cairn's device records.
//!
//! ```text
//! hiqlite-driver bench --log-sync immediate|interval --seconds S --latency-writes N
//! hiqlite-driver node  --id I --nodes SPEC --dir DIR --log-sync ...   (spawned by `bench`)
//! ```
//!
//! `bench` is node 1 itself: it spawns nodes 2 and 3, waits for a healthy cluster and a leader,
//! then measures, printing one JSON object per measurement on stdout (name, system, value,
//! unit); progress goes to stderr. Writes are issued through node 1's client; when node 1 leads
//! (the usual case, it bootstraps the cluster) hiqlite writes straight to the local Raft, so the
//! figures are hiqlite's best case: no client network hop, unlike Cairn's devices.
//!
//! Record shape (the columns Cairn's gateway stores for a declared three-value stream):
//! `records(device_id, seq, time, received_at, v0, v1, v2)`, times as ISO-8601 UTC text,
//! primary key `(device_id, seq)`.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hiqlite::{Client, LogSync, Node, NodeConfig, Param};

const INSERT: &str = "INSERT INTO records (device_id, seq, time, received_at, v0, v1, v2) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7)";
const SECRET: &str = "cairn-bench-secret-0123456789";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match args.first().map(String::as_str) {
        Some("node") => rt.block_on(node(&args[1..])),
        Some("bench") => rt.block_on(bench(&args[1..])),
        _ => Err("usage: hiqlite-driver bench|node [options]".to_string()),
    };
    if let Err(e) = result {
        eprintln!("hiqlite-driver: {e}");
        std::process::exit(1);
    }
    // Skip hiqlite's graceful shutdown (it waits ~10 s for rolling releases); the data dir is
    // scratch space and the children exit when our stdin pipe to them closes.
    std::process::exit(0);
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn flag_num<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    match flag(args, name) {
        Some(v) => v.parse().map_err(|_| format!("{name}: cannot parse {v:?}")),
        None => Ok(default),
    }
}

fn log_sync(args: &[String]) -> Result<LogSync, String> {
    match flag(args, "--log-sync").unwrap_or("interval") {
        "immediate" => Ok(LogSync::Immediate),
        // hiqlite's default: acknowledge on write(2), fsync every 200 ms.
        "interval" => Ok(LogSync::IntervalMillis(200)),
        other => Err(format!("--log-sync {other}: expected immediate or interval")),
    }
}

/// `1=raftaddr,apiaddr;2=...`
fn parse_nodes(spec: &str) -> Result<Vec<Node>, String> {
    spec.split(';')
        .map(|n| {
            let (id, addrs) = n.split_once('=').ok_or("node spec: missing =")?;
            let (raft, api) = addrs.split_once(',').ok_or("node spec: missing ,")?;
            Ok(Node {
                id: id.parse().map_err(|_| "node spec: bad id")?,
                addr_raft: raft.to_string(),
                addr_api: api.to_string(),
            })
        })
        .collect()
}

async fn start(id: u64, nodes: Vec<Node>, dir: &str, sync: LogSync) -> Result<Client, String> {
    let config = NodeConfig {
        node_id: id,
        nodes,
        listen_addr_api: "127.0.0.1".into(),
        listen_addr_raft: "127.0.0.1".into(),
        data_dir: dir.to_string().into(),
        wal_sync: sync,
        secret_raft: SECRET.into(),
        secret_api: SECRET.into(),
        health_check_delay: Duration::from_secs(0),
        ..NodeConfig::default()
    };
    hiqlite::start_node(config)
        .await
        .map_err(|e| format!("node {id}: {e}"))
}

/// A follower node: runs until its stdin closes (the `bench` parent exited or was killed).
async fn node(args: &[String]) -> Result<(), String> {
    let id = flag_num(args, "--id", 0u64)?;
    let nodes = parse_nodes(flag(args, "--nodes").ok_or("--nodes missing")?)?;
    let dir = flag(args, "--dir").ok_or("--dir missing")?;
    let _client = start(id, nodes, dir, log_sync(args)?).await?;
    tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
    })
    .await
    .map_err(|e| e.to_string())
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Children are killed when this guard drops, whatever path `bench` leaves by.
struct Followers(Vec<Child>);

impl Drop for Followers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn record_params(device: i64, seq: i64) -> Vec<Param> {
    let ms = seq % 60_000;
    let time = format!("2026-11-25T18:44:{:02}.{:03}Z", ms / 1000, ms % 1000);
    vec![
        Param::from(device),
        Param::from(seq),
        Param::from(time.clone()),
        Param::from(time),
        Param::from(21.5f64 + (seq % 10) as f64 * 0.1),
        Param::from(48.25f64),
        Param::from(1013.0f64),
    ]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn emit(name: &str, system: &str, value: f64, unit: &str) {
    println!(
        "{{\"name\":\"{name}\",\"system\":\"{system}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}"
    );
}

async fn bench(args: &[String]) -> Result<(), String> {
    let sync = log_sync(args)?;
    let sync_name = flag(args, "--log-sync").unwrap_or("interval");
    let system = format!("hiqlite log_sync={sync_name}");
    let seconds = flag_num(args, "--seconds", 3.0f64)?;
    let latency_writes = flag_num(args, "--latency-writes", 500usize)?;
    let base = flag(args, "--dir").ok_or("--dir missing")?;

    let mut spec = Vec::new();
    for id in 1..=3 {
        spec.push(format!(
            "{id}=127.0.0.1:{},127.0.0.1:{}",
            free_port()?,
            free_port()?
        ));
    }
    let spec = spec.join(";");
    let nodes = parse_nodes(&spec)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut followers = Followers(Vec::new());
    for id in 2..=3 {
        let dir = format!("{base}/node{id}");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{dir}: {e}"))?;
        let child = Command::new(&exe)
            .args(["node", "--id", &id.to_string(), "--nodes", &spec, "--dir", &dir])
            .args(["--log-sync", sync_name])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn node {id}: {e}"))?;
        followers.0.push(child);
    }
    let dir = format!("{base}/node1");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let client = start(1, nodes, &dir, sync).await?;
    client
        .wait_until_healthy_db_timeout(Duration::from_secs(60))
        .await
        .map_err(|e| format!("cluster not healthy: {e}"))?;
    client
        .wait_for_cluster_sync_timeout(Duration::from_secs(60))
        .await
        .map_err(|e| format!("cluster not in sync: {e}"))?;
    eprintln!(
        "hiqlite cluster up ({system}); node 1 leader: {}",
        client.is_leader_db().await
    );
    client
        .execute(
            "CREATE TABLE IF NOT EXISTS records (device_id INTEGER NOT NULL, \
             seq INTEGER NOT NULL, time TEXT NOT NULL, received_at TEXT NOT NULL, \
             v0 REAL, v1 REAL, v2 REAL, PRIMARY KEY (device_id, seq))",
            vec![],
        )
        .await
        .map_err(|e| format!("create table: {e}"))?;

    // 1. Per-write latency, one writer, one record in flight.
    let mut lat = Vec::with_capacity(latency_writes);
    for seq in 0..latency_writes as i64 {
        let t = Instant::now();
        client
            .execute(INSERT, record_params(0, seq))
            .await
            .map_err(|e| format!("insert: {e}"))?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    emit("write latency p50, 1 writer", &system, percentile(&lat, 0.5), "ms");
    emit("write latency p99, 1 writer", &system, percentile(&lat, 0.99), "ms");

    // 2. Throughput of single-row writes and of 100-row transactions (one Raft entry each, the
    //    same shape as a Cairn batch) at a few concurrencies; the best is what we report.
    let device = Arc::new(AtomicU64::new(1));
    let mut best_rows = 0.0f64;
    for writers in [16usize, 64] {
        let r = throughput(&client, &device, writers, 1, seconds).await?;
        emit(&format!("throughput, {writers} writers x 1 row"), &system, r, "records/s");
        best_rows = best_rows.max(r);
    }
    let mut best_txn = 0.0f64;
    for writers in [4usize, 16] {
        let r = throughput(&client, &device, writers, 100, seconds).await?;
        emit(&format!("throughput, {writers} writers x 100-row txn"), &system, r, "records/s");
        best_txn = best_txn.max(r);
    }
    emit("best throughput", &system, best_rows.max(best_txn), "records/s");
    drop(followers);
    Ok(())
}

/// Records/s committed by `writers` concurrent tasks, each writing `rows` rows per request
/// (a transaction when `rows > 1`) for `seconds`. Each task is its own device id.
async fn throughput(
    client: &Client,
    device: &Arc<AtomicU64>,
    writers: usize,
    rows: usize,
    seconds: f64,
) -> Result<f64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..writers {
        let client = client.clone();
        let stop = stop.clone();
        let done = done.clone();
        let dev = device.fetch_add(1, Ordering::Relaxed) as i64;
        tasks.push(tokio::spawn(async move {
            let mut seq = 0i64;
            while !stop.load(Ordering::Relaxed) {
                if rows == 1 {
                    client.execute(INSERT, record_params(dev, seq)).await?;
                } else {
                    let batch: Vec<_> = (0..rows as i64)
                        .map(|i| (INSERT, record_params(dev, seq + i)))
                        .collect();
                    for r in client.txn(batch).await? {
                        r?;
                    }
                }
                seq += rows as i64;
                done.fetch_add(rows as u64, Ordering::Relaxed);
            }
            Ok::<(), hiqlite::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("write: {e}"))?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}
