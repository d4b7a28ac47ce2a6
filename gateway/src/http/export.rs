//! `DELETE /export/{name}` (`cairn export forget NAME`): forgets a destination that was
//! removed from the config. Its cursor is replicated state: without this it would stay
//! forever, holding the export journal back and, with `keep_unexported` retention, the stream
//! rows it has not delivered. Needs the `all` permission (the destination never gets those
//! rows). Forwarded to the leader from a follower.
//!
//! | answer | when |
//! |---|---|
//! | 200 `{"destination": "NAME", "forgotten": true}` | the cursor was removed (a `Command::Export` entry) |
//! | 400 `{"error": "..."}` | the leader's config still declares NAME (its runner would register it again) |
//! | 404 `{"error": "..."}` | no destination of that name is registered |

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::devices::error;
use super::{Original, Served, on_leader};
use crate::cluster::Cluster;
use crate::command::export::{ExportCommand, ExportOutcome};
use crate::command::{Command, CommandResponse};
use crate::error::Error;

/// `DELETE /export/{name}`.
pub async fn forget(
    State(n): State<Arc<Cluster>>,
    Path(name): Path<String>,
    req: Original,
) -> Response {
    match on_leader(&n, &req, false, || forget_here(&n, &name)).await {
        Ok(Served::Here(())) => {
            Json(json!({"destination": name, "forgotten": true})).into_response()
        }
        Ok(Served::There(r)) => r,
        Err(e) => error(&e),
    }
}

async fn forget_here(n: &Cluster, name: &str) -> Result<(), Error> {
    if n.metrics().exports.is_configured(name) {
        return Err(Error::BadRequest(format!(
            "export destination {name:?} is still configured on the leader (node {}): remove \
             its [[export]] entry (or --cdc-config) from the config of every gateway and \
             restart them first, or its runner registers it again",
            n.id()
        )));
    }
    match n
        .write(Command::Export(ExportCommand::Forget(name.to_string())))
        .await?
    {
        CommandResponse::Export(ExportOutcome::Forgot(true)) => {
            tracing::warn!(destination = %name, "export: destination forgotten");
            Ok(())
        }
        CommandResponse::Export(ExportOutcome::Forgot(false)) => Err(Error::NotFound(format!(
            "no export destination {name:?} is registered"
        ))),
        other => Err(Error::Storage(format!("unexpected response {other:?}"))),
    }
}
