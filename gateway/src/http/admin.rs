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

use super::rqlite::{Opts, error_response, flag, json_response};
use super::{Original, Scheme, Served, on_leader};
use crate::cluster::Cluster;
use crate::cluster::membership::JoinRequest;
use crate::cluster::names::shown;
use crate::config::cluster::{node_id_for_name, parse_node_id};
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
    let names = n.node_names().await;
    let store = store_json(&n, &m, &names);
    let http = http_json(&n);
    if metrics.backup.active.load(Ordering::Relaxed) {
        metrics.backup.observe_commit(
            m.last_applied.as_ref().map_or(0, |l| l.index),
            metrics.stamp_floor.load(Ordering::Relaxed),
        );
    }
    let body = json!({
        // rqlite's sections, which its tools and test helpers read.
        "store": store,
        "http": http,
        "node": {
            "start_time": n.started_at(),
            "uptime": format!("{:?}", n.uptime()),
        },
        "build": {"version": env!("CARGO_PKG_VERSION")},
        "node_id": n.id(),
        "node_name": names.get(&n.id()),
        "version": env!("CARGO_PKG_VERSION"),
        // Cluster format versions: what this binary supports, the cluster's active version,
        // what each peer reported on Raft RPCs, and what stops this node (if anything).
        "format": metrics.versions.to_json(),
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
            "incarnation": n.incarnation_json(),
        },
        "db_size": n.store().size(),
        "ingress": metrics.ingress_json(),
        "backup": metrics.backup.to_json(),
        "export": metrics.exports.to_json(),
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
        // Ingest refused by the disk guard: null when not.
        "disk_guard": metrics.disk_guard.to_json(),
    });
    json_response(StatusCode::OK, &body, o.pretty)
}

/// rqlite's `store` section of `/status`: leader, Raft state and indexes, the SQLite file.
fn store_json(
    n: &Cluster,
    m: &openraft::RaftMetrics<crate::raft::TypeConfig>,
    names: &BTreeMap<u64, String>,
) -> Json {
    let membership = m.membership_config.membership();
    let idx = |l: &Option<LogId>| l.as_ref().map(|l| l.index).unwrap_or(0);
    let voter = membership.voter_ids().any(|v| v == n.id());
    // hashicorp/raft's state names; a read replica (openraft's Learner) is a Follower that
    // does not vote, as rqlite shows a non-voter.
    let state = match m.state {
        openraft::ServerState::Leader => "Leader",
        openraft::ServerState::Candidate => "Candidate",
        openraft::ServerState::Shutdown => "Shutdown",
        openraft::ServerState::Follower | openraft::ServerState::Learner => "Follower",
    };
    let leader = m
        .current_leader
        .and_then(|l| membership.get_node(&l).map(|p| (l, p.raft_addr.clone())));
    let applied = idx(&m.last_applied);
    let nodes: Vec<Json> = membership
        .nodes()
        .map(|(id, p)| {
            json!({"id": shown(names, *id), "addr": p.raft_addr,
                   "suffrage": if membership.voter_ids().any(|v| v == *id) { "Voter" } else { "Nonvoter" }})
        })
        .collect();
    let db_path = n.scratch_dir().join("sm").join("db.sqlite");
    json!({
        "node_id": shown(names, n.id()),
        "addr": n.peer().raft_addr,
        "leader": {
            "node_id": leader.as_ref().map(|(id, _)| shown(names, *id)).unwrap_or_default(),
            "addr": leader.map(|(_, a)| a).unwrap_or_default(),
        },
        "raft": {
            "state": state,
            "voter": voter,
            "term": m.current_term,
            "commit_index": idx(&m.local_committed),
            "applied_index": applied,
            "last_log_index": m.last_log_index.unwrap_or(0),
            "last_snapshot_index": idx(&m.snapshot),
            "num_peers": membership.voter_ids().filter(|v| *v != n.id()).count(),
            "last_contact": n.metrics().leader_contact.since().map(|d| format!("{d:?}")),
        },
        "fsm_index": applied,
        "db_applied_index": applied,
        "dir": n.scratch_dir(),
        "sqlite3": {
            "path": db_path,
            "db_size": n.store().size(),
            "version": rusqlite::version(),
            "mem_stats": {},
        },
        "snapshot_store": {
            "dir": n.scratch_dir().join("sm").join("snapshots"),
            "snapshots": m.snapshot.as_ref().map(|l| vec![l.index.to_string()]).unwrap_or_default(),
        },
        "nodes": nodes,
    })
}

