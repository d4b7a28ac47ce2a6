//! `/db/*`: SQL writes and reads at each consistency level, backups and loads.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Extension;
use axum::body::Body;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::rqlite::{
    Opts, ResponseJson, ResultJson, Shape, error_response, json_response, parse_statements,
    results_response,
};
use super::{Original, Scheme, Served, on_leader, redirect_to_leader};
use crate::cluster::client::{FORWARDED, LEADER_WAIT};
use crate::cluster::{Cluster, Level};
use crate::db::sql::{Statement, StatementResult};
use crate::error::Error;
use crate::raft::network::file_body;
use crate::security::{Access, Perm};

/// Answers results served here, relays the leader's answer, or renders the error.
fn answer(
    r: Result<Served<Vec<StatementResult>>, Error>,
    shape: Shape,
    o: &Opts,
    start: Instant,
) -> Response {
    match r {
        Ok(Served::Here(results)) => results_response(&results, shape, o, start),
        Ok(Served::There(resp)) => resp,
        Err(e) => error_response(&e, o.pretty),
    }
}

/// SQL through Raft on the leader (made deterministic first when `rewrite`).
async fn write(
    n: &Cluster,
    statements: Vec<Statement>,
    shape: Shape,
    o: &Opts,
    req: &Original,
    rewrite: bool,
) -> Response {
    let start = Instant::now();
    let r = on_leader(n, req, o.redirect, || {
        n.execute(statements.clone(), o.transaction, rewrite)
    })
    .await;
    answer(r, shape, o, start)
}

/// rqlite's `level=auto`: `none` on a node that does not vote (a read replica), else `weak`.
fn level_of(n: &Cluster, o: &Opts) -> Result<Level, Error> {
    if o.level == "auto" {
        let m = n.raft_metrics();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == n.id());
        return Ok(if voter { Level::Weak } else { Level::None });
    }
    o.level.parse::<Level>()
}

/// A read at the requested consistency level; `none` never leaves this node (and honours
/// `freshness`).
async fn read(
    n: &Cluster,
    statements: Vec<Statement>,
    shape: Shape,
    o: &Opts,
    req: &Original,
) -> Response {
    let start = Instant::now();
    let level = match level_of(n, o) {
        Ok(l) => l,
        Err(e) => return error_response(&e, o.pretty),
    };
    let r = if level == Level::None {
        match o
            .freshness
            .map(|f| n.check_freshness(f, o.freshness_strict))
        {
            Some(Err(e)) => Err(e),
            _ => n
                .query_within(statements, level, o.transaction, o.db_timeout)
                .await
                .map(Served::Here),
        }
    } else {
        on_leader(n, req, o.redirect, || {
            n.query_within(statements.clone(), level, o.transaction, o.db_timeout)
        })
        .await
    };
    answer(r, shape, o, start)
}

/// Which SQL endpoint a request came to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Execute,
    Query,
    Request,
}

/// A SQL request's statements: the `q` parameter (`/db/query`) or the JSON body.
fn statements(
    at: Endpoint,
    q: &HashMap<String, String>,
    req: &Original,
) -> Result<Vec<Statement>, Error> {
    match (at, q.get("q"), &req.method) {
        (Endpoint::Query, Some(sql), _) => Ok(vec![Statement::new(sql.clone())]),
        (Endpoint::Query, None, &Method::GET) => {
            Err(Error::BadRequest("missing q parameter".into()))
        }
        _ => parse_statements(&req.body),
    }
}

/// Counts and parses a SQL request, then writes it through Raft (or queues it with `?queue`)
/// or reads it at the requested level (`/db/request` reads when every statement is
/// read-only).
async fn serve(
    at: Endpoint,
    n: &Arc<Cluster>,
    q: HashMap<String, String>,
    req: Original,
) -> Response {
    n.metrics().http_requests.fetch_add(1, Ordering::Relaxed);
    let o = Opts::from(&q);
    if let Err(e) = Opts::check(&q) {
        return error_response(&e, o.pretty);
    }
    if at == Endpoint::Execute && o.queue {
        return queued(n, &q, &o, &req).await;
    }
    let statements = match statements(at, &q, &req) {
        Ok(s) => s,
        Err(e) => return error_response(&e, o.pretty),
    };
    let (reading, shape) = match at {
        Endpoint::Query => (true, Shape::Query),
        Endpoint::Request => (n.all_read_only(&statements).await, Shape::Request),
        Endpoint::Execute => (false, Shape::Execute),
    };
    if reading {
        read(n, statements, shape, &o, &req).await
    } else {
        write(n, statements, shape, &o, &req, true).await
    }
}

