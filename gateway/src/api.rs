//! The rqlite-compatible HTTP API.
//!
//! Shapes follow rqlite: a request body is a JSON array of statements; every answer is
//! `{"results": [...]}` (plus `"time"` with `?timings`); failures are an HTTP status plus
//! `{"results": [{"error": "..."}]}`. A follower forwards writes and non-`none` reads to the
//! leader, or answers `301` with the leader's URL when asked `?redirect`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use openraft::ChangeMembers;
use openraft::async_runtime::WatchReceiver;
use serde_json::{Value as Json, json};

use crate::command::{Command, CommandResponse};
use crate::group_commit::WriteError;
use crate::network;
use crate::node::{JoinRequest, Node};
use crate::raft_types::Peer;
use crate::sql::{self, SqlCommand, Stamp, Statement, StatementResult};

const FORWARDED: &str = "x-cairn-forwarded";

/// All API routes.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/db/execute", post(execute))
        .route("/db/query", get(query).post(query))
        .route("/db/request", post(request))
        .route("/db/backup", get(backup))
        .route("/db/load", post(load))
        .route("/status", get(status))
        .route("/nodes", get(nodes))
        .route("/readyz", get(readyz))
        .route("/join", post(join))
        .route("/remove", delete(remove))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(256 << 20))
        .with_state(node)
}

/// The query-string flags rqlite understands. A bare `?flag` means true.
struct Opts {
    transaction: bool,
    timings: bool,
    associative: bool,
    pretty: bool,
    redirect: bool,
    level: String,
}

impl Opts {
    fn from(q: &HashMap<String, String>) -> Self {
        let flag = |k: &str| {
            q.get(k)
                .is_some_and(|v| !matches!(v.as_str(), "false" | "0"))
        };
        Opts {
            transaction: flag("transaction"),
            timings: flag("timings"),
            associative: flag("associative"),
            pretty: flag("pretty"),
            redirect: flag("redirect"),
            level: q.get("level").cloned().unwrap_or_else(|| "weak".into()),
        }
    }
}

fn json_response(status: StatusCode, v: &Json, pretty: bool) -> Response {
    let body = if pretty {
        serde_json::to_vec_pretty(v)
    } else {
        serde_json::to_vec(v)
    }
    .unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// rqlite's error shape.
pub fn error_response(status: StatusCode, msg: impl std::fmt::Display, pretty: bool) -> Response {
    json_response(
        status,
        &json!({"results": [{"error": msg.to_string()}]}),
        pretty,
    )
}

fn result_json(r: &StatementResult, o: &Opts) -> Json {
    let mut m = serde_json::Map::new();
    if let Some(e) = &r.error {
        m.insert("error".into(), e.clone().into());
    } else if r.is_query {
        if o.associative {
            let types: serde_json::Map<_, _> = r
                .columns
                .iter()
                .zip(&r.types)
                .map(|(c, t)| (c.clone(), Json::from(t.clone())))
                .collect();
            let rows: Vec<Json> = r
                .values
                .iter()
                .map(|row| {
                    Json::Object(
                        r.columns
                            .iter()
                            .zip(row)
                            .map(|(c, v)| (c.clone(), v.to_json()))
                            .collect(),
                    )
                })
                .collect();
            m.insert("types".into(), Json::Object(types));
            m.insert("rows".into(), rows.into());
        } else {
            m.insert("columns".into(), json!(r.columns));
            m.insert("types".into(), json!(r.types));
            if !r.values.is_empty() {
                let values: Vec<Json> = r
                    .values
                    .iter()
                    .map(|row| row.iter().map(|v| v.to_json()).collect())
                    .collect();
                m.insert("values".into(), values.into());
            }
        }
    } else {
        m.insert("last_insert_id".into(), r.last_insert_id.into());
        m.insert("rows_affected".into(), r.rows_affected.into());
    }
    if o.timings {
        m.insert("time".into(), r.time.into());
    }
    Json::Object(m)
}

fn results_response(results: &[StatementResult], o: &Opts, start: Instant) -> Response {
    let mut body =
        json!({"results": results.iter().map(|r| result_json(r, o)).collect::<Vec<_>>()});
    if o.timings {
        body["time"] = start.elapsed().as_secs_f64().into();
    }
    json_response(StatusCode::OK, &body, o.pretty)
}

/// The original request, kept so that it can be forwarded or redirected unchanged.
struct Original {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// Sends the request to the leader (or `301`s the client there with `?redirect`).
async fn to_leader(n: &Node, req: &Original, o: &Opts) -> Response {
    if req.headers.contains_key(FORWARDED) {
        // Never forward twice: the sender thought we were leader and we are not (any more).
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "not leader", o.pretty);
    }
    let Some((id, leader)) = n.wait_leader(Duration::from_secs(3)).await else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "leader not found",
            o.pretty,
        );
    };
    if id == n.id {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "leadership changing, retry",
            o.pretty,
        );
    }
    let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = format!("http://{}{}", leader.http_addr, path);
    if o.redirect {
        return (StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, url)]).into_response();
    }
    let mut fwd = hyper::Request::builder()
        .method(req.method.clone())
        .uri(&url)
        .header(FORWARDED, n.id.to_string());
    if let Some(ct) = req.headers.get(header::CONTENT_TYPE) {
        fwd = fwd.header(header::CONTENT_TYPE, ct);
    }
    let fwd = match fwd.body(network::full(req.body.clone())) {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, e, o.pretty),
    };
    match n.client.send(fwd, Duration::from_secs(60)).await {
        Ok((status, headers, body)) => {
            let mut resp = (status, body).into_response();
            for h in [header::CONTENT_TYPE, header::LOCATION] {
                if let Some(v) = headers.get(&h) {
                    resp.headers_mut().insert(h, v.clone());
                }
            }
            resp
        }
        Err(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("forwarding to leader {id} at {}: {e}", leader.http_addr),
            o.pretty,
        ),
    }
}

