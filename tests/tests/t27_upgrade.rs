//! Rolling upgrade from the previous release (v0.1.0, format version 1) to this tree (format
//! version 2), on real processes: three gateways start on v0.1.0's binary (built from its
//! commit by `cairn_tests::release`), devices of v0.1.0's `cairn sim` stream and an SQL client
//! writes, and the binaries are replaced one node at a time (SIGTERM, restart on the same data
//! directory with the new binary). Checked: nothing acknowledged lost, nothing stored twice,
//! replicas identical after SQL writes in every mixed phase, at most one leader change per
//! step, the cluster's active version stays 1 until the last node runs the new binary and the
//! `ActivateVersion` entry (the new entry kind) and its migration then apply at the same index
//! on every replica. The data directories v0.1.0 wrote open in the new binary (the fixture is
//! the test's own cluster). A v0.1.0 node is then refused at join, and a data directory of a
//! newer format version is refused by this binary with both versions named.
//!
//! Figures (`--nocapture`): minutes the test took, leader changes per step, device ack
//! latency p99 over the upgrade.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_tests::device::{READINGS_CONFIG, sim_command, sim_summary};
use cairn_tests::release::previous_release_bin;
use cairn_tests::{
    Client, Cluster, Options, SLOW_ELECTIONS, TIMEOUT, View, cairn_bin, leader_of, poll,
};
use serde_json::{Value as Json, json};

/// One `/status` of the node at `http` (`host:port`), within a second.
fn status(http: &str) -> Option<Json> {
    let r = Client::new(Duration::from_secs(1), Some(Duration::from_millis(300)))
        .get(&format!("http://{http}/status"));
    (r.status == 200).then_some(r.body)
}

