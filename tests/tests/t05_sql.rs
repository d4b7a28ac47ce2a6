//! rqlite shapes and SQL semantics, checked through a real three-node cluster.

use cairn_tests::{Cluster, Options, stmts};
use serde_json::json;

#[test]
fn test_parameters_transactions_and_errors() {
    let c = Cluster::start(3);
    let n = &c.nodes[c.leader()];
    let r = n.execute(
        &json!([
            "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT NOT NULL, age INTEGER)",
            ["INSERT INTO people(name, age) VALUES(?, ?)", "fiona", 20],
            ["INSERT INTO people(name, age) VALUES(:name, :age)", {"name": "declan", "age": 30}],
            "INSERT INTO nowhere VALUES(1)"
        ]),
        "?timings",
    );
    assert_eq!(r.status, 200);
    let res = r.body["results"].as_array().unwrap();
    assert_eq!(res.len(), 4);
    assert_eq!(res[2]["last_insert_id"], 2);
    assert!(res[3]["error"].as_str().unwrap().contains("no such table"));
    assert!(r.body["time"].is_number() && res[1]["time"].is_number());

    // ?transaction: the failing statement undoes the ones before it.
    let r = n.execute(
        &json!([
            ["INSERT INTO people(name) VALUES(?)", "aoife"],
            "INSERT INTO people(name) VALUES(NULL)"
        ]),
        "?transaction",
    );
    assert!(
        r.body["results"][1]["error"]
            .as_str()
            .unwrap()
            .contains("NOT NULL")
    );
    let rows = n.rows("SELECT name FROM people ORDER BY id", "strong");
    assert_eq!(rows, vec![vec![json!("fiona")], vec![json!("declan")]]);

    // Associative form and a query through /db/request.
    let r = cairn_tests::post(
        &n.url("/db/request?associative"),
        &json!(["SELECT name, age FROM people WHERE id = 1"]),
    );
    assert_eq!(
        r.body["results"][0]["rows"],
        json!([{"name": "fiona", "age": 20}])
    );
    assert_eq!(
        r.body["results"][0]["types"],
        json!({"name": "text", "age": "integer"})
    );

    // Malformed bodies and writes through /db/query are refused with rqlite's error shape.
    let r = cairn_tests::post(&n.url("/db/execute"), &json!({"not": "an array"}));
    assert_eq!(r.status, 400);
    assert!(r.body["results"][0]["error"].is_string());
    let r = n.query("DELETE FROM people", "weak");
    assert!(r.body["results"][0]["error"].is_string(), "{:?}", r.body);
    let r = n.execute(&stmts(&["BEGIN"]), "");
    assert_eq!(r.status, 400);
    assert_eq!(
        n.rows("SELECT count(*) FROM people", "linearizable")[0][0],
        json!(2)
    );
    c.assert_identical();
}

#[test]
fn test_nondeterministic_sql_is_identical_on_every_replica() {
    let c = Cluster::start(3);
    c.execute(&stmts(&[
        "CREATE TABLE r (a INTEGER, b BLOB, c TEXT, d TEXT, e REAL)",
        "INSERT INTO r VALUES(RANDOM(), RANDOMBLOB(16), CURRENT_TIMESTAMP, datetime('now'), julianday('now'))",
        "INSERT INTO r SELECT abs(random()) % 1000, randomblob(4), CURRENT_DATE, time('now'), unixepoch('now')",
    ]));
    let rows = c.nodes[c.leader()].rows("SELECT * FROM r", "strong");
    assert_eq!(rows.len(), 2);
    assert!(
        rows[0][2].as_str().unwrap().len() == 19,
        "CURRENT_TIMESTAMP became a constant: {rows:?}"
    );
    c.assert_identical();
}

#[test]
fn test_backup_and_load() {
    // Slow elections: a follower found here must still be one when it is asked.
    let c = Cluster::start_with(3, Options::slow_elections());
    c.execute(&stmts(&[
        "CREATE TABLE b (v TEXT)",
        "INSERT INTO b VALUES('kept')",
    ]));
    let f = &c.nodes[c.followers()[0]];
    // A follower redirects to the leader; the leader streams a SQLite file.
    let r = cairn_tests::agent()
        .get(f.url("/db/backup"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 301);
    let loc = r
        .headers()
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let mut r = cairn_tests::agent().get(&loc).call().unwrap();
    let bytes = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    assert!(bytes.starts_with(b"SQLite format 3\0"));

    c.execute(&stmts(&[
        "INSERT INTO b VALUES('after backup')",
        "CREATE TABLE extra (x)",
    ]));
    let l = &c.nodes[c.leader()];
    let r = cairn_tests::agent()
        .post(l.url("/db/load"))
        .header("content-type", "application/octet-stream")
        .send(&bytes[..])
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut r = r;
    let body: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert!(body["results"][0]["error"].is_null(), "{body}");
    c.wait_converged();
    for n in &c.nodes {
        assert_eq!(
            n.rows("SELECT v FROM b", "none"),
            vec![vec![json!("kept")]],
            "node {}",
            n.id
        );
        let extra = n.rows(
            "SELECT count(*) FROM sqlite_master WHERE name = 'extra'",
            "none",
        );
        assert_eq!(extra[0][0], json!(0), "load replaced the whole database");
    }
    c.assert_identical();
}
