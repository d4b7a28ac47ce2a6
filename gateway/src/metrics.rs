//! One node's counters: the device path (`"ingress"` in `GET /status`), the write queue and
//! the SQL API (`/metrics`).
//!
//! One [`Metrics`] per node, made by the composition root and handed to every part that
//! counts (`cairn dev` runs three nodes in one process and each `/status` shows its own).
//! Every counter is a relaxed atomic; the latency histograms have power-of-two microsecond
//! buckets, so a percentile is exact to within a factor of two (reported as the bucket's
//! upper bound).

mod backup;
pub mod export;

pub use backup::BackupStats;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_protocol::ErrorCode;
use serde_json::json;

const BUCKETS: usize = 32;

/// Storage work held by an environment failure (disk full, out of memory, busy; see
/// `db::failure`): what failed, since when, how often it was retried. The writer that holds
/// the work reports here; `/readyz` and `/status` read it.
#[derive(Default, Debug)]
pub struct Stall {
    state: Mutex<Option<StallState>>,
}

#[derive(Debug)]
struct StallState {
    error: String,
    since: Instant,
    retries: u64,
    logged: Instant,
}

/// First wait before a held write is tried again; it doubles up to [`STALL_BACKOFF_MAX`].
pub const STALL_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest wait between two tries of a held write.
pub const STALL_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Stall {
    /// Records that `what` failed with `error` and is held; returns how long to wait before
    /// trying again. Logged at the first failure and then every 30 s.
    pub fn hold(&self, what: &str, error: &str) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let st = s.get_or_insert_with(|| {
            tracing::error!("{what} held: {error}; retrying until it succeeds (node not ready)");
            StallState {
                error: error.to_string(),
                since: now,
                retries: 0,
                logged: now,
            }
        });
        st.retries += 1;
        st.error = error.to_string();
        if now.duration_since(st.logged) >= Duration::from_secs(30) {
            st.logged = now;
            tracing::warn!(
                "{what} still held after {:.0?} ({} tries): {error}",
                now.duration_since(st.since),
                st.retries
            );
        }
        let shift = st.retries.min(16) as u32;
        STALL_BACKOFF_MIN
            .saturating_mul(1 << shift.saturating_sub(1))
            .min(STALL_BACKOFF_MAX)
    }

    /// The held work went through: logs the resumption if it was held.
    pub fn clear(&self, what: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(st) = s.take() {
            tracing::info!(
                "{what} resumed after {:.1?} ({} tries)",
                st.since.elapsed(),
                st.retries
            );
        }
    }

    /// The failure holding the work, if any.
    pub fn held(&self) -> Option<String> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.as_ref().map(|st| st.error.clone())
    }

    /// `null`, or `{"error", "held_s", "retries"}` for `/status`.
    pub fn to_json(&self) -> serde_json::Value {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.as_ref() {
            None => serde_json::Value::Null,
            Some(st) => json!({
                "error": st.error,
                "held_s": st.since.elapsed().as_secs_f64(),
                "retries": st.retries,
            }),
        }
    }
}

/// A histogram of durations in power-of-two microsecond buckets.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// The upper bound (µs) of the bucket holding quantile `q` (0..=1); 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let total = self.count.load(Relaxed);
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= rank {
                return if i == 0 { 1 } else { 1u64 << i };
            }
        }
        1u64 << (BUCKETS - 1)
    }

    fn to_json(&self) -> serde_json::Value {
        let count = self.count.load(Relaxed);
        json!({
            "count": count,
            "mean_us": self.sum_us.load(Relaxed).checked_div(count).unwrap_or(0),
            "p50_us": self.quantile_us(0.5),
            "p99_us": self.quantile_us(0.99),
        })
    }
}

/// Rejections by reason: one counter per protocol error code the gateway sends.
pub struct Rejects {
    codes: [AtomicU64; 12],
}

impl Rejects {
    fn new() -> Self {
        Rejects {
            codes: [const { AtomicU64::new(0) }; 12],
        }
    }

    pub fn count(&self, code: ErrorCode) {
        let i = usize::from(code.to_u8()).min(11);
        self.codes[i].fetch_add(1, Relaxed);
    }

    pub fn get(&self, code: ErrorCode) -> u64 {
        self.codes[usize::from(code.to_u8()).min(11)].load(Relaxed)
    }

    fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for i in 1..=11u8 {
            let code = ErrorCode::from_u8(i);
            let name = code.to_string().replace(' ', "_");
            m.insert(name, self.codes[usize::from(i)].load(Relaxed).into());
        }
        m.into()
    }
}

/// The dead-letter warning of one device and stream is logged at most this often.
pub const DEAD_LETTER_WARN_EVERY: Duration = Duration::from_secs(10);

/// Records written to `dead_letter` on this replica, per device and stream, and when each
/// pair's misfit warning (dead-lettered or refused) was last logged.
#[derive(Default)]
pub struct DeadLetterCounts {
    by_pair: Mutex<BTreeMap<(u64, u16), DeadLetterPair>>,
}

struct DeadLetterPair {
    count: u64,
    last_warned: Option<Instant>,
    unlogged: u64,
}

impl DeadLetterCounts {
    /// Notes one misfit of `device_id` on `stream`, counted if `dead_lettered`. `Some(n)` when
    /// its warning is due now, `n` being the misfits of the pair not logged since the last.
    pub fn count(&self, device_id: u64, stream: u16, dead_lettered: bool) -> Option<u64> {
        let mut m = self.by_pair.lock().unwrap_or_else(|p| p.into_inner());
        let p = m.entry((device_id, stream)).or_insert(DeadLetterPair {
            count: 0,
            last_warned: None,
            unlogged: 0,
        });
        p.count += u64::from(dead_lettered);
        let now = Instant::now();
        if p.last_warned
            .is_some_and(|t| now.duration_since(t) < DEAD_LETTER_WARN_EVERY)
        {
            p.unlogged += 1;
            return None;
        }
        p.last_warned = Some(now);
        Some(std::mem::take(&mut p.unlogged))
    }

    /// `(device_id, stream, records)` in key order.
    pub fn counts(&self) -> Vec<(u64, u16, u64)> {
        let m = self.by_pair.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|(_, p)| p.count > 0)
            .map(|(&(d, s), p)| (d, s, p.count))
            .collect()
    }

    fn to_json(&self) -> serde_json::Value {
        self.counts()
            .into_iter()
            .map(|(d, s, n)| json!({"device_id": d, "stream": s, "records": n}))
            .collect::<Vec<_>>()
            .into()
    }
}

/// Everything one node counts.
pub struct Metrics {
    /// Bumped by every applied `Command::Members` entry: cached copies of the members'
    /// incarnations (`raft::incarnation`) read the table again.
    pub members_changed: AtomicU64,
    /// SQL requests served by the HTTP API.
    pub http_requests: AtomicU64,
    /// Commands proposed through the write queue, and the batches they went in.
    pub writes_proposed: AtomicU64,
    pub write_batches: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicU64,
    pub frames_in: AtomicU64,
    pub batches_in: AtomicU64,
    pub records_in: AtomicU64,
    pub acks_sent: AtomicU64,
    pub rejects: Rejects,
    /// Protocol 1 Hellos accepted (only with `--accept-protocol-1`).
    pub hellos_v1: AtomicU64,
    /// Hellos refused because the device is revoked; Hellos accepted under a device's
    /// previous key (rekey grace window); protocol 1 Hellos of devices registered for 2.
    pub hellos_revoked: AtomicU64,
    pub hellos_previous_key: AtomicU64,
    pub hellos_v1_refused: AtomicU64,
    /// Open sessions closed because their key stopped being accepted (revoked, replaced,
    /// grace window over).
    pub sessions_closed_key: AtomicU64,
    /// Connections closed at once: over the global cap / over the per-address cap.
    pub connections_over_cap: AtomicU64,
    pub connections_over_address_cap: AtomicU64,
    /// Connections closed because no Hello came before the handshake deadline.
    pub handshake_timeouts: AtomicU64,
    /// Connections closed after the idle timeout, or because the device did not read.
    pub idle_closed: AtomicU64,
    pub slow_closed: AtomicU64,
    /// Unknown-device Hellos at a follower answered from its negative cache (no leader call).
    pub unknown_device_cached: AtomicU64,
    /// Batches this node sent to the leader / received from followers.
    pub batches_forwarded: AtomicU64,
    pub batches_received_forwarded: AtomicU64,
    /// Raft entries proposed by the leader's batcher and the batches/bytes they held.
    pub groups_proposed: AtomicU64,
    pub group_batches: AtomicU64,
    pub group_bytes: AtomicU64,
    pub group_batches_max: AtomicU64,
    /// Applied on this replica (every replica counts what it applies).
    pub batches_applied: AtomicU64,
    pub records_applied: AtomicU64,
    pub batches_duplicate: AtomicU64,
    /// Records this replica applied into `dead_letter`, per device and stream.
    pub dead_letters: DeadLetterCounts,
    /// Proposal to applied response, on the leader.
    pub commit_latency: Histogram,
    /// Batch read off the socket to Ack written, on the node the device talks to.
    pub ack_latency: Histogram,
    /// One state-machine apply call (every kind of entry), queueing on the blocking pool
    /// included.
    pub apply_latency: Histogram,
    /// Apply held by an environment failure (disk full, ...), if it is.
    pub apply_stall: Stall,
    /// The cluster format versions this node knows of (`version`).
    pub versions: crate::version::Versions,
    /// When this node last took an AppendEntries from a leader (rqlite's "last contact"),
    /// for `freshness` on `none` reads.
    pub leader_contact: LeaderContact,
    /// The highest entry stamp (Unix ms) this node has seen in its log or its database: the
    /// proposer never stamps below it, so time in the log never goes back across leaders.
    /// Shared with the log store (`raft::log_store::LogStore::stamp_floor`).
    pub stamp_floor: Arc<AtomicI64>,
    /// Continuous backup, on the node that runs it (the leader).
    pub backup: BackupStats,
    /// Ingest refused by the disk guard (free space or database size past its mark).
    pub disk_guard: Stall,
    /// Per export destination (the leader's runners).
    pub exports: export::ExportCounters,
}

