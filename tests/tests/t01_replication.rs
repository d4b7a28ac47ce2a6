//! Writes on the leader, reads on the followers at each consistency level.

use cairn_tests::{Cluster, Options, TIMEOUT, poll, stmts};
use serde_json::json;

#[test]
fn test_write_on_leader_read_on_followers_at_each_level() {
    let c = Cluster::start(3);
    let l = c.leader();
    let r = c.nodes[l].execute(
        &stmts(&[
            "CREATE TABLE readings (id INTEGER PRIMARY KEY, sensor TEXT, value REAL)",
            "INSERT INTO readings(sensor, value) VALUES('t1', 21.5)",
        ]),
        "",
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["results"][1]["last_insert_id"], 1);
    assert_eq!(r.body["results"][1]["rows_affected"], 1);

    for f in c.followers() {
        let n = &c.nodes[f];
        // `none` reads the follower's own copy: eventually it has the row.
        poll(TIMEOUT, "the row on a follower at level none", || {
            let r = n.query("SELECT sensor, value FROM readings", "none");
            (r.body["results"][0]["values"].as_array()?.len() == 1).then_some(())
        });
        for level in ["none", "weak", "linearizable", "strong"] {
            let rows = n.rows("SELECT sensor, value FROM readings", level);
            assert_eq!(
                rows,
                vec![vec![json!("t1"), json!(21.5)]],
                "node {} level {level}",
                n.id
            );
        }
    }
    c.assert_identical();
}

#[test]
fn test_follower_forwards_writes_and_redirects_on_request() {
    // The redirect is compared with the leader read before: elections slow enough that a
    // loaded machine alone does not move it.
    let c = Cluster::start_with(3, Options::slow_elections());
    let f = c.followers()[0];
    let leader_http = c.nodes[c.leader()].http.clone();
    let n = &c.nodes[f];
    let r = n.execute(
        &stmts(&[
            "CREATE TABLE t (v TEXT)",
            "INSERT INTO t VALUES('via follower')",
        ]),
        "",
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["results"][1]["rows_affected"], 1);

    let r = n.execute(&stmts(&["INSERT INTO t VALUES('x')"]), "?redirect");
    assert_eq!(r.status, 301);
    let loc = r.location.expect("Location header");
    assert!(
        loc.starts_with(&format!("http://{leader_http}/db/execute")),
        "{loc}"
    );

    // A linearizable read on a follower sees a write acknowledged a moment ago.
    let r = n.execute(&stmts(&["INSERT INTO t VALUES('fresh')"]), "");
    assert_eq!(r.status, 200);
    let rows = n.rows("SELECT count(*) FROM t WHERE v = 'fresh'", "linearizable");
    assert_eq!(rows[0][0], json!(1));
    c.assert_identical();
}
