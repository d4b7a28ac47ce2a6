//! The leader's backup loop for one target.
//!
//! While this node leads: if the target holds nothing of this history epoch yet, or holds
//! less than the log still has (the log was purged past it: the target was down), or a
//! snapshot is due, upload a snapshot; then ship the entries applied since the last upload as
//! a segment once it is due, like a Kafka producer's batch (`linger.ms`, `batch.size`): when
//! `backup_interval` has passed since the oldest of them was applied, or at once when they
//! reach `backup_segment_bytes` (encoded, before compression). The loop wakes on every apply
//! (a watch on openraft's applied index), so a segment leaves when it is due, not at the next
//! tick: at a low rate the lag is at most the interval plus the upload, at a high rate the
//! size bound ships several segments a second. The position shipped goes through Raft
//! (`Command::BackupShipped`) every few seconds; a new leader starts from the higher of that
//! record and what the target's listing shows, so after a failover it re-ships at most a few
//! seconds of entries (a restore skips indexes it already applied) and never skips one.
//!
//! Correctness: only applied entries are shipped, and an entry is applied only once committed,
//! so every object holds committed history; entries go out in index order, a segment
//! starts right after the previous one (or right after a snapshot), and a position is
//! recorded only after its object is stored.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use openraft::{EntryPayload, RaftLogReader};

use super::compact;
use super::object::{self, Kind, ObjectName};
use super::restore::Catalog;
use super::target::Target;
use super::{BackupSettings, now_ms};
use crate::cluster::Cluster;
use crate::command::Command;
use crate::command::backup::{self as record, BackupShipped, ShippedPosition};
use crate::raft::Entry;
use crate::raft::log_store::LogStore;
use crate::raft::state_machine::{read_applied, read_stamp};

/// Entries per segment at most (a segment is read whole by a restore).
const SEGMENT_ENTRIES: u64 = 4096;
/// Encoded bytes per segment at most (one large entry may exceed it alone).
const SEGMENT_BYTES: usize = 16 << 20;
/// How often the shipped position is recorded through Raft, at most.
const RECORD_EVERY: Duration = Duration::from_secs(5);

/// One target's loop.
pub struct Shipper {
    cluster: Arc<Cluster>,
    log: LogStore,
    target: Target,
    url: String,
    s: Arc<BackupSettings>,
}

/// What the loop knows while this node leads.
struct Leading {
    epoch: u64,
    shipped: ShippedPosition,
    snapshot_index: u64,
    snapshot_at: Instant,
    recorded: u64,
    recorded_at: Instant,
    /// Entries other than position records were shipped since the last record.
    unrecorded: bool,
    /// The next upload must be a snapshot (a gap in the log).
    need_snapshot: bool,
    /// Entries after `shipped`, read from the log and not yet uploaded: the next segment.
    pending: Vec<Entry>,
    /// Their encoded size.
    pending_bytes: usize,
    /// When each applied index was first seen, oldest first (pruned as segments are stored):
    /// the interval runs from the oldest unshipped one.
    seen: VecDeque<(u64, Instant)>,
    /// No upload before this, after a failed one.
    retry_at: Option<Instant>,
    /// How long a segment's upload takes lately (a moving average): a segment leaves that
    /// much before its oldest entry waited `backup_interval`, so the entry is *stored* within
    /// the interval.
    upload_time: Duration,
    /// Encoded bytes of entries shipped as segments since this node leads, and as of the
    /// last snapshot.
    log_bytes: u64,
    snapshot_log_bytes: u64,
    /// The last snapshot's stored size.
    snapshot_stored: u64,
    /// When the last background snapshot was started.
    snapshot_tried: Instant,
    /// A background snapshot (with retention after it) under way: what it stored, and
    /// `log_bytes` when it started.
    snapshotting: Option<tokio::task::JoinHandle<anyhow::Result<(Snapshotted, u64)>>>,
}