/// Proposes SQL through Raft on the leader; forwards from followers.
async fn write_path(
    n: &Node,
    statements: Vec<Statement>,
    o: &Opts,
    req: &Original,
    rewrite: bool,
) -> Response {
    if !n.is_leader() {
        return to_leader(n, req, o).await;
    }
    let start = Instant::now();
    let mut cmd = SqlCommand {
        statements,
        transaction: o.transaction,
    };
    let stamp = Stamp::now();
    if rewrite && let Err(e) = sql::prepare_write(&mut cmd, &stamp) {
        return error_response(StatusCode::BAD_REQUEST, e, o.pretty);
    }
    let cmd = Command::SqlAt {
        stamp_ms: stamp.unix_ms(),
        sql: cmd,
    };
    match n.writes.submit(cmd).await {
        Ok(CommandResponse::Sql(results)) => results_response(&results, o, start),
        Ok(other) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected response {other:?}"),
            o.pretty,
        ),
        Err(WriteError::NotLeader(_)) => to_leader(n, req, o).await,
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e, o.pretty),
    }
}

/// Reads on this node's database.
async fn local_read(n: &Node, statements: Vec<Statement>, o: &Opts) -> Response {
    let start = Instant::now();
    let store = n.store.clone();
    let tx = o.transaction;
    let limits = n.config.read_limits();
    // Dropped with this future when the client goes away: the read stops at once.
    let cancel = crate::sandbox::CancelOnDrop(Default::default());
    let flag = cancel.0.clone();
    let r = tokio::task::spawn_blocking(move || {
        store.read(|c| sql::query(c, &statements, tx, &limits, Some(flag)))
    })
    .await;
    drop(cancel);
    match r {
        Ok(Ok(results)) => results_response(&results, o, start),
        Ok(Err(e)) => error_response(StatusCode::INTERNAL_SERVER_ERROR, e, o.pretty),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, e, o.pretty),
    }
}

/// A read at the requested consistency level.
async fn read_path(n: &Node, statements: Vec<Statement>, o: &Opts, req: &Original) -> Response {
    match o.level.as_str() {
        "none" => local_read(n, statements, o).await,
        "weak" | "" => {
            if n.is_leader() {
                local_read(n, statements, o).await
            } else {
                to_leader(n, req, o).await
            }
        }
        "linearizable" => {
            if !n.is_leader() {
                return to_leader(n, req, o).await;
            }
            match crate::raft_types::confirm_leadership(&n.raft).await {
                Ok(_) => local_read(n, statements, o).await,
                Err(e) if e.forward_to_leader().is_some() => to_leader(n, req, o).await,
                Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e, o.pretty),
            }
        }
        "strong" => {
            if !n.is_leader() {
                return to_leader(n, req, o).await;
            }
            match all_read_only(n, &statements).await {
                true => write_path(n, statements, o, req, false).await,
                false => error_response(
                    StatusCode::BAD_REQUEST,
                    "attempt to change database via query operation",
                    o.pretty,
                ),
            }
        }
        other => error_response(
            StatusCode::BAD_REQUEST,
            format!("unknown level {other:?}: use none, weak, linearizable or strong"),
            o.pretty,
        ),
    }
}

