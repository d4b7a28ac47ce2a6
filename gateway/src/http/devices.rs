//! The device admin API behind `cairn device add|list|remove|reset|revoke|rekey`. On a
//! follower it is forwarded to the leader, so it is linearizable wherever it is sent.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /devices` | JSON `{"id": 7, "key": "<64 hex digits>"}`, optional `"protocol": 1` | JSON `{"device_id": 7, "replaced": false, "protocol": 2}` |
//! | `GET /devices` | | JSON `{"devices": [{"device_id": 7, "high_water": 120, "dead_letter": {"1": 2}, "protocol": 2, "revoked_at_ms": null, "rekey": null}]}` (rows in `dead_letter` per stream; `rekey`: `{"at_ms", "grace_until_ms", "new_key_seen_ms"}`) |
//! | `DELETE /devices/{device_id}` | | JSON `{"device_id": 7, "removed": true}` |
//! | `POST /devices/{device_id}/reset` | JSON `{"seq": 0}` (optional, default 0) | JSON `{"device_id": 7, "previous": 120, "high_water": 0}` |
//! | `POST /devices/{device_id}/revoke` | | JSON `{"device_id": 7, "revoked": true}` (404 if not registered) |
//! | `POST /devices/{device_id}/rekey` | JSON `{"key": "<64 hex digits>", "grace_s": 86400}` (`grace_s` optional, default a day) | JSON `{"device_id": 7, "grace_until_ms": 1764...}` (`null`: the device was revoked, its old key is not accepted) |
//! | `POST /devices/{device_id}/protocol` | JSON `{"version": 1}` | JSON `{"device_id": 7, "protocol": 1, "previous": 2}` |
//!
//! Revoke and rekey are Raft entries: every gateway applies them and closes the device's
//! sessions whose key is no longer accepted (`ingress::connection`). Times are the leader's
//! clock (Unix ms), put into the entry before it is proposed.
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The request's JSON body, or the bad request saying what was `expected`.
fn body<T: serde::de::DeserializeOwned>(req: &Original, expected: &str) -> Result<T, Error> {
    serde_json::from_slice(&req.body)
        .map_err(|e| Error::BadRequest(format!("expected {expected}: {e}")))
}

/// `{"error": "..."}` with the status of `e`.
pub(super) fn error(e: &Error) -> Response {
    (status_of(e), Json(json!({ "error": e.to_string() }))).into_response()
}

/// Applies `cmd` on the leader (forwarding the request there from a follower).
async fn registry_write(
    n: &Cluster,
    req: &Original,
    cmd: RegistryCommand,
) -> Result<Served<RegistryOutcome>, Error> {
    registry_write_at(n, req, |_| cmd.clone()).await
}

