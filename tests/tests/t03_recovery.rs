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
