//! Bad input at the HTTP edge: malformed JSON, wrong shapes, invalid SQL, huge bodies and
//! half-open connections. Each gets a clear error (rqlite's `{"results":[{"error":..}]}`),
//! the node stays up, and nothing written before is lost or diverges.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use cairn_tests::{Cluster, agent, stmts};
use serde_json::{Value as Json, json};

/// Sends raw bytes as the body of `POST path`; returns (status, body as JSON or string).
fn post_raw(url: &str, content_type: &str, body: Vec<u8>) -> (u16, Json) {
    match agent()
        .post(url)
        .header("content-type", content_type)
        .send(&body[..])
    {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r
                .body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_string()
                .unwrap_or_default();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Json::String(text)),
            )
        }
        Err(e) => (0, Json::String(e.to_string())),
    }
}

fn error_of(body: &Json) -> &str {
    body["results"][0]["error"].as_str().unwrap_or("")
}

fn seeded_cluster() -> Cluster {
    let c = Cluster::start(3);
    c.execute(&stmts(&[
        "CREATE TABLE kept (id INTEGER PRIMARY KEY, v TEXT)",
        "INSERT INTO kept(v) VALUES ('before')",
    ]));
    c
}

/// The node answers, the row written first is still there, replicas are identical.
fn assert_intact(c: &Cluster) {
    for n in &c.nodes {
        assert!(n.status().is_some(), "node {} stopped answering", n.id);
    }
    let l = c.leader();
    assert_eq!(
        c.nodes[l].rows("SELECT v FROM kept WHERE id = 1", "linearizable"),
        vec![vec![json!("before")]]
    );
    c.assert_identical();
}

#[test]
fn test_malformed_json_and_wrong_shapes_are_400_with_an_error() {
    let c = seeded_cluster();
    let l = c.leader();
    let f = c.followers()[0];
    let bodies: &[&[u8]] = &[
        b"",
        b"[",
        b"{\"a\":",
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"{\"statements\": 1}",
        b"[1, 2, 3]",
        b"[[]]",
        b"[[42, \"x\"]]",
        b"[null]",
    ];
    // Well-formed but unusable parameters: a 400, or rqlite's 200 with an error result.
    let bad_params: &[&[u8]] = &[
        b"[[\"SELECT ?\", {\"a\": [1, 2]}]]",
        b"[[\"SELECT :a\", {\"a\": {\"deep\": true}}]]",
    ];
    for i in [l, f] {
        for path in ["/db/execute", "/db/query", "/db/request"] {
            for body in bodies {
                let (status, reply) =
                    post_raw(&c.nodes[i].url(path), "application/json", body.to_vec());
                assert_eq!(
                    status,
                    400,
                    "{path} on node {} with {:?}: {reply}",
                    c.nodes[i].id,
                    String::from_utf8_lossy(body)
                );
                assert!(!error_of(&reply).is_empty(), "{path}: no error in {reply}");
            }
            for body in bad_params {
                let (status, reply) =
                    post_raw(&c.nodes[i].url(path), "application/json", body.to_vec());
                assert!(status == 400 || status == 200, "{path}: HTTP {status}");
                assert!(!error_of(&reply).is_empty(), "{path}: no error in {reply}");
            }
        }
    }
    // Deeply nested JSON must not overflow the parser's stack.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let (status, reply) = post_raw(
        &c.nodes[l].url("/db/execute"),
        "application/json",
        deep.into_bytes(),
    );
    assert_eq!(status, 400, "{reply}");
    assert_intact(&c);
}

