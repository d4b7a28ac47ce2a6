//! Consecutive device entries share one SQLite transaction when applied together
//! (`raft::state_machine`, each entry in its own savepoint): what is stored must be exactly
//! what applying them one call at a time stores, down to the database file's bytes, and a
//! replica must not depend on how openraft happened to batch its apply calls.

use std::path::Path;

use cairn_gateway::command::Command;
use cairn_gateway::command::device::DeviceBatch;
use cairn_gateway::raft::state_machine::StateMachine;
use cairn_gateway::raft::{Entry, TypeConfig};
use cairn_protocol::{BatchEncoder, MAX_FRAME, Record, Value};
use openraft::EntryPayload;
use openraft::storage::RaftStateMachine;

type Payload = openraft::alias::EntryPayloadOf<TypeConfig>;

fn entry(index: u64, payload: Payload) -> Entry {
    Entry {
        log_id: openraft::testing::log_id::<TypeConfig>(1, 1, index),
        payload,
    }
}

/// 40 entries: device groups (both kinds, a resend, a gap, a session without one opened)
/// around a blank entry and a SQL entry, stamped or not.
fn entries() -> Vec<Entry> {
    let mut out = Vec::new();
    let mut next = [1u64; 6];
    for index in 1..=40u64 {
        let payload = match index {
            13 => EntryPayload::Blank,
            27 => EntryPayload::Normal(Command::Sql(cairn_gateway::command::sql::SqlCommand {
                statements: vec![cairn_gateway::db::sql::Statement::new(
                    "CREATE TABLE IF NOT EXISTS notes(n INTEGER)",
                )],
                transaction: false,
            })),
            _ => {
                let mut batches = Vec::new();
                for d in 0..6u64 {
                    if (index + d) % 3 == 0 {
                        continue;
                    }
                    // Device 5 repeats its previous batch every fourth entry (a resend).
                    let first = if d == 5 && index % 4 == 0 && next[5] > 3 {
                        next[5] - 3
                    } else {
                        next[d as usize]
                    };
                    let mut body = [0u8; MAX_FRAME];
                    let mut enc = BatchEncoder::new(&mut body, first, 50_000 + index * 100);
                    for k in 0..3u64 {
                        let v = [Value::F32((index * 10 + k) as f32 / 4.0), Value::U64(d)];
                        enc.push(&Record {
                            stream: 1 + (d % 2) as u16,
                            uptime_ms: 49_000 + index * 100 + k,
                            values: &v,
                        })
                        .unwrap();
                    }
                    next[d as usize] = next[d as usize].max(first + 3);
                    batches.push(DeviceBatch {
                        device_id: 100 + d,
                        received_at_ms: 1_795_632_240_000 + index as i64 * 7,
                        body: enc.finish().unwrap().as_bytes().to_vec(),
                        session: 0,
                    });
                }
                let cmd = if index % 2 == 0 {
                    Command::SessionBatches {
                        sessions: vec![0; batches.len()],
                        batches,
                    }
                } else {
                    Command::DeviceBatches(batches)
                };
                let cmd = if index % 5 == 0 {
                    cmd.stamped(1_795_632_240_000 + index as i64)
                } else {
                    cmd
                };
                EntryPayload::Normal(cmd)
            }
        };
        out.push(entry(index, payload));
    }
    out
}

/// Applies `entries` in calls of `per_call` entries; returns the database file's bytes after
/// a full checkpoint and each table's rows as text.
async fn apply_in_calls(dir: &Path, entries: &[Entry], per_call: usize) -> (Vec<u8>, String) {
    let mut sm = StateMachine::open(dir, Default::default()).unwrap();
    for chunk in entries.chunks(per_call) {
        let items: Vec<_> = chunk.iter().cloned().map(|e| Ok((e, None))).collect();
        sm.apply(futures_util::stream::iter(items)).await.unwrap();
    }
    assert_eq!(sm.applied_log_id().map(|l| l.index), Some(40));
    drop(sm);
    let db = dir.join("db.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut text = String::new();
    for t in tables {
        let cols: Vec<String> = conn
            .prepare("SELECT 'quote(\"' || name || '\")' FROM pragma_table_info(?1)")
            .unwrap()
            .query_map([&t], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let sql = format!(
            "SELECT json_array({}) AS r FROM \"{t}\" ORDER BY r",
            cols.join(", ")
        );
        let rows: Vec<String> = conn
            .prepare(&sql)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        text.push_str(&format!("{t}: {rows:?}\n"));
    }
    drop(conn);
    (std::fs::read(&db).unwrap(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_grouped_apply_stores_what_one_by_one_does() {
    let entries = entries();
    let one = tempfile::tempdir().unwrap();
    let all = tempfile::tempdir().unwrap();
    let some = tempfile::tempdir().unwrap();
    let (one_file, one_rows) = apply_in_calls(one.path(), &entries, 1).await;
    let (all_file, all_rows) = apply_in_calls(all.path(), &entries, 40).await;
    let (some_file, some_rows) = apply_in_calls(some.path(), &entries, 7).await;
    for want in [
        r#"_cairn_high_water: ["[\"100\",\"78\"]""#,
        r#"telemetry: ["[\"100\",\"1\","#,
        "notes: []",
    ] {
        assert!(one_rows.contains(want), "{want} not in {one_rows}");
    }
    assert_eq!(one_rows, all_rows);
    assert_eq!(one_rows, some_rows);
    assert!(one_file == all_file, "the database files differ");
    assert!(one_file == some_file, "the database files differ");
}
