//! Reading a backup back: what a target holds ([`Catalog`], `cairn backup list`) and
//! rebuilding a data directory from it (`cairn restore --from URL`).
//!
//! A restore takes the latest snapshot at or before the point asked for, then applies the
//! segments after it entry by entry through the state machine's own apply code
//! (`StateMachine::apply_restored`), so the rebuilt database is the one every replica had at
//! that index. `--to-time T` stops after the last entry stamped at or before T (stamps never
//! go down along the log), `--to-index N` after entry N. The restored database starts a new
//! history epoch; [`adopt`] then makes it a one-node cluster when `cairn node --bootstrap`
//! starts on it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::object::{self, BackupKey, Kind, ObjectName};
use super::s3::S3Options;
use super::target::Target;
use crate::command::backup::{self as record, ShippedPosition};
use crate::metrics::Metrics;
use crate::raft::state_machine::StateMachine;
use crate::raft::{Entry, LogId, Peer, StoredMembership};

/// The objects of one history epoch, each kind sorted by index.
#[derive(Debug, Default, Clone)]
pub struct EpochObjects {
    pub snapshots: Vec<(ObjectName, u64)>,
    pub segments: Vec<(ObjectName, u64)>,
}

impl EpochObjects {
    /// The furthest position the objects reach without a hole: the last snapshot, extended
    /// by the segments that follow on from it.
    pub fn last_position(&self) -> Option<ShippedPosition> {
        let (snap, _) = self.snapshots.last()?;
        Some(self.segments_after(ShippedPosition {
            index: snap.last,
            stamp_ms: snap.last_stamp,
        }))
    }

    /// `from`, extended by the segments that continue it without a hole.
    pub fn segments_after(&self, from: ShippedPosition) -> ShippedPosition {
        let mut pos = from;
        for (seg, _) in &self.segments {
            if seg.first <= pos.index + 1 && seg.last > pos.index {
                pos = ShippedPosition {
                    index: seg.last,
                    stamp_ms: seg.last_stamp,
                };
            }
        }
        pos
    }

    /// `(first, last, first_stamp, last_stamp, objects, bytes)` of each run of segments
    /// without a hole.
    pub fn segment_runs(&self) -> Vec<(u64, u64, i64, i64, usize, u64)> {
        let mut runs: Vec<(u64, u64, i64, i64, usize, u64)> = Vec::new();
        for (s, size) in &self.segments {
            match runs.last_mut() {
                Some(r) if s.first <= r.1 + 1 => {
                    r.1 = r.1.max(s.last);
                    r.3 = r.3.max(s.last_stamp);
                    r.4 += 1;
                    r.5 += size;
                }
                _ => runs.push((s.first, s.last, s.first_stamp, s.last_stamp, 1, *size)),
            }
        }
        runs
    }
}

/// Everything a target holds, by history epoch.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    pub epochs: BTreeMap<u64, EpochObjects>,
    /// Keys that are not backup objects (left alone).
    pub foreign: usize,
}

impl Catalog {
    pub async fn load(target: &Target) -> anyhow::Result<Self> {
        let mut c = Catalog::default();
        for (key, size) in target.list("").await? {
            let parsed = key
                .split_once('/')
                .and_then(|(e, rest)| Some((e.parse::<u64>().ok()?, ObjectName::from_key(rest)?)));
            let Some((epoch, name)) = parsed else {
                c.foreign += 1;
                continue;
            };
            let e = c.epochs.entry(epoch).or_default();
            match name.kind {
                Kind::Snapshot => e.snapshots.push((name, size)),
                Kind::Segment => e.segments.push((name, size)),
            }
        }
        for e in c.epochs.values_mut() {
            e.snapshots.sort_by_key(|(n, _)| n.last);
            e.segments.sort_by_key(|(n, _)| (n.first, n.last));
        }
        Ok(c)
    }
}

/// Where a restore stops.
#[derive(Debug, Clone, Copy, Default)]
pub struct Point {
    /// Unix ms: entries stamped after it are left out.
    pub to_time: Option<i64>,
    pub to_index: Option<u64>,
}

impl Point {
    fn admits(&self, index: u64, stamp: i64) -> bool {
        self.to_index.is_none_or(|i| index <= i) && self.to_time.is_none_or(|t| stamp <= t)
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    pub epoch: u64,
    pub new_epoch: u64,
    pub snapshot: ObjectName,
    pub segments: usize,
    pub entries: u64,
    pub last: LogId,
    pub last_stamp_ms: i64,
    pub bytes: u64,
}

/// Progress of a long operation: the CLI draws a bar or prints lines.
pub trait Progress: Send + Sync {
    fn start(&self, what: &str, total: u64);
    fn advance(&self, n: u64);
    fn finish(&self, msg: &str);
}

/// No progress reporting (`--restore-if-empty`: the node logs instead).
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self, _: &str) {}
}