impl Drop for Leading {
    fn drop(&mut self) {
        // No longer leading: the new leader takes its own snapshots.
        if let Some(t) = &self.snapshotting {
            t.abort();
        }
    }
}

/// A snapshot stored.
#[derive(Debug, Clone, Copy)]
struct Snapshotted {
    index: u64,
    stamp: i64,
    stored: u64,
}

impl Leading {
    /// Whether a periodic snapshot is due: `backup_snapshot_interval` since the last one,
    /// `backup_snapshot_entries` entries, or `backup_snapshot_bytes` of shipped entries
    /// (bounding what a restore replays), but never more bytes of log than the last snapshot
    /// stored (a large database is not copied again for a little log).
    fn snapshot_due(&self, s: &BackupSettings, applied: u64) -> bool {
        let log = self.log_bytes - self.snapshot_log_bytes;
        applied > self.snapshot_index
            && self.snapshot_tried.elapsed() >= s.interval
            && (self.snapshot_at.elapsed() >= s.snapshot_interval
                || applied - self.snapshot_index >= s.snapshot_entries
                || log >= s.snapshot_bytes.max(self.snapshot_stored))
    }

    /// Notes a snapshot stored, started when `log_bytes` had been shipped.
    fn snapshot_taken(&mut self, done: Snapshotted, log_bytes: u64) {
        self.snapshot_index = self.snapshot_index.max(done.index);
        self.snapshot_at = Instant::now();
        self.snapshot_log_bytes = log_bytes;
        self.snapshot_stored = done.stored;
    }

    /// Notes that entries up to `applied` are applied, as of now.
    fn observe(&mut self, applied: u64) {
        let last = self.seen.back().map_or(self.shipped.index, |s| s.0);
        if applied > last {
            self.seen.push_back((applied, Instant::now()));
        }
    }

    /// When the oldest entry not yet shipped was applied, if any is waiting.
    fn oldest_unshipped(&mut self) -> Option<Instant> {
        while self.seen.front().is_some_and(|s| s.0 <= self.shipped.index) {
            self.seen.pop_front();
        }
        self.seen.front().map(|s| s.1)
    }

    /// Forgets what was read for the next segment (the stream starts again elsewhere).
    fn drop_pending(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
    }

    /// How long the oldest unshipped entry may wait before its segment leaves: the interval
    /// less the recent upload time (never less than half the interval).
    fn linger(&self, interval: Duration) -> Duration {
        interval - self.upload_time.min(interval / 2)
    }

    /// Notes how long a segment's upload took.
    fn uploaded_in(&mut self, took: Duration) {
        self.upload_time = (self.upload_time * 3 + took) / 4;
    }

    /// When the loop must look again without being woken: the next segment's deadline, or
    /// the end of a back-off.
    fn deadline(&mut self, interval: Duration) -> Option<Instant> {
        let linger = self.linger(interval);
        let due = self.oldest_unshipped().map(|t| t + linger);
        match (due, self.retry_at) {
            (Some(d), Some(r)) => Some(d.max(r)),
            (d, None) => d,
            (None, r) => r,
        }
    }
}

