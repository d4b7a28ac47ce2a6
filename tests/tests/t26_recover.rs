//! Recovery from a lost majority (issue 31 item 5), with real processes: three gateways hold
//! SQL rows and the records of 20 devices (`cairn sim`); two are killed and their data dirs
//! deleted; `cairn recover --members` forces the third's membership (refused while it runs),
//! prints the last log index it keeps, and the node elects itself; two blank gateways join it.
//! Checked: the survivor's data intact on every replica, a new history epoch and a new epoch
//! for every device on every replica, devices resume from the surviving high-water marks
//! (seqs without holes or repeats), replicas identical.

use std::path::Path;
use std::process::Command;

use cairn_tests::device::{READINGS_CONFIG, fleet_command, read_report, sim_summary};
use cairn_tests::{Cluster, Options, TIMEOUT, cairn_bin, poll};
use serde_json::json;

const DEVICES: u64 = 20;
const FIRST_ID: u64 = 700;

/// Runs `cairn sim` against every started node's device port until its records are all
/// acknowledged: per device (id, acked_through).
fn stream(c: &Cluster, report: &Path) -> Vec<(u64, u64)> {
    let out = fleet_command(c, c.leader(), report)
        .args([
            "--devices",
            &DEVICES.to_string(),
            "--rate",
            "20",
            "--duration",
            "4",
        ])
        .args(["--drain", "60", "--first-id", &FIRST_ID.to_string()])
        .output()
        .expect("cairn sim");
    assert!(out.status.success(), "cairn sim failed");
    let summary = sim_summary(&out.stdout).expect("JSON summary");
    println!("cairn sim: {summary}");
    assert_eq!(summary["acked"], summary["pushed"], "{summary}");
    read_report(report)
        .iter()
        .map(|d| {
            (
                d["device_id"].as_u64().unwrap(),
                d["acked_through"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Per device: (rows, distinct seqs, min seq, max seq) on node `i`, read locally.
fn stored(c: &Cluster, i: usize) -> Vec<(u64, [u64; 4])> {
    c.nodes[i]
        .rows(
            "SELECT device_id, count(*), count(DISTINCT seq), min(seq), max(seq) FROM readings \
             GROUP BY device_id ORDER BY device_id",
            "none",
        )
        .into_iter()
        .map(|r| {
            let v: Vec<u64> = r.iter().map(|x| x.as_u64().expect("integer")).collect();
            (v[0], [v[1], v[2], v[3], v[4]])
        })
        .collect()
}

/// The history epoch and the lowest and highest device epoch in node `i`'s database file.
fn epochs(c: &Cluster, i: usize) -> (String, i64, i64) {
    let db = c.nodes[i].dir.join("sm").join("db.sqlite");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("opening the replica's database");
    let history = epochs_history(c, i);
    let (lo, hi) = conn
        .query_row(
            "SELECT min(epoch), max(epoch) FROM _cairn_device_epochs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("device epochs");
    (history, lo, hi)
}

fn recover(dir: &Path, members: &str) -> std::process::Output {
    Command::new(cairn_bin())
        .arg("recover")
        .arg("--data-dir")
        .arg(dir)
        .args(["--members", members])
        .output()
        .expect("cairn recover")
}

#[test]
fn test_two_of_three_lost_recover_the_third_join_two_blank_devices_resume() {
    let mut c = Cluster::start_with(
        3,
        Options {
            config: Some(READINGS_CONFIG.into()),
            ..Options::default()
        },
    );
    c.execute(&json!([
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"
    ]));
    for i in 0..50 {
        c.execute(&json!([[
            "INSERT INTO notes(body) VALUES(?)",
            format!("note {i}")
        ]]));
    }
    let first = stream(&c, &c.dir().join("run1.jsonl"));
    c.wait_converged();

    // The survivor: a follower. Before it stops, recover refuses to touch its log.
    let s = c.followers()[0];
    let sid = c.nodes[s].id;
    let members = format!("{sid}={}", c.nodes[s].raft);
    let out = recover(&c.nodes[s].dir, &members);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop the node"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied = c.nodes[s].applied_index().expect("applied index");
    let before = stored(&c, s);
    assert_eq!(before.len() as u64, DEVICES);

    // Two gateways destroyed, the survivor stopped.
    for i in 0..3 {
        c.kill9(i);
        if i != s {
            c.wipe(i);
        }
    }
    let out = recover(&c.nodes[s].dir, &members);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let kept: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("last log index kept: "))
        .expect("the kept index printed")
        .trim()
        .parse()
        .unwrap();
    assert!(kept >= applied, "kept {kept}, applied {applied} before");

    c.restart(s);
    poll(TIMEOUT, "the survivor to lead alone", || {
        let st = c.nodes[s].status()?;
        (st["raft"]["leader_id"].as_u64() == Some(sid)
            && st["raft"]["voters"] == json!([sid])
            && st["raft"]["applied_index"].as_u64()? >= kept + 2)
            .then_some(())
    });

    // Two blank gateways join it (new ids, new incarnations).
    let a = c.add_node(&[]);
    let b = c.add_node(&[]);
    let ids = {
        let mut v = vec![sid, c.nodes[a].id, c.nodes[b].id];
        v.sort();
        v
    };
    poll(TIMEOUT, "three voters", || {
        let st = c.nodes[c.find_leader(&[])?].status()?;
        let voters: Vec<u64> = serde_json::from_value(st["raft"]["voters"].clone()).ok()?;
        (voters == ids).then_some(())
    });
    c.wait_converged();

    // The survivor's data on every replica; a new history epoch and new device epochs.
    for i in [s, a, b] {
        assert_eq!(
            c.nodes[i].rows("SELECT count(*) FROM notes", "none"),
            vec![vec![json!(50)]],
            "node {}",
            c.nodes[i].id
        );
        assert_eq!(stored(&c, i), before, "node {}", c.nodes[i].id);
        let (history, lo, hi) = epochs(&c, i);
        assert_eq!(history, "1", "node {}", c.nodes[i].id);
        assert!(lo >= 1 << 32 && hi < 2 << 32, "device epochs {lo}..{hi}");
    }
    println!("survivor's data and new epochs on every replica");

    // Devices resume from the surviving high-water marks: seqs 1..=n, no hole, no repeat.
    let second = stream(&c, &c.dir().join("run2.jsonl"));
    let sum = c.assert_identical();
    println!("replicas identical (checksum {sum:x})");
    for i in [s, a, b] {
        let rows = stored(&c, i);
        assert_eq!(rows.len() as u64, DEVICES);
        for (id, [n, distinct, min, max]) in rows {
            let acked1 = first.iter().find(|d| d.0 == id).unwrap().1;
            let acked2 = second.iter().find(|d| d.0 == id).unwrap().1;
            assert_eq!(n, distinct, "device {id}: a record stored twice");
            assert_eq!((min, max), (1, n), "device {id}: holes");
            assert!(acked2 > acked1, "device {id} did not resume after {acked1}");
            assert_eq!(n, acked2, "device {id}: stored {n}, acked through {acked2}");
        }
    }
}

/// rqlite's `peers.json` in the survivor's data dir is the file form of the same command: read
/// at start, applied once (renamed), the node then leads alone with its data.
#[test]
fn test_peers_json_recovers_a_survivor_once() {
    let mut c = Cluster::start(3);
    c.execute(&json!([
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"
    ]));
    c.execute(&json!([["INSERT INTO notes(body) VALUES(?)", "kept"]]));
    c.wait_converged();
    let s = c.followers()[0];
    let sid = c.nodes[s].id;
    for i in 0..3 {
        c.kill9(i);
        if i != s {
            c.wipe(i);
        }
    }
    let dir = c.nodes[s].dir.clone();
    let peers = json!([{"id": sid.to_string(), "address": c.nodes[s].raft, "non_voter": false}]);
    std::fs::write(dir.join("peers.json"), peers.to_string()).unwrap();
    c.restart(s);
    poll(TIMEOUT, "the survivor to lead alone", || {
        let st = c.nodes[s].status()?;
        (st["raft"]["leader_id"].as_u64() == Some(sid) && st["raft"]["voters"] == json!([sid]))
            .then_some(())
    });
    assert!(!dir.join("peers.json").exists());
    assert!(dir.join("peers.json.applied").exists());
    assert!(c.nodes[s].log().contains("peers.json applied"));
    assert_eq!(
        c.nodes[s].rows("SELECT body FROM notes", "none"),
        vec![vec![json!("kept")]]
    );
    assert_eq!(epochs_history(&c, s), "1");
    // Applied once: a restart leaves the history epoch alone.
    c.kill9(s);
    c.restart(s);
    c.execute(&json!([["INSERT INTO notes(body) VALUES(?)", "after"]]));
    assert_eq!(epochs_history(&c, s), "1");
}

fn epochs_history(c: &Cluster, i: usize) -> String {
    let db = c.nodes[i].dir.join("sm").join("db.sqlite");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("opening the replica's database");
    conn.query_row(
        "SELECT CAST(value AS TEXT) FROM _cairn_backup WHERE key = 'history_epoch'",
        [],
        |r| r.get(0),
    )
    .expect("history epoch")
}
