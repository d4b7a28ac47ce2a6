//! `--only disk` (issue 29's bench figures): bytes on disk per record per node, split into
//! database, Raft log, snapshots and WALs, after the device fleet stored `--disk-records`
//! records (default 6,000,000; fewer in quick mode); the database's marginal cost per record
//! for the bench's values and for random `f32`s; and the peak while the leader serves a
//! snapshot to a follower that fell behind its log, at full ingest, on loopback.
//!
//! Every figure is taken twice in the same run: with this tree's release `cairn` and with the
//! release `cairn` of the commit before the storage work ([`BEFORE_COMMIT`], built once in
//! `target/prev/pre-storage/`), so the before/after table comes from one machine and run.

use super::cairn::{DISK_PARTS, device_addr, disk_usage, query_local_i64};
use super::report::{Better, Measurement, Results, fmt_value, met};
use super::{Profile, proc::cpu_seconds};
use anyhow::{Context, Result, bail, ensure};
use cairn_protocol::Value;
use cairn_tests::{Cluster, Options, device, fleet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The first parent of the merge of the storage work (`git log --oneline | grep "merge
/// storage"`: 3060aa5): main just before it.
pub const BEFORE_COMMIT: &str = "e3f3222455f1a6f1b74014412c2b8b9c25df2c91";
/// The system name of this tree's binary in the disk figures.
pub const SYSTEM: &str = "Cairn";
/// The system name of [`BEFORE_COMMIT`]'s binary.
pub const SYSTEM_BEFORE: &str = "Cairn before storage (e3f3222)";

/// Devices of the fleet that fills the clusters (the bench's best device count).
const DEVICES: u64 = 100;
/// Target of issue 29: bytes per record per node, whole data directory, at 6 M records.
const TARGET_PER_RECORD: f64 = 64.0;
/// Target of issue 29: a node serving a snapshot, peak over steady state.
const TARGET_SERVING: f64 = 1.1;
/// Target of issue 29: a node installing a snapshot, peak over steady state.
const TARGET_INSTALLING: f64 = 2.1;

/// How many records the disk part stores.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Records stored before the per-record split is taken (issue 29: 6 M).
    pub records: u64,
    /// The database's marginal cost is the bytes added between these two counts.
    pub marginal: (u64, u64),
}

impl Sizes {
    pub fn new(quick: bool, records: Option<u64>) -> Sizes {
        let records = records.unwrap_or(if quick { 1_000_000 } else { 6_000_000 });
        let marginal = if quick || records < 3_000_000 {
            (records / 4, records * 3 / 4)
        } else {
            (1_000_000, 3_000_000)
        };
        Sizes { records, marginal }
    }
}

/// Builds the release `cairn` of [`BEFORE_COMMIT`] once in its own worktree and target dir
/// (`target/prev/pre-storage/{src,target}`, like the upgrade test's v0.1.0) and returns it.
pub fn build_before() -> Result<PathBuf> {
    let root = crate::util::root();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let base = target.join("prev/pre-storage");
    let (src, out) = (base.join("src"), base.join("target"));
    let bin = out.join("release/cairn");
    let stamp = base.join("built-commit");
    let built = std::fs::read_to_string(&stamp).unwrap_or_default();
    if bin.exists() && built.trim() == BEFORE_COMMIT {
        return Ok(bin);
    }
    let git = |args: &[&str]| -> Result<String> {
        crate::util::output(Command::new("git").arg("-C").arg(&root).args(args))
    };
    git(&["cat-file", "-e", &format!("{BEFORE_COMMIT}^{{commit}}")]).context(
        "the commit before the storage work is not in this clone (fetch main's history)",
    )?;
    std::fs::create_dir_all(&base)?;
    let head = crate::util::output(
        Command::new("git")
            .arg("-C")
            .arg(&src)
            .args(["rev-parse", "HEAD"]),
    )
    .unwrap_or_default();
    if head.trim() != BEFORE_COMMIT {
        git(&["worktree", "prune"])?;
        if src.join(".git").exists() {
            crate::util::output(Command::new("git").arg("-C").arg(&src).args([
                "checkout",
                "--detach",
                BEFORE_COMMIT,
            ]))?;
        } else {
            git(&[
                "worktree",
                "add",
                "--detach",
                &src.display().to_string(),
                BEFORE_COMMIT,
            ])?;
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::util::run(
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "-q",
                "-p",
                "cairn-gateway",
                "--bin",
                "cairn",
            ])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", &out),
    )
    .context("building the release cairn of the commit before the storage work")?;
    ensure!(bin.exists(), "{} missing after the build", bin.display());
    std::fs::write(&stamp, BEFORE_COMMIT)?;
    Ok(bin)
}

