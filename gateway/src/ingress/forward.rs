//! Followers reach the leader over the gateways' HTTP API, and the routes that serve them.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /ingress/forward` | postcard `Vec<DeviceBatch>` | postcard `Result<Vec<BatchOutcome>, IngestError>` |
//! | `GET /ingress/high-water/{device_id}` | | postcard `Result<u64, IngestError>` |
//! | `GET /ingress/key/{device_id}` | | postcard `Result<Option<[u8; 32]>, IngestError>` |
//! | `POST /devices` | JSON `{"id": 7, "key": "<64 hex digits>"}` | JSON `{"device_id": 7, "replaced": false}` |
//! | `GET /devices` | | JSON `{"devices": [{"device_id": 7, "high_water": 120}]}` |
//! | `DELETE /devices/{device_id}` | | JSON `{"device_id": 7, "removed": true}` |
//!
//! The first three are internal (node to node; the keys are in the replicated database anyway). The device routes are the admin API behind
//! `cairn device add|list|remove`: on a follower they are forwarded to the leader, so they
//! are linearizable wherever they are sent. Errors are `{"error": "..."}` with a 4xx/5xx status.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use futures_util::future::BoxFuture;
use openraft::async_runtime::watch::WatchReceiver;
use serde::Deserialize;
use serde_json::json;

use super::Ingress;
use super::apply::DeviceBatch;
use super::batcher::{Commit, GroupSink, IngestError, Outcomes};
use crate::command::{Command, CommandResponse};
use crate::network::{HttpClient, decode, encode, full};
use crate::raft_types::Raft;
use crate::registry::{self, RegistryCommand, RegistryOutcome};

/// How long a forwarded group may take on the leader (a commit, normally milliseconds).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The leader's HTTP address, from the membership.
fn leader_http(raft: &Raft) -> Option<String> {
    let m = raft.metrics();
    let m = m.borrow_watched();
    let leader = m.current_leader?;
    if leader == m.id {
        return None;
    }
    Some(
        m.membership_config
            .membership()
            .get_node(&leader)?
            .http_addr
            .clone(),
    )
}

/// A follower's end of its group queue: one HTTP request per group.
pub struct ForwardSink {
    raft: Raft,
    http: HttpClient,
}

impl ForwardSink {
    pub fn new(raft: Raft, http: HttpClient) -> Self {
        ForwardSink { raft, http }
    }
}

impl GroupSink for ForwardSink {
    fn start(&mut self, batches: Vec<DeviceBatch>) -> BoxFuture<'_, Commit> {
        let leader = leader_http(&self.raft);
        let http = self.http.clone();
        Box::pin(async move {
            Commit(Box::pin(async move {
                let Some(leader) = leader else {
                    return Err(IngestError::NotLeader);
                };
                let body = full(encode(&batches));
                match http
                    .post(&leader, "/ingress/forward", body, FORWARD_TIMEOUT)
                    .await
                {
                    Ok(bytes) => decode::<Outcomes>(&bytes).unwrap_or(Err(IngestError::Internal)),
                    Err(e) => {
                        tracing::debug!(error = %e, %leader, "forwarding device batches");
                        Err(IngestError::NotLeader)
                    }
                }
            }))
        })
    }
}

/// A follower's linearizable high-water read: asked of the leader.
pub async fn remote_high_water(ingress: &Ingress, device_id: u64) -> Result<u64, IngestError> {
    let leader = leader_http(&ingress.raft).ok_or(IngestError::NotLeader)?;
    let req = axum::http::Request::get(format!("http://{leader}/ingress/high-water/{device_id}"))
        .body(full(Vec::new()))
        .map_err(|_| IngestError::Internal)?;
    match ingress.http.send(req, FORWARD_TIMEOUT).await {
        Ok((status, _, bytes)) if status.is_success() => {
            decode::<Result<u64, IngestError>>(&bytes).unwrap_or(Err(IngestError::Internal))
        }
        _ => Err(IngestError::NotLeader),
    }
}

/// The ingress routes, to be merged into the HTTP API's router.
pub fn routes(ingress: Arc<Ingress>) -> axum::Router {
    axum::Router::new()
        .route("/ingress/forward", post(forwarded))
        .route("/ingress/high-water/{device_id}", get(high_water))
        .route("/ingress/key/{device_id}", get(device_key))
        .route("/devices", post(add_device).get(list_devices))
        .route("/devices/{device_id}", delete(remove_device))
        .with_state(ingress)
}

async fn forwarded(State(ingress): State<Arc<Ingress>>, body: Bytes) -> Vec<u8> {
    let outcomes = match decode::<Vec<DeviceBatch>>(&body) {
        // Bodies are checked by the follower; check again, a bad one must not reach the log.
        Ok(batches) if batches.iter().all(|b| b.view().is_some()) => {
            ingress.submit_forwarded(batches).await
        }
        _ => Err(IngestError::Internal),
    };
    encode(&outcomes)
}

async fn high_water(State(ingress): State<Arc<Ingress>>, Path(device_id): Path<u64>) -> Vec<u8> {
    let hw = if ingress.raft.is_leader() {
        ingress.local_high_water(device_id).await
    } else {
        Err(IngestError::NotLeader)
    };
    encode(&hw)
}

