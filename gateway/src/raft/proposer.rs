//! The proposer: the one way into the Raft log. SQL writes, device groups and registry
//! commands all come through here; membership changes go through openraft's own API
//! (`cluster::membership`).
//!
//! Writers put their command on a bounded queue. One task drains everything queued (up to
//! `write_batch_max`) and hands it to openraft in one `client_write_many` call, which appends
//! the whole batch with one log write, hence one fsync on every replica, and replicates it in
//! one AppendEntries round. It does not wait for that batch to commit before taking the next,
//! so batches pipeline; under load each batch is whatever arrived during the previous fsync.
//! Each command stays its own entry, so every request keeps its own transaction and result.
//!
//! Order: commands enter the log in the order [`Proposer::propose`] returned (one queue, one
//! draining task, `client_write_many` queues its entries in the Raft core before returning).
//! The device path relies on it to keep groups in order while several are in flight.
//!
//! A full queue makes `propose` wait: back-pressure instead of unbounded memory.
//!
//! Time: every command leaves here as [`Command::Stamped`] with the leader's wall clock,
//! never lower than the previous entry's stamp. "Previous" includes other leaders' entries:
//! the floor ([`Metrics::stamp_floor`]) is the highest stamp in this node's log (which, on
//! a leader, holds every committed entry) or applied database, so a leader change or a clock
//! step back never makes time in the log go back. Point-in-time restore relies on it.
//!
//! Device batches carry the time the receiving gateway read them (`received_at_ms`, its own
//! clock), which their records' times are counted back from. That clock may be any
//! gateway's, stepped back an hour or never synchronised: a receive time is raised to at
//! least the entry's stamp minus [`RECEIVE_SLACK_MS`] (the longest a batch is expected to
//! wait between its read and its proposal). So a device whose first batch a gateway with a
//! late clock reads is not stored in the past (the device's earlier records floor the later
//! ones, `command::device`). A receive time later than the stamp is kept: the batch's
//! records were taken before it, and only the receiving gateway knows how long before.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::{Raft, fatal, write_error};
use crate::command::{Command, CommandResponse};
use crate::error::Error;
use crate::metrics::Metrics;

struct Pending {
    cmd: Command,
    done: oneshot::Sender<Result<CommandResponse, Error>>,
}

/// A proposed command on its way: resolves once it is committed and applied (or refused).
pub struct Proposal(oneshot::Receiver<Result<CommandResponse, Error>>);

impl Proposal {
    /// Waits for the command's result.
    pub async fn applied(self) -> Result<CommandResponse, Error> {
        self.0
            .await
            .map_err(|_| Error::Fatal("write dropped by a stopping node".into()))?
    }
}

/// Handle to the queue; cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the draining task: at most `depth` commands wait, at most `max_batch` go to
    /// openraft in one call.
    pub fn start(raft: Raft, depth: usize, max_batch: usize, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(depth.max(1));
        tokio::spawn(drain(raft, rx, max_batch.max(1), metrics));
        Proposer { tx }
    }

    /// Queues `cmd` (waiting while the queue is full); its place in the log is fixed once this
    /// returns.
    pub async fn propose(&self, cmd: Command) -> Result<Proposal, Error> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Pending { cmd, done })
            .await
            .map_err(|_| Error::Fatal("write queue closed".into()))?;
        Ok(Proposal(rx))
    }

    /// Proposes `cmd` and waits until it is committed and applied (or refused).
    pub async fn submit(&self, cmd: Command) -> Result<CommandResponse, Error> {
        self.propose(cmd).await?.applied().await
    }
}

