//! Issue 26: no SQL statement can stop the cluster or reach outside the user's tables.
//!
//! Every attack of the issue's first paragraph goes through `/db/execute`, `/db/request` and
//! `/db/query` of a real 3-node cluster: each gets a clear error result, every node stays up
//! (also across a restart), the replicas stay identical (user tables read with `level=none`,
//! and every table including Cairn's own read straight from each node's database file), and
//! nothing is written outside the data directories. Then a bounded, seeded fuzz of hostile
//! SQL, the write budget and the read time limit with recursive CTEs, and `/db/load`.
//!
//! The cluster runs with `--auth`, and every attack and the fuzz come from an application
//! user with only the `execute` and `query` permissions ([`APP`]); `/db/load` needs `load`
//! and is sent as the administrator.

use std::collections::BTreeMap;
use std::path::Path;

use cairn_tests::http::Client;
use cairn_tests::{ADMIN, Cluster, JOINER, Options, Reply, Security, TIMEOUT, stmts};
use serde_json::json;

/// The application user every statement is sent as.
const APP: (&str, &str) = ("app", "app-pw");

/// A cluster with `--auth` (no TLS: the permissions are what this test is about) and `extra`
/// node flags.
fn cluster(extra: &[&str]) -> Cluster {
    Cluster::start_with(
        3,
        Options {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            security: Some(Security {
                users: json!([
                    {"username": ADMIN.0, "password": ADMIN.1, "perms": ["all"]},
                    {"username": JOINER.0, "password": JOINER.1, "perms": ["join"]},
                    {"username": APP.0, "password": APP.1, "perms": ["execute", "query"]},
                ]),
                http_tls: false,
                node_tls: false,
            }),
            ..Options::default()
        },
    )
}

/// A client that authenticates as [`APP`].
fn app(c: &Cluster) -> Client {
    Client::with_auth(TIMEOUT, None, &c.nodes[0].auth().as_user(APP.0, APP.1))
}