async fn device_key(State(ingress): State<Arc<Ingress>>, Path(device_id): Path<u64>) -> Vec<u8> {
    let key = if ingress.raft.is_leader() {
        match crate::raft_types::confirm_leadership(&ingress.raft).await {
            Ok(_) => ingress.device_key(device_id),
            Err(_) => Err(IngestError::NotLeader),
        }
    } else {
        Err(IngestError::NotLeader)
    };
    encode(&key)
}

/// A follower's key lookup for a device its replica does not know (yet): asked of the leader,
/// so a device registered a moment ago is not refused by a follower that lags behind.
pub async fn remote_device_key(
    ingress: &Ingress,
    device_id: u64,
) -> Result<Option<registry::DeviceKey>, IngestError> {
    let leader = leader_http(&ingress.raft).ok_or(IngestError::NotLeader)?;
    let req = axum::http::Request::get(format!("http://{leader}/ingress/key/{device_id}"))
        .body(full(Vec::new()))
        .map_err(|_| IngestError::Internal)?;
    match ingress.http.send(req, FORWARD_TIMEOUT).await {
        Ok((status, _, bytes)) if status.is_success() => {
            decode::<Result<Option<registry::DeviceKey>, IngestError>>(&bytes)
                .unwrap_or(Err(IngestError::Internal))
        }
        _ => Err(IngestError::NotLeader),
    }
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": msg.to_string() }))).into_response()
}

/// Sends the same request to the leader's API and relays its answer.
async fn to_leader(ingress: &Ingress, method: Method, path: &str, body: Vec<u8>) -> Response {
    let Some(leader) = leader_http(&ingress.raft) else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no leader");
    };
    let req = axum::http::Request::builder()
        .method(method)
        .uri(format!("http://{leader}{path}"))
        .header("content-type", "application/json")
        .body(full(body));
    let Ok(req) = req else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "building the forwarded request",
        );
    };
    match ingress.http.send(req, FORWARD_TIMEOUT).await {
        Ok((status, _, bytes)) => (
            status,
            [("content-type", "application/json")],
            bytes.to_vec(),
        )
            .into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("forwarding to the leader: {e}"),
        ),
    }
}

/// Proposes `cmd` here if this node leads, else sends the request (`method`, `path`, `body`)
/// to the leader. Leadership can move between the check and the write: a write refused with
/// `ForwardToLeader` is retried (here or at the new leader) for up to [`FORWARD_TIMEOUT`].
async fn propose_or_forward(
    ingress: &Ingress,
    cmd: RegistryCommand,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<RegistryOutcome, Response> {
    let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
    loop {
        if !ingress.raft.is_leader() {
            if leader_http(&ingress.raft).is_some() || tokio::time::Instant::now() >= deadline {
                return Err(to_leader(ingress, method, path, body).await);
            }
        } else {
            match ingress
                .raft
                .client_write(Command::DeviceRegistry(cmd.clone()))
                .await
            {
                Ok(r) => {
                    return match r.data {
                        CommandResponse::DeviceRegistry(o) => Ok(o),
                        _ => Err(error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "unexpected response",
                        )),
                    };
                }
                Err(e) if e.forward_to_leader().is_some() => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(error(StatusCode::SERVICE_UNAVAILABLE, e));
                    }
                }
                Err(e) => return Err(error(StatusCode::SERVICE_UNAVAILABLE, e)),
            }
        }
        // No leader known yet (an election is on): try again shortly.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Deserialize)]
struct AddDevice {
    id: u64,
    key: String,
}

async fn add_device(State(ingress): State<Arc<Ingress>>, body: Bytes) -> Response {
    let req: AddDevice = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"id\": N, \"key\": \"HEX\"}}: {e}"),
            );
        }
    };
    let key = match registry::parse_key(&req.key) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let cmd = RegistryCommand::Add {
        device_id: req.id,
        key,
    };
    match propose_or_forward(&ingress, cmd, Method::POST, "/devices", body.to_vec()).await {
        Ok(RegistryOutcome::Added { replaced }) => {
            Json(json!({"device_id": req.id, "replaced": replaced})).into_response()
        }
        Ok(o) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{o:?}")),
        Err(r) => r,
    }
}

async fn remove_device(
    State(ingress): State<Arc<Ingress>>,
    Path(device_id): Path<u64>,
) -> Response {
    let cmd = RegistryCommand::Remove { device_id };
    let path = format!("/devices/{device_id}");
    match propose_or_forward(&ingress, cmd, Method::DELETE, &path, Vec::new()).await {
        Ok(RegistryOutcome::Removed { existed }) => {
            Json(json!({"device_id": device_id, "removed": existed})).into_response()
        }
        Ok(o) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{o:?}")),
        Err(r) => r,
    }
}

async fn list_devices(State(ingress): State<Arc<Ingress>>) -> Response {
    if !ingress.raft.is_leader() {
        return to_leader(&ingress, Method::GET, "/devices", Vec::new()).await;
    }
    if let Err(e) = crate::raft_types::confirm_leadership(&ingress.raft).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, e);
    }
    match ingress.store.read(registry::list_devices) {
        Ok(Ok(devices)) => Json(json!({ "devices": devices })).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
