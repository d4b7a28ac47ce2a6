//! Device ingress end to end: `cairn sim` (a fleet running the real `cairn-firmware` client)
//! against a three-node cluster of real `cairn node` processes.
//!
//! Every simulated device pushes records `[U64(k), F32(t)]` with `k = 1, 2, 3, ...`, so the
//! database can be checked by content: a record stored twice under two seqs would show up as a
//! repeated `k`.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use cairn_tests::device::{
    READINGS_CONFIG, fleet_command, hex, read_frame, read_report, sim_command, sim_summary,
};
use cairn_tests::{Cluster, Options, SLOW_ELECTIONS, Security, TIMEOUT, cairn_bin, poll};

fn cluster() -> Cluster {
    cluster_with(None)
}

fn cluster_with(security: Option<Security>) -> Cluster {
    Cluster::start_with(
        3,
        Options {
            config: Some(READINGS_CONFIG.into()),
            security,
            ..Options::default()
        },
    )
}

/// Per device: (stored rows, distinct k, min k, max k) on one replica, read locally.
fn stored(c: &Cluster, i: usize) -> std::collections::BTreeMap<u64, (u64, u64, u64, u64)> {
    c.nodes[i]
        .rows(
            "SELECT device_id, count(*), count(DISTINCT k), min(k), max(k) FROM readings \
             GROUP BY device_id",
            "none",
        )
        .into_iter()
        .map(|r| {
            let v: Vec<u64> = r.iter().map(|x| x.as_u64().expect("integer")).collect();
            (v[0], (v[1], v[2], v[3], v[4]))
        })
        .collect()
}

#[test]
fn test_kill9_leader_while_100_devices_stream_every_acked_record_stored_once() {
    kill9_leader_while_100_devices_stream(None);
}

/// The same with `--auth`, HTTPS and node mutual TLS on every node: forwarded groups, key
/// and high-water lookups and Raft all run over mutual TLS; `cairn sim` registers its
/// devices with credentials over HTTPS.
#[test]
fn test_kill9_leader_with_tls_and_auth_every_acked_record_stored_once() {
    kill9_leader_while_100_devices_stream(Some(Security::full()));
}

fn kill9_leader_while_100_devices_stream(security: Option<Security>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut c = cluster_with(security);
    let leader = c.leader();
    let report = dir.path().join("report.jsonl");
    let sim = fleet_command(&c, leader, &report)
        .args(["--devices", "100", "--rate", "20", "--duration", "12"])
        .args(["--drain", "60", "--first-id", "1000"])
        .spawn()
        .expect("spawning cairn sim");

    // Kill the leader once records flow.
    poll(TIMEOUT, "device records to be applied", || {
        (c.nodes[leader].records_applied() >= 2000).then_some(())
    });
    let old_id = c.nodes[leader].id;
    c.kill9(leader);
    let new = c.wait_for_new_leader(old_id);
    let before = c.nodes[new].records_applied();
    poll(TIMEOUT, "records applied under the new leader", || {
        (c.nodes[new].records_applied() > before + 1000).then_some(())
    });
    c.restart(leader);

    let out = sim.wait_with_output().expect("cairn sim");
    assert!(out.status.success(), "cairn sim failed");
    let summary = sim_summary(&out.stdout).expect("JSON summary");
    println!("cairn sim: {summary}");
    assert_eq!(summary["devices"], 100);
    assert!(summary["pushed"].as_u64().unwrap() >= 100 * 20 * 10);

    // Devices: nothing lost on their side; whatever is not acked is still in their outbox.
    let devices = read_report(&report);
    assert_eq!(devices.len(), 100);
    for d in &devices {
        let f = |k: &str| d[k].as_u64().expect(k);
        assert_eq!(f("dropped"), 0, "{d}");
        assert_eq!(f("acked") + f("queued"), f("pushed"), "{d}");
    }

    // Every replica, the restarted old leader included: each device's records are stored
    // exactly once, k = 1..=n without holes or repeats, and n covers everything acked.
    let sum = c.assert_identical();
    println!("replicas identical (checksum {sum:x})");
    for i in 0..c.nodes.len() {
        let rows = stored(&c, i);
        for d in &devices {
            let id = d["device_id"].as_u64().unwrap();
            let acked_through = d["acked_through"].as_u64().unwrap();
            let (n, distinct, min, max) = rows.get(&id).copied().unwrap_or((0, 0, 0, 0));
            assert_eq!(
                n, distinct,
                "device {id}: a record stored twice on node {i}"
            );
            if n > 0 {
                assert_eq!((min, max), (1, n), "device {id}: holes on node {i}");
            }
            assert!(
                n >= acked_through,
                "device {id}: acked through {acked_through}, node {i} holds {n}"
            );
        }
    }
}

