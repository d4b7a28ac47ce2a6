//! A minimal MQTT 3.1.1 QoS 1 publisher over `std::net::TcpStream`, just enough to load a
//! broker: CONNECT/CONNACK, PUBLISH (QoS 1)/PUBACK, DISCONNECT.
//!
//! Why hand-written rather than an MQTT crate: `mosquitto_pub` sends one message per process,
//! the Rust MQTT clients pull in an async runtime and TLS stacks that xtask does not otherwise
//! need, and this benchmark needs exact control of the in-flight window and of the bytes on the
//! wire. The packet layouts are those of the MQTT 3.1.1 standard, sections 3.1-3.4 and 3.14.

use anyhow::{Context, Result, bail, ensure};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Appends the MQTT "remaining length" varint (7 bits per byte, least significant first).
fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// CONNECT with clean session, keep-alive 60 s.
pub fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&60u16.to_be_bytes());
    put_str(&mut body, client_id);
    let mut out = vec![0x10];
    put_remaining_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// PUBLISH, QoS 1, not retained.
pub fn publish_packet(out: &mut Vec<u8>, topic: &str, packet_id: u16, payload: &[u8]) {
    out.push(0x32);
    put_remaining_length(out, 2 + topic.len() + 2 + payload.len());
    put_str(out, topic);
    out.extend_from_slice(&packet_id.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Length of a PUBACK on the wire.
pub const PUBACK_LEN: usize = 4;

/// The payload a device would send for a three-value record: three little-endian f32, the
/// most compact encoding an MQTT device SDK user would pick by hand.
pub fn record_payload(seq: u64) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&(21.5f32 + (seq % 10) as f32 * 0.1).to_le_bytes());
    p[4..8].copy_from_slice(&48.25f32.to_le_bytes());
    p[8..12].copy_from_slice(&1013.0f32.to_le_bytes());
    p
}

/// An open MQTT session (after CONNACK).
pub struct Connection {
    stream: TcpStream,
}

impl Connection {
    pub fn open(addr: SocketAddr, client_id: &str) -> Result<Connection> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect to MQTT broker at {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(&connect_packet(client_id))?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).context("reading CONNACK")?;
        ensure!(
            connack[0] == 0x20 && connack[1] == 2,
            "expected CONNACK, got {connack:02x?}"
        );
        ensure!(
            connack[3] == 0,
            "broker refused connection: code {}",
            connack[3]
        );
        Ok(Connection { stream })
    }

    /// Publishes one message and waits for its PUBACK.
    pub fn publish_wait(&mut self, topic: &str, packet_id: u16, payload: &[u8]) -> Result<()> {
        let mut buf = Vec::with_capacity(64);
        publish_packet(&mut buf, topic, packet_id, payload);
        self.stream.write_all(&buf)?;
        let id = read_puback(&mut self.stream)?;
        ensure!(id == packet_id, "PUBACK for {id}, expected {packet_id}");
        Ok(())
    }

    pub fn close(mut self) {
        let _ = self.stream.write_all(&[0xE0, 0x00]);
    }
}

fn read_puback(stream: &mut impl Read) -> Result<u16> {
    let mut p = [0u8; PUBACK_LEN];
    stream.read_exact(&mut p).context("reading PUBACK")?;
    if p[0] != 0x40 || p[1] != 2 {
        bail!("expected PUBACK, got {p:02x?}");
    }
    Ok(u16::from_be_bytes([p[2], p[3]]))
}

