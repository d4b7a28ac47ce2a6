//! rqlite's operator features on real processes: `--bootstrap-expect 3` with `--join` naming
//! Raft addresses and HTTP URLs (no cluster until the third node is there, then one cluster of
//! all three), `--join` by Raft address, a node with Raft state of its own ignoring a later
//! `--join` (and saying so), `/db/backup?compress` (gzip, SQLite file and SQL dump) loaded back,
//! a large SQL dump loaded through `/db/load` without the node holding it in memory (its
//! answer carries the dump's own counters, as rqlite's does), and reaping of members that are
//! gone (`POST /reap`, `--raft-reap-*-timeout-ms`), and rqlite's string node ids.

use std::process::Command;

use cairn_tests::servers::free_port;
use cairn_tests::{Cluster, Options, TIMEOUT, poll, stmts};
use serde_json::json;

fn addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Voters (sorted ids) and leader id as node `i` reports them, once it knows a leader.
fn formed(c: &Cluster, i: usize) -> Option<(Vec<u64>, u64)> {
    let st = c.nodes[i].status()?;
    let leader = st["raft"]["leader_id"].as_u64()?;
    let voters: Vec<u64> = serde_json::from_value(st["raft"]["voters"].clone()).ok()?;
    Some((voters, leader))
}

#[test]
fn test_bootstrap_expect_forms_one_cluster_of_all_founders() {
    let mut c = Cluster::empty(Options::default());
    let nodes: Vec<(String, String)> = (0..3).map(|_| (addr(), addr())).collect();
    // Nodes 1 and 2 name everyone by Raft address (rqlite 8's form); node 3 by HTTP URL.
    let by_raft = nodes
        .iter()
        .map(|n| n.1.clone())
        .collect::<Vec<_>>()
        .join(",");
    let by_http = nodes
        .iter()
        .map(|n| format!("http://{}", n.0))
        .collect::<Vec<_>>()
        .join(",");
    for (http, raft) in &nodes[..2] {
        c.spawn_at(http, raft, &["--bootstrap-expect", "3", "--join", &by_raft]);
    }
    // Both know of each other, and with two of three expected no cluster forms.
    for i in 0..2 {
        poll(TIMEOUT, "the two founders to notify each other", || {
            let log = c.nodes[i].log();
            log.contains("bootstrap: notified").then_some(())
        });
    }
    for i in 0..2 {
        let st = c.nodes[i].status().expect("status");
        assert!(
            st["raft"]["leader_id"].is_null() && !c.nodes[i].is_ready(),
            "node {} formed a cluster with 2 of 3 founders: {st}",
            i + 1
        );
    }
    let (http, raft) = &nodes[2];
    c.spawn_at(http, raft, &["--bootstrap-expect", "3", "--join", &by_http]);
    // Every founder sees the three voters and the same leader. Which one leads may change
    // while the founders' elections settle (two candidates of one term, the higher wins), so
    // the leader is not taken from the first view: all three must name the same one at once.
    let leader = poll(TIMEOUT, "one cluster of three with one leader", || {
        let views: Vec<(Vec<u64>, u64)> = (0..3).map(|i| formed(&c, i)).collect::<Option<_>>()?;
        let leader = views[0].1;
        views
            .iter()
            .all(|(v, l)| *v == vec![1, 2, 3] && *l == leader)
            .then_some(leader)
    });
    println!("the founders agree on leader {leader}");
    c.execute(&stmts(&[
        "CREATE TABLE formed (v)",
        "INSERT INTO formed VALUES(1)",
    ]));
    c.assert_identical();

    // A fourth node joins by naming a member's Raft address, as rqlite's `-join` takes it.
    let via_raft = c.nodes[1].raft.clone();
    let (http, raft) = (addr(), addr());
    let i = c.spawn_at(&http, &raft, &["--join", &via_raft]);
    c.wait_ready(i);
    poll(TIMEOUT, "the fourth node to be a voter", || {
        formed(&c, c.leader()).filter(|(v, _)| *v == vec![1, 2, 3, 4])
    });
    assert_eq!(
        c.nodes[i].rows("SELECT v FROM formed", "none"),
        vec![vec![json!(1)]]
    );
    c.assert_identical();
}

