//! The leader's backup loop for one target.
//!
//! While this node leads, every tick: if the target holds nothing of this history epoch yet,
//! or holds less than the log still has (the log was purged past it: the target was down),
//! or a snapshot is due, upload a snapshot; then ship the entries applied since the last
//! upload as segments, until caught up. The position shipped goes through Raft
//! (`Command::BackupShipped`) every few seconds; a new leader starts from the higher of that
//! record and what the target's listing shows, so after a failover it re-ships at most a few
//! seconds of entries (a restore skips indexes it already applied) and never skips one.
//!
//! Correctness: only applied entries are shipped, and an entry is applied only once committed,
//! so every object holds committed history; entries go out in index order, a segment
//! starts right after the previous one (or right after a snapshot), and a position is
//! recorded only after its object is stored.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::storage::RaftLogStorage;
use openraft::{EntryPayload, RaftLogReader};

use super::compact;
use super::object::{self, Kind, ObjectName};
use super::restore::Catalog;
use super::target::Target;
use super::{BackupSettings, now_ms};
use crate::cluster::Cluster;
use crate::command::Command;
use crate::command::backup::{self as record, BackupShipped, ShippedPosition};
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

    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leading: Option<Leading> = None;
        let stats = &self.cluster.metrics().backup;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
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
            loop {
                match self.step(st).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        self.failed(&format!("{e:#}"));
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
        })
    }

    /// One upload, if anything is due; `true` if there may be more to ship now.
    async fn step(&self, st: &mut Leading) -> anyhow::Result<bool> {
        let stats = &self.cluster.metrics().backup;
        let m = self.cluster.raft_metrics();
        let applied = m.last_applied.map_or(0, |l| l.index);
        stats.committed_index.store(applied, Relaxed);
        stats
            .committed_stamp_ms
            .store(self.cluster.metrics().stamp_floor.load(Relaxed), Relaxed);
        let purged = self
            .log
            .clone()
            .get_log_state()
            .await?
            .last_purged_log_id
            .map_or(0, |l| l.index);
        if st.shipped.index < purged {
            // The target missed entries the log no longer has: only a snapshot can cover them.
            *stats.gap.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((st.shipped.index + 1, purged));
            st.need_snapshot = true;
        }
        let due = applied > st.snapshot_index
            && (st.snapshot_at.elapsed() >= self.s.snapshot_interval
                || applied - st.snapshot_index >= self.s.snapshot_entries);
        // A periodic snapshot does not move the segment stream: segments stay gapless, so
        // every index after the first snapshot has a restore point (only a real gap in the
        // log starts the stream again, from a snapshot).
        if st.need_snapshot || due {
            self.snapshot(st).await?;
            self.retain(st).await;
            return Ok(true);
        }
        if applied <= st.shipped.index {
            return Ok(false);
        }
        let hi = applied.min(st.shipped.index + SEGMENT_ENTRIES);
        let mut entries = self
            .log
            .clone()
            .try_get_log_entries(st.shipped.index + 1..=hi)
            .await?;
        if entries.first().map(|e| e.log_id.index) != Some(st.shipped.index + 1) {
            st.need_snapshot = true;
            return Ok(true);
        }
        let mut bytes = 0;
        let mut stamp = st.shipped.stamp_ms;
        let mut first_stamp = None;
        let mut keep = 0;
        for e in &entries {
            bytes += postcard::experimental::serialized_size(e).unwrap_or(0);
            if keep > 0 && bytes > SEGMENT_BYTES {
                break;
            }
            if let EntryPayload::Normal(c) = &e.payload {
                stamp = stamp.max(c.entry_stamp_ms().unwrap_or(stamp));
                if !matches!(c.unstamped(), Command::BackupShipped(_)) {
                    st.unrecorded = true;
                }
            }
            first_stamp.get_or_insert(stamp);
            keep += 1;
        }
        entries.truncate(keep);
        let last = entries.last().expect("at least one entry").log_id.index;
        let name = ObjectName {
            kind: Kind::Segment,
            first: st.shipped.index + 1,
            last,
            first_stamp: first_stamp.unwrap_or(stamp),
            last_stamp: stamp,
        };
        let payload = postcard::to_allocvec(&entries)?;
        self.upload(st.epoch, &name, &payload).await?;
        st.shipped = ShippedPosition {
            index: last,
            stamp_ms: stamp,
        };
        stats.shipped_to(&self.url, last, stamp);
        Ok(last < applied)
    }

    async fn upload(&self, epoch: u64, name: &ObjectName, payload: &[u8]) -> anyhow::Result<()> {
        let key = self.key(epoch, name);
        let sealed = object::seal(name.kind, &key, payload, self.s.key.as_ref());
        let n = sealed.len() as u64;
        self.target.put(&key, Bytes::from(sealed)).await?;
        self.cluster.metrics().backup.uploaded(n, now_ms());
        Ok(())
    }

    /// A consistent copy of the replicated database, uploaded as a snapshot.
    async fn snapshot(&self, st: &mut Leading) -> anyhow::Result<()> {
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
        self.upload(st.epoch, &name, &data).await?;
        self.cluster
            .metrics()
            .backup
            .snapshots_written
            .fetch_add(1, Relaxed);
        tracing::info!(target_url = %self.url, index, bytes = data.len(), "backup snapshot stored");
        if st.need_snapshot && index > st.shipped.index {
            st.shipped = ShippedPosition {
                index,
                stamp_ms: stamp,
            };
            st.unrecorded = true;
        }
        st.snapshot_index = index;
        st.snapshot_at = Instant::now();
        st.need_snapshot = false;
        self.cluster
            .metrics()
            .backup
            .shipped_to(&self.url, st.shipped.index, st.shipped.stamp_ms);
        Ok(())
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
    async fn retain(&self, st: &Leading) {
        let catalog = match Catalog::load(&self.target).await {
            Ok(c) => c,
            Err(e) => return self.failed(&format!("listing for retention: {e:#}")),
        };
        let Some(objects) = catalog.epochs.get(&st.epoch) else {
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
            match self.target.delete(&self.key(st.epoch, name)).await {
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
        match compact::compact(&self.target, st.epoch, &kept, self.s.key.as_ref(), now_ms()).await {
            Ok(c) => {
                stats.objects_written.fetch_add(c.written, Relaxed);
                stats.bytes_written.fetch_add(c.bytes, Relaxed);
                stats.objects_deleted.fetch_add(c.deleted, Relaxed);
            }
            Err(e) => self.failed(&format!("compaction: {e:#}")),
        }
    }
}
