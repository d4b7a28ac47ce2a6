//! A device fleet speaking Cairn's device protocol with the real encoder (`cairn-protocol`'s
//! `DeviceSession` and `BatchEncoder`), one OS thread per device, to load a gateway (the
//! bench's device load; devices are registered with [`crate::device::register`]).
//!
//! It follows SPEC §8 as a device does (Hello, Welcome high-water, consecutive seqs, at most
//! `credit` records past the last Ack) but keeps no outbox: records are generated on demand,
//! so the figures measure the cluster, not a device's storage. Two modes: `Saturate` keeps
//! every device's credit full (throughput), `OneInFlight` sends one record and waits for its
//! Ack before the next (latency).

use crate::device::{climate_values, key_of, read_frame};
use anyhow::{Context, Result, anyhow, bail};
use cairn_protocol::{BatchEncoder, DeviceSession, MAX_FRAME, Message, Pong, Record, Value};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The stream the fleet writes; the bench declares it as a three-`real` table.
pub const STREAM: u16 = 7;

/// The config of [`STREAM`] as a table `climate` of three reals (what the fleet sends).
pub fn stream_toml() -> String {
    format!(
        "[[stream]]\nid = {STREAM}\ntable = \"climate\"\ncolumns = [\
         {{ name = \"temperature\", type = \"real\" }}, \
         {{ name = \"humidity\", type = \"real\" }}, \
         {{ name = \"pressure\", type = \"real\" }}]\n"
    )
}

/// Records one device puts in a batch at most (a full 1 KiB frame holds about 49).
const MAX_BATCH: u16 = 64;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Saturate,
    OneInFlight,
}

/// What a fleet run measured, summed over devices.
#[derive(Debug, Default)]
pub struct Report {
    /// Records acknowledged before the run's end.
    pub acked: u64,
    pub elapsed: Duration,
    /// TCP payload bytes written and read by the devices (Hello/Welcome included).
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Push-to-Ack latencies in ms (`OneInFlight` only), ascending.
    pub latencies_ms: Vec<f64>,
    /// Connections dropped and made again, and the first reason.
    pub reconnects: u64,
    pub first_reconnect_reason: Option<String>,
}

/// Records the first Ack any device receives, after a moment (the leader's kill), on a
/// connection opened after that moment (Acks still buffered from the old leader don't count).
#[derive(Default)]
pub struct AckProbe {
    origin: std::sync::OnceLock<Instant>,
    /// Nanoseconds after `origin` of the first Ack after `arm`, 0 while none.
    first_after_ns: std::sync::atomic::AtomicU64,
}

impl AckProbe {
    /// From now on, the next Ack that advances a device counts.
    pub fn arm(&self) {
        self.origin.get_or_init(Instant::now);
    }

