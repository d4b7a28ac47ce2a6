//! An entry that will not decode stops the node with a clear fatal error.

use cairn_tests::{Cluster, stmts};

#[test]
fn test_undecodable_entry_is_fatal() {
    let mut c = Cluster::start(1);
    c.execute(&stmts(&["CREATE TABLE t (v)", "INSERT INTO t VALUES(1)"]));
    c.execute(&stmts(&["INSERT INTO t VALUES(2)"]));
    assert!(c.nodes[0].applied_index().unwrap() > 0);
    assert!(c.terminate(0));

    // Corrupt the last applied entry in the log and rewind the database's applied position,
    // so that the restarted node has to read the entry again. The position is read from the
    // stopped node's database, not from /status: the ingress leader may append its
    // stream-definition entry after the writes above.
    let dir = c.nodes[0].dir.clone();
    let db = rusqlite::Connection::open(dir.join("sm").join("db.sqlite")).unwrap();
    let last: Vec<u8> = db
        .query_row(
            "SELECT value FROM _cairn_raft WHERE key = 'last_applied'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut position: serde_json::Value = serde_json::from_slice(&last).unwrap();
    let applied = position["index"]
        .as_u64()
        .expect("applied position has an index");
    assert!(applied > 1, "nothing applied: {position}");
    position["index"] = (applied - 1).into();
    let rewound = position.to_string();

    let log = rusqlite::Connection::open(dir.join("raft.db")).unwrap();
    let n = log
        .execute(
            "UPDATE log SET entry = X'FFFFFFFFFFFF' WHERE idx = ?1",
            [applied as i64],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(log);
    db.execute(
        "UPDATE _cairn_raft SET value = ?1 WHERE key = 'last_applied'",
        [rewound.as_bytes()],
    )
    .unwrap();
    drop(db);

    c.relaunch(0);
    let status = c.wait_exit(0);
    let log = c.nodes[0].log();
    assert!(
        !status.success(),
        "the node kept running on a corrupt log:\n{log}"
    );
    assert!(
        log.contains("undecodable raft log record"),
        "no clear error in the log:\n{log}"
    );
    println!(
        "{}",
        log.lines()
            .rfind(|l| l.contains("undecodable"))
            .unwrap_or("")
    );
}
