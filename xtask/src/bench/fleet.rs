//! A device fleet speaking Cairn's device protocol with the real encoder (`cairn-protocol`'s
//! `DeviceSession` and `BatchEncoder`), one OS thread per device, to load a gateway.
//!
//! It follows SPEC §8 as a device does (Hello, Welcome high-water, consecutive seqs, at most
//! `credit` records past the last Ack) but keeps no outbox: records are generated on demand,
//! so the figures measure the cluster, not a device's storage. Two modes: `Saturate` keeps
//! every device's credit full (throughput), `OneInFlight` sends one record and waits for its
//! Ack before the next (latency).

use super::http;
use anyhow::{Context, Result, anyhow, bail, ensure};
use cairn_protocol::{
    BatchEncoder, DeviceSession, HEADER_LEN, MAX_FRAME, Message, Pong, Record, Value,
    read_frame_len,
};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The stream the fleet writes; the bench declares it as a three-`real` table.
pub const STREAM: u16 = 7;

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
}

/// A device's pre-shared key, derived from its id (the bench's devices are throwaway).
pub fn key_of(id: u64) -> [u8; 32] {
    let mut k = [0x5au8; 32];
    k[..8].copy_from_slice(&id.to_le_bytes());
    k
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Registers devices `ids` through the `/devices` admin API (what `cairn device add` calls),
/// from a few kept-alive connections in parallel.
pub fn register(http_addr: SocketAddr, ids: Range<u64>) -> Result<()> {
    let ids: Vec<u64> = ids.collect();
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = ids
            .chunks(ids.len().div_ceil(8).max(1))
            .map(|chunk| {
                scope.spawn(move || -> Result<()> {
                    let mut conn = http::Conn::open(http_addr, Duration::from_secs(30))?;
                    for &id in chunk {
                        let body = serde_json::json!({"id": id, "key": hex(&key_of(id))});
                        let r = conn.post_json("/devices", &body.to_string())?;
                        ensure!(
                            (200..300).contains(&r.status),
                            "registering device {id}: {} {}",
                            r.status,
                            r.body
                        );
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow!("registration thread panicked"))??;
        }
        Ok(())
    })
}

/// Runs devices `ids` against the gateway device port `addr` for `duration`.
pub fn run(addr: SocketAddr, ids: Range<u64>, mode: Mode, duration: Duration) -> Result<Report> {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let mut report = Report::default();
    std::thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::new();
        for id in ids.clone() {
            let stop = &stop;
            handles.push(
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || device(addr, id, mode, stop, start))?,
            );
        }
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        report.elapsed = start.elapsed();
        let mut first_error = None;
        for h in handles {
            match h.join().map_err(|_| anyhow!("device thread panicked"))? {
                Ok(d) => {
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

struct DeviceStats {
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

fn read_frame<'b>(r: &mut impl Read, buf: &'b mut [u8; MAX_FRAME]) -> Result<&'b mut [u8]> {
    r.read_exact(&mut buf[..HEADER_LEN])
        .context("reading a gateway frame")?;
    let header: &[u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("header length");
    let len = read_frame_len(header).map_err(|e| anyhow!("gateway frame: {e}"))?;
    r.read_exact(&mut buf[HEADER_LEN..len])?;
    Ok(&mut buf[..len])
}

fn device(
    addr: SocketAddr,
    id: u64,
    mode: Mode,
    stop: &AtomicBool,
    start: Instant,
) -> Result<DeviceStats> {
    let key = key_of(id);
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("device {id}: connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = Counted {
        inner: BufReader::new(stream),
        bytes: 0,
    };
    let mut session = DeviceSession::new(&key, 1, 0);
    let mut out = [0u8; MAX_FRAME];
    let mut inb = [0u8; MAX_FRAME];
    let mut bytes_out = 0u64;

    let hello = session.hello(id, 1, MAX_BATCH);
    let n = session
        .encode(&Message::Hello(hello), &mut out)
        .map_err(|e| anyhow!("encode Hello: {e}"))?;
    writer.write_all(&out[..n])?;
    bytes_out += n as u64;
    let frame = read_frame(&mut reader, &mut inb)?;
    let (high_water, mut credit) = match session.decode(frame) {
        Ok(Message::Welcome(w)) => (w.high_water, w.credit),
        Ok(Message::Error(e)) => bail!("device {id}: gateway refused Hello: {:?}", e.code),
        Ok(other) => bail!("device {id}: expected Welcome, got {:?}", other.kind()),
        Err(e) => bail!("device {id}: Welcome: {e}"),
    };
    let mut acked = high_water;
    let mut next_seq = high_water + 1;
    let mut latencies = Vec::new();
    let mut sent_at = Instant::now();
    let mut acked_at_stop = None;
    let uptime = |now: Instant| 60_000 + (now - start).as_millis() as u64;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && acked_at_stop.is_none() {
            acked_at_stop = Some(acked);
        }
        let in_flight = next_seq - 1 - acked;
        if stopping && in_flight == 0 {
            break;
        }
        let room = u64::from(credit).saturating_sub(in_flight);
        let want = match mode {
            Mode::Saturate => room,
            Mode::OneInFlight if in_flight == 0 => room.min(1),
            Mode::OneInFlight => 0,
        };
        if !stopping && want > 0 {
            let now = Instant::now();
            let mut body = [0u8; MAX_FRAME];
            let mut batch = BatchEncoder::new(&mut body, next_seq, uptime(now));
            for i in 0..want.min(u64::from(MAX_BATCH)) {
                let values = [
                    Value::F32(21.5 + ((next_seq + i) % 10) as f32 * 0.1),
                    Value::F32(48.25),
                    Value::F32(1013.0),
                ];
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
            bytes_out += n as u64;
            next_seq += count;
            sent_at = now;
            // Saturating devices fill their credit before reading; more may fit right away.
            if mode == Mode::Saturate && next_seq - 1 - acked < u64::from(credit) {
                continue;
            }
        }
        let frame = read_frame(&mut reader, &mut inb)?;
        match session.decode(frame) {
            Ok(Message::Ack(a)) => {
                if a.through_seq > acked {
                    acked = a.through_seq.min(next_seq - 1);
                    if mode == Mode::OneInFlight && !stopping {
                        latencies.push(sent_at.elapsed().as_secs_f64() * 1e3);
                    }
                }
                credit = a.credit;
            }
            Ok(Message::Ping(p)) => {
                let n = session
                    .encode(&Message::Pong(Pong { nonce: p.nonce }), &mut out)
                    .map_err(|e| anyhow!("encode Pong: {e}"))?;
                writer.write_all(&out[..n])?;
                bytes_out += n as u64;
            }
            Ok(Message::Error(e)) => bail!("device {id}: gateway error {:?}", e.code),
            Ok(other) => bail!("device {id}: unexpected {:?}", other.kind()),
            Err(e) => bail!("device {id}: bad gateway frame: {e}"),
        }
    }
    let _ = writer.shutdown(std::net::Shutdown::Both);
    Ok(DeviceStats {
        acked: acked_at_stop.unwrap_or(acked) - high_water,
        bytes_out,
        bytes_in: reader.bytes,
        latencies_ms: latencies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_per_device_and_hex_is_64_digits() {
        assert_ne!(key_of(1), key_of(2));
        assert_eq!(hex(&key_of(1)).len(), 64);
        assert!(hex(&key_of(1)).starts_with("01000000000000005a"));
    }
}