/// `/db/execute?queue`: queued on this node (leader or not) and answered at once with its
/// sequence number, or with `wait` once it is written (`408` after `timeout`).
async fn queued(
    n: &Arc<Cluster>,
    q: &HashMap<String, String>,
    o: &Opts,
    req: &Original,
) -> Response {
    let start = Instant::now();
    // As rqlite: no queue on a node that knows no leader (unless `noleader`); an election
    // under way gets the time other writes get to settle.
    if !super::rqlite::flag(q, "noleader") && n.wait_leader(LEADER_WAIT).await.is_none() {
        return error_response(&Error::NoLeader, o.pretty);
    }
    let statements = match parse_statements(&req.body) {
        Ok(s) => s,
        // An empty request that only waits for what is queued before it.
        Err(_) if o.wait && req.body.iter().all(u8::is_ascii_whitespace) => Vec::new(),
        Err(e) => return error_response(&e, o.pretty),
    };
    let ticket = match n.write_queue().push(statements, o.wait).await {
        Ok(t) => t,
        Err(e) => return error_response(&e, o.pretty),
    };
    let sequence_number = ticket.sequence_number;
    if let Err(e) = ticket.flushed(o.timeout).await {
        let status = match e {
            Error::Unavailable(_) => StatusCode::REQUEST_TIMEOUT,
            _ => super::rqlite::status_of(&e),
        };
        return json_response(
            status,
            &json!({"results": [{"error": e.to_string()}], "sequence_number": sequence_number}),
            o.pretty,
        );
    }
    let body = ResponseJson {
        results: Vec::new(),
        time: o.timings.then(|| start.elapsed().as_secs_f64()),
        sequence_number: Some(sequence_number),
    };
    json_response(StatusCode::OK, &body, o.pretty)
}

type Params = Query<HashMap<String, String>>;

pub async fn execute(State(n): State<Arc<Cluster>>, Query(q): Params, req: Original) -> Response {
    serve(Endpoint::Execute, &n, q, req).await
}

pub async fn query(State(n): State<Arc<Cluster>>, Query(q): Params, req: Original) -> Response {
    serve(Endpoint::Query, &n, q, req).await
}

/// rqlite's unified endpoint: reads go the read path, anything else through Raft.
pub async fn request(State(n): State<Arc<Cluster>>, Query(q): Params, req: Original) -> Response {
    serve(Endpoint::Request, &n, q, req).await
}

/// The database as a SQLite file, streamed (already compact: `vacuum` changes nothing), or
/// with `fmt=sql` (and `tables=a,b`) as rqlite's SQL dump of the user tables. Served by the
/// leader (others redirect there) unless `?noleader`, which returns this node's copy.
pub async fn backup(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    Extension(scheme): Extension<Scheme>,
    uri: Uri,
) -> Response {
    let o = Opts::from(&q);
    if !q.contains_key("noleader") && !n.is_leader() {
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/db/backup");
        return redirect_to_leader(&n, scheme, path)
            .await
            .unwrap_or_else(|e| error_response(&e, o.pretty));
    }
    let compress = super::rqlite::flag(&q, "compress");
    if let Some(fmt) = q.get("fmt").filter(|f| f.as_str() != "binary") {
        if fmt != "sql" {
            let e = Error::BadRequest(format!("unknown backup format {fmt:?}: use sql"));
            return error_response(&e, o.pretty);
        }
        let only = q
            .get("tables")
            .map(|t| t.split(',').map(str::to_string).collect::<Vec<_>>());
        let text = match n.dump_sql(only).await {
            Ok(text) => text,
            Err(e) => return error_response(&e, o.pretty),
        };
        if !compress {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/sql")],
                text,
            )
                .into_response();
        }
        return match gzip_bytes(text.into_bytes()).await {
            Ok(gz) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/gzip")],
                gz,
            )
                .into_response(),
            Err(e) => error_response(&e, o.pretty),
        };
    }
    let file = match n.backup().await {
        Ok(file) if compress => gzip_file(&n, file).await,
        r => r,
    };
    match file {
        Ok(file) => {
            let body = Body::new(file_body(Vec::new(), file));
            let mut resp = (StatusCode::OK, body).into_response();
            let kind = if compress {
                "application/gzip"
            } else {
                "application/octet-stream"
            };
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
            resp
        }
        Err(e) => error_response(&e, o.pretty),
    }
}

