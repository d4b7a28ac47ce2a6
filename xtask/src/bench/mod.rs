//! `cargo xtask bench [--quick] [--only PARTS] [--disk-records N]`: Cairn side by side with dqlite, Mosquitto and
//! hiqlite, in one run on one machine.
//!
//! Parts run in order: `peers` (installs Debian packages when missing), `hiqlite` (builds
//! `peers/hiqlite-driver` outside the workspace), `cairn` (a 3-node cluster of release
//! `cairn` processes on loopback), `export` (export throughput per destination kind and lag
//! under sustained ingest, `export.rs`), `disk` (issue 29: bytes per record at
//! `--disk-records N`, default 6,000,000, marginal cost, the snapshot-transfer peak, beside the
//! release `cairn` of the commit before the storage work, built once under
//! `target/prev/pre-storage`) and `litestream` (issue 30: Cairn's continuous backup beside
//! Litestream 0.5, both to moto's S3 server). `--only cairn,dqlite` runs a subset (`dqlite`,
//! `mosquitto`, `hiqlite`, `cairn`, `export`, `disk`, `litestream`). Every run writes
//! `target/bench/results.json` (one object per measurement: name, system, value, unit),
//! `target/bench/report.md` and
//! `target/bench/throughput.svg`, and prints the ratio table. A full run of every part also
//! rewrites `BENCHMARKS.md` and `benchmarks-throughput.svg` at the repository root (listing
//! any part that failed).
//!
//! `--against BIN [--rounds N]` runs only the Cairn part, for this tree's binary and `BIN`
//! (another commit's release build) alternated A B B A `N` times (default 2), and prints the
//! median of every figure side by side (`against.rs`, `target/bench/against.md`): the fair way
//! to check "no worse than before" on a machine whose disk remembers the previous run.
//!
//! `--perf` samples the Cairn leader with `perf record` during the heaviest device and SQL
//! runs and writes flat profiles to `target/bench/*.profile.txt`.
//!
//! A part that fails is reported and the others still run; the command then exits non-zero.

mod against;
mod cairn;
mod disk;
mod export;
mod litestream;
mod mqtt;
mod peers;
pub(crate) mod proc;
mod report;
mod wire;

use anyhow::{Context, Result, bail};
use report::{Better, Comparison, Goal, Results, Series};
use std::time::{Duration, Instant};

/// Measurement names shared by all systems, so rows compare like with like.
pub mod names {
    pub const LAT_P50: &str = "write latency p50, 1 record in flight";
    pub const LAT_P99: &str = "write latency p99, 1 record in flight";
    pub const TPUT_BEST: &str = "throughput at best concurrency";
    pub const BYTES_PER_RECORD: &str = "bytes on the wire per three-value record";
    /// Cairn only: every byte 1,000 devices wrote and read, per acknowledged record.
    pub const BYTES_ON_SOCKETS: &str = "bytes per record counted on the sockets, 1000 devices";
    pub const FAILOVER: &str = "failover: kill -9 of the leader to the next ack";
    pub const RSS: &str = "gateway RSS under load (leader)";
    pub const RESTART: &str = "restart of a node holding 1,000,000 rows";
    /// Cairn only: the worst node's data directory per stored device record.
    pub const DISK_PER_RECORD: &str = "disk bytes per record per node";
}

/// How long and how hard each part runs.
pub struct Profile {
    pub quick: bool,
    /// `--perf`: sample the leader with `perf record` during the heaviest Cairn runs.
    pub perf: bool,
    pub dqlite_seconds: u32,
    /// Seconds per throughput point of Mosquitto and hiqlite.
    pub peer_seconds: f64,
    /// Seconds per Cairn throughput point.
    pub cairn_seconds: f64,
    pub latency_samples: usize,
    pub restart_rows: u64,
    /// `disk`: records stored and the marginal counts (`--disk-records N`).
    pub disk: disk::Sizes,
}

impl Profile {
    fn new(quick: bool) -> Profile {
        if quick {
            Profile {
                quick,
                perf: false,
                dqlite_seconds: 3,
                peer_seconds: 1.5,
                cairn_seconds: 3.0,
                latency_samples: 300,
                restart_rows: 1_000_000,
                disk: disk::Sizes::new(true, None),
            }
        } else {
            Profile {
                quick,
                perf: false,
                dqlite_seconds: 10,
                peer_seconds: 4.0,
                cairn_seconds: 8.0,
                latency_samples: 2000,
                restart_rows: 1_000_000,
                disk: disk::Sizes::new(false, None),
            }
        }
    }