/// The marker `cairn restore` leaves in the data dir for [`adopt`].
const MARKER: &str = "restored.json";
/// Present while a restore runs: a directory holding it is not a restore (it was cut short).
const INCOMPLETE: &str = "restore-incomplete";
/// Segments downloaded ahead of the one being applied.
const PREFETCH: usize = 4;

/// A segment's name and stored size, and its entries.
type Fetched = ((ObjectName, u64), Vec<Entry>);

/// Downloads, checks and decodes `segments` in order, [`PREFETCH`] at a time, into `tx`
/// (an error ends the stream; a closed receiver too).
async fn fetch_segments(
    target: Target,
    epoch: u64,
    segments: Vec<(ObjectName, u64)>,
    key: Option<BackupKey>,
    tx: tokio::sync::mpsc::Sender<anyhow::Result<Fetched>>,
) {
    use futures_util::StreamExt as _;
    let fetch = |(name, size): (ObjectName, u64)| {
        let (target, key) = (target.clone(), key.clone());
        async move {
            let k = format!("{epoch:06}/{}", name.key());
            let bytes = target.get(&k).await?;
            let batch = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Entry>> {
                let payload = object::open(Kind::Segment, &k, &bytes, key.as_ref())?;
                Ok(postcard::from_bytes(&payload)
                    .map_err(|_| object::ObjectError::Corrupt(k.clone(), "undecodable entries"))?)
            })
            .await??;
            anyhow::Ok(((name, size), batch))
        }
    };
    let mut stream = futures_util::stream::iter(segments)
        .map(fetch)
        .buffered(PREFETCH);
    while let Some(r) = stream.next().await {
        let failed = r.is_err();
        if tx.send(r).await.is_err() || failed {
            return;
        }
    }
}

/// Refuses a data dir left by a restore that did not finish.
pub fn check_complete(data_dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !data_dir.join(INCOMPLETE).exists(),
        "{} holds a restore that did not finish: delete the directory and restore again",
        data_dir.display()
    );
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    last: LogId,
    epoch: u64,
}

