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
//! - [`sql`]: `/db/execute`, `/db/query`, `/db/request`, `/db/backup`, `/db/load`, `/boot`.
//! - [`admin`]: `/status`, `/nodes`, `/readyz`, `/join`, `/notify`, `/reap`, `/remove`, `/metrics`.
//! - [`ops`]: `/leader`, `/snapshot`, `/db/sql`, `/debug/vars`.
//! - [`devices`]: `/devices` (`cairn device add|list|remove|reset|revoke|rekey`).
//! - [`streams`]: `/streams` (`cairn streams show|reload|replay`).
//! - [`export`]: `DELETE /export/{name}` (`cairn export forget`).
//!
//! Every route declares its permission ([`require`], rqlite's names plus `devices`) and the
//! body it takes ([`body_type`]): a refused request is answered 401/403/415 before its body is
//! read. Requests a follower forwards go to the leader's Raft listener (node mutual TLS) under
//! [`FORWARD_PREFIX`], carrying the client's own `Authorization` header: the leader checks
//! them again with the same table, so forwarding never grants more than the client has.
//! No route here returns a device key; node-to-node routes live on the Raft listener only.

pub mod admin;
pub mod devices;
pub mod export;
pub mod ops;
pub mod rqlite;
pub mod sql;
pub mod streams;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use axum::{Extension, Router};
use bytes::Bytes;

use crate::cluster::Cluster;
use crate::cluster::client::{FORWARDED, LEADER_WAIT, LeaderRequest, Port};
use crate::error::Error;
use crate::security::auth::error_body;
use crate::security::{Authenticator, Need, Perm, require};

/// How long a forwarded request may take on the leader.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a client may take to send a request body (a slow client holds a connection
/// slot meanwhile; 256 MiB at 10 Mbit/s takes about 215 s).
const BODY_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the leader's Raft listener serves this router for forwarded requests.
pub const FORWARD_PREFIX: &str = "/api";

/// The largest request body of any public route (`/db/load` of a SQLite file included).
pub const BODY_LIMIT: usize = 256 << 20;

/// The scheme of this node's API (`https` with `--http-cert`), for the URLs it hands out.
#[derive(Debug, Clone, Copy)]
pub struct Scheme(pub &'static str);

/// The body types of JSON routes.
const JSON: &[&str] = &["application/json"];
/// `/db/load`: a SQLite file or a SQL dump.
const LOAD: &[&str] = &["application/octet-stream", "text/plain"];
/// `/boot`: a SQLite file.
const BOOT: &[&str] = &["application/octet-stream"];

/// Every public route, with its permission and body type. `https`: this API is served
/// over TLS (redirects and `/nodes` name `https://` URLs).
pub fn router(cluster: Arc<Cluster>, auth: Arc<Authenticator>, https: bool) -> Router {
    let a = &auth;
    let sql = Need::AllOf(&[Perm::Query, Perm::Execute]);
    let join = Need::AnyOf(&[Perm::Join, Perm::JoinReadOnly]);
    Router::new()
        .route(
            "/db/execute",
            require(a, Perm::Execute, body_type(JSON, post(sql::execute))),
        )
        .route(
            "/db/query",
            require(
                a,
                Perm::Query,
                body_type(JSON, get(sql::query).post(sql::query)),
            ),
        )
        .route(
            "/db/request",
            require(a, sql, body_type(JSON, post(sql::request))),
        )
        .route("/db/backup", require(a, Perm::Backup, get(sql::backup)))
        .route(
            "/db/load",
            require(a, Perm::Load, body_type(LOAD, post(sql::load))),
        )
        .route(
            "/boot",
            require(a, Perm::Load, body_type(BOOT, post(sql::boot))),
        )
        .route(
            "/db/sql",
            require(a, Perm::Query, body_type(JSON, post(ops::sql))),
        )
        .route(
            "/leader",
            require(a, Perm::Status, get(ops::leader)).merge(require(
                a,
                Perm::LeaderOps,
                body_type(JSON, post(ops::step_down)),
            )),
        )
        .route(
            "/snapshot",
            require(a, Perm::Snapshot, body_type(JSON, post(ops::snapshot))),
        )
        .route(
            "/debug/vars",
            require(a, Perm::Status, get(ops::debug_vars)),
        )
        .route("/status", require(a, Perm::Status, get(admin::status)))
        .route("/nodes", require(a, Perm::Status, get(admin::nodes)))
        .route("/metrics", require(a, Perm::Status, get(admin::metrics)))
        .route("/readyz", require(a, Perm::Ready, get(admin::readyz)))
        .route(
            "/join",
            require(a, join, body_type(JSON, post(admin::join))),
        )
        .route(
            "/notify",
            require(a, Perm::Join, body_type(JSON, post(admin::notify))),
        )
        .route(
            "/reap",
            require(a, Perm::Remove, body_type(JSON, post(admin::reap))),
        )
        .route(
            "/remove",
            require(a, Perm::Remove, body_type(JSON, delete(admin::remove))),
        )
        .route(
            "/devices",
            require(
                a,
                Perm::Devices,
                body_type(JSON, post(devices::add).get(devices::list)),
            ),
        )
        .route(
            "/devices/{device_id}",
            require(a, Perm::Devices, body_type(JSON, delete(devices::remove))),
        )
        .route(
            "/devices/{device_id}/reset",
            require(a, Perm::Devices, body_type(JSON, post(devices::reset))),
        )
        .route(
            "/devices/{device_id}/revoke",
            require(a, Perm::Devices, body_type(JSON, post(devices::revoke))),
        )
        .route(
            "/devices/{device_id}/rekey",
            require(a, Perm::Devices, body_type(JSON, post(devices::rekey))),
        )
        .route(
            "/devices/{device_id}/protocol",
            require(a, Perm::Devices, body_type(JSON, post(devices::protocol))),
        )
        .route(
            "/export/{name}",
            require(a, Perm::All, body_type(JSON, delete(export::forget))),
        )
        .route("/streams", require(a, Perm::Status, get(streams::show)))
        .route(
            "/streams/reload",
            require(a, Perm::Devices, body_type(JSON, post(streams::reload))),
        )
        .route(
            "/streams/{stream}/replay",
            require(a, Perm::Devices, body_type(JSON, post(streams::replay))),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(Extension(Scheme(if https { "https" } else { "http" })))
        .with_state(cluster)
}

/// Refuses (415) a request whose body is not one of `types`: a `Content-Type` outside them,
/// or a body without one. So a page in a browser on the LAN cannot post to the API as a
/// "simple" cross-origin request (those carry form or `text/plain` types), and a body is
/// never read as something it is not. A request without a body needs no type.
pub fn body_type<S>(types: &'static [&'static str], route: MethodRouter<S>) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    route.route_layer(axum::middleware::from_fn_with_state(types, check_body_type))
}