/// True when SQLite says every statement is read-only. Statements that do not prepare (for
/// example because an earlier statement creates their table) count as writes.
async fn all_read_only(n: &Node, statements: &[Statement]) -> bool {
    let store = n.store.clone();
    let sqls: Vec<String> = statements.iter().map(|s| s.sql.clone()).collect();
    tokio::task::spawn_blocking(move || {
        store
            .read(|c| {
                crate::sandbox::user(crate::sandbox::Mode::Read, || {
                    sqls.iter()
                        .all(|s| c.prepare(s).map(|p| p.readonly()).unwrap_or(false))
                })
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

fn original(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Original {
    Original {
        method,
        uri,
        headers,
        body,
    }
}

async fn execute(
    State(n): State<Arc<Node>>,
    Query(q): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    n.http_requests.fetch_add(1, Ordering::Relaxed);
    let o = Opts::from(&q);
    let statements = match sql::parse_statements(&body) {
        Ok(s) => s,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e, o.pretty),
    };
    write_path(
        &n,
        statements,
        &o,
        &original(method, uri, headers, body),
        true,
    )
    .await
}

async fn query(
    State(n): State<Arc<Node>>,
    Query(q): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    n.http_requests.fetch_add(1, Ordering::Relaxed);
    let o = Opts::from(&q);
    let statements = match (&method, q.get("q")) {
        (_, Some(sql)) => vec![Statement::new(sql.clone())],
        (&Method::POST, None) => match sql::parse_statements(&body) {
            Ok(s) => s,
            Err(e) => return error_response(StatusCode::BAD_REQUEST, e, o.pretty),
        },
        _ => return error_response(StatusCode::BAD_REQUEST, "missing q parameter", o.pretty),
    };
    read_path(&n, statements, &o, &original(method, uri, headers, body)).await
}

/// rqlite's unified endpoint: reads go the read path, anything else through Raft.
async fn request(
    State(n): State<Arc<Node>>,
    Query(q): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    n.http_requests.fetch_add(1, Ordering::Relaxed);
    let o = Opts::from(&q);
    let statements = match sql::parse_statements(&body) {
        Ok(s) => s,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e, o.pretty),
    };
    let req = original(method, uri, headers, body);
    if all_read_only(&n, &statements).await {
        read_path(&n, statements, &o, &req).await
    } else {
        write_path(&n, statements, &o, &req, true).await
    }
}

async fn status(State(n): State<Arc<Node>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let o = Opts::from(&q);
    let m = n.raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let leader_peer = m
        .current_leader
        .and_then(|l| membership.get_node(&l).cloned());
    let body = json!({
        "node_id": n.id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": n.started.elapsed().as_secs_f64(),
        "http_addr": n.peer.http_addr,
        "raft_addr": n.peer.raft_addr,
        "device_addr": n.peer.device_addr,
        "data_dir": n.config.data_dir,
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
        "db_size": n.store.db_size(),
        "ingress": crate::ingress::metrics::METRICS.to_json(),
        "log_store": {
            "appends": n.log_stats.appends.load(Ordering::Relaxed),
            "entries": n.log_stats.entries.load(Ordering::Relaxed),
            "write_us_mean": n.log_stats.write_us.load(Ordering::Relaxed)
                .checked_div(n.log_stats.appends.load(Ordering::Relaxed))
                .unwrap_or(0),
        },
        "write_queue": {
            "commands": n.writes.stats.commands.load(Ordering::Relaxed),
            "batches": n.writes.stats.batches.load(Ordering::Relaxed),
        },
    });
    json_response(StatusCode::OK, &body, o.pretty)
}

async fn nodes(State(n): State<Arc<Node>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let o = Opts::from(&q);
    let m = n.raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership().clone();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let peers: Vec<(u64, Peer)> = membership.nodes().map(|(id, p)| (*id, p.clone())).collect();
    let checks = peers.iter().map(|(id, p)| {
        let client = n.client.clone();
        let me = *id == n.id;
        let url = format!("http://{}/readyz?noleader", p.http_addr);
        async move {
            if me {
                return true;
            }
            let Ok(req) = hyper::Request::get(url).body(network::full(Bytes::new())) else {
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
                    "api_addr": format!("http://{}", p.http_addr),
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

async fn readyz(State(n): State<Arc<Node>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let running = n.raft.metrics().borrow_watched().running_state.is_ok();
    if !running {
        return (StatusCode::SERVICE_UNAVAILABLE, "[-]node stopped\n").into_response();
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

/// Parses the JSON body of an admin request (`/join`, `/remove`), or answers 400 with rqlite's
/// error shape.
#[allow(clippy::result_large_err)] // cold admin path; the error is the finished response
fn parse_admin_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
    pretty: bool,
) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        error_response(
            StatusCode::BAD_REQUEST,
            format!("invalid {what} request: {e}"),
            pretty,
        )
    })
}

async fn join(
    State(n): State<Arc<Node>>,
    Query(q): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let o = Opts::from(&q);
    let jr: JoinRequest = match parse_admin_body(&body, "join", o.pretty) {
        Ok(req) => req,
        Err(resp) => return resp,
    };
    if !n.is_leader() {
        return to_leader(&n, &original(method, uri, headers, body), &o).await;
    }
    let peer = Peer {
        raft_addr: jr.addr.clone(),
        http_addr: jr.http_addr.clone(),
        device_addr: jr.device_addr.clone(),
    };
    let m = n.raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership().clone();
    let is_voter = membership.voter_ids().any(|v| v == jr.id);
    let r = async {
        match membership.get_node(&jr.id) {
            Some(existing) if *existing != peer => {
                n.raft
                    .change_membership(
                        ChangeMembers::SetNodes(BTreeMap::from([(jr.id, peer.clone())])),
                        false,
                    )
                    .await?;
            }
            Some(_) => {}
            None => {
                tracing::info!(id = jr.id, %peer, "adding learner");
                n.raft.add_learner(jr.id, peer.clone(), true).await?;
            }
        }
        if jr.voter && !is_voter {
            tracing::info!(id = jr.id, "promoting to voter");
            n.raft
                .change_membership(ChangeMembers::AddVoterIds([jr.id].into()), false)
                .await?;
        }
        Ok::<
            _,
            openraft::errors::RaftError<
                crate::raft_types::TypeConfig,
                openraft::errors::ClientWriteError<_>,
            >,
        >(())
    }
    .await;
    match r {
        Ok(()) => json_response(StatusCode::OK, &json!({}), o.pretty),
        Err(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("join: {e}"),
            o.pretty,
        ),
    }
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

use serde::Deserialize as _;

async fn remove(
    State(n): State<Arc<Node>>,
    Query(q): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let o = Opts::from(&q);
    let rr: RemoveRequest = match parse_admin_body(&body, "remove", o.pretty) {
        Ok(req) => req,
        Err(resp) => return resp,
    };
    if !n.is_leader() {
        return to_leader(&n, &original(method, uri, headers, body), &o).await;
    }
    let m = n.raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership().clone();
    let change = if membership.voter_ids().any(|v| v == rr.id) {
        ChangeMembers::RemoveVoters([rr.id].into())
    } else if membership.get_node(&rr.id).is_some() {
        ChangeMembers::RemoveNodes([rr.id].into())
    } else {
        return error_response(
            StatusCode::NOT_FOUND,
            format!("node {} is not a member", rr.id),
            o.pretty,
        );
    };
    match n.raft.change_membership(change, false).await {
        Ok(_) => json_response(StatusCode::OK, &json!({}), o.pretty),
        Err(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("remove: {e}"),
            o.pretty,
        ),
    }
}

/// The database as a SQLite file, streamed. Served by the leader (others redirect there)
/// unless `?noleader`, which returns this node's copy.
async fn backup(
    State(n): State<Arc<Node>>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
) -> Response {
    let o = Opts::from(&q);
    if !q.contains_key("noleader") && !n.is_leader() {
        let Some((_, leader)) = n.wait_leader(Duration::from_secs(3)).await else {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "leader not found",
                o.pretty,
            );
        };
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/db/backup");
        let url = format!("http://{}{}", leader.http_addr, path);
        return (StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, url)]).into_response();
    }
    let store = n.store.clone();
    let tmp = n
        .config
        .data_dir
        .join(format!("backup-{}.db", rand::random::<u64>()));
    let r = tokio::task::spawn_blocking(move || -> anyhow::Result<std::fs::File> {
        store.copy_to(&tmp)?;
        let f = std::fs::File::open(&tmp)?;
        // Unlinked but open: the stream reads it, nothing is left behind.
        std::fs::remove_file(&tmp)?;
        Ok(f)
    })
    .await;
    match r {
        Ok(Ok(file)) => {
            let body = Body::new(network::file_body(Vec::new(), file));
            let mut resp = (StatusCode::OK, body).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            resp
        }
        Ok(Err(e)) => error_response(StatusCode::INTERNAL_SERVER_ERROR, e, o.pretty),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, e, o.pretty),
    }
}

/// Replaces the database with an uploaded SQLite file or SQL text, through Raft as one
/// transaction (so every replica loads the same rows).
async fn load(
    State(n): State<Arc<Node>>,
    Query(q): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut o = Opts::from(&q);
    if !n.is_leader() {
        return to_leader(&n, &original(method, uri, headers, body), &o).await;
    }
    let store = n.store.clone();
    let data = body.clone();
    let dir = n.config.data_dir.clone();
    let stmts = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Statement>> {
        let (existing, streams) =
            store.read(|c| (sql::user_objects(c), crate::sandbox::stream_tables(c)))?;
        sql::load_statements(&data, &dir, &existing?, &streams)
    })
    .await;
    let statements = match stmts {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return error_response(StatusCode::BAD_REQUEST, format!("load: {e}"), o.pretty);
        }
        Err(e) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, e, o.pretty),
    };
    o.transaction = true;
    let req = original(method, uri, headers, body);
    let resp = write_path(&n, statements, &o, &req, false).await;
    if resp.status() != StatusCode::OK {
        return resp;
    }
    // Summarise instead of echoing one result per loaded row; report the first error.
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let v: Json = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
    let results = v["results"].as_array().cloned().unwrap_or_default();
    match results.iter().find(|r| r.get("error").is_some()) {
        Some(err) => json_response(StatusCode::OK, &json!({"results": [err]}), o.pretty),
        None => json_response(
            StatusCode::OK,
            &json!({"results": [{"last_insert_id": 0, "rows_affected": results.len()}]}),
            o.pretty,
        ),
    }
}

async fn metrics(State(n): State<Arc<Node>>) -> Response {
    let m = n.raft.metrics().borrow_watched().clone();
    let idx = |l: &Option<crate::raft_types::LogId>| l.as_ref().map(|l| l.index).unwrap_or(0);
    let mut out = String::new();
    let mut g = |name: &str, help: &str, kind: &str, v: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node_id=\"{}\"}} {v}\n",
            n.id
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
        n.store.db_size() as f64,
    );
    g(
        "cairn_http_requests_total",
        "SQL requests served.",
        "counter",
        n.http_requests.load(Ordering::Relaxed) as f64,
    );
    g(
        "cairn_writes_total",
        "Commands proposed through the group-commit queue.",
        "counter",
        n.writes.stats.commands.load(Ordering::Relaxed) as f64,
    );
    g(
        "cairn_log_appends_total",
        "Durable Raft log appends (one fsync each).",
        "counter",
        n.log_stats.appends.load(Ordering::Relaxed) as f64,
    );
    g(
        "cairn_log_entries_total",
        "Entries written by those appends.",
        "counter",
        n.log_stats.entries.load(Ordering::Relaxed) as f64,
    );
    g(
        "cairn_write_batches_total",
        "Group-commit batches proposed.",
        "counter",
        n.writes.stats.batches.load(Ordering::Relaxed) as f64,
    );
    out.push_str(&crate::ingress::metrics::METRICS.prometheus(n.id));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out,
    )
        .into_response()
}
