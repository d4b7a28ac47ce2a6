//! `kill -9` of the leader under write load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_tests::{Cluster, stmts};
use serde_json::json;

#[test]
fn test_kill9_leader_elects_new_leader_and_keeps_acknowledged_writes() {
    let mut c = Cluster::start(3);
    c.execute(&stmts(&[
        "CREATE TABLE acked (id INTEGER PRIMARY KEY, writer INTEGER, seq INTEGER)",
    ]));
    let urls: Vec<String> = c.nodes.iter().map(|n| n.url("/db/execute")).collect();
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    // Four writers send through every node in turn; a write counts only when answered 200
    // with no error. Failed writes are retried with a new seq (never assumed stored).
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (urls, acked, stop) = (urls.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seq = 0u64;
                let mut turn = w as usize;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let url = &urls[turn % urls.len()];
                    turn += 1;
                    let r = cairn_tests::post(
                        url,
                        &json!([["INSERT INTO acked(writer, seq) VALUES(?, ?)", w, seq]]),
                    );
                    if r.status == 200 && r.body["results"][0].get("error").is_none() {
                        acked.lock().unwrap().push((w, seq));
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        })
        .collect();

    let wait_acks = |n: usize| {
        cairn_tests::poll(cairn_tests::TIMEOUT, "acknowledged writes", || {
            (acked.lock().unwrap().len() >= n).then_some(())
        })
    };
    wait_acks(50);
    let old = c.leader();
    let old_id = c.nodes[old].id;
    let killed_at = Instant::now();
    c.kill9(old);
    let new = c.wait_for_new_leader(old_id);
    let failover = killed_at.elapsed();
    println!(
        "failover: node {} is leader {:?} after kill -9 of node {old_id}",
        c.nodes[new].id, failover
    );
    let before = acked.lock().unwrap().len();
    wait_acks(before + 50);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    let rows = c.nodes[new].rows("SELECT writer, seq FROM acked", "linearizable");
    let stored: std::collections::HashSet<(u64, u64)> = rows
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    let missing: Vec<_> = acked.iter().filter(|a| !stored.contains(a)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost: {missing:?}",
        missing.len()
    );
    assert_eq!(stored.len(), rows.len(), "a write was stored twice");
    println!("{} acknowledged writes, all present", acked.len());

    // The killed node comes back, catches up, and all three hold the same rows.
    c.restart(old);
    c.assert_identical();
}