/// rqlite's `?compress`: the backup file gzipped into another unlinked scratch file (on
/// disk, never whole in memory), read from its start.
async fn gzip_file(n: &Cluster, mut file: std::fs::File) -> Result<std::fs::File, Error> {
    let tmp = n
        .scratch_dir()
        .join(format!("backup-{}.gz", rand::random::<u64>()));
    let f = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        use std::io::{Seek, Write};
        let out = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        std::fs::remove_file(&tmp)?;
        let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        std::io::copy(&mut file, &mut gz)?;
        let mut out = gz.finish()?;
        out.flush()?;
        out.rewind()?;
        Ok(out)
    })
    .await??;
    Ok(f)
}

/// A SQL dump (already in memory) gzipped.
async fn gzip_bytes(text: Vec<u8>) -> Result<Vec<u8>, Error> {
    let gz = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&text)?;
        gz.finish()
    })
    .await??;
    Ok(gz)
}

/// Replaces the database with an uploaded SQLite file or SQL text (see `db::load`). On the
/// leader the body streams to a file in the data dir (never whole in memory), cut off at
/// `max_db_size_mib`; the file then reaches every replica in bounded chunks through the log.
/// A follower forwards the request (its body within the API's 256 MiB limit).
///
/// The route needs `load`; a Cairn backup (which restores the device registry and its keys)
/// needs `all` as well, known once the file is read.
pub async fn load(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    access: Access,
    req: Request,
) -> Response {
    let o = Opts::from(&q);
    let restore_state = access.has(Perm::All);
    let r = if o.redirect {
        let original = match Original::from_request(req, &()).await {
            Ok(o) => o,
            Err(resp) => return resp,
        };
        on_leader(&n, &original, o.redirect, || async {
            let path = upload_path(&n);
            tokio::fs::write(&path, &original.body).await?;
            n.load_file(path, restore_state).await
        })
        .await
    } else {
        // Here or on a follower, the body streams to disk first (never whole in memory); a
        // follower then streams the file on to the leader.
        let forwarded = req.headers().contains_key(FORWARDED);
        let (parts, body) = req.into_parts();
        match spool(&n, body).await {
            Ok(path) => {
                let r = load_spooled(&n, &parts, &path, restore_state, forwarded).await;
                let _ = tokio::fs::remove_file(&path).await;
                r
            }
            Err(e) => Err(e),
        }
    };
    let results = match r {
        Ok(Served::Here(results)) => results,
        Ok(Served::There(resp)) => return resp,
        Err(e) => return error_response(&e, o.pretty),
    };
    // One summary result: the rows loaded, or the error.
    let summary = match results.iter().find(|r| r.error.is_some()) {
        Some(err) => err.clone(),
        // A dump's own counters (see `Cluster::load_file`).
        None if results.len() == 1 => results[0].clone(),
        None => StatementResult {
            rows_affected: results.iter().map(|r| r.rows_affected).sum::<i64>(),
            ..Default::default()
        },
    };
    let body = ResponseJson {
        results: vec![ResultJson::new(&summary, Shape::Execute, &o)],
        time: None,
        sequence_number: None,
    };
    json_response(StatusCode::OK, &body, o.pretty)
}

