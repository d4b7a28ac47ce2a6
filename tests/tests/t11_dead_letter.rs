//! Schema errors never block a device and lose nothing (`dead_letter`, `on_mismatch`,
//! `cairn streams reload|replay`), end to end on three real nodes with a protocol-level
//! device whose outbox holds every record until it is acknowledged:
//!
//! - one record that does not fit stream 1, between good records on streams 1 and 2, sent
//!   just before a `kill -9` of the leader: every record is acknowledged, the bad one is in
//!   `dead_letter` exactly once with its reason, the others in their tables once, on every
//!   replica; counted in `/devices`, `/status` and `/metrics`, and logged;
//! - a stream with `on_mismatch = "reject"` still refuses the batch (`SchemaMismatch`);
//! - the config file fixed, then reloaded by SIGHUP on a follower (the others warn that their
//!   config differs) and `POST /streams/reload`; `cairn streams replay --stream 1` moves the
//!   row into `readings` under the same (device_id, seq).

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use cairn_protocol::{BatchEncoder, DeviceSession, ErrorCode, MAX_FRAME, Message, Record, Value};
use cairn_tests::device::{boot_nonce, hex, key_of, read_frame};
use cairn_tests::{Cluster, Options, SLOW_ELECTIONS, TIMEOUT, cairn_bin, get, poll, post};
use serde_json::{Value as Json, json};

/// Streams 1 (`readings`, with `stream1` as its columns), 2 and 3 (`on_mismatch = "reject"`).
fn config(stream1: &str) -> String {
    format!(
        r#"
[[stream]]
id = 1
table = "readings"
columns = {stream1}

[[stream]]
id = 2
table = "power"
columns = [{{ name = "watts", type = "real" }}]

[[stream]]
id = 3
table = "strict"
columns = [{{ name = "v", type = "integer" }}]
on_mismatch = "reject"
"#
    )
}

/// Stream 1 as first declared.
const K_TEMPERATURE: &str =
    r#"[{ name = "k", type = "integer" }, { name = "temperature", type = "real" }]"#;

/// Stream 1 after a firmware update that sends three reals: the fix.
const THREE_REALS: &str = r#"[{ name = "temperature", type = "real" }, { name = "humidity", type = "real" }, { name = "pressure", type = "real" }]"#;

const DEVICE: u64 = 7;
const STRICT_DEVICE: u64 = 8;
/// Records 1..=LAST, three to a batch; seq BAD does not fit stream 1.
const LAST: u64 = 12;
const BAD: u64 = 6;
const PER_BATCH: u64 = 3;

/// Device 7's record `seq`: odd seqs on stream 1 (`k`, temperature), even on stream 2
/// (watts), and seq [`BAD`] three reals on stream 1 (what the firmware README pushes).
fn record(seq: u64) -> (u16, Vec<Value<'static>>) {
    if seq == BAD {
        (
            1,
            vec![Value::F32(21.5), Value::F32(48.0), Value::F32(1013.0)],
        )
    } else if seq % 2 == 1 {
        (1, vec![Value::U64(seq), Value::F32(20.0)])
    } else {
        (2, vec![Value::F64(seq as f64 * 10.0)])
    }
}

/// A connection of a test device: its session lives across connections (the Hello counter).
struct Conn {
    stream: TcpStream,
    high_water: u64,
}

/// Hello, Welcome; `None` if the node refuses or cannot be reached.
fn connect(session: &mut DeviceSession, id: u64, addr: &str) -> Option<Conn> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut out = [0u8; MAX_FRAME];
    let n = session
        .encode(&Message::Hello(session.hello(id, 1, 16)), &mut out)
        .expect("encode Hello");
    stream.write_all(&out[..n]).ok()?;
    let mut inb = [0u8; MAX_FRAME];
    let n = read_frame(&mut stream, &mut inb).ok()?;
    match session.decode(&mut inb[..n]) {
        Ok(Message::Welcome(w)) => Some(Conn {
            stream,
            high_water: w.high_water,
        }),
        _ => None,
    }
}

