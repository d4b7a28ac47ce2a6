//! A node's disk fills up while the cluster takes writes (its data dir is a small tmpfs;
//! needs root): the other two keep serving (a full leader hands leadership over), the full one
//! holds its work instead of failing (it stays up and says it is not ready), catches up by
//! itself once space returns, and the three replicas end identical (issue 26, item 3).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_tests::tmpfs::Tmpfs;
use cairn_tests::{Cluster, Options, Place, get, poll, stmts};
use serde_json::{Value as Json, json};

/// Size of that tmpfs.
const DISK_MIB: u64 = 32;
/// Writes sent while the disk is full, each with a 16 KiB blob (about 5 MiB in all: more than
/// the follower could hold if it had not been stopped by the full disk).
const WRITES_WHILE_FULL: usize = 300;

/// Writes on whichever node leads, as a client with a 5 s timeout would: a write sent to a
/// leader whose disk just filled gets no answer until space returns, so it is sent again to
/// the new leader.
fn write(c: &Cluster, body: &Json) -> Json {
    let client = cairn_tests::Client::new(Duration::from_secs(5), None);
    poll(Duration::from_secs(60), "an accepted write", || {
        let l = c.find_leader(&[])?;
        let r = client.post(&c.nodes[l].url("/db/execute"), body);
        (r.status == 200).then_some(r.body)
    })
}

fn held(status: &Json) -> bool {
    let h = &status["storage_held"];
    !h["log_write"].is_null() || !h["apply"].is_null()
}

#[test]
fn test_full_disk_follower_holds_its_work_and_catches_up() {
    // Node 1 bootstraps and leads; node 3 joins as a follower.
    full_disk(3, false);
}

#[test]
fn test_full_disk_leader_hands_over_and_catches_up() {
    full_disk(1, true);
}

/// Fills the disk of node `full_id` (the leader when `leads`) during writes.
fn full_disk(full_id: u64, leads: bool) {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    // Declared before the cluster, so dropped after it: the nodes die before the unmount.
    let disk: Arc<Mutex<Option<Tmpfs>>> = Arc::default();
    let d = disk.clone();
    let place: Place = Arc::new(move |id, dir, _cmd| {
        let mut d = d.lock().expect("disk lock");
        if id == full_id && d.is_none() {
            *d = Some(Tmpfs::mount(dir, DISK_MIB).expect("mounting the follower's tmpfs"));
        }
        "127.0.0.1".into()
    });
    // Which node leads is part of the set-up: elections slow enough that a loaded machine
    // alone does not move leadership.
    let c = Cluster::start_placed(3, Options::slow_elections(), Some(place));
    let full = c
        .nodes
        .iter()
        .position(|n| n.id == full_id)
        .expect("the tmpfs node");
    c.execute(&stmts(&[
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)",
        "INSERT INTO t(v) VALUES(randomblob(16384))",
    ]));
    c.assert_identical();
    assert_eq!(
        c.leader() == full,
        leads,
        "node {full_id} leads: {}",
        !leads
    );

    let ballast = disk
        .lock()
        .expect("disk lock")
        .as_ref()
        .expect("mounted")
        .fill()
        .expect("filling the tmpfs");
    println!(
        "filled node {full_id}'s disk with {} KiB of ballast",
        ballast >> 10
    );

    // The other two keep serving writes: every one is acknowledged (the harness retries a
    // write refused while leadership moves; OR REPLACE makes a retry of an applied one
    // harmless).
    let started = Instant::now();
    for i in 0..WRITES_WHILE_FULL {
        let r = write(
            &c,
            &json!([[
                "INSERT OR REPLACE INTO t(id, v) VALUES(?, randomblob(16384))",
                1000 + i
            ]]),
        );
        assert!(
            r["results"][0]["error"].is_null(),
            "write {i} failed while one follower's disk is full: {r}"
        );
    }
    println!(
        "{WRITES_WHILE_FULL} writes acknowledged by the other two in {:.2?}",
        started.elapsed()
    );
    let leader = c.leader();
    assert_ne!(leader, full, "a node with a full disk does not lead");
    let target = c.nodes[leader]
        .applied_index()
        .expect("leader's applied index");

    // The full node holds its work and says so; it did not exit and did not apply past it.
    let node = &c.nodes[full];
    let status = poll(
        Duration::from_secs(30),
        "the full node to report held storage",
        || node.status_within(Duration::from_secs(2)).filter(held),
    );
    println!("full node's storage_held: {}", status["storage_held"]);
    let ready = get(&node.url("/readyz"));
    assert_eq!(
        ready.status, 503,
        "a node that holds its writes is not ready"
    );
    assert!(
        ready.body.as_str().is_some_and(|t| t.contains("held")),
        "readyz does not say why: {}",
        ready.body
    );
    let behind = node.applied_index().unwrap_or(0);
    assert!(
        behind < target,
        "the full node applied {behind} of {target} on a full disk"
    );

    // Space returns: the node resumes by itself and catches up.
    disk.lock()
        .expect("disk lock")
        .as_ref()
        .expect("mounted")
        .free()
        .expect("freeing the tmpfs");
    let freed = Instant::now();
    poll(
        Duration::from_secs(120),
        "the full node to catch up after space returned",
        || (node.applied_index()? >= target).then_some(()),
    );
    let caught_up = freed.elapsed();
    poll(
        Duration::from_secs(30),
        "the node to be ready again",
        || {
            let s = node.status_within(Duration::from_secs(2))?;
            (!held(&s) && node.is_ready()).then_some(())
        },
    );
    println!(
        "node {full_id} caught up from index {behind} to {target} in {caught_up:.2?} after space returned"
    );
    let n: i64 = c.nodes[full].rows("SELECT count(*) FROM t", "none")[0][0]
        .as_i64()
        .expect("count");
    assert_eq!(n, 1 + WRITES_WHILE_FULL as i64);
    c.assert_identical();
}
