//! Real devices in a fault schedule, streaming their fake sensor's records (stream 1
//! environment, stream 2 power) to the nodes' device ports while the schedule runs:
//! - the release QEMU image with the flash outbox (built by xtask, `cairn-faults --qemu-elf`),
//!   provisioned by `cairn device add --generate --provision-out` into its own flash file,
//!   run through [`crate::qemu`]; started from the fault runner's thread, QEMU lives in the
//!   hub network namespace with the other clients and reaches the nodes at their namespace
//!   addresses through its user network;
//! - the host board (`boards/host`, `cairn-faults --host-board BIN`: the board application on
//!   embassy-net over TAP, RAM outbox), on a TAP device on the hub's bridge next to the nodes
//!   (needs the private network), registered with `cairn device add --key`.
//!
//! A *device power cut* ([`RealDevice::power_cut`]) kills the device (SIGKILL) once records
//! wait unacknowledged, and the heal boots it again: the QEMU image on the same flash file,
//! whose outbox resumes; the host board afresh (its unacknowledged records die with its RAM).
//! At the end [`RealDevice::drain`] waits for a status line with nothing older than its own
//! sample queued and stops it.
//!
//! What a device counted comes from its log (QEMU's defmt log as `cargo xtask qemu` reads it,
//! the host board's stderr; the same lines): per boot the records restored from flash and the
//! last `status samples= pushed= acked= queued=` line. [`audit`] checks the stored rows
//! against that and against the sensor.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::Cluster;
use crate::qemu::{self, Image, Row, field, numbers, records, same_values};

/// The stream table config for the image's records: stream 1 → `climate` (three reals),
/// stream 2 → `power` (`battery_mv`, `charging`), as the sensor pushes them.
pub const STREAMS_CONFIG: &str = r#"
[[stream]]
id = 1
table = "climate"
columns = [{ name = "temperature", type = "real" }, { name = "humidity", type = "real" }, { name = "pressure", type = "real" }]

[[stream]]
id = 2
table = "power"
columns = [{ name = "battery_mv", type = "integer" }, { name = "charging", type = "bool" }]
"#;

/// The queries that read one device's records back as [`Row`]s (stream 1, then stream 2).
pub fn row_queries(device: u64) -> [(u64, String); 2] {
    [
        (
            1,
            format!(
                "SELECT seq, temperature, humidity, pressure FROM climate WHERE device_id = \
                 {device}"
            ),
        ),
        (
            2,
            format!("SELECT seq, battery_mv, charging FROM power WHERE device_id = {device}"),
        ),
    ]
}

/// A sample every this many ms: with the image's 4 KiB RAM outbox (about 200 records) that
/// rides out about half a minute without any gateway before the oldest records are dropped.
const PERIOD_MS: u32 = 200;
/// The image logs a status line every this many samples (boards/app/src/client.rs).
const STATUS_EVERY: u64 = 10;
/// A power cut waits for at least this many records queued (acknowledgements stalled by the
/// step's other faults) while the step holds, then settles for any queued record.
const BACKLOG: u64 = 3;

/// One `status` line of the image's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    pub samples: u64,
    pub pushed: u64,
    pub acked: u64,
    pub queued: u64,
}

impl Status {
    fn parse(line: &str) -> Option<Status> {
        let f = |k| field(line, "status samples=", k);
        Some(Status {
            samples: f("samples=")?,
            pushed: f("pushed=")?,
            acked: f("acked=")?,
            queued: f("queued=")?,
        })
    }
}

/// What one boot of the image logged.
#[derive(Debug, Clone, Default)]
pub struct BootLog {
    /// Records restored from flash at boot.
    pub restored: u64,
    /// The last status line, and how many there were.
    pub last: Option<Status>,
    pub statuses: u64,
    /// Sessions opened with a gateway.
    pub sessions: u64,
    /// The log ended (QEMU exited or was killed).
    pub ended: bool,
    /// The last lines, for a failure message.
    pub tail: Vec<String>,
}

impl BootLog {
    fn take(&mut self, line: String) {
        if line.contains("records restored from flash") {
            self.restored = field(&line, "records restored from flash", ", ").unwrap_or(0);
        } else if let Some(s) = Status::parse(&line) {
            self.last = Some(s);
            self.statuses += 1;
        } else if line.contains("cairn: connected to") {
            self.sessions += 1;
        }
        if self.tail.len() == 20 {
            self.tail.remove(0);
        }
        self.tail.push(line);
    }

    /// Records of this boot's own samples it counted as acknowledged, at least: its last
    /// `acked=` less the restored records (which a Welcome may count again).
    pub fn own_acked(&self) -> u64 {
        self.last
            .map_or(0, |s| s.acked.saturating_sub(self.restored))
    }
}