/// rqlite keeps a node's existing Raft state: a node that founded its own cluster and is
/// started again with `--join` stays in it, says so, and the other cluster is untouched.
#[test]
fn test_a_node_with_state_ignores_a_later_join() {
    let other = Cluster::start(1);
    let mut c = Cluster::start(1);
    c.execute(&stmts(&[
        "CREATE TABLE mine (v)",
        "INSERT INTO mine VALUES('kept')",
    ]));
    assert!(c.terminate(0));
    c.set_flags(0, &["--join", &other.nodes[0].url("")]);
    c.restart(0);
    poll(TIMEOUT, "the ignored join in the log", || {
        c.nodes[0].log().contains("ignoring --join").then_some(())
    });
    assert_eq!(
        c.nodes[0].rows("SELECT v FROM mine", "strong"),
        vec![vec![json!("kept")]]
    );
    let members = other.nodes[0].status().expect("status")["store"]["nodes"]
        .as_array()
        .map(Vec::len);
    assert_eq!(members, Some(1), "the other cluster gained a member");
}

/// Decompresses gzip bytes with Python's gzip module (another implementation than Cairn's).
fn gunzip(gz: &[u8]) -> Vec<u8> {
    let f = std::env::temp_dir().join(format!("cairn-t29-{}.gz", std::process::id()));
    std::fs::write(&f, gz).expect("writing");
    let out = Command::new("python3")
        .args([
            "-c",
            "import gzip, sys; sys.stdout.buffer.write(gzip.open(sys.argv[1]).read())",
        ])
        .arg(&f)
        .output()
        .expect("python3");
    let _ = std::fs::remove_file(&f);
    assert!(
        out.status.success(),
        "not gzip: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn get_bytes(url: &str) -> (u16, Option<String>, Vec<u8>) {
    let mut r = cairn_tests::agent().get(url).call().expect("GET");
    let kind = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .expect("body");
    (r.status().as_u16(), kind, body)
}

/// The peak resident memory (`VmHWM`) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = st
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

#[test]
fn test_compressed_backups_and_a_streamed_dump_load() {
    // Slow elections: the backups are fetched from the leader (a follower redirects).
    let c = Cluster::start_with(3, Options::slow_elections());
    c.execute(&stmts(&[
        "CREATE TABLE packed (k INTEGER PRIMARY KEY, v TEXT)",
        "INSERT INTO packed(v) VALUES('one'), ('two'), ('three')",
    ]));
    let l = c.leader();
    let leader = &c.nodes[l];

    // A SQLite file, gzipped; it reads as one with Python's sqlite3.
    let (status, kind, gz) = get_bytes(&leader.url("/db/backup?compress"));
    assert_eq!((status, kind.as_deref()), (200, Some("application/gzip")));
    let file = gunzip(&gz);
    assert!(file.starts_with(b"SQLite format 3\0"), "not a SQLite file");
    let (status, _, plain) = get_bytes(&leader.url("/db/backup"));
    assert_eq!(status, 200);
    assert!(gz.len() < plain.len(), "{} >= {}", gz.len(), plain.len());
    let path = std::env::temp_dir().join(format!("cairn-t29-{}.db", std::process::id()));
    std::fs::write(&path, &file).expect("writing");
    let read = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             print(','.join(v for (v,) in sqlite3.connect(sys.argv[1]).execute('SELECT v FROM packed ORDER BY k')))",
        ])
        .arg(&path)
        .output()
        .expect("python3");
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        String::from_utf8_lossy(&read.stdout).trim(),
        "one,two,three"
    );

    // The SQL dump, gzipped.
    let (status, _, gz_sql) = get_bytes(&leader.url("/db/backup?fmt=sql&compress"));
    assert_eq!(status, 200);
    let sql = String::from_utf8(gunzip(&gz_sql)).expect("UTF-8");
    assert!(
        sql.contains("CREATE TABLE packed") && sql.contains("'three'"),
        "{sql}"
    );

    // The compressed file loads back as it is (through a follower).
    c.execute(&stmts(&["DELETE FROM packed"]));
    let f = c.followers()[0];
    let r = c.nodes[f].client().post_bytes(
        &c.nodes[f].url("/db/load"),
        "application/octet-stream",
        &gz,
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.body["results"][0].get("error").is_none(), "{:?}", r.body);
    assert_eq!(
        c.nodes[f].rows("SELECT count(*) FROM packed", "strong"),
        vec![vec![json!(3)]]
    );

    // A dump of ~67 MiB (300,000 statements) through a follower: the follower streams it to
    // disk and on to the leader, the leader reads it one statement at a time, so neither's
    // peak memory grows by anything near the dump.
    let pad = "x".repeat(180);
    let mut dump = String::from(
        "PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n\
         CREATE TABLE big (k INTEGER PRIMARY KEY, v INTEGER);\n\
         INSERT INTO big VALUES(7, 0);\n",
    );
    for _ in 0..300_000 {
        dump.push_str(&format!(
            "UPDATE big SET v = v + 1 WHERE k = 7 AND '{pad}' IS NOT NULL;\n"
        ));
    }
    dump.push_str("COMMIT;\n");
    let via = &c.nodes[f];
    let pids = [leader.pid().expect("leader pid"), via.pid().expect("pid")];
    let before = pids.map(peak_rss);
    let r = via
        .client()
        .post_bytes(&via.url("/db/load"), "text/plain", dump.as_bytes());
    assert_eq!(r.status, 200, "{:?}", r.body);
    // rqlite answers a dump with the counters of its last statement.
    assert_eq!(
        r.body,
        json!({"results": [{"last_insert_id": 7, "rows_affected": 1}]})
    );
    for (who, (pid, before)) in ["leader", "follower"].iter().zip(pids.iter().zip(before)) {
        let grew = peak_rss(*pid).saturating_sub(before);
        println!(
            "dump of {} MiB loaded; the {who}'s peak memory grew {} MiB",
            dump.len() >> 20,
            grew >> 20
        );
        assert!(
            grew < dump.len() as u64 / 2,
            "the {who}'s peak memory grew {grew} bytes for a {} byte dump",
            dump.len()
        );
    }
    assert_eq!(
        leader.rows("SELECT v FROM big", "strong"),
        vec![vec![json!(300_000)]]
    );
    c.assert_identical();
}