    fn saw_ack(&self, connected_at: Instant) {
        if let Some(origin) = self.origin.get()
            && connected_at >= *origin
        {
            let ns = origin.elapsed().as_nanos().max(1) as u64;
            let _ =
                self.first_after_ns
                    .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Time from `arm` to the first advancing Ack after it, if one came.
    pub fn first_ack_after_arm(&self) -> Option<Duration> {
        match self.first_after_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

/// How a fleet runs.
pub struct Plan<'a> {
    /// Device ports; devices start on the first and move on (round-robin) after an error.
    pub gateways: Vec<SocketAddr>,
    pub ids: Range<u64>,
    pub mode: Mode,
    pub duration: Duration,
    pub probe: Option<&'a AckProbe>,
}

/// Fleets run by this process so far: each run's devices say a new boot number in their
/// Hello, so a device of a second run is not taken for a replay of the first's Hellos.
static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The values of record `seq` of device `id`.
pub type Values = fn(id: u64, seq: u64) -> [Value<'static>; 3];

/// Runs the fleet for `plan.duration`, one thread per device, pushing [`climate_values`].
pub fn run(plan: &Plan<'_>) -> Result<Report> {
    run_with_values(plan, |_, seq| climate_values(seq))
}

/// [`run`] with records of other values (the bench's disk figures for random `f32`s).
pub fn run_with_values(plan: &Plan<'_>, values: Values) -> Result<Report> {
    let boot = RUNS.fetch_add(1, Ordering::Relaxed) + 1;
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let mut report = Report::default();
    std::thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::new();
        for id in plan.ids.clone() {
            let stop = &stop;
            handles.push(
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || device(plan, values, id, boot, stop, start))?,
            );
        }
        std::thread::sleep(plan.duration);
        stop.store(true, Ordering::Relaxed);
        report.elapsed = start.elapsed();
        let mut first_error = None;
        for h in handles {
            match h.join().map_err(|_| anyhow!("device thread panicked"))? {
                Ok(d) => {
                    report.reconnects += d.reconnects;
                    if report.first_reconnect_reason.is_none() {
                        report.first_reconnect_reason = d.first_reconnect_reason;
                    }
                    report.acked += d.acked;
                    report.bytes_out += d.bytes_out;
                    report.bytes_in += d.bytes_in;
                    report.latencies_ms.extend(d.latencies_ms);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })?;
    report.latencies_ms.sort_by(f64::total_cmp);
    Ok(report)
}

#[derive(Default)]
struct DeviceStats {
    reconnects: u64,
    first_reconnect_reason: Option<String>,
    acked: u64,
    bytes_out: u64,
    bytes_in: u64,
    latencies_ms: Vec<f64>,
}

/// A stream reader that counts bytes.
struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// One device: connects, and after any error reconnects to the next gateway (or the leader
/// a Welcome names) with a fresh Hello, resuming at the announced high water, as SPEC §8 asks.
/// Gives up only if it cannot get a record acknowledged for 30 s.
fn device(
    plan: &Plan<'_>,
    values: Values,
    id: u64,
    boot: u32,
    stop: &AtomicBool,
    start: Instant,
) -> Result<DeviceStats> {
    let mut d = Device {
        plan,
        values,
        id,
        stop,
        start,
        session: DeviceSession::new(&key_of(id), boot, crate::device::boot_nonce()),
        stats: DeviceStats::default(),
        first_high_water: None,
        acked: 0,
        acked_at_stop: None,
        last_progress: Instant::now(),
    };
    let mut gateway = plan.gateways[0];
    let mut next_gateway = 1usize;
    loop {
        match d.connection(gateway) {
            Ok(Next::Done) => break,
            Ok(Next::Go(addr)) => gateway = addr,
            Err(e) => {
                if stop.load(Ordering::Relaxed) {
                    d.acked_at_stop.get_or_insert(d.acked);
                    break;
                }
                d.stats.reconnects += 1;
                if d.stats.first_reconnect_reason.is_none() {
                    d.stats.first_reconnect_reason = Some(format!("{e:#}"));
                }
                if d.last_progress.elapsed() > Duration::from_secs(30) {
                    return Err(e.context(format!("device {id}: no progress for 30 s")));
                }
                gateway = plan.gateways[next_gateway % plan.gateways.len()];
                next_gateway += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    d.stats.acked = d.acked_at_stop.unwrap_or(d.acked) - d.first_high_water.unwrap_or(0);
    Ok(d.stats)
}

enum Next {
    Done,
    Go(SocketAddr),
}

/// One device of a run and what it carries from one connection to the next.
struct Device<'p, 'a> {
    plan: &'p Plan<'a>,
    values: Values,
    id: u64,
    stop: &'p AtomicBool,
    start: Instant,
    session: DeviceSession,
    stats: DeviceStats,
    /// The high water of the first Welcome: records below it were stored before this run.
    first_high_water: Option<u64>,
    acked: u64,
    acked_at_stop: Option<u64>,
    last_progress: Instant,
}

impl Device<'_, '_> {
    /// One connection to `addr`, until the run stops, an error, or a hint to go elsewhere.
    fn connection(&mut self, addr: SocketAddr) -> Result<Next> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("device {}: connect to {addr}", self.id))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut writer = stream.try_clone()?;
        let mut reader = Counted {
            inner: BufReader::new(stream),
            bytes: 0,
        };
        let result = self.session_loop(addr, &mut writer, &mut reader);
        self.stats.bytes_in += reader.bytes;
        let _ = writer.shutdown(std::net::Shutdown::Both);
        result
    }

    fn session_loop(
        &mut self,
        addr: SocketAddr,
        writer: &mut TcpStream,
        reader: &mut Counted<BufReader<TcpStream>>,
    ) -> Result<Next> {
        let Device {
            plan,
            values,
            id,
            stop,
            start,
            ref mut session,
            ref mut stats,
            ref mut first_high_water,
            ref mut acked,
            ref mut acked_at_stop,
            ref mut last_progress,
        } = *self;
        let connected_at = Instant::now();
        let mut out = [0u8; MAX_FRAME];
        let mut inb = [0u8; MAX_FRAME];
        let hello = session.hello(id, 1, MAX_BATCH);
        let n = session
            .encode(&Message::Hello(hello), &mut out)
            .map_err(|e| anyhow!("encode Hello: {e}"))?;
        writer.write_all(&out[..n])?;
        stats.bytes_out += n as u64;
        let n = read_frame(reader, &mut inb).context("reading the Welcome")?;
        let welcome = match session.decode(&mut inb[..n]) {
            Ok(Message::Welcome(w)) => w,
            Ok(Message::Error(e)) => bail!("device {id}: gateway refused Hello: {:?}", e.code),
            Ok(other) => bail!("device {id}: expected Welcome, got {:?}", other.kind()),
            Err(e) => bail!("device {id}: Welcome: {e}"),
        };
        if let Some(leader) = welcome.leader {
            let ip = match addr.ip() {
                std::net::IpAddr::V4(v4) => v4.octets(),
                std::net::IpAddr::V6(_) => [127, 0, 0, 1],
            };
            let l = leader.resolve(ip);
            let to = SocketAddr::from((l.ip, l.port));
            if to != addr {
                return Ok(Next::Go(to));
            }
        }
        let high_water = welcome.high_water;
        first_high_water.get_or_insert(high_water);
        let mut credit = welcome.credit;
        // Records above the high water were not stored: send them again from there (rule 3).
        *acked = high_water;
        let mut next_seq = high_water + 1;
        let mut sent_at = Instant::now();
        let uptime = |now: Instant| 60_000 + (now - start).as_millis() as u64;
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            if stopping && acked_at_stop.is_none() {
                *acked_at_stop = Some(*acked);
            }
            let in_flight = next_seq - 1 - *acked;
            if stopping && (in_flight == 0 || plan.mode == Mode::OneInFlight) {
                return Ok(Next::Done);
            }
            let room = u64::from(credit).saturating_sub(in_flight);
            let want = match plan.mode {
                Mode::Saturate => room,
                Mode::OneInFlight if in_flight == 0 => room.min(1),
                Mode::OneInFlight => 0,
            };
            if !stopping && want > 0 {
                let now = Instant::now();
                let mut body = [0u8; MAX_FRAME];
                let mut batch = BatchEncoder::new(&mut body, next_seq, uptime(now));
                for i in 0..want.min(u64::from(MAX_BATCH)) {
                    let values = values(id, next_seq + i);
                    let record = Record {
                        stream: STREAM,
                        uptime_ms: uptime(now),
                        values: &values,
                    };
                    if batch.push(&record).is_err() {
                        break;
                    }
                }
                let count = u64::from(batch.count());
                let view = batch.finish().map_err(|e| anyhow!("batch: {e}"))?;
                let n = session
                    .encode(&Message::Batch(view), &mut out)
                    .map_err(|e| anyhow!("encode Batch: {e}"))?;
                writer.write_all(&out[..n])?;
                stats.bytes_out += n as u64;
                next_seq += count;
                sent_at = now;
                // Saturating devices fill their credit before reading; more may fit right away.
                if plan.mode == Mode::Saturate && next_seq - 1 - *acked < u64::from(credit) {
                    continue;
                }
            }
            let n = read_frame(reader, &mut inb).context("reading a gateway frame")?;
            match session.decode(&mut inb[..n]) {
                Ok(Message::Ack(a)) => {
                    if a.through_seq > *acked {
                        *acked = a.through_seq.min(next_seq - 1);
                        *last_progress = Instant::now();
                        if let Some(p) = plan.probe {
                            p.saw_ack(connected_at);
                        }
                        if plan.mode == Mode::OneInFlight && !stopping {
                            stats
                                .latencies_ms
                                .push(sent_at.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    credit = a.credit;
                }
                Ok(Message::Ping(p)) => {
                    let n = session
                        .encode(&Message::Pong(Pong { nonce: p.nonce }), &mut out)
                        .map_err(|e| anyhow!("encode Pong: {e}"))?;
                    writer.write_all(&out[..n])?;
                    stats.bytes_out += n as u64;
                }
                Ok(Message::Redirect(r)) => {
                    return Ok(Next::Go(SocketAddr::from((r.addr.ip, r.addr.port))));
                }
                Ok(Message::Error(e)) => bail!("device {id}: gateway error {:?}", e.code),
                Ok(other) => bail!("device {id}: unexpected {:?}", other.kind()),
                Err(e) => bail!("device {id}: bad gateway frame: {e}"),
            }
        }
    }
}

/// Devices `ids` saturating the leader's device port for `secs` seconds.
pub fn saturate_leader(c: &crate::Cluster, ids: Range<u64>, secs: u64) -> Report {
    let l = c.leader();
    run(&Plan {
        gateways: vec![c.nodes[l].device.parse().expect("device address")],
        ids,
        mode: Mode::Saturate,
        duration: Duration::from_secs(secs),
        probe: None,
    })
    .expect("fleet")
}