/// How a real device is started.
enum Launch {
    Qemu { elf: PathBuf, flash: PathBuf },
    Host { bin: PathBuf, args: Vec<String> },
}

/// A running device (an [`Image`] or a [`HostProcess`]); dropping it cuts its power
/// (SIGKILL).
type Running = Box<dyn Send>;

/// The host board's process, killed when dropped.
struct HostProcess(Child);

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host board's TAP device, on the hub's bridge (the fault runner's private network).
pub const HOST_TAP: &str = "cairnhb0";
/// The host board's address on the bridge: past every node's (`Net::ip_of`).
pub const HOST_ADDR: &str = "10.77.64.250/24";

/// One real device of a schedule.
pub struct RealDevice {
    pub id: u64,
    /// `QEMU` or `host board`, for the notes.
    pub kind: &'static str,
    launch: Launch,
    running: Option<Running>,
    boots: Arc<Mutex<Vec<BootLog>>>,
    echo: bool,
}

impl RealDevice {
    /// The QEMU image as device `id`: provisioned on `cluster` into a new flash file in `dir`,
    /// and booted.
    pub fn qemu(elf: &Path, dir: &Path, id: u64, cluster: &Cluster, echo: bool) -> Result<Self> {
        let flash = dir.join(format!("qemu-device-{id}.bin"));
        qemu::provision(cluster, id, &flash, qemu::guest_device_addr)?;
        let launch = Launch::Qemu {
            elf: elf.to_path_buf(),
            flash,
        };
        RealDevice::start(id, "QEMU", launch, echo)
    }

    /// The host board as device `id` on [`HOST_TAP`] (created on the hub's bridge `br0`; the
    /// calling thread must be in the hub namespace): registered on `cluster` with a key of
    /// its own (`cairn device add --key`), and started.
    pub fn host(bin: &Path, id: u64, cluster: &Cluster, echo: bool) -> Result<Self> {
        for args in [
            &["tuntap", "add", "dev", HOST_TAP, "mode", "tap"][..],
            &["link", "set", HOST_TAP, "master", "br0"],
            &["link", "set", HOST_TAP, "up"],
        ] {
            let s = Command::new("ip").args(args).status()?;
            ensure!(s.success(), "ip {args:?}: {s}");
        }
        let key = crate::device::hex(&crate::device::key_of(id));
        let leader = cluster.leader();
        let mut add = Command::new(crate::cairn_bin());
        add.args(["device", "add", "--id", &id.to_string(), "--key", &key])
            .args(["--host", &cluster.nodes[leader].url("")]);
        crate::device::authenticate(&mut add, &cluster.auth());
        let added = add.stdout(Stdio::null()).status()?;
        ensure!(added.success(), "cairn device add failed: {added}");
        let gateways: Vec<&str> = cluster
            .nodes
            .iter()
            .filter(|n| n.is_started())
            .map(|n| n.device.as_str())
            .collect();
        let args = vec![
            "--tap".into(),
            HOST_TAP.into(),
            "--address".into(),
            HOST_ADDR.into(),
            format!("device-id={id}"),
            format!("key={key}"),
            format!("gateways={}", gateways.join(",")),
            "samples=0".into(),
            format!("period-ms={PERIOD_MS}"),
        ];
        let launch = Launch::Host {
            bin: bin.to_path_buf(),
            args,
        };
        RealDevice::start(id, "host board", launch, echo)
    }

    fn start(id: u64, kind: &'static str, launch: Launch, echo: bool) -> Result<Self> {
        let mut d = RealDevice {
            id,
            kind,
            launch,
            running: None,
            boots: Arc::default(),
            echo,
        };
        d.boot()?;
        Ok(d)
    }

    /// Boots the device (again), sampling until stopped: the QEMU image on its flash file.
    pub fn boot(&mut self) -> Result<()> {
        let prefix = format!("    {} {}|", self.kind, self.id);
        let echo = self.echo.then_some(prefix.as_str());
        let (running, lines) = match &self.launch {
            Launch::Qemu { elf, flash } => {
                let cmdline = format!("samples=0 period-ms={PERIOD_MS} flash={}", flash.display());
                let mut image = Image::spawn(elf, &cmdline, echo)?;
                let lines = image.take_lines();
                (Box::new(image) as Running, lines)
            }
            Launch::Host { bin, args } => {
                let mut child = Command::new(bin)
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .with_context(|| format!("starting {}", bin.display()))?;
                let log = child.stderr.take().expect("piped");
                let (tx, lines) = mpsc::channel();
                let echo = echo.map(str::to_owned);
                std::thread::spawn(move || {
                    for line in BufReader::new(log).lines().map_while(Result::ok) {
                        if let Some(prefix) = &echo {
                            println!("{prefix} {line}");
                        }
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                });
                (Box::new(HostProcess(child)) as Running, lines)
            }
        };
        let boots = self.boots.clone();
        let index = {
            let mut b = boots.lock().expect("boots");
            b.push(BootLog::default());
            b.len() - 1
        };
        std::thread::spawn(move || {
            for line in lines {
                boots.lock().expect("boots")[index].take(line);
            }
            boots.lock().expect("boots")[index].ended = true;
        });
        self.running = Some(running);
        Ok(())
    }

    /// Every boot's log so far.
    pub fn boots(&self) -> Vec<BootLog> {
        self.boots.lock().expect("boots").clone()
    }

    fn current(&self) -> BootLog {
        self.boots
            .lock()
            .expect("boots")
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits up to `limit` for a status line after the `seen`th of this boot that `ok`
    /// accepts; returns it.
    fn wait_status(
        &self,
        seen: u64,
        limit: Duration,
        ok: impl Fn(&Status) -> bool,
    ) -> Option<Status> {
        let deadline = Instant::now() + limit;
        let mut seen = seen;
        while Instant::now() < deadline {
            let b = self.current();
            if b.statuses > seen {
                seen = b.statuses;
                if let Some(s) = b.last.filter(|s| ok(s)) {
                    return Some(s);
                }
            }
            if b.ended {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The power goes out on the device: once a status line shows [`BACKLOG`] records queued
    /// (within `hold`), or else any queued record (a few status lines more), the device is
    /// killed with SIGKILL. Returns what the log said last, for the schedule's notes.
    pub fn power_cut(&mut self, hold: Duration) -> String {
        let seen = self.current().statuses;
        let period = Duration::from_millis(u64::from(PERIOD_MS) * STATUS_EVERY);
        let waiting = self
            .wait_status(seen, hold.max(period), |s| s.queued >= BACKLOG)
            .or_else(|| self.wait_status(seen, period * 3, |s| s.queued > 0));
        self.running = None;
        let b = self.current();
        let last = b.last.map_or("no status line yet".into(), |s| {
            format!(
                "samples={} pushed={} acked={} queued={}",
                s.samples, s.pushed, s.acked, s.queued
            )
        });
        format!(
            "power cut on {} device {} (boot {}, {last}{})",
            self.kind,
            self.id,
            self.boots.lock().expect("boots").len(),
            if waiting.is_some() {
                ""
            } else {
                "; no record was seen waiting"
            }
        )
    }

    /// Waits up to `limit` for a status line with at most the sample's own record queued
    /// (the line comes right after the push of a sample that has no power record: everything
    /// pushed before it acknowledged), then stops the image. Returns the time it took, or
    /// what the log said.
    pub fn drain(&mut self, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let seen = self.current().statuses;
        let drained = self.wait_status(seen, limit, |s| s.queued <= 1);
        self.running = None;
        match drained {
            Some(_) => Ok(start.elapsed()),
            None => Err(format!(
                "{} device {}: still records queued {} s after the heal; its log ends:\n  {}",
                self.kind,
                self.id,
                limit.as_secs(),
                self.current().tail.join("\n  ")
            )),
        }
    }
}

/// What [`audit`] found for one device on one replica.
#[derive(Debug, Default)]
pub struct Audit {
    /// Records of its own samples the device counted as acknowledged (at least).
    pub acked: u64,
    pub stored: usize,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    /// Rows the sensor never produced.
    pub phantom: Vec<String>,
}

/// Checks one replica's rows of `device` against its boots' logs and its sensor:
/// - seqs run 1, 2, 3, ... without a gap (a gap is an acknowledged record lost: the device
///   resends everything above the gateway's high water under the same seqs), no seq twice;
/// - every row is a record the sensor produced: an environment row is a sample's (found by
///   its values), a power row is the one that follows its sample's environment record;
/// - in seq order the sample numbers rise within one boot and start again at the next boot
///   (each boot samples from 0): more runs of rising samples than boots means a record stored
///   again under a new seq (`duplicated`);
/// - at least as many rows as records the boots counted as acknowledged
///   ([`BootLog::own_acked`]); fewer is `lost`.
pub fn audit(device: u64, boots: &[BootLog], rows: &[Row]) -> Audit {
    let mut rows = rows.to_vec();
    rows.sort_by_key(|r| r.seq);
    let mut a = Audit {
        acked: boots.iter().map(BootLog::own_acked).sum(),
        stored: rows.len(),
        ..Audit::default()
    };
    let mut next = 1;
    for r in &rows {
        if r.seq < next {
            a.duplicated
                .push(format!("device {device} seq {} twice", r.seq));
        } else if r.seq > next {
            a.lost
                .push(format!("device {device} seqs {next}..{}", r.seq - 1));
        }
        next = next.max(r.seq + 1);
    }
    let deficit = a.acked.saturating_sub(rows.len() as u64);
    if deficit > 0 {
        a.lost.push(format!(
            "device {device}: {} rows stored, its boots counted {} acknowledged",
            rows.len(),
            a.acked
        ));
    }

    // The sensor's records up to a bound past every boot's last status line.
    let samples = boots
        .iter()
        .filter_map(|b| b.last.map(|s| s.samples))
        .max()
        .unwrap_or(0)
        + 4 * STATUS_EVERY;
    let expected = records(device, samples as u32);
    let key = |v: &[f64]| -> Vec<i64> { v.iter().map(|x| (x * 100.0).round() as i64).collect() };
    let mut by_values: HashMap<Vec<i64>, usize> = HashMap::new();
    for (i, (stream, values)) in expected.iter().enumerate() {
        if *stream == 1 {
            by_values.entry(key(values)).or_insert(i);
        }
    }
    let mut prev: Option<usize> = None;
    let mut runs = 0usize;
    for r in &rows {
        let got = numbers(r).unwrap_or_default();
        let index = match r.stream {
            1 => by_values.get(&key(&got)).copied(),
            _ => prev.map(|p| p + 1).filter(|&i| {
                expected
                    .get(i)
                    .is_some_and(|(s, v)| *s == r.stream && same_values(&got, v))
            }),
        };
        match index {
            None => a.phantom.push(format!(
                "device {device} seq {}: stream {} {got:?} is no record of its sensor",
                r.seq, r.stream
            )),
            Some(i) => {
                if prev.is_none_or(|p| i <= p) {
                    runs += 1;
                }
                prev = Some(i);
            }
        }
    }
    if runs > boots.len() {
        a.duplicated.push(format!(
            "device {device}: {runs} runs of rising samples in seq order for {} boots (a record \
             stored again under a new seq)",
            boots.len()
        ));
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const D: u64 = 0xfa17;

    /// Rows for `(seq, record index)` pairs of the sensor's records.
    fn rows(pairs: &[(u64, usize)]) -> Vec<Row> {
        let expected = records(D, 100);
        pairs
            .iter()
            .map(|&(seq, i)| Row {
                seq,
                stream: expected[i].0,
                values: expected[i].1.iter().map(|v| json!(v)).collect(),
            })
            .collect()
    }

    fn boot(restored: u64, acked: u64) -> BootLog {
        BootLog {
            restored,
            last: Some(Status {
                samples: 20,
                pushed: 24,
                acked,
                queued: 0,
            }),
            statuses: 2,
            ..BootLog::default()
        }
    }

    #[test]
    fn test_status_and_restored_lines_are_read() {
        let mut b = BootLog::default();
        b.take("INFO  cairn: boot 2, 7 records restored from flash".into());
        b.take("INFO  cairn: status samples=30 pushed=36 acked=40 queued=3 retries=1".into());
        assert_eq!(b.restored, 7);
        assert_eq!(
            b.last,
            Some(Status {
                samples: 30,
                pushed: 36,
                acked: 40,
                queued: 3
            })
        );
        assert_eq!(b.own_acked(), 33);
    }

    #[test]
    fn test_audit_passes_two_boots_each_from_sample_zero() {
        // Boot 1 stored records 0..10 (seqs 1..10), boot 2 records 0..6 (seqs 11..16).
        let pairs: Vec<(u64, usize)> = (0..10)
            .map(|i| (i as u64 + 1, i))
            .chain((0..6).map(|i| (i as u64 + 11, i)))
            .collect();
        let a = audit(D, &[boot(0, 8), boot(2, 8)], &rows(&pairs));
        assert!(
            a.lost.is_empty() && a.duplicated.is_empty() && a.phantom.is_empty(),
            "{a:?}"
        );
        assert_eq!((a.acked, a.stored), (14, 16));
    }

    #[test]
    fn test_audit_finds_gaps_resends_strangers_and_missing_acks() {
        let boots = [boot(0, 8), boot(0, 5)];
        // Seq 4 missing: lost.
        let a = audit(D, &boots, &rows(&[(1, 0), (2, 1), (3, 2), (5, 3), (6, 0)]));
        assert_eq!(a.lost[0], format!("device {D} seqs 4..4"));
        // Record 2 stored again under seq 4: three runs for two boots.
        let pairs = [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (6, 0), (7, 1)];
        let a = audit(D, &boots, &rows(&pairs));
        assert_eq!(a.duplicated.len(), 1, "{a:?}");
        // A power row that does not follow its sample's environment row.
        let mut r = rows(&[(1, 0), (2, 2)]);
        r[1].stream = 2;
        let a = audit(D, &[boot(0, 2)], &r);
        assert_eq!(a.phantom.len(), 1, "{a:?}");
        // Fewer rows than the device counted acknowledged.
        let a = audit(D, &[boot(0, 5)], &rows(&[(1, 0), (2, 1)]));
        assert_eq!(a.lost.len(), 1, "{a:?}");
    }
}