/// What one binary's run measured.
#[derive(Debug, Default)]
struct Figures {
    /// Records on the node with the most bytes per record, and that node's split.
    records: f64,
    parts: [f64; 5],
    /// Records per second the fleet got acknowledged while filling.
    ingest_rate: f64,
    /// Database bytes per record between the two marginal counts.
    marginal_bench: f64,
    marginal_random: f64,
    snapshot: Option<Peak>,
}

impl Figures {
    fn total(&self) -> f64 {
        self.parts.iter().sum()
    }
}

/// The snapshot transfer's figures.
#[derive(Debug, Default, Clone)]
struct Peak {
    serving: f64,
    installing: f64,
    /// Bytes per second of transfer that the serving node's WALs grew by at their largest
    /// (over their size at the restart), and the installing node's WALs' largest size.
    wal_serving: f64,
    wal_installing: f64,
    /// Restart of the follower to its applying past the leader's purge point.
    transfer_s: f64,
    /// The serving node's steady size when the follower restarted.
    steady_bytes: f64,
    serving_bytes: f64,
    installing_bytes: f64,
    /// The fleet's rate during the transfer.
    ingest_rate: f64,
}

pub fn run(
    profile: &Profile,
    results: &mut Results,
    bin: &Path,
    before: Option<&Path>,
    sections: &mut Vec<String>,
) -> Result<()> {
    let sizes = profile.disk;
    if profile.quick || sizes.records < 6_000_000 {
        println!(
            "    disk: {} records (the target is stated at 6,000,000: `--disk-records 6000000` \
             without --quick)",
            sizes.records
        );
    }
    let after = measure(profile, bin, "after", sizes)?;
    push(results, SYSTEM, &after);
    let before_figures = match before {
        Some(b) => match crate::util::caught(|| measure(profile, b, "before", sizes)) {
            Ok(f) => {
                push(results, SYSTEM_BEFORE, &f);
                Some(f)
            }
            Err(e) => {
                println!("    disk: the before binary's run failed: {e:#}");
                None
            }
        },
        None => None,
    };
    let table = table(sizes, &after, before_figures.as_ref());
    println!("\n{table}");
    sections.push(format!(
        "## Disk per record (issue 29)\n\n{}\n{table}\n{DISK_METHOD}\n",
        if sizes.records < 6_000_000 {
            format!(
                "**{} records**, fewer than the target's 6,000,000 (quick run or \
                 `--disk-records`).\n",
                sizes.records
            )
        } else {
            String::new()
        }
    ));
    Ok(())
}

fn push(results: &mut Results, system: &str, f: &Figures) {
    let mut m =
        |name: &str, v: f64, unit: &str| results.push(Measurement::new(name, system, v, unit));
    m(DISK_ALL, f.total(), "bytes");
    for (k, part) in DISK_PARTS.iter().enumerate() {
        m(&format!("{DISK_ALL} ({part})"), f.parts[k], "bytes");
    }
    m("records per node in the disk figures", f.records, "records");
    m(
        "device ingest while filling the disk run",
        f.ingest_rate,
        "records/s",
    );
    m(MARGINAL_BENCH, f.marginal_bench, "bytes");
    m(MARGINAL_RANDOM, f.marginal_random, "bytes");
    if let Some(p) = &f.snapshot {
        m(SERVING, p.serving, "x");
        m(INSTALLING, p.installing, "x");
        m(
            "WAL growth on the serving node per second of snapshot transfer",
            p.wal_serving,
            "bytes/s",
        );
        m(
            "WAL growth on the installing node per second of snapshot transfer",
            p.wal_installing,
            "bytes/s",
        );
        m(
            "snapshot transfer, restart to applied past the purge point",
            p.transfer_s,
            "s",
        );
    }
}