    pub fn peer_duration(&self) -> Duration {
        Duration::from_secs_f64(self.peer_seconds)
    }
}

const PARTS: &[&str] = &[
    "dqlite",
    "mosquitto",
    "hiqlite",
    "cairn",
    "export",
    "disk",
    "litestream",
];

pub fn run(args: &[String]) -> Result<()> {
    let mut quick = false;
    let mut perf = false;
    let mut disk_records = None;
    let mut against: Option<std::path::PathBuf> = None;
    let mut rounds = 2usize;
    let mut only: Vec<String> = PARTS.iter().map(|s| s.to_string()).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--perf" => perf = true,
            "--disk-records" => {
                let v = it.next().context("--disk-records needs a count")?;
                disk_records = Some(
                    v.replace(['_', ','], "")
                        .parse::<u64>()
                        .with_context(|| format!("--disk-records {v}"))?,
                );
            }
            "--against" => {
                against = Some(it.next().context("--against needs a cairn binary")?.into());
            }
            "--rounds" => {
                let v = it.next().context("--rounds needs a count")?;
                rounds = v.parse().with_context(|| format!("--rounds {v}"))?;
            }
            "--only" => {
                let v = it
                    .next()
                    .context("--only needs a list, e.g. --only cairn,dqlite")?;
                only = v.split(',').map(str::to_string).collect();
                if let Some(bad) = only.iter().find(|p| !PARTS.contains(&p.as_str())) {
                    bail!("--only: unknown part `{bad}` (parts: {})", PARTS.join(", "));
                }
            }
            other => {
                bail!(
                    "bench: unknown argument `{other}` (usage: bench [--quick] [--perf] \
                     [--only PARTS] [--disk-records N] [--against BIN [--rounds N]])"
                )
            }
        }
    }
    let profile = Profile {
        perf,
        disk: disk::Sizes::new(quick, disk_records),
        ..Profile::new(quick)
    };
    let wants = |p: &str| only.iter().any(|o| o == p);
    let started = Instant::now();
    let out_dir = crate::util::root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    if let Some(other) = against {
        // This tree's Cairn part against another binary, alternated (`against`).
        let this = cairn::build()?;
        let md = against::run(&profile, &this, &other, rounds)?;
        std::fs::write(out_dir.join("against.md"), md)?;
        println!("results: target/bench/against.md");
        return Ok(());
    }

    // Builds happen first and are timed apart from the measurements.
    let mut failures: Vec<String> = Vec::new();
    let mut hiqlite_driver = None;
    let mut cairn_bin = None;
    let mut before_bin = None;
    crate::util::step("bench: builds and packages", || {
        if wants("dqlite") || wants("mosquitto") {
            peers::ensure_installed()?;
        }
        if wants("hiqlite") {
            hiqlite_driver = Some(peers::build_hiqlite_driver()?);
        }
        if wants("cairn") || wants("export") || wants("disk") || wants("litestream") {
            cairn_bin = Some(cairn::build()?);
        }
        if wants("disk") {
            // The before row is left out (and says so) when its build fails.
            before_bin = disk::build_before()
                .map_err(|e| eprintln!("bench: no before binary for the disk part: {e:#}"))
                .ok();
        }
        if wants("litestream") {
            crate::setup::ensure_litestream()?;
        }
        Ok(())
    })?;

    let machine = machine()?;
    let measuring = Instant::now();
    let mut results = Results::default();
    // Parts with their own tables (disk, Litestream) add a markdown section each.
    let mut sections: Vec<String> = Vec::new();
    let mut part = |name: &str, f: &mut dyn FnMut(&mut Results) -> Result<()>| {
        if !wants(name) {
            return;
        }
        if let Err(e) = crate::util::step(&format!("bench: {name}"), || f(&mut results)) {
            eprintln!("bench: {name} failed: {e:#}");
            failures.push(format!("{name}: {e:#}"));
        }
    };
    part("dqlite", &mut |r| peers::dqlite(&profile, r));
    part("mosquitto", &mut |r| peers::mosquitto(&profile, r));
    part("hiqlite", &mut |r| {
        peers::hiqlite(&profile, r, hiqlite_driver.as_deref().expect("built above"))
    });
    part("cairn", &mut |r| {
        cairn::run(&profile, r, cairn_bin.as_deref().expect("built above"))
    });
    part("export", &mut |r| {
        export::run(&profile, r, cairn_bin.as_deref().expect("built above"))
    });
    part("disk", &mut |r| {
        let bin = cairn_bin.as_deref().expect("built above");
        disk::run(&profile, r, bin, before_bin.as_deref(), &mut sections)
    });
    part("litestream", &mut |r| {
        let bin = cairn_bin.as_deref().expect("built above");
        litestream::run(&profile, r, bin, &mut sections)
    });
    let measured_for = measuring.elapsed();

    results.write_json(&out_dir.join("results.json"))?;
    let table = report::ratio_table(&results, &comparisons(), &goals());
    let svg = report::throughput_svg(
        "Records committed per second, 3 nodes on loopback",
        &chart_series(&results),
    );
    std::fs::write(out_dir.join("throughput.svg"), &svg)?;
    let mut md = markdown(&profile, &machine, &results, &table, measured_for);
    for s in &sections {
        md.push('\n');
        md.push_str(s);
    }
    std::fs::write(out_dir.join("report.md"), &md)?;
    println!("\nresults: target/bench/results.json, report.md, throughput.svg\n");
    println!("machine: {machine}\n");
    println!("{table}");
    println!(
        "bench: measured in {:.0} s ({} profile), {:.0} s in all",
        measured_for.as_secs_f64(),
        if quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64()
    );

    if !quick && only.len() == PARTS.len() {
        // A full run is published even when a part failed, with the failure written down.
        if !failures.is_empty() {
            md.push_str("\n## Parts that failed in this run\n\n");
            for f in &failures {
                md.push_str(&format!("- {f}\n"));
            }
        }
        let root = crate::util::root();
        std::fs::write(root.join("BENCHMARKS.md"), &md)?;
        std::fs::write(root.join("benchmarks-throughput.svg"), &svg)?;
        println!("bench: BENCHMARKS.md and benchmarks-throughput.svg updated");
    }
    if !failures.is_empty() {
        bail!(
            "bench: {} part(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

fn comparisons() -> Vec<Comparison> {
    use cairn::{SYSTEM as C, SYSTEM_SQL as CS};
    use names::*;
    use peers::{DQLITE, HIQLITE_DEFAULT as HD, HIQLITE_IMMEDIATE as HI, MOSQUITTO as MQ};
    let row = |what, cairn, name, peer, better, target| Comparison {
        what,
        cairn: (cairn, name),
        peer: (peer, name),
        better,
        target,
    };
    let (hi, lo) = (Better::Higher, Better::Lower);
    vec![
        row(
            "device ingest throughput",
            C,
            TPUT_BEST,
            DQLITE,
            hi,
            Some(100.0),
        ),
        row("device ingest throughput", C, TPUT_BEST, HI, hi, Some(2.0)),
        row("device ingest throughput", C, TPUT_BEST, HD, hi, None),
        row("device ingest throughput", C, TPUT_BEST, MQ, hi, Some(1.0)),
        row("device ack latency p50", C, LAT_P50, DQLITE, lo, Some(1.0)),
        row("device ack latency p50", C, LAT_P50, HI, lo, None),
        row("device ack latency p50", C, LAT_P50, MQ, lo, None),
        row("device ack latency p99", C, LAT_P99, DQLITE, lo, None),
        row("device ack latency p99", C, LAT_P99, HI, lo, None),
        row("device ack latency p99", C, LAT_P99, MQ, lo, None),
        row("bytes per record", C, BYTES_PER_RECORD, MQ, lo, None),
        row("SQL write throughput", CS, TPUT_BEST, DQLITE, hi, None),
        row("SQL write throughput", CS, TPUT_BEST, HI, hi, None),
        row("SQL write throughput", CS, TPUT_BEST, HD, hi, None),
        row("SQL write latency p50", CS, LAT_P50, DQLITE, lo, None),
        row("SQL write latency p50", CS, LAT_P50, HI, lo, None),
        row("SQL write latency p50", CS, LAT_P50, HD, lo, None),
    ]
}

fn goals() -> Vec<Goal> {
    use cairn::{SYSTEM as C, SYSTEM_SQL as CS};
    use names::*;
    vec![
        Goal {
            what: "device ingest committed to the quorum (first milestone)",
            cairn: (C, TPUT_BEST),
            better: Better::Higher,
            target: 100_000.0,
        },
        Goal {
            what: "failover, devices",
            cairn: (C, FAILOVER),
            better: Better::Lower,
            target: 1000.0,
        },
        Goal {
            what: "failover, HTTP SQL clients",
            cairn: (CS, FAILOVER),
            better: Better::Lower,
            target: 1000.0,
        },
        Goal {
            what: "disk bytes per stored record per node, whole data directory (target at 6 M records)",
            cairn: (C, DISK_PER_RECORD),
            better: Better::AtMost,
            target: 64.0,
        },
        Goal {
            what: "record bytes in a batch body",
            cairn: (C, "record bytes in a full batch body"),
            better: Better::AtMost,
            target: 20.0,
        },
        Goal {
            what: "bytes on the wire per record, counted on 1,000 devices' sockets (frames, tags, Acks, Hellos)",
            cairn: (C, BYTES_ON_SOCKETS),
            better: Better::AtMost,
            target: 20.0,
        },
        Goal {
            what: "bytes per record, worst case: one Ack for every full batch (encoder)",
            cairn: (C, BYTES_PER_RECORD),
            better: Better::AtMost,
            target: 20.0,
        },
    ]
}

/// Cairn's throughput per device count, and the peers' per concurrency.
fn chart_series(results: &Results) -> Vec<Series> {
    let series_of = |system: &str, prefix: &str, suffix: &str| -> Vec<(f64, f64)> {
        let mut pts: Vec<(f64, f64)> = results
            .0
            .iter()
            .filter(|m| m.system == system)
            .filter_map(|m| {
                let rest = m.name.strip_prefix(prefix)?;
                let n: f64 = rest.split_whitespace().next()?.parse().ok()?;
                rest.contains(suffix).then_some((n, m.value))
            })
            .collect();
        // Several shapes at the same concurrency (rows vs transactions): keep the best.
        pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        pts.dedup_by(|later, first| later.0 == first.0);
        pts
    };
    vec![
        Series {
            name: "Cairn (devices)".into(),
            colour: "#1f77b4",
            points: series_of(cairn::SYSTEM, "throughput, ", "devices"),
        },
        Series {
            name: "Cairn HTTP SQL (writers)".into(),
            colour: "#9467bd",
            points: series_of(cairn::SYSTEM_SQL, "throughput, ", "writers"),
        },
        Series {
            name: "Mosquitto QoS 1 (publishers)".into(),
            colour: "#ff7f0e",
            points: series_of(peers::MOSQUITTO, "throughput, ", "publishers"),
        },
        Series {
            name: "hiqlite immediate (writers)".into(),
            colour: "#2ca02c",
            points: series_of(peers::HIQLITE_IMMEDIATE, "throughput, ", "writers"),
        },
        Series {
            name: "hiqlite default (writers)".into(),
            colour: "#98df8a",
            points: series_of(peers::HIQLITE_DEFAULT, "throughput, ", "writers"),
        },
        Series {
            name: "dqlite (workers)".into(),
            colour: "#d62728",
            points: series_of(peers::DQLITE, "throughput, ", "workers"),
        },
    ]
}

/// nproc, CPU model, kernel, memory and the filesystem the data directories live on.
fn machine() -> Result<String> {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(f64::NAN);
    let fs = crate::util::output(
        std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(crate::util::root().join("target")),
    )
    .map(|s| s.trim().to_string())
    .unwrap_or_else(|_| "?".into());
    // Other work on the machine skews every figure; say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    Ok(format!(
        "{nproc} CPUs ({cpu}), {mem_gib:.1} GiB RAM, Linux {kernel}, data on {fs}, \
         load average {load} when measuring began"
    ))
}

