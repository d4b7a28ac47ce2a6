//! An entry that will not decode stops the node with a clear fatal error.

use cairn_tests::{Cluster, stmts};

#[test]
fn test_undecodable_entry_is_fatal() {
    let mut c = Cluster::start(1);
    c.execute(&stmts(&["CREATE TABLE t (v)", "INSERT INTO t VALUES(1)"]));
    c.execute(&stmts(&["INSERT INTO t VALUES(2)"]));
    let applied = c.nodes[0].applied_index().unwrap();
    assert!(c.terminate(0));

    // Corrupt the last applied entry in the log and rewind the database's applied position,
    // so that the restarted node has to read the entry again.
    let dir = c.nodes[0].dir.clone();
    let log = rusqlite::Connection::open(dir.join("raft.db")).unwrap();
    let n = log
        .execute(
            "UPDATE log SET entry = X'FFFFFFFFFFFF' WHERE idx = ?1",
            [applied as i64],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(log);
    let db = rusqlite::Connection::open(dir.join("sm").join("db.sqlite")).unwrap();
    let last: Vec<u8> = db
        .query_row(
            "SELECT value FROM _cairn_raft WHERE key = 'last_applied'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let last = String::from_utf8(last).unwrap();
    let rewound = last.replace(
        &format!("\"index\":{applied}"),
        &format!("\"index\":{}", applied - 1),
    );
    assert_ne!(last, rewound, "applied position not found in {last}");
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