/// Every table of a node's database file (Cairn's included, Raft metadata excluded), rows
/// sorted: what must be identical on every replica.
fn file_contents(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let db = rusqlite::Connection::open_with_flags(
        dir.join("sm").join("db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let tables: Vec<String> = db
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             AND name != '_cairn_raft' AND sql NOT LIKE 'CREATE VIRTUAL%'",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = BTreeMap::new();
    for t in tables {
        let mut st = db.prepare(&format!("SELECT * FROM \"{t}\"")).unwrap();
        let n = st.column_count();
        let mut rows: Vec<String> = st
            .query_map([], |r| {
                Ok((0..n)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        rows.sort();
        out.insert(t, rows);
    }
    let schema: Vec<String> = db
        .prepare(
            "SELECT type || ' ' || name || ' ' || ifnull(sql, '') FROM sqlite_master ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    out.insert("(schema)".into(), schema);
    out
}

/// All nodes up, replicas identical (HTTP checksum of user tables and the files themselves).
fn assert_healthy(c: &mut Cluster) {
    for i in 0..c.nodes.len() {
        assert!(c.nodes[i].is_running(), "node {} exited", c.nodes[i].id);
        c.wait_ready(i);
    }
    c.assert_identical();
    let first = file_contents(&c.nodes[0].dir);
    for n in &c.nodes[1..] {
        assert!(
            file_contents(&n.dir) == first,
            "node {}'s database differs from node 1's",
            n.id
        );
    }
}

/// The error of every statement of an answer (a 4xx whole-request error counts once).
fn errors(r: &Reply) -> Vec<Option<String>> {
    r.body["results"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.get("error").and_then(|e| e.as_str()).map(String::from))
                .collect()
        })
        .unwrap_or_else(|| vec![Some(format!("{:?}", r.body))])
}

fn assert_refused(r: &Reply, what: &str) -> String {
    assert!(
        r.status == 200 || r.status == 400,
        "{what}: status {} {:?}",
        r.status,
        r.body
    );
    let e = errors(r);
    assert!(
        !e.is_empty() && e.iter().all(Option::is_some),
        "{what} was not refused: {:?}",
        r.body
    );
    e[0].clone().unwrap()
}

#[test]
fn t22_attacks_are_refused_and_the_cluster_stays_up() {
    let mut c = cluster(&["--read-timeout-ms", "1500"]);
    let app = app(&c);
    c.execute(&stmts(&[
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
        "INSERT INTO t(v) VALUES('kept')",
    ]));
    let outside = c.dir().join("outside.db");
    let tmp = std::env::temp_dir().join(format!("cairn-t22-{}.db", std::process::id()));
    let raft_db = c.nodes[0].dir.join("raft.db");
    let attacks: Vec<String> = vec![
        "PRAGMA query_only=1".into(),
        format!("ATTACH DATABASE '{}' AS r", raft_db.display()),
        format!("ATTACH DATABASE '{}' AS o", outside.display()),
        "PRAGMA query_only=0".into(),
        format!("VACUUM INTO '{}'", tmp.display()),
        "VACUUM".into(),
        "PRAGMA writable_schema=ON".into(),
        "PRAGMA journal_mode=OFF".into(),
        "UPDATE _cairn_high_water SET seq = seq + 1000".into(),
        "INSERT INTO _cairn_high_water VALUES(1, 1000)".into(),
        "UPDATE _cairn_raft SET value = x'00'".into(),
        "DELETE FROM _cairn_streams".into(),
        "DROP TABLE _cairn_devices".into(),
        "SELECT * FROM _cairn_devices".into(),
        "SELECT load_extension('/tmp/evil.so')".into(),
        "BEGIN".into(),
        "COMMIT".into(),
        "CREATE TEMP TABLE tt(a)".into(),
        "INSERT INTO t(v) VALUES(datetime('now', 'localtime'))".into(),
        "INSERT INTO t(v) SELECT changes()".into(),
        // The raw-page table (compiled in for snapshot transfers) is not there for user SQL.
        "SELECT * FROM sqlite_dbpage".into(),
        "SELECT data FROM sqlite_dbpage('main') WHERE pgno = 1".into(),
        "INSERT INTO t(v) SELECT hex(data) FROM sqlite_dbpage".into(),
        "UPDATE sqlite_dbpage SET data = zeroblob(4096) WHERE pgno = 1".into(),
        "INSERT INTO sqlite_dbpage(pgno, data) VALUES(1, zeroblob(4096))".into(),
        "DELETE FROM sqlite_dbpage".into(),
        "CREATE VIRTUAL TABLE p USING sqlite_dbpage".into(),
    ];
    for sql in &attacks {
        let l = c.leader();
        let n = &c.nodes[l];
        let e = assert_refused(
            &app.post(&n.url("/db/execute"), &json!([sql])),
            &format!("execute {sql}"),
        );
        println!("execute {sql}\n    -> {e}");
        let r = app.post(&n.url("/db/request"), &json!([sql]));
        assert_refused(&r, &format!("request {sql}"));
        for level in ["none", "weak", "strong"] {
            let r = app.get_query(&n.url("/db/query"), &[("q", sql), ("level", level)]);
            assert_refused(&r, &format!("query level={level} {sql}"));
        }
    }
    assert!(
        !outside.exists() && !tmp.exists(),
        "a file was written outside the data dirs"
    );
    // The cluster still takes writes, and the regression of `PRAGMA query_only=1`: a node
    // that restarts re-applies the entries and comes back.
    c.execute(&stmts(&["INSERT INTO t(v) VALUES('after')"]));
    let f = c.followers()[0];
    assert!(c.terminate(f));
    c.restart(f);
    assert_healthy(&mut c);
    let l = c.leader();
    assert_eq!(
        c.nodes[l].rows("SELECT count(*) FROM t", "none"),
        vec![vec![json!(2)]]
    );
    assert_eq!(
        c.nodes[l].rows(
            "SELECT count(*) FROM sqlite_master WHERE name = 'p'",
            "none"
        ),
        vec![vec![json!(0)]],
        "no table over the raw pages"
    );

    // Schema tools keep working: Cairn's tables are listed and described, not read.
    let n = &c.nodes[l];
    let names = n.rows(
        "SELECT name FROM sqlite_master WHERE name LIKE '\\_cairn\\_%' ESCAPE '\\'",
        "none",
    );
    assert!(!names.is_empty());
    let info = n.rows("PRAGMA table_info(_cairn_raft)", "weak");
    assert_eq!(info.len(), 2);

    // The write budget: an endless recursive CTE fails the same way on every replica.
    let r = app.post(
        &n.url("/db/execute"),
        &stmts(&[
            "INSERT INTO t(v) VALUES('before budget')",
            "INSERT INTO t(v) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
             SELECT x FROM c",
        ]),
    );
    let e = errors(&r);
    assert!(e[0].is_none(), "{:?}", r.body);
    assert!(
        e[1].as_deref().unwrap_or("").contains("write budget"),
        "{:?}",
        r.body
    );
    // The read time limit.
    let r = app.get_query(
        &n.url("/db/query"),
        &[
            (
                "q",
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
                 SELECT count(*) FROM c",
            ),
            ("level", "none"),
        ],
    );
    assert!(
        errors(&r)[0]
            .as_deref()
            .unwrap_or("")
            .contains("read_timeout"),
        "{:?}",
        r.body
    );

    // /db/load needs `load`: the application user is refused.
    let r = app.post_bytes(&n.url("/db/load"), "text/plain", b"CREATE TABLE nope(a);");
    assert_eq!(r.status, 403, "{:?}", r.body);
    // /db/load: SQL text runs sandboxed and never touches Cairn's tables.
    let admin = n.client();
    for text in [
        format!("ATTACH '{}' AS x; CREATE TABLE x.y(a);", outside.display()),
        "CREATE VIRTUAL TABLE p USING sqlite_dbpage;".into(),
        "CREATE TABLE pages AS SELECT data FROM sqlite_dbpage;".into(),
        "CREATE TABLE big(a); WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) \
         INSERT INTO big SELECT randomblob(100000) FROM c;"
            .into(),
    ] {
        let r = admin.post_bytes(&n.url("/db/load"), "text/plain", text.as_bytes());
        assert_ne!(r.status, 200, "{text}");
    }
    let r = admin.post_bytes(
        &n.url("/db/load"),
        "text/plain",
        b"BEGIN; CREATE TABLE loaded(a); INSERT INTO loaded VALUES(1); COMMIT;",
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_healthy(&mut c);
    let l = c.leader();
    // The load's own chunk table (`_cairn_load`) is the one Cairn table a load adds.
    let after = c.nodes[l].rows(
        "SELECT count(*) FROM sqlite_master WHERE name LIKE '\\_cairn\\_%' ESCAPE '\\' \
         AND name != '_cairn_load'",
        "none",
    );
    assert_eq!(
        after,
        vec![vec![json!(names.len())]],
        "load left Cairn's tables alone"
    );
    assert!(!outside.exists());
}

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[(self.next() % v.len() as u64) as usize]
    }
}

/// One hostile statement.
fn hostile(r: &mut Rng, dir: &Path) -> String {
    let table = r.pick(&[
        "f",
        "g",
        "_cairn_devices",
        "_cairn_high_water",
        "telemetry",
        "sqlite_master",
        "_cairn_raft",
    ]);
    let expr = r.pick(&[
        "random()",
        "randomblob(16)",
        "datetime('now')",
        "CURRENT_TIMESTAMP",
        "datetime('now','localtime')",
        "strftime('%s','now','utc')",
        "changes()",
        "total_changes()",
        "last_insert_rowid()",
        "julianday()",
        "unixepoch()",
        "zeroblob(100000000)",
        "printf('%.*c', 100000000, 'x')",
        "hex(randomblob(1000))",
        "sqlite_offset(a)",
        "load_extension('x')",
        "(SELECT count(*) FROM _cairn_devices)",
        "(SELECT seq FROM _cairn_high_water)",
        "1",
        "'text'",
        "x'00ff'",
        "9223372036854775807",
    ]);
    let depth = (r.next() % 1200) as usize;
    match r.next() % 22 {
        0 => format!(
            "PRAGMA {}",
            r.pick(&[
                "query_only=1",
                "query_only=0",
                "writable_schema=1",
                "journal_mode=delete",
                "foreign_keys=0",
                "defer_foreign_keys=1",
                "recursive_triggers=1",
                "max_page_count=1",
                "cache_size=1",
                "temp_store_directory='/tmp'",
                "user_version=3",
                "table_info(f)",
                "integrity_check",
                "optimize",
                "wal_checkpoint",
                "page_count",
                "data_version",
                "locking_mode=exclusive",
                "synchronous=off",
                "mmap_size=1000000000"
            ])
        ),
        1 => format!(
            "ATTACH '{}' AS a{}",
            dir.join(format!("fz{}.db", r.next() % 4)).display(),
            r.next() % 3
        ),
        2 => r
            .pick(&[
                "BEGIN",
                "COMMIT",
                "ROLLBACK",
                "SAVEPOINT x",
                "RELEASE cairn_statement",
                "ROLLBACK TO cairn_request",
                "END",
                "BEGIN IMMEDIATE",
            ])
            .into(),
        3 => format!("INSERT INTO {table} VALUES({expr}, {expr})"),
        4 => format!("INSERT INTO f(a, b) VALUES({expr}, {expr})"),
        5 => format!("UPDATE {table} SET a = {expr}"),
        6 => format!("DELETE FROM {table}"),
        7 => format!("DROP TABLE {table}"),
        8 => format!(
            "CREATE TRIGGER tr{} AFTER INSERT ON {table} BEGIN INSERT INTO g VALUES({expr}, {expr}); END",
            r.next() % 5
        ),
        9 => format!(
            "INSERT INTO f WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT {}) SELECT x, {expr} FROM c",
            r.next() % 10_000_000
        ),
        10 => format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth)),
        11 => format!("SELECT {}", vec!["1"; depth + 1].join(" + ")),
        12 => format!(
            "INSERT INTO f VALUES('{}', 1)",
            "x".repeat((r.next() % 3_000_000) as usize)
        ),
        13 => format!(
            "INSERT OR {} INTO f VALUES(1, {expr})",
            r.pick(&["ROLLBACK", "ABORT", "FAIL", "IGNORE", "REPLACE"])
        ),
        14 => format!(
            "CREATE {} f{} (a, b)",
            r.pick(&["TABLE", "TEMP TABLE", "VIRTUAL TABLE", "VIEW"]),
            r.next() % 3
        ),
        15 => format!("ALTER TABLE {table} ADD COLUMN z DEFAULT ({expr})"),
        16 => format!("CREATE INDEX ix{} ON {table}(a)", r.next() % 4),
        17 => format!(
            "VACUUM {}",
            r.pick(&["", "INTO '/tmp/cairn-fuzz.db'", "main"])
        ),
        18 => format!("SELECT * FROM {table} LIMIT 5"),
        19 => format!(
            "INSERT INTO f(rowid, a) VALUES({}, {expr})",
            r.pick(&["9223372036854775807", "NULL", "-1"])
        ),
        20 => format!(
            "CREATE TABLE IF NOT EXISTS h{} (a DEFAULT CURRENT_TIMESTAMP, b DEFAULT (random()), c REFERENCES f(a) DEFERRABLE INITIALLY DEFERRED)",
            r.next() % 3
        ),
        _ => format!("SELECT {expr}, {expr}"),
    }
}

#[test]
fn t22_fuzz_hostile_sql() {
    let mut c = cluster(&[]);
    let app = app(&c);
    c.execute(&stmts(&["CREATE TABLE f (a, b)", "CREATE TABLE g (a, b)"]));
    let dir = c.dir().join("fuzz-outside");
    let mut rng = Rng(0x5eed_0026);
    let started = std::time::Instant::now();
    let (mut requests, mut statements, mut refused) = (0u64, 0u64, 0u64);
    while started.elapsed() < std::time::Duration::from_secs(45) && requests < 600 {
        let n = 1 + (rng.next() % 4) as usize;
        let body: Vec<String> = (0..n).map(|_| hostile(&mut rng, &dir)).collect();
        let l = c.leader();
        let node = &c.nodes[(l + (rng.next() % 3) as usize) % c.nodes.len()];
        let qs = if rng.next().is_multiple_of(3) {
            "?transaction"
        } else {
            ""
        };
        let r = match rng.next() % 3 {
            0 => app.post(&node.url(&format!("/db/execute{qs}")), &json!(body)),
            1 => app.post(&node.url(&format!("/db/request{qs}")), &json!(body)),
            _ => app.post(
                &node.url(&format!(
                    "/db/query?level={}",
                    rng.pick(&["none", "weak", "strong"])
                )),
                &json!(body),
            ),
        };
        requests += 1;
        statements += n as u64;
        assert!(
            matches!(r.status, 200 | 400 | 503 | 413),
            "request {requests}: status {} {:?}",
            r.status,
            r.body
        );
        refused += errors(&r).iter().filter(|e| e.is_some()).count() as u64;
    }
    println!(
        "fuzz: {requests} requests, {statements} statements, {refused} errors, {:?}",
        started.elapsed()
    );
    assert!(!dir.exists() && !Path::new("/tmp/cairn-fuzz.db").exists());
    assert_healthy(&mut c);
}