/// The ids in `/nodes?nonvoters` of the leader.
fn member_ids(c: &Cluster) -> Option<Vec<String>> {
    shown_ids(c, c.find_leader(&[])?)
}

/// rqlite's reaping: `POST /reap` (through a follower) removes a read replica that is gone;
/// with `--raft-reap-*-timeout-ms` the leader removes a gone read replica and a gone voter by
/// itself, and the rest go on.
#[test]
fn test_reaping_unreachable_members() {
    let mut c = Cluster::start(3);
    let ro = c.add_node(&["--non-voter"]);
    poll(TIMEOUT, "four members", || {
        (member_ids(&c)?.len() == 4).then_some(())
    });
    c.kill9(ro);
    let f = c.followers()[0];
    let reaped = poll(TIMEOUT, "/reap to remove the read replica", || {
        let r = c.nodes[f]
            .client()
            .post(&c.nodes[f].url("/reap?timeout=1s"), &json!({}));
        assert_eq!(r.status, 200, "{:?}", r.body);
        let ids = r.body["reaped"].as_array()?.clone();
        (!ids.is_empty()).then_some(ids)
    });
    assert_eq!(reaped, vec![json!("4")]);
    assert_eq!(
        member_ids(&c),
        Some(vec!["1".into(), "2".into(), "3".into()])
    );

    let mut c = Cluster::start_with(
        3,
        Options {
            extra: [
                "--raft-reap-node-timeout-ms",
                "3000",
                "--raft-reap-read-only-node-timeout-ms",
                "2000",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        },
    );
    let ro = c.add_node(&["--non-voter"]);
    poll(TIMEOUT, "four members", || {
        (member_ids(&c)?.len() == 4).then_some(())
    });
    c.kill9(ro);
    let gone = c.followers()[0];
    c.kill9(gone);
    let left = poll(TIMEOUT, "the leader to reap both", || {
        member_ids(&c).filter(|ids| ids.len() == 2)
    });
    assert!(!left.contains(&c.nodes[gone].id.to_string()), "{left:?}");
    c.execute(&stmts(&["CREATE TABLE after_reap (v)"]));
    c.assert_identical();
}

/// Starts a node with `flags` (which name it with `--node-id`) and points the harness at the
/// Raft id the node chose for its name.
fn spawn_named(c: &mut Cluster, flags: &[&str]) -> usize {
    let i = c.spawn_at(&addr(), &addr(), flags);
    let id = poll(TIMEOUT, "the named node's status", || {
        c.nodes[i].status()?["node_id"].as_u64()
    });
    c.nodes[i].id = id;
    c.wait_ready(i);
    i
}

/// The member ids `/nodes?nonvoters` of node `i` shows.
fn shown_ids(c: &Cluster, i: usize) -> Option<Vec<String>> {
    let r = c.nodes[i].client().get(&c.nodes[i].url("/nodes?nonvoters"));
    let mut ids: Vec<String> = r.body.as_object()?.keys().cloned().collect();
    ids.sort();
    Some(ids)
}

/// rqlite's string node ids: `--node-id gw-north` and `--node-id 0` (names) beside a numeric
/// id; every node shows the names in `/nodes`, `/status` and `/leader`; `/remove` takes one.
#[test]
fn test_string_node_ids() {
    // Slow elections: every node's view of the leader is compared with the leader's name.
    let mut c = Cluster::empty(Options::slow_elections());
    let a = spawn_named(&mut c, &["--node-id", "gw-north", "--bootstrap"]);
    let via = c.nodes[a].url("");
    spawn_named(&mut c, &["--node-id", "0", "--join", &via]);
    let raft = c.nodes[a].raft.clone();
    spawn_named(&mut c, &["--node-id", "3", "--join", &raft]);
    let want: Vec<String> = ["0", "3", "gw-north"].map(String::from).to_vec();
    for i in 0..3 {
        poll(TIMEOUT, "every node to show the names", || {
            (shown_ids(&c, i)? == want).then_some(())
        });
    }
    let st = c.nodes[a].status().expect("status");
    assert_eq!(st["node_name"], json!("gw-north"));
    assert_eq!(st["store"]["node_id"], json!("gw-north"));
    let l = c.leader();
    let leader_name = shown_ids(&c, l)
        .and_then(|_| c.nodes[l].status())
        .map(|s| s["store"]["node_id"].clone())
        .expect("leader status");
    for i in 0..3 {
        let st = c.nodes[i].status().expect("status");
        assert_eq!(st["store"]["leader"]["node_id"], leader_name, "{st}");
        let mut ids: Vec<String> = st["store"]["nodes"]
            .as_array()
            .expect("store.nodes")
            .iter()
            .map(|n| n["id"].as_str().unwrap_or_default().to_string())
            .collect();
        ids.sort();
        assert_eq!(ids, want);
    }
    let r = c.nodes[a].client().get(&c.nodes[a].url("/leader"));
    assert_eq!(r.body["leader"]["id"], leader_name, "{:?}", r.body);
    c.execute(&stmts(&[
        "CREATE TABLE named (v)",
        "INSERT INTO named VALUES(1)",
    ]));
    c.assert_identical();

    // `/remove` by name; the removed node ("0", never the leader here) is stopped first.
    let zero = (0..3)
        .find(|&i| {
            c.nodes[i]
                .status()
                .is_some_and(|s| s["node_name"] == json!("0"))
        })
        .expect("node 0");
    if zero == c.leader() {
        return; // an election moved leadership there; the rest is covered above
    }
    c.kill9(zero);
    let r = c.nodes[a]
        .client()
        .delete(&c.nodes[a].url("/remove"), &json!({"id": "0"}));
    assert_eq!(r.status, 200, "{:?}", r.body);
    poll(TIMEOUT, "the named node to be gone", || {
        (shown_ids(&c, a)? == vec!["3".to_string(), "gw-north".to_string()]).then_some(())
    });
}
