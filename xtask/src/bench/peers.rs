//! The systems Cairn is compared with, run on the same machine in the same bench run:
//! dqlite (Debian's `dqlite-benchmark`), Mosquitto (QoS 1, persistence on) and hiqlite
//! (our driver in `peers/hiqlite-driver`, built outside the workspace).

use super::proc::{Guarded, free_port, percentile, scratch, wait_listening};
use super::report::{Measurement, Results};
use super::{Profile, mqtt, names};
use anyhow::{Context, Result, bail, ensure};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const DQLITE: &str = "dqlite";
pub const MOSQUITTO: &str = "Mosquitto";
pub const HIQLITE_IMMEDIATE: &str = "hiqlite immediate";
pub const HIQLITE_DEFAULT: &str = "hiqlite default";

/// (program, Debian package) pairs the peers need.
pub const PACKAGES: &[(&str, &str)] = &[
    ("dqlite-benchmark", "go-dqlite"),
    ("mosquitto", "mosquitto"),
];

/// Mosquitto lives in /usr/sbin, which is not always on a user's PATH.
fn mosquitto_bin() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("mosquitto")
}

pub fn ensure_installed() -> Result<()> {
    let missing_mosquitto = !mosquitto_bin().is_file();
    let mut want: Vec<(&str, &str)> = PACKAGES
        .iter()
        .copied()
        .filter(|(bin, _)| *bin != "mosquitto")
        .collect();
    if missing_mosquitto {
        // `ensure_packages` looks on PATH; a name that is never there forces the install.
        want.push(("mosquitto-not-installed", "mosquitto"));
    }
    crate::setup::ensure_packages(&want)
}

// ---------------------------------------------------------------------------------------------
// dqlite

/// dqlite's benchmark, kvwrite workload, 3 nodes on loopback, 1 and 8 workers. Keys and values
/// are sized like a Cairn record (16-byte key: device id + seq; 24-byte value: time, stream and
/// three values), not the tool's 32/1024-byte default.
pub fn dqlite(profile: &Profile, results: &mut Results) -> Result<()> {
    let mut best = 0.0f64;
    for workers in [1u32, 8] {
        let run = dqlite_run(workers, profile.dqlite_seconds)?;
        let tput = run.ok as f64 / profile.dqlite_seconds as f64;
        results.push(Measurement::new(
            &format!("throughput, {workers} workers"),
            DQLITE,
            tput,
            "records/s",
        ));
        best = best.max(tput);
        if workers == 1 {
            results.push(Measurement::new(names::LAT_P50, DQLITE, run.p50, "ms"));
            results.push(Measurement::new(names::LAT_P99, DQLITE, run.p99, "ms"));
        }
    }
    results.push(Measurement::new(
        names::TPUT_BEST,
        DQLITE,
        best,
        "records/s",
    ));
    Ok(())
}

struct DqliteRun {
    ok: u64,
    p50: f64,
    p99: f64,
}

