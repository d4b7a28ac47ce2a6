//! The leader's end of the group queue: one group becomes one Raft entry
//! ([`Command::DeviceBatches`]) through the service layer's proposer, and the stream tables are
//! (re)defined at the start of every term this node leads, before its first group, with this
//! node's configured definitions (`cluster::streams`).

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::batcher::{Commit, GroupSink};
use crate::cluster::Cluster;
use crate::command::device::DeviceBatch;
use crate::command::streams::StreamsCommand;
use crate::command::{Command, CommandResponse};
use crate::error::Error;

/// Proposes groups through the node's proposer.
pub struct ProposeSink {
    cluster: Arc<Cluster>,
    /// The term in which this node last proposed the stream definitions.
    defined_term: Option<u64>,
}

impl ProposeSink {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        ProposeSink {
            cluster,
            defined_term: None,
        }
    }

    /// Proposes the stream definitions once per term this node leads and waits for them to
    /// be applied, so the term's device batches always find their tables. Proposed from the
    /// grouping task, so it is in the log ahead of the term's device batches. False if they
    /// could not be committed (the group is then refused with NotLeader and retried by the
    /// devices; the next group proposes the definitions again).
    async fn define_streams(&mut self) -> bool {
        if !self.cluster.is_leader() {
            return false;
        }
        let term = self.cluster.raft_metrics().current_term;
        if self.defined_term == Some(term) {
            return true;
        }
        self.await_activation().await;
        let cmd = Command::Streams(StreamsCommand::Define(self.cluster.streams().schema()));
        let Ok(proposal) = self.cluster.propose(cmd).await else {
            return false;
        };
        // Bounded: without a quorum the write may never finish; the next group tries again.
        match tokio::time::timeout(std::time::Duration::from_secs(5), proposal.applied()).await {
            Ok(Ok(_)) => {
                tracing::info!(term, "stream tables defined");
                self.defined_term = Some(term);
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "defining stream tables");
                false
            }
            Err(_) => {
                tracing::warn!("defining stream tables: not committed within 5 s");
                false
            }
        }
    }

    /// In a new cluster (or one whose last member was just upgraded) the leader raises the
    /// active format version within a tenth of a second (`cluster::version`): stream tables created
    /// after that get the newer layout (`db::schema::time_columns`), so the definitions wait
    /// for it, at most [`ACTIVATION_WAIT`]. A cluster with a member on an older release, or
    /// one that has not answered yet, does not wait.
    async fn await_activation(&self) {
        let until = tokio::time::Instant::now() + ACTIVATION_WAIT;
        while self
            .cluster
            .members_support()
            .is_some_and(|v| v > self.cluster.metrics().versions.active())
            && tokio::time::Instant::now() < until
            && self.cluster.is_leader()
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// How long the first definitions of a term wait for the active version to be raised.
const ACTIVATION_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl GroupSink for ProposeSink {
    fn start(&mut self, batches: Vec<DeviceBatch>) -> BoxFuture<'_, Commit> {
        Box::pin(async move {
            if !self.define_streams().await {
                return Commit(Box::pin(async { Err(Error::NotLeader(None)) }));
            }
            // With format version 2 active, each batch carries its session (a batch of a
            // replaced session is not stored); before, as version 1 wrote them.
            let cmd = if self.cluster.metrics().versions.active() >= crate::version::V2 {
                Command::SessionBatches {
                    sessions: batches.iter().map(|b| b.session).collect(),
                    batches,
                }
            } else {
                Command::DeviceBatches(batches)
            };
            let proposed = self.cluster.propose(cmd).await;
            Commit(Box::pin(async move {
                match proposed?.applied().await {
                    Ok(CommandResponse::DeviceBatches(outcomes)) => Ok(outcomes),
                    Ok(other) => Err(Error::Storage(format!("unexpected response {other:?}"))),
                    Err(e) => {
                        if e.is_not_leader() || e == Error::LeaderChanged {
                            tracing::info!(error = %e, "device batches not committed");
                        } else {
                            tracing::warn!(error = %e, "proposing device batches");
                        }
                        Err(e)
                    }
                }
            }))
        })
    }

    fn idle(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            self.define_streams().await;
        })
    }
}
