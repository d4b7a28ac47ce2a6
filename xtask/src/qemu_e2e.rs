//! `cargo xtask qemu` (no option): the firmware image with the Cairn client against a real
//! 3-node `cairn` cluster on loopback (the test harness's [`Cluster`]). The device is
//! registered, the image boots under qemu-system-arm and pushes through QEMU's user network (the host's 127.0.0.1 is
//! 10.0.2.2), the leader is killed with SIGKILL while the image is pushing, and afterwards
//! the HTTP API must show every record the device counted as acknowledged stored exactly
//! once, with the values the fake sensor produced. Prints
//! `qemu e2e: pushed=N acked=N stored=N duplicates=0`.

use crate::bench::proc::scratch;
use crate::boards::QEMU;
use crate::qemu::{Image, ensure_defmt_print};
use crate::util::step;
use anyhow::{Context, Result, bail, ensure};
use cairn_tests::{Cluster, Node, Options, cairn_bin};
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
/// Cut the device's power once this many records wait unacknowledged.
const UNACKED_AT_CUT: u64 = 20;

/// Both scenarios: the leader killed, then the device's power cut.
pub fn run() -> Result<()> {
    leader_kill()?;
    power_cut()
}

/// A fresh 3-node cluster of the debug `cairn` (or `CAIRN_BIN`; see [`cairn_bin`]), data
/// and logs kept in `target/bench/work/NAME`, with `device` registered, and the image's
/// `gateways=` setting: every node's device port as QEMU's guest sees it, the leader's first.
fn cluster_with_device(name: &str, device: u64) -> Result<(Cluster, String)> {
    let dir = crate::util::root().join("target/bench/work").join(name);
    let cluster = Cluster::start_with(
        3,
        Options {
            dir: Some(dir),
            ..Options::default()
        },
    );
    let leader = cluster.leader();
    let added = Command::new(cairn_bin())
        .args(["device", "add", "--id", &device.to_string(), "--key", KEY])
        .args(["--host", &cluster.nodes[leader].url("")])
        .status()?;
    ensure!(added.success(), "cairn device add failed: {added}");
    let mut order = vec![leader];
    order.extend((0..cluster.nodes.len()).filter(|&i| i != leader));
    let gateways = order
        .iter()
        .map(|&i| Ok(format!("10.0.2.2:{}", device_port(&cluster.nodes[i])?)))
        .collect::<Result<Vec<String>>>()?;
    Ok((cluster, format!("gateways={}", gateways.join(","))))
}

/// The port of a node's device address (`host:port`).
fn device_port(node: &Node) -> Result<u16> {
    node.device
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .with_context(|| format!("node {} device address {:?}", node.id, node.device))
}

/// The leader is SIGKILLed while the image (RAM outbox) pushes.
pub fn leader_kill() -> Result<()> {
    step(
        "qemu e2e (3-node cluster, leader killed)",
        leader_kill_inner,
    )
}

fn leader_kill_inner() -> Result<()> {
    ensure_defmt_print()?;
    let elf = QEMU.build(&["client"], &[])?;
    let (mut cluster, gateways) = cluster_with_device("qemu-e2e", DEVICE)?;
    let cmdline =
        format!("device-id={DEVICE} key={KEY} {gateways} samples={SAMPLES} period-ms={PERIOD_MS}");

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
            let leader = cluster.leader();
            let id = cluster.nodes[leader].id;
            cluster.kill9(leader);
            println!("qemu e2e: killed leader node {id} (SIGKILL) at acked={acked}");
            killed = Some(id);
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

    let leader = cluster.wait_for_new_leader(killed);
    let rows = stored_rows(&cluster.nodes[leader], DEVICE)?;
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
    let expected = records(DEVICE, SAMPLES);
    ensure!(
        rows.len() == expected.len(),
        "{} rows stored, the sensor produced {} records",
        rows.len(),
        expected.len()
    );
    check_values(&rows, &expected)?;
    Ok(())
}

