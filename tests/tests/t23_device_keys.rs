//! Device key revocation and rotation (issue 27 item 4) and no protocol 1 downgrade per device,
//! on 3 real nodes:
//! - `cairn device revoke` (sent to a follower) closes the device's open sessions on the
//!   leader and on a follower (time printed) and every later Hello is refused, on every
//!   gateway; the records acknowledged before stay on every replica;
//! - `cairn device rekey` installs a new key: the device reconnects with it, the old key still
//!   opens sessions during the grace window and an old-key session goes on, and after the
//!   window the old key is refused and its session closed; `/devices` and `rekey --status`
//!   show when the new key was first seen;
//! - with `--accept-protocol-1`, a protocol 1 Hello is accepted only from a device registered
//!   for protocol 1, and one protocol 2 Hello moves that device to 2 for good.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cairn_protocol::{
    BatchEncoder, DeviceSession, FLAG_UNSEALED, MAX_FRAME, Message, Record, Value, v1,
};
use cairn_tests::device::{boot_nonce, hex, key_of, read_frame, register};
use cairn_tests::{Cluster, Options, TIMEOUT, cairn_bin, poll};
use serde_json::{Value as Json, json};

const KIND_ERROR: u8 = 6;

/// One open device session, as the firmware client would hold it.
struct Conn {
    s: TcpStream,
    session: DeviceSession,
    id: u64,
}

/// What a gateway answered a Hello with, if not a Welcome: the frame's kind and flags.
#[derive(Debug, PartialEq, Eq)]
struct Refused {
    kind: u8,
    unsealed: bool,
}

/// Says Hello as device `id` with `key`; the session and the Welcome's high-water, or what
/// the gateway answered instead.
fn hello(addr: &str, id: u64, key: &[u8; 32]) -> Result<(Conn, u64), Refused> {
    let mut session = DeviceSession::new(key, 7, boot_nonce());
    let mut s = TcpStream::connect(addr).expect("connecting to the device port");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = [0u8; MAX_FRAME];
    let n = session
        .encode(&Message::Hello(session.hello(id, 1, 8)), &mut out)
        .unwrap();
    s.write_all(&out[..n]).unwrap();
    let mut buf = [0u8; MAX_FRAME];
    let len = read_frame(&mut s, &mut buf).expect("an answer to the Hello");
    let refused = Refused {
        kind: buf[3],
        unsealed: buf[6] & FLAG_UNSEALED != 0,
    };
    match session.decode(&mut buf[..len]) {
        Ok(Message::Welcome(w)) => Ok((Conn { s, session, id }, w.high_water)),
        _ => Err(refused),
    }
}

impl Conn {
    /// Sends records `first..first + 3` and returns the Ack's `through_seq`.
    fn batch(&mut self, first: u64) -> u64 {
        let mut body = [0u8; MAX_FRAME];
        let mut enc = BatchEncoder::new(&mut body, first, 10_000);
        for k in first..first + 3 {
            let v = [Value::U64(self.id * 1000 + k), Value::F32(20.5)];
            enc.push(&Record {
                stream: 1,
                uptime_ms: 9_000,
                values: &v,
            })
            .unwrap();
        }
        let mut out = [0u8; MAX_FRAME];
        let n = self
            .session
            .encode(&Message::Batch(enc.finish().unwrap()), &mut out)
            .unwrap();
        self.s.write_all(&out[..n]).unwrap();
        let mut buf = [0u8; MAX_FRAME];
        let len = read_frame(&mut self.s, &mut buf).expect("an Ack");
        match self.session.decode(&mut buf[..len]) {
            Ok(Message::Ack(a)) => a.through_seq,
            other => panic!("device {}: expected Ack, got {other:?}", self.id),
        }
    }

    /// Waits until the gateway closes the connection (no frame comes); how long it took.
    fn closed_within(&mut self) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; MAX_FRAME];
        match read_frame(&mut self.s, &mut buf) {
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => start.elapsed(),
            other => panic!("device {}: the gateway did not close: {other:?}", self.id),
        }
    }
}

fn device_addr(c: &Cluster, i: usize) -> String {
    c.nodes[i].status().expect("status")["device_addr"]
        .as_str()
        .expect("device_addr")
        .to_string()
}

fn ingress(c: &Cluster, i: usize, counter: &str) -> u64 {
    c.nodes[i].status().expect("status")["ingress"][counter]
        .as_u64()
        .unwrap_or(0)
}

fn rows_of(c: &Cluster, i: usize, id: u64) -> usize {
    c.nodes[i]
        .rows(
            &format!("SELECT * FROM telemetry WHERE device_id = {id}"),
            "none",
        )
        .len()
}

fn device_json(c: &Cluster, i: usize, id: u64) -> Json {
    let r = c.nodes[i].client().get(&c.nodes[i].url("/devices"));
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["devices"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["device_id"] == id).cloned())
        .unwrap_or_else(|| panic!("device {id} not listed: {}", r.body))
}

