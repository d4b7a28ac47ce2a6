//! Per-destination export counters (`"export"` in `/status`, `cairn_export_*` in `/metrics`):
//! written by the leader's export runners, zero on followers. The leader also lists the
//! destinations whose cursor is registered but which its config no longer declares
//! (`"configured": false`): they hold the export journal, and with `keep_unexported` the
//! stream rows, back until `cairn export forget NAME`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde_json::json;

/// One destination's counters.
#[derive(Debug, Default)]
pub struct DestinationStats {
    pub kind: Mutex<String>,
    /// Records delivered by this node while it led (the committed total is in the cursor).
    pub delivered: AtomicU64,
    /// Deliveries sent again after a failure.
    pub retries: AtomicU64,
    /// Records stored but not yet delivered, and the age (ms) of the oldest of them.
    pub lag_records: AtomicU64,
    pub lag_ms: AtomicI64,
    /// The committed cursor's log index.
    pub cursor_index: AtomicU64,
    /// Last delivery error, if the last delivery failed.
    pub last_error: Mutex<Option<String>>,
    /// True while this node runs the destination (it leads).
    pub running: AtomicU64,
}

impl DestinationStats {
    pub fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "kind": *self.kind.lock().unwrap_or_else(|p| p.into_inner()),
            "running": self.running.load(Relaxed) == 1,
            "delivered": self.delivered.load(Relaxed),
            "retries": self.retries.load(Relaxed),
            "lag_records": self.lag_records.load(Relaxed),
            "lag_seconds": self.lag_ms.load(Relaxed) as f64 / 1000.0,
            "cursor_index": self.cursor_index.load(Relaxed),
            "last_error": *self.last_error.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }
}

/// Every destination's counters, by name.
#[derive(Debug, Default)]
pub struct ExportCounters {
    by_name: Mutex<BTreeMap<String, Arc<DestinationStats>>>,
    /// The destinations this node's config declares (`[[export]]`, `--cdc-config`).
    configured: Mutex<BTreeSet<String>>,
}

impl ExportCounters {
    /// Records the destinations this node's config declares.
    pub fn set_configured(&self, names: impl IntoIterator<Item = String>) {
        *self.configured.lock().unwrap_or_else(|p| p.into_inner()) = names.into_iter().collect();
    }

    /// True when this node's config declares destination `name`.
    pub fn is_configured(&self, name: &str) -> bool {
        self.configured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// Keeps the counters of configured destinations and of the unconfigured ones in
    /// `registered` (the leader's committed cursors; empty on a follower).
    pub fn keep_unconfigured(&self, registered: &[String]) {
        let configured = self.configured.lock().unwrap_or_else(|p| p.into_inner());
        self.by_name
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| configured.contains(name) || registered.contains(name));
    }

    /// The counters of destination `name` (made on first use).
    pub fn destination(&self, name: &str) -> Arc<DestinationStats> {
        self.by_name
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    fn all(&self) -> Vec<(String, Arc<DestinationStats>)> {
        let m = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// `{name: {...}}` for `/status`.
    pub fn to_json(&self) -> serde_json::Value {
        let m: serde_json::Map<String, serde_json::Value> = self
            .all()
            .into_iter()
            .map(|(k, v)| {
                let mut j = v.to_json();
                j["configured"] = self.is_configured(&k).into();
                (k, j)
            })
            .collect();
        serde_json::Value::Object(m)
    }

    /// Prometheus text, labelled with the node and destination.
    pub fn prometheus(&self, node_id: u64) -> String {
        use std::fmt::Write as _;
        let all = self.all();
        let mut out = String::new();
        type Gauge = fn(&DestinationStats) -> f64;
        let metrics: [(&str, &str, &str, Gauge); 4] = [
            (
                "delivered_total",
                "counter",
                "Records delivered by this node.",
                |d| d.delivered.load(Relaxed) as f64,
            ),
            (
                "retries_total",
                "counter",
                "Deliveries sent again after a failure.",
                |d| d.retries.load(Relaxed) as f64,
            ),
            (
                "lag_records",
                "gauge",
                "Records stored but not delivered.",
                |d| d.lag_records.load(Relaxed) as f64,
            ),
            (
                "lag_seconds",
                "gauge",
                "Age of the oldest undelivered record.",
                |d| d.lag_ms.load(Relaxed) as f64 / 1000.0,
            ),
        ];
        for (name, ty, help, get) in metrics {
            let _ = writeln!(
                out,
                "# HELP cairn_export_{name} {help}\n# TYPE cairn_export_{name} {ty}"
            );
            for (dest, d) in &all {
                let _ = writeln!(
                    out,
                    "cairn_export_{name}{{node_id=\"{node_id}\",destination=\"{dest}\"}} {}",
                    get(d)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP cairn_export_failing 1 while the destination's last delivery failed.\n\
             # TYPE cairn_export_failing gauge"
        );
        for (dest, d) in &all {
            let failing = d
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some();
            let _ = writeln!(
                out,
                "cairn_export_failing{{node_id=\"{node_id}\",destination=\"{dest}\"}} {}",
                u8::from(failing)
            );
        }
        out
    }
}