pub const DISK_ALL: &str = "disk bytes per record per node, disk part (worst node)";
pub const MARGINAL_BENCH: &str = "database bytes per record added, bench values";
pub const MARGINAL_RANDOM: &str = "database bytes per record added, random f32 values";
pub const SERVING: &str = "disk peak over steady state, node serving a snapshot";
pub const INSTALLING: &str = "disk peak over steady state, node installing a snapshot";

/// The figures of one binary: a cluster filled with the bench's values to `sizes.records`
/// (split, marginal cost on the way, then the snapshot transfer), and a second one filled
/// with random `f32`s to the second marginal count.
fn measure(profile: &Profile, bin: &Path, label: &str, sizes: Sizes) -> Result<Figures> {
    println!("    disk ({label}): {}", bin.display());
    let mut f = Figures::default();
    {
        let cluster = start(bin, label, "bench")?;
        let (marginal, rate) = fill(&cluster, sizes, bench_values)?;
        f.marginal_bench = marginal;
        let (records, parts) = split(&cluster)?;
        f.records = records;
        f.parts = parts;
        f.ingest_rate = rate;
        let mut cluster = cluster;
        f.snapshot = match crate::util::caught(|| snapshot_peak(profile, &mut cluster)) {
            Ok(p) => Some(p),
            Err(e) => {
                println!("    disk ({label}): snapshot transfer not measured: {e:#}");
                None
            }
        };
    }
    {
        let cluster = start(bin, label, "random")?;
        let random = Sizes {
            records: sizes.marginal.1,
            ..sizes
        };
        f.marginal_random = fill(&cluster, random, random_values)?.0;
    }
    Ok(f)
}

/// A 3-node cluster of `bin` with the fleet's stream declared, in
/// `target/bench/work/disk-{label}-{what}`, devices registered.
fn start(bin: &Path, label: &str, what: &str) -> Result<Cluster> {
    let dir = crate::util::root().join(format!("target/bench/work/disk-{label}-{what}"));
    let cluster = Cluster::start_with(
        3,
        Options {
            config: Some(format!(
                "{}{}",
                std::env::var("CAIRN_BENCH_TOML").unwrap_or_default(),
                fleet::stream_toml()
            )),
            log: Some(std::env::var("CAIRN_BENCH_LOG").unwrap_or_else(|_| "warn".into())),
            dir: Some(dir),
            ..Options::binary(bin)
        },
    );
    device::register(&cluster.nodes[cluster.leader()].url(""), 1..1 + DEVICES)?;
    Ok(cluster)
}

/// The bench's record: what `cairn_tests::device::climate_values` makes.
fn bench_values(_id: u64, seq: u64) -> [Value<'static>; 3] {
    device::climate_values(seq)
}

/// Three uniformly random `f32`s in [-1000, 1000) (splitmix64 of the device and sequence).
fn random_values(id: u64, seq: u64) -> [Value<'static>; 3] {
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq;
    let mut next = || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2000.0 - 1000.0
    };
    [Value::F32(next()), Value::F32(next()), Value::F32(next())]
}

/// Fills the cluster to `sizes.records` records with the fleet at full speed, measuring the
/// database between the marginal counts; returns (marginal bytes per record, records/s).
fn fill(cluster: &Cluster, sizes: Sizes, values: fleet::Values) -> Result<(f64, f64)> {
    let mut stored = 0u64;
    // The first run is short: the best rate seen sizes the next ones (a run's first moments,
    // devices connecting, are slower), so a goal is overshot by little.
    let mut best: f64 = 0.0;
    let (mut acked, mut secs) = (0u64, 0.0f64);
    let mut marks = Vec::new();
    for goal in [sizes.marginal.0, sizes.marginal.1, sizes.records] {
        while stored < goal {
            let chunk = if best > 0.0 {
                (0.8 * (goal - stored) as f64 / best).clamp(0.3, 10.0)
            } else {
                1.0
            };
            let leader = cluster.leader();
            let r = fleet::run_with_values(
                &fleet::Plan {
                    gateways: vec![device_addr(cluster, leader)?],
                    ids: 1..1 + DEVICES,
                    mode: fleet::Mode::Saturate,
                    duration: Duration::from_secs_f64(chunk),
                    probe: None,
                },
                values,
            )?;
            ensure!(
                r.acked > 0,
                "the fleet got nothing acknowledged in {chunk:.1} s"
            );
            stored += r.acked;
            acked += r.acked;
            secs += r.elapsed.as_secs_f64();
            best = best.max(r.acked as f64 / r.elapsed.as_secs_f64());
        }
        if marks.len() < 2 {
            settle(cluster)?;
            let leader = cluster.leader();
            let n = query_local_i64(cluster, leader, "SELECT count(*) FROM climate")? as f64;
            let db = database_bytes(cluster, leader)?;
            println!(
                "    {n} records: database {:.1} MB ({:.1} B/record)",
                db / 1e6,
                db / n
            );
            marks.push((n, db));
        }
    }
    let [(n0, d0), (n1, d1)] = marks[..] else {
        bail!("marginal counts not reached")
    };
    Ok((
        (d1 - d0) / (n1 - n0).max(1.0),
        acked as f64 / secs.max(1e-9),
    ))
}