fn cli(c: &Cluster, node: usize, args: &[&str]) -> String {
    let out = std::process::Command::new(cairn_bin())
        .arg("device")
        .args(args)
        .args(["--host", &c.nodes[node].url("")])
        .output()
        .expect("running cairn device");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cairn device {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A 3-node cluster with device `id` registered (key [`key_of`]): the cluster, the leader and
/// a follower. Slow elections: the tests count what the leader's and the follower's
/// gateways saw, so the roles found here must hold.
fn three_nodes_with_device(id: u64) -> (Cluster, usize, usize) {
    let c = Cluster::start_with(3, Options::slow_elections());
    let leader = c.leader();
    let follower = c.followers()[0];
    register(c.nodes[leader].url("").trim_end_matches('/'), id..id + 1).unwrap();
    (c, leader, follower)
}

#[test]
fn test_revoked_device_is_cut_off_everywhere_and_refused() {
    let (c, leader, follower) = three_nodes_with_device(700);
    let (on_leader, on_follower) = (device_addr(&c, leader), device_addr(&c, follower));

    // Two open sessions of the device, one per gateway, each with records acknowledged.
    let (mut a, hw) = hello(&on_leader, 700, &key_of(700)).expect("welcomed by the leader");
    assert_eq!(hw, 0);
    assert_eq!(a.batch(1), 3);
    let (mut b, hw) = hello(&on_follower, 700, &key_of(700)).expect("welcomed by a follower");
    assert_eq!(hw, 3);
    assert_eq!(b.batch(4), 6);

    // Revoked through a follower's API (the CLI; forwarded to the leader, one Raft entry).
    let started = Instant::now();
    let out = cli(&c, follower, &["revoke", "--id", "700"]);
    assert!(out.contains("revoked"), "{out}");
    let (ta, tb) = (a.closed_within(), b.closed_within());
    println!(
        "revoke: sessions closed {:?} (leader) and {:?} (follower) after the command returned, \
         {:?} after it started",
        ta,
        tb,
        started.elapsed()
    );
    for i in [leader, follower] {
        assert!(ingress(&c, i, "sessions_closed_key") >= 1, "node {i}");
    }

    // Every later Hello is refused, unsealed, on every gateway (the third applies the entry a
    // moment later); nothing more is stored.
    c.wait_converged();
    for i in 0..3 {
        let refused = hello(&device_addr(&c, i), 700, &key_of(700)).err();
        assert_eq!(
            refused,
            Some(Refused {
                kind: KIND_ERROR,
                unsealed: true
            }),
            "node {i}"
        );
        assert!(ingress(&c, i, "hellos_revoked") >= 1, "node {i}");
    }
    c.wait_converged();
    for i in 0..3 {
        assert_eq!(
            rows_of(&c, i, 700),
            6,
            "node {i}: acknowledged records kept"
        );
    }
    let d = device_json(&c, follower, 700);
    assert!(d["revoked_at_ms"].is_i64(), "{d}");
    assert_eq!(d["high_water"], 6);
    let metrics = c.nodes[leader]
        .client()
        .get(&c.nodes[leader].url("/metrics"));
    let text = metrics.body.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains("cairn_ingress_hellos_revoked_total")
            && text.contains("cairn_ingress_sessions_closed_key_total"),
        "{text}"
    );
    assert!(cli(&c, leader, &["list"]).contains("REVOKED"));

    // A new key lifts the revocation; the old one stays refused.
    let new_key = [0x77u8; 32];
    cli(
        &c,
        leader,
        &["rekey", "--id", "700", "--key", &hex(&new_key)],
    );
    // The follower applies the rekey a moment after the leader answered: a device retries.
    let (mut a, hw) = poll(TIMEOUT, "welcomed with the new key by a follower", || {
        hello(&on_follower, 700, &new_key).ok()
    });
    assert_eq!(hw, 6);
    assert_eq!(a.batch(7), 9);
    assert!(hello(&on_leader, 700, &key_of(700)).is_err());
    c.assert_identical();
}

#[test]
fn test_rekeyed_device_uses_its_new_key_and_the_old_one_only_in_the_grace_window() {
    let (c, leader, follower) = three_nodes_with_device(701);
    let (on_leader, on_follower) = (device_addr(&c, leader), device_addr(&c, follower));
    let old_key = key_of(701);
    let new_key = [0x42u8; 32];

    let (mut old, _) = hello(&on_follower, 701, &old_key).expect("welcomed");
    assert_eq!(old.batch(1), 3);
    let status = cli(&c, follower, &["rekey", "--id", "701", "--status"]);
    assert!(status.contains("never rekeyed"), "{status}");

    const GRACE_S: u64 = 15;
    let out = cli(
        &c,
        follower,
        &[
            "rekey",
            "--id",
            "701",
            "--key",
            &hex(&new_key),
            "--grace-secs",
            &GRACE_S.to_string(),
        ],
    );
    let rekeyed = Instant::now();
    assert!(out.contains("old key is accepted until"), "{out}");
    let d = device_json(&c, leader, 701);
    assert!(d["rekey"]["new_key_seen_ms"].is_null(), "{d}");

    // In the grace window: the old session goes on, the old key opens a session, the new
    // key too; the first new-key Hello is recorded (through the follower). Each Welcome opens
    // the device's next session and the one before it stores nothing more (format version 2,
    // SPEC §8 gateway rule 2), so each connection sends before the next one says Hello.
    assert_eq!(old.batch(4), 6);
    let (mut again, hw) = hello(&on_leader, 701, &old_key).expect("old key in the grace window");
    assert_eq!(hw, 6);
    assert!(ingress(&c, leader, "hellos_previous_key") >= 1);
    assert_eq!(again.batch(7), 9);
    let (mut new, hw) = poll(TIMEOUT, "new key welcomed by the follower", || {
        hello(&on_follower, 701, &new_key).ok()
    });
    assert_eq!(hw, 9);
    assert_eq!(new.batch(10), 12);
    assert!(
        rekeyed.elapsed() < Duration::from_secs(GRACE_S),
        "the machine was too slow to check the grace window ({:?})",
        rekeyed.elapsed()
    );
    let seen = poll(TIMEOUT, "the new key recorded as seen", || {
        let d = device_json(&c, follower, 701);
        d["rekey"]["new_key_seen_ms"].as_i64()
    });
    let status = cli(&c, leader, &["rekey", "--id", "701", "--status"]);
    assert!(status.contains("new key seen"), "{status}");
    println!("rekey: new key first seen at {seen} ms; {status}");

    // After the window: both old-key sessions are closed, the old key is refused, the new
    // session goes on.
    let (t1, t2) = (old.closed_within(), again.closed_within());
    println!("grace over: old-key sessions closed after {t1:?} and {t2:?}");
    for addr in [&on_leader, &on_follower] {
        assert!(
            hello(addr, 701, &old_key).is_err(),
            "{addr}: old key after the window"
        );
    }
    assert_eq!(new.batch(13), 15);
    let (mut back, hw) = hello(&on_leader, 701, &new_key).expect("new key after the window");
    assert_eq!(hw, 15);
    assert_eq!(back.batch(16), 18);
    c.wait_converged();
    for i in 0..3 {
        assert_eq!(rows_of(&c, i, 701), 18, "node {i}");
    }
    c.assert_identical();
}

/// Says a protocol 1 Hello as device `id`: the kind of the gateway's answer.
fn hello_v1(addr: &str, id: u64) -> u8 {
    let mut session = v1::DeviceSession::new(&key_of(id), 3, 0);
    let mut s = TcpStream::connect(addr).expect("connecting to the device port");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = [0u8; MAX_FRAME];
    let hello = session.hello(id, 1, 8);
    let n = session.encode_hello(&hello, &mut out).unwrap();
    s.write_all(&out[..n]).unwrap();
    let mut buf = [0u8; MAX_FRAME];
    read_frame(&mut s, &mut buf).expect("an answer to the Hello");
    buf[3]
}

#[test]
fn test_protocol_1_only_for_devices_registered_for_it() {
    const KIND_WELCOME: u8 = 2;
    let c = Cluster::start_with(
        1,
        Options {
            extra: vec!["--accept-protocol-1".into()],
            ..Default::default()
        },
    );
    assert!(
        c.nodes[0].log().contains("--accept-protocol-1"),
        "the migration flag is logged at start"
    );
    let addr = device_addr(&c, 0);
    register(c.nodes[0].url("").trim_end_matches('/'), 800..801).unwrap();
    let client = c.nodes[0].client();
    let r = client.post(
        &c.nodes[0].url("/devices"),
        &json!({"id": 801, "key": hex(&key_of(801)), "protocol": 1}),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Registered for 2 (the default): no downgrade even with the flag.
    assert_eq!(hello_v1(&addr, 800), KIND_ERROR);
    assert!(ingress(&c, 0, "hellos_v1_refused") >= 1);
    // Registered for 1: welcomed in protocol 1.
    assert_eq!(hello_v1(&addr, 801), KIND_WELCOME);
    assert_eq!(device_json(&c, 0, 801)["protocol"], 1);
    // Its first protocol 2 Hello moves it to 2 for good.
    let (mut conn, _) = hello(&addr, 801, &key_of(801)).expect("protocol 2 Hello");
    assert_eq!(conn.batch(1), 3);
    poll(TIMEOUT, "the device moved to protocol 2", || {
        (device_json(&c, 0, 801)["protocol"] == 2).then_some(())
    });
    assert_eq!(hello_v1(&addr, 801), KIND_ERROR);
}
