//! The QEMU firmware image as the harness runs it: the one way of booting the image
//! (`cargo xtask qemu` and the fault suite's real device both use [`Image`]), of provisioning
//! its flash file with `cairn device add --generate --provision-out`, of reading its defmt log
//! ([`field`]) and of recomputing what its fake sensor produced ([`records`]).
//!
//! The image is built by xtask (`boards/qemu-mps2-an386`, release); this module only runs a
//! given ELF: `qemu-system-arm` as /work/shared/HARDWARE-NOTES.md says, its semihosting stdout
//! decoded by `defmt-print -e ELF` (on PATH; `cargo xtask qemu` installs it). Inside QEMU's
//! user network the host's 127.0.0.1 is 10.0.2.2 ([`QEMU_HOST_IP`]); other addresses (the
//! fault suite's node namespaces) are reached as they are, through QEMU's own sockets.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::{Cluster, Node, cairn_bin};

#[allow(dead_code)]
#[path = "../../boards/app/src/sensor.rs"]
mod sensor;

/// The host's 127.0.0.1 as a guest on QEMU's user network sees it.
pub const QEMU_HOST_IP: &str = "10.0.2.2";

/// What one boot of the image did.
pub struct Boot {
    pub status: ExitStatus,
    /// The decoded defmt log, one entry per line.
    pub lines: Vec<String>,
}

/// Boots `elf` and waits for it to exit (killing it after `limit`), collecting its log.
pub fn boot(elf: &Path, cmdline: &str, limit: Duration) -> Result<Boot> {
    let deadline = Instant::now() + limit;
    let mut image = Image::boot(elf, cmdline)?;
    let mut lines = Vec::new();
    while let Some(line) = image.next_line(deadline) {
        lines.push(line);
    }
    let status = image.wait(deadline)?;
    Ok(Boot { status, lines })
}

/// A running image: qemu-system-arm as HARDWARE-NOTES.md says, with `cmdline` as the
/// semihosting command line, its defmt log decoded by defmt-print (echoed with a `qemu|`
/// prefix by [`Image::boot`]). Killed (SIGKILL: a power cut) when dropped.
pub struct Image {
    qemu: Child,
    decoder: Child,
    lines: mpsc::Receiver<String>,
}

impl Image {
    /// Boots `elf`, echoing its log.
    pub fn boot(elf: &Path, cmdline: &str) -> Result<Image> {
        Image::spawn(elf, cmdline, Some("  qemu|"))
    }

