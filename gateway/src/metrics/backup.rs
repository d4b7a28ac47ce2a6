//! Continuous backup's counters.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use serde_json::json;

/// Continuous backup's counters (`backup/`), shown in `/status` (`"backup"`) and `/metrics`.
#[derive(Default, Debug)]
pub struct BackupStats {
    /// This node runs the backup now (it leads and a `--backup-url` is set).
    pub active: std::sync::atomic::AtomicBool,
    /// Per target URL: the last log index (and its stamp) stored there.
    pub shipped: Mutex<BTreeMap<String, (u64, i64)>>,
    /// The last committed index (and its stamp) the backup saw.
    pub committed_index: AtomicU64,
    pub committed_stamp_ms: AtomicI64,
    /// Wall clock (Unix ms) of the last successful upload.
    pub last_upload_ms: AtomicI64,
    pub bytes_written: AtomicU64,
    pub objects_written: AtomicU64,
    pub snapshots_written: AtomicU64,
    pub objects_deleted: AtomicU64,
    pub errors: AtomicU64,
    /// The last failure, until the next success.
    pub last_error: Mutex<Option<String>>,
    /// Log entries lost to the backup (shipped position behind the log's purge point, so a
    /// full snapshot was or will be taken instead): `(first, last)` index.
    pub gap: Mutex<Option<(u64, u64)>>,
}

impl BackupStats {
    /// Records a failure (kept for `/status` until the next success).
    pub fn failed(&self, e: &str) {
        self.errors.fetch_add(1, Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// Notes the commit position the lag is measured against (the shipper does at every
    /// tick; `/status` does too while this node runs the backup, so the lag it shows is
    /// current).
    pub fn observe_commit(&self, index: u64, stamp_ms: i64) {
        self.committed_index.fetch_max(index, Relaxed);
        self.committed_stamp_ms.fetch_max(stamp_ms, Relaxed);
    }

    /// Records one object written.
    pub fn uploaded(&self, bytes: u64, now_ms: i64) {
        self.bytes_written.fetch_add(bytes, Relaxed);
        self.objects_written.fetch_add(1, Relaxed);
        self.last_upload_ms.store(now_ms, Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Records that `target` holds the log through `index` (stamped `stamp_ms`).
    pub fn shipped_to(&self, target: &str, index: u64, stamp_ms: i64) {
        self.shipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.to_string(), (index, stamp_ms));
    }

    /// The position every target holds (the least advanced one's).
    fn shipped_all(&self) -> (u64, i64) {
        let s = self.shipped.lock().unwrap_or_else(|p| p.into_inner());
        s.values().copied().min().unwrap_or((0, 0))
    }

    fn lag(&self) -> (u64, i64) {
        let (shipped, stamp) = self.shipped_all();
        let committed = self.committed_index.load(Relaxed);
        let ms = self.committed_stamp_ms.load(Relaxed) - stamp;
        (
            committed.saturating_sub(shipped),
            if shipped >= committed { 0 } else { ms.max(0) },
        )
    }

    /// The `"backup"` object of `/status`.
    pub fn to_json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let (lag_index, lag_ms) = self.lag();
        let gap = *self.gap.lock().unwrap_or_else(|p| p.into_inner());
        json!({
            "active": self.active.load(Relaxed),
            "shipped_index": self.shipped_all().0,
            "targets": self.shipped.lock().unwrap_or_else(|p| p.into_inner()).iter()
                .map(|(t, (i, _))| (t.clone(), json!({"shipped_index": i})))
                .collect::<serde_json::Map<_, _>>(),
            "committed_index": g(&self.committed_index),
            "lag_index": lag_index,
            "lag_ms": lag_ms,
            "last_upload_ms": self.last_upload_ms.load(Relaxed),
            "bytes_written": g(&self.bytes_written),
            "objects_written": g(&self.objects_written),
            "snapshots_written": g(&self.snapshots_written),
            "objects_deleted": g(&self.objects_deleted),
            "errors": g(&self.errors),
            "last_error": *self.last_error.lock().unwrap_or_else(|p| p.into_inner()),
            "gap": gap.map(|(a, b)| json!({"from_index": a, "to_index": b})),
        })
    }

    /// The backup's counters in Prometheus text format.
    pub fn prometheus(&self, node_id: u64) -> String {
        use std::fmt::Write as _;
        let (lag_index, lag_ms) = self.lag();
        let n = |c: &AtomicU64| c.load(Relaxed) as f64;
        let mut out = String::new();
        for (name, kind, help, v) in [
            (
                "active",
                "gauge",
                "1 while this node runs the backup.",
                f64::from(u8::from(self.active.load(Relaxed))),
            ),
            (
                "lag_entries",
                "gauge",
                "Committed log entries not yet stored on every target.",
                lag_index as f64,
            ),
            (
                "lag_seconds",
                "gauge",
                "Stamp of the last committed entry minus that of the last shipped one.",
                lag_ms as f64 / 1e3,
            ),
            (
                "last_upload_timestamp_seconds",
                "gauge",
                "Unix time of the last upload.",
                self.last_upload_ms.load(Relaxed) as f64 / 1e3,
            ),
            (
                "bytes_written_total",
                "counter",
                "Bytes of backup objects written.",
                n(&self.bytes_written),
            ),
            (
                "objects_written_total",
                "counter",
                "Backup objects written.",
                n(&self.objects_written),
            ),
            (
                "snapshots_written_total",
                "counter",
                "Full snapshots written.",
                n(&self.snapshots_written),
            ),
            (
                "errors_total",
                "counter",
                "Failed backup uploads and listings.",
                n(&self.errors),
            ),
        ] {
            let _ = write!(
                out,
                "# HELP cairn_backup_{name} {help}\n# TYPE cairn_backup_{name} {kind}\n\
                 cairn_backup_{name}{{node_id=\"{node_id}\"}} {v}\n"
            );
        }
        out
    }
}
