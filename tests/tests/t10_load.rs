//! `/db/load` keeps Cairn's state consistent (issue 26, item 6): a plain SQLite file replaces
//! the user's tables and leaves the registry and high-water marks alone; a Cairn backup
//! restores data and state together; a large file reaches the followers in bounded chunks
//! through the log; a load beyond `max_db_size_mib` is refused.

use std::path::Path;

use cairn_tests::device::register;
use cairn_tests::{Cluster, Node, Options, TIMEOUT, poll, post, stmts};
use serde_json::{Value as Json, json};

/// A SQLite file with table `big` of `rows` rows of 1 KiB blobs (deterministic contents).
fn sqlite_file(dir: &Path, rows: i64) -> Vec<u8> {
    let path = dir.join(format!("src-{rows}.db"));
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute_batch(
        "CREATE TABLE big (id INTEGER PRIMARY KEY, v BLOB);
         CREATE TABLE small (a TEXT); INSERT INTO small VALUES('from the file');",
    )
    .unwrap();
    db.execute(
        "INSERT INTO big(id, v) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c \
         LIMIT ?1) SELECT x, zeroblob(1024) FROM c",
        [rows],
    )
    .unwrap();
    drop(db);
    std::fs::read(&path).unwrap()
}

/// `POST /db/load` of a SQLite file: (status, body). A 503 (no leader at hand, nothing
/// proposed) is sent again, as rqlite clients do.
fn load(node: &Node, bytes: &[u8]) -> (u16, Json) {
    poll(TIMEOUT, "a load not refused with 503", || {
        let mut r = cairn_tests::agent()
            .post(node.url("/db/load"))
            .header("content-type", "application/octet-stream")
            .send(bytes)
            .unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Json::String(text));
        if status == 503 {
            println!("load answered 503, sending it again: {body}");
            return None;
        }
        Some((status, body))
    })
}

/// `GET /db/backup` from the leader.
fn backup(node: &Node) -> Vec<u8> {
    let mut r = cairn_tests::agent()
        .get(node.url("/db/backup"))
        .call()
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "GET /db/backup on node {}",
        node.id
    );
    r.body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap()
}