impl Shipper {
    pub fn new(
        cluster: Arc<Cluster>,
        log: LogStore,
        target: Target,
        url: String,
        s: Arc<BackupSettings>,
    ) -> Self {
        Shipper {
            cluster,
            log,
            target,
            url,
            s,
        }
    }

    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        // The tick looks at leadership, due snapshots and the position record; an apply
        // wakes the loop at once (only while leading), and so does a segment's deadline.
        let mut tick = tokio::time::interval(self.s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut applied_rx = self.cluster.raft().data_metrics();
        let mut leading: Option<Leading> = None;
        let stats = &self.cluster.metrics().backup;
        loop {
            let wake = leading.as_mut().and_then(|st| st.deadline(self.s.interval));
            tokio::select! {
                _ = tick.tick() => {}
                r = applied_rx.changed(), if leading.is_some() => {
                    if r.is_err() {
                        return;
                    }
                }
                _ = sleep_until(wake) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if !self.cluster.is_leader() {
                leading = None;
                stats.active.store(false, Relaxed);
                continue;
            }
            stats.active.store(true, Relaxed);
            let st = match &mut leading {
                Some(st) => st,
                None => match self.resume().await {
                    Ok(st) => leading.insert(st),
                    Err(e) => {
                        self.failed(&format!("{e:#}"));
                        continue;
                    }
                },
            };
            let (applied, purged) = {
                let m = applied_rx.borrow_watched();
                let index = |l: Option<crate::raft::LogId>| l.map_or(0, |l| l.index);
                (index(m.last_applied), index(m.purged))
            };
            st.observe(applied);
            loop {
                match self.step(st, applied, purged).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        self.failed(&format!("{e:#}"));
                        // Tried again after an interval, not at every apply.
                        st.retry_at = Some(Instant::now() + self.s.interval);
                        break;
                    }
                }
            }
            if st.unrecorded && st.recorded_at.elapsed() >= RECORD_EVERY {
                self.record(st).await;
            }
        }
    }

    fn failed(&self, e: &str) {
        tracing::warn!(target_url = %self.url, "backup: {e}");
        self.cluster.metrics().backup.failed(e);
    }

    fn key(&self, epoch: u64, name: &ObjectName) -> String {
        format!("{epoch:06}/{}", name.key())
    }

    /// On becoming leader: the epoch, and where this target stands.
    async fn resume(&self) -> anyhow::Result<Leading> {
        let (epoch, recorded) = {
            let conn = self.cluster.store().writer();
            (
                record::history_epoch(&conn)?,
                record::read_shipped(&conn, &self.url)?,
            )
        };
        let catalog = Catalog::load(&self.target).await?;
        let objects = catalog.epochs.get(&epoch);
        // From the recorded position, or (never recorded) the latest snapshot, on through the
        // segments an earlier leader stored after it.
        let shipped = match (recorded, objects) {
            (Some(r), Some(o)) => o.segments_after(r),
            (Some(r), None) => r,
            (None, Some(o)) => o.last_position().unwrap_or_default(),
            (None, None) => ShippedPosition::default(),
        };
        let snapshot_index = objects
            .and_then(|o| o.snapshots.last())
            .map_or(0, |(n, _)| n.last);
        self.cluster
            .metrics()
            .backup
            .shipped_to(&self.url, shipped.index, shipped.stamp_ms);
        tracing::info!(target_url = %self.url, epoch, shipped = shipped.index, "backup resumes");
        Ok(Leading {
            epoch,
            shipped,
            snapshot_index,
            // A snapshot found in the listing counts as taken now: no burst of snapshots
            // after every failover.
            snapshot_at: Instant::now(),
            recorded: recorded.map_or(0, |r| r.index),
            recorded_at: Instant::now(),
            unrecorded: recorded.is_none_or(|r| r.index < shipped.index),
            need_snapshot: snapshot_index == 0,
            pending: Vec::new(),
            pending_bytes: 0,
            // What an earlier leader left unshipped is due at once.
            seen: VecDeque::from([(
                self.cluster
                    .raft_metrics()
                    .last_applied
                    .map_or(0, |l| l.index),
                Instant::now()
                    .checked_sub(self.s.interval)
                    .unwrap_or_else(Instant::now),
            )]),
            retry_at: None,
            upload_time: Duration::ZERO,
            log_bytes: 0,
            snapshot_log_bytes: 0,
            snapshot_stored: objects
                .and_then(|o| o.snapshots.last())
                .map_or(0, |(_, size)| *size),
            snapshot_tried: Instant::now(),
            snapshotting: None,
        })
    }

    /// One upload, if anything is due; `true` if there may be more to ship now.
    /// `applied` and `purged`: the log's applied and purged index (openraft's metrics).
    async fn step(
        self: &Arc<Self>,
        st: &mut Leading,
        applied: u64,
        purged: u64,
    ) -> anyhow::Result<bool> {
        let stats = &self.cluster.metrics().backup;
        stats.committed_index.store(applied, Relaxed);
        stats
            .committed_stamp_ms
            .store(self.cluster.metrics().stamp_floor.load(Relaxed), Relaxed);
        if st.retry_at.is_some_and(|t| Instant::now() < t) {
            return Ok(false);
        }
        st.retry_at = None;
        if st.shipped.index < purged {
            // The target missed entries the log no longer has: only a snapshot can cover them.
            *stats.gap.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((st.shipped.index + 1, purged));
            st.need_snapshot = true;
        }
        // A periodic snapshot does not move the segment stream: segments stay gapless, so
        // every index after the first snapshot has a restore point (only a real gap in the
        // log starts the stream again, from a snapshot).
        if st.need_snapshot {
            st.drop_pending();
            self.snapshot(st).await?;
            self.retain(st.epoch).await;
            return Ok(true);
        }
        self.snapshot_finished(st).await;
        if st.snapshotting.is_none() && st.snapshot_due(&self.s, applied) {
            self.spawn_snapshot(st);
        }
        if !self.fill(st, applied).await? {
            st.need_snapshot = true;
            return Ok(true);
        }
        let Some(oldest) = st.oldest_unshipped() else {
            return Ok(false);
        };
        let full = st.pending_bytes >= SEGMENT_BYTES || st.pending.len() as u64 >= SEGMENT_ENTRIES;
        let behind = st.pending.last().is_some_and(|e| e.log_id.index < applied);
        let due = st.pending_bytes >= self.s.segment_bytes
            || full
            || behind
            || oldest.elapsed() >= st.linger(self.s.interval);
        if st.pending.is_empty() || !due {
            return Ok(false);
        }
        let entries = std::mem::take(&mut st.pending);
        let bytes = std::mem::take(&mut st.pending_bytes);
        let mut stamp = st.shipped.stamp_ms;
        let mut first_stamp = None;
        let mut unrecorded = false;
        for e in &entries {
            if let EntryPayload::Normal(c) = &e.payload {
                stamp = stamp.max(c.entry_stamp_ms().unwrap_or(stamp));
                if !matches!(c.unstamped(), Command::BackupShipped(_)) {
                    unrecorded = true;
                }
            }
            first_stamp.get_or_insert(stamp);
        }
        let last = entries.last().expect("at least one entry").log_id.index;
        let name = ObjectName {
            kind: Kind::Segment,
            first: st.shipped.index + 1,
            last,
            first_stamp: first_stamp.unwrap_or(stamp),
            last_stamp: stamp,
        };
        let payload = postcard::to_allocvec(&entries)?;
        let started = Instant::now();
        if let Err(e) = self.upload(st.epoch, &name, payload).await {
            // The same entries go out in the next try.
            st.pending_bytes = bytes;
            st.pending = entries;
            return Err(e);
        }
        st.uploaded_in(started.elapsed());
        st.unrecorded |= unrecorded;
        st.log_bytes += bytes as u64;
        st.shipped = ShippedPosition {
            index: last,
            stamp_ms: stamp,
        };
        stats.shipped_to(&self.url, last, stamp);
        Ok(last < applied)
    }

    /// Reads the entries applied after the pending ones into the next segment, up to
    /// [`SEGMENT_ENTRIES`] and [`SEGMENT_BYTES`] (one large entry may exceed it alone).
    /// `false` if the log no longer holds the next entry (it was purged: a gap).
    async fn fill(&self, st: &mut Leading, applied: u64) -> anyhow::Result<bool> {
        let next = st.shipped.index + 1 + st.pending.len() as u64;
        let room = SEGMENT_ENTRIES.saturating_sub(st.pending.len() as u64);
        if next > applied || room == 0 || st.pending_bytes >= SEGMENT_BYTES {
            return Ok(true);
        }
        let hi = applied.min(next + room - 1);
        let entries = self.log.clone().try_get_log_entries(next..=hi).await?;
        if entries.first().map(|e| e.log_id.index) != Some(next) {
            return Ok(false);
        }
        for e in entries {
            let n = postcard::experimental::serialized_size(&e).unwrap_or(0);
            if !st.pending.is_empty() && st.pending_bytes + n > SEGMENT_BYTES {
                break;
            }
            st.pending_bytes += n;
            st.pending.push(e);
        }
        Ok(true)
    }

    /// Seals and stores one object; its stored size.
    async fn upload(&self, epoch: u64, name: &ObjectName, payload: Vec<u8>) -> anyhow::Result<u64> {
        let key = self.key(epoch, name);
        let (kind, enc) = (name.kind, self.s.key.clone());
        // Compressing a snapshot takes a while: never on the runtime's workers.
        let (key, sealed) = tokio::task::spawn_blocking(move || {
            let sealed = object::seal(kind, &key, &payload, enc.as_ref());
            (key, sealed)
        })
        .await?;
        let n = sealed.len() as u64;
        self.target.put(&key, Bytes::from(sealed)).await?;
        self.cluster.metrics().backup.uploaded(n, now_ms());
        Ok(n)
    }

    /// A consistent copy of the replicated database, uploaded as a snapshot: its index,
    /// stamp and stored size.
    async fn take_snapshot(&self, epoch: u64) -> anyhow::Result<Snapshotted> {
        let store = self.cluster.store().clone();
        let tmp = self
            .cluster
            .scratch_dir()
            .join(format!("backup-snapshot-{}.db", rand::random::<u64>()));
        let (index, stamp, data) = tokio::task::spawn_blocking(move || {
            let r = (|| -> anyhow::Result<(u64, i64, Vec<u8>)> {
                store.copy_to(&tmp)?;
                let conn = crate::db::open_read_only(&tmp)?;
                let index = read_applied(&conn)?.0.map_or(0, |l| l.index);
                let stamp = read_stamp(&conn)?.unwrap_or(0);
                drop(conn);
                Ok((index, stamp, std::fs::read(&tmp)?))
            })();
            let _ = std::fs::remove_file(&tmp);
            r
        })
        .await??;
        let name = ObjectName::snapshot(index, stamp);
        let size = data.len();
        let stored = self.upload(epoch, &name, data).await?;
        self.cluster
            .metrics()
            .backup
            .snapshots_written
            .fetch_add(1, Relaxed);
        tracing::info!(target_url = %self.url, index, bytes = size, stored, "backup snapshot stored");
        Ok(Snapshotted {
            index,
            stamp,
            stored,
        })
    }

    /// A snapshot the segment stream waits for (a gap: it moves the stream past the gap).
    async fn snapshot(&self, st: &mut Leading) -> anyhow::Result<()> {
        if let Some(task) = st.snapshotting.take() {
            // One snapshot at a time; its result counts like any other.
            if let Ok(Ok((done, log_bytes))) = task.await {
                st.snapshot_taken(done, log_bytes);
            }
        }
        let done = self.take_snapshot(st.epoch).await?;
        if st.need_snapshot && done.index > st.shipped.index {
            st.shipped = ShippedPosition {
                index: done.index,
                stamp_ms: done.stamp,
            };
            st.unrecorded = true;
        }
        st.snapshot_taken(done, st.log_bytes);
        st.need_snapshot = false;
        self.cluster
            .metrics()
            .backup
            .shipped_to(&self.url, st.shipped.index, st.shipped.stamp_ms);
        Ok(())
    }

    /// A periodic snapshot, with retention after it, taken beside the segment stream (which
    /// it does not move), so segments keep leaving while a large database is copied,
    /// compressed and uploaded.
    fn spawn_snapshot(self: &Arc<Self>, st: &mut Leading) {
        let me = self.clone();
        let (epoch, log_bytes) = (st.epoch, st.log_bytes);
        // Counts as taken from now on, so a failure is tried again an interval later (the
        // snapshot interval's clock restarts only when one is stored).
        st.snapshot_tried = Instant::now();
        st.snapshotting = Some(tokio::spawn(async move {
            let done = me.take_snapshot(epoch).await?;
            me.retain(epoch).await;
            Ok((done, log_bytes))
        }));
    }

    /// Takes in a finished background snapshot.
    async fn snapshot_finished(&self, st: &mut Leading) {
        if !st.snapshotting.as_ref().is_some_and(|t| t.is_finished()) {
            return;
        }
        match st.snapshotting.take().expect("checked").await {
            Ok(Ok((done, log_bytes))) => st.snapshot_taken(done, log_bytes),
            Ok(Err(e)) => self.failed(&format!("snapshot: {e:#}")),
            Err(e) => self.failed(&format!("snapshot task: {e}")),
        }
    }

    /// Records the shipped position through Raft (a failed proposal is tried next time).
    async fn record(&self, st: &mut Leading) {
        let cmd = Command::BackupShipped(BackupShipped {
            target: self.url.clone(),
            position: st.shipped,
        });
        st.recorded_at = Instant::now();
        match self.cluster.write(cmd).await {
            Ok(_) => {
                st.recorded = st.shipped.index;
                st.unrecorded = false;
            }
            Err(e) => tracing::debug!("backup position not recorded: {e}"),
        }
    }

    /// Retention after a snapshot: snapshots older than `retention` go (the newest
    /// `retention_snapshots` always stay), and so do segments that end before the oldest
    /// snapshot kept (nothing can start from before it).
    async fn retain(&self, epoch: u64) {
        let catalog = match Catalog::load(&self.target).await {
            Ok(c) => c,
            Err(e) => return self.failed(&format!("listing for retention: {e:#}")),
        };
        let Some(objects) = catalog.epochs.get(&epoch) else {
            return;
        };
        let cutoff = now_ms() - self.s.retention.as_millis() as i64;
        let snaps = &objects.snapshots;
        let keep_from = snaps.len().saturating_sub(self.s.retention_snapshots);
        let oldest_kept = snaps
            .iter()
            .enumerate()
            .find(|(i, (n, _))| *i >= keep_from || n.last_stamp >= cutoff)
            .map(|(_, (n, _))| n.last);
        let Some(oldest_kept) = oldest_kept else {
            return;
        };
        let doomed = snaps.iter().filter(|(n, _)| n.last < oldest_kept).chain(
            objects
                .segments
                .iter()
                .filter(|(n, _)| n.last <= oldest_kept),
        );
        let kept: Vec<(ObjectName, u64)> = objects
            .segments
            .iter()
            .filter(|(n, _)| n.last > oldest_kept)
            .cloned()
            .collect();
        for (name, _) in doomed {
            match self.target.delete(&self.key(epoch, name)).await {
                Ok(()) => {
                    self.cluster
                        .metrics()
                        .backup
                        .objects_deleted
                        .fetch_add(1, Relaxed);
                }
                Err(e) => return self.failed(&format!("retention: {e}")),
            }
        }
        let stats = &self.cluster.metrics().backup;
        match compact::compact(&self.target, epoch, &kept, self.s.key.as_ref(), now_ms()).await {
            Ok(c) => {
                stats.objects_written.fetch_add(c.written, Relaxed);
                stats.bytes_written.fetch_add(c.bytes, Relaxed);
                stats.objects_deleted.fetch_add(c.deleted, Relaxed);
            }
            Err(e) => self.failed(&format!("compaction: {e:#}")),
        }
    }
}

