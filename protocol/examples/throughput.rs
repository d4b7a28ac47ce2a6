//! Host throughput of the protocol's hot paths, for sizing gateways:
//! `cargo run --release -p cairn-protocol --example throughput`.
//!
//! Device side: build a 50-record batch (three f32 each) and seal it. Gateway side: open the
//! frame, decode it and walk every value. Prints frames/s and records/s for each.

use std::hint::black_box;
use std::time::{Duration, Instant};

use cairn_protocol::*;

const RECORDS: u16 = 50;

fn measure(name: &str, records_per_op: u64, mut op: impl FnMut()) {
    // Warm up, then run for about a second.
    for _ in 0..100 {
        op();
    }
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        for _ in 0..100 {
            op();
        }
        ops += 100;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<40} {:>10.0} frames/s {:>12.0} records/s {:>8.2} µs/frame",
        ops as f64 / secs,
        (ops * records_per_op) as f64 / secs,
        secs * 1e6 / ops as f64
    );
}

/// One handshake: the device's Hello, the gateway's accept and Welcome, the device opening it.
fn connect(key: &[u8; KEY_LEN], dev: &mut DeviceSession) -> GatewaySession {
    let mut buf = [0u8; 128];
    let n = dev
        .encode(&Message::Hello(dev.hello(1, 1, RECORDS)), &mut buf)
        .unwrap();
    let mut gw = GatewaySession::accept(key, &buf[..n], [1; CHALLENGE_LEN]).unwrap();
    let welcome = Welcome {
        high_water: 0,
        leader: None,
        credit: 64,
    };
    let n = gw.encode(&Message::Welcome(welcome), &mut buf).unwrap();
    dev.decode(&mut buf[..n]).unwrap();
    gw
}

fn main() {
    let key = [0x42; KEY_LEN];
    let mut dev = DeviceSession::new(&key, 1, [0; BOOT_NONCE_LEN]);
    measure("handshake: hello, accept, welcome, open", 1, || {
        black_box(connect(&key, &mut dev));
    });

    let mut frame = [0u8; MAX_FRAME];
    let mut body = [0u8; MAX_FRAME];
    let mut seq = 1u64;
    let mut build = |frame: &mut [u8; MAX_FRAME], dev: &mut DeviceSession| -> usize {
        let mut enc = BatchEncoder::new(&mut body, seq, 1_000_000);
        for i in 0..RECORDS {
            let values = [
                Value::F32(black_box(21.5)),
                Value::F32(40.25),
                Value::F32(f32::from(i)),
            ];
            enc.push(&Record {
                stream: 1,
                uptime_ms: 1_000_000 - u64::from(RECORDS - i) * 1000,
                values: &values,
            })
            .unwrap();
        }
        seq += u64::from(RECORDS);
        dev.encode(&Message::Batch(enc.finish().unwrap()), frame)
            .unwrap()
    };

    measure(
        "device: encode + seal 50-record batch",
        u64::from(RECORDS),
        || {
            black_box(build(&mut frame, &mut dev));
        },
    );

    // A new connection, then frames sealed in order so the gateway sees consecutive counters.
    let gw = connect(&key, &mut dev);
    let mut frames = Vec::new();
    for _ in 0..20_000 {
        let n = build(&mut frame, &mut dev);
        frames.push(frame[..n].to_vec());
    }
    let mut session = gw.clone();
    let mut next = 0usize;
    measure(
        "gateway: open + decode + walk values",
        u64::from(RECORDS),
        || {
            let i = next % frames.len();
            if i == 0 {
                // Start over on a fresh copy of the session (counters must increase).
                session = gw.clone();
            }
            next += 1;
            let mut f = frames[i].clone();
            let Ok(Message::Batch(view)) = session.decode(&mut f) else {
                panic!("decode failed");
            };
            let mut sum = 0f32;
            for r in view.records() {
                for v in r.unwrap().values() {
                    if let Value::F32(x) = v {
                        sum += x;
                    }
                }
            }
            black_box(sum);
        },
    );
}
