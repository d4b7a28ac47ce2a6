//! `cargo xtask qemu` (no option): the firmware image with the Cairn client against a real
//! 3-node `cairn` cluster on loopback. The device is registered, the image boots under
//! qemu-system-arm and pushes through QEMU's user network (the host's 127.0.0.1 is
//! 10.0.2.2), the leader is killed with SIGKILL while the image is pushing, and afterwards
//! the HTTP API must show every record the device counted as acknowledged stored exactly
//! once, with the values the fake sensor produced. Prints
//! `qemu e2e: pushed=N acked=N stored=N duplicates=0`.

use crate::bench::cairn::Cluster;
use crate::bench::http;
use crate::bench::proc::scratch;
use crate::boards::QEMU;
use crate::qemu::{Image, ensure_defmt_print};
use anyhow::{Context, Result, bail, ensure};
use std::process::Command;
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../../boards/app/src/sensor.rs"]
mod sensor;

const DEVICE: u64 = 0xe2e;
/// 64 hex digits; the image is given the same key on its command line.
const KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const SAMPLES: u32 = 150;
const PERIOD_MS: u32 = 50;
/// Kill the leader once the device has this many records acknowledged.
const KILL_AT_ACKED: u64 = 40;

pub fn run() -> Result<()> {
    ensure_defmt_print()?;
    // `CAIRN_BIN` runs a `cairn` built elsewhere; by default the workspace's debug build
    // (the one `cargo test` already built).
    let cairn = match std::env::var_os("CAIRN_BIN") {
        Some(bin) => bin.into(),
        None => {
            crate::util::cargo(&["build", "--quiet", "-p", "cairn-gateway", "--bin", "cairn"])?;
            crate::util::root().join("target/debug/cairn")
        }
    };
    let elf = QEMU.build(&["client"], &[])?;

    let dir = scratch("qemu-e2e")?;
    let mut cluster = Cluster::start(&cairn, &dir)?;
    let leader = cluster.wait_leader(None, Duration::from_secs(30))?;
    let host = format!("http://{}", cluster.http_addr(leader));
    let added = Command::new(&cairn)
        .args(["device", "add", "--id", &DEVICE.to_string(), "--key", KEY])
        .args(["--host", &host])
        .status()?;
    ensure!(added.success(), "cairn device add failed: {added}");

    // The leader's device port first, so the image is connected to the node that dies.
    let mut ports = vec![cluster.device_addr(leader).port()];
    ports.extend(
        (1..=3)
            .filter(|&id| id != leader)
            .map(|id| cluster.device_addr(id).port()),
    );
    let gateways: Vec<String> = ports.iter().map(|p| format!("10.0.2.2:{p}")).collect();
    let cmdline = format!(
        "device-id={DEVICE} key={KEY} gateways={} samples={SAMPLES} period-ms={PERIOD_MS}",
        gateways.join(",")
    );

    let started = Instant::now();
    let mut image = Image::boot(&elf, &cmdline)?;
    let deadline = started + Duration::from_secs(300);
    let mut killed = None;
    let mut done = None;
    while let Some(line) = image.next_line(deadline) {
        if killed.is_none()
            && let Some(acked) = field(&line, "status samples=", "acked=")
            && acked >= KILL_AT_ACKED
        {
            let leader = cluster.wait_leader(None, Duration::from_secs(10))?;
            cluster.kill(leader);
            println!("qemu e2e: killed leader node {leader} (SIGKILL) at acked={acked}");
            killed = Some(leader);
        }
        if line.contains("cairn: done samples=") {
            done = Some(line);
        }
    }
    let status = image.wait(deadline)?;
    let secs = started.elapsed().as_secs_f64();
    ensure!(status.success(), "image failed after {secs:.1} s: {status}");
    let killed = killed.context("the image finished before the leader could be killed")?;
    let done = done.context("image never logged `cairn: done ...`")?;
    let pushed = field(&done, "done samples=", "pushed=").context("pushed= in done line")?;
    let acked = field(&done, "done samples=", "acked=").context("acked= in done line")?;

    let leader = cluster.wait_leader(Some(killed), Duration::from_secs(30))?;
    let rows = stored_rows(&cluster.http_addr(leader).to_string(), DEVICE)?;
    let stored = rows.len() as u64;
    let mut seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let duplicates = stored - seqs.len() as u64;
    println!(
        "qemu e2e: pushed={pushed} acked={acked} stored={stored} duplicates={duplicates} \
         (image ran {secs:.1} s)"
    );
    ensure!(duplicates == 0, "{duplicates} records stored twice");
    ensure!(
        acked == pushed,
        "the device ended with {} unacknowledged",
        pushed - acked
    );
    ensure!(
        seqs == (1..=acked).collect::<Vec<_>>(),
        "stored seqs are not exactly 1..={acked}"
    );
    check_values(&rows, SAMPLES)?;
    Ok(())
}