fn markdown(
    profile: &Profile,
    machine: &str,
    results: &Results,
    table: &str,
    measured_for: Duration,
) -> String {
    format!(
        "# Cairn benchmarks\n\n\
         Latest {kind} run of `cargo xtask bench{flag}` ({secs:.0} s of measuring).\n\n\
         **Machine:** {machine}. Every system ran on this machine in the same run, three nodes \
         each on loopback, one after the other.\n\n\
         ## Cairn against its peers\n\n{table}\n\
         Ratios are Cairn/peer: above 1 is better for throughput, below 1 for latency and \
         bytes.\n\n\
         ![throughput against device count](benchmarks-throughput.svg)\n\n\
         ## What each figure is\n\n{method}{export_method}\n\
         ## All measurements\n\n{all}\n\
         ## Reproduce\n\n\
         ```\ncargo xtask bench          # full run, rewrites this file (about 10 minutes)\n\
         cargo xtask bench --quick  # under three minutes, writes target/bench/ only\n\
         cargo xtask bench --only cairn,dqlite   # a subset\n```\n\n\
         Results land in `target/bench/results.json` (one object per measurement: name, \
         system, value, unit), `target/bench/report.md` and `target/bench/throughput.svg`. \
         The first run installs `go-dqlite` and `mosquitto` from Debian (apt-get, via sudo \
         when not root) and builds `peers/hiqlite-driver` (several minutes, not counted).\n",
        kind = if profile.quick { "quick" } else { "full" },
        flag = if profile.quick { " --quick" } else { "" },
        secs = measured_for.as_secs_f64(),
        all = report::all_table(results),
        method = METHOD,
        export_method = export::METHOD,
    )
}

