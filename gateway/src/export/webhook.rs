//! `webhook`: HTTP POST of batches in rqlite's CDC JSON envelope, so an rqlite CDC consumer
//! works unchanged:
//!
//! ```json
//! {"service_id": "north-field", "node_id": "1", "payload": [
//!   {"index": 812, "commit_timestamp": 1795632240000000000, "events": [
//!     {"op": "INSERT", "table": "climate", "new_row_id": 17, "key": "north-field:7:0:17",
//!      "after": {"device_id": 7, "seq": 17, "time": "...", "temperature": 20.5}}]}]}
//! ```
//!
//! One payload message per Raft entry (`index` is its log index, `commit_timestamp` the time
//! the leader received the batch, in ns like rqlite's); device records are `INSERT` events of
//! their stream table with `new_row_id` = seq (stream tables have no rowid) and, beside
//! rqlite's fields, `key`: the idempotency key. Changes of user tables are rqlite's events
//! exactly (`INSERT`/`UPDATE`/`DELETE` with `new_row_id`, `old_row_id`, `before`, `after`;
//! `export::changes`), also with `key`. HTTP 200 or 202 is a delivery (as rqlite).

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value as Json, json};

use super::reader::ExportRecord;
use crate::db::changes::ChangeRow;
use crate::raft::network::{HttpClient, full};

pub struct Webhook {
    client: HttpClient,
    url: String,
    node_id: String,
    service_id: Option<String>,
    timeout: Duration,
}

impl Webhook {
    pub fn new(
        url: &str,
        node_id: u64,
        service_id: Option<String>,
        timeout: Duration,
    ) -> Result<Self, String> {
        if !url.starts_with("http://") {
            return Err(format!(
                "webhook {url}: only http:// endpoints are supported (https is a follow-up)"
            ));
        }
        Ok(Webhook {
            client: HttpClient::new(None),
            url: url.to_string(),
            node_id: node_id.to_string(),
            service_id,
            timeout,
        })
    }

    /// The envelope of `records` (consecutive records of one entry share a message).
    pub fn envelope(&self, site: &str, records: &[ExportRecord]) -> Json {
        let mut payload: Vec<Json> = Vec::new();
        let mut last_index = None;
        for r in records {
            let event = json!({
                "op": "INSERT",
                "table": r.table(),
                "new_row_id": r.seq,
                "key": r.key(site),
                "after": r.row_json(),
            });
            if last_index == Some(r.log_index)
                && let Some(Json::Array(events)) =
                    payload.last_mut().and_then(|m| m.get_mut("events"))
            {
                events.push(event);
                continue;
            }
            last_index = Some(r.log_index);
            payload.push(json!({
                "index": r.log_index,
                "commit_timestamp": r.at_ms.saturating_mul(1_000_000),
                "events": [event],
            }));
        }
        self.wrap(site, payload)
    }

    fn wrap(&self, site: &str, payload: Vec<Json>) -> Json {
        json!({
            "service_id": self.service_id.as_deref().unwrap_or(site),
            "node_id": self.node_id,
            "payload": payload,
        })
    }

    pub async fn deliver(&mut self, site: &str, records: &[ExportRecord]) -> Result<(), String> {
        self.post(&self.envelope(site, records)).await
    }

    pub async fn deliver_changes(
        &mut self,
        site: &str,
        changes: &[ChangeRow],
    ) -> Result<(), String> {
        let envelope = self.wrap(site, super::changes::cdc_payload(site, changes));
        self.post(&envelope).await
    }

    async fn post(&mut self, envelope: &Json) -> Result<(), String> {
        let body = serde_json::to_vec(envelope).map_err(|e| e.to_string())?;
        let req = hyper::Request::post(&self.url)
            .header("content-type", "application/json")
            .body(full(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        match self.client.send(req, self.timeout).await {
            Ok((s, _, _)) if s == 200 || s == 202 => Ok(()),
            Ok((s, _, b)) => Err(format!(
                "webhook answered {s}: {}",
                String::from_utf8_lossy(&b[..b.len().min(200)])
            )),
            Err(e) => Err(format!("webhook: {e}")),
        }
    }
}