/// Waits until every running node applied what the leader had committed.
fn settle(cluster: &Cluster) -> Result<()> {
    let leader = cluster.leader();
    let target = cluster.nodes[leader]
        .status()
        .and_then(|s| s["raft"]["commit_index"].as_u64())
        .context("the leader's commit index")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster
        .nodes
        .iter()
        .filter(|n| n.is_started())
        .any(|n| n.applied_index().unwrap_or(0) < target)
    {
        ensure!(
            Instant::now() < deadline,
            "followers never applied index {target}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The database's size on node `i` as SQLite counts it: pages times page size, what the
/// file holds once the WAL is checkpointed (read through a read-only connection of this
/// process: the API refuses PRAGMAs).
fn database_bytes(cluster: &Cluster, i: usize) -> Result<f64> {
    let path = cluster.nodes[i].dir.join("sm/db.sqlite");
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", path.display()))?;
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok((pages * size) as f64)
}

/// Bytes per record on the node with the most, split by [`DISK_PARTS`] (printed per node).
fn split(cluster: &Cluster) -> Result<(f64, [f64; 5])> {
    settle(cluster)?;
    let mut worst = (0.0, [0.0; 5]);
    let mut worst_total = 0.0;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let records = query_local_i64(cluster, i, "SELECT count(*) FROM climate")?.max(1) as f64;
        let parts = disk_usage(&node.dir)?;
        let per: Vec<f64> = parts.iter().map(|&b| b as f64 / records).collect();
        let total: f64 = per.iter().sum();
        let mut line = format!(
            "    node {}: {records} records, {total:.1} B/record ({:.1} MB):",
            node.id,
            parts.iter().sum::<u64>() as f64 / 1e6
        );
        for (k, name) in DISK_PARTS.iter().enumerate() {
            let _ = write!(line, " {name} {:.1}", per[k]);
        }
        println!("{line}");
        if total > worst_total {
            worst_total = total;
            worst = (records, [per[0], per[1], per[2], per[3], per[4]]);
        }
    }
    Ok(worst)
}

/// One sample of the three data directories' sizes ([`DISK_PARTS`] each).
struct Sample {
    at: Instant,
    serving: [u64; 5],
    installing: [u64; 5],
    bystander: [u64; 5],
}

fn sample(cluster: &Cluster, s: usize, i: usize, b: usize) -> Result<Sample> {
    let usage = |k: usize| disk_usage(&cluster.nodes[k].dir);
    Ok(Sample {
        at: Instant::now(),
        serving: usage(s)?,
        installing: usage(i)?,
        bystander: usage(b)?,
    })
}

fn raft_index(cluster: &Cluster, i: usize, key: &str) -> Option<u64> {
    cluster.nodes[i]
        .status_within(Duration::from_millis(500))?
        .get("raft")?
        .get(key)?
        .as_u64()
}

/// The snapshot settings of the transfer measurement (flags both binaries take).
const SNAPSHOT_FLAGS: [&str; 4] = ["--snapshot-threshold", "128", "--snapshot-keep-logs", "16"];

/// Stops a follower, ingests at full speed until the leader's log is purged past it, starts
/// it again while the ingest goes on and samples the three data directories every 50 ms
/// until the follower has applied past the purge point and caught up with the third node.
///
/// Steady state at a moment is the serving node's size when the follower restarted, grown as
/// the third node (which takes part in nothing but the ingest) grew since: the ratios are
/// the peaks of the serving and the installing node over it.
fn snapshot_peak(profile: &Profile, cluster: &mut Cluster) -> Result<Peak> {
    // Snapshots often enough to purge past a stopped follower within seconds at full ingest:
    // with the defaults (every 8,192 entries, 1,024 kept behind; the binary after the storage
    // work also every 32 MiB of log) a saturated leader, whose entries carry thousands of
    // records each, takes minutes. All nodes restart with the same settings for both binaries.
    for i in 0..cluster.nodes.len() {
        cluster.terminate(i);
    }
    for i in 0..cluster.nodes.len() {
        cluster.set_flags(i, &SNAPSHOT_FLAGS);
        cluster.relaunch(i);
    }
    for i in 0..cluster.nodes.len() {
        cluster.wait_ready(i);
    }
    let leader = cluster.leader();
    let installing = (0..3).find(|&i| i != leader).expect("three nodes");
    let bystander = (0..3)
        .find(|&i| i != leader && i != installing)
        .expect("three nodes");
    let last = raft_index(cluster, installing, "last_log_index").context("follower's log")?;
    if !cluster.terminate(installing) {
        println!("    disk: the follower did not exit cleanly on SIGTERM");
    }
    let leader_addr = device_addr(cluster, leader)?;
    let purge_within = Duration::from_secs(if profile.quick { 60 } else { 120 });
    let leader_pid = cluster.nodes[leader].pid().unwrap_or(0);
    let cpu_before = cpu_seconds(leader_pid).unwrap_or(f64::NAN);
    let stop = AtomicBool::new(false);
    let outcome = std::thread::scope(|scope| -> Result<(Peak, (u64, f64))> {
        let fleet = scope.spawn(|| ingest_until(leader_addr, &stop));
        let peak = {
            // Also when the transfer panics (a node that died): the scope waits for the fleet.
            let _stop = StopOnDrop(&stop);
            crate::util::caught(|| {
                transfer(cluster, [leader, installing, bystander], last, purge_within)
            })
        };
        let report = fleet
            .join()
            .map_err(|_| anyhow::anyhow!("fleet panicked"))??;
        Ok((peak?, report))
    });
    let (mut p, (acked, secs)) = outcome?;
    p.ingest_rate = acked as f64 / secs;
    let cpu = (cpu_seconds(leader_pid).unwrap_or(f64::NAN) - cpu_before) / secs;
    println!(
        "    snapshot transfer: {:.1} s; serving node {:.1} MB at peak over {:.1} MB steady \
         ({:.2}x), installing node {:.1} MB ({:.2}x); WAL growth serving {:.0} B/s, installing \
         {:.0} B/s; ingest {:.0} records/s, leader CPU {cpu:.2} cores",
        p.transfer_s,
        p.serving_bytes / 1e6,
        p.steady_bytes / 1e6,
        p.serving,
        p.installing_bytes / 1e6,
        p.installing,
        p.wal_serving,
        p.wal_installing,
        p.ingest_rate
    );
    Ok(p)
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The fleet at full speed on the leader, in 5 s runs, until `stop`; (acked, seconds).
fn ingest_until(leader: SocketAddr, stop: &AtomicBool) -> Result<(u64, f64)> {
    let (mut acked, mut secs) = (0, 0.0);
    while !stop.load(Ordering::Relaxed) {
        let r = fleet::run(&fleet::Plan {
            gateways: vec![leader],
            ids: 1..1 + DEVICES,
            mode: fleet::Mode::Saturate,
            duration: Duration::from_secs(5),
            probe: None,
        })?;
        acked += r.acked;
        secs += r.elapsed.as_secs_f64();
    }
    Ok((acked, secs.max(1e-9)))
}

/// The transfer itself, while the fleet ingests: nodes are [serving, installing, bystander].
fn transfer(
    cluster: &mut Cluster,
    [leader, installing, bystander]: [usize; 3],
    last: u64,
    purge_within: Duration,
) -> Result<Peak> {
    {
        let started = Instant::now();
        let purged = loop {
            let p = raft_index(cluster, leader, "purged_index").unwrap_or(0);
            if p > last {
                break p;
            }
            ensure!(
                started.elapsed() < purge_within,
                "the leader's log was not purged past the stopped follower ({last}) within \
                 {purge_within:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        // A moment of steady state with the ingest going, then the follower comes back.
        std::thread::sleep(Duration::from_secs(2));
        let at_restart = sample(cluster, leader, installing, bystander)?;
        let restarted = Instant::now();
        cluster.relaunch(installing);
        let mut samples = vec![];
        let mut transfer_end = None;
        let mut caught_up = None;
        let deadline = restarted + Duration::from_secs(600);
        loop {
            samples.push(sample(cluster, leader, installing, bystander)?);
            if let Some(applied) = raft_index(cluster, installing, "applied_index") {
                if transfer_end.is_none() && applied >= purged {
                    transfer_end = Some((Instant::now(), samples.len() - 1));
                }
                let other = raft_index(cluster, bystander, "applied_index").unwrap_or(u64::MAX);
                if transfer_end.is_some() && caught_up.is_none() && applied >= other {
                    caught_up = Some(Instant::now());
                }
            }
            // Done 2 s after it caught up with the third node, or 5 s after the install (a
            // follower whose snapshot is already purged past needs another: not measured).
            if caught_up.is_some_and(|c| c.elapsed() > Duration::from_secs(2))
                || transfer_end.is_some_and(|(t, _)| t.elapsed() > Duration::from_secs(5))
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the restarted follower did not install a snapshot within {:?}",
                deadline - restarted
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let (end_at, end_i) = transfer_end.expect("set before leaving the loop");
        let steady = |s: &Sample| {
            let grown = total(&s.bystander) as f64 / total(&at_restart.bystander).max(1) as f64;
            total(&at_restart.serving) as f64 * grown
        };
        let mut p = Peak {
            steady_bytes: total(&at_restart.serving) as f64,
            transfer_s: (end_at - restarted).as_secs_f64(),
            ..Peak::default()
        };
        let (mut peak_s, mut peak_i) = (&at_restart, &at_restart);
        for s in &samples {
            let st = steady(s);
            if total(&s.serving) as f64 / st > p.serving {
                p.serving = total(&s.serving) as f64 / st;
                p.serving_bytes = total(&s.serving) as f64;
                peak_s = s;
            }
            if total(&s.installing) as f64 / st > p.installing {
                p.installing = total(&s.installing) as f64 / st;
                p.installing_bytes = total(&s.installing) as f64;
                peak_i = s;
            }
        }
        let mb = |parts: &[u64; 5]| {
            let mut line = String::new();
            for (k, name) in DISK_PARTS.iter().enumerate() {
                let _ = write!(line, " {name} {:.1}", parts[k] as f64 / 1e6);
            }
            line
        };
        println!("    at the restart, MB: serving{}", mb(&at_restart.serving));
        println!(
            "                        third node{}",
            mb(&at_restart.bystander)
        );
        println!(
            "    serving node's peak, MB:{} (third node{})",
            mb(&peak_s.serving),
            mb(&peak_s.bystander)
        );
        println!(
            "    installing node's peak, MB:{} (third node{})",
            mb(&peak_i.installing),
            mb(&peak_i.bystander)
        );
        // The WALs' largest size during the transfer (part 3 of DISK_PARTS), over its length.
        let secs = (samples[end_i].at - at_restart.at).as_secs_f64().max(1e-3);
        let wal_max = |f: fn(&Sample) -> u64| samples[..=end_i].iter().map(f).max().unwrap_or(0);
        p.wal_serving =
            (wal_max(|s| s.serving[3]) as f64 - at_restart.serving[3] as f64).max(0.0) / secs;
        p.wal_installing = wal_max(|s| s.installing[3]) as f64 / secs;
        Ok(p)
    }
}

fn total(parts: &[u64; 5]) -> u64 {
    parts.iter().sum()
}

/// The before/after table with the targets.
fn table(sizes: Sizes, after: &Figures, before: Option<&Figures>) -> String {
    let mut out = String::new();
    let (m0, m1) = sizes.marginal;
    let _ = writeln!(
        out,
        "| figure ({} records, 3 nodes on loopback) | after: this tree | before: e3f3222 | target | met |",
        sizes.records
    );
    out.push_str("|---|---:|---:|---:|:---:|\n");
    let mut row = |what: &str,
                   get: &dyn Fn(&Figures) -> Option<f64>,
                   unit: &str,
                   goal: Option<(Better, f64)>| {
        let a = get(after).unwrap_or(f64::NAN);
        let b = before.and_then(get).unwrap_or(f64::NAN);
        let (target, ok) = match goal {
            Some((better, t)) => (
                format!("{} {}", better.sign(), fmt_value(t)),
                met(better, a, t),
            ),
            None => (String::new(), ""),
        };
        let _ = writeln!(
            out,
            "| {what} | {} {unit} | {} {unit} | {target} | {ok} |",
            fmt_value(a),
            fmt_value(b)
        );
    };
    row(
        "records on each node when the split was taken",
        &|f| Some(f.records),
        "",
        None,
    );
    row(
        "bytes per record per node, whole data directory (worst node)",
        &|f| Some(f.total()),
        "B",
        Some((Better::AtMost, TARGET_PER_RECORD)),
    );
    for (k, part) in DISK_PARTS.iter().enumerate() {
        row(&format!("… {part}"), &|f| Some(f.parts[k]), "B", None);
    }
    row(
        &format!(
            "database bytes added per record, at least {m0}→{m1} records (counts above), bench values"
        ),
        &|f| Some(f.marginal_bench),
        "B",
        None,
    );
    row(
        &format!("database bytes added per record, at least {m0}→{m1} records, random f32s"),
        &|f| Some(f.marginal_random),
        "B",
        None,
    );
    row(
        "device ingest while filling",
        &|f| Some(f.ingest_rate),
        "rec/s",
        None,
    );
    let snap = |g: fn(&Peak) -> f64| move |f: &Figures| f.snapshot.as_ref().map(g);
    row(
        "snapshot served at full ingest: serving node peak / steady",
        &snap(|p| p.serving),
        "×",
        Some((Better::AtMost, TARGET_SERVING)),
    );
    row(
        "… installing node peak / steady",
        &snap(|p| p.installing),
        "×",
        Some((Better::AtMost, TARGET_INSTALLING)),
    );
    row(
        "… serving node's WAL growth per s of transfer",
        &snap(|p| p.wal_serving / 1e6),
        "MB/s",
        None,
    );
    row(
        "… installing node's WAL per s of transfer",
        &snap(|p| p.wal_installing / 1e6),
        "MB/s",
        None,
    );
    row(
        "… transfer (restart to applied past the purge point)",
        &snap(|p| p.transfer_s),
        "s",
        None,
    );
    row(
        "… ingest during the transfer",
        &snap(|p| p.ingest_rate),
        "rec/s",
        None,
    );
    out
}

const DISK_METHOD: &str = "\
Three release `cairn node` processes on loopback per binary, the bench's stream (a table of \
three reals), filled by 100 protocol-level devices at full speed. Bytes per record: every \
file of a node's data directory over the rows of its `climate` table, once every node applied \
the leader's commit index (\"other\" is node.log and small files). Marginal cost: the \
database's pages (`PRAGMA page_count` × `page_size`) added between the two counts, over the \
records added; the random run pushes three uniform `f32`s in [-1000, 1000). Snapshot: one \
follower is stopped (SIGTERM) after all nodes restarted with snapshots every 128 entries \
and 16 entries kept behind (so a saturated leader purges past it within seconds; same \
settings for both binaries), the fleet ingests until the leader's log is purged past the \
follower's last entry, and the follower is started again while the ingest goes on; the three \
data directories are sampled every 50 ms until it applied past the purge point and caught \
up with the third node (or 5 s after the install, when it needs another snapshot). Steady \
state at a moment is the serving node's size at the restart grown as the third node grew \
since. WAL growth: the serving node's WALs at their largest during the transfer (restart to \
applied past the purge point) over their size at the restart, per second of transfer; the \
installing node's WALs at their largest, per second.\n";