/// The last AppendEntries (heartbeats included) this node accepted from a leader, and the
/// commit index the leader sent with it.
#[derive(Debug)]
pub struct LeaderContact {
    origin: std::time::Instant,
    /// Milliseconds after `origin` plus one (0: never).
    at_ms: AtomicU64,
    leader_commit: AtomicU64,
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact {
            origin: std::time::Instant::now(),
            at_ms: AtomicU64::new(0),
            leader_commit: AtomicU64::new(0),
        }
    }
}

impl LeaderContact {
    /// Notes an accepted AppendEntries that carried `leader_commit`.
    pub fn touch(&self, leader_commit: Option<u64>) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.at_ms.store(ms, Relaxed);
        if let Some(c) = leader_commit {
            self.leader_commit.fetch_max(c, Relaxed);
        }
    }

    /// How long ago the leader was last heard from (`None`: never since start).
    pub fn since(&self) -> Option<std::time::Duration> {
        match self.at_ms.load(Relaxed) {
            0 => None,
            ms => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(std::time::Duration::from_millis(ms - 1)),
            ),
        }
    }

    /// The highest commit index a leader has told this node.
    pub fn leader_commit(&self) -> u64 {
        self.leader_commit.load(Relaxed)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            members_changed: AtomicU64::new(0),
            apply_stall: Stall::default(),
            versions: crate::version::Versions::default(),
            disk_guard: Stall::default(),
            exports: export::ExportCounters::default(),
            http_requests: AtomicU64::new(0),
            writes_proposed: AtomicU64::new(0),
            write_batches: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            frames_in: AtomicU64::new(0),
            batches_in: AtomicU64::new(0),
            records_in: AtomicU64::new(0),
            acks_sent: AtomicU64::new(0),
            rejects: Rejects::new(),
            hellos_v1: AtomicU64::new(0),
            hellos_revoked: AtomicU64::new(0),
            hellos_previous_key: AtomicU64::new(0),
            hellos_v1_refused: AtomicU64::new(0),
            sessions_closed_key: AtomicU64::new(0),
            connections_over_cap: AtomicU64::new(0),
            connections_over_address_cap: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            slow_closed: AtomicU64::new(0),
            unknown_device_cached: AtomicU64::new(0),
            batches_forwarded: AtomicU64::new(0),
            batches_received_forwarded: AtomicU64::new(0),
            groups_proposed: AtomicU64::new(0),
            group_batches: AtomicU64::new(0),
            group_bytes: AtomicU64::new(0),
            group_batches_max: AtomicU64::new(0),
            batches_applied: AtomicU64::new(0),
            records_applied: AtomicU64::new(0),
            batches_duplicate: AtomicU64::new(0),
            dead_letters: DeadLetterCounts::default(),
            commit_latency: Histogram::new(),
            ack_latency: Histogram::new(),
            apply_latency: Histogram::new(),
            leader_contact: LeaderContact::default(),
            stamp_floor: Arc::default(),
            backup: BackupStats::default(),
        }
    }
}