async fn drain(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        metrics.write_batches.fetch_add(1, Ordering::Relaxed);
        metrics
            .writes_proposed
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut clock = Stamps::new(&metrics.stamp_floor);
        let (cmds, waiters): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|p| (clock.stamp(p.cmd), p.done))
            .unzip();
        metrics.stamp_floor.fetch_max(clock.last, Ordering::Relaxed);
        match raft.client_write_many(cmds).await {
            Ok(mut results) => {
                // Answer this batch on its own task so the next batch can be proposed now.
                tokio::spawn(async move {
                    for done in waiters {
                        let r = match results.next().await {
                            Some(Ok(Ok(resp))) => Ok(resp.response),
                            Some(Ok(Err(e))) => Err(write_error(e)),
                            Some(Err(f)) => Err(fatal(f)),
                            None => Err(Error::Fatal("no result for write".into())),
                        };
                        let _ = done.send(r);
                    }
                });
            }
            Err(f) => {
                let e = fatal(f);
                for done in waiters {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// How far a device batch's receive time may lie before its entry's stamp (see the module
/// documentation); earlier receive times are raised to it.
pub const RECEIVE_SLACK_MS: i64 = 30_000;

/// Stamps one batch: each entry gets the wall clock (for SQL, the clock its rewrite read, so
/// that its `'now'` literals and the entry's stamp agree), raised to the previous entry's.
/// Device batches' receive times are raised to the stamp minus [`RECEIVE_SLACK_MS`].
struct Stamps {
    now: i64,
    last: i64,
}

impl Stamps {
    fn new(floor: &AtomicI64) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Stamps {
            now,
            last: floor.load(Ordering::Relaxed),
        }
    }

    fn stamp(&mut self, cmd: Command) -> Command {
        let own = match cmd.unstamped() {
            Command::SqlAt { stamp_ms, .. } => *stamp_ms,
            _ => self.now,
        };
        self.last = self.last.max(own);
        let mut cmd = cmd.stamped(self.last);
        if let Command::Stamped { cmd: inner, .. } = &mut cmd
            && let Command::DeviceBatches(batches) | Command::SessionBatches { batches, .. } =
                inner.as_mut()
        {
            let floor = self.last.saturating_sub(RECEIVE_SLACK_MS);
            for b in batches {
                b.received_at_ms = b.received_at_ms.max(floor);
            }
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stamp_never_below_floor() {
        let sql = |stamp_ms| Command::SqlAt {
            stamp_ms,
            sql: crate::command::sql::SqlCommand {
                statements: Vec::new(),
                transaction: false,
            },
        };
        let floor = AtomicI64::new(i64::MAX - 5);
        let mut s = Stamps::new(&floor);
        assert_eq!(s.stamp(sql(7)).entry_stamp_ms(), Some(i64::MAX - 5));
        let floor = AtomicI64::new(0);
        let mut s = Stamps::new(&floor);
        let a = s.stamp(sql(1_000)).entry_stamp_ms().unwrap();
        assert_eq!(a, 1_000, "SQL keeps the clock its rewrite read");
        let b = s.stamp(sql(500)).entry_stamp_ms().unwrap();
        assert_eq!(b, 1_000, "never below the previous entry");
        let c = s
            .stamp(Command::DeviceBatches(Vec::new()))
            .entry_stamp_ms()
            .unwrap();
        assert!(c > 1_700_000_000_000);
        // A batch read by a gateway whose clock is an hour late is raised to the stamp minus
        // the slack; one read within the slack keeps its time.
        let batch = |received_at_ms| crate::command::device::DeviceBatch {
            device_id: 7,
            received_at_ms,
            body: Vec::new(),
            session: 0,
        };
        let floor = AtomicI64::new(0);
        let mut s = Stamps::new(&floor);
        let now = s.now;
        let stamped = s.stamp(Command::DeviceBatches(vec![
            batch(now - 3_600_000),
            batch(now - 1_000),
            batch(now + 5_000),
        ]));
        let Command::DeviceBatches(b) = stamped.unstamped() else {
            panic!("not a device entry: {stamped}");
        };
        let times: Vec<i64> = b.iter().map(|b| b.received_at_ms).collect();
        assert_eq!(
            times,
            [now - RECEIVE_SLACK_MS, now - 1_000, now + 5_000],
            "stamp {now}"
        );
        // Stamping again replaces the stamp instead of nesting.
        let again = s.stamp(Command::DeviceBatches(Vec::new()).stamped(3));
        assert!(
            matches!(again, Command::Stamped { ref cmd, .. } if !matches!(**cmd, Command::Stamped { .. }))
        );
    }
}
