//! Compaction: runs of small segments older than a minute become one segment, so a target
//! does not keep one object per interval forever (a day at 1 s is 86,400 objects) and a
//! restore reads few large objects instead of many small ones. Segments overlapping after a
//! failover (a new leader re-ships a few seconds) merge into one too.
//!
//! The merged segment is stored before the small ones are deleted, so a crash in between
//! leaves overlap (which a restore skips), never a hole. Every entry keeps its index and
//! stamp, so point-in-time restore stays exact.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::object::{self, BackupKey, Kind, ObjectName};
use super::target::Target;
use crate::raft::Entry;

/// Segments younger than this stay as they are (a restore of the last minute reads them).
pub const MIN_AGE_MS: i64 = 60_000;
/// A merged segment holds at most this many entries and about this many stored bytes.
const MAX_ENTRIES: u64 = 16_384;
const MAX_BYTES: u64 = 8 << 20;

/// What one compaction pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub written: u64,
    pub bytes: u64,
    pub deleted: u64,
}

/// Runs of at least two segments that continue each other, all older than [`MIN_AGE_MS`].
pub fn plan(segments: &[(ObjectName, u64)], now_ms: i64) -> Vec<Vec<ObjectName>> {
    let mut runs: Vec<Vec<ObjectName>> = Vec::new();
    let mut bytes = 0;
    for (s, size) in segments {
        if s.last_stamp > now_ms - MIN_AGE_MS {
            break;
        }
        let extends = runs.last().and_then(|r| r.last()).is_some_and(|p| {
            let first = runs.last().expect("run")[0].first;
            s.first <= p.last + 1 && s.last - first < MAX_ENTRIES && bytes + size <= MAX_BYTES
        });
        if extends {
            runs.last_mut().expect("run").push(s.clone());
            bytes += size;
        } else {
            runs.push(vec![s.clone()]);
            bytes = *size;
        }
    }
    runs.retain(|r| r.len() > 1);
    runs
}

/// Merges each planned run into one segment on `target` (epoch `epoch`).
pub async fn compact(
    target: &Target,
    epoch: u64,
    segments: &[(ObjectName, u64)],
    key: Option<&BackupKey>,
    now_ms: i64,
) -> anyhow::Result<Compacted> {
    let mut done = Compacted::default();
    for run in plan(segments, now_ms) {
        let mut entries: BTreeMap<u64, Entry> = BTreeMap::new();
        for s in &run {
            let k = format!("{epoch:06}/{}", s.key());
            let payload = object::open(Kind::Segment, &k, &target.get(&k).await?, key)?;
            let batch: Vec<Entry> = postcard::from_bytes(&payload)
                .map_err(|_| object::ObjectError::Corrupt(k.clone(), "undecodable entries"))?;
            for e in batch {
                entries.insert(e.log_id.index, e);
            }
        }
        let first = run[0].first;
        let last = run.iter().map(|s| s.last).max().expect("non-empty run");
        anyhow::ensure!(
            entries.keys().copied().eq(first..=last),
            "segments {first}..{last} do not hold every entry of their range"
        );
        let name = ObjectName {
            kind: Kind::Segment,
            first,
            last,
            first_stamp: run.iter().map(|s| s.first_stamp).min().expect("run"),
            last_stamp: run.iter().map(|s| s.last_stamp).max().expect("run"),
        };
        let merged: Vec<Entry> = entries.into_values().collect();
        let k = format!("{epoch:06}/{}", name.key());
        let sealed = object::seal(Kind::Segment, &k, &postcard::to_allocvec(&merged)?, key);
        done.bytes += sealed.len() as u64;
        target.put(&k, Bytes::from(sealed)).await?;
        done.written += 1;
        for s in &run {
            if *s != name {
                target.delete(&format!("{epoch:06}/{}", s.key())).await?;
                done.deleted += 1;
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(first: u64, last: u64, stamp: i64) -> (ObjectName, u64) {
        (
            ObjectName {
                kind: Kind::Segment,
                first,
                last,
                first_stamp: stamp,
                last_stamp: stamp,
            },
            100,
        )
    }

    #[test]
    fn test_plan_merges_old_continuous_runs_only() {
        let now = 1_000_000;
        let old = now - MIN_AGE_MS - 1;
        let segs = [
            seg(1, 5, old),
            seg(6, 9, old),
            seg(8, 12, old),  // overlaps (re-shipped after a failover): merged too
            seg(20, 25, old), // a hole before it: a new run, alone, left as is
            seg(26, 30, now), // too young
        ];
        let runs = plan(&segs, now);
        assert_eq!(runs.len(), 1);
        assert_eq!(
            runs[0]
                .iter()
                .map(|s| (s.first, s.last))
                .collect::<Vec<_>>(),
            [(1, 5), (6, 9), (8, 12)]
        );
    }
}