async fn check_body_type(
    State(types): State<&'static [&'static str]>,
    req: Request,
    next: Next,
) -> Response {
    let h = req.headers();
    let has_body = h
        .get(header::CONTENT_LENGTH)
        .is_some_and(|l| l.as_bytes() != b"0")
        || h.contains_key(header::TRANSFER_ENCODING);
    let ok = match h.get(header::CONTENT_TYPE) {
        Some(v) => {
            let v = v.to_str().unwrap_or("");
            let media = v.split(';').next().unwrap_or("").trim();
            types.iter().any(|t| media.eq_ignore_ascii_case(t))
        }
        None => !has_body,
    };
    if ok {
        next.run(req).await
    } else {
        error_body(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("Content-Type must be {}", types.join(" or ")),
        )
    }
}

/// The original request, kept so that it can be forwarded or redirected unchanged. An
/// extractor: the last argument of a handler (it takes the body, within the route's limit).
pub struct Original {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// This API's scheme, for redirects.
    pub scheme: Scheme,
}

impl<S: Send + Sync> FromRequest<S> for Original {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let (method, uri, headers) = (
            req.method().clone(),
            req.uri().clone(),
            req.headers().clone(),
        );
        let scheme = scheme_of(req.extensions());
        let body = tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(req, state))
            .await
            .map_err(|_| error_body(StatusCode::REQUEST_TIMEOUT, "request body too slow"))?
            .map_err(IntoResponse::into_response)?;
        Ok(Original {
            method,
            uri,
            headers,
            body,
            scheme,
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

/// The scheme the router put in a request's extensions (`http` outside the router).
pub fn scheme_of(ext: &axum::http::Extensions) -> Scheme {
    ext.get::<Scheme>().copied().unwrap_or(Scheme("http"))
}

/// Sends the request to the leader and relays its answer (or `301`s the client there).
///
/// Forwarded requests go to the leader's Raft listener (mutual TLS with node TLS on) under
/// [`FORWARD_PREFIX`], with the client's `Authorization` header and nothing else that
/// identifies anyone: the leader runs the same permission checks on them, so a client gets
/// exactly what it would get by asking the leader itself.
async fn to_leader(n: &Cluster, req: &Original, redirect: bool) -> Result<Response, Error> {
    if req.headers.contains_key(FORWARDED) {
        // Never forward twice: the sender thought we were leader and we are not (any more).
        return Err(Error::NotLeader(None));
    }
    let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if redirect {
        return redirect_to_leader(n, req.scheme, path).await;
    }
    let body = crate::raft::network::full(req.body.clone());
    forward(
        n,
        &req.method,
        &req.uri,
        &req.headers,
        body,
        FORWARD_TIMEOUT,
    )
    .await
}

/// Sends a request to the leader's API on its Raft listener under [`FORWARD_PREFIX`], with
/// the client's `Content-Type` and `Authorization` and `body`, and relays the answer.
pub(crate) async fn forward(
    n: &Cluster,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: crate::raft::network::Body,
    timeout: Duration,
) -> Result<Response, Error> {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let forward_path = format!("{FORWARD_PREFIX}{path}");
    let leader_req = LeaderRequest {
        method: method.clone(),
        path: &forward_path,
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        authorization: headers.get(header::AUTHORIZATION).cloned(),
        body: Bytes::new(),
    };
    let answer = n
        .call_leader_with(Port::Internal, leader_req, body, LEADER_WAIT, timeout)
        .await?;
    let mut resp = (answer.status, answer.body).into_response();
    for h in [
        header::CONTENT_TYPE,
        header::LOCATION,
        header::WWW_AUTHENTICATE,
    ] {
        if let Some(v) = answer.headers.get(&h) {
            resp.headers_mut().insert(h, v.clone());
        }
    }
    Ok(resp)
}

/// `301` to the same path on the leader's API.
async fn redirect_to_leader(n: &Cluster, scheme: Scheme, path: &str) -> Result<Response, Error> {
    let (_, addr) = n.leader_addr(Port::Api, LEADER_WAIT).await?;
    let url = format!("{}://{addr}{path}", scheme.0);
    Ok((StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, url)]).into_response())
}
