//! Device sessions (protocol 2, protocol/SPEC.md §5): a recorded device connection, played
//! back byte for byte, stores and acknowledges nothing, whether it is replayed live, to
//! another gateway, after a gateway restart, or interleaved with another boot's Hello; and the
//! device port holds its connection cap and handshake deadline without disturbing a device
//! that streams.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use cairn_protocol::{BatchEncoder, DeviceSession, MAX_FRAME, Message, Record, Value};
use cairn_tests::device::{boot_nonce, key_of, read_frame, register};
use cairn_tests::{Cluster, TIMEOUT, poll};
use serde_json::Value as Json;

const KIND_WELCOME: u8 = 2;
const KIND_ACK: u8 = 4;
const KIND_ERROR: u8 = 6;

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connecting to the device port");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// The frames a device sent on one connection: its Hello and one batch of records
/// `first..first + 3`, which the gateway acknowledged.
struct Recorded {
    hello: Vec<u8>,
    batch: Vec<u8>,
}

/// Runs one real connection of device `id` (boot number 7) and records what it sent.
fn record_connection(addr: &str, id: u64, first: u64) -> Recorded {
    let mut session = DeviceSession::new(&key_of(id), 7, boot_nonce());
    let mut s = connect(addr);
    let mut out = [0u8; MAX_FRAME];
    let n = session
        .encode(&Message::Hello(session.hello(id, 1, 8)), &mut out)
        .unwrap();
    let hello = out[..n].to_vec();
    s.write_all(&hello).unwrap();
    let mut inb = [0u8; MAX_FRAME];
    let len = read_frame(&mut s, &mut inb).expect("a Welcome");
    match session.decode(&mut inb[..len]) {
        Ok(Message::Welcome(w)) => assert_eq!(w.high_water, first - 1),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let mut body = [0u8; MAX_FRAME];
    let mut enc = BatchEncoder::new(&mut body, first, 10_000);
    for k in first..first + 3 {
        let v = [Value::U64(k), Value::F32(20.5)];
        enc.push(&Record {
            stream: 1,
            uptime_ms: 9_000,
            values: &v,
        })
        .unwrap();
    }
    let n = session
        .encode(&Message::Batch(enc.finish().unwrap()), &mut out)
        .unwrap();
    let batch = out[..n].to_vec();
    s.write_all(&batch).unwrap();
    let len = read_frame(&mut s, &mut inb).expect("an Ack");
    match session.decode(&mut inb[..len]) {
        Ok(Message::Ack(a)) => assert_eq!(a.through_seq, first + 2),
        other => panic!("expected Ack, got {other:?}"),
    }
    Recorded { hello, batch }
}

/// Plays a recorded connection back byte for byte; returns the kinds of the frames the
/// gateway sent until it closed.
fn replay(addr: &str, rec: &Recorded) -> Vec<u8> {
    let mut s = connect(addr);
    s.write_all(&rec.hello).unwrap();
    let mut kinds = Vec::new();
    let mut buf = [0u8; MAX_FRAME];
    if read_frame(&mut s, &mut buf).is_ok() {
        kinds.push(buf[3]);
    }
    let _ = s.write_all(&rec.batch);
    while read_frame(&mut s, &mut buf).is_ok() {
        kinds.push(buf[3]);
    }
    kinds
}

fn ingress(c: &Cluster, i: usize) -> Json {
    c.nodes[i].status().expect("status")["ingress"].clone()
}

fn bad_auth(c: &Cluster, i: usize) -> u64 {
    ingress(c, i)["rejects"]["bad_auth"].as_u64().unwrap_or(0)
}

fn stored(c: &Cluster, i: usize) -> usize {
    c.nodes[i]
        .rows("SELECT * FROM telemetry", "linearizable")
        .len()
}

fn device_addr(c: &Cluster, i: usize) -> String {
    c.nodes[i].status().expect("status")["device_addr"]
        .as_str()
        .expect("device_addr")
        .to_string()
}

/// The replayed connection is welcomed (its Hello authenticates) under a fresh challenge,
/// so its recorded batch is `BadAuth`: an Error, never an Ack.
fn assert_rejected(kinds: &[u8], what: &str) {
    assert_eq!(
        kinds,
        [KIND_WELCOME, KIND_ERROR],
        "{what}: frames {kinds:?}"
    );
    assert!(!kinds.contains(&KIND_ACK), "{what}: acknowledged");
}

#[test]
fn test_recorded_connection_is_worthless_to_every_gateway() {
    let mut c = Cluster::start(3);
    let leader = c.leader();
    let follower = c.followers()[0];
    let http = c.nodes[leader].url("");
    register(http.trim_end_matches('/'), 500..502).expect("registering devices");

    let rec = record_connection(&device_addr(&c, leader), 500, 1);
    poll(TIMEOUT, "three rows everywhere", || {
        (0..3).all(|i| stored(&c, i) == 3).then_some(())
    });

    // Live, to the same gateway, while the device's session has just been used.
    let before = bad_auth(&c, leader);
    assert_rejected(&replay(&device_addr(&c, leader), &rec), "live");
    assert!(bad_auth(&c, leader) > before, "not counted as rejected");
    // To another gateway (a follower, which would forward).
    let before = bad_auth(&c, follower);
    assert_rejected(&replay(&device_addr(&c, follower), &rec), "other gateway");
    assert!(bad_auth(&c, follower) > before);
    // Interleaved with another boot's Hello (same boot number) of the same device.
    let mut other = DeviceSession::new(&key_of(500), 7, boot_nonce());
    let mut out = [0u8; MAX_FRAME];
    let n = other
        .encode(&Message::Hello(other.hello(500, 1, 8)), &mut out)
        .unwrap();
    let mut s = connect(&device_addr(&c, leader));
    s.write_all(&out[..n]).unwrap();
    let mut buf = [0u8; MAX_FRAME];
    let len = read_frame(&mut s, &mut buf).expect("a Welcome for the other boot");
    assert!(matches!(
        other.decode(&mut buf[..len]),
        Ok(Message::Welcome(_))
    ));
    assert_rejected(&replay(&device_addr(&c, leader), &rec), "interleaved");
    // And the recorded batch on the other boot's live connection: not under its keys.
    s.write_all(&rec.batch).unwrap();
    let len = read_frame(&mut s, &mut buf).expect("an answer");
    assert_eq!(buf[3], KIND_ERROR, "recorded batch on another connection");
    let _ = len;
    drop(s);
    // After the gateway restarts.
    c.kill9(follower);
    c.restart(follower);
    assert_rejected(&replay(&device_addr(&c, follower), &rec), "after restart");

    // Nothing stored beyond the original three rows, on any replica.
    c.wait_converged();
    for i in 0..3 {
        assert_eq!(stored(&c, i), 3, "node {} stored a replay", c.nodes[i].id);
    }
    // The device itself carries on: its next connection stores seqs 4..=6.
    let leader = c.leader();
    record_connection(&device_addr(&c, leader), 500, 4);
    poll(TIMEOUT, "six rows", || {
        (stored(&c, leader) == 6).then_some(())
    });
    c.assert_identical();
}

/// Idle connections the flood opens.
const IDLE: u64 = 10_000;

/// Raises this process's open-file limit to at least `n` (up to the hard limit), so the test
/// can hold its flood of sockets.
fn raise_fd_limit(n: u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the one struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < n {
            l.rlim_cur = n.min(l.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

#[test]
fn test_connection_cap_and_handshake_deadline_spare_a_streaming_device() {
    let c = Cluster::start_with(
        1,
        cairn_tests::Options {
            extra: vec![
                "--device-max-connections".into(),
                "40".into(),
                "--device-handshake-timeout-ms".into(),
                "1500".into(),
            ],
            ..Default::default()
        },
    );
    let http = c.nodes[0].url("");
    register(http.trim_end_matches('/'), 600..601).expect("registering the device");
    let addr = device_addr(&c, 0);
    // A device connected before the flood.
    let mut session = DeviceSession::new(&key_of(600), 1, boot_nonce());
    let mut s = connect(&addr);
    let mut out = [0u8; MAX_FRAME];
    let mut inb = [0u8; MAX_FRAME];
    let n = session
        .encode(&Message::Hello(session.hello(600, 1, 8)), &mut out)
        .unwrap();
    s.write_all(&out[..n]).unwrap();
    let len = read_frame(&mut s, &mut inb).unwrap();
    assert!(matches!(
        session.decode(&mut inb[..len]),
        Ok(Message::Welcome(_))
    ));

    // 10,000 idle connections that never say Hello: at most 40 are held at once, the rest
    // are refused (and counted) as they come.
    raise_fd_limit(IDLE + 1_000);
    let idle: Vec<TcpStream> = (0..IDLE)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    assert!(
        idle.len() as u64 >= IDLE * 99 / 100,
        "only {} of {IDLE} idle connections opened",
        idle.len()
    );
    poll(TIMEOUT, "connections over the cap counted", || {
        (ingress(&c, 0)["connections_over_cap"].as_u64()? > 0).then_some(())
    });
    let open = ingress(&c, 0)["connections_open"].as_u64().unwrap();
    assert!(open <= 40, "{open} connections open over a cap of 40");

    // The streaming device is not disturbed: batches keep being acknowledged.
    for round in 0..5u64 {
        let first = 1 + round * 3;
        let mut body = [0u8; MAX_FRAME];
        let mut enc = BatchEncoder::new(&mut body, first, 10_000);
        for k in first..first + 3 {
            let v = [Value::U64(k)];
            enc.push(&Record {
                stream: 1,
                uptime_ms: 9_000,
                values: &v,
            })
            .unwrap();
        }
        let n = session
            .encode(&Message::Batch(enc.finish().unwrap()), &mut out)
            .unwrap();
        s.write_all(&out[..n]).unwrap();
        let len = read_frame(&mut s, &mut inb).expect("an Ack under the flood");
        match session.decode(&mut inb[..len]) {
            Ok(Message::Ack(a)) => assert_eq!(a.through_seq, first + 2),
            other => panic!("expected Ack, got {other:?}"),
        }
    }
    // The handshake deadline frees the idle slots: a new device gets in.
    poll(TIMEOUT, "handshake timeouts", || {
        (ingress(&c, 0)["handshake_timeouts"].as_u64()? > 0).then_some(())
    });
    let idle_opened = idle.len();
    drop(idle);
    poll(TIMEOUT, "a new connection to be welcomed", || {
        let mut late = DeviceSession::new(&key_of(600), 2, boot_nonce());
        let mut s = TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let n = late
            .encode(&Message::Hello(late.hello(600, 1, 8)), &mut out)
            .ok()?;
        s.write_all(&out[..n]).ok()?;
        let len = read_frame(&mut s, &mut inb).ok()?;
        matches!(late.decode(&mut inb[..len]), Ok(Message::Welcome(_))).then_some(())
    });
    let m = ingress(&c, 0);
    println!(
        "{} idle connections: over cap {}, handshake timeouts {}, open {}",
        idle_opened, m["connections_over_cap"], m["handshake_timeouts"], m["connections_open"]
    );
}