/// The number after `key` in a log line that contains `marker`.
fn field(line: &str, marker: &str, key: &str) -> Option<u64> {
    if !line.contains(marker) {
        return None;
    }
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

struct Row {
    seq: u64,
    stream: u64,
    values: Vec<serde_json::Value>,
}

/// Every row of the device in the generic `telemetry` table, read with `level=strong`
/// (through the Raft log, so nothing committed can be missing).
fn stored_rows(http_addr: &str, device: u64) -> Result<Vec<Row>> {
    let addr = http_addr.parse()?;
    let sql = format!(
        "SELECT seq, stream, \"values\" FROM telemetry WHERE device_id = {device} ORDER BY seq"
    );
    let r = http::post_json(
        addr,
        "/db/query?level=strong",
        &serde_json::json!([sql]),
        Duration::from_secs(30),
    )?;
    let v = r.json()?;
    let result = &v["results"][0];
    if r.status != 200 || result["error"].is_string() {
        bail!("query failed: {} {}", r.status, r.body);
    }
    let mut rows = Vec::new();
    for row in result["values"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let values: Vec<serde_json::Value> = match &row[2] {
            serde_json::Value::String(json) => serde_json::from_str(json)?,
            other => other.as_array().cloned().unwrap_or_default(),
        };
        rows.push(Row {
            seq: row[0].as_u64().context("seq")?,
            stream: row[1].as_u64().context("stream")?,
            values,
        });
    }
    Ok(rows)
}

/// The stored rows, in seq order, are exactly the records the sensor produced: sample n
/// gives an environment record and, every `POWER_EVERY` samples, a power record after it.
fn check_values(rows: &[Row], samples: u32) -> Result<()> {
    let mut expected = Vec::new();
    for n in 0..samples {
        let s = sensor::reading(DEVICE, n);
        let e = s.environment;
        expected.push((
            u64::from(sensor::STREAM_ENVIRONMENT),
            vec![
                f64::from(e.temperature_c),
                f64::from(e.humidity_pct),
                f64::from(e.pressure_hpa),
            ],
        ));
        if let Some(p) = s.power {
            expected.push((
                u64::from(sensor::STREAM_POWER),
                vec![p.battery_mv as f64, f64::from(u8::from(p.charging))],
            ));
        }
    }
    ensure!(
        rows.len() == expected.len(),
        "{} rows stored, the sensor produced {} records",
        rows.len(),
        expected.len()
    );
    for (row, (stream, values)) in rows.iter().zip(&expected) {
        let got: Vec<f64> = row
            .values
            .iter()
            .map(|v| {
                v.as_f64()
                    .or_else(|| v.as_bool().map(|b| f64::from(u8::from(b))))
            })
            .collect::<Option<_>>()
            .with_context(|| format!("seq {}: non-numeric values {:?}", row.seq, row.values))?;
        let close =
            got.len() == values.len() && got.iter().zip(values).all(|(a, b)| (a - b).abs() < 1e-3);
        ensure!(
            row.stream == *stream && close,
            "seq {}: stored stream {} {:?}, the sensor produced stream {stream} {values:?}",
            row.seq,
            row.stream,
            got
        );
    }
    Ok(())
}
