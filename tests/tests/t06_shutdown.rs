//! SIGTERM on the leader hands leadership over before the process exits.

use cairn_tests::{Cluster, Options, stmts};

#[test]
fn test_sigterm_on_leader_transfers_leadership() {
    // Slow elections: the node signalled must still lead when the signal comes (the
    // hand-over itself does not wait for an election timeout).
    let mut c = Cluster::start_with(3, Options::slow_elections());
    c.execute(&stmts(&["CREATE TABLE t (v)", "INSERT INTO t VALUES(1)"]));
    let l = c.leader();
    let old_id = c.nodes[l].id;
    assert!(
        c.terminate(l),
        "the leader exited with an error:\n{}",
        c.nodes[l].log()
    );
    assert!(
        c.nodes[l].log().contains("leadership transferred"),
        "no hand-over in the log:\n{}",
        c.nodes[l].log()
    );
    let n = c.wait_for_new_leader(old_id);
    c.execute(&stmts(&["INSERT INTO t VALUES(2)"]));
    assert_eq!(
        c.nodes[n].rows("SELECT count(*) FROM t", "linearizable")[0][0],
        2
    );
    c.restart(l);
    c.assert_identical();
}