/// Sends records `first..=last` (made by `make`) as one batch.
fn send(
    session: &mut DeviceSession,
    conn: &mut Conn,
    first: u64,
    last: u64,
    make: &dyn Fn(u64) -> (u16, Vec<Value<'static>>),
) -> bool {
    let mut body = [0u8; MAX_FRAME];
    let mut batch = BatchEncoder::new(&mut body, first, 100_000 + last);
    for seq in first..=last {
        let (stream, values) = make(seq);
        batch
            .push(&Record {
                stream,
                uptime_ms: 100_000 + seq,
                values: &values,
            })
            .expect("record fits a batch");
    }
    let view = batch.finish().expect("batch");
    let mut out = [0u8; MAX_FRAME];
    let n = session
        .encode(&Message::Batch(view), &mut out)
        .expect("encode Batch");
    conn.stream.write_all(&out[..n]).is_ok()
}

/// The next Ack's `through_seq`, or the Error code (Pings answered on the way).
fn answer(session: &mut DeviceSession, conn: &mut Conn) -> Option<Result<u64, ErrorCode>> {
    let mut inb = [0u8; MAX_FRAME];
    loop {
        let n = read_frame(&mut conn.stream, &mut inb).ok()?;
        match session.decode(&mut inb[..n]).ok()? {
            Message::Ack(a) => return Some(Ok(a.through_seq)),
            Message::Error(e) => return Some(Err(e.code)),
            Message::Ping(p) => {
                let mut out = [0u8; MAX_FRAME];
                let n = session
                    .encode(
                        &Message::Pong(cairn_protocol::Pong { nonce: p.nonce }),
                        &mut out,
                    )
                    .ok()?;
                conn.stream.write_all(&out[..n]).ok()?;
            }
            _ => return None,
        }
    }
}

fn register(c: &Cluster, id: u64) {
    let l = c.leader();
    let r = post(
        &c.nodes[l].url("/devices"),
        &json!({"id": id, "key": hex(&key_of(id))}),
    );
    assert_eq!(r.status, 200, "registering device {id}: {:?}", r.body);
}

/// Column 0 of every row, as u64.
fn col(c: &Cluster, i: usize, sql: &str) -> Vec<u64> {
    c.nodes[i]
        .rows(sql, "none")
        .iter()
        .map(|r| r[0].as_u64().unwrap_or_else(|| panic!("{sql}: {r:?}")))
        .collect()
}

fn seqs(c: &Cluster, i: usize, table: &str) -> Vec<u64> {
    col(
        c,
        i,
        &format!("SELECT seq FROM {table} WHERE device_id = {DEVICE} ORDER BY seq"),
    )
}

#[test]
fn test_mismatch_dead_lettered_across_leader_kill_then_replayed() {
    // Slow elections: after the SIGHUP only the reloaded nodes hold the new definitions, and
    // a new leader proposes its own once per term; the test picks who reloads by who leads.
    let mut c = Cluster::start_with(
        3,
        Options {
            config: Some(format!("{SLOW_ELECTIONS}{}", config(K_TEMPERATURE))),
            ..Options::default()
        },
    );
    register(&c, DEVICE);
    register(&c, STRICT_DEVICE);
    let l = c.leader();

    // on_mismatch = "reject": today's behaviour, the batch is refused and nothing stored.
    let mut strict = DeviceSession::new(&key_of(STRICT_DEVICE), 1, boot_nonce());
    let mut conn = connect(&mut strict, STRICT_DEVICE, &c.nodes[l].device).expect("Welcome");
    let good = |_| (3u16, vec![Value::I64(1)]);
    assert!(send(&mut strict, &mut conn, 1, 1, &good));
    assert_eq!(answer(&mut strict, &mut conn), Some(Ok(1)));
    let bad = |_| (3u16, vec![Value::F32(1.5)]);
    assert!(send(&mut strict, &mut conn, 2, 2, &bad));
    assert_eq!(
        answer(&mut strict, &mut conn),
        Some(Err(ErrorCode::SchemaMismatch))
    );
    drop(conn);

    // Device 7: the first batch acknowledged, the one holding the bad record sent to the
    // leader, which is killed before the device reads its answer.
    let mut session = DeviceSession::new(&key_of(DEVICE), 1, boot_nonce());
    let mut conn = connect(&mut session, DEVICE, &c.nodes[l].device).expect("Welcome");
    assert_eq!(conn.high_water, 0);
    assert!(send(&mut session, &mut conn, 1, PER_BATCH, &record));
    assert_eq!(answer(&mut session, &mut conn), Some(Ok(PER_BATCH)));
    assert!(send(
        &mut session,
        &mut conn,
        PER_BATCH + 1,
        2 * PER_BATCH,
        &record
    ));
    let old = c.nodes[l].id;
    c.kill9(l);
    drop(conn);

    // The outbox: resend from the high-water each Welcome names, until all is acknowledged.
    let mut acked = PER_BATCH;
    let mut rounds = 0;
    let mut first_welcome = None;
    poll(TIMEOUT, "every record of device 7 acknowledged", || {
        rounds += 1;
        let i = (0..c.nodes.len()).filter(|&i| i != l).nth(rounds % 2)?;
        let mut conn = connect(&mut session, DEVICE, &c.nodes[i].device)?;
        assert!(
            conn.high_water >= acked,
            "Welcome high-water {} below an acknowledged {acked}",
            conn.high_water
        );
        acked = conn.high_water;
        first_welcome.get_or_insert(acked);
        while acked < LAST {
            let last = (acked + PER_BATCH).min(LAST);
            if !send(&mut session, &mut conn, acked + 1, last, &record) {
                return None;
            }
            match answer(&mut session, &mut conn)? {
                Ok(through) => {
                    assert!(through >= acked, "Ack went back from {acked} to {through}");
                    acked = through;
                }
                Err(ErrorCode::NotLeader | ErrorCode::Overloaded) => return None,
                Err(code) => panic!("batch {}..={last} refused: {code:?}", acked + 1),
            }
        }
        Some(())
    });
    assert_eq!(acked, LAST);
    let new_leader = c.wait_for_new_leader(old);
    println!(
        "all {LAST} records acknowledged after {rounds} connection(s); new leader node {}; \
         the batch with the bad record was {} before the kill",
        c.nodes[new_leader].id,
        if first_welcome >= Some(2 * PER_BATCH) {
            "committed"
        } else {
            "not committed (sent again)"
        }
    );
    c.restart(l);
    c.assert_identical();

    // Every record once, in one table: the bad one in dead_letter with its reason.
    for i in 0..c.nodes.len() {
        let id = c.nodes[i].id;
        assert_eq!(seqs(&c, i, "readings"), [1, 3, 5, 7, 9, 11], "node {id}");
        assert_eq!(seqs(&c, i, "power"), [2, 4, 8, 10, 12], "node {id}");
        let dead = c.nodes[i].rows(
            "SELECT device_id, seq, stream, reason, \"values\" FROM dead_letter",
            "none",
        );
        assert_eq!(dead.len(), 1, "node {id}: {dead:?}");
        assert_eq!(dead[0][..3], [json!(DEVICE), json!(BAD), json!(1)]);
        let reason = dead[0][3].as_str().unwrap();
        assert!(
            reason.contains("expects (k integer, temperature real), received (f32, f32, f32)"),
            "node {id}: {reason}"
        );
        assert_eq!(dead[0][4], json!("[21.5,48,1013]"));
        assert_eq!(
            col(&c, i, "SELECT count(*) FROM strict"),
            [1],
            "node {id}: only the good strict record"
        );
        assert_eq!(
            col(
                &c,
                i,
                "SELECT count(*) FROM dead_letter WHERE device_id = 8"
            ),
            [0]
        );
    }
    // Counted per device and stream: the table in /devices, this process's applies in
    // /status and /metrics (nodes that ran throughout applied it exactly once).
    let devices = get(&c.nodes[c.followers()[0]].url("/devices")).body;
    let d7 = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == DEVICE)
        .unwrap()
        .clone();
    assert_eq!(d7["high_water"], LAST);
    assert_eq!(d7["dead_letter"], json!({"1": 1}));
    for i in (0..c.nodes.len()).filter(|&i| i != l) {
        let status = c.nodes[i].status().unwrap();
        assert_eq!(
            status["ingress"]["dead_lettered"],
            json!([{"device_id": DEVICE, "stream": 1, "records": 1}]),
            "node {}",
            c.nodes[i].id
        );
        let metrics = get(&c.nodes[i].url("/metrics")).body;
        let metrics = metrics.as_str().unwrap_or_default();
        assert!(
            metrics.contains(&format!(
                "cairn_ingress_dead_lettered_total{{node_id=\"{}\",device_id=\"7\",stream=\"1\"}} 1",
                c.nodes[i].id
            )),
            "{metrics}"
        );
        let log = c.nodes[i].log();
        assert!(
            log.contains("stored in dead_letter") && log.contains("received (f32, f32, f32)"),
            "node {} logged no dead-letter warning",
            c.nodes[i].id
        );
        assert!(log.contains("batch refused with SchemaMismatch"));
    }

    // Fixed config: a follower reloads it on SIGHUP and the leader applies it; the nodes
    // that have not reloaded yet warn that theirs differs.
    std::fs::write(c.dir().join("cairn.toml"), config(THREE_REALS)).unwrap();
    let leader = c.leader();
    let f = c.followers()[0];
    // SAFETY: plain kill(2) on a child the harness owns.
    unsafe { libc::kill(c.nodes[f].pid().unwrap() as i32, libc::SIGHUP) };
    poll(TIMEOUT, "the reloaded definitions replicated", || {
        let s = get(&c.nodes[leader].url("/streams")).body;
        (s["replicated"]["streams"][0]["columns"].as_array()?.len() == 3).then_some(())
    });
    poll(
        TIMEOUT,
        "the leader to warn that its config differs",
        || {
            c.nodes[leader]
                .log()
                .contains("differs from the replicated stream definitions")
                .then_some(())
        },
    );
    for i in 0..c.nodes.len() {
        let r = post(&c.nodes[i].url("/streams/reload"), &json!({}));
        assert_eq!(
            r.status, 200,
            "reload on node {}: {:?}",
            c.nodes[i].id, r.body
        );
        assert_eq!(r.body["streams"], 3);
    }

    // Replay through a follower (forwarded to the leader): the row moves, once.
    let replay = |host: &str, device: Option<u64>| -> String {
        let mut cmd = std::process::Command::new(cairn_bin());
        cmd.args(["streams", "replay", "--stream", "1", "--host", host]);
        if let Some(d) = device {
            cmd.args(["--device", &d.to_string()]);
        }
        let out = cmd.output().expect("running cairn streams replay");
        assert!(
            out.status.success(),
            "cairn streams replay: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let host = c.nodes[c.followers()[0]].url("");
    let out = replay(&host, Some(STRICT_DEVICE));
    assert!(out.contains("0 row(s) moved"), "{out}");
    let out = replay(&host, None);
    assert!(
        out.contains("1 row(s) moved from dead_letter, 0 still"),
        "{out}"
    );
    let out = replay(&host, None);
    assert!(out.contains("0 row(s) moved"), "{out}");
    c.assert_identical();
    for i in 0..c.nodes.len() {
        let id = c.nodes[i].id;
        assert_eq!(seqs(&c, i, "readings"), [1, 3, 5, 6, 7, 9, 11], "node {id}");
        assert_eq!(col(&c, i, "SELECT count(*) FROM dead_letter"), [0]);
        let row: Vec<Json> = c.nodes[i].rows(
            &format!(
                "SELECT k, temperature, pressure FROM readings WHERE device_id = {DEVICE} \
                 AND seq = {BAD}"
            ),
            "none",
        )[0]
        .clone();
        // Floats are written as rqlite (Go's encoding/json) writes them: 1013.0 as `1013`.
        assert_eq!(row, [Json::Null, json!(21.5), json!(1013)], "node {id}");
    }
}
