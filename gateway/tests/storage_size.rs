//! Bytes on disk per device record in the replicated database, through the real apply path
//! (the state machine applying `DeviceBatches` entries as a leader groups them).
//!
//! A measurement, not a check of speed: run it by hand,
//! `CAIRN_SIZE_RECORDS=300000 cargo test -p cairn-gateway --test storage_size -- --ignored --nocapture`.
//! It prints the size of `sm/db.sqlite` per record for the bench's values (three `f32`s:
//! 21.5 + k·0.1, 48.25, 1013.0) and for random `f32`s.

use std::path::Path;

use cairn_gateway::command::Command;
use cairn_gateway::command::device::DeviceBatch;
use cairn_gateway::command::streams::StreamsCommand;
use cairn_gateway::db::schema::{Column, ColumnType, OnMismatch, Schema, StreamDef, Undeclared};
use cairn_gateway::raft::state_machine::StateMachine;
use cairn_gateway::raft::{Entry, TypeConfig};
use cairn_protocol::{BatchEncoder, MAX_FRAME, Record, Value};
use openraft::EntryPayload;
use openraft::storage::RaftStateMachine;

const DEVICES: u64 = 200;
/// Records per device batch and batches per entry, about what the bench's fleet sends.
const PER_BATCH: u64 = 25;
const BATCHES_PER_ENTRY: u64 = 20;

fn schema() -> Schema {
    let col = |name: &str| Column {
        name: name.into(),
        ty: ColumnType::Real,
    };
    Schema {
        streams: vec![StreamDef {
            id: 7,
            table: "climate".into(),
            columns: vec![col("temperature"), col("humidity"), col("pressure")],
            on_mismatch: OnMismatch::default(),
        }],
        undeclared: Undeclared::Telemetry,
    }
}

fn entry(index: u64, cmd: Command) -> Entry {
    Entry {
        log_id: openraft::testing::log_id::<TypeConfig>(1, 1, index),
        payload: EntryPayload::Normal(cmd),
    }
}

/// A tiny deterministic generator (xorshift), so runs compare.
struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 100_000) as f32 / 997.0 - 40.0
    }
}

/// The first column of the first row.
fn one<T: rusqlite::types::FromSql>(conn: &rusqlite::Connection, sql: &str) -> T {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Applies `records` records of stream `stream` and returns the bytes of the database file
/// after a checkpoint, and of the WAL before it.
async fn fill(dir: &Path, records: u64, stream: u16, random: bool) -> (u64, u64) {
    let mut sm = StateMachine::open(dir, Default::default()).unwrap();
    let mut index = 1;
    let define = entry(index, Command::Streams(StreamsCommand::Define(schema())));
    sm.apply(futures_util::stream::iter([Ok((define, None))]))
        .await
        .unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut next_seq = vec![1u64; DEVICES as usize];
    let mut sent = 0u64;
    let mut device = 0u64;
    while sent < records {
        let mut batches = Vec::new();
        for _ in 0..BATCHES_PER_ENTRY {
            let d = device % DEVICES;
            device += 1;
            let first = next_seq[d as usize];
            let mut body = [0u8; MAX_FRAME];
            let mut enc =
                BatchEncoder::new(&mut body, first, 1_000_050 + (first + PER_BATCH) * 200);
            for i in 0..PER_BATCH {
                let k = first + i;
                let values = if random {
                    [
                        Value::F32(rng.f32()),
                        Value::F32(rng.f32()),
                        Value::F32(rng.f32()),
                    ]
                } else {
                    [
                        Value::F32(21.5 + (k % 10) as f32 * 0.1),
                        Value::F32(48.25),
                        Value::F32(1013.0),
                    ]
                };
                enc.push(&Record {
                    stream,
                    uptime_ms: 1_000_000 + k * 200,
                    values: &values,
                })
                .unwrap();
            }
            let view = enc.finish().unwrap();
            batches.push(DeviceBatch {
                device_id: 1000 + d,
                received_at_ms: 1_795_632_240_000 + (index as i64) * 5,
                body: view.as_bytes().to_vec(),
                session: 0,
            });
            next_seq[d as usize] += PER_BATCH;
            sent += PER_BATCH;
        }
        index += 1;
        let e = entry(index, Command::DeviceBatches(batches));
        sm.apply(futures_util::stream::iter([Ok((e, None))]))
            .await
            .unwrap();
    }
    let db = dir.join("db.sqlite");
    let wal = std::fs::metadata(dir.join("db.sqlite-wal")).map_or(0, |m| m.len());
    let table = if stream == 7 { "climate" } else { "telemetry" };
    let conn = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = one(&conn, &format!("SELECT count(*) FROM {table}"));
    assert_eq!(n as u64, sent);
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let sample: String = one(
        &conn,
        &format!(
            "SELECT json_group_array(json_array(time, received_at)) \
             FROM (SELECT * FROM {table} LIMIT 1)"
        ),
    );
    let (payload, pages, unused): (i64, i64, i64) = conn
        .query_row(
            "SELECT sum(payload), sum(pgsize), sum(unused) FROM dbstat WHERE name = ?1",
            [table],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    println!(
        "{table}: first row's times {sample}; b-tree {:.1} B/record of pages, {:.1} of payload, {:.0}% unused",
        pages as f64 / n as f64,
        payload as f64 / n as f64,
        100.0 * unused as f64 / pages as f64
    );
    let size = std::fs::metadata(&db).unwrap().len();
    // What an optional secondary index for time ranges across devices would add.
    conn.execute_batch(&format!(
        "CREATE INDEX {table}_time ON {table}(time_ms, device_id)"
    ))
    .unwrap();
    let index: i64 = one(
        &conn,
        &format!("SELECT sum(pgsize) FROM dbstat WHERE name = '{table}_time'"),
    );
    println!(
        "{table}: an index on (time_ms, device_id) would add {:.1} B/record",
        index as f64 / n as f64
    );
    drop(sm);
    (size, wal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; see the module doc"]
async fn test_bytes_per_record() {
    let records: u64 = std::env::var("CAIRN_SIZE_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300_000);
    println!("records: {records}");
    for (name, stream, random) in [
        ("climate, bench values", 7, false),
        ("climate, random f32", 7, true),
        ("telemetry JSON, bench values", 9, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let (db, wal) = fill(dir.path(), records, stream, random).await;
        println!(
            "{name:30} db.sqlite {:6.1} B/record ({db} B), WAL before checkpoint {wal} B, {:.1?}",
            db as f64 / records as f64,
            started.elapsed()
        );
    }
}