/// The device (flash outbox) is powered off mid-push: QEMU is SIGKILLed, then the image
/// boots again on the same flash file. Records acknowledged before the cut must be stored
/// once; records only in flash must be resent and stored once; the rest of boot 1's records
/// may be lost (never acknowledged), and boot 2's must all arrive.
pub fn power_cut() -> Result<()> {
    step("qemu power cut (flash outbox)", || {
        ensure_defmt_print()?;
        let elf = QEMU.build(&["client", "flash-outbox"], &[])?;
        let device = DEVICE + 1;
        let (mut cluster, gateways) = cluster_with_device("qemu-power-cut", device)?;
        let flash = scratch("qemu-power-cut-flash")?.join("flash.bin");
        let cmdline = |samples: u32| {
            format!(
                "device-id={device} key={KEY} {gateways} samples={samples} \
                 period-ms={PERIOD_MS} flash={}",
                flash.display()
            )
        };

        // Boot 1: once records are being acknowledged, take the quorum away (both followers
        // SIGKILLed) so records pile up unacknowledged in the outbox and its flash mirror,
        // then cut the power.
        let started = Instant::now();
        let mut image = Image::boot(&elf, &cmdline(10_000))?;
        let deadline = started + Duration::from_secs(120);
        let mut followers = Vec::new();
        let mut cut_at = None;
        // The gateway the image is in session with: the firmware mirrors records to flash
        // only while a session is up (it writes each record before sending it), so the
        // quorum is taken away only while that gateway is the leader, keeping the session.
        let mut session_port = None;
        while let Some(line) = image.next_line(deadline) {
            if line.contains("cairn: connected to") {
                session_port = field(&line, "cairn: connected to", "port: ");
            } else if line.contains("ended:") {
                session_port = None;
            }
            let (Some(acked), Some(pushed)) = (
                field(&line, "status samples=", "acked="),
                field(&line, "status samples=", "pushed="),
            ) else {
                continue;
            };
            if followers.is_empty() && acked >= KILL_AT_ACKED {
                let leader = cluster.leader();
                if session_port != Some(u64::from(device_port(&cluster.nodes[leader])?)) {
                    continue;
                }
                followers = (0..cluster.nodes.len()).filter(|&i| i != leader).collect();
                for &i in &followers {
                    cluster.kill9(i);
                }
                println!("qemu power cut: followers {followers:?} killed at acked={acked}");
            } else if !followers.is_empty() && pushed - acked >= UNACKED_AT_CUT {
                drop(image);
                println!("qemu power cut: QEMU killed at pushed={pushed} acked={acked}");
                cut_at = Some((pushed, acked));
                break;
            }
        }
        let (pushed_1, acked_1) = cut_at.context("boot 1 never reached the cut point")?;
        for &i in &followers {
            cluster.relaunch(i);
        }
        cluster.leader();

        // Boot 2 on the same flash: restores, resends, then runs its own samples.
        let boot_2_samples = 60;
        let mut image = Image::boot(&elf, &cmdline(boot_2_samples))?;
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut restored = None;
        let mut done = None;
        while let Some(line) = image.next_line(deadline) {
            if line.contains("records restored from flash") {
                restored = field(&line, "restored", ", ");
            }
            if line.contains("cairn: done samples=") {
                done = Some(line);
            }
        }
        let status = image.wait(deadline)?;
        ensure!(status.success(), "boot 2 failed: {status}");
        let done = done.context("boot 2 never logged `cairn: done ...`")?;
        let acked_2 = field(&done, "done samples=", "acked=").context("acked=")?;
        let pushed_2 = field(&done, "done samples=", "pushed=").context("pushed=")?;
        ensure!(
            acked_2 >= pushed_2,
            "boot 2 ended with records unacknowledged"
        );

        let leader = cluster.leader();
        let rows = stored_rows(&cluster.nodes[leader], device)?;
        let stored = rows.len() as u64;
        let mut seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        let duplicates = stored - seqs.len() as u64;
        ensure!(duplicates == 0, "{duplicates} records stored twice");
        ensure!(
            seqs == (1..=stored).collect::<Vec<_>>(),
            "stored seqs are not exactly 1..={stored}"
        );
        // Stored = a prefix of boot 1's records (at least every acknowledged one), then all
        // of boot 2's.
        let boot_2 = records(device, boot_2_samples);
        ensure!(
            rows.len() >= boot_2.len(),
            "{} rows stored, boot 2 alone pushed {}",
            rows.len(),
            boot_2.len()
        );
        let from_boot_1 = rows.len() - boot_2.len();
        // More than were acknowledged at the cut: the flash outbox carried the rest over.
        ensure!(
            from_boot_1 as u64 > acked_1 && from_boot_1 as u64 <= pushed_1,
            "{from_boot_1} records of boot 1 stored; it had {acked_1} acknowledged of {pushed_1}"
        );
        check_values(&rows[..from_boot_1], &records(device, pushed_1 as u32))?;
        check_values(&rows[from_boot_1..], &boot_2)?;
        println!(
            "qemu power cut: boot 1 pushed={pushed_1} acked={acked_1}; boot 2 restored={} \
             acked={acked_2}; stored={stored} (boot 1: {from_boot_1}) duplicates=0",
            restored.map_or("?".into(), |r| r.to_string())
        );
        Ok(())
    })
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
fn stored_rows(node: &Node, device: u64) -> Result<Vec<Row>> {
    let sql = format!(
        "SELECT seq, stream, \"values\" FROM telemetry WHERE device_id = {device} ORDER BY seq"
    );
    let r = node.query(&sql, "strong");
    if !r.succeeded() {
        bail!("query failed: {} {}", r.status, r.body);
    }
    let result = &r.body["results"][0];
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

/// The records `samples` samples of the sensor give, in push order: sample n gives an
/// environment record and, every `POWER_EVERY` samples, a power record after it.
fn records(device: u64, samples: u32) -> Vec<(u64, Vec<f64>)> {
    let mut expected = Vec::new();
    for n in 0..samples {
        let s = sensor::reading(device, n);
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
    expected
}

/// Each stored row has the stream and values of the corresponding expected record.
fn check_values(rows: &[Row], expected: &[(u64, Vec<f64>)]) -> Result<()> {
    for (row, (stream, values)) in rows.iter().zip(expected) {
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
