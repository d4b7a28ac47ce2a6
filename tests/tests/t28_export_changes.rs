//! Changes of user tables leave the site exactly once (issue 28, item 3): three nodes export
//! the inserts, updates and deletes of `orders` and `sites_*` (`changes = "REGEX"`) to a real
//! PostgreSQL, a real NATS JetStream stream and an rqlite-CDC webhook, while SQL clients write
//! through every node, the leader is killed with `kill -9`, and the webhook is away for a
//! while. Afterwards:
//!
//! - the webhook saw every committed change at least once (repeats counted), each table's
//!   changes first arriving in commit order; replaying them (INSERT: the row was absent,
//!   UPDATE/DELETE: `before` is the row as the replay holds it) gives each table's final rows;
//!   every acknowledged write is among them, a failed `?transaction` and the table outside the
//!   filter are not, and one request changing a row three times gave three keys;
//! - PostgreSQL holds each key once, the same changes as the webhook in the same order;
//!   JetStream holds one message per key;
//! - while the webhook was away, every replica's change journal (read from its file) was the
//!   same and held the undelivered changes; once all is delivered, every journal is empty.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_tests::servers::{NatsServer, Postgres, WebhookReceiver};
use cairn_tests::{Client, Cluster, Node, Options, poll, stmts};
use serde_json::{Map, Value as Json, json};

const SITE: &str = "gamma";
const FILTER: &str = "^orders$|^sites_.*";
const CATCH_UP: Duration = Duration::from_secs(120);

fn config(pg: &str, nats: &str, webhook: &str) -> String {
    format!(
        r#"
site = "{SITE}"

[[export]]
name = "warehouse"
kind = "postgres"
url = "{pg}"
table_prefix = "t28_"
changes = "{FILTER}"

[[export]]
name = "bus"
kind = "nats"
url = "{nats}"
stream = "CHANGES"
changes = "{FILTER}"

[[export]]
name = "hook"
kind = "webhook"
url = "{webhook}"
changes = "{FILTER}"
batch_records = 50
"#
    )
}

/// A client request and what became of it.
#[derive(Debug, Clone)]
enum Op {
    Insert {
        id: i64,
    },
    Update {
        id: i64,
    },
    Delete {
        id: i64,
    },
    /// One `?transaction` request inserting a `sites_a` row and updating it twice.
    Triple {
        id: i64,
    },
    /// A `?transaction` whose second statement fails (its first insert must never show).
    Failing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acked,
    Refused,
    /// No answer, or not 200: it may or may not have been committed.
    Unknown,
}

struct Write {
    token: String,
    op: Op,
    outcome: Outcome,
}

/// One SQL client: inserts, updates and deletes its own rows through every node in turn.
fn writer(w: i64, urls: Vec<String>, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Write>>>) {
    let client = Client::new(Duration::from_secs(10), Some(Duration::from_secs(2)));
    let mut live: Vec<i64> = Vec::new();
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let token = format!("w{w}-{n}");
        let id = w * 1_000_000 + n;
        let (op, body, transaction) = match n % 6 {
            0 | 1 => (
                Op::Insert { id },
                json!([
                    [
                        "INSERT INTO orders (id, item, qty, note) VALUES (?, ?, 1, ?)",
                        id,
                        format!("item-{n}"),
                        token
                    ],
                    ["INSERT INTO private_notes (body) VALUES (?)", token]
                ]),
                false,
            ),
            2 if !live.is_empty() => {
                let id = live[n as usize % live.len()];
                (
                    Op::Update { id },
                    json!([[
                        "UPDATE orders SET qty = qty + 1, note = ? WHERE id = ?",
                        token,
                        id
                    ]]),
                    false,
                )
            }
            3 if live.len() > 3 => {
                let id = live.remove(n as usize % live.len());
                (
                    Op::Delete { id },
                    json!([["DELETE FROM orders WHERE id = ?", id]]),
                    false,
                )
            }
            4 => (
                Op::Triple { id },
                json!([
                    ["INSERT INTO sites_a (id, name) VALUES (?, ?)", id, token],
                    ["UPDATE sites_a SET name = name || '-2' WHERE id = ?", id],
                    ["UPDATE sites_a SET name = name || '-3' WHERE id = ?", id]
                ]),
                true,
            ),
            _ => (
                Op::Failing,
                json!([
                    [
                        "INSERT INTO orders (id, item, note) VALUES (?, 'f', ?)",
                        id,
                        format!("fail-{token}")
                    ],
                    ["INSERT INTO orders (id, item) VALUES (?, 'duplicate')", id]
                ]),
                true,
            ),
        };
        let url = &urls[n as usize % urls.len()];
        let qs = if transaction { "?transaction" } else { "" };
        let r = client.post(&format!("{url}/db/execute{qs}"), &body);
        let outcome = if r.status != 200 {
            Outcome::Unknown
        } else if r.body["results"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|x| x.get("error").is_some()))
        {
            Outcome::Refused
        } else {
            Outcome::Acked
        };
        if outcome == Outcome::Acked
            && let Op::Insert { id } = op
        {
            live.push(id);
        }
        if outcome != Outcome::Acked {
            std::thread::sleep(Duration::from_millis(20));
        }
        log.lock().unwrap().push(Write { token, op, outcome });
    }
}

