//! Grouping device batches into few large commits: the leader's path into Raft, and the same
//! machinery on a follower for forwarding to the leader.
//!
//! Connections [`GroupQueue::try_submit`] batches into a bounded queue (full: the device gets
//! `Overloaded`). One task takes them out in arrival order and hands groups to a
//! [`GroupSink`]:
//!
//! - when nothing is in flight, a group goes out at once (no added latency at low load);
//! - while groups are in flight, arrivals gather for at most `linger` or until the group
//!   reaches `max_bytes`, then go out as soon as an in-flight slot is free (at most
//!   `max_in_flight`), so under load each Raft entry carries many devices' batches.
//!
//! [`GroupSink::start`] is called in group order and must fix the order of the groups (the
//! Raft sink appends the entry before returning); its returned future delivers the outcomes,
//! one per batch, which are handed back to each submitter.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::command::device::{BatchOutcome, DeviceBatch};
use crate::error::Error;
use crate::metrics::Metrics;

/// The outcomes of one submission, in batch order.
pub type Outcomes = Result<Vec<BatchOutcome>, Error>;

/// A group on its way: resolves to one outcome per batch once committed (or failed).
pub struct Commit(pub BoxFuture<'static, Outcomes>);

/// Where groups go: the proposer on the leader, the leader's internal listener on a follower.
pub trait GroupSink: Send + 'static {
    /// Starts committing `batches` as one unit. Calls come one at a time in group order, and
    /// the order of their effects must follow the order of the calls.
    fn start(&mut self, batches: Vec<DeviceBatch>) -> BoxFuture<'_, Commit>;

    /// Called when the queue has been idle for a while (the leader sink uses it to install
    /// the stream tables right after an election).
    fn idle(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Sizes of a [`GroupQueue`].
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    /// Submissions waiting in the queue.
    pub queue_depth: usize,
    /// Body bytes in one group.
    pub max_bytes: usize,
    /// Longest wait for more batches while a group is in flight.
    pub linger: Duration,
    /// Groups started but not finished.
    pub max_in_flight: usize,
}

impl Default for GroupLimits {
    fn default() -> Self {
        GroupLimits {
            queue_depth: 4096,
            max_bytes: 1 << 20,
            linger: Duration::from_millis(2),
            max_in_flight: 8,
        }
    }
}

struct Submission {
    batches: Vec<DeviceBatch>,
    bytes: usize,
    reply: oneshot::Sender<Outcomes>,
}

/// Batches per device queued or in flight: a Welcome waits for a device's to be decided.
type Pending = Arc<Mutex<HashMap<u64, u32>>>;

/// The sending side of a group queue.
#[derive(Clone)]
pub struct GroupQueue {
    tx: mpsc::Sender<Submission>,
    pending: Pending,
}

impl GroupQueue {
    /// Starts the grouping task in front of `sink`.
    pub fn spawn(sink: impl GroupSink, limits: GroupLimits, metrics: Arc<Metrics>) -> GroupQueue {
        let (tx, rx) = mpsc::channel(limits.queue_depth.max(1));
        let pending = Pending::default();
        tokio::spawn(run(rx, sink, limits, pending.clone(), metrics));
        GroupQueue { tx, pending }
    }

    /// Queues `batches` (kept together, in order); `Overloaded` if the queue is full.
    pub fn try_submit(
        &self,
        batches: Vec<DeviceBatch>,
    ) -> Result<oneshot::Receiver<Outcomes>, Error> {
        let (reply, rx) = oneshot::channel();
        let bytes = batches.iter().map(|b| b.body.len() + 24).sum();
        let devices: Vec<u64> = batches.iter().map(|b| b.device_id).collect();
        // Counted before sending so the completion can never run before the increment.
        add_pending(&self.pending, &devices, true);
        self.tx
            .try_send(Submission {
                batches,
                bytes,
                reply,
            })
            .map_err(|e| {
                add_pending(&self.pending, &devices, false);
                match e {
                    mpsc::error::TrySendError::Full(_) => Error::Overloaded,
                    mpsc::error::TrySendError::Closed(_) => closed(),
                }
            })?;
        Ok(rx)
    }

    /// Queues `batches` and waits for their outcomes (used for forwarded groups).
    pub async fn submit(&self, batches: Vec<DeviceBatch>) -> Outcomes {
        match self.try_submit(batches) {
            Ok(rx) => rx.await.unwrap_or_else(|_| Err(closed())),
            Err(e) => Err(e),
        }
    }

    /// Waits (up to `timeout`) until no batch of `device_id` is queued or in flight here;
    /// false on timeout.
    pub async fn settled(&self, device_id: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self
                .pending
                .lock()
                .expect("pending")
                .contains_key(&device_id)
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Free room in the queue, in submissions (scales the credit given to devices).
    pub fn free_slots(&self) -> usize {
        self.tx.capacity()
    }
}

/// The queue's task is gone: the node is stopping.
pub fn closed() -> Error {
    Error::Fatal("the device queue stopped".into())
}

fn add_pending(pending: &Pending, devices: &[u64], add: bool) {
    let mut p = pending.lock().expect("pending");
    for d in devices {
        let n = p.entry(*d).or_insert(0);
        if add {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                p.remove(d);
            }
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Submission>,
    mut sink: impl GroupSink,
    limits: GroupLimits,
    pending: Pending,
    metrics: Arc<Metrics>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    loop {
        let first = tokio::select! {
            s = rx.recv() => match s {
                Some(s) => s,
                None => return,
            },
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                sink.idle().await;
                continue;
            }
        };
        let deadline = tokio::time::Instant::now() + limits.linger;
        let mut bytes = first.bytes;
        let mut group = vec![first];
        let busy = slots.available_permits() < limits.max_in_flight.max(1);
        // Gather while a group is in flight: bounded by size and by `linger`.
        if busy {
            while bytes < limits.max_bytes {
                tokio::select! {
                    s = rx.recv() => match s {
                        Some(s) => {
                            bytes += s.bytes;
                            group.push(s);
                        }
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        // Wait for a slot, still taking what arrives (up to the size bound).
        let permit = loop {
            if bytes >= limits.max_bytes {
                break slots.clone().acquire_owned().await;
            }
            tokio::select! {
                biased;
                p = slots.clone().acquire_owned() => break p,
                s = rx.recv() => match s {
                    Some(s) => {
                        bytes += s.bytes;
                        group.push(s);
                    }
                    None => break slots.clone().acquire_owned().await,
                },
            }
        };
        let Ok(permit) = permit else { return };
        let mut counts = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        let mut batches = Vec::new();
        let mut devices = Vec::new();
        for s in group {
            counts.push(s.batches.len());
            replies.push(s.reply);
            devices.extend(s.batches.iter().map(|b| b.device_id));
            batches.extend(s.batches);
        }
        let n = batches.len() as u64;
        metrics.groups_proposed.fetch_add(1, Relaxed);
        metrics.group_batches.fetch_add(n, Relaxed);
        metrics.group_batches_max.fetch_max(n, Relaxed);
        metrics.group_bytes.fetch_add(bytes as u64, Relaxed);
        let started = Instant::now();
        let done = sink.start(batches).await;
        let pending = pending.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let result = done.0.await;
            metrics.commit_latency.record(started.elapsed());
            drop(permit);
            add_pending(&pending, &devices, false);
            match result {
                Ok(outcomes) if outcomes.len() as u64 == n => {
                    let mut rest = outcomes.into_iter();
                    for (count, reply) in counts.into_iter().zip(replies) {
                        let _ = reply.send(Ok(rest.by_ref().take(count).collect()));
                    }
                }
                Ok(outcomes) => {
                    tracing::error!(expected = n, got = outcomes.len(), "outcome count mismatch");
                    for reply in replies {
                        let _ = reply.send(Err(Error::Storage("outcome count mismatch".into())));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records the groups it sees and answers `Applied` for each batch.
    struct Recorder(Arc<Mutex<Vec<usize>>>, Duration);

    impl GroupSink for Recorder {
        fn start(&mut self, batches: Vec<DeviceBatch>) -> BoxFuture<'_, Commit> {
            self.0.lock().unwrap().push(batches.len());
            let delay = self.1;
            Box::pin(async move {
                Commit(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    Ok(batches
                        .iter()
                        .map(|b| BatchOutcome::Applied {
                            through_seq: b.device_id,
                        })
                        .collect())
                }))
            })
        }
    }

    fn batch(id: u64) -> DeviceBatch {
        DeviceBatch {
            device_id: id,
            received_at_ms: 0,
            body: vec![0; 100],
            session: 0,
        }
    }

    #[tokio::test]
    async fn test_groups_under_load_and_routes_outcomes() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let q = GroupQueue::spawn(
            Recorder(seen.clone(), Duration::from_millis(20)),
            GroupLimits {
                max_in_flight: 1,
                ..GroupLimits::default()
            },
            Arc::default(),
        );
        let mut rxs = Vec::new();
        for i in 0..50u64 {
            rxs.push((i, q.try_submit(vec![batch(i)]).unwrap()));
        }
        for (i, rx) in rxs {
            assert_eq!(
                rx.await.unwrap().unwrap(),
                vec![BatchOutcome::Applied { through_seq: i }]
            );
        }
        let groups = seen.lock().unwrap().clone();
        assert_eq!(groups.iter().sum::<usize>(), 50);
        assert!(groups.len() < 50, "no grouping: {groups:?}");
    }

    #[tokio::test]
    async fn test_full_queue_is_overloaded() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let q = GroupQueue::spawn(
            Recorder(seen, Duration::from_secs(5)),
            GroupLimits {
                queue_depth: 2,
                max_in_flight: 1,
                max_bytes: 1,
                ..GroupLimits::default()
            },
            Arc::default(),
        );
        let mut held = Vec::new();
        let mut overloaded = false;
        for i in 0..10 {
            match q.try_submit(vec![batch(i)]) {
                Ok(rx) => held.push(rx),
                Err(e) => {
                    assert_eq!(e, Error::Overloaded);
                    overloaded = true;
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        assert!(overloaded);
    }
}
