//! `cargo xtask qemu` (no option): the firmware image with the Cairn client against a real
//! 3-node `cairn` cluster on loopback (the test harness's [`Cluster`]). The device is
//! registered, the image boots under qemu-system-arm and pushes through QEMU's user network (the host's 127.0.0.1 is
//! 10.0.2.2), the leader is killed with SIGKILL while the image is pushing, and afterwards
//! the HTTP API must show every record the device counted as acknowledged stored exactly
//! once, with the values the fake sensor produced. Prints
//! `qemu e2e: pushed=N acked=N stored=N duplicates=0`.
//!
//! Every image here is the release image (no `dev-settings`): its device id, key and gateways
//! come from the settings region of its flash file, written by `cairn device add --generate
//! --provision-out` (the key never appears on a command line). [`settings`] boots one image
//! as two devices with two settings files, and checks that a blank or corrupted region and
//! an identity on the command line are refused.

use crate::bench::proc::scratch;
use crate::boards::QEMU;
use crate::qemu::{Image, ensure_defmt_print};
use crate::util::step;
use anyhow::{Context, Result, bail, ensure};
use cairn_tests::qemu::{self, Row, check_values, device_port, field, records};
use cairn_tests::{Cluster, Node, Options};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DEVICE: u64 = 0xe2e;
const SAMPLES: u32 = 150;
const PERIOD_MS: u32 = 50;
/// Kill the leader once the device has this many records acknowledged.
const KILL_AT_ACKED: u64 = 40;
/// Cut the device's power once this many records wait unacknowledged.
const UNACKED_AT_CUT: u64 = 20;

/// The image's exit code for a blank or invalid settings region (boards/qemu-mps2-an386).
const EXIT_NOT_PROVISIONED: i32 = 9;
/// The image's exit code for a refused command-line setting.
const EXIT_BAD_SETTING: i32 = 6;

/// Every scenario: the leader killed, the device's power cut, one image as two devices.
pub fn run() -> Result<()> {
    leader_kill()?;
    power_cut()?;
    settings()
}

/// A fresh 3-node cluster of the debug `cairn` (or `CAIRN_BIN`; see [`cairn_bin`]), data
/// and logs kept in `target/bench/work/NAME`.
pub(crate) fn cluster(name: &str) -> Cluster {
    let dir = crate::util::root().join("target/bench/work").join(name);
    Cluster::start_with(
        3,
        Options {
            dir: Some(dir),
            ..Options::default()
        },
    )
}

/// [`qemu::provision`]: the gateways' device ports as QEMU's guest sees them (the leader's
/// first) in a new flash file for the image (`flash=FLASH`).
fn provision(cluster: &Cluster, device: u64, flash: &Path) -> Result<()> {
    qemu::provision(cluster, device, flash, qemu::guest_device_addr)
}

/// [`qemu::provision`] with the gateways' device ports at `ip` (127.0.0.1 for a host process).
pub(crate) fn provision_at(cluster: &Cluster, device: u64, flash: &Path, ip: &str) -> Result<()> {
    qemu::provision(cluster, device, flash, |n| {
        Ok(format!("{ip}:{}", device_port(n)?))
    })
}