/// `(history, log_index, ordinal)` of a change key `site:sql:h:i:o`.
fn position(key: &str) -> (u64, u64, u64) {
    let p: Vec<u64> = key
        .strip_prefix(&format!("{SITE}:sql:"))
        .unwrap_or_else(|| panic!("not a change key of site {SITE}: {key}"))
        .split(':')
        .map(|x| x.parse().expect("number in key"))
        .collect();
    (p[0], p[1], p[2])
}

/// A replica's database file, read-only (SQL may not read Cairn's tables).
fn replica(n: &Node) -> rusqlite::Result<rusqlite::Connection> {
    let file = n.dir.join("sm").join("db.sqlite");
    rusqlite::Connection::open_with_flags(file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
}

/// Every replica's change journal.
fn journals(c: &Cluster) -> Vec<Vec<String>> {
    c.nodes
        .iter()
        .map(|n| {
            let db = replica(n).expect("opening a replica");
            let mut st = db
                .prepare(
                    "SELECT log_index || ':' || ordinal || ' ' || tbl || ' ' || op || ' ' || \
                     coalesce(before, '-') || ' ' || coalesce(after, '-') \
                     FROM _cairn_change_journal ORDER BY log_index, ordinal",
                )
                .expect("the change journal exists");
            st.query_map([], |r| r.get(0))
                .expect("reading the journal")
                .collect::<rusqlite::Result<Vec<String>>>()
                .expect("journal rows")
        })
        .collect()
}

/// The registered change captures on node 0's file.
fn captures(c: &Cluster) -> usize {
    let count = |db: rusqlite::Connection| {
        db.query_row("SELECT count(*) FROM _cairn_change_capture", [], |r| {
            r.get::<_, i64>(0)
        })
    };
    replica(&c.nodes[0])
        .and_then(count)
        .map_or(0, |n| n as usize)
}

/// The rows of `table` on the leader (linearizable), by `id`, as column → value maps.
fn table_rows(c: &Cluster, table: &str) -> BTreeMap<i64, Map<String, Json>> {
    let l = c.leader();
    let r = c.nodes[l].query(&format!("SELECT * FROM {table}"), "linearizable");
    assert_eq!(r.status, 200, "{:?}", r.body);
    let res = &r.body["results"][0];
    let cols: Vec<String> = res["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    res["values"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|row| {
            let m: Map<String, Json> = cols
                .iter()
                .cloned()
                .zip(row.as_array().unwrap().iter().cloned())
                .collect();
            (m["id"].as_i64().unwrap(), m)
        })
        .collect()
}

/// Replays `events` (one per key, commit order) of `table` from empty, checking each
/// change's `before` against the replayed row; the rows it ends with.
fn replay(events: &[&Json], table: &str) -> BTreeMap<i64, Map<String, Json>> {
    let mut rows: BTreeMap<i64, Map<String, Json>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["table"] == table) {
        let key = e["key"].as_str().unwrap();
        match e["op"].as_str().unwrap() {
            "INSERT" => {
                let after = e["after"].as_object().unwrap().clone();
                let id = after["id"].as_i64().unwrap();
                assert_eq!(e["new_row_id"], id, "{e}");
                assert!(
                    rows.insert(id, after).is_none(),
                    "{key}: inserted twice: {e}"
                );
            }
            op => {
                let before = e["before"].as_object().unwrap();
                let id = before["id"].as_i64().unwrap();
                assert_eq!(
                    rows.get(&id),
                    Some(before),
                    "{key}: before is not the row: {e}"
                );
                if op == "UPDATE" {
                    rows.insert(id, e["after"].as_object().unwrap().clone());
                } else {
                    rows.remove(&id);
                }
            }
        }
    }
    rows
}