/// The registered devices and (device id, high-water) pairs in node `n`'s database file.
fn state(n: &Node) -> (Vec<i64>, Vec<(i64, i64)>) {
    let db = rusqlite::Connection::open_with_flags(
        n.dir.join("sm").join("db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let devices = db
        .prepare("SELECT device_id FROM _cairn_devices ORDER BY 1")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let hw = db
        .prepare("SELECT device_id, seq FROM _cairn_high_water ORDER BY 1")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let chunks: i64 = db
        .query_row("SELECT count(*) FROM _cairn_load", [], |r| r.get(0))
        .unwrap_or(0);
    assert_eq!(chunks, 0, "node {}: the load's chunks are gone", n.id);
    (devices, hw)
}

fn reset(node: &Node, id: u64, seq: u64) {
    let r = post(
        &node.url(&format!("/devices/{id}/reset")),
        &json!({ "seq": seq }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Node `n` holds the 10,000-row file loaded over table `old`, with device 7 registered at
/// high-water 5 as before the load.
fn assert_plain_load(n: &Node) {
    assert_eq!(
        n.rows("SELECT count(*) FROM big", "none"),
        [[json!(10_000)]]
    );
    assert_eq!(
        n.rows(
            "SELECT count(*) FROM sqlite_master WHERE name = 'old'",
            "none"
        ),
        [[json!(0)]],
        "node {}: user tables replaced",
        n.id
    );
    assert_eq!(
        state(n),
        (vec![7], vec![(7, 5)]),
        "node {}: registry kept",
        n.id
    );
}

#[test]
fn test_chunked_load_keeps_or_restores_cairns_state() {
    // Slow elections: the backup is fetched from the leader found here (a follower redirects).
    let c = Cluster::start_with(3, Options::slow_elections());
    let dir = tempfile::tempdir().unwrap();
    let leader = &c.nodes[c.leader()];
    register(&leader.url(""), 7..8).unwrap();
    reset(leader, 7, 5);
    c.execute(&stmts(&[
        "CREATE TABLE old (a)",
        "INSERT INTO old VALUES(1)",
    ]));
    let saved = backup(leader);

    // A plain file of ~10 MiB: three log entries of at most 4 MiB, sent to a follower.
    let file = sqlite_file(dir.path(), 10_000);
    println!("plain SQLite file: {} KiB", file.len() >> 10);
    let follower = &c.nodes[c.followers()[0]];
    let (status, body) = load(follower, &file);
    assert_eq!(status, 200, "{body}");
    assert!(body["results"][0]["error"].is_null(), "{body}");
    assert_eq!(body["results"][0]["rows_affected"], 10_001);
    c.wait_converged();
    for n in &c.nodes {
        assert_plain_load(n);
    }
    c.assert_identical();

    // State moves on, then the backup comes back: data and state as they were, together.
    register(&leader.url(""), 8..9).unwrap();
    reset(leader, 7, 9);
    let (status, body) = load(leader, &saved);
    assert_eq!(status, 200, "{body}");
    assert!(body["results"][0]["error"].is_null(), "{body}");
    c.wait_converged();
    for n in &c.nodes {
        assert_eq!(
            state(n),
            (vec![7], vec![(7, 5)]),
            "node {}: state restored",
            n.id
        );
        assert_eq!(n.rows("SELECT a FROM old", "none"), [[json!(1)]]);
        assert_eq!(
            n.rows(
                "SELECT count(*) FROM sqlite_master WHERE name = 'big'",
                "none"
            ),
            [[json!(0)]]
        );
    }
    c.assert_identical();
}

/// A load while a follower is down, then a snapshot past it: the follower installs the live
/// database the leader streams (a file swap) and ends with the loaded tables and Cairn's state
/// as on the others, no chunks left, identical bytes; then it applies from the log again.
#[test]
fn test_load_then_snapshot_install_on_a_lagging_follower() {
    let mut c = Cluster::start_with(3, Options::snapshot_often(20, 5));
    let dir = tempfile::tempdir().unwrap();
    let leader = c.leader();
    register(&c.nodes[leader].url(""), 7..8).unwrap();
    reset(&c.nodes[leader], 7, 5);
    c.execute(&stmts(&[
        "CREATE TABLE old (a)",
        "INSERT INTO old VALUES(1)",
    ]));
    let f = c.followers()[0];
    let behind = c.nodes[f].applied_index().expect("follower status");
    c.kill9(f);

    let (status, body) = load(&c.nodes[c.leader()], &sqlite_file(dir.path(), 10_000));
    assert_eq!(status, 200, "{body}");
    assert!(body["results"][0]["error"].is_null(), "{body}");
    c.execute(&stmts(&["CREATE TABLE after_load (k INTEGER PRIMARY KEY)"]));
    for k in 0..30 {
        c.execute(&serde_json::json!([[
            "INSERT INTO after_load(k) VALUES(?)",
            k
        ]]));
    }
    let l = c.leader();
    let purged = poll(TIMEOUT, "the leader to purge its log past the load", || {
        let p = c.nodes[l].status()?["raft"]["purged_index"].as_u64()?;
        (p > behind + 3).then_some(p)
    });
    println!("follower stopped at {behind}, leader purged through {purged}");
    c.restart(f);
    c.wait_converged();
    let snap = c.nodes[f].status().unwrap()["raft"]["snapshot_index"]
        .as_u64()
        .expect("follower installed a snapshot");
    assert!(snap > behind, "snapshot {snap} should be past {behind}");
    for n in &c.nodes {
        assert_plain_load(n);
        assert_eq!(
            n.rows("SELECT count(*) FROM after_load", "none"),
            [[json!(30)]]
        );
    }
    c.assert_identical();
    // After the install the follower applies from the log again.
    c.execute(&stmts(&["INSERT INTO after_load(k) VALUES(100)"]));
    c.wait_converged();
    assert_eq!(
        c.nodes[f].rows("SELECT count(*) FROM after_load", "none"),
        [[json!(31)]]
    );
    c.assert_identical();
}

#[test]
fn test_load_beyond_max_db_size_is_refused() {
    let c = Cluster::start_with(
        1,
        Options {
            extra: vec!["--max-db-size-mib".into(), "2".into()],
            ..Options::default()
        },
    );
    c.execute(&stmts(&[
        "CREATE TABLE kept (a)",
        "INSERT INTO kept VALUES(1)",
    ]));
    let dir = tempfile::tempdir().unwrap();
    let (status, body) = load(&c.nodes[0], &sqlite_file(dir.path(), 4_000));
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("max_db_size_mib"), "{body}");
    assert_eq!(c.nodes[0].rows("SELECT a FROM kept", "none"), [[json!(1)]]);
    // Under the limit it goes through.
    let (status, body) = load(&c.nodes[0], &sqlite_file(dir.path(), 500));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        c.nodes[0].rows("SELECT count(*) FROM big", "none"),
        [[json!(500)]]
    );
}
