//! rqlite's clients and tools work unchanged: pyrqlite (queued writes included) and
//! SQLAlchemy's rqlite dialect (ORM session, reflection), rqdb (sync and asyncio) and rqlite-js
//! through a follower and through the
//! leader of 3 nodes; rqlite's response shapes byte for byte; the operator routes rqlite's
//! tools read (`/status` `store`, `/nodes`, `/leader`, `/snapshot`, `/readyz?sync`,
//! `/debug/vars`, `/db/sql`); read levels `auto` and `freshness`; queued writes under
//! `kill -9` of the leader (every write whose `wait` returned is on every survivor).
//!
//! The clients are installed by `cargo xtask setup` (pyrqlite, sqlalchemy-rqlite and rqdb from
//! PyPI, rqlite-js from npm under `target/rqlite-js`).

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cairn_tests::{Cluster, TIMEOUT, poll, stmts};
use serde_json::json;

const CLIENTS_PY: &str = include_str!("clients/rqlite_clients.py");

/// Runs the Python clients against `host:port` with tables named `prefix_*`.
fn run_python_clients(http: &str, prefix: &str) {
    let (host, port) = http.rsplit_once(':').expect("host:port");
    let out = Command::new("python3")
        .args(["-c", CLIENTS_PY, host, port, prefix])
        .output()
        .expect("python3 (cargo xtask setup installs it with pyrqlite and sqlalchemy-rqlite)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let checks = stdout.lines().filter(|l| l.starts_with("OK ")).count();
    assert!(
        out.status.success() && checks == 6,
        "python clients against {http}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn test_python_clients_through_follower_and_leader() {
    let c = Cluster::start(3);
    let f = c.followers()[0];
    run_python_clients(&c.nodes[f].http, "via_follower");
    let l = c.leader();
    run_python_clients(&c.nodes[l].http, "via_leader");
    // What the clients wrote is on every replica, byte for byte.
    c.assert_identical();
    let n = c.nodes[f].rows("SELECT count(*) FROM via_follower_people", "none");
    assert_eq!(n, vec![vec![json!(26)]]);
}

/// rqdb, a second Python client from PyPI (sync and asyncio): writes, `executemany3` in a
/// transaction, reads at each level, errors and rollback, `explain`, backups.
#[test]
fn test_rqdb_through_follower_and_leader() {
    let c = Cluster::start(3);
    let f = c.followers()[0];
    let l = c.leader();
    for (node, prefix) in [(f, "rqdb_f"), (l, "rqdb_l")] {
        let out = Command::new("python3")
            .args(["-c", include_str!("clients/rqdb_client.py")])
            .args([c.nodes[node].http.as_str(), prefix])
            .output()
            .expect("python3 (cargo xtask setup installs rqdb)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.lines().filter(|l| l.starts_with("OK ")).count() == 6,
            "rqdb against node {}: {stdout}\n{}",
            node + 1,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    c.assert_identical();
}

/// rqlite-js's modules, installed by `cargo xtask setup` under `target/rqlite-js`.
fn rqlite_js_modules() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let dir = root.join("target/rqlite-js/node_modules");
    assert!(
        dir.join("rqlite-js/package.json").exists(),
        "{} lacks rqlite-js: run `cargo xtask setup`",
        dir.display()
    );
    dir
}

#[test]
fn test_rqlite_js_through_follower_and_leader() {
    let c = Cluster::start(3);
    let modules = rqlite_js_modules();
    let script = std::env::temp_dir().join(format!("cairn-rqlite-js-{}.js", std::process::id()));
    std::fs::write(&script, include_str!("clients/rqlite_js.js")).expect("writing the script");
    let f = c.followers()[0];
    let l = c.leader();
    // rqlite-js spreads reads over its hosts and follows redirects to the leader.
    let hosts = format!("{},{}", c.nodes[f].url(""), c.nodes[l].url(""));
    let out = Command::new("node")
        .arg(&script)
        .args([hosts.as_str(), "js_t"])
        .env("NODE_PATH", &modules)
        .output()
        .expect("node (cargo xtask setup installs it)");
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().filter(|l| l.starts_with("OK ")).count() == 4,
        "rqlite-js: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.assert_identical();
}

/// `POST path` with a JSON body; the answer's status and exact text.
fn raw_post(url: &str, body: &str) -> (u16, String) {
    let r = cairn_tests::agent()
        .post(url)
        .header("content-type", "application/json")
        .send(body);
    match r {
        Ok(mut resp) => (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

fn raw_get(url: &str) -> (u16, String) {
    match cairn_tests::agent().get(url).call() {
        Ok(mut resp) => (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

#[test]
fn test_response_shapes_match_rqlite() {
    let c = Cluster::start(3);
    let f = c.followers()[0];
    let node = &c.nodes[f];
    let exec = node.url("/db/execute");

    // DDL answers `{}`: no counters carried over from an earlier statement.
    let (s, t) = raw_post(
        &exec,
        r#"["CREATE TABLE foo (id INTEGER PRIMARY KEY, name TEXT, r REAL, b BLOB)",
            ["INSERT INTO foo(name, r, b) VALUES(?, ?, ?)", "fiona", 1.0, [1, 2, 3]],
            "CREATE INDEX foo_name ON foo(name)",
            "UPDATE foo SET name = 'x' WHERE id = 99"]"#,
    );
    assert_eq!(s, 200, "{t}");
    assert_eq!(
        t,
        r#"{"results":[{},{"last_insert_id":1,"rows_affected":1},{},{}]}"#
    );
    // rqlite's `?pretty`: four spaces.
    let (_, t) = raw_post(
        &format!("{exec}?pretty"),
        r#"[["INSERT INTO foo(name) VALUES(?)", "<b>&"]]"#,
    );
    assert_eq!(
        t,
        "{\n    \"results\": [\n        {\n            \"last_insert_id\": 2,\n            \"rows_affected\": 1\n        }\n    ]\n}"
    );
    // Values as Go writes them: 1.0 is `1`, blobs base64 (or arrays), `<`/`&` escaped.
    let q = node.url("/db/query");
    let (_, t) = raw_post(&q, r#"["SELECT id, name, r, b FROM foo ORDER BY id"]"#);
    assert_eq!(
        t,
        r#"{"results":[{"columns":["id","name","r","b"],"types":["integer","text","real","blob"],"values":[[1,"fiona",1,"AQID"],[2,"\u003cb\u003e\u0026",null,null]]}]}"#
    );
    let (_, t) = raw_post(
        &format!("{q}?associative&blob_array"),
        r#"["SELECT b, id FROM foo WHERE id = 1", "SELECT * FROM foo WHERE id < 0"]"#,
    );
    assert_eq!(
        t,
        r#"{"results":[{"types":{"b":"blob","id":"integer"},"rows":[{"b":[1,2,3],"id":1}]},{"types":{"b":"blob","id":"integer","name":"text","r":"real"},"rows":[]}]}"#
    );
    // A query without rows has no `values`.
    let (_, t) = raw_post(&q, r#"["SELECT name FROM foo WHERE id < 0"]"#);
    assert_eq!(t, r#"{"results":[{"columns":["name"],"types":["text"]}]}"#);
    // The unified endpoint: associative execute results carry `rows: null`.
    let (_, t) = raw_post(
        &format!("{}?associative", node.url("/db/request")),
        r#"[["INSERT INTO foo(name) VALUES(?)", "y"], "SELECT count(*) AS n FROM foo"]"#,
    );
    assert_eq!(
        t,
        r#"{"results":[{"last_insert_id":3,"rows_affected":1,"rows":null},{"types":{"n":"integer"},"rows":[{"n":3}]}]}"#
    );
    // Errors per statement; timings add `time` to each result and the response.
    let r = node.execute(&stmts(&["INSERT INTO nope VALUES(1)"]), "?timings");
    assert_eq!(r.body["results"][0]["error"], "no such table: nope");
    let r = node.execute(
        &json!([["INSERT INTO foo(name) VALUES(?)", "z"]]),
        "?timings",
    );
    assert!(
        r.body["time"].as_f64().is_some_and(|t| t > 0.0),
        "{}",
        r.body
    );
    assert!(
        r.body["results"][0]["time"].as_f64().is_some(),
        "{}",
        r.body
    );

    // level=auto on a voter is weak; freshness on a follower's none read is met while the
    // leader is in touch, strictly too.
    for qs in [
        "level=auto",
        "level=none&freshness=5s",
        "level=none&freshness=5s&freshness_strict",
    ] {
        let r = node.client().get_query(
            &node.url(&format!("/db/query?{qs}")),
            &[("q", "SELECT count(*) FROM foo")],
        );
        assert_eq!(r.body["results"][0]["values"], json!([[4]]), "{qs}: {r:?}");
    }
    let (s, t) = raw_get(&node.url("/db/query?q=SELECT%201&freshness=5parsecs"));
    assert_eq!(s, 400, "{t}");
}

#[test]
fn test_operator_routes_in_rqlite_shapes() {
    let mut c = Cluster::start(3);
    c.execute(&stmts(&["CREATE TABLE t (v)", "INSERT INTO t VALUES(1)"]));
    // A follower whose /status names the leader the harness sees (leadership may move on a
    // loaded machine: asked again until both agree).
    let (l, f, st) = poll(TIMEOUT, "a follower naming the leader", || {
        let l = c.find_leader(&[])?;
        let f = (0..c.nodes.len()).find(|&i| i != l)?;
        let st = c.nodes[f].status()?;
        (st["store"]["leader"]["node_id"] == json!(c.nodes[l].id.to_string())
            && st["store"]["raft"]["state"] == "Follower")
            .then_some((l, f, st))
    });
    let node = &c.nodes[f];
    let get = |path: &str| node.client().get(&node.url(path));

    // /status: rqlite's `store` beside Cairn's own fields.
    let store = &st["store"];
    let leader_id = c.nodes[l].id.to_string();
    assert_eq!(store["leader"]["node_id"], json!(leader_id), "{store}");
    assert_eq!(store["leader"]["addr"], json!(c.nodes[l].raft), "{store}");
    assert_eq!(store["raft"]["state"], "Follower");
    assert_eq!(store["raft"]["voter"], true);
    for k in ["commit_index", "applied_index", "last_log_index"] {
        assert!(
            store["raft"][k].as_u64().is_some_and(|i| i > 0),
            "{k}: {store}"
        );
    }
    assert_eq!(store["fsm_index"], store["db_applied_index"]);
    assert!(store["sqlite3"]["version"].as_str().is_some(), "{store}");
    assert!(st["raft"]["term"].as_u64().is_some(), "Cairn's fields stay");

    // /nodes: a map of string ids (voters), or `{"nodes": [...]}` with ver=2.
    let nodes = get("/nodes").body;
    assert_eq!(nodes.as_object().map(|m| m.len()), Some(3), "{nodes}");
    let me = &nodes[&node.id.to_string()];
    assert_eq!(me["reachable"], true);
    assert!(me["time"].as_f64().is_some(), "{me}");
    let leaders = nodes
        .as_object()
        .unwrap()
        .values()
        .filter(|n| n["leader"] == true)
        .count();
    assert!(leaders <= 1, "{nodes}");
    let v2 = get("/nodes?ver=2").body;
    let ids: Vec<&str> = v2["nodes"]
        .as_array()
        .expect("nodes list")
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{v2}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted by id: {ids:?}");

    // A read replica: not in /nodes unless ?nonvoters; `Follower` with voter false;
    // level=auto reads it locally.
    let r = c.add_node(&["--non-voter"]);
    let replica = &c.nodes[r];
    poll(TIMEOUT, "the replica to apply the table", || {
        let rows = replica.query("SELECT count(*) FROM t", "none");
        (rows.body["results"][0]["values"] == json!([[1]])).then_some(())
    });
    let rs = replica.client().get(&replica.url("/status")).body;
    assert_eq!(rs["store"]["raft"]["state"], "Follower");
    assert_eq!(rs["store"]["raft"]["voter"], false);
    let node = &c.nodes[f];
    let get = |path: &str| node.client().get(&node.url(path));
    assert_eq!(get("/nodes").body.as_object().map(|m| m.len()), Some(3));
    assert_eq!(
        get("/nodes?nonvoters").body.as_object().map(|m| m.len()),
        Some(4)
    );
    let auto = replica.client().get_query(
        &replica.url("/db/query?level=auto"),
        &[("q", "SELECT count(*) FROM t")],
    );
    assert_eq!(auto.body["results"][0]["values"], json!([[1]]), "{auto:?}");

    // /readyz?sync, /snapshot, /db/sql, /debug/vars.
    let ready = get("/readyz?sync");
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    assert!(ready.body.as_str().unwrap_or("").contains("[+]sync ok"));
    let snap = node.client().post(&node.url("/snapshot"), &json!({}));
    assert!(
        snap.body["snapshot_index"].as_u64().is_some_and(|i| i > 0),
        "{snap:?}"
    );
    let st = get("/status").body;
    assert!(st["store"]["raft"]["last_snapshot_index"].as_u64() > Some(0));
    let sql = node.client().post(
        &node.url("/db/sql"),
        &json!(["INSERT INTO t VALUES(random())"]),
    );
    let text = sql.body["results"][0]["sql"].as_str().unwrap_or("");
    assert!(
        text.starts_with("INSERT INTO t VALUES(") && !text.contains("random"),
        "{sql:?}"
    );
    let boot = node.client().post_bytes(
        &node.url("/boot"),
        "application/octet-stream",
        b"SQLite format 3\0",
    );
    assert_eq!(boot.status, 400, "/boot on 3 members: {:?}", boot.body);
    // rqlite's SQL dump of the user tables (this node's copy with `noleader`).
    let (s, dump) = raw_get(&node.url("/db/backup?fmt=sql&noleader"));
    assert_eq!(s, 200, "{dump}");
    assert!(
        dump.starts_with("PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n")
            && dump.contains("CREATE TABLE t (v);\nINSERT INTO \"t\" VALUES(1);\n")
            && dump.ends_with("COMMIT;\n")
            && !dump.contains("_cairn"),
        "{dump}"
    );
    let vars = get("/debug/vars").body;
    assert!(vars["http"]["requests"].as_u64().is_some(), "{vars}");

    // /leader: shown by any node; POST hands leadership over (a follower forwards it).
    let old = poll(TIMEOUT, "/leader to name the leader", || {
        let l = c.find_leader(&[])?;
        let shown = get("/leader").body;
        (shown["leader"]["id"] == json!(c.nodes[l].id.to_string())).then_some(c.nodes[l].id)
    });
    let moved = node.client().post(&node.url("/leader"), &json!({}));
    assert_eq!(moved.status, 200, "{:?}", moved.body);
    let new = c.wait_for_new_leader(old);
    assert_ne!(c.nodes[new].id, old);
    c.execute(&stmts(&["INSERT INTO t VALUES(2)"]));
    c.assert_identical();
}

#[test]
fn test_queued_writes_survive_kill9_of_the_leader() {
    let mut c = Cluster::start(3);
    c.execute(&stmts(&[
        "CREATE TABLE q (id INTEGER PRIMARY KEY, writer INTEGER)",
    ]));
    let l = c.leader();
    let followers = c.followers();
    let urls: Vec<String> = followers
        .iter()
        .map(|&i| c.nodes[i].url("/db/execute?queue&wait&timeout=20s"))
        .collect();
    let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    // Four writers queue through the followers and wait for each write; one counts only when
    // its wait returned 200 with a sequence number.
    let writers: Vec<_> = (0..4i64)
        .map(|w| {
            let (urls, acked, stop) = (urls.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let client = cairn_tests::Client::default();
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = w * 1_000_000 + n;
                    let url = &urls[(n as usize) % urls.len()];
                    let r = client.post(
                        url,
                        &json!([["INSERT OR IGNORE INTO q(id, writer) VALUES(?, ?)", id, w]]),
                    );
                    if r.status == 200 && r.body["sequence_number"].as_i64().is_some() {
                        acked.lock().unwrap().push(id);
                    }
                }
            })
        })
        .collect();
    let count = |acked: &Arc<Mutex<Vec<i64>>>| acked.lock().unwrap().len();
    poll(TIMEOUT, "40 queued writes before the kill", || {
        (count(&acked) >= 40).then_some(())
    });
    let old = c.nodes[l].id;
    c.kill9(l);
    let before = count(&acked);
    let _ = c.wait_for_new_leader(old);
    poll(TIMEOUT, "40 more queued writes after the kill", || {
        (count(&acked) >= before + 40).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    c.wait_converged();
    let acked = acked.lock().unwrap().clone();
    println!("queued writes acknowledged after wait: {}", acked.len());
    for &i in &followers {
        let rows: Vec<i64> = c.nodes[i]
            .rows("SELECT id FROM q ORDER BY id", "none")
            .iter()
            .map(|r| r[0].as_i64().unwrap())
            .collect();
        let missing: Vec<&i64> = acked
            .iter()
            .filter(|id| rows.binary_search(id).is_err())
            .collect();
        assert!(
            missing.is_empty(),
            "node {} lacks {} acknowledged queued writes: {:?}",
            c.nodes[i].id,
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
    c.assert_identical();
}

/// rqlite's `/boot`: a SQLite file made by another program becomes a lone node's database.
#[test]
fn test_boot_a_single_node_from_a_sqlite_file() {
    let c = Cluster::start(1);
    let file = std::env::temp_dir().join(format!("cairn-boot-{}.db", std::process::id()));
    let made = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1])\n\
             c.execute('CREATE TABLE booted (k INTEGER PRIMARY KEY, v TEXT)')\n\
             c.executemany('INSERT INTO booted(v) VALUES(?)', [('a',), ('b',), ('c',)])\n\
             c.commit()",
        ])
        .arg(&file)
        .status()
        .expect("python3");
    assert!(made.success());
    let bytes = std::fs::read(&file).expect("the SQLite file");
    let _ = std::fs::remove_file(&file);
    let n = &c.nodes[0];
    let r = n
        .client()
        .post_bytes(&n.url("/boot"), "application/octet-stream", &bytes);
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        n.rows("SELECT v FROM booted ORDER BY k", "strong"),
        vec![vec![json!("a")], vec![json!("b")], vec![json!("c")]]
    );
}

/// rqlite's `-raft-cluster-remove-shutdown`: a member stopped with SIGTERM leaves the cluster,
/// and the others go on with one member less.
#[test]
fn test_a_member_with_remove_shutdown_leaves_when_stopped() {
    let mut c = Cluster::start(3);
    let i = c.add_node(&["--raft-cluster-remove-shutdown"]);
    let members = |c: &Cluster| {
        let l = c.find_leader(&[])?;
        let st = c.nodes[l].status()?;
        Some(st["store"]["nodes"].as_array()?.len())
    };
    poll(TIMEOUT, "4 voters", || {
        let l = c.find_leader(&[])?;
        (c.nodes[l].status()?["raft"]["voters"].as_array()?.len() == 4).then_some(())
    });
    assert!(c.terminate(i), "the leaving node exits cleanly");
    poll(TIMEOUT, "3 members after the stop", || {
        (members(&c)? == 3).then_some(())
    });
    c.execute(&stmts(&["CREATE TABLE after_leave (v)"]));
    c.assert_identical();
}

/// `cairn shell` through a pseudo-terminal: SQL and rqlite's dot commands.
#[test]
fn test_shell_dot_commands_through_a_pty() {
    let c = Cluster::start(3);
    let f = c.followers()[0];
    let history = c.dir().join("shell_history");
    let out = Command::new("python3")
        .args(["-c", include_str!("clients/shell_pty.py")])
        .arg(cairn_tests::cairn_bin())
        .arg(c.nodes[f].url(""))
        .env("CAIRN_HISTFILE", &history)
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "shell: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "from the shell",
        "sh_v",
        "Run Time:",
        "[+]node ok",
        "CREATE TABLE sh",
        "\"leader\"",
        "id,\"the, value\"\r\n1,from the shell",
        "line_v = from the shell",
        "\"json_v\": \"from the shell\"",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    // The Up arrow ran the last statement again: its answer twice.
    assert_eq!(text.matches("again").count(), 4, "{text}");
    // History kept in the file, each line once after a repeat, the newest last.
    let kept = std::fs::read_to_string(&history).expect("the history file");
    let lines: Vec<&str> = kept.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"CREATE TABLE sh (id INTEGER PRIMARY KEY, v TEXT)")
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("'again'")).count(),
        1,
        "{kept}"
    );
    assert_eq!(
        lines[lines.len() - 2..],
        ["SELECT 'again' AS hist", ".exit"],
        "{kept}"
    );
    c.assert_identical();
}
