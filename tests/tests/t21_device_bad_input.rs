//! Bad input at the device port (protocol/SPEC.md §4, §5.5, §7.6): random bytes, bad headers,
//! oversized and truncated frames, half-open connections. Each connection gets an unsealed
//! `Error` frame with a clear code (or is closed), the node stays up, a well-behaved device
//! still gets its `Welcome`, and nothing is stored.
//!
//! The well-formed frames are the golden vectors of SPEC §10 (key `00 01 .. 1f`, device 258,
//! boot 7), so this test needs no client code. A protocol 1 Hello (SPEC appendix A) is refused:
//! no downgrade without `--accept-protocol-1`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cairn_tests::device::read_frame as read_whole_frame;
use cairn_tests::nemesis::SplitMix64;
use cairn_tests::{Cluster, post, stmts};
use serde_json::json;

/// SPEC §10.1: Hello of device 258, boot 7, device nonce b0 .. bb 05 00 00 00.
const HELLO: [u8; 52] = [
    0x43, 0x52, 0x02, 0x01, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // header
    0x82, 0x02, 0x07, 0x82, 0x80, 0x04, 0x02, 0x32, 0xb0, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7,
    0xb8, 0xb9, 0xba, 0xbb, 0x05, 0x00, 0x00, 0x00, // body
    0x3c, 0xf1, 0xb0, 0x29, 0xfb, 0xb1, 0xd4, 0xef, 0xd0, 0x21, 0x6c, 0x84, 0xe4, 0xb4, 0x55,
    0x5a, // tag
];
/// SPEC appendix A: the protocol 1 Hello of the same device.
const HELLO_V1: [u8; 36] = [
    0x43, 0x52, 0x01, 0x01, 0x18, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, // header
    0x82, 0x02, 0x07, 0x82, 0x80, 0x04, 0x01, 0x32, // body
    0x31, 0x7b, 0x4d, 0x77, 0x73, 0x7c, 0x8d, 0x4e, 0xd4, 0x85, 0xd8, 0xd0, 0xf1, 0x18, 0x71,
    0xf4, // tag
];
const DEVICE: u64 = 258;
const KIND_WELCOME: u8 = 2;
const KIND_ERROR: u8 = 6;
const UNSEALED: u8 = 1;
const UNKNOWN_DEVICE: u8 = 1;
const BAD_AUTH: u8 = 2;
const TOO_LARGE: u8 = 4;
const MALFORMED: u8 = 5;
const UNSUPPORTED_VERSION: u8 = 6;

/// One frame read from the gateway: (kind, flags, body+tag).
type Frame = (u8, u8, Vec<u8>);

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connecting to the device port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads one frame, or `None` when the gateway closed (or sent nothing for 10 s).
fn read_frame(s: &mut TcpStream) -> Option<Frame> {
    let mut buf = [0u8; cairn_protocol::MAX_FRAME];
    let len = match read_whole_frame(s, &mut buf) {
        Ok(len) => len,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => panic!("gateway sent {e}"),
        Err(_) => return None,
    };
    Some((buf[3], buf[6], buf[12..len].to_vec()))
}

/// After an error the gateway closes: the next read sees EOF (or a reset), not a hang.
fn assert_closed(s: &mut TcpStream, what: &str) {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) | Err(_) if start.elapsed() < Duration::from_secs(9) => {}
        r => panic!("{what}: connection not closed after the error ({r:?})"),
    }
}

/// Sends `bytes`; expects an unsealed Error with one of `codes`, then the connection closed.
fn expect_error(addr: &str, bytes: &[u8], codes: &[u8], what: &str) {
    let start = Instant::now();
    let mut s = connect(addr);
    let _ = s.write_all(bytes);
    let (kind, flags, body) =
        read_frame(&mut s).unwrap_or_else(|| panic!("{what}: closed without an Error frame"));
    assert_eq!(
        kind, KIND_ERROR,
        "{what}: expected an Error frame, got kind {kind}"
    );
    assert_eq!(flags & UNSEALED, UNSEALED, "{what}: error not unsealed");
    assert!(codes.contains(&body[0]), "{what}: error code {}", body[0]);
    assert_closed(&mut s, what);
    println!("{what}: error code {} in {:?}", body[0], start.elapsed());
}

fn stored_readings(c: &Cluster, i: usize) -> usize {
    c.nodes[i]
        .rows(
            "SELECT count(*) FROM sqlite_master WHERE name = 'telemetry'",
            "none",
        )
        .first()
        .and_then(|r| r[0].as_u64())
        .map(|has| {
            if has == 0 {
                0
            } else {
                c.nodes[i].rows("SELECT * FROM telemetry", "none").len()
            }
        })
        .unwrap_or(0)
}