fn dqlite_run(workers: u32, seconds: u32) -> Result<DqliteRun> {
    let dir = scratch(&format!("dqlite-{workers}"))?;
    let addrs: Vec<String> = (0..3)
        .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_>>()?;
    let node = |i: usize| {
        let mut c = Command::new("dqlite-benchmark");
        c.args(["--db", &addrs[i], "--dir"])
            .arg(dir.join(format!("n{}", i + 1)))
            .args(["--cluster-timeout", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    };
    let mut followers = Vec::new();
    for i in 1..3 {
        followers.push(Guarded::spawn(
            &format!("dqlite node {}", i + 1),
            node(i).args(["--join", &addrs[0]]).stderr(Stdio::null()),
        )?);
    }
    let mut driver = Guarded::spawn(
        "dqlite driver",
        node(0)
            .args(["--driver", "--cluster", &addrs.join(",")])
            .args(["--workload", "kvwrite", "--workers", &workers.to_string()])
            .args(["--duration", &seconds.to_string()])
            .args(["--key-size", "16", "--value-size", "24"]),
    )?;
    driver.wait_timeout(Duration::from_secs(u64::from(seconds) + 60))?;
    drop(followers);

    let results_dir = dir.join("n1").join(&addrs[0]).join("results");
    let mut ok = 0u64;
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(&results_dir)
        .with_context(|| format!("dqlite results in {}", results_dir.display()))?
    {
        let text = std::fs::read_to_string(entry?.path())?;
        let (n, lat) = parse_dqlite_results(&text)?;
        ok += n;
        latencies.extend(lat);
    }
    ensure!(ok > 0, "dqlite-benchmark recorded no successful writes");
    latencies.sort_by(f64::total_cmp);
    Ok(DqliteRun {
        ok,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    })
}

/// One worker's result file: `n <ok>`, `n_err <errors>`, summary lines, then
/// `<timestamp ns> <latency ms>` per successful write.
fn parse_dqlite_results(text: &str) -> Result<(u64, Vec<f64>)> {
    let mut n = None;
    let mut lat = Vec::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some("n"), Some(v), None) => n = Some(v.parse()?),
            (Some(ts), Some(ms), None) if ts.bytes().all(|b| b.is_ascii_digit()) => {
                lat.push(ms.parse()?)
            }
            _ => {}
        }
    }
    let n = n.context("dqlite result file without an `n` line")?;
    Ok((n, lat))
}

// ---------------------------------------------------------------------------------------------
// Mosquitto

/// Mosquitto with persistence on (its default autosave, no per-message fsync), loaded by our
/// QoS 1 publisher: per-message latency with one message in flight, and throughput with
/// pipelined publishers.
pub fn mosquitto(profile: &Profile, results: &mut Results) -> Result<()> {
    let dir = scratch("mosquitto")?;
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nlog_dest stderr\nlog_type error\n",
            dir.display()
        ),
    )?;
    let mut broker = Guarded::spawn(
        "mosquitto",
        Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null()),
    )?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_listening(addr, Duration::from_secs(10))?;

    // Latency: one message in flight.
    let mut conn = mqtt::Connection::open(addr, "cairn-bench-latency")?;
    let mut lat = Vec::with_capacity(profile.latency_samples);
    for i in 0..profile.latency_samples {
        let t = Instant::now();
        conn.publish_wait(
            "d/0",
            (i % 65535) as u16 + 1,
            &mqtt::record_payload(i as u64),
        )?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    conn.close();
    lat.sort_by(f64::total_cmp);
    results.push(Measurement::new(
        names::LAT_P50,
        MOSQUITTO,
        percentile(&lat, 0.5),
        "ms",
    ));
    results.push(Measurement::new(
        names::LAT_P99,
        MOSQUITTO,
        percentile(&lat, 0.99),
        "ms",
    ));

    // Throughput: a few shapes of pipelining, the best one counts.
    let mut best = 0.0f64;
    let mut bytes_per_record = f64::NAN;
    for (connections, window) in [(1usize, 1000u64), (4, 500), (16, 100)] {
        broker.check_alive()?;
        let t = mqtt::throughput(addr, connections, window, profile.peer_duration())?;
        ensure!(t.acked > 0, "Mosquitto acknowledged nothing");
        let tput = t.acked as f64 / t.elapsed.as_secs_f64();
        results.push(Measurement::new(
            &format!("throughput, {connections} publishers x {window} in flight"),
            MOSQUITTO,
            tput,
            "records/s",
        ));
        if tput > best {
            best = tput;
        }
        bytes_per_record = (t.bytes_out + t.bytes_in) as f64 / t.acked as f64;
    }
    results.push(Measurement::new(
        names::TPUT_BEST,
        MOSQUITTO,
        best,
        "records/s",
    ));
    results.push(Measurement::new(
        names::BYTES_PER_RECORD,
        MOSQUITTO,
        bytes_per_record,
        "bytes",
    ));
    broker.check_alive()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// hiqlite

fn hiqlite_target_dir() -> PathBuf {
    crate::util::root().join("target/peers/hiqlite")
}

/// Builds `peers/hiqlite-driver` (release, its own target dir, at low priority so the rest of
/// the machine stays responsive). A no-op when it is up to date.
pub fn build_hiqlite_driver() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "10"])
        .arg(cargo)
        .args(["build", "--release", "--quiet"])
        .current_dir(crate::util::root().join("peers/hiqlite-driver"));
    // The variables `cargo xtask` runs under (CARGO_PKG_*, CARGO_MANIFEST_*, ...) would make
    // this separate build look different from a plain `cargo build` and recompile it.
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && k.starts_with("CARGO_")
            && k != "CARGO_HOME"
        {
            cmd.env_remove(k);
        }
    }
    cmd.env("CARGO_TARGET_DIR", hiqlite_target_dir());
    crate::util::run(&mut cmd)?;
    Ok(hiqlite_target_dir().join("release/hiqlite-driver"))
}