/// [`registry_write`] of a command that carries the leader's clock (Unix ms), read on the
/// leader just before it proposes.
async fn registry_write_at(
    n: &Cluster,
    req: &Original,
    cmd: impl Fn(i64) -> RegistryCommand,
) -> Result<Served<RegistryOutcome>, Error> {
    on_leader(n, req, false, || async {
        match n.write(Command::DeviceRegistry(cmd(now_ms()))).await? {
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
    /// 1: a protocol 1 device (accepted only with `--accept-protocol-1`).
    #[serde(default)]
    protocol: Option<u8>,
}

pub async fn add(State(n): State<Arc<Cluster>>, original: Original) -> Response {
    let req: AddDevice = match body(&original, r#"{"id": N, "key": "HEX"}"#) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let key = match registry::parse_key(&req.key) {
        Ok(k) => k,
        Err(e) => return error(&Error::BadRequest(e.to_string())),
    };
    if let Some(v) = req.protocol
        && !matches!(v, 1 | 2)
    {
        return error(&Error::BadRequest(format!(
            "protocol {v} does not exist: devices speak 1 or 2"
        )));
    }
    let cmd = RegistryCommand::Add {
        device_id: req.id,
        key,
    };
    let added = on_leader(&n, &original, false, || async {
        let added = n.write(Command::DeviceRegistry(cmd.clone())).await?;
        let set = match req.protocol {
            // Two entries: until the second applies, a protocol 1 Hello is refused (retried).
            Some(version) => Some(
                n.write(Command::DeviceRegistry(RegistryCommand::SetProtocol {
                    device_id: req.id,
                    version,
                }))
                .await?,
            ),
            None => None,
        };
        match (added, set) {
            (
                CommandResponse::DeviceRegistry(a),
                None | Some(CommandResponse::DeviceRegistry(RegistryOutcome::ProtocolSet { .. })),
            ) => Ok(a),
            other => Err(Error::Storage(format!("unexpected response {other:?}"))),
        }
    })
    .await;
    match added {
        Ok(Served::Here(RegistryOutcome::Added { replaced })) => Json(json!({
            "device_id": req.id,
            "replaced": replaced,
            "protocol": req.protocol.unwrap_or(cairn_protocol::PROTOCOL_VERSION),
        }))
        .into_response(),
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
        match body(&original, r#"{"seq": N} or no body"#) {
            Ok(r) => r,
            Err(e) => return error(&e),
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

pub async fn revoke(
    State(n): State<Arc<Cluster>>,
    Path(device_id): Path<u64>,
    original: Original,
) -> Response {
    let cmd = |at_ms| RegistryCommand::Revoke { device_id, at_ms };
    match registry_write_at(&n, &original, cmd).await {
        Ok(Served::Here(RegistryOutcome::Revoked { existed: true })) => {
            tracing::warn!(device_id, "device revoked by an admin");
            Json(json!({"device_id": device_id, "revoked": true})).into_response()
        }
        Ok(Served::Here(RegistryOutcome::Revoked { existed: false })) => error(&Error::NotFound(
            format!("device {device_id} is not registered"),
        )),
        Ok(Served::Here(o)) => error(&Error::Storage(format!("{o:?}"))),
        Ok(Served::There(resp)) => resp,
        Err(e) => error(&e),
    }
}

/// The default rekey grace window: a day, time for every device to reconnect once.
const DEFAULT_GRACE_S: u64 = 86_400;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RekeyDevice {
    key: String,
    #[serde(default)]
    grace_s: Option<u64>,
}

pub async fn rekey(
    State(n): State<Arc<Cluster>>,
    Path(device_id): Path<u64>,
    original: Original,
) -> Response {
    let req: RekeyDevice = match body(&original, r#"{"key": "HEX", "grace_s": N}"#) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let key = match registry::parse_key(&req.key) {
        Ok(k) => k,
        Err(e) => return error(&Error::BadRequest(e.to_string())),
    };
    let grace_ms = req
        .grace_s
        .unwrap_or(DEFAULT_GRACE_S)
        .saturating_mul(1000)
        .min(i64::MAX as u64 / 2) as i64;
    let cmd = |at_ms: i64| RegistryCommand::Rekey {
        device_id,
        key,
        at_ms,
        grace_until_ms: at_ms.saturating_add(grace_ms),
    };
    match registry_write_at(&n, &original, cmd).await {
        Ok(Served::Here(RegistryOutcome::Rekeyed { grace_until_ms })) => {
            tracing::warn!(device_id, grace_until_ms, "device rekeyed by an admin");
            Json(json!({"device_id": device_id, "grace_until_ms": grace_until_ms})).into_response()
        }
        Ok(Served::Here(o)) => registry_refusal(device_id, o),
        Ok(Served::There(resp)) => resp,
        Err(e) => error(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetProtocol {
    version: u8,
}

pub async fn protocol(
    State(n): State<Arc<Cluster>>,
    Path(device_id): Path<u64>,
    original: Original,
) -> Response {
    let req: SetProtocol = match body(&original, r#"{"version": N}"#) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let cmd = RegistryCommand::SetProtocol {
        device_id,
        version: req.version,
    };
    match registry_write(&n, &original, cmd).await {
        Ok(Served::Here(RegistryOutcome::ProtocolSet { previous })) => Json(json!({
            "device_id": device_id, "protocol": req.version, "previous": previous
        }))
        .into_response(),
        Ok(Served::Here(o)) => registry_refusal(device_id, o),
        Ok(Served::There(resp)) => resp,
        Err(e) => error(&e),
    }
}

/// The answer to a key or protocol command the registry refused.
fn registry_refusal(device_id: u64, o: RegistryOutcome) -> Response {
    match o {
        RegistryOutcome::NotRegistered => error(&Error::NotFound(format!(
            "device {device_id} is not registered"
        ))),
        RegistryOutcome::KeyRefused(why) => error(&Error::BadRequest(why)),
        o => error(&Error::Storage(format!("{o:?}"))),
    }
}

pub async fn list(State(n): State<Arc<Cluster>>, original: Original) -> Response {
    let r = on_leader(&n, &original, false, || async {
        n.confirm_leadership().await?;
        let read = n
            .read(|c| -> rusqlite::Result<_> {
                Ok((
                    registry::list_devices(c)?,
                    dead_letter::counts(c)?,
                    registry::key_states(c)?,
                ))
            })
            .await??;
        Ok(read)
    })
    .await;
    match r {
        Ok(Served::Here((devices, counts, key_states))) => {
            let devices: Vec<_> = devices
                .into_iter()
                .map(|d| {
                    let dead: serde_json::Map<String, serde_json::Value> = counts
                        .iter()
                        .filter(|(id, _, _)| *id == d.device_id)
                        .map(|(_, stream, rows)| (stream.to_string(), (*rows).into()))
                        .collect();
                    let keys = key_states
                        .iter()
                        .find(|(id, _)| *id == d.device_id)
                        .map_or(&registry::KeyState::NONE, |(_, k)| k);
                    let rekey = keys.rekeyed_at_ms.map(|at| {
                        json!({
                            "at_ms": at,
                            "grace_until_ms": keys.grace_until_ms,
                            "new_key_seen_ms": keys.new_key_seen_ms,
                        })
                    });
                    json!({
                        "device_id": d.device_id,
                        "high_water": d.high_water,
                        "dead_letter": dead,
                        "protocol": keys.protocol,
                        "revoked_at_ms": keys.revoked_at_ms,
                        "rekey": rekey,
                    })
                })
                .collect();
            Json(json!({ "devices": devices })).into_response()
        }
        Ok(Served::There(resp)) => resp,
        Err(e) => error(&e),
    }
}
