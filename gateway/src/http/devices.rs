//! The device admin API behind `cairn device add|list|remove`. On a follower it is forwarded
//! to the leader, so it is linearizable wherever it is sent.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /devices` | JSON `{"id": 7, "key": "<64 hex digits>"}` | JSON `{"device_id": 7, "replaced": false}` |
//! | `GET /devices` | | JSON `{"devices": [{"device_id": 7, "high_water": 120, "dead_letter": {"1": 2}}]}` (rows in `dead_letter` per stream) |
//! | `DELETE /devices/{device_id}` | | JSON `{"device_id": 7, "removed": true}` |
//! | `POST /devices/{device_id}/reset` | JSON `{"seq": 0}` (optional, default 0) | JSON `{"device_id": 7, "previous": 120, "high_water": 0}` |
//!
//! A reset is a logged admin action (a Raft entry, and a warning in every replica's log); it is
//! refused (400) while stored records of the device lie above the new high-water. Every route
//! here needs the `devices` permission (`http::router`).
//!
//! Errors are `{"error": "..."}` with the status [`status_of`] gives.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::rqlite::status_of;
use super::{Original, Served, on_leader};
use crate::cluster::Cluster;
use crate::command::registry::{RegistryCommand, RegistryOutcome};
use crate::command::{Command, CommandResponse};
use crate::db::{dead_letter, registry};
use crate::error::Error;

fn error(e: &Error) -> Response {
    (status_of(e), Json(json!({ "error": e.to_string() }))).into_response()
}

/// Applies `cmd` on the leader (forwarding the request there from a follower).
async fn registry_write(
    n: &Cluster,
    req: &Original,
    cmd: RegistryCommand,
) -> Result<Served<RegistryOutcome>, Error> {
    on_leader(n, req, false, || async {
        match n.write(Command::DeviceRegistry(cmd.clone())).await? {
            CommandResponse::DeviceRegistry(o) => Ok(o),
            other => Err(Error::Storage(format!("unexpected response {other:?}"))),
        }
    })
    .await
}

#[derive(Deserialize)]
struct AddDevice {
    id: u64,
    key: String,
}

pub async fn add(State(n): State<Arc<Cluster>>, original: Original) -> Response {
    let req: AddDevice = match serde_json::from_slice(&original.body) {
        Ok(r) => r,
        Err(e) => {
            return error(&Error::BadRequest(format!(
                "expected {{\"id\": N, \"key\": \"HEX\"}}: {e}"
            )));
        }
    };
    let key = match registry::parse_key(&req.key) {
        Ok(k) => k,
        Err(e) => return error(&Error::BadRequest(e.to_string())),
    };
    let cmd = RegistryCommand::Add {
        device_id: req.id,
        key,
    };
    match registry_write(&n, &original, cmd).await {
        Ok(Served::Here(RegistryOutcome::Added { replaced })) => {
            Json(json!({"device_id": req.id, "replaced": replaced})).into_response()
        }
        Ok(Served::Here(o)) => error(&Error::Storage(format!("{o:?}"))),
        Ok(Served::There(resp)) => resp,
        Err(e) => error(&e),
    }
}

pub async fn remove(
    State(n): State<Arc<Cluster>>,
    Path(device_id): Path<u64>,
    original: Original,
) -> Response {
    let cmd = RegistryCommand::Remove { device_id };
    match registry_write(&n, &original, cmd).await {
        Ok(Served::Here(RegistryOutcome::Removed { existed })) => {
            Json(json!({"device_id": device_id, "removed": existed})).into_response()
        }
        Ok(Served::Here(o)) => error(&Error::Storage(format!("{o:?}"))),
        Ok(Served::There(resp)) => resp,
        Err(e) => error(&e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResetDevice {
    #[serde(default)]
    seq: u64,
}

pub async fn reset(
    State(n): State<Arc<Cluster>>,
    Path(device_id): Path<u64>,
    original: Original,
) -> Response {
    let req: ResetDevice = if original.body.is_empty() {
        ResetDevice::default()
    } else {
        match serde_json::from_slice(&original.body) {
            Ok(r) => r,
            Err(e) => {
                return error(&Error::BadRequest(format!(
                    "expected {{\"seq\": N}} or no body: {e}"
                )));
            }
        }
    };
    let cmd = RegistryCommand::ResetHighWater {
        device_id,
        seq: req.seq,
    };
    match registry_write(&n, &original, cmd).await {
        Ok(Served::Here(RegistryOutcome::HighWaterReset { previous })) => {
            tracing::warn!(
                device_id,
                previous,
                seq = req.seq,
                "device high-water reset"
            );
            Json(json!({"device_id": device_id, "previous": previous, "high_water": req.seq}))
                .into_response()
        }
        Ok(Served::Here(RegistryOutcome::ResetRefused(why))) => error(&Error::BadRequest(why)),
        Ok(Served::Here(o)) => error(&Error::Storage(format!("{o:?}"))),
        Ok(Served::There(resp)) => resp,
        Err(e) => error(&e),
    }
}

pub async fn list(State(n): State<Arc<Cluster>>, original: Original) -> Response {
    let r = on_leader(&n, &original, false, || async {
        n.confirm_leadership().await?;
        let read = n
            .read(|c| -> rusqlite::Result<_> {
                Ok((registry::list_devices(c)?, dead_letter::counts(c)?))
            })
            .await??;
        Ok(read)
    })
    .await;
    match r {
        Ok(Served::Here((devices, counts))) => {
            let devices: Vec<_> = devices
                .into_iter()
                .map(|d| {
                    let dead: serde_json::Map<String, serde_json::Value> = counts
                        .iter()
                        .filter(|(id, _, _)| *id == d.device_id)
                        .map(|(_, stream, rows)| (stream.to_string(), (*rows).into()))
                        .collect();
                    json!({"device_id": d.device_id, "high_water": d.high_water, "dead_letter": dead})
                })
                .collect();
            Json(json!({ "devices": devices })).into_response()
        }
        Ok(Served::There(resp)) => resp,
        Err(e) => error(&e),
    }
}
