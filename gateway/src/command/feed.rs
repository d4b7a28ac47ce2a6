//! The feed of committed device records: every device batch this replica stores is published,
//! after its entry commits, to whoever subscribed (the embedding API's
//! `Node::subscribe`).
//!
//! - Nothing is done for a batch unless someone subscribes: [`Feed::wanted`] is checked once
//!   per applied entry, and only then are the newly stored records noted.
//! - Publishing never waits: the feed is a bounded [`tokio::sync::broadcast`] channel. A
//!   subscriber that falls more than the capacity behind loses the oldest batches and is told
//!   so ([`FeedError::Lagged`]) before it gets the next one.
//! - Exactly once per replica: a batch is published when the entry that stored it commits, with
//!   only the records that entry stored (a resent batch that was already stored publishes
//!   nothing; one that overlaps publishes the records above the old high-water). Records that
//!   reach this replica inside a snapshot are not published one by one: the subscriber gets
//!   [`FeedError::SnapshotInstalled`] instead.
//!
//! The feed also tells the device path whose keys changed ([`Feed::registry_changes`]): after
//! every committed entry that changes a device's keys (the device's id) and every installed
//! snapshot or restored backup (`None`: anyone's), so open device sessions recheck their key
//! (revocation, rotation) on every replica as soon as it applies.

use std::sync::{Arc, Mutex};

use cairn_protocol::{BatchView, RecordView, Values};
use tokio::sync::broadcast;

use super::device::{DeviceBatch, record_time_ms};

/// The records one log entry stored for one device, in seq order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedBatch {
    /// The Raft log index of the entry that stored them (increasing along the feed).
    pub log_index: u64,
    pub device_id: u64,
    /// Unix ms on the receiving gateway's clock when the frame was read.
    pub received_at_ms: i64,
    /// The first seq this entry stored; the batch's records below it were stored before.
    pub from_seq: u64,
    /// The batch body as the device sent it (validated before it was proposed).
    body: Vec<u8>,
}

/// One stored record of a [`CommittedBatch`].
#[derive(Debug, Clone, Copy)]
pub struct CommittedRecord<'a> {
    pub device_id: u64,
    pub seq: u64,
    pub stream: u16,
    /// The record's time as stored in its table's `time` column, in Unix ms.
    pub time_ms: i64,
    view: RecordView<'a>,
}

impl<'a> CommittedRecord<'a> {
    /// The record's values, borrowed from the batch.
    pub fn values(&self) -> Values<'a> {
        self.view.values()
    }
}

impl CommittedBatch {
    /// The stored records in seq order.
    pub fn records(&self) -> impl Iterator<Item = CommittedRecord<'_>> {
        // Bodies are validated before they are proposed, so both parses succeed.
        let view = BatchView::parse(&self.body).ok();
        let sent = view.map(|v| v.header().sent_uptime_ms).unwrap_or(0);
        view.into_iter()
            .flat_map(|v| v.records())
            .filter_map(Result::ok)
            .filter(move |r| r.seq >= self.from_seq)
            .map(move |r| CommittedRecord {
                device_id: self.device_id,
                seq: r.seq,
                stream: r.stream,
                time_ms: record_time_ms(self.received_at_ms, sent, r.uptime_ms),
                view: r,
            })
    }
}

#[derive(Debug, Clone)]
enum Item {
    Batch(Arc<CommittedBatch>),
    Snapshot(u64),
}

/// Why [`Subscription::recv`] returned no batch. After `Lagged` and `SnapshotInstalled` the
/// subscription goes on with the next batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// The subscriber fell behind by more than the feed's capacity; this many batches were
    /// dropped for it (read the tables to catch up).
    #[error("subscriber fell behind: {0} committed device batches were dropped")]
    Lagged(u64),
    /// A snapshot replaced this replica's database up to this log index; the records it
    /// brought were not published one by one (read the tables to catch up).
    #[error("a snapshot up to log index {0} was installed; its records were not published")]
    SnapshotInstalled(u64),
    /// The node stopped.
    #[error("the node stopped")]
    Closed,
}

/// Key changes kept for device sessions that have not looked yet; beyond, they recheck all.
const REGISTRY_CHANGES: usize = 1024;

/// One replica's feed: the state machine publishes, subscribers receive.
pub struct Feed {
    tx: broadcast::Sender<Item>,
    /// Batches stored by the entry being applied, published when it commits.
    staged: Mutex<Vec<CommittedBatch>>,
    /// Devices whose keys the entry being applied changes (`None`: anyone's).
    registry_staged: Mutex<Vec<Option<u64>>>,
    /// Committed key changes (see [`Feed::registry_changes`]).
    registry: broadcast::Sender<Option<u64>>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed::new(crate::config::DEFAULT_FEED_CAPACITY)
    }
}