/// Rebuilds `data_dir` (which must be empty or absent) from the backup at `url`.
pub async fn restore(
    url: &str,
    s3: &S3Options,
    key: Option<&BackupKey>,
    data_dir: &Path,
    point: Point,
    progress: &dyn Progress,
) -> anyhow::Result<Restored> {
    if data_dir.exists() && std::fs::read_dir(data_dir)?.next().is_some() {
        anyhow::bail!(
            "{} is not empty: restore into a new directory",
            data_dir.display()
        );
    }
    let target = Target::open(url, s3)?;
    let catalog = Catalog::load(&target).await?;
    // The newest epoch that has a snapshot at or before the point.
    let pick = catalog.epochs.iter().rev().find_map(|(epoch, o)| {
        let snap = o
            .snapshots
            .iter()
            .rev()
            .find(|(n, _)| point.admits(n.last, n.last_stamp))?;
        Some((*epoch, o, snap.clone()))
    });
    let Some((epoch, objects, (snap, snap_size))) = pick else {
        anyhow::bail!("{url} holds no snapshot at or before the point asked for");
    };
    let segments: Vec<&(ObjectName, u64)> = objects
        .segments
        .iter()
        .filter(|(n, _)| n.last > snap.last && point.admits(n.first, n.first_stamp))
        .collect();
    let total = snap_size + segments.iter().map(|(_, s)| s).sum::<u64>();
    progress.start("restoring", total);

    // Until the end, the directory says it holds an interrupted restore: `cairn node` refuses
    // it (and `--restore-if-empty` starts again), so half a restore is never taken for one.
    std::fs::create_dir_all(data_dir)?;
    std::fs::write(data_dir.join(INCOMPLETE), b"")?;
    let sm_dir = data_dir.join("sm");
    std::fs::create_dir_all(&sm_dir)?;
    // The segments download (a few at once) while the snapshot is written and while the
    // entries before them apply.
    let (tx, mut fetched) = tokio::sync::mpsc::channel(PREFETCH);
    let fetcher = tokio::spawn(fetch_segments(
        target.clone(),
        epoch,
        segments.iter().map(|s| (*s).clone()).collect(),
        key.cloned(),
        tx,
    ));
    let snap_key = format!("{epoch:06}/{}", snap.key());
    let bytes = target.get(&snap_key).await?;
    let db_path = sm_dir.join("db.sqlite");
    let (k, enc) = (snap_key.clone(), key.cloned());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        // Decompressed straight into the file: a large database is never held in memory. Not
        // fsync'd here: the restore's one durable point is at the end (the marker above).
        let mut out = std::io::BufWriter::new(std::fs::File::create_new(&db_path)?);
        object::open_into(Kind::Snapshot, &k, &bytes, enc.as_ref(), &mut out)?;
        out.into_inner().map_err(|e| e.into_error())?;
        Ok(())
    })
    .await??;
    progress.advance(snap_size);

    let sm = StateMachine::open(&sm_dir, Arc::new(Metrics::default()))?;
    // A crash mid-restore means restoring again (the marker above), so nothing is fsync'd
    // until the end.
    sm.store()
        .writer()
        .pragma_update(None, "synchronous", "OFF")?;
    let mut applied = sm
        .applied_log_id()
        .ok_or_else(|| anyhow::anyhow!("snapshot {snap_key} holds no applied position"))?;
    let mut stamp = snap.last_stamp;
    let (mut entries, mut used) = (0u64, 0usize);
    while let Some(next) = fetched.recv().await {
        let ((name, size), batch) = next?;
        if name.first > applied.index + 1 {
            anyhow::bail!(
                "{url}: entries {}..{} are missing (no segment covers them)",
                applied.index + 1,
                name.first - 1
            );
        }
        let mut take = Vec::new();
        let mut stop = false;
        for e in batch {
            if e.log_id.index <= applied.index {
                continue;
            }
            let s = match &e.payload {
                openraft::EntryPayload::Normal(c) => c.entry_stamp_ms().unwrap_or(stamp),
                _ => stamp,
            };
            if !point.admits(e.log_id.index, s) {
                stop = true;
                break;
            }
            stamp = s;
            applied = e.log_id;
            take.push(e);
        }
        entries += take.len() as u64;
        let sm2 = sm.clone();
        tokio::task::spawn_blocking(move || sm2.apply_restored(&take)).await??;
        used += 1;
        progress.advance(size);
        if stop {
            break;
        }
    }
    fetcher.abort();
    let new_epoch = epoch + 1;
    {
        let store = sm.store();
        let conn = store.writer();
        record::start_epoch(&conn, new_epoch)?;
        // Everything on disk before the restore counts as done.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    drop(sm);
    std::fs::File::open(sm_dir.join("db.sqlite"))?.sync_all()?;
    std::fs::File::open(&sm_dir)?.sync_all()?;
    write_new(
        &data_dir.join(MARKER),
        &serde_json::to_vec(&Marker {
            last: applied,
            epoch: new_epoch,
        })?,
    )?;
    std::fs::remove_file(data_dir.join(INCOMPLETE))?;
    std::fs::File::open(data_dir)?.sync_all()?;
    progress.finish(&format!(
        "restored through index {} ({})",
        applied.index,
        crate::db::schema::utc_text(stamp)
    ));
    Ok(Restored {
        epoch,
        new_epoch,
        snapshot: snap,
        segments: used,
        entries,
        last: applied,
        last_stamp_ms: stamp,
        bytes: total,
    })
}

