//! Write throughput on a three-node cluster with 1 and 64 concurrent HTTP clients.
//!
//! Not part of CI (no timed asserts); run by hand against a release build:
//!
//! ```sh
//! cargo build --release -p cairn-gateway
//! CAIRN_BIN=target/release/cairn cargo test --release -p cairn-tests --test t90_bench -- --ignored --nocapture
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_tests::{Cluster, stmts};
use serde_json::json;

fn run(c: &Cluster, clients: usize, secs: u64) -> f64 {
    let url = c.nodes[c.leader()].url("/db/execute");
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (url, done, failed, stop) =
                (url.clone(), done.clone(), failed.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = cairn_tests::agent();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let r = agent.post(&url).send_json(json!([[
                        "INSERT INTO bench(client, n) VALUES(?, ?)",
                        i,
                        n
                    ]]));
                    // Only acknowledged writes count; a refused one (leader change) is retried.
                    if r.is_ok_and(|r| r.status() == 200) {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        println!("  ({failed} writes refused and retried, e.g. during a leader change)");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

#[test]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
fn bench_writes_per_second() {
    let c = Cluster::start(3);
    c.execute(&stmts(&[
        "CREATE TABLE bench (id INTEGER PRIMARY KEY, client INTEGER, n INTEGER)",
    ]));
    for clients in [1, 64] {
        let wps = run(&c, clients, 10);
        let s = c.nodes[c.leader()].status().unwrap();
        println!(
            "{clients:>3} clients: {wps:>8.0} writes/s (leader so far: {} commands, {} log entries in {} fsync'd appends)",
            s["write_queue"]["commands"], s["log_store"]["entries"], s["log_store"]["appends"]
        );
    }
    c.assert_identical();
}