/// hiqlite 3-node cluster, once durable per commit (`immediate`) and once with its default
/// (acknowledge on write, fsync every 200 ms).
pub fn hiqlite(profile: &Profile, results: &mut Results, driver: &Path) -> Result<()> {
    for (mode, system) in [
        ("immediate", HIQLITE_IMMEDIATE),
        ("interval", HIQLITE_DEFAULT),
    ] {
        let dir = scratch(&format!("hiqlite-{mode}"))?;
        let mut run = Guarded::spawn(
            &format!("hiqlite-driver ({mode})"),
            Command::new(driver)
                .args(["bench", "--log-sync", mode, "--dir"])
                .arg(&dir)
                .args(["--seconds", &format!("{}", profile.peer_seconds)])
                .args([
                    "--latency-writes",
                    &profile.latency_samples.min(1000).to_string(),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?;
        let child = run.child.take().expect("just spawned");
        let out = wait_output(child, Duration::from_secs(180))
            .with_context(|| format!("hiqlite-driver ({mode})"))?;
        for line in out.lines().filter(|l| l.starts_with('{')) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let name = v["name"].as_str().context("name")?;
            let name = match name {
                "write latency p50, 1 writer" => names::LAT_P50,
                "write latency p99, 1 writer" => names::LAT_P99,
                "best throughput" => names::TPUT_BEST,
                other => other,
            };
            results.push(Measurement::new(
                name,
                system,
                v["value"].as_f64().context("value")?,
                v["unit"].as_str().context("unit")?,
            ));
        }
        ensure!(
            results.get(system, names::TPUT_BEST).is_some(),
            "hiqlite-driver ({mode}) printed no throughput:\n{out}"
        );
    }
    Ok(())
}

/// Waits for a child with a deadline, returning stdout; stderr is shown on failure.
fn wait_output(child: std::process::Child, timeout: Duration) -> Result<String> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => {
            let out = out?;
            if !out.status.success() {
                bail!(
                    "exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(String::from_utf8(out.stdout)?)
        }
        Err(_) => {
            // Our own child, by pid; the waiting thread then reaps it.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            bail!("no result within {timeout:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_dqlite_results() {
        let text = "n 3\nn_err 1\navg [ms] 2.0\nmax [ms] 3.0\nmin [ms] 1.0\n\
                    measurements [timestamp in ns] [ms]\n\
                    1795632462450455445 1.5\n1795632462454969537 3.0\n1795632462460208206 1.5\n";
        let (n, lat) = parse_dqlite_results(text).unwrap();
        assert_eq!(n, 3);
        assert_eq!(lat, [1.5, 3.0, 1.5]);
        assert!(parse_dqlite_results("garbage\n").is_err());
    }
}