fn write_new(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create_new(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Whether `data_dir` holds a restore not yet started as a cluster.
pub fn is_restored(data_dir: &Path) -> bool {
    data_dir.join(MARKER).exists()
}

/// Makes a restored data dir a one-node cluster of `id` at `peer`: the membership in the
/// database becomes this node alone, and the Raft log starts after the restored index (so a
/// node that joins later gets the database as a snapshot, never a replay from index 1). Runs
/// before the node opens its storage.
pub fn adopt(data_dir: &Path, id: u64, peer: &Peer) -> anyhow::Result<()> {
    let marker: Marker = serde_json::from_slice(&std::fs::read(data_dir.join(MARKER))?)?;
    let membership = openraft::Membership::new(
        vec![std::collections::BTreeSet::from([id])],
        BTreeMap::from([(id, peer.clone())]),
    )?;
    let stored = StoredMembership::new(Some(marker.last), membership);
    {
        let conn = crate::db::open(&data_dir.join("sm").join("db.sqlite"))?;
        conn.execute(
            &format!(
                "INSERT OR REPLACE INTO {}(key, value) VALUES('membership', ?1)",
                crate::db::tables::RAFT
            ),
            [serde_json::to_vec(&stored)?],
        )?;
        // A new cluster: the old members' incarnations mean nothing to it (this node records
        // its own once it runs).
        crate::command::members::forget_all(&conn)?;
    }
    crate::raft::log_store::start_after(&data_dir.join("raft.db"), marker.last, id)?;
    std::fs::remove_file(data_dir.join(MARKER))?;
    tracing::info!(
        index = marker.last.index,
        epoch = marker.epoch,
        "restored data adopted as a one-node cluster (new history epoch)"
    );
    Ok(())
}

/// `--restore-if-empty`: restores the latest backup of the first target into an empty (or
/// absent) `data_dir`. `true` if it did (the node then bootstraps from it); `false` if the
/// directory holds data or the target holds no snapshot yet (a brand-new site).
pub async fn if_empty(data_dir: &Path, s: &super::BackupSettings) -> anyhow::Result<bool> {
    if data_dir.join(INCOMPLETE).exists() {
        tracing::warn!(
            dir = %data_dir.display(),
            "restore_if_empty: an earlier restore did not finish; restoring again"
        );
        // Its contents only: the directory may be a mount point.
        for e in std::fs::read_dir(data_dir)? {
            let path = e?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    }
    if data_dir.exists() && std::fs::read_dir(data_dir)?.next().is_some() {
        return Ok(false);
    }
    let url = &s.urls[0];
    let catalog = Catalog::load(&Target::open(url, &s.s3)?).await?;
    if catalog.epochs.values().all(|e| e.snapshots.is_empty()) {
        tracing::info!(%url, "restore_if_empty: the backup is empty, starting afresh");
        return Ok(false);
    }
    let r = restore(
        url,
        &s.s3,
        s.key.as_ref(),
        data_dir,
        Point::default(),
        &Quiet,
    )
    .await?;
    tracing::info!(
        %url,
        index = r.last.index,
        epoch = r.new_epoch,
        "restore_if_empty: restored the latest backup"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> Entry {
        let leader = openraft::impls::leader_id_adv::LeaderId {
            term: 1,
            node_id: 1,
        };
        Entry {
            log_id: LogId::new(leader, index),
            payload: openraft::EntryPayload::Blank,
        }
    }

    /// Stores `payload` as the object `name` of epoch 0 in the directory target `bk`.
    fn store(bk: &Path, name: &ObjectName, payload: &[u8]) {
        let key = format!("000000/{}", name.key());
        let path = bk.join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, object::seal(name.kind, &key, payload, None)).unwrap();
    }

    fn segment(first: u64, last: u64) -> (ObjectName, Vec<u8>) {
        let entries: Vec<Entry> = (first..=last).map(entry).collect();
        let name = ObjectName {
            kind: Kind::Segment,
            first,
            last,
            first_stamp: 0,
            last_stamp: 0,
        };
        (name, postcard::to_allocvec(&entries).unwrap())
    }

    /// A restore that stops part way (here: a hole in the segments) leaves a directory that
    /// says so: `cairn node` refuses it and it is not taken for a restore; one that finishes
    /// is.
    #[tokio::test]
    async fn test_an_unfinished_restore_is_never_taken_for_one() {
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        let sm = StateMachine::open(&src, Arc::new(Metrics::default())).unwrap();
        sm.apply_restored(&[entry(1)]).unwrap();
        let snap = work.path().join("snap.db");
        sm.store().copy_to(&snap).unwrap();
        drop(sm);
        let bk = work.path().join("bk");
        store(
            &bk,
            &ObjectName::snapshot(1, 0),
            &std::fs::read(&snap).unwrap(),
        );
        let (name, payload) = segment(2, 40);
        store(&bk, &name, &payload);
        let (hole, payload) = segment(45, 50);
        store(&bk, &hole, &payload);
        let url = format!("file://{}", bk.display());
        let s3 = super::super::s3_options(None, None, None, None, None);

        let cut = work.path().join("cut");
        let e = restore(&url, &s3, None, &cut, Point::default(), &Quiet)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("41..44 are missing"), "{e}");
        let e = check_complete(&cut).unwrap_err().to_string();
        assert!(e.contains("did not finish"), "{e}");
        assert!(!is_restored(&cut));

        std::fs::remove_file(bk.join(format!("000000/{}", hole.key()))).unwrap();
        let whole = work.path().join("whole");
        let r = restore(&url, &s3, None, &whole, Point::default(), &Quiet)
            .await
            .unwrap();
        assert_eq!((r.last.index, r.entries, r.segments), (40, 39, 1));
        check_complete(&whole).unwrap();
        assert!(is_restored(&whole));
        // Through the same apply as the replicas: the restored position is the last entry's.
        let sm = StateMachine::open(&whole.join("sm"), Arc::new(Metrics::default())).unwrap();
        assert_eq!(sm.applied_log_id().map(|l| l.index), Some(40));
    }
}
