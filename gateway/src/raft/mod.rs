//! Raft: openraft's type configuration, the log store, the state machine and its snapshots,
//! both halves of the RPC transport, and the one proposer every write goes through.
//!
//! - [`log_store`]: the log, the vote and the committed id in their own SQLite file.
//! - [`state_machine`]: applying entries to the replicated database; snapshots.
//! - [`network`]: Raft RPCs between gateways, client and server, plus the pooled HTTP client.
//! - [`proposer`]: the bounded, pipelined queue in front of `client_write_many`.

pub mod log_store;
pub mod network;
pub mod proposer;
pub mod state_machine;

use std::fmt;

use openraft::errors::{ClientWriteError, Fatal, LinearizableReadError, RaftError};
use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse};
use crate::error::Error;

/// A gateway as Raft membership records it: where to reach its Raft RPCs and its HTTP API.
///
/// The HTTP address is kept in the membership so that any node can forward a write to the
/// leader's API without a separate lookup.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Peer {
    /// `host:port` of the Raft transport (`--raft-addr`).
    pub raft_addr: String,
    /// `host:port` of the HTTP API (`--http-addr`).
    pub http_addr: String,
    /// `host:port` of the device port (`--device-addr`), sent to devices as the leader hint.
    #[serde(default)]
    pub device_addr: String,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} http={}", self.raft_addr, self.http_addr)
    }
}

openraft::declare_raft_types!(
    /// Cairn's Raft types: `u64` node ids, [`Peer`] addresses, [`Command`] entries.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        Node = Peer,
);

pub type NodeId = u64;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachine>;

/// `io::Error` from anything displayable, for the storage traits' error type.
pub fn io_err(e: impl fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Ends the process after an I/O error on a storage write (`db::failure::Failure::Exit`):
/// after a failed fsync Linux may drop the dirty pages and a later fsync reports success, so
/// the write is never tried again. The node restarts (systemd) and recovers from what was
/// durable: the fsync'd Raft log, and the database that openraft re-applies from it.
pub fn exit_on_io_error(what: &str, e: &rusqlite::Error) -> ! {
    let msg = crate::db::failure::describe(e);
    tracing::error!(
        "FATAL: {what}: I/O error: {msg}; exiting so that the node restarts from what is durable"
    );
    eprintln!("FATAL: {what}: I/O error: {msg}");
    std::process::exit(74)
}

/// The error openraft gets for a corrupt database file: the node stops with it.
pub fn corrupt(what: &str, e: &rusqlite::Error) -> std::io::Error {
    io_err(format!(
        "{what}: the database file is corrupt ({}): this replica stops; repair it from the \
         leader (move the data dir away and rejoin, which installs a snapshot)",
        crate::db::failure::describe(e)
    ))
}

/// Confirms this node still leads (a ReadIndex round: a quorum answered a heartbeat sent
/// after the call), as `ensure_linearizable(ReadIndex)`. Under load a round can expire
/// before a quorum answers (`QuorumNotEnough`) although nothing is wrong: it is tried again
/// for up to 3 s while this node still leads. Other errors (`ForwardToLeader`, shutdown)
/// come back at once.
pub async fn confirm_leadership(raft: &Raft) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
        {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_)))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                return Err(Error::NotLeader(f.leader_id));
            }
            Err(e) => return Err(Error::Unavailable(e.to_string())),
        }
    }
}

/// A refused write as the gateway's [`Error`].
pub fn write_error(e: ClientWriteError<TypeConfig>) -> Error {
    match e {
        ClientWriteError::ForwardToLeader(f) => Error::NotLeader(f.leader_id),
        // Not retried for the client: the entry may have committed.
        ClientWriteError::LogEntryDiscarded(_) => Error::LeaderChanged,
        other => Error::Unavailable(other.to_string()),
    }
}

/// A Raft call refused or failed, as the gateway's [`Error`].
pub fn raft_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Error {
    match e {
        RaftError::APIError(e) => write_error(e),
        RaftError::Fatal(f) => fatal(f),
    }
}

/// Raft stopped: this node is dead.
pub fn fatal(f: Fatal<TypeConfig>) -> Error {
    Error::Fatal(f.to_string())
}
