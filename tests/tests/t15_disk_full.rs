//! A follower's disk fills up while the cluster takes writes (its data dir is a small tmpfs;
//! needs root): the other two keep serving, the full one holds its work instead of failing
//! (it stays up and says it is not ready), catches up by itself once space returns, and the
//! three replicas end identical (issue 26, item 3).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_tests::tmpfs::Tmpfs;
use cairn_tests::{Cluster, Options, Place, get, poll, stmts};
use serde_json::{Value as Json, json};

/// Node id whose data dir is the small tmpfs (a follower: node 1 bootstraps and leads).
const FULL_ID: u64 = 3;
/// Size of that tmpfs.
const DISK_MIB: u64 = 32;
/// Writes sent while the disk is full, each with a 16 KiB blob (about 5 MiB in all: more than
/// the follower could hold if it had not been stopped by the full disk).
const WRITES_WHILE_FULL: usize = 300;

fn held(status: &Json) -> bool {
    let h = &status["storage_held"];
    !h["log_write"].is_null() || !h["apply"].is_null()
}

#[test]
fn test_full_disk_follower_holds_its_work_and_catches_up() {
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
        if id == FULL_ID && d.is_none() {
            *d = Some(Tmpfs::mount(dir, DISK_MIB).expect("mounting the follower's tmpfs"));
        }
        "127.0.0.1".into()
    });
    let c = Cluster::start_placed(3, Options::default(), Some(place));
    let full = c
        .nodes
        .iter()
        .position(|n| n.id == FULL_ID)
        .expect("the tmpfs node");
    c.execute(&stmts(&[
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)",
        "INSERT INTO t(v) VALUES(randomblob(16384))",
    ]));
    c.assert_identical();
    assert_ne!(
        c.leader(),
        full,
        "the node with the small disk must be a follower"
    );

    let ballast = disk
        .lock()
        .expect("disk lock")
        .as_ref()
        .expect("mounted")
        .fill()
        .expect("filling the tmpfs");
    println!(
        "filled node {FULL_ID}'s disk with {} KiB of ballast",
        ballast >> 10
    );

    // The other two keep serving writes: every one is acknowledged.
    let started = Instant::now();
    for i in 0..WRITES_WHILE_FULL {
        let r = c.execute(&json!([[
            "INSERT INTO t(id, v) VALUES(?, randomblob(16384))",
            1000 + i
        ]]));
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
        "node {FULL_ID} caught up from index {behind} to {target} in {caught_up:.2?} after space returned"
    );
    let n: i64 = c.nodes[full].rows("SELECT count(*) FROM t", "none")[0][0]
        .as_i64()
        .expect("count");
    assert_eq!(n, 1 + WRITES_WHILE_FULL as i64);
    c.assert_identical();
}
