//! The rqlite-compatible HTTP API and the device admin API: one table of public routes, thin
//! handlers that speak to the service layer ([`Cluster`]) only.
//!
//! Shapes follow rqlite ([`rqlite`]): a request body is a JSON array of statements; every
//! answer is `{"results": [...]}` (plus `"time"` with `?timings`); failures are an HTTP status
//! ([`rqlite::status_of`], the one mapping from [`Error`]) plus
//! `{"results": [{"error": "..."}]}`. A follower forwards what needs the leader through the
//! service layer's leader client, or answers `301` with the leader's URL when asked
//! `?redirect`.
//!
//! - [`rqlite`]: request and response shapes.
//! - [`sql`]: `/db/execute`, `/db/query`, `/db/request`, `/db/backup`, `/db/load`.
//! - [`admin`]: `/status`, `/nodes`, `/readyz`, `/join`, `/remove`, `/metrics`.
//! - [`devices`]: `/devices` (`cairn device add|list|remove`).
//! - [`streams`]: `/streams` (`cairn streams show|reload|replay`).

pub mod admin;
pub mod devices;
pub mod rqlite;
pub mod sql;
pub mod streams;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;

use crate::cluster::Cluster;
use crate::cluster::client::{FORWARDED, LEADER_WAIT, LeaderRequest, Port};
use crate::error::Error;

/// How long a forwarded request may take on the leader.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// Every public route.
pub fn router(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/db/execute", post(sql::execute))
        .route("/db/query", get(sql::query).post(sql::query))
        .route("/db/request", post(sql::request))
        .route("/db/backup", get(sql::backup))
        .route("/db/load", post(sql::load))
        .route("/status", get(admin::status))
        .route("/nodes", get(admin::nodes))
        .route("/readyz", get(admin::readyz))
        .route("/join", post(admin::join))
        .route("/remove", delete(admin::remove))
        .route("/metrics", get(admin::metrics))
        .route("/devices", post(devices::add).get(devices::list))
        .route("/devices/{device_id}", delete(devices::remove))
        .route("/devices/{device_id}/reset", post(devices::reset))
        .route("/streams", get(streams::show))
        .route("/streams/reload", post(streams::reload))
        .route("/streams/{stream}/replay", post(streams::replay))
        .layer(DefaultBodyLimit::max(256 << 20))
        .with_state(cluster)
}

/// The original request, kept so that it can be forwarded or redirected unchanged. An
/// extractor: the last argument of a handler (it takes the body, within the route's limit).
pub struct Original {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for Original {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let (method, uri, headers) = (
            req.method().clone(),
            req.uri().clone(),
            req.headers().clone(),
        );
        let body = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Original {
            method,
            uri,
            headers,
            body,
        })
    }
}

/// Where a request that needs the leader was served.
pub enum Served<T> {
    /// Here, as the leader.
    Here(T),
    /// By the leader; its answer, to relay.
    There(Response),
}

/// Runs `op` here if this node leads, else sends the original request to the leader (or
/// `301`s the client there with `redirect`), by [`Cluster::on_leader`]'s rules.
pub async fn on_leader<T, Fut>(
    n: &Cluster,
    req: &Original,
    redirect: bool,
    op: impl Fn() -> Fut,
) -> Result<Served<T>, Error>
where
    Fut: Future<Output = Result<T, Error>>,
{
    n.on_leader(
        || {
            let here = op();
            async move { here.await.map(Served::Here) }
        },
        || async { to_leader(n, req, redirect).await.map(Served::There) },
    )
    .await
}

/// Sends the request to the leader and relays its answer (or `301`s the client there).
async fn to_leader(n: &Cluster, req: &Original, redirect: bool) -> Result<Response, Error> {
    if req.headers.contains_key(FORWARDED) {
        // Never forward twice: the sender thought we were leader and we are not (any more).
        return Err(Error::NotLeader(None));
    }
    let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if redirect {
        return redirect_to_leader(n, path).await;
    }
    let leader_req = LeaderRequest {
        method: req.method.clone(),
        path,
        content_type: req
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        body: req.body.clone(),
    };
    let answer = n
        .call_leader(Port::Api, leader_req, LEADER_WAIT, FORWARD_TIMEOUT)
        .await?;
    let mut resp = (answer.status, answer.body).into_response();
    for h in [header::CONTENT_TYPE, header::LOCATION] {
        if let Some(v) = answer.headers.get(&h) {
            resp.headers_mut().insert(h, v.clone());
        }
    }
    Ok(resp)
}

/// `301` to the same path on the leader's API.
async fn redirect_to_leader(n: &Cluster, path: &str) -> Result<Response, Error> {
    let (_, addr) = n.leader_addr(Port::Api, LEADER_WAIT).await?;
    let url = format!("http://{addr}{path}");
    Ok((StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, url)]).into_response())
}
