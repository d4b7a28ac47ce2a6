//! The openraft type configuration shared by every part of the gateway.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse};

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
pub type Raft = openraft::Raft<TypeConfig, crate::state_machine::StateMachine>;

/// `io::Error` from anything displayable, for the storage traits' error type.
pub fn io_err(e: impl fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Confirms this node still leads (a ReadIndex round: a quorum answered a heartbeat sent
/// after the call), as `ensure_linearizable(ReadIndex)`. Under load a round can expire
/// before a quorum answers (`QuorumNotEnough`) although nothing is wrong: it is tried again
/// for up to 3 s while this node still leads. Other errors (`ForwardToLeader`, shutdown)
/// come back at once.
pub async fn confirm_leadership(
    raft: &Raft,
) -> Result<
    openraft::raft::linearizable_read::ReadLogId<TypeConfig>,
    openraft::errors::RaftError<TypeConfig, openraft::errors::LinearizableReadError<TypeConfig>>,
> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
        {
            Err(openraft::errors::RaftError::APIError(
                openraft::errors::LinearizableReadError::QuorumNotEnough(_),
            )) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            r => return r,
        }
    }
}
