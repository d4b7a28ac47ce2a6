//! The leader's end of the group queue: one group becomes one Raft entry
//! ([`Command::DeviceBatches`]), and the stream tables are (re)defined at the start of every
//! term this node leads, before its first group.

use futures_util::future::BoxFuture;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::ClientWriteError;
use openraft::impls::ProgressResponder;

use super::apply::DeviceBatch;
use super::batcher::{Commit, GroupSink, IngestError};
use crate::command::{Command, CommandResponse};
use crate::raft_types::Raft;
use crate::registry::RegistryCommand;
use crate::schema::Schema;

/// Proposes groups to the local Raft.
pub struct RaftSink {
    raft: Raft,
    schema: Schema,
    /// The term in which this node last proposed the stream definitions.
    defined_term: Option<u64>,
}

impl RaftSink {
    pub fn new(raft: Raft, schema: Schema) -> Self {
        RaftSink {
            raft,
            schema,
            defined_term: None,
        }
    }

    /// Proposes the stream definitions once per term this node leads and waits for them to
    /// be applied, so the term's device batches always find their tables. Proposed from the
    /// grouping task, so it is in the log ahead of the term's device batches. False if they
    /// could not be committed (the group is then refused with NotLeader and retried by the
    /// devices; the next group proposes the definitions again).
    async fn define_streams(&mut self) -> bool {
        let term = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            if m.current_leader != Some(m.id) {
                return false;
            }
            m.current_term
        };
        if self.defined_term == Some(term) {
            return true;
        }
        let cmd = Command::DeviceRegistry(RegistryCommand::DefineStreams(self.schema.clone()));
        let (responder, rx) = ProgressResponder::complete_only();
        if self.raft.write(cmd).responder(responder).await.is_err() {
            return false;
        }
        // Bounded: without a quorum the write may never finish; the next group tries again.
        match tokio::time::timeout(std::time::Duration::from_secs(5), rx).await {
            Ok(Ok(Ok(r))) => {
                tracing::info!(log_id = %r.log_id, "stream tables defined");
                self.defined_term = Some(term);
                true
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "defining stream tables");
                false
            }
            Ok(Err(_)) => false,
            Err(_) => {
                tracing::warn!("defining stream tables: not committed within 5 s");
                false
            }
        }
    }
}

impl GroupSink for RaftSink {
    fn start(&mut self, batches: Vec<DeviceBatch>) -> BoxFuture<'_, Commit> {
        Box::pin(async move {
            if !self.define_streams().await {
                return Commit(Box::pin(async { Err(IngestError::NotLeader) }));
            }
            let (responder, rx) = ProgressResponder::complete_only();
            let sent = self
                .raft
                .write(Command::DeviceBatches(batches))
                .responder(responder)
                .await;
            Commit(Box::pin(async move {
                if sent.is_err() {
                    return Err(IngestError::Internal);
                }
                match rx.await {
                    Ok(Ok(resp)) => match resp.data {
                        CommandResponse::DeviceBatches(outcomes) => Ok(outcomes),
                        _ => Err(IngestError::Internal),
                    },
                    Ok(Err(
                        e @ (ClientWriteError::ForwardToLeader(_)
                        | ClientWriteError::LogEntryDiscarded(_)),
                    )) => {
                        tracing::info!(error = %e, "device batches not committed");
                        Err(IngestError::NotLeader)
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "proposing device batches");
                        Err(IngestError::Internal)
                    }
                    Err(_) => Err(IngestError::Internal),
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