impl Metrics {
    /// The device path's counters as a JSON object for `/status`.
    pub fn ingress_json(&self) -> serde_json::Value {
        let groups = self.groups_proposed.load(Relaxed);
        let g = |c: &AtomicU64| c.load(Relaxed);
        json!({
            "connections_accepted": g(&self.connections_accepted),
            "connections_open": g(&self.connections_open),
            "frames_in": g(&self.frames_in),
            "batches_in": g(&self.batches_in),
            "records_in": g(&self.records_in),
            "acks_sent": g(&self.acks_sent),
            "rejects": self.rejects.to_json(),
            "hellos_v1": g(&self.hellos_v1),
            "hellos_revoked": g(&self.hellos_revoked),
            "hellos_previous_key": g(&self.hellos_previous_key),
            "hellos_v1_refused": g(&self.hellos_v1_refused),
            "sessions_closed_key": g(&self.sessions_closed_key),
            "connections_over_cap": g(&self.connections_over_cap),
            "connections_over_address_cap": g(&self.connections_over_address_cap),
            "handshake_timeouts": g(&self.handshake_timeouts),
            "idle_closed": g(&self.idle_closed),
            "slow_closed": g(&self.slow_closed),
            "unknown_device_cached": g(&self.unknown_device_cached),
            "batches_forwarded": g(&self.batches_forwarded),
            "batches_received_forwarded": g(&self.batches_received_forwarded),
            "groups_proposed": groups,
            "group_batches_mean": g(&self.group_batches).checked_div(groups).unwrap_or(0),
            "group_batches_max": g(&self.group_batches_max),
            "group_bytes_mean": g(&self.group_bytes).checked_div(groups).unwrap_or(0),
            "batches_applied": g(&self.batches_applied),
            "records_applied": g(&self.records_applied),
            "batches_duplicate": g(&self.batches_duplicate),
            "dead_lettered": self.dead_letters.to_json(),
            "commit_latency": self.commit_latency.to_json(),
            "ack_latency": self.ack_latency.to_json(),
            "apply_latency": self.apply_latency.to_json(),
        })
    }
}