/// Watches leadership every 50 ms: `(when, leader id, term)` each time it changes.
fn watch_leaders(
    nodes: Vec<(u64, String)>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, u64, u64)>> {
    std::thread::spawn(move || {
        let mut seen: Vec<(Instant, u64, u64)> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let views: Vec<View> = nodes
                .iter()
                .enumerate()
                .filter_map(|(i, (id, http))| View::of(i, *id, &status(http)?))
                .collect();
            if let Some(l) = leader_of(&views) {
                let (id, term) = (views.iter().find(|v| v.index == l).unwrap().id, {
                    views.iter().map(|v| v.term).max().unwrap()
                });
                if seen.last().is_none_or(|&(_, i, t)| (i, t) != (id, term)) {
                    seen.push((Instant::now(), id, term));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        seen
    })
}

/// Writes `INSERT INTO w(n)` with n = 1, 2, ... round-robin to every node's API until told to
/// stop; returns the n whose write was acknowledged. A write whose outcome is unknown is never
/// sent again (so a row stored twice would be the cluster's doing).
fn sql_writer(
    https: Vec<String>,
    stop: Arc<AtomicBool>,
    pause: Arc<Pause>,
) -> std::thread::JoinHandle<(Vec<u64>, u64)> {
    std::thread::spawn(move || {
        let client = Client::new(Duration::from_secs(5), Some(Duration::from_millis(300)));
        let mut acked = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if pause.asked.load(Ordering::SeqCst) {
                pause.idle.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            pause.idle.store(false, Ordering::SeqCst);
            n += 1;
            let http = &https[n as usize % https.len()];
            let r = client.post(
                &format!("http://{http}/db/execute"),
                &json!([["INSERT INTO w(n, v) VALUES(?, ?)", n, "x"]]),
            );
            if r.status == 200 && r.body["results"][0].get("error").is_none() {
                acked.push(n);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (acked, n)
    })
}

/// Holds the SQL writer between two writes (`idle` once it waits).
#[derive(Default)]
struct Pause {
    asked: AtomicBool,
    idle: AtomicBool,
}

/// The SQL writes one replica holds, read locally, in order.
fn written(c: &Cluster, i: usize) -> Vec<Vec<Json>> {
    c.nodes[i].rows("SELECT n, v FROM w ORDER BY n, v", "none")
}

fn format_of(c: &Cluster, i: usize) -> Json {
    c.nodes[i].status().expect("status")["format"].clone()
}

fn records_applied(c: &Cluster, i: usize) -> u64 {
    c.nodes[i]
        .status()
        .and_then(|s| s["ingress"]["records_applied"].as_u64())
        .unwrap_or(0)
}

/// `_cairn_migrations` and the recorded active version of one replica's database file.
fn migrations_of(dir: &std::path::Path) -> (Vec<(i64, i64)>, String) {
    let db = rusqlite::Connection::open_with_flags(
        dir.join("sm").join("db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("opening db.sqlite");
    let rows = db
        .prepare("SELECT version, log_index FROM _cairn_migrations ORDER BY version")
        .expect("_cairn_migrations")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let active: Vec<u8> = db
        .query_row(
            "SELECT value FROM _cairn_raft WHERE key = 'active_version'",
            [],
            |r| r.get(0),
        )
        .expect("active_version");
    (rows, String::from_utf8_lossy(&active).into_owned())
}

#[test]
fn test_rolling_upgrade_from_v0_1_0_loses_nothing_and_activates_after_the_last_node() {
    let t0 = Instant::now();
    let old = previous_release_bin();
    let new = cairn_bin();
    println!("v0.1.0 built/reused in {:.0?}", t0.elapsed());
    let t0 = Instant::now();
    let current: Arc<Mutex<PathBuf>> = Arc::new(Mutex::new(old.clone()));
    let launch = current.clone();
    let mut c = Cluster::start_with(
        3,
        Options {
            // The test counts the leader changes the upgrade causes; both releases read these keys.
            config: Some(format!("{SLOW_ELECTIONS}{READINGS_CONFIG}")),
            launcher: Some(Arc::new(move || {
                Command::new(launch.lock().unwrap().clone())
            })),
            ..Options::default()
        },
    );
    // v0.1.0 reports no format versions.
    for i in 0..3 {
        assert!(format_of(&c, i).is_null(), "node {i} runs v0.1.0");
    }
    c.execute(&json!(["CREATE TABLE w(n INTEGER, v TEXT)"]));

    let stop = Arc::new(AtomicBool::new(false));
    let nodes: Vec<(u64, String)> = c.nodes.iter().map(|n| (n.id, n.http.clone())).collect();
    let leaders = watch_leaders(nodes.clone(), stop.clone());
    let pause = Arc::new(Pause::default());
    let writer = sql_writer(
        nodes.iter().map(|n| n.1.clone()).collect(),
        stop.clone(),
        pause.clone(),
    );

    // Devices of the previous release's firmware client (`cairn sim` of v0.1.0).
    let dir = tempfile::tempdir().expect("temp dir");
    let report = dir.path().join("report.jsonl");
    let gateways: Vec<String> = (0..3)
        .map(|i| {
            c.nodes[i].status().unwrap()["device_addr"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let gateways: Vec<&str> = gateways.iter().map(String::as_str).collect();
    let leader = c.leader();
    let sim = sim_command(&old, &gateways, &c.nodes[leader].url(""))
        .args(["--devices", "20", "--rate", "20", "--duration", "60"])
        .args(["--drain", "60", "--json", "--quiet", "--first-id", "500"])
        .arg("--report")
        .arg(&report)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning cairn sim");
    poll(TIMEOUT, "device records to be applied", || {
        (records_applied(&c, leader) >= 300).then_some(())
    });

    let mut mixed_acked: Vec<u64> = Vec::new();
    let mut steps: Vec<(Instant, Instant, u64, bool)> = Vec::new();
    let mut before_last = 0u64;
    for i in 0..3 {
        let start = Instant::now();
        let was_leader = c.find_leader(&[]) == Some(i);
        *current.lock().unwrap() = new.clone();
        assert!(
            c.terminate(i),
            "node {} exits cleanly on SIGTERM",
            c.nodes[i].id
        );
        if i == 2 {
            // The last v0.1.0 node is down but still a member: nothing can activate yet.
            before_last = (0..2)
                .filter_map(|j| c.nodes[j].status()?["raft"]["last_log_index"].as_u64())
                .max()
                .expect("last log index");
        }
        c.restart(i);
        c.wait_converged();
        let f = format_of(&c, i);
        assert_eq!(f["supported"], 2, "node {i} runs the new binary: {f}");
        if i < 2 {
            // Mixed phase: SQL writes through the new node, then identical replicas; the
            // new nodes keep the active version at 1 (an old member would not decode more).
            for k in 0..20u64 {
                let n = 1_000_000 + 100 * i as u64 + k;
                let r = c.nodes[i].execute(
                    &json!([["INSERT INTO w(n, v) VALUES(?, ?)", n, "mixed"]]),
                    "",
                );
                assert_eq!(
                    r.status, 200,
                    "mixed-phase write through node {i}: {:?}",
                    r.body
                );
                assert!(r.body["results"][0].get("error").is_none(), "{:?}", r.body);
                mixed_acked.push(n);
            }
            // Identical SQL data on every replica (devices go on streaming; their tables are
            // compared once they stop).
            pause.asked.store(true, Ordering::SeqCst);
            poll(TIMEOUT, "the SQL writer to pause", || {
                pause.idle.load(Ordering::SeqCst).then_some(())
            });
            c.wait_converged();
            let rows: Vec<Vec<Vec<Json>>> = (0..3).map(|j| written(&c, j)).collect();
            assert!(
                rows.windows(2).all(|w| w[0] == w[1]),
                "step {}: replicas differ in w",
                i + 1
            );
            pause.asked.store(false, Ordering::SeqCst);
            println!(
                "step {}: {} SQL rows identical on 3 replicas",
                i + 1,
                rows[0].len()
            );
            for j in 0..=i {
                assert_eq!(format_of(&c, j)["active"], 1, "node {j} in the mixed phase");
            }
        }
        steps.push((start, Instant::now(), c.nodes[i].id, was_leader));
    }

    // Every node runs the new binary: the leader activates version 2.
    poll(TIMEOUT, "format version 2 active on every node", || {
        (0..3)
            .all(|i| format_of(&c, i)["active"] == 2)
            .then_some(())
    });
    let upgrade = steps[0].0.elapsed();

    let out = sim.wait_with_output().expect("cairn sim");
    stop.store(true, Ordering::Relaxed);
    let (mut acked, attempted) = writer.join().expect("writer");
    let seen = leaders.join().expect("leader watcher");
    assert!(out.status.success(), "cairn sim failed");
    let summary = sim_summary(&out.stdout).expect("JSON summary");
    println!("cairn sim (v0.1.0): {summary}");

    // At most one leader change per step.
    let mut changes = Vec::new();
    for (start, end, id, was_leader) in &steps {
        let n = seen
            .windows(2)
            .filter(|w| w[1].0 >= *start && w[1].0 <= *end)
            .count();
        println!("step: node {id} (leader: {was_leader}): {n} leader change(s)");
        assert!(
            n <= 1,
            "node {id}'s upgrade changed the leader {n} times: {seen:?}"
        );
        changes.push(n);
    }

    // Nothing acknowledged lost, nothing stored twice, on every replica.
    let sum = c.assert_identical();
    acked.extend(&mixed_acked);
    let acked: BTreeSet<u64> = acked.into_iter().collect();
    for i in 0..3 {
        let twice = c.nodes[i].rows("SELECT n FROM w GROUP BY n HAVING count(*) > 1", "none");
        assert!(twice.is_empty(), "node {i}: rows stored twice: {twice:?}");
        let stored: BTreeSet<u64> = c.nodes[i]
            .rows("SELECT n FROM w", "none")
            .iter()
            .map(|r| r[0].as_u64().unwrap())
            .collect();
        let lost: Vec<_> = acked.difference(&stored).collect();
        assert!(
            lost.is_empty(),
            "node {i}: acknowledged writes lost: {lost:?}"
        );
        let devices = c.nodes[i].rows(
            "SELECT device_id, count(*), count(DISTINCT k), max(k) FROM readings GROUP BY device_id",
            "none",
        );
        let per: BTreeMap<u64, (u64, u64, u64)> = devices
            .iter()
            .map(|r| {
                let v: Vec<u64> = r.iter().map(|x| x.as_u64().unwrap()).collect();
                (v[0], (v[1], v[2], v[3]))
            })
            .collect();
        for line in std::fs::read_to_string(&report).expect("report").lines() {
            let d: Json = serde_json::from_str(line).unwrap();
            let id = d["device_id"].as_u64().unwrap();
            let through = d["acked_through"].as_u64().unwrap();
            let (n, distinct, max) = per.get(&id).copied().unwrap_or((0, 0, 0));
            assert_eq!(
                n, distinct,
                "device {id}: a record stored twice on node {i}"
            );
            assert_eq!(max, n, "device {id}: holes on node {i}");
            assert!(
                n >= through,
                "device {id}: acked through {through}, node {i} has {n}"
            );
            assert_eq!(d["dropped"], 0, "{d}");
        }
    }
    println!(
        "SQL: {} of {} writes acknowledged, all stored once; replicas identical ({sum:x})",
        acked.len(),
        attempted + mixed_acked.len() as u64
    );

    // A v0.1.0 node is refused at join now that version 2 is active.
    let stale = dir.path().join("stale");
    std::fs::create_dir_all(&stale).unwrap();
    let log = std::fs::File::create(stale.join("node.log")).unwrap();
    let leader = c.leader();
    let mut stale_node = Command::new(&old)
        .args(["node", "--node-id", "9", "--data-dir"])
        .arg(&stale)
        .args(["--http-addr", "127.0.0.1:0", "--raft-addr", "127.0.0.1:0"])
        .args([
            "--device-addr",
            "127.0.0.1:0",
            "--join",
            &c.nodes[leader].url(""),
        ])
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawning a v0.1.0 node");
    let refusal = poll(TIMEOUT, "the v0.1.0 node's join to be refused", || {
        let text = std::fs::read_to_string(stale.join("node.log")).unwrap_or_default();
        text.lines()
            .find(|l| l.contains("join refused"))
            .map(str::to_string)
    });
    let _ = stale_node.kill();
    let _ = stale_node.wait();
    println!("v0.1.0 joiner: {refusal}");
    assert!(
        refusal.contains("supports cluster format version 1")
            && refusal.contains("active version is 2"),
        "{refusal}"
    );
    let voters = c.nodes[leader].status().unwrap()["raft"]["voters"].clone();
    assert_eq!(voters, json!([1, 2, 3]));

    // The migration applied at one index, after the last upgrade, on every replica; the
    // node-local files carry their new stamp.
    c.wait_converged();
    for i in 0..3 {
        assert!(c.terminate(i));
    }
    let mut applied = Vec::new();
    for n in &c.nodes {
        let (rows, active) = migrations_of(&n.dir);
        assert_eq!(active, "2", "node {}", n.id);
        applied.push(rows);
        let raft = rusqlite::Connection::open(n.dir.join("raft.db")).unwrap();
        let stamp: Vec<u8> = raft
            .query_row(
                "SELECT value FROM meta WHERE key = 'format_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stamp, b"2", "node {}'s raft.db", n.id);
    }
    assert!(applied.windows(2).all(|w| w[0] == w[1]), "{applied:?}");
    assert_eq!(applied[0].len(), 1, "{applied:?}");
    let at = applied[0][0].1 as u64;
    assert!(
        at > before_last,
        "ActivateVersion at index {at}, before the last node was upgraded ({before_last})"
    );
    println!(
        "ActivateVersion(2) and its migration at index {at} on every replica (last index before \
         the last upgrade: {before_last})"
    );
    println!(
        "FIGURES: upgrade of 3 nodes {:.1} s; leader changes per step {changes:?}; device ack \
         p99 {} ms over the run (p50 {} ms); test {:.2} min",
        upgrade.as_secs_f64(),
        summary["p99_ms"],
        summary["p50_ms"],
        t0.elapsed().as_secs_f64() / 60.0
    );
}

/// A data directory stamped with a newer format version is refused by this binary, with both
/// versions named; the directory is left as it was.
#[test]
fn test_newer_data_dir_refused_naming_both_versions() {
    let mut c = Cluster::start(1);
    assert!(c.terminate(0));
    let path = c.nodes[0].dir.join("raft.db");
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES('format_version', CAST('3' AS BLOB))",
        [],
    )
    .unwrap();
    drop(db);
    c.relaunch(0);
    let status = c.wait_exit(0);
    assert!(!status.success(), "the node must refuse to start");
    let log = c.nodes[0].log();
    assert!(
        log.contains("written by cluster format version 3")
            && log.contains("supports up to format version 2"),
        "{log}"
    );
    let db = rusqlite::Connection::open(&path).unwrap();
    let stamp: Vec<u8> = db
        .query_row(
            "SELECT value FROM meta WHERE key = 'format_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stamp, b"3", "the directory is left as it was");
}