/// Result of a throughput run.
pub struct Throughput {
    pub acked: u64,
    pub elapsed: Duration,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

/// Publishes from `connections` sessions for `duration`, each keeping up to `window`
/// unacknowledged messages in flight. Counts messages acknowledged by the broker.
pub fn throughput(
    addr: SocketAddr,
    connections: usize,
    window: u64,
    duration: Duration,
) -> Result<Throughput> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut handles = Vec::new();
    for c in 0..connections {
        let conn = Connection::open(addr, &format!("cairn-bench-{c}"))?;
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || {
            publisher(conn, c, window, &stop)
        }));
    }
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut total = Throughput {
        acked: 0,
        elapsed: Duration::ZERO,
        bytes_out: 0,
        bytes_in: 0,
    };
    for h in handles {
        let (acked, out, inb) = h
            .join()
            .map_err(|_| anyhow::anyhow!("publisher panicked"))??;
        total.acked += acked;
        total.bytes_out += out;
        total.bytes_in += inb;
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

/// One session: a writer loop here, a reader thread counting PUBACKs.
/// Returns (messages acked, bytes written, bytes read).
fn publisher(
    conn: Connection,
    index: usize,
    window: u64,
    stop: &AtomicBool,
) -> Result<(u64, u64, u64)> {
    let topic = format!("d/{index}");
    let acked = Arc::new((Mutex::new(0u64), Condvar::new()));
    let reader_done = Arc::new(AtomicU64::new(0));
    let mut reader = conn.stream.try_clone()?;
    let (acked_r, done_r) = (acked.clone(), reader_done.clone());
    let reader = std::thread::spawn(move || -> Result<()> {
        // PUBACKs are 4 bytes; read many at once.
        let mut buf = vec![0u8; 64 * 1024];
        let mut have = 0usize;
        loop {
            let n = reader.read(&mut buf[have..])?;
            if n == 0 {
                return Ok(());
            }
            have += n;
            let whole = have / PUBACK_LEN * PUBACK_LEN;
            for p in buf[..whole].chunks_exact(PUBACK_LEN) {
                ensure!(p[0] == 0x40 && p[1] == 2, "expected PUBACK, got {p:02x?}");
            }
            buf.copy_within(whole..have, 0);
            have -= whole;
            let (lock, cv) = &*acked_r;
            let mut a = lock.lock().expect("ack counter");
            *a += (whole / PUBACK_LEN) as u64;
            done_r.store(*a, Ordering::Relaxed);
            cv.notify_all();
        }
    });
    let mut writer = conn.stream.try_clone()?;
    let mut sent = 0u64;
    let mut bytes_out = 0u64;
    let mut buf = Vec::with_capacity(64 * 1024);
    while !stop.load(Ordering::Relaxed) {
        let in_flight = {
            let (lock, cv) = &*acked;
            let mut a = lock.lock().expect("ack counter");
            // Refill only once half the window is acknowledged: fewer, larger writes.
            while sent - *a > window / 2 {
                a = cv
                    .wait_timeout(a, Duration::from_millis(100))
                    .expect("ack counter")
                    .0;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            sent - *a
        };
        buf.clear();
        for _ in in_flight..window {
            sent += 1;
            // Packet id 0 is not allowed; ids wrap within the window, which is far below 65535.
            let id = (sent % 65535) as u16 + 1;
            publish_packet(&mut buf, &topic, id, &record_payload(sent));
        }
        writer.write_all(&buf)?;
        bytes_out += buf.len() as u64;
    }
    // Drain: wait for what is in flight, then hang up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reader_done.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let acked_count = reader_done.load(Ordering::Relaxed);
    conn.close();
    let _ = writer.shutdown(std::net::Shutdown::Both);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("PUBACK reader panicked"))??;
    Ok((acked_count, bytes_out, acked_count * PUBACK_LEN as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_remaining_length() {
        for (len, bytes) in [
            (0usize, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xff, 0x7f]),
            (16_384, vec![0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_remaining_length(&mut out, len);
            assert_eq!(out, bytes, "length {len}");
        }
    }

    #[test]
    fn test_emit_connect() {
        let p = connect_packet("ab");
        assert_eq!(
            p,
            [
                0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'a', b'b'
            ]
        );
    }

    #[test]
    fn test_emit_publish() {
        let mut p = Vec::new();
        publish_packet(&mut p, "d/7", 0x0102, &[9, 8]);
        assert_eq!(p, [0x32, 9, 0, 3, b'd', b'/', b'7', 1, 2, 9, 8]);
        // A three-value record on topic "d/7": 21 bytes out, 4 bytes of PUBACK back.
        let mut p = Vec::new();
        publish_packet(&mut p, "d/7", 1, &record_payload(1));
        assert_eq!(p.len(), 21);
    }
}