/// rqlite's `POST /boot`: a whole SQLite file into a single-node cluster. rqlite writes it
/// beside the log; here it takes `/db/load`'s path (streamed to disk, through the log in
/// chunks), and a node that has other members refuses it (use `/db/load` there).
pub async fn boot(
    State(n): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
    access: Access,
    req: Request,
) -> Response {
    let members = n
        .raft_metrics()
        .membership_config
        .membership()
        .nodes()
        .count();
    if members > 1 {
        let e = Error::BadRequest(format!(
            "boot is for a single-node cluster and this one has {members} members: use /db/load"
        ));
        return error_response(&e, Opts::from(&q).pretty);
    }
    load(State(n), Query(q), access, req).await
}

/// How long a forwarded load may take on the leader (upload, checks, every chunk applied).
const LOAD_FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Loads the spooled upload at `path` here if this node leads, else has the leader load it
/// (streaming the file). A leadership change before the load took effect is waited out for up
/// to [`LOAD_LEADER_WAIT`] and the load sent again: a load replaces the user's tables, so one
/// that did take effect is not changed by a repeat. The caller deletes `path`.
async fn load_spooled(
    n: &Cluster,
    parts: &axum::http::request::Parts,
    path: &std::path::Path,
    restore_state: bool,
    forwarded: bool,
) -> Result<Served<Vec<StatementResult>>, Error> {
    let deadline = std::time::Instant::now() + LOAD_LEADER_WAIT;
    loop {
        let again = std::time::Instant::now() < deadline;
        if n.is_leader() {
            // `load_file` consumes its upload: it gets a link to the spool file.
            let link = path.with_extension("load");
            std::fs::hard_link(path, &link)?;
            match n.load_file(link, restore_state).await {
                Err(e) if e.is_not_leader() && again && !forwarded => {}
                r => return r.map(Served::Here),
            }
        } else if forwarded {
            // Never forwarded twice: leadership moved since the sender looked.
            return Err(Error::NotLeader(None));
        } else if n.leader().is_some() {
            let body = file_body(Vec::new(), std::fs::File::open(path)?);
            let (m, u, h) = (&parts.method, &parts.uri, &parts.headers);
            let resp = super::forward(n, m, u, h, body, LOAD_FORWARD_TIMEOUT).await?;
            if resp.status() != StatusCode::SERVICE_UNAVAILABLE || !again {
                return Ok(Served::There(resp));
            }
        } else if !again {
            return Err(Error::NoLeader);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// How long a load waits out a leadership change before it gives up.
const LOAD_LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn upload_path(n: &Cluster) -> std::path::PathBuf {
    n.scratch_dir()
        .join(format!("upload-{}.tmp", rand::random::<u64>()))
}

/// Bytes of an oversized upload read and dropped before the refusal is sent.
const DRAIN_BEYOND_MAX: u64 = 64 << 20;

/// Streams a request body to a new file in the data dir, refusing it beyond the node's
/// largest load.
async fn spool(n: &Cluster, body: Body) -> Result<std::path::PathBuf, Error> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let path = upload_path(n);
    let max = n.max_load_bytes();
    let r = async {
        let mut file = tokio::fs::File::create(&path).await?;
        let mut stream = body.into_data_stream();
        let mut len = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| Error::BadRequest(format!("load: reading the body: {e}")))?;
            len += chunk.len() as u64;
            if len > max {
                // Read (and drop) the rest of a modest overrun before answering, so the
                // client gets the clear error instead of a reset while it is still sending.
                let drain_to = max.saturating_add(DRAIN_BEYOND_MAX);
                while len <= drain_to {
                    match stream.next().await {
                        Some(Ok(more)) => len += more.len() as u64,
                        _ => break,
                    }
                }
                return Err(Error::BadRequest(format!(
                    "load: the upload is larger than this node's max_db_size_mib ({} MiB)",
                    max >> 20
                )));
            }
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        Ok::<(), Error>(())
    }
    .await;
    match r {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = tokio::fs::remove_file(&path).await;
            Err(e)
        }
    }
}