/// rqlite's `http` section of `/status`: the queued writes' settings and sequence number.
fn http_json(n: &Cluster) -> Json {
    let s = n.write_queue_settings();
    let seq = n
        .write_queue_started()
        .map(|q| q.stats().last_sequence.load(Ordering::Relaxed))
        .unwrap_or(0);
    json!({
        "queue": {
            "_default": {
                "max_size": s.capacity,
                "batch_size": s.batch_size,
                "timeout": format!("{:?}", s.timeout),
                "transaction": s.transaction,
                "sequence_number": seq,
            }
        }
    })
}

/// One member as rqlite's `/nodes` shows it (`http/nodes.go`'s `Node`): reachability is a
/// ping of the member's Raft listener (over node mutual TLS when that is on), timed.
#[derive(serde::Serialize)]
pub struct NodeJson {
    pub id: String,
    pub api_addr: String,
    pub addr: String,
    pub version: String,
    pub voter: bool,
    pub reachable: bool,
    pub leader: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub time: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub time_s: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

fn is_zero(t: &f64) -> bool {
    *t == 0.0
}

/// The members (voters only unless `nonvoters`), each checked, sorted by id as rqlite sorts
/// (as strings).
pub async fn probe_nodes(n: &Cluster, scheme: Scheme, nonvoters: bool) -> Vec<NodeJson> {
    let m = n.raft_metrics();
    let membership = m.membership_config.membership().clone();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let peers: Vec<(u64, Peer)> = membership
        .nodes()
        .filter(|(id, _)| nonvoters || voters.contains(id))
        .map(|(id, p)| (*id, p.clone()))
        .collect();
    let checks = peers.iter().map(|(id, p)| {
        let client = n.http().clone();
        let me = *id == n.id();
        let url = client.url(&p.raft_addr, "/raft/ping");
        async move {
            let start = std::time::Instant::now();
            let r = if me {
                Ok(())
            } else {
                match hyper::Request::get(url).body(full(Bytes::new())) {
                    Ok(req) => match client.send(req, Duration::from_millis(500)).await {
                        Ok((s, _, _)) if s.is_success() => Ok(()),
                        Ok((s, _, _)) => Err(format!("ping answered {s}")),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                }
            };
            (r, start.elapsed())
        }
    });
    let checked = futures_util::future::join_all(checks).await;
    let names = n.node_names().await;
    let mut out: Vec<NodeJson> = peers
        .iter()
        .zip(checked)
        .map(|((id, p), (r, took))| NodeJson {
            id: shown(&names, *id),
            api_addr: format!("{}://{}", scheme.0, p.http_addr),
            addr: p.raft_addr.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            voter: voters.contains(id),
            reachable: r.is_ok(),
            leader: m.current_leader == Some(*id),
            time: took.as_secs_f64(),
            time_s: format!("{took:?}"),
            error: r.err().unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// `GET /nodes`: rqlite's map of id to member (`?nonvoters` adds read replicas), or with
/// `?ver=2` its `{"nodes": [...]}` list.
pub async fn nodes(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    Extension(scheme): Extension<Scheme>,
) -> Response {
    let o = Opts::from(&q);
    let list = probe_nodes(&n, scheme, flag(&q, "nonvoters")).await;
    if q.get("ver").is_some_and(|v| v == "2") {
        #[derive(serde::Serialize)]
        struct Nodes {
            nodes: Vec<NodeJson>,
        }
        return json_response(StatusCode::OK, &Nodes { nodes: list }, o.pretty);
    }
    let map: BTreeMap<String, NodeJson> = list.into_iter().map(|n| (n.id.clone(), n)).collect();
    json_response(StatusCode::OK, &map, o.pretty)
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
    if n.leader().is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "[+]node ok\n[-]leader not contactable\n",
        )
            .into_response();
    }
    if flag(&q, "sync") {
        // rqlite's `?sync`: ready once this node has applied what the leader had committed
        // when asked (`timeout`, 5 s by default).
        let wait = q
            .get("timeout")
            .and_then(|t| super::rqlite::parse_go_duration(t).ok())
            .unwrap_or(Duration::from_secs(5));
        if !n.wait_synced(wait).await {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "[+]node ok\n[+]leader ok\n[-]sync timeout\n",
            )
                .into_response();
        }
        return (
            StatusCode::OK,
            "[+]node ok\n[+]leader ok\n[+]store ok\n[+]sync ok\n",
        )
            .into_response();
    }
    (StatusCode::OK, "[+]node ok\n[+]leader ok\n[+]store ok\n").into_response()
}

/// Parses the JSON body of an admin request (`/join`, `/remove`).
pub(super) fn parse_admin_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, Error> {
    serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("invalid {what} request: {e}")))
}

