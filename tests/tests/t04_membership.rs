//! Cluster sizes, read replicas and removal.

use cairn_tests::{Cluster, TIMEOUT, delete, poll, stmts};
use serde_json::json;

#[test]
fn test_single_node_cluster() {
    let c = Cluster::start(1);
    let r = c.nodes[0].execute(
        &stmts(&["CREATE TABLE t (v)", "INSERT INTO t VALUES(1)"]),
        "",
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        c.nodes[0].rows("SELECT v FROM t", "linearizable"),
        vec![vec![json!(1)]]
    );
    let s = c.nodes[0].status().unwrap();
    assert_eq!(s["raft"]["state"], "Leader");
    assert!(s["db_size"].as_u64().unwrap() > 0);
}

#[test]
fn test_five_node_cluster_survives_two_failures_and_remove() {
    let mut c = Cluster::start(5);
    c.execute(&stmts(&[
        "CREATE TABLE t (v INTEGER)",
        "INSERT INTO t VALUES(1)",
    ]));
    let nodes = cairn_tests::get(&c.nodes[0].url("/nodes")).body;
    assert_eq!(nodes.as_object().unwrap().len(), 5);
    assert!(
        nodes
            .as_object()
            .unwrap()
            .values()
            .all(|n| n["reachable"] == true && n["voter"] == true)
    );

    // Two of five down (one of them the leader): the other three still commit.
    let l = c.leader();
    let f = c.followers()[0];
    let old_id = c.nodes[l].id;
    c.kill9(l);
    c.kill9(f);
    c.wait_for_new_leader(old_id);
    c.execute(&stmts(&["INSERT INTO t VALUES(2)"]));

    // Remove one dead node for good; the cluster shrinks to four members.
    let gone = c.nodes[f].id;
    let nl = c.leader();
    let r = delete(&c.nodes[nl].url("/remove"), &json!({ "id": gone }));
    assert_eq!(r.status, 200, "{:?}", r.body);
    poll(TIMEOUT, "the removed node to leave the membership", || {
        let s = c.nodes[nl].status()?;
        let voters: Vec<u64> = serde_json::from_value(s["raft"]["voters"].clone()).ok()?;
        (!voters.contains(&gone) && voters.len() == 4).then_some(())
    });
    c.restart(l);
    c.execute(&stmts(&["INSERT INTO t VALUES(3)"]));
    c.assert_identical();
}

#[test]
fn test_non_voter_is_a_read_replica() {
    let mut c = Cluster::start(3);
    let r = c.add_node(&["--non-voter"]);
    let id = c.nodes[r].id;
    c.execute(&stmts(&[
        "CREATE TABLE t (v)",
        "INSERT INTO t VALUES('replicated')",
    ]));
    let s = c.nodes[c.leader()].status().unwrap();
    let learners: Vec<u64> = serde_json::from_value(s["raft"]["learners"].clone()).unwrap();
    let voters: Vec<u64> = serde_json::from_value(s["raft"]["voters"].clone()).unwrap();
    assert_eq!(learners, vec![id]);
    assert!(!voters.contains(&id));
    poll(TIMEOUT, "the row on the read replica", || {
        let r = c.nodes[r].query("SELECT v FROM t", "none");
        (r.body["results"][0]["values"].as_array()?.len() == 1).then_some(())
    });
    // Writes through the read replica are forwarded to the leader.
    let w = c.nodes[r].execute(&stmts(&["INSERT INTO t VALUES('via replica')"]), "");
    assert_eq!(w.status, 200, "{:?}", w.body);
    c.assert_identical();
}