#[test]
fn test_device_port_survives_garbage_and_answers_with_error_codes() {
    let c = Cluster::start(3);
    let l = c.leader();
    let f = c.followers()[0];
    let key: String = (0u8..32).map(|b| format!("{b:02x}")).collect();
    let r = post(
        &c.nodes[l].url("/devices"),
        &json!({ "id": DEVICE, "key": key }),
    );
    assert_eq!(r.status, 200, "registering device {DEVICE}: {:?}", r.body);
    c.execute(&stmts(&[
        "CREATE TABLE kept (v TEXT)",
        "INSERT INTO kept VALUES ('x')",
    ]));

    let mut rng = SplitMix64::new(21);
    for i in [l, f] {
        let addr = c.nodes[i].device.clone();
        let what = |s: &str| format!("node {} {s}", c.nodes[i].id);
        // Not our protocol at all.
        expect_error(
            &addr,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            &[MALFORMED],
            &what("HTTP request"),
        );
        // Right magic, unknown version.
        let mut h = HELLO;
        h[2] = 9;
        expect_error(&addr, &h, &[UNSUPPORTED_VERSION], &what("version 9"));
        // A valid protocol 1 Hello of a registered device: no downgrade by default.
        expect_error(
            &addr,
            &HELLO_V1,
            &[UNSUPPORTED_VERSION],
            &what("protocol 1 Hello"),
        );
        // Length beyond MAX_FRAME, and below the tag size.
        let mut big = HELLO.to_vec();
        big[4..6].copy_from_slice(&2000u16.to_le_bytes());
        big.resize(2012, 0xaa);
        expect_error(
            &addr,
            &big,
            &[TOO_LARGE, MALFORMED],
            &what("oversized frame"),
        );
        let mut small = HELLO;
        small[4..6].copy_from_slice(&3u16.to_le_bytes());
        expect_error(&addr, &small, &[MALFORMED], &what("length below the tag"));
        // A Hello whose tag does not verify, and one for an unknown device.
        let mut bad_tag = HELLO;
        bad_tag[51] ^= 1;
        expect_error(&addr, &bad_tag, &[BAD_AUTH], &what("bad tag"));
        let mut unknown = HELLO;
        unknown[12] = 0x83; // device 259: no key registered, so the tag cannot be checked
        expect_error(&addr, &unknown, &[UNKNOWN_DEVICE], &what("unknown device"));
        // Random garbage of many lengths.
        for n in 0..40 {
            let len = 1 + rng.below(3000) as usize;
            let mut junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if n % 2 == 0 {
                // Half of them with a plausible header so the body parser sees the garbage.
                junk[..4].copy_from_slice(&[0x43, 0x52, 1 + (n % 2) as u8, (n % 9) as u8]);
            }
            let mut s = connect(&addr);
            let _ = s.write_all(&junk);
            let _ = s.shutdown(std::net::Shutdown::Write);
            if let Some((kind, _, body)) = read_frame(&mut s) {
                assert_eq!(
                    kind,
                    KIND_ERROR,
                    "{}: junk {n} got kind {kind}",
                    what("random")
                );
                assert!((1..=11).contains(&body[0]), "code {}", body[0]);
            }
            assert_closed(&mut s, &what("random junk"));
        }
        // Truncated: a Hello cut short, then the write half closed.
        for cut in [1, 5, 12, 20, 51] {
            let mut s = connect(&addr);
            s.write_all(&HELLO[..cut]).unwrap();
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = read_frame(&mut s);
            assert_closed(&mut s, &what(&format!("Hello cut at {cut}")));
        }
    }

    // Half-open connections hold sockets but must not block anyone else.
    let mut held = Vec::new();
    for n in 0..100 {
        let mut s = connect(&c.nodes[l].device);
        s.write_all(&HELLO[..n % 12]).unwrap();
        held.push(s);
    }
    // A well-formed Hello still gets a Welcome (sealed, from the leader).
    let mut s = connect(&c.nodes[l].device);
    s.write_all(&HELLO).unwrap();
    let (kind, _, _) = read_frame(&mut s).expect("an answer to a valid Hello");
    assert_eq!(kind, KIND_WELCOME, "valid Hello not welcomed");
    // ... and garbage after a good Hello is an error too, not a crash.
    let _ = s.write_all(&[0x43, 0x52, 0x01, 0x03, 0xff, 0xff, 0, 0, 0, 0, 0, 0]);
    if let Some((kind, _, _)) = read_frame(&mut s) {
        assert_eq!(kind, KIND_ERROR);
    }
    assert_closed(&mut s, "garbage after Hello");
    drop(held);

    // Every node up, nothing stored from all that, HTTP data intact, replicas identical.
    for n in &c.nodes {
        assert!(n.status().is_some(), "node {} stopped answering", n.id);
    }
    for i in 0..c.nodes.len() {
        assert_eq!(
            stored_readings(&c, i),
            0,
            "node {} stored junk",
            c.nodes[i].id
        );
    }
    assert_eq!(
        c.nodes[l].rows("SELECT v FROM kept", "linearizable"),
        vec![vec![json!("x")]]
    );
    c.assert_identical();
}