impl Metrics {
    /// The device path's counters in Prometheus text format, labelled with the node id.
    pub fn ingress_prometheus(&self, node_id: u64) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP cairn_ingress_{name} {help}\n# TYPE cairn_ingress_{name} counter\n\
                 cairn_ingress_{name}{{node_id=\"{node_id}\"}} {v}\n"
            );
        };
        let g = |c: &AtomicU64| c.load(Relaxed);
        counter("frames_total", "Device frames read.", g(&self.frames_in));
        counter("batches_total", "Device batches read.", g(&self.batches_in));
        counter("records_total", "Device records read.", g(&self.records_in));
        counter("acks_total", "Acks sent to devices.", g(&self.acks_sent));
        counter(
            "groups_total",
            "Raft entries of device batches proposed.",
            g(&self.groups_proposed),
        );
        counter(
            "records_applied_total",
            "Device records applied on this replica.",
            g(&self.records_applied),
        );
        counter(
            "batches_forwarded_total",
            "Device batches forwarded to the leader.",
            g(&self.batches_forwarded),
        );
        counter(
            "hellos_v1_total",
            "Protocol 1 Hellos accepted (migration flag).",
            g(&self.hellos_v1),
        );
        counter(
            "hellos_revoked_total",
            "Hellos refused: the device is revoked.",
            g(&self.hellos_revoked),
        );
        counter(
            "hellos_previous_key_total",
            "Hellos accepted under a device's previous key (rekey grace window).",
            g(&self.hellos_previous_key),
        );
        counter(
            "hellos_v1_refused_total",
            "Protocol 1 Hellos refused: the device is registered for protocol 2.",
            g(&self.hellos_v1_refused),
        );
        counter(
            "sessions_closed_key_total",
            "Open device sessions closed: their key was revoked, replaced or its grace ended.",
            g(&self.sessions_closed_key),
        );
        counter(
            "connections_over_cap_total",
            "Device connections closed at once: the global cap was reached.",
            g(&self.connections_over_cap),
        );
        counter(
            "connections_over_address_cap_total",
            "Device connections closed at once: the per-address cap was reached.",
            g(&self.connections_over_address_cap),
        );
        counter(
            "handshake_timeouts_total",
            "Device connections closed without a Hello before the deadline.",
            g(&self.handshake_timeouts),
        );
        counter(
            "idle_closed_total",
            "Device connections closed after the idle timeout.",
            g(&self.idle_closed),
        );
        counter(
            "slow_closed_total",
            "Device connections closed because the device did not read its replies.",
            g(&self.slow_closed),
        );
        counter(
            "unknown_device_cached_total",
            "Unknown-device Hellos refused from a follower's negative cache.",
            g(&self.unknown_device_cached),
        );
        let _ = writeln!(
            out,
            "# HELP cairn_ingress_rejects_total Device frames or connections rejected, by error code."
        );
        let _ = writeln!(out, "# TYPE cairn_ingress_rejects_total counter");
        for i in 1..=11u8 {
            let code = ErrorCode::from_u8(i);
            let _ = writeln!(
                out,
                "cairn_ingress_rejects_total{{node_id=\"{node_id}\",reason=\"{}\"}} {}",
                code.to_string().replace(' ', "_"),
                self.rejects.get(code)
            );
        }
        let _ = writeln!(
            out,
            "# HELP cairn_ingress_dead_lettered_total Device records applied into dead_letter on \
             this replica, by device and stream.\n# TYPE cairn_ingress_dead_lettered_total counter"
        );
        for (device, stream, n) in self.dead_letters.counts() {
            let _ = writeln!(
                out,
                "cairn_ingress_dead_lettered_total{{node_id=\"{node_id}\",device_id=\"{device}\",\
                 stream=\"{stream}\"}} {n}"
            );
        }
        for (name, h) in [
            ("commit_latency", &self.commit_latency),
            ("ack_latency", &self.ack_latency),
            ("apply_latency", &self.apply_latency),
        ] {
            let _ = writeln!(out, "# TYPE cairn_ingress_{name}_seconds summary");
            for q in [0.5, 0.99] {
                let _ = writeln!(
                    out,
                    "cairn_ingress_{name}_seconds{{node_id=\"{node_id}\",quantile=\"{q}\"}} {}",
                    h.quantile_us(q) as f64 / 1e6
                );
            }
            let _ = writeln!(
                out,
                "cairn_ingress_{name}_seconds_count{{node_id=\"{node_id}\"}} {}",
                h.count.load(Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_histogram_quantiles() {
        let h = Histogram::new();
        assert_eq!(h.quantile_us(0.5), 0);
        for _ in 0..98 {
            h.record(Duration::from_micros(100));
        }
        h.record(Duration::from_millis(10));
        h.record(Duration::from_millis(10));
        assert_eq!(h.quantile_us(0.5), 128);
        assert_eq!(h.quantile_us(0.99), 16384);
    }

    #[test]
    fn test_dead_letter_warning_rate_limited_per_pair() {
        let d = DeadLetterCounts::default();
        assert_eq!(d.count(7, 1, true), Some(0));
        assert_eq!(d.count(7, 1, true), None);
        assert_eq!(d.count(7, 1, false), None);
        assert_eq!(d.count(7, 1, true), None);
        assert_eq!(
            d.count(7, 2, true),
            Some(0),
            "another stream warns on its own"
        );
        assert_eq!(d.counts(), vec![(7, 1, 3), (7, 2, 1)]);
        let m = Metrics::default();
        m.dead_letters.count(7, 1, true);
        assert!(m.ingress_prometheus(1).contains(
            "cairn_ingress_dead_lettered_total{node_id=\"1\",device_id=\"7\",stream=\"1\"} 1"
        ));
        assert_eq!(m.ingress_json()["dead_lettered"][0]["records"], 1);
    }
}
