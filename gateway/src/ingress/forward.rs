//! Followers reach the leader's device path through the service layer's leader client, on
//! the leader's node-to-node listener (`--raft-addr`), and these are the routes serving them:
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /ingress/forward` | postcard `Vec<DeviceBatch>` | postcard `Result<Vec<BatchOutcome>, Error>` |
//! | `POST /ingress/forward-sessions` | postcard `(Vec<u64>, Vec<DeviceBatch>)`: each batch's session, the batches | same |
//! | `GET /ingress/high-water/{device_id}` | | postcard `Result<u64, Error>` |
//! | `POST /ingress/session/{device_id}` | | postcard `Result<(u64, u64), Error>`: high-water, new session |
//! | `GET /ingress/key/{device_id}` | | postcard `Result<Option<[u8; 32]>, Error>` (none for a revoked device) |
//! | `POST /ingress/note/{device_id}` | postcard [`Note`] | postcard `Result<(), Error>` |
//!
//! The session routes are used once format version 2 is active (every member serves them);
//! before, the two above them. They are node to node only: served on the Raft listener, behind node mutual TLS when it is
//! configured, never on the public HTTP port (the key lookup answers a key). The device admin
//! API (`/devices`) is public, needs the `devices` permission and never returns a key.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::Method;
use axum::routing::{get, post};
use futures_util::future::BoxFuture;

use super::batcher::{Commit, GroupSink, Outcomes};
use super::{Ingress, Note};
use crate::cluster::Cluster;
use crate::command::device::DeviceBatch;
use crate::db::registry::DeviceKey;
use crate::error::Error;
use crate::raft::network::{decode, encode};

/// How long a forwarded group may take on the leader (a commit, normally milliseconds).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// A follower's end of its group queue: one call to the leader per group.
pub struct ForwardSink {
    cluster: Arc<Cluster>,
}

impl ForwardSink {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        ForwardSink { cluster }
    }
}

impl GroupSink for ForwardSink {
    fn start(&mut self, batches: Vec<DeviceBatch>) -> BoxFuture<'_, Commit> {
        let cluster = self.cluster.clone();
        Box::pin(async move {
            Commit(Box::pin(async move {
                let (path, body) = if cluster.metrics().versions.active() >= crate::version::V2 {
                    let sessions: Vec<u64> = batches.iter().map(|b| b.session).collect();
                    ("/ingress/forward-sessions", encode(&(sessions, batches)))
                } else {
                    ("/ingress/forward", encode(&batches))
                };
                let r = cluster
                    .call_leader_internal::<Outcomes>(Method::POST, path, body, FORWARD_TIMEOUT)
                    .await;
                r.unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "forwarding device batches");
                    Err(e)
                })
            }))
        })
    }
}

/// A follower's linearizable high-water read: asked of the leader.
pub async fn remote_high_water(cluster: &Cluster, device_id: u64) -> Result<u64, Error> {
    let path = format!("/ingress/high-water/{device_id}");
    cluster
        .call_leader_internal::<Result<u64, Error>>(Method::GET, &path, Vec::new(), FORWARD_TIMEOUT)
        .await?
}

/// A follower's new device session (format version 2): opened by the leader.
pub async fn remote_open_session(cluster: &Cluster, device_id: u64) -> Result<(u64, u64), Error> {
    let path = format!("/ingress/session/{device_id}");
    cluster
        .call_leader_internal::<Result<(u64, u64), Error>>(
            Method::POST,
            &path,
            Vec::new(),
            FORWARD_TIMEOUT,
        )
        .await?
}

/// A follower's key lookup for a device its replica does not know (yet): asked of the leader,
/// so a device registered a moment ago is not refused by a follower that lags behind.
pub async fn remote_device_key(
    cluster: &Cluster,
    device_id: u64,
) -> Result<Option<DeviceKey>, Error> {
    let path = format!("/ingress/key/{device_id}");
    cluster
        .call_leader_internal::<Result<Option<DeviceKey>, Error>>(
            Method::GET,
            &path,
            Vec::new(),
            FORWARD_TIMEOUT,
        )
        .await?
}

/// A follower's registry note (the device's new key seen, protocol 2 spoken): proposed by
/// the leader.
pub async fn remote_note(cluster: &Cluster, device_id: u64, note: Note) -> Result<(), Error> {
    let path = format!("/ingress/note/{device_id}");
    cluster
        .call_leader_internal::<Result<(), Error>>(
            Method::POST,
            &path,
            encode(&note),
            FORWARD_TIMEOUT,
        )
        .await?
}

/// The node-to-node ingress routes, served on the Raft listener.
pub fn routes(ingress: Arc<Ingress>) -> axum::Router {
    axum::Router::new()
        .route("/ingress/forward", post(forwarded))
        .route("/ingress/forward-sessions", post(forwarded_sessions))
        .route("/ingress/high-water/{device_id}", get(high_water))
        .route("/ingress/session/{device_id}", post(open_session))
        .route("/ingress/key/{device_id}", get(device_key))
        .route("/ingress/note/{device_id}", post(noted))
        // Groups close at about 1 MiB (`batcher::GroupLimits`); room for the last batch.
        .layer(axum::extract::DefaultBodyLimit::max(16 << 20))
        .with_state(ingress)
}

async fn forwarded(State(ingress): State<Arc<Ingress>>, body: Bytes) -> Vec<u8> {
    let outcomes = match decode::<Vec<DeviceBatch>>(&body) {
        // Bodies are checked by the follower; check again, a bad one must not reach the log.
        Ok(batches) if batches.iter().all(|b| b.view().is_some()) => {
            ingress.submit_forwarded(batches).await
        }
        _ => Err(Error::BadRequest("undecodable device batches".into())),
    };
    encode(&outcomes)
}

async fn forwarded_sessions(State(ingress): State<Arc<Ingress>>, body: Bytes) -> Vec<u8> {
    let outcomes = match decode::<(Vec<u64>, Vec<DeviceBatch>)>(&body) {
        // Bodies are checked by the follower; check again, a bad one must not reach the log.
        Ok((sessions, mut batches))
            if sessions.len() == batches.len() && batches.iter().all(|b| b.view().is_some()) =>
        {
            for (b, s) in batches.iter_mut().zip(sessions) {
                b.session = s;
            }
            ingress.submit_forwarded(batches).await
        }
        _ => Err(Error::BadRequest("undecodable device batches".into())),
    };
    encode(&outcomes)
}

async fn open_session(State(ingress): State<Arc<Ingress>>, Path(device_id): Path<u64>) -> Vec<u8> {
    let opened = if ingress.cluster.is_leader() {
        ingress.local_open_session(device_id).await
    } else {
        Err(Error::NotLeader(None))
    };
    encode(&opened)
}

async fn high_water(State(ingress): State<Arc<Ingress>>, Path(device_id): Path<u64>) -> Vec<u8> {
    let hw = if ingress.cluster.is_leader() {
        ingress.local_high_water(device_id).await
    } else {
        Err(Error::NotLeader(None))
    };
    encode(&hw)
}

async fn device_key(State(ingress): State<Arc<Ingress>>, Path(device_id): Path<u64>) -> Vec<u8> {
    let key = match ingress.cluster.confirm_leadership().await {
        Ok(()) => ingress.device_key(device_id),
        Err(e) => Err(e),
    };
    encode(&key)
}

async fn noted(
    State(ingress): State<Arc<Ingress>>,
    Path(device_id): Path<u64>,
    body: Bytes,
) -> Vec<u8> {
    let r = match decode::<Note>(&body) {
        Ok(note) if ingress.cluster.is_leader() => ingress.propose_note(device_id, note).await,
        Ok(_) => Err(Error::NotLeader(None)),
        Err(_) => Err(Error::BadRequest("undecodable registry note".into())),
    };
    encode(&r)
}
