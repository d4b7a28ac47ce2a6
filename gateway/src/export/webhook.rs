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
//!
//! `https://` endpoints are checked against `ca_file` (default: the system's CA bundle), with
//! an optional client certificate (`cert_file`, `key_file`), `server_name` and
//! `insecure_skip_verify` (rqlite's CDC `tls` options, `--cdc-config` included). A failed
//! delivery's error names the cause (for instance `invalid peer certificate: UnknownIssuer`);
//! after a failure the files are read again, so a fixed CA file is used without a restart.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value as Json, json};

use super::reader::ExportRecord;
use crate::config::export::ExportDef;
use crate::db::changes::ChangeRow;
use crate::raft::network::{HttpClient, full};
use crate::security::tls::{DestinationTls, destination_connector};

pub struct Webhook {
    /// `None` until the TLS files could be read (each delivery tries again).
    client: Option<HttpClient>,
    url: String,
    node_id: String,
    service_id: Option<String>,
    timeout: Duration,
    tls: DestinationTls,
    /// The last delivery failed: build the client again (reading the TLS files) first.
    renew: bool,
}

impl Webhook {
    pub fn new(d: &ExportDef, node_id: u64, timeout: Duration) -> Result<Self, String> {
        let url = d.url.as_str();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(format!(
                "webhook {url}: the endpoint must be an http:// or https:// URL"
            ));
        }
        let tls = DestinationTls {
            ca_file: d.ca_file.clone(),
            client: d.cert_file.clone().zip(d.key_file.clone()),
            server_name: d.server_name.clone(),
            insecure_skip_verify: d.insecure_skip_verify,
        };
        if tls.insecure_skip_verify {
            tracing::warn!(
                destination = %d.name,
                "webhook {url}: insecure_skip_verify: any certificate is accepted (testing only)"
            );
        }
        // A TLS file that cannot be read is a delivery error (in `last_error`, retried), not
        // a reason to leave the destination out.
        let client = client(&tls, timeout)
            .inspect_err(|e| tracing::warn!(destination = %d.name, "{e}"))
            .ok();
        Ok(Webhook {
            client,
            url: url.to_string(),
            node_id: node_id.to_string(),
            service_id: d.service_id.clone(),
            timeout,
            tls,
            renew: false,
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
        let envelope = self.envelope(site, records);
        self.send(&envelope).await
    }

    pub async fn deliver_changes(
        &mut self,
        site: &str,
        changes: &[ChangeRow],
    ) -> Result<(), String> {
        let envelope = self.wrap(site, super::changes::cdc_payload(site, changes));
        self.send(&envelope).await
    }

    /// Posts `envelope` with the current client, building it again (reading the TLS files)
    /// after a failed delivery.
    async fn send(&mut self, envelope: &Json) -> Result<(), String> {
        let client = match self.client.take().filter(|_| !self.renew) {
            Some(c) => c,
            None => client(&self.tls, self.timeout)?,
        };
        let r = self.post(&client, envelope).await;
        self.client = Some(client);
        self.renew = r.is_err();
        r
    }

    async fn post(&self, client: &HttpClient, envelope: &Json) -> Result<(), String> {
        let body = serde_json::to_vec(envelope).map_err(|e| e.to_string())?;
        let req = hyper::Request::post(&self.url)
            .header("content-type", "application/json")
            .body(full(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        match client.send(req, self.timeout).await {
            Ok((s, _, _)) if s == 200 || s == 202 => Ok(()),
            Ok((s, _, b)) => Err(format!(
                "webhook answered {s}: {}",
                String::from_utf8_lossy(&b[..b.len().min(200)])
            )),
            Err(e) => Err(format!("webhook: {e}")),
        }
    }
}

/// A client for the endpoint (TLS files read now).
fn client(tls: &DestinationTls, timeout: Duration) -> Result<HttpClient, String> {
    let tcp = HttpClient::tcp(timeout.min(Duration::from_secs(5)));
    let connector = destination_connector(tcp, tls).map_err(|e| format!("webhook TLS: {e}"))?;
    Ok(HttpClient::with_connector(connector, "https"))
}
