//! The stream admin API behind `cairn streams`:
//!
//! | route | answer |
//! |---|---|
//! | `GET /streams` | JSON `{"configured": {...}, "replicated": {...}, "dead_letter": [{"device_id": 7, "stream": 1, "rows": 2}]}`, this node's view |
//! | `POST /streams/reload` | JSON `{"streams": N}`: this node read its config file again and the leader applied its `[[stream]]` tables (like SIGHUP) |
//! | `POST /streams/{id}/replay[?device=N]` | JSON `{"stream": 1, "moved": 1, "remaining": 0}`: dead-letter rows that fit the replicated definitions moved into the stream (on the leader; forwarded there from a follower) |
//!
//! Errors are `{"error": "..."}` with the status [`status_of`] gives.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::rqlite::status_of;
use super::{Original, Served, on_leader};
use crate::cluster::Cluster;
use crate::db::dead_letter;
use crate::error::Error;

fn error(e: &Error) -> Response {
    (status_of(e), Json(json!({ "error": e.to_string() }))).into_response()
}

pub async fn show(State(n): State<Arc<Cluster>>) -> Response {
    let read = n
        .read(|c| -> rusqlite::Result<_> {
            Ok((crate::db::schema::Schema::load(c)?, dead_letter::counts(c)?))
        })
        .await;
    match read {
        Ok(Ok((replicated, counts))) => {
            let rows: Vec<_> = counts
                .into_iter()
                .map(|(d, s, rows)| json!({"device_id": d, "stream": s, "rows": rows}))
                .collect();
            Json(json!({
                "configured": n.streams().schema(),
                "replicated": replicated,
                "dead_letter": rows,
            }))
            .into_response()
        }
        Ok(Err(e)) => error(&Error::from(e)),
        Err(e) => error(&e),
    }
}

pub async fn reload(State(n): State<Arc<Cluster>>) -> Response {
    match n.reload_streams().await {
        Ok(s) => Json(json!({"streams": s.streams.len()})).into_response(),
        Err(e) => error(&e),
    }
}

pub async fn replay(
    State(n): State<Arc<Cluster>>,
    Path(stream): Path<u16>,
    Query(q): Query<HashMap<String, String>>,
    original: Original,
) -> Response {
    let device = match q.get("device").map(|d| d.parse::<u64>()) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => return error(&Error::BadRequest(format!("device: {e}"))),
    };
    let r = on_leader(&n, &original, false, || {
        n.replay_dead_letters(stream, device)
    })
    .await;
    match r {
        Ok(Served::Here(r)) => Json(json!({
            "stream": stream,
            "device": device,
            "moved": r.moved,
            "remaining": r.remaining,
        }))
        .into_response(),
        Ok(Served::There(resp)) => resp,
        Err(e) => error(&e),
    }
}