impl Feed {
    /// A feed keeping up to `capacity` batches for slow subscribers (at least 1).
    pub fn new(capacity: usize) -> Self {
        Feed {
            tx: broadcast::channel(capacity.max(1)).0,
            staged: Mutex::new(Vec::new()),
            registry_staged: Mutex::new(Vec::new()),
            registry: broadcast::channel(REGISTRY_CHANGES).0,
        }
    }

    /// Notes that the entry being applied changes the keys of `device` (`None`: anyone's).
    pub fn stage_registry_change(&self, device: Option<u64>) {
        self.registry_staged
            .lock()
            .expect("feed mutex")
            .push(device);
    }

    /// Whose keys changed, as this replica commits it: a device id, or `None` for anyone's (a
    /// snapshot, a restored backup). A receiver that lags gets `Lagged`: recheck everything.
    pub fn registry_changes(&self) -> broadcast::Receiver<Option<u64>> {
        self.registry.subscribe()
    }

    fn registry_changed(&self, device: Option<u64>) {
        // An error only means no device session is open.
        let _ = self.registry.send(device);
    }

    /// A new subscriber, receiving what commits from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
        }
    }

    /// True when someone subscribes (apply notes stored records only then).
    pub fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Notes that the entry being applied stores `batch` from `from_seq` on.
    pub fn stage(&self, batch: &DeviceBatch, from_seq: u64) {
        self.staged
            .lock()
            .expect("feed mutex")
            .push(CommittedBatch {
                log_index: 0,
                device_id: batch.device_id,
                received_at_ms: batch.received_at_ms,
                from_seq,
                body: batch.body.clone(),
            });
    }

    /// Forgets what an entry staged: call before applying it, so an attempt that was rolled
    /// back (a held storage error, then a retry) never publishes its records twice.
    pub fn discard_staged(&self) {
        self.staged.lock().expect("feed mutex").clear();
        self.registry_staged.lock().expect("feed mutex").clear();
    }

    /// Publishes what the entry at `log_index` staged; call after it committed.
    pub fn publish(&self, log_index: u64) {
        let staged = std::mem::take(&mut *self.staged.lock().expect("feed mutex"));
        for mut b in staged {
            b.log_index = log_index;
            // An error only means every subscriber left meanwhile.
            let _ = self.tx.send(Item::Batch(Arc::new(b)));
        }
        let changed = std::mem::take(&mut *self.registry_staged.lock().expect("feed mutex"));
        for device in changed {
            self.registry_changed(device);
        }
    }

    /// Device entries applied in one transaction (`raft::state_machine`): marks what was
    /// staged since the last mark as the entry at `log_index`'s.
    pub fn seal(&self, log_index: u64) {
        for b in self.staged.lock().expect("feed mutex").iter_mut() {
            if b.log_index == 0 {
                b.log_index = log_index;
            }
        }
    }

    /// Forgets what was staged since the last [`Feed::seal`] (an entry rolled back to its
    /// savepoint).
    pub fn discard_unsealed(&self) {
        self.staged
            .lock()
            .expect("feed mutex")
            .retain(|b| b.log_index != 0);
    }

    /// Publishes every sealed batch under its own entry's index; call after the group's
    /// transaction committed.
    pub fn publish_sealed(&self) {
        let staged = std::mem::take(&mut *self.staged.lock().expect("feed mutex"));
        for b in staged {
            let _ = self.tx.send(Item::Batch(Arc::new(b)));
        }
        let changed = std::mem::take(&mut *self.registry_staged.lock().expect("feed mutex"));
        for device in changed {
            self.registry_changed(device);
        }
    }

    /// Tells subscribers that a snapshot up to `log_index` replaced the database.
    pub fn snapshot_installed(&self, log_index: u64) {
        self.registry_changed(None);
        if self.wanted() {
            let _ = self.tx.send(Item::Snapshot(log_index));
        }
    }
}

/// A subscriber's end of the [`Feed`].
pub struct Subscription {
    rx: broadcast::Receiver<Item>,
}

impl Subscription {
    /// The next committed batch, waiting for it.
    pub async fn recv(&mut self) -> Result<Arc<CommittedBatch>, FeedError> {
        match self.rx.recv().await {
            Ok(Item::Batch(b)) => Ok(b),
            Ok(Item::Snapshot(i)) => Err(FeedError::SnapshotInstalled(i)),
            Err(broadcast::error::RecvError::Lagged(n)) => Err(FeedError::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => Err(FeedError::Closed),
        }
    }

    /// The subscription as a stream; it ends when the node stops.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<Arc<CommittedBatch>, FeedError>> {
        futures_util::stream::unfold(self, |mut s| async move {
            match s.recv().await {
                Err(FeedError::Closed) => None,
                r => Some((r, s)),
            }
        })
    }
}