const METHOD: &str = "\
- **Cairn** (devices): three release `cairn node` processes on loopback (ports chosen by the \
OS, read back from each node's `addrs.json`), stream 7 declared as a table of three reals. \
The devices are the test harness's protocol-level fleet (`tests/src/fleet.rs`: the real \
`cairn-protocol` session and batch encoder, one thread per device, connected to the leader's \
device port as the firmware client ends up after a Welcome leader hint) pushing three-`f32` \
records. Throughput counts records the devices got acknowledged, which the leader sends only \
after the batch is fsync'd on a quorum and applied; every device keeps its credit full. \
Latency is one record in flight, push to Ack. Bytes on the wire come from the protocol \
encoder (a sealed full Batch frame plus a sealed Ack for it, divided by the records: the worst \
case, since Acks are cumulative and the gateway sends one for all batches decided together; \
TCP/IP headers are left out for every system) and, separately, from the bytes the 1,000 \
devices actually wrote and read (every frame, tag, Ack and Hello). RSS is the leader's peak VmRSS during the 1,000-device run. \
Restart is the time from starting a SIGKILLed follower that holds 1,000,000 rows (loaded \
with one recursive-CTE INSERT through Raft) until it answers `/readyz` and a local count sees \
every row.\n\
- **Cairn HTTP SQL**: the same cluster taking parameterised INSERTs of the same row shape \
through the rqlite-compatible `/db/execute` over kept-alive connections to the leader: one \
writer for latency; 16 and 64 single-row writers and 4 and 16 writers of 100-row \
`?transaction` requests for throughput. Failover: four clients writing through a follower, \
time from `kill -9` of the leader to the first write sent after the kill and acknowledged.\n\
- **dqlite**: Debian's `dqlite-benchmark` (go-dqlite), 3 nodes on loopback, `kvwrite` \
workload with 16-byte keys and 24-byte values (a record's size), 1 and 8 workers; dqlite's \
Raft log is fsync'd before a commit is acknowledged.\n\
- **Mosquitto**: Debian's broker with `persistence true` (written at autosave, no fsync per \
message), loaded by xtask's own MQTT 3.1.1 QoS 1 publisher: a three-value record is a \
PUBLISH of 12 payload bytes (three f32) on topic `d/<n>`, acknowledged by PUBACK. Latency is \
one message in flight; throughput the best of 1x1000, 4x500 and 16x100 publishers x in-flight \
window.\n\
- **hiqlite** (crates.io 0.15): `peers/hiqlite-driver`, three processes on loopback, rows of \
the same shape as Cairn's stream tables, writes through node 1 (the leader, so the client \
skips the network: hiqlite's best case). `immediate` fsyncs the Raft log before acknowledging \
(the only setting durable per commit); `default` acknowledges on write and fsyncs every \
200 ms. Throughput is the best of 16 and 64 concurrent single-row writers and of 4 and 16 \
writers of 100-row transactions (one Raft entry each, like a Cairn batch).\n";
