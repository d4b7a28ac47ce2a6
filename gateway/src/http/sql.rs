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
    Opts, error_response, json_response, parse_statements, result_json, results_response,
};
use super::{Original, Scheme, Served, on_leader, redirect_to_leader};
use crate::cluster::{Cluster, Level};
use crate::db::sql::{Statement, StatementResult};
use crate::error::Error;
use crate::raft::network::file_body;
use crate::security::{Access, Perm};

/// Answers results served here, relays the leader's answer, or renders the error.
fn answer(r: Result<Served<Vec<StatementResult>>, Error>, o: &Opts, start: Instant) -> Response {
    match r {
        Ok(Served::Here(results)) => results_response(&results, o, start),
        Ok(Served::There(resp)) => resp,
        Err(e) => error_response(&e, o.pretty),
    }
}

/// SQL through Raft on the leader (made deterministic first when `rewrite`).
async fn write(
    n: &Cluster,
    statements: Vec<Statement>,
    o: &Opts,
    req: &Original,
    rewrite: bool,
) -> Response {
    let start = Instant::now();
    let r = on_leader(n, req, o.redirect, || {
        n.execute(statements.clone(), o.transaction, rewrite)
    })
    .await;
    answer(r, o, start)
}

/// A read at the requested consistency level; `none` never leaves this node.
async fn read(n: &Cluster, statements: Vec<Statement>, o: &Opts, req: &Original) -> Response {
    let start = Instant::now();
    let level = match o.level.parse::<Level>() {
        Ok(l) => l,
        Err(e) => return error_response(&e, o.pretty),
    };
    let r = if level == Level::None {
        n.query(statements, level, o.transaction)
            .await
            .map(Served::Here)
    } else {
        on_leader(n, req, o.redirect, || {
            n.query(statements.clone(), level, o.transaction)
        })
        .await
    };
    answer(r, o, start)
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

/// Counts and parses a SQL request, then writes it through Raft or reads it at the requested
/// level (`/db/request` reads when every statement is read-only).
async fn serve(at: Endpoint, n: &Cluster, q: HashMap<String, String>, req: Original) -> Response {
    n.metrics().http_requests.fetch_add(1, Ordering::Relaxed);
    let o = Opts::from(&q);
    let statements = match statements(at, &q, &req) {
        Ok(s) => s,
        Err(e) => return error_response(&e, o.pretty),
    };
    let reading = match at {
        Endpoint::Query => true,
        Endpoint::Request => n.all_read_only(&statements).await,
        Endpoint::Execute => false,
    };
    if reading {
        read(n, statements, &o, &req).await
    } else {
        write(n, statements, &o, &req, true).await
    }
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

/// The database as a SQLite file, streamed. Served by the leader (others redirect there)
/// unless `?noleader`, which returns this node's copy.
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
    match n.backup().await {
        Ok(file) => {
            let body = Body::new(file_body(Vec::new(), file));
            let mut resp = (StatusCode::OK, body).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            resp
        }
        Err(e) => error_response(&e, o.pretty),
    }
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
    let r = if n.is_leader() && !o.redirect {
        match spool(&n, req.into_body()).await {
            Ok(path) => n.load_file(path, restore_state).await.map(Served::Here),
            Err(e) => Err(e),
        }
    } else {
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
    };
    let results = match r {
        Ok(Served::Here(results)) => results,
        Ok(Served::There(resp)) => return resp,
        Err(e) => return error_response(&e, o.pretty),
    };
    // One summary result: the rows loaded, or the error.
    let summary = match results.iter().find(|r| r.error.is_some()) {
        Some(err) => json!({"results": [result_json(err, &o)]}),
        None => json!({"results": [{
            "last_insert_id": 0,
            "rows_affected": results.iter().map(|r| r.rows_affected).sum::<i64>(),
        }]}),
    };
    json_response(StatusCode::OK, &summary, o.pretty)
}

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