    /// Boots `elf`; each decoded line is printed after `echo` when given.
    pub fn spawn(elf: &Path, cmdline: &str, echo: Option<&str>) -> Result<Image> {
        let mut qemu = Command::new("qemu-system-arm")
            .args([
                "-M",
                "mps2-an386",
                "-nographic",
                "-monitor",
                "none",
                "-serial",
                "none",
            ])
            .args(["-semihosting-config", "enable=on,target=native"])
            .args([
                "-netdev",
                "user,id=n0",
                "-net",
                "nic,netdev=n0,model=lan9118",
            ])
            .arg("-kernel")
            .arg(elf)
            .args(["-append", cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start qemu-system-arm (cargo xtask setup installs it)")?;
        let log = qemu.stdout.take().expect("piped");
        let mut decoder = Command::new("defmt-print")
            .arg("-e")
            .arg(elf)
            .stdin(Stdio::from(log))
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start defmt-print (cargo install defmt-print --locked)")?;
        let decoded = decoder.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        let echo = echo.map(str::to_owned);
        thread::spawn(move || {
            for line in BufReader::new(decoded).lines().map_while(Result::ok) {
                if let Some(prefix) = &echo {
                    println!("{prefix} {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Image {
            qemu,
            decoder,
            lines,
        })
    }

    /// The next decoded log line; `None` once the log ends (the image exited) or at
    /// `deadline`.
    pub fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.checked_duration_since(Instant::now())?;
        self.lines.recv_timeout(left).ok()
    }

    /// The decoded log from now on, for a reader of its own (it ends when the image exits);
    /// [`Image::next_line`] then sees nothing.
    pub fn take_lines(&mut self) -> mpsc::Receiver<String> {
        std::mem::replace(&mut self.lines, mpsc::channel().1)
    }

    /// Waits for QEMU to exit and returns the image's exit status (semihosting exit code);
    /// kills it and fails at `deadline`.
    pub fn wait(&mut self, deadline: Instant) -> Result<ExitStatus> {
        let limit = deadline.saturating_duration_since(Instant::now());
        let status = wait_with_limit(&mut self.qemu, limit)?;
        // defmt-print ends when QEMU's stdout closes.
        self.decoder.wait()?;
        Ok(status)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.decoder.wait();
    }
}

fn wait_with_limit(child: &mut Child, limit: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            bail!("QEMU still running after {} s: killed", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The number after `key` in a log line that contains `marker`.
pub fn field(line: &str, marker: &str, key: &str) -> Option<u64> {
    if !line.contains(marker) {
        return None;
    }
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// `cairn device add --id DEVICE --generate --provision-out FLASH` (the harness's binary and
/// credentials): a key generated by the CLI, registered through the leader, and written into
/// a new flash file for the image (`flash=FLASH`) with every started node's device port as the
/// image reaches it (`guest_addr`), the leader's first. The key never appears on a command line.
pub fn provision(
    cluster: &Cluster,
    device: u64,
    flash: &Path,
    guest_addr: impl Fn(&Node) -> Result<String>,
) -> Result<()> {
    let leader = cluster.leader();
    let mut order = vec![leader];
    order
        .extend((0..cluster.nodes.len()).filter(|&i| i != leader && cluster.nodes[i].is_started()));
    let mut add = Command::new(cairn_bin());
    add.args(["device", "add", "--id", &device.to_string(), "--generate"])
        .arg("--provision-out")
        .arg(flash)
        .args(["--host", &cluster.nodes[leader].url("")]);
    crate::device::authenticate(&mut add, &cluster.auth());
    for &i in &order {
        add.args(["--gateway", &guest_addr(&cluster.nodes[i])?]);
    }
    let added = add.stdout(Stdio::null()).status()?;
    ensure!(added.success(), "cairn device add failed: {added}");
    Ok(())
}

/// The port of a node's device address (`host:port`).
pub fn device_port(node: &Node) -> Result<u16> {
    node.device
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .with_context(|| format!("node {} device address {:?}", node.id, node.device))
}

/// A node's device port as a guest on QEMU's user network reaches it: loopback through
/// [`QEMU_HOST_IP`], any other address (a node's namespace) as it is.
pub fn guest_device_addr(node: &Node) -> Result<String> {
    let (host, _) = node
        .device
        .rsplit_once(':')
        .with_context(|| format!("node {} device address {:?}", node.id, node.device))?;
    let host = if host == "127.0.0.1" || host == "localhost" {
        QEMU_HOST_IP
    } else {
        host
    };
    Ok(format!("{host}:{}", device_port(node)?))
}

/// One record as stored: its seq, stream and values.
#[derive(Debug, Clone)]
pub struct Row {
    pub seq: u64,
    pub stream: u64,
    pub values: Vec<serde_json::Value>,
}

/// The records `samples` samples of the sensor give, in push order: sample n gives an
/// environment record (stream 1: temperature, humidity, pressure) and, every `POWER_EVERY`
/// samples, a power record (stream 2: battery millivolts, charging) after it.
pub fn records(device: u64, samples: u32) -> Vec<(u64, Vec<f64>)> {
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

/// A row's values as numbers (a bool as 0 or 1), or why not.
pub fn numbers(row: &Row) -> Result<Vec<f64>> {
    row.values
        .iter()
        .map(|v| {
            v.as_f64()
                .or_else(|| v.as_bool().map(|b| f64::from(u8::from(b))))
        })
        .collect::<Option<_>>()
        .with_context(|| format!("seq {}: non-numeric values {:?}", row.seq, row.values))
}

/// Whether stored values are the sensor's (stored `f32`s read back within 1e-3).
pub fn same_values(got: &[f64], want: &[f64]) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-3)
}

/// Each stored row has the stream and values of the corresponding expected record.
pub fn check_values(rows: &[Row], expected: &[(u64, Vec<f64>)]) -> Result<()> {
    for (row, (stream, values)) in rows.iter().zip(expected) {
        let got = numbers(row)?;
        ensure!(
            row.stream == *stream && same_values(&got, values),
            "seq {}: stored stream {} {:?}, the sensor produced stream {stream} {values:?}",
            row.seq,
            row.stream,
            got
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_field_reads_the_number_after_its_key() {
        let line = "INFO cairn: status samples=20 pushed=24 acked=22 queued=2 retries=0";
        assert_eq!(field(line, "status samples=", "acked="), Some(22));
        assert_eq!(field(line, "status samples=", "queued="), Some(2));
        assert_eq!(field(line, "done samples=", "acked="), None);
        assert_eq!(field(line, "status", "missing="), None);
    }

    #[test]
    fn test_records_interleave_power_every_fifth_sample() {
        let r = records(7, 6);
        // Samples 0..6: environment each, power after samples 0 and 5.
        let streams: Vec<u64> = r.iter().map(|(s, _)| *s).collect();
        assert_eq!(streams, [1, 2, 1, 1, 1, 1, 1, 2]);
        assert_eq!(records(7, 6), r, "a pure function of device and sample");
        assert_ne!(records(8, 6), r);
    }
}