#[test]
fn test_devices_on_followers_are_forwarded_to_the_leader() {
    let c = cluster();
    let leader = c.leader();
    let followers = c.followers();
    let gateways: Vec<String> = followers
        .iter()
        .map(|&i| c.nodes[i].device_addr())
        .collect();
    let gateways: Vec<&str> = gateways.iter().map(String::as_str).collect();
    // Only followers in the list: every batch must be forwarded to reach the leader.
    let out = sim_command(&cairn_bin(), &gateways, &c.nodes[followers[0]].url(""))
        .args(["--devices", "4", "--rate", "50", "--duration", "3"])
        .args(["--drain", "30", "--json", "--quiet", "--first-id", "50"])
        .output()
        .expect("cairn sim");
    assert!(out.status.success());
    let summary = sim_summary(&out.stdout).expect("JSON summary");
    assert_eq!(summary["acked"], summary["pushed"], "{summary}");
    assert!(summary["acked"].as_u64().unwrap() >= 4 * 50 * 2);
    let forwarded: u64 = followers
        .iter()
        .map(|&i| {
            c.nodes[i].status().unwrap()["ingress"]["batches_forwarded"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(forwarded > 0, "no batch was forwarded");
    // Summed over every node: the counter lives in the process that led when a batch came.
    let received: u64 = (0..3)
        .map(|i| {
            c.nodes[i].status().unwrap()["ingress"]["batches_received_forwarded"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(received > 0, "no forwarded batch was received");
    c.assert_identical();
    let rows = c.nodes[leader].rows(
        "SELECT count(*), count(DISTINCT device_id || ':' || k) FROM readings",
        "none",
    );
    assert_eq!(rows[0][0], rows[0][1], "a record stored twice");
    assert_eq!(rows[0][0], summary["acked"]);
    // A new cluster activates format version 2 before its stream tables are created, so they
    // compute `time` with version 2's expression; it reads as the UTC text of `time_ms`.
    let ddl = c.nodes[leader].rows(
        "SELECT sql FROM sqlite_master WHERE name = 'readings'",
        "none",
    );
    let ddl = ddl[0][0].as_str().unwrap_or_default();
    assert!(ddl.contains("'subsec'"), "readings: {ddl}");
    let times = c.nodes[leader].rows(
        "SELECT time, strftime('%Y-%m-%dT%H:%M:%fZ', time_ms / 1000.0, 'unixepoch') \
         FROM readings LIMIT 5",
        "none",
    );
    for t in &times {
        assert_eq!(t[0], t[1], "time as version 1 showed it");
    }
    poll(Duration::from_secs(5), "device list", || {
        let list = cairn_tests::get(&c.nodes[followers[1]].url("/devices"));
        (list.body["devices"].as_array()?.len() == 4).then_some(())
    });
}

/// Reads one gateway frame and decodes it with the device's session.
fn recv(stream: &mut TcpStream, session: &mut cairn_protocol::DeviceSession) -> String {
    let mut buf = [0u8; cairn_protocol::MAX_FRAME];
    let len = read_frame(stream, &mut buf).expect("a gateway frame");
    format!(
        "{:?}",
        session
            .decode(&mut buf[..len])
            .expect("a valid gateway frame")
    )
}

#[test]
fn test_follower_welcome_and_ack_carry_the_leader_device_address() {
    // The hints are compared with the leader read before: elections slow enough that a
    // loaded machine alone does not move it.
    let c = Cluster::start_with(
        3,
        Options {
            config: Some(format!("{SLOW_ELECTIONS}{READINGS_CONFIG}")),
            ..Options::default()
        },
    );
    let key = [0x42u8; 32];
    let hex = hex(&key);
    // Registered through a follower (forwarded); retried while a leader settles.
    poll(TIMEOUT, "the device to be registered", || {
        let r = cairn_tests::post(
            &c.nodes[c.followers()[0]].url("/devices"),
            &serde_json::json!({"id": 77, "key": hex}),
        );
        (r.status == 200).then_some(())
    });
    let leader = c.leader();
    let follower = c.followers()[0];
    let addr = |i: usize| c.nodes[i].device_addr();
    let leader_addr: std::net::SocketAddrV4 = addr(leader).parse().unwrap();
    let hint = format!("{:?}", Some(cairn_protocol::GatewayAddr::from(leader_addr)));

    let (mut stream, mut session, welcome) = hello(&c, follower, 77, &key, 9);
    assert!(
        welcome.starts_with("Welcome(Welcome { high_water: 0, leader: "),
        "{welcome}"
    );
    assert!(
        welcome.contains(&hint),
        "{welcome} lacks the leader hint {hint}"
    );
    let ack = push(&mut stream, &mut session, 1, &[1, 2, 3]);
    assert!(ack.starts_with("Ack(Ack { through_seq: 3,"), "{ack}");
    assert!(ack.contains(&hint), "{ack} lacks the leader hint {hint}");
}

/// A boot nonce from the operating system's RNG (SPEC.md §5.2).
fn rand_boot_nonce() -> [u8; cairn_protocol::BOOT_NONCE_LEN] {
    cairn_tests::device::boot_nonce()
}

/// Connects to node `i` as device `id` (boot `boot`) and returns the stream, the session and
/// the Welcome as text.
fn hello(
    c: &Cluster,
    i: usize,
    id: u64,
    key: &[u8; 32],
    boot: u32,
) -> (TcpStream, cairn_protocol::DeviceSession, String) {
    use cairn_protocol::{DeviceSession, MAX_FRAME, Message};
    let mut stream = TcpStream::connect(c.nodes[i].device_addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut session = DeviceSession::new(key, boot, rand_boot_nonce());
    let mut frame = [0u8; MAX_FRAME];
    let n = session
        .encode(&Message::Hello(session.hello(id, 1, 8)), &mut frame)
        .unwrap();
    stream.write_all(&frame[..n]).unwrap();
    let welcome = recv(&mut stream, &mut session);
    (stream, session, welcome)
}

/// Sends records `[U64(k), F32(1.0)]` for `ks` with seqs from `first_seq`; the answer as text.
fn push(
    stream: &mut TcpStream,
    session: &mut cairn_protocol::DeviceSession,
    first_seq: u64,
    ks: &[u64],
) -> String {
    use cairn_protocol::{BatchEncoder, MAX_FRAME, Message, Record, Value};
    let mut body = [0u8; MAX_FRAME];
    let mut enc = BatchEncoder::new(&mut body, first_seq, 1000);
    for &k in ks {
        let v = [Value::U64(k), Value::F32(1.0)];
        enc.push(&Record {
            stream: 1,
            uptime_ms: 900,
            values: &v,
        })
        .unwrap();
    }
    let mut frame = [0u8; MAX_FRAME];
    let n = session
        .encode(&Message::Batch(enc.finish().unwrap()), &mut frame)
        .unwrap();
    stream.write_all(&frame[..n]).unwrap();
    recv(stream, session)
}

/// SPEC §8 gateway rule 2 across connections: a device that lost power while a gateway still
/// held its last batch (a forward on its way to the leader) reconnects elsewhere, is welcomed
/// with the high-water before that batch and sends new records under the same seqs. The old
/// connection's batch, arriving after that Welcome, must not take those seqs (the new records
/// would be acknowledged as duplicates and lost): it is refused, its connection closed, and
/// the new connection's records are the ones stored.
#[test]
fn test_batch_of_a_replaced_connection_is_not_stored() {
    let c = cluster();
    let key = [0x43u8; 32];
    poll(TIMEOUT, "the device to be registered", || {
        let r = cairn_tests::post(
            &c.nodes[c.leader()].url("/devices"),
            &serde_json::json!({"id": 78, "key": hex(&key)}),
        );
        (r.status == 200).then_some(())
    });
    // Sessions need cluster format version 2, active a second or so after a new cluster forms.
    poll(TIMEOUT, "format version 2 active on every node", || {
        (0..3)
            .all(|i| {
                c.nodes[i]
                    .status()
                    .is_some_and(|s| s["format"]["active"] == 2)
            })
            .then_some(())
    });
    let (leader, follower) = (c.leader(), c.followers()[0]);
    let (mut old, mut old_session, welcome) = hello(&c, follower, 78, &key, 1);
    assert!(welcome.contains("high_water: 0"), "{welcome}");
    // The device again, after a reboot that lost its RAM outbox, on another gateway.
    let (mut new, mut new_session, welcome) = hello(&c, leader, 78, &key, 2);
    assert!(welcome.contains("high_water: 0"), "{welcome}");

    let late = push(&mut old, &mut old_session, 1, &[101, 102, 103]);
    assert!(late.starts_with("Error(Error { code: Internal"), "{late}");
    let ack = push(&mut new, &mut new_session, 1, &[201, 202, 203]);
    assert!(ack.starts_with("Ack(Ack { through_seq: 3,"), "{ack}");
    let ks: Vec<u64> = c.nodes[leader]
        .rows(
            "SELECT k FROM readings WHERE device_id = 78 ORDER BY seq",
            "linearizable", // whoever leads now has applied the acknowledged batch
        )
        .into_iter()
        .map(|r| r[0].as_u64().expect("integer k"))
        .collect();
    assert_eq!(
        ks,
        [201, 202, 203],
        "the new connection's records under seqs 1..=3"
    );
}
