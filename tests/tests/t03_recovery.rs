//! Restarted nodes catch up: from the log, or by snapshot once the log was purged.

use cairn_tests::{Cluster, Options, TIMEOUT, poll, stmts};
use serde_json::json;

fn insert_many(c: &Cluster, from: u64, n: u64) {
    for i in from..from + n {
        c.execute(&json!([[
            "INSERT INTO kv(k, v) VALUES(?, ?)",
            i,
            format!("value {i}")
        ]]));
    }
}

#[test]
fn test_restarted_node_catches_up_from_log() {
    let mut c = Cluster::start(3);
    c.execute(&stmts(&["CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)"]));
    insert_many(&c, 0, 10);
    let f = c.followers()[0];
    c.kill9(f);
    insert_many(&c, 10, 30);
    c.restart(f);
    c.wait_converged();
    let rows = c.nodes[f].rows("SELECT count(*) FROM kv", "none");
    assert_eq!(rows[0][0], json!(40));
    c.assert_identical();
}

#[test]
fn test_node_with_purged_log_catches_up_by_snapshot() {
    let mut c = Cluster::start_with(3, Options::snapshot_often(20, 5));
    c.execute(&stmts(&["CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)"]));
    let f = c.followers()[0];
    let behind = c.nodes[f].applied_index().expect("follower status");
    c.kill9(f);
    insert_many(&c, 0, 120);
    let l = c.leader();
    // The leader snapshotted and purged past everything the stopped follower has.
    let purged = poll(TIMEOUT, "the leader to purge its log", || {
        let p = c.nodes[l].status()?["raft"]["purged_index"].as_u64()?;
        (p > behind).then_some(p)
    });
    println!("follower stopped at {behind}, leader purged through {purged}");
    c.restart(f);
    c.wait_converged();
    let s = c.nodes[f].status().unwrap();
    let snap = s["raft"]["snapshot_index"]
        .as_u64()
        .expect("follower installed a snapshot");
    assert!(snap > behind, "snapshot {snap} should be past {behind}");
    let rows = c.nodes[f].rows("SELECT count(*) FROM kv", "none");
    assert_eq!(rows[0][0], json!(120));
    c.assert_identical();

    // After the snapshot the follower keeps applying new entries from the log.
    insert_many(&c, 120, 5);
    c.wait_converged();
    assert_eq!(
        c.nodes[f].rows("SELECT count(*) FROM kv", "none")[0][0],
        json!(125)
    );
    c.assert_identical();
}

/// Bytes of the pages in use in the SQLite file at `path` (read-only, beside the node's writer).
fn log_pages_in_use(path: &std::path::Path) -> u64 {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("opening raft.db read-only");
    conn.query_row(
        "SELECT (p.page_count - f.freelist_count) * s.page_size \
         FROM pragma_page_count p, pragma_freelist_count f, pragma_page_size s",
        [],
        |r| r.get::<_, i64>(0),
    )
    .expect("raft.db page counts") as u64
}

/// Bytes of a file (0 when it does not exist).
fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The Raft log is bounded in bytes, not only in entries: with `--snapshot-log-mib 1` and the
/// default entry counts (a snapshot after 8,192 entries, 1,024 kept behind it), 40 MiB of
/// 200 KiB entries leave at most a few MiB of every node's `raft.db` in use, where the entry
/// counts alone would keep all 200 entries (40 MiB). A follower stopped meanwhile catches up by snapshot, and the
/// serving node's WAL, which grew while the snapshot's read transaction was open, is cut back.
#[test]
fn test_raft_log_bounded_in_bytes() {
    let mut c = Cluster::start_with(
        3,
        Options {
            extra: vec!["--snapshot-log-mib".into(), "1".into()],
            ..Options::default()
        },
    );
    c.execute(&stmts(&[
        "CREATE TABLE big (k INTEGER PRIMARY KEY, v BLOB)",
    ]));
    let f = c.followers()[0];
    c.kill9(f);
    // 200 entries of ten 10 KiB blobs written as hex literals (20 KiB of SQL each).
    let hex: String = (0..10 * 1024).map(|i| format!("{:02x}", i % 251)).collect();
    for e in 0..200u64 {
        let batch: Vec<String> = (0..10u64)
            .map(|i| format!("INSERT INTO big(k, v) VALUES({}, x'{hex}')", e * 10 + i))
            .collect();
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        c.execute(&stmts(&refs));
    }
    c.restart(f);
    c.wait_converged();
    let snap = c.nodes[f].status().unwrap()["raft"]["snapshot_index"].as_u64();
    assert!(snap.is_some(), "the stopped follower caught up by snapshot");
    assert_eq!(
        c.nodes[f].rows("SELECT count(*) FROM big", "none")[0][0],
        json!(2000)
    );
    c.assert_identical();
    for n in &c.nodes {
        // Pages in use (purged pages stay in the file for later appends, so the file's size
        // also depends on how fast the entries came between two size checks).
        let path = n.dir.join("raft.db");
        let used = poll(
            TIMEOUT,
            "the Raft log to be purged down to its size",
            || {
                let used = log_pages_in_use(&path);
                (used <= 4 << 20).then_some(used)
            },
        );
        println!(
            "node {}: Raft log {used} bytes in use, raft.db and its WAL {} bytes",
            n.id,
            file_len(&path) + file_len(&n.dir.join("raft.db-wal"))
        );
    }
    let l = c.leader();
    let wal = c.nodes[l].dir.join("sm").join("db.sqlite-wal");
    poll(TIMEOUT, "the serving node's WAL to be cut back", || {
        (file_len(&wal) <= 4 << 20).then_some(())
    });
}
