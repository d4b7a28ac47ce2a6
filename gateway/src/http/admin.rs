//! Cluster administration and observation: `/status`, `/nodes`, `/readyz`, `/join`,
//! `/remove`, `/metrics`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize as _;
use serde_json::{Value as Json, json};

use super::rqlite::{Opts, error_response, json_response};
use super::{Original, Scheme, Served, on_leader};
use crate::cluster::Cluster;
use crate::cluster::membership::JoinRequest;
use crate::error::Error;
use crate::raft::network::full;
use crate::raft::{LogId, Peer};
use crate::security::{Access, Perm};

pub async fn status(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let o = Opts::from(&q);
    let m = n.raft_metrics();
    let membership = m.membership_config.membership();
    let leader_peer = m
        .current_leader
        .and_then(|l| membership.get_node(&l).cloned());
    let log = n.log_stats();
    let metrics = n.metrics();
    let body = json!({
        "node_id": n.id(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": n.uptime().as_secs_f64(),
        "http_addr": n.peer().http_addr,
        "raft_addr": n.peer().raft_addr,
        "device_addr": n.peer().device_addr,
        "data_dir": n.scratch_dir(),
        "raft": {
            "state": format!("{:?}", m.state),
            "term": m.current_term,
            "leader_id": m.current_leader,
            "leader_http_addr": leader_peer.map(|p| p.http_addr),
            "last_log_index": m.last_log_index,
            "commit_index": m.local_committed.as_ref().map(|l| l.index),
            "applied_index": m.last_applied.as_ref().map(|l| l.index),
            "snapshot_index": m.snapshot.as_ref().map(|l| l.index),
            "purged_index": m.purged.as_ref().map(|l| l.index),
            "voters": membership.voter_ids().collect::<Vec<_>>(),
            "learners": membership.learner_ids().collect::<Vec<_>>(),
            "running": m.running_state.is_ok(),
        },
        "db_size": n.store().size(),
        "ingress": metrics.ingress_json(),
        "log_store": {
            "appends": log.appends.load(Ordering::Relaxed),
            "entries": log.entries.load(Ordering::Relaxed),
            "write_us_mean": log.write_us.load(Ordering::Relaxed)
                .checked_div(log.appends.load(Ordering::Relaxed))
                .unwrap_or(0),
        },
        "write_queue": {
            "commands": metrics.writes_proposed.load(Ordering::Relaxed),
            "batches": metrics.write_batches.load(Ordering::Relaxed),
        },
        // Work held by a full disk (or another failure waited out): null when none.
        "storage_held": {
            "log_write": log.stall.to_json(),
            "apply": metrics.apply_stall.to_json(),
        },
    });
    json_response(StatusCode::OK, &body, o.pretty)
}

pub async fn nodes(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    Extension(scheme): Extension<Scheme>,
) -> Response {
    let o = Opts::from(&q);
    let m = n.raft_metrics();
    let membership = m.membership_config.membership().clone();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let peers: Vec<(u64, Peer)> = membership.nodes().map(|(id, p)| (*id, p.clone())).collect();
    // Reachable: answers on its Raft listener (over node mutual TLS when that is on).
    let checks = peers.iter().map(|(id, p)| {
        let client = n.http().clone();
        let me = *id == n.id();
        let url = client.url(&p.raft_addr, "/raft/ping");
        async move {
            if me {
                return true;
            }
            let Ok(req) = hyper::Request::get(url).body(full(Bytes::new())) else {
                return false;
            };
            matches!(client.send(req, Duration::from_millis(500)).await, Ok((s, _, _)) if s.is_success())
        }
    });
    let reachable = futures_util::future::join_all(checks).await;
    let out: BTreeMap<String, Json> = peers
        .iter()
        .zip(reachable)
        .map(|((id, p), ok)| {
            (
                id.to_string(),
                json!({
                    "id": id.to_string(),
                    "api_addr": format!("{}://{}", scheme.0, p.http_addr),
                    "addr": p.raft_addr,
                    "voter": voters.contains(id),
                    "reachable": ok,
                    "leader": m.current_leader == Some(*id),
                }),
            )
        })
        .collect();
    json_response(StatusCode::OK, &json!(out), o.pretty)
}

pub async fn readyz(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !n.running() {
        return (StatusCode::SERVICE_UNAVAILABLE, "[-]node stopped\n").into_response();
    }
    let held = n.storage_held();
    if !held.is_empty() {
        let lines: String = held
            .iter()
            .map(|(what, e)| format!("[-]store: {what} held: {e}\n"))
            .collect();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("[+]node ok\n{lines}"),
        )
            .into_response();
    }
    if q.contains_key("noleader") {
        return (StatusCode::OK, "[+]node ok\n").into_response();
    }
    match n.leader() {
        Some(_) => (StatusCode::OK, "[+]node ok\n[+]leader ok\n[+]store ok\n").into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "[+]node ok\n[-]leader not contactable\n",
        )
            .into_response(),
    }
}