#[test]
fn test_invalid_sql_is_an_error_result_and_nothing_else_changes() {
    let c = seeded_cluster();
    let l = c.leader();
    let n = &c.nodes[l];
    for sql in [
        "INSERT INTO missing VALUES (1)",
        "SELEKT * FROM kept",
        "INSERT INTO kept(id, v) VALUES (1, 'duplicate primary key')",
        "CREATE TABLE kept (x)",
        "\u{0}",
        "'",
    ] {
        let r = n.execute(&stmts(&[sql]), "");
        assert!(
            !error_of(&r.body).is_empty(),
            "{sql:?}: no error in {:?}",
            r.body
        );
        let r = n.query(sql, "linearizable");
        assert!(
            r.status != 200 || !error_of(&r.body).is_empty(),
            "{sql:?} as a query: {:?}",
            r.body
        );
    }
    // In a transaction, a failing statement rolls back the ones before it.
    let r = n.execute(
        &stmts(&[
            "INSERT INTO kept(v) VALUES ('rolled back')",
            "INSERT INTO nowhere VALUES (1)",
        ]),
        "?transaction",
    );
    assert!(
        r.body["results"].to_string().contains("error"),
        "{:?}",
        r.body
    );
    assert_eq!(
        n.rows("SELECT count(*) FROM kept", "linearizable"),
        vec![vec![json!(1)]]
    );
    // Wrong parameter counts and unknown levels are clear errors too.
    let r = n.execute(&json!([["INSERT INTO kept(v) VALUES (?)", 1, 2]]), "");
    assert!(!error_of(&r.body).is_empty(), "{:?}", r.body);
    let r = n.query("SELECT 1", "sometimes");
    assert_eq!(r.status, 400);
    assert!(error_of(&r.body).contains("level"), "{:?}", r.body);
    assert_intact(&c);
}

#[test]
fn test_huge_bodies_are_answered_and_the_node_stays_up() {
    let c = seeded_cluster();
    let l = c.leader();
    let url = c.nodes[l].url("/db/execute");
    // 8 MiB of garbage: refused as JSON.
    let (status, reply) = post_raw(&url, "application/json", vec![b'x'; 8 << 20]);
    assert_eq!(status, 400, "{reply}");
    // A valid 4 MiB value goes through Raft and comes back whole on every replica.
    let big = "y".repeat(4 << 20);
    let body = serde_json::to_vec(&json!([["INSERT INTO kept(v) VALUES (?)", big]])).unwrap();
    let (status, reply) = post_raw(&url, "application/json", body);
    assert_eq!(status, 200, "{reply}");
    let id = reply["results"][0]["last_insert_id"].as_i64().expect("id");
    c.wait_converged();
    for n in &c.nodes {
        let rows = n.rows(
            &format!("SELECT length(v) FROM kept WHERE id = {id}"),
            "none",
        );
        assert_eq!(rows, vec![vec![json!(4 << 20)]], "node {}", n.id);
    }
    // Beyond the server's body limit: an error status, not a crash.
    let (status, _) = post_raw(&url, "application/json", vec![b'['; 300 << 20]);
    assert!(
        status == 413 || status == 400 || status == 0,
        "300 MiB body got HTTP {status}"
    );
    assert_intact(&c);
}

#[test]
fn test_half_open_and_slow_connections_do_not_stop_the_node() {
    let c = seeded_cluster();
    let l = c.leader();
    let addr = c.nodes[l].http.clone();
    let mut held = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(&addr).expect("connect");
        // Half a request line, half the headers, or a body shorter than announced.
        let partial: &[u8] = match i % 3 {
            0 => b"POST /db/exec",
            1 => b"POST /db/execute HTTP/1.1\r\nHost: x\r\nContent-Le",
            _ => b"POST /db/execute HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n[\"INS",
        };
        s.write_all(partial).expect("write");
        held.push(s);
    }
    // Some peers vanish without a FIN: shut down only the write half of a few.
    for s in held.iter().take(20) {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    // While those hang, the node still serves writes and linearizable reads.
    c.execute(&stmts(&["INSERT INTO kept(v) VALUES ('during')"]));
    assert_eq!(
        c.nodes[l].rows("SELECT count(*) FROM kept", "linearizable"),
        vec![vec![json!(2)]]
    );
    // A connection that sent garbage instead of HTTP gets an answer or a close, not a hang.
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00garbage that is not http\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(
        buf.is_empty() || text.starts_with("HTTP/1.1 4"),
        "garbage got: {text}"
    );
    drop(held);
    assert_intact(&c);
}