/// A join (or notify) body; its `id` a number or, as rqlite sends it, a string (a number's
/// digits, or a name).
fn parse_join(body: &[u8], what: &str) -> Result<JoinRequest, Error> {
    let mut v: Json = parse_admin_body(body, what)?;
    if let Some(id) = v.get_mut("id")
        && let Json::String(s) = id
    {
        // A name (rqlite's string ids): its Raft id derives from it.
        let n = parse_node_id(s).unwrap_or_else(|name| node_id_for_name(&name));
        *id = Json::from(n);
    }
    serde_json::from_value(v).map_err(|e| Error::BadRequest(format!("invalid {what} request: {e}")))
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
    let jr: JoinRequest = match parse_join(&req.body, "join") {
        Ok(jr) => jr,
        Err(e) => return error_response(&e, o.pretty),
    };
    if jr.voter && !access.has(Perm::Join) {
        return access.forbidden(Perm::Join);
    }
    // `--replace`: removing the old node needs `remove` as well as `join`.
    if jr.replace.is_some() {
        for p in [Perm::Join, Perm::Remove] {
            if !access.has(p) {
                return access.forbidden(p);
            }
        }
    }
    let m = n.raft_metrics();
    let repoints = m
        .membership_config
        .membership()
        .get_node(&jr.id)
        .is_some_and(|p| *p != jr.peer());
    // A replacement under the old id brings its own addresses.
    if repoints && jr.replace != Some(jr.id) && !access.has(Perm::All) {
        return access.forbidden(Perm::All);
    }
    done(
        on_leader(&n, &req, o.redirect, || n.join(&jr)).await,
        o.pretty,
    )
}

/// `POST /notify` (rqlite's): a founding node started with `--bootstrap-expect` says it
/// exists; the answer tells it whether this node already belongs to a cluster. Needs `join`,
/// as a voter's join does.
pub async fn notify(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    req: Original,
) -> Response {
    let o = Opts::from(&q);
    match parse_join(&req.body, "notify") {
        Ok(jr) => json_response(StatusCode::OK, &n.notify(&jr).await, o.pretty),
        Err(e) => error_response(&e, o.pretty),
    }
}

/// `POST /reap` (permission `remove`): the leader removes every read replica it has not
/// reached for longer than `?timeout=` (a Go duration, 10 s by default); answers
/// `{"reaped": ["4", ...]}`. A follower forwards it.
pub async fn reap(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    req: Original,
) -> Response {
    let o = Opts::from(&q);
    let timeout = match q
        .get("timeout")
        .map(|t| super::rqlite::parse_go_duration(t))
    {
        None => std::time::Duration::from_secs(10),
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            return error_response(&Error::BadRequest(format!("timeout: {e}")), o.pretty);
        }
    };
    match on_leader(&n, &req, o.redirect, || n.reap(timeout)).await {
        Ok(Served::Here(ids)) => {
            let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
            json_response(StatusCode::OK, &json!({ "reaped": ids }), o.pretty)
        }
        Ok(Served::There(resp)) => resp,
        Err(e) => error_response(&e, o.pretty),
    }
}

#[derive(serde::Deserialize)]
struct RemoveRequest {
    #[serde(deserialize_with = "id_from_string_or_number")]
    id: u64,
}

/// An optional node id: rqlite's string ids, or a number.
pub(super) fn opt_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Json::deserialize(d)? {
        Json::Null => Ok(None),
        v => id_from_string_or_number(v)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn id_from_string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Json::deserialize(d)? {
        Json::Number(n) => n
            .as_u64()
            .ok_or_else(|| serde::de::Error::custom("id must be a positive integer")),
        // A name (rqlite's string ids): its Raft id derives from it.
        Json::String(s) => Ok(parse_node_id(&s).unwrap_or_else(|name| node_id_for_name(&name))),
        _ => Err(serde::de::Error::custom("id must be a string or a number")),
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
    out.push_str(&counters.backup.prometheus(id));
    out.push_str(&counters.exports.prometheus(id));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_join_ids_as_numbers_or_strings() {
        let body = br#"{"id": "7", "addr": "h:4002", "http_addr": "h:4001"}"#;
        let jr = parse_join(body, "join").unwrap();
        assert_eq!((jr.id, jr.voter), (7, true));
        let body = br#"{"id": 8, "addr": "h:4002", "http_addr": "h:4001", "voter": false}"#;
        let jr = parse_join(body, "join").unwrap();
        assert_eq!((jr.id, jr.voter), (8, false));
        let body = br#"{"id": "node-a", "addr": "h:4002", "http_addr": "h:4001"}"#;
        assert_eq!(
            parse_join(body, "join").unwrap().id,
            node_id_for_name("node-a")
        );
        let body = br#"{"id": "0", "addr": "h:4002", "http_addr": "h:4001"}"#;
        assert_eq!(parse_join(body, "join").unwrap().id, node_id_for_name("0"));
    }
}