/// A 3-node cluster with `device` provisioned into a fresh flash file; returns the file.
fn cluster_with_device(name: &str, device: u64) -> Result<(Cluster, PathBuf)> {
    let cluster = cluster(name);
    let flash = scratch(&format!("{name}-flash"))?.join(format!("device-{device}.bin"));
    provision(&cluster, device, &flash)?;
    Ok((cluster, flash))
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
    let (mut cluster, flash) = cluster_with_device("qemu-e2e", DEVICE)?;
    let cmdline = format!(
        "samples={SAMPLES} period-ms={PERIOD_MS} flash={}",
        flash.display()
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
        // The flash file holds the settings region and, after it, the outbox's log.
        let (mut cluster, flash) = cluster_with_device("qemu-power-cut", device)?;
        let cmdline = |samples: u32| {
            format!(
                "samples={samples} period-ms={PERIOD_MS} flash={}",
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
                let ids: Vec<u64> = followers.iter().map(|&i| cluster.nodes[i].id).collect();
                println!("qemu power cut: followers {ids:?} killed at acked={acked}");
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

/// One image, two devices: the same release ELF boots twice at once with two settings files
/// (two ids, two generated keys), and both stream into the cluster under their own ids, with
/// the values their own sensor produced. Then the refusals: a blank settings region (a flash
/// file that does not exist yet), a corrupted one (a flipped bit), and a release image given
/// an identity on its command line.
pub fn settings() -> Result<()> {
    step("qemu settings (one image, two provisioned devices)", || {
        ensure_defmt_print()?;
        let elf = QEMU.build(&["client"], &[])?;
        let cluster = cluster("qemu-settings");
        let dir = scratch("qemu-settings-flash")?;
        let devices = [DEVICE + 2, DEVICE + 3];
        let files: Vec<PathBuf> = devices
            .iter()
            .map(|d| dir.join(format!("device-{d}.bin")))
            .collect();
        for (&device, file) in devices.iter().zip(&files) {
            provision(&cluster, device, file)?;
        }
        let samples = 30;
        let boots: Vec<qemu::Boot> = std::thread::scope(|scope| {
            let handles: Vec<_> = files
                .iter()
                .map(|file| {
                    let elf = &elf;
                    let cmdline = format!(
                        "samples={samples} period-ms={PERIOD_MS} flash={}",
                        file.display()
                    );
                    scope.spawn(move || qemu::boot(elf, &cmdline, Duration::from_secs(240)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("boot thread"))
                .collect::<Result<_>>()
        })?;
        let leader = cluster.leader();
        for ((&device, boot), file) in devices.iter().zip(&boots).zip(&files) {
            ensure!(
                boot.status.success(),
                "device {device} ({}) failed: {}",
                file.display(),
                boot.status
            );
            ensure!(
                boot.lines
                    .iter()
                    .any(|l| l.contains(&format!("provisioned as device {device},"))),
                "device {device} never logged its provisioned identity"
            );
            let rows = stored_rows(&cluster.nodes[leader], device)?;
            let expected = records(device, samples);
            ensure!(
                rows.len() == expected.len(),
                "device {device}: {} rows stored, the sensor produced {}",
                rows.len(),
                expected.len()
            );
            let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
            ensure!(
                seqs == (1..=rows.len() as u64).collect::<Vec<_>>(),
                "device {device}: stored seqs are not exactly 1..={}",
                rows.len()
            );
            check_values(&rows, &expected)?;
        }
        println!(
            "qemu settings: one image as devices {devices:?}: {} and {} records stored",
            records(devices[0], samples).len(),
            records(devices[1], samples).len()
        );

        // Refusals. A flash file that does not exist is created erased: a blank region.
        let blank = dir.join("blank.bin");
        refused(
            &elf,
            &format!("flash={}", blank.display()),
            EXIT_NOT_PROVISIONED,
            "Blank; refusing to start",
        )?;
        let mut bytes = std::fs::read(&files[0])?;
        bytes[20] ^= 0x01;
        let corrupt = dir.join("corrupt.bin");
        std::fs::write(&corrupt, &bytes)?;
        refused(
            &elf,
            &format!("flash={}", corrupt.display()),
            EXIT_NOT_PROVISIONED,
            "BadCrc; refusing to start",
        )?;
        let cmdline = format!("device-id=1 flash={}", files[0].display());
        refused(
            &elf,
            &cmdline,
            EXIT_BAD_SETTING,
            "identity comes from the settings region",
        )?;
        println!("qemu settings: blank and corrupted regions and a command-line identity refused");
        Ok(())
    })
}

/// Boots `elf` expecting it to stop at once with exit code `code`, having logged `says`.
fn refused(elf: &Path, cmdline: &str, code: i32, says: &str) -> Result<()> {
    let boot = qemu::boot(elf, cmdline, Duration::from_secs(60))?;
    ensure!(
        boot.status.code() == Some(code),
        "`{cmdline}`: image exited with {}, expected code {code}",
        boot.status
    );
    ensure!(
        boot.lines.iter().any(|l| l.contains(says)),
        "`{cmdline}`: the log never says `{says}`"
    );
    ensure!(
        !boot
            .lines
            .iter()
            .any(|l| l.contains("waiting for an address")),
        "`{cmdline}`: the image started its network although refused"
    );
    Ok(())
}

/// Every row of the device in the generic `telemetry` table, read with `level=strong`
/// (through the Raft log, so nothing committed can be missing).
pub(crate) fn stored_rows(node: &Node, device: u64) -> Result<Vec<Row>> {
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