#[test]
fn test_changes_exported_exactly_once_through_failover_and_outage() {
    let pg = Postgres::start().expect("postgres (cargo xtask setup installs it)");
    let nats = NatsServer::start().expect("nats-server");
    let hook = WebhookReceiver::start().expect("webhook receiver");
    let mut c = Cluster::start_with(
        3,
        Options {
            config: Some(config(&pg.url(), &nats.url(), &hook.url)),
            ..Options::default()
        },
    );
    c.execute(&stmts(&[
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL, qty INTEGER, note TEXT)",
        "CREATE TABLE sites_a (id INTEGER PRIMARY KEY, name TEXT)",
        "CREATE TABLE private_notes (id INTEGER PRIMARY KEY, body TEXT)",
    ]));
    // The leader registers each destination's pattern through the log once format version 2
    // is active; changes before that are not captured.
    poll(
        Duration::from_secs(60),
        "three change captures registered",
        || (captures(&c) == 3).then_some(()),
    );

    let urls: Vec<String> = c.nodes.iter().map(|n| n.url("")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Write>>> = Arc::default();
    let writers: Vec<_> = (1..=4)
        .map(|w| {
            let (urls, stop, log) = (urls.clone(), stop.clone(), log.clone());
            std::thread::spawn(move || writer(w, urls, stop, log))
        })
        .collect();
    let acked = |n: usize| {
        poll(CATCH_UP, "acknowledged writes", || {
            let l = log.lock().unwrap();
            (l.iter().filter(|w| w.outcome == Outcome::Acked).count() >= n).then_some(())
        })
    };
    acked(100);
    let leader = c.leader();
    let old_id = c.nodes[leader].id;
    c.kill9(leader);
    let new = c.wait_for_new_leader(old_id);
    println!("kill -9 of node {old_id}; node {} leads", c.nodes[new].id);
    acked(300);
    hook.set_down(true);
    let before_outage = log.lock().unwrap().len();
    poll(CATCH_UP, "writes while the webhook is away", || {
        (log.lock().unwrap().len() >= before_outage + 100).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    c.restart(leader);
    c.wait_converged();

    // While the webhook is away, its cursor holds the change journal: the same on every
    // replica, and not empty.
    let held = poll(CATCH_UP, "identical change journals", || {
        let j = journals(&c);
        (j.windows(2).all(|w| w[0] == w[1])).then_some(j)
    });
    println!(
        "{} journaled changes held on each of {} replicas while the webhook is away",
        held[0].len(),
        held.len()
    );
    assert!(!held[0].is_empty(), "undelivered changes are journaled");
    hook.set_down(false);

    // Caught up: every destination holds the same keys, and the journals are empty.
    let mut last = std::time::Instant::now();
    poll(CATCH_UP, "every destination to catch up", || {
        let distinct = hook.counts().0;
        let p = pg
            .query("SELECT count(*) || '|' || count(DISTINCT key) FROM t28_cairn_changes")
            .ok()?;
        let n = nats.messages("CHANGES");
        let empty = journals(&c).iter().all(Vec::is_empty);
        if last.elapsed() > Duration::from_secs(5) {
            last = std::time::Instant::now();
            println!("  webhook {distinct}, postgres {p}, nats {n}, journals empty: {empty}");
        }
        (empty && p == format!("{distinct}|{distinct}") && n == distinct && distinct > 0)
            .then_some(())
    });
    assert!(hook.malformed().is_empty(), "{:?}", hook.malformed());

    // The webhook: each key's first arrival, per table in commit order.
    let all = hook.events();
    let mut first: Vec<&Json> = Vec::new();
    let mut seen = HashSet::new();
    for e in &all {
        if seen.insert(e["key"].as_str().unwrap().to_string()) {
            first.push(e);
        }
    }
    println!(
        "webhook: {} changes, {} events ({} repeats)",
        first.len(),
        all.len(),
        all.len() - first.len()
    );
    let mut last_pos: HashMap<&str, (u64, u64, u64)> = HashMap::new();
    for e in &first {
        let pos = position(e["key"].as_str().unwrap());
        let table = e["table"].as_str().unwrap();
        if let Some(prev) = last_pos.insert(table, pos) {
            assert!(prev < pos, "{table}: {pos:?} arrived first after {prev:?}");
        }
    }
    let tables: HashSet<&str> = first.iter().map(|e| e["table"].as_str().unwrap()).collect();
    assert_eq!(
        tables,
        HashSet::from(["orders", "sites_a"]),
        "private_notes is not exported"
    );

    // Replaying the changes in commit order gives each table's rows.
    first.sort_by_key(|e| position(e["key"].as_str().unwrap()));
    for table in ["orders", "sites_a"] {
        let replayed = replay(&first, table);
        let stored = table_rows(&c, table);
        assert_eq!(replayed.len(), stored.len(), "{table}: row count");
        assert!(
            replayed == stored,
            "{table}: the replayed changes differ from its rows"
        );
        println!("{table}: {} rows rebuilt from its changes", stored.len());
    }

    // Every acknowledged write is there; a failed transaction is not.
    let by_note = |table: &str, field: &str, value: &str| -> Vec<&Json> {
        first
            .iter()
            .copied()
            .filter(|e| e["table"] == table && e["after"][field] == value)
            .collect()
    };
    let writes = log.lock().unwrap();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for w in writes.iter() {
        match (&w.op, w.outcome) {
            (Op::Failing, o) => {
                assert_ne!(o, Outcome::Acked, "a failing transaction succeeded");
                assert!(
                    by_note("orders", "note", &format!("fail-{}", w.token)).is_empty(),
                    "{}: a rolled-back change was exported",
                    w.token
                );
            }
            (_, Outcome::Acked) => {
                let found = match &w.op {
                    Op::Insert { id } | Op::Update { id } => {
                        let e = by_note("orders", "note", &w.token);
                        e.len() == 1 && e[0]["after"]["id"] == *id
                    }
                    Op::Delete { id } => first.iter().any(|e| {
                        e["table"] == "orders" && e["op"] == "DELETE" && e["before"]["id"] == *id
                    }),
                    Op::Triple { id } => {
                        let three: Vec<(u64, u64, u64)> = first
                            .iter()
                            .filter(|e| e["table"] == "sites_a" && e["new_row_id"] == *id)
                            .map(|e| position(e["key"].as_str().unwrap()))
                            .collect();
                        // One entry, three ordinals.
                        three.len() == 3
                            && three.iter().all(|p| (p.0, p.1) == (three[0].0, three[0].1))
                            && by_note("sites_a", "name", &format!("{}-2-3", w.token)).len() == 1
                    }
                    Op::Failing => unreachable!(),
                };
                assert!(found, "acknowledged {:?} ({}) not exported", w.op, w.token);
                *counts.entry(kind(&w.op)).or_default() += 1;
            }
            (_, Outcome::Refused) => *counts.entry("refused").or_default() += 1,
            (_, Outcome::Unknown) => *counts.entry("no answer (unknown)").or_default() += 1,
        }
    }
    println!("writes: {counts:?}");

    // PostgreSQL: the same changes, once each, in the same order.
    let rows = pg
        .query(
            "SELECT key || '|' || tbl || '|' || op || '|' || coalesce(before::text, 'null') || \
             '|' || coalesce(after::text, 'null') FROM t28_cairn_changes \
             ORDER BY history, log_index, ordinal",
        )
        .expect("postgres rows");
    let pg_changes: Vec<(String, String, String, Json, Json)> = rows
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(5, '|').collect();
            (
                f[0].to_string(),
                f[1].to_string(),
                f[2].to_string(),
                serde_json::from_str(f[3]).unwrap(),
                serde_json::from_str(f[4]).unwrap(),
            )
        })
        .collect();
    let hook_changes: Vec<(String, String, String, Json, Json)> = first
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_string(),
                e["table"].as_str().unwrap().to_string(),
                e["op"].as_str().unwrap().to_string(),
                e.get("before").cloned().unwrap_or(Json::Null),
                e.get("after").cloned().unwrap_or(Json::Null),
            )
        })
        .collect();
    assert!(
        pg_changes == hook_changes,
        "postgres and the webhook hold different changes ({} and {})",
        pg_changes.len(),
        hook_changes.len()
    );
    assert_eq!(nats.messages("CHANGES"), first.len() as u64);
    c.assert_identical();
}

fn kind(op: &Op) -> &'static str {
    match op {
        Op::Insert { .. } => "insert",
        Op::Update { .. } => "update",
        Op::Delete { .. } => "delete",
        Op::Triple { .. } => "three changes in one transaction",
        Op::Failing => "failing transaction",
    }
}
