//! rqlite's operator routes: `GET|POST /leader` (show, step down), `POST /snapshot`,
//! `/db/sql` (statements as the deterministic rewrite leaves them) and `/debug/vars`
//! (expvar-style counters with rqlite's names where Cairn has the concept).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value as Json, json};

use super::admin::{parse_admin_body, probe_nodes};
use super::rqlite::{Opts, error_response, json_response, parse_statements};
use super::{Original, Scheme, Served, on_leader};
use crate::cluster::{Cluster, rewritten};
use crate::error::Error;

/// `GET /leader`: the leader as a `/nodes` entry, under `leader` (503 while none is known).
pub async fn leader(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    Extension(scheme): Extension<Scheme>,
) -> Response {
    let o = Opts::from(&q);
    let nodes = probe_nodes(&n, scheme, true).await;
    match nodes.into_iter().find(|m| m.leader) {
        Some(leader) => {
            #[derive(serde::Serialize)]
            struct Leader {
                leader: super::admin::NodeJson,
            }
            json_response(StatusCode::OK, &Leader { leader }, o.pretty)
        }
        None => error_response(&Error::NoLeader, o.pretty),
    }
}

#[derive(serde::Deserialize, Default)]
struct StepDown {
    /// The voter to hand leadership to (rqlite's string ids; a number is accepted too).
    #[serde(default, deserialize_with = "super::admin::opt_id")]
    id: Option<u64>,
}

/// `POST /leader` (permission `leader-ops`): the leader hands leadership to `{"id": ..}` or
/// to its most up-to-date voter and answers once another node leads:
/// `{"leader": {"node_id": ..}}`. A follower forwards the request to the leader.
pub async fn step_down(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    req: Original,
) -> Response {
    let o = Opts::from(&q);
    let sd: StepDown = if req.body.iter().all(u8::is_ascii_whitespace) {
        StepDown::default()
    } else {
        match parse_admin_body(&req.body, "leader") {
            Ok(sd) => sd,
            Err(e) => return error_response(&e, o.pretty),
        }
    };
    match on_leader(&n, &req, o.redirect, || n.step_down_to(sd.id)).await {
        Ok(Served::Here(id)) => {
            let id = crate::cluster::names::shown(&n.node_names().await, id);
            json_response(
                StatusCode::OK,
                &json!({"leader": {"node_id": id}}),
                o.pretty,
            )
        }
        Ok(Served::There(resp)) => resp,
        Err(e) => error_response(&e, o.pretty),
    }
}

/// `POST /snapshot` (permission `snapshot`): this node snapshots its database now (and may
/// then trim its log). Answers `{"snapshot_index": N}` once the snapshot covers what was
/// applied when asked (`timeout`, 30 s by default).
pub async fn snapshot(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let o = Opts::from(&q);
    match n.snapshot_now(o.timeout).await {
        Ok(index) => json_response(
            StatusCode::OK,
            &json!({ "snapshot_index": index }),
            o.pretty,
        ),
        Err(e) => error_response(&e, o.pretty),
    }
}

/// `POST /db/sql`: the request's statements as a write would put them in the log now (after
/// the deterministic rewrite of `RANDOM()`, `'now'`, ...); nothing runs.
pub async fn sql(Query(q): Query<HashMap<String, String>>, req: Original) -> Response {
    let o = Opts::from(&q);
    let r = parse_statements(&req.body).and_then(rewritten);
    match r {
        Ok(statements) => {
            let results: Vec<Json> = statements.iter().map(|s| json!({ "sql": s.sql })).collect();
            json_response(StatusCode::OK, &json!({ "results": results }), o.pretty)
        }
        Err(e) => error_response(&e, o.pretty),
    }
}

/// `GET /debug/vars`: expvar-style counters (`?key=` picks one section).
pub async fn debug_vars(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let o = Opts::from(&q);
    let m = n.metrics();
    let mut http = json!({
        "requests": m.http_requests.load(Ordering::Relaxed),
    });
    if let Some(queue) = n.write_queue_started() {
        let s = queue.stats();
        let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        for (k, v) in [
            ("queued_executions", g(&s.queued)),
            ("queued_executions_ok", g(&s.batches_ok)),
            ("queued_executions_failed", g(&s.retries)),
            ("queued_executions_wait", g(&s.waited)),
            ("queued_executions_num_stmts_rx", g(&s.statements_rx)),
            ("queued_executions_num_stmts_tx", g(&s.statements_tx)),
            ("queued_executions_refused", g(&s.batches_refused)),
            ("queued_executions_stmt_errors", g(&s.statement_errors)),
        ] {
            http[k] = v.into();
        }
    }
    let rm = n.raft_metrics();
    let idx = |l: &Option<crate::raft::LogId>| l.as_ref().map(|l| l.index).unwrap_or(0);
    let log = n.log_stats();
    let mut vars: BTreeMap<&str, Json> = BTreeMap::new();
    vars.insert("cmdline", json!(std::env::args().collect::<Vec<_>>()));
    vars.insert("http", http);
    vars.insert(
        "store",
        json!({
            "num_snapshots": u64::from(rm.snapshot.is_some()),
            "leader_changes_observed": rm.current_term,
            "write_batches": m.write_batches.load(Ordering::Relaxed),
            "writes_proposed": m.writes_proposed.load(Ordering::Relaxed),
        }),
    );
    vars.insert(
        "raft",
        json!({
            "commit_index": idx(&rm.local_committed),
            "applied_index": idx(&rm.last_applied),
            "last_log_index": rm.last_log_index.unwrap_or(0),
            "log_appends": log.appends.load(Ordering::Relaxed),
            "log_entries": log.entries.load(Ordering::Relaxed),
        }),
    );
    vars.insert("ingress", m.ingress_json());
    if let Some(key) = q.get("key") {
        vars.retain(|k, _| k == key);
    }
    json_response(StatusCode::OK, &vars, o.pretty)
}