/// Sleeps until `t`; forever without one.
async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leading(shipped: u64) -> Leading {
        Leading {
            epoch: 0,
            shipped: ShippedPosition {
                index: shipped,
                stamp_ms: 0,
            },
            snapshot_index: 1,
            snapshot_at: Instant::now(),
            recorded: 0,
            recorded_at: Instant::now(),
            unrecorded: false,
            need_snapshot: false,
            pending: Vec::new(),
            pending_bytes: 0,
            seen: VecDeque::new(),
            retry_at: None,
            upload_time: Duration::ZERO,
            log_bytes: 0,
            snapshot_log_bytes: 0,
            snapshot_stored: 0,
            snapshot_tried: Instant::now() - Duration::from_secs(10),
            snapshotting: None,
        }
    }

    fn settings() -> BackupSettings {
        BackupSettings {
            urls: Vec::new(),
            interval: Duration::from_secs(1),
            segment_bytes: 1 << 20,
            snapshot_interval: Duration::from_secs(3600),
            snapshot_entries: 100_000,
            snapshot_bytes: 1000,
            retention: Duration::from_secs(3600),
            retention_snapshots: 2,
            key: None,
            s3: super::super::s3_options(None, None, None, None, None),
        }
    }

    #[test]
    fn test_the_interval_runs_from_the_oldest_unshipped_apply() {
        let mut st = leading(5);
        st.observe(5);
        assert_eq!(
            st.oldest_unshipped(),
            None,
            "nothing after the shipped index"
        );
        st.observe(7);
        let first = st.seen.back().unwrap().1;
        st.observe(7);
        st.observe(9);
        assert_eq!(st.seen.len(), 2, "an index already seen is not noted again");
        assert_eq!(st.oldest_unshipped(), Some(first));
        let interval = Duration::from_secs(1);
        assert_eq!(st.deadline(interval), Some(first + interval));
        // A segment up to 7 stored: the interval of 8..9 runs from when 9 was seen.
        st.shipped.index = 7;
        let second = st.seen[1].1;
        assert_eq!(st.oldest_unshipped(), Some(second));
        // A back-off later than the deadline wins.
        let later = second + Duration::from_secs(5);
        st.retry_at = Some(later);
        assert_eq!(st.deadline(interval), Some(later));
        st.shipped.index = 9;
        assert_eq!(st.deadline(interval), Some(later));
        st.retry_at = None;
        assert_eq!(st.deadline(interval), None);
    }

    #[test]
    fn test_a_segment_leaves_early_by_the_recent_upload_time() {
        let mut st = leading(0);
        let interval = Duration::from_secs(1);
        assert_eq!(st.linger(interval), interval);
        st.uploaded_in(Duration::from_millis(400));
        assert_eq!(st.linger(interval), Duration::from_millis(900));
        st.observe(3);
        let seen = st.seen[0].1;
        assert_eq!(
            st.deadline(interval),
            Some(seen + Duration::from_millis(900))
        );
        // Slow uploads: never less than half the interval.
        for _ in 0..20 {
            st.uploaded_in(Duration::from_secs(5));
        }
        assert_eq!(st.linger(interval), interval / 2);
    }

    #[test]
    fn test_snapshot_due_after_enough_log_but_not_more_than_the_last_snapshot() {
        let s = settings();
        let mut st = leading(10);
        assert!(!st.snapshot_due(&s, 10));
        st.log_bytes = 999;
        assert!(!st.snapshot_due(&s, 10));
        st.log_bytes = 1000;
        assert!(st.snapshot_due(&s, 10));
        assert!(
            !st.snapshot_due(&s, 1),
            "nothing applied since the snapshot"
        );
        // A large snapshot: due only once as much log was shipped as it stored.
        st.snapshot_stored = 5000;
        assert!(!st.snapshot_due(&s, 10));
        st.log_bytes = 5000;
        assert!(st.snapshot_due(&s, 10));
        // Counted from the last snapshot's start.
        st.snapshot_taken(
            Snapshotted {
                index: 10,
                stamp: 0,
                stored: 100,
            },
            4500,
        );
        assert_eq!(st.snapshot_index, 10);
        assert!(!st.snapshot_due(&s, 11));
        st.log_bytes = 5500;
        assert!(st.snapshot_due(&s, 11));
        // Not again within an interval of the last try.
        st.snapshot_tried = Instant::now();
        assert!(!st.snapshot_due(&s, 11));
    }
}