/// Parses the JSON body of an admin request (`/join`, `/remove`).
fn parse_admin_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Error> {
    serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("invalid {what} request: {e}")))
}

/// `{}` when done here, the leader's answer when forwarded, or the error.
fn done(r: Result<Served<()>, Error>, pretty: bool) -> Response {
    match r {
        Ok(Served::Here(())) => json_response(StatusCode::OK, &json!({}), pretty),
        Ok(Served::There(resp)) => resp,
        Err(e) => error_response(&e, pretty),
    }
}

/// `POST /join`. The route lets in `join` and `join-read-only`; a voter needs `join`, and
/// changing the addresses of an existing member needs `all` (else anyone allowed to join could
/// point a member's traffic, device keys included, at a machine of their choosing). The
/// leader checks again when the request is forwarded, against its own membership.
pub async fn join(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    access: Access,
    req: Original,
) -> Response {
    let o = Opts::from(&q);
    let jr: JoinRequest = match parse_admin_body(&req.body, "join") {
        Ok(jr) => jr,
        Err(e) => return error_response(&e, o.pretty),
    };
    if jr.voter && !access.has(Perm::Join) {
        return access.forbidden(Perm::Join);
    }
    let m = n.raft_metrics();
    let repoints = m
        .membership_config
        .membership()
        .get_node(&jr.id)
        .is_some_and(|p| *p != jr.peer());
    if repoints && !access.has(Perm::All) {
        return access.forbidden(Perm::All);
    }
    done(
        on_leader(&n, &req, o.redirect, || n.join(&jr)).await,
        o.pretty,
    )
}

#[derive(serde::Deserialize)]
struct RemoveRequest {
    #[serde(deserialize_with = "id_from_string_or_number")]
    id: u64,
}

fn id_from_string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Json::deserialize(d)? {
        Json::Number(n) => n
            .as_u64()
            .ok_or_else(|| serde::de::Error::custom("id must be a positive integer")),
        Json::String(s) => s.parse().map_err(serde::de::Error::custom),
        _ => Err(serde::de::Error::custom("id must be a number")),
    }
}

pub async fn remove(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    req: Original,
) -> Response {
    let o = Opts::from(&q);
    let rr: RemoveRequest = match parse_admin_body(&req.body, "remove") {
        Ok(rr) => rr,
        Err(e) => return error_response(&e, o.pretty),
    };
    done(
        on_leader(&n, &req, o.redirect, || n.remove(rr.id)).await,
        o.pretty,
    )
}

pub async fn metrics(State(n): State<Arc<Cluster>>) -> Response {
    let m = n.raft_metrics();
    let idx = |l: &Option<LogId>| l.as_ref().map(|l| l.index).unwrap_or(0);
    let counters = n.metrics();
    let log = n.log_stats();
    let id = n.id();
    let mut out = String::new();
    let mut g = |name: &str, help: &str, kind: &str, v: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node_id=\"{id}\"}} {v}\n"
        ));
    };
    g(
        "cairn_raft_term",
        "Current Raft term.",
        "gauge",
        m.current_term as f64,
    );
    g(
        "cairn_raft_is_leader",
        "1 if this node is the leader.",
        "gauge",
        f64::from(u8::from(n.is_leader())),
    );
    g(
        "cairn_raft_last_log_index",
        "Last log index.",
        "gauge",
        m.last_log_index.unwrap_or(0) as f64,
    );
    g(
        "cairn_raft_commit_index",
        "Committed log index.",
        "gauge",
        idx(&m.local_committed) as f64,
    );
    g(
        "cairn_raft_applied_index",
        "Applied log index.",
        "gauge",
        idx(&m.last_applied) as f64,
    );
    g(
        "cairn_raft_snapshot_index",
        "Log index of the latest snapshot.",
        "gauge",
        idx(&m.snapshot) as f64,
    );
    g(
        "cairn_db_size_bytes",
        "Database size on disk.",
        "gauge",
        n.store().size() as f64,
    );
    g(
        "cairn_http_requests_total",
        "SQL requests served.",
        "counter",
        counters.http_requests.load(Ordering::Relaxed) as f64,
    );
    g(
        "cairn_writes_total",
        "Commands proposed through the write queue.",
        "counter",
        counters.writes_proposed.load(Ordering::Relaxed) as f64,
    );
    g(
        "cairn_log_appends_total",
        "Durable Raft log appends (one fsync each).",
        "counter",
        log.appends.load(Ordering::Relaxed) as f64,
    );
    g(
        "cairn_log_entries_total",
        "Entries written by those appends.",
        "counter",
        log.entries.load(Ordering::Relaxed) as f64,
    );
    g(
        "cairn_write_batches_total",
        "Write-queue batches proposed.",
        "counter",
        counters.write_batches.load(Ordering::Relaxed) as f64,
    );
    out.push_str(&counters.ingress_prometheus(id));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out,
    )
        .into_response()
}
