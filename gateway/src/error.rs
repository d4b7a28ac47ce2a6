//! The gateway's one error type: why a write, a read or a membership change did not happen.
//!
//! Every layer from the proposer up returns [`Error`]; the edges map it once each: the HTTP API
//! to a status (`http::status_of`), the device port to a protocol error code
//! (`ingress::code_of`). It also travels between nodes (a follower's forwarded device batches
//! come back as `Result<_, Error>` in postcard), so variants are only ever appended.

use serde::{Deserialize, Serialize};

/// Why an operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    /// This node does not lead (the leader's id, if known); nothing was proposed.
    #[error("not leader")]
    NotLeader(Option<u64>),
    /// No leader is known (an election is on, or this node is cut off).
    #[error("leader not found")]
    NoLeader,
    /// The leader changed while the write was in flight: it may or may not have been applied,
    /// so it is not retried for the client.
    #[error("leader changed while the write was in flight; it may or may not have been applied")]
    LeaderChanged,
    /// A bounded queue on the way is full.
    #[error("overloaded")]
    Overloaded,
    /// The request is wrong (bad body, a statement refused before it is proposed).
    #[error("{0}")]
    BadRequest(String),
    /// What the request names does not exist (a member to remove).
    #[error("{0}")]
    NotFound(String),
    /// The cluster cannot serve it now: leadership not confirmed, the leader unreachable, a
    /// membership change refused. Worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// Raft stopped or its storage failed: this node is dead.
    #[error("raft failure: {0}")]
    Fatal(String),
    /// A local failure outside Raft (reading the database, a task that panicked).
    #[error("{0}")]
    Storage(String),
    /// The caller lacks a permission this particular request needs (known only once its body
    /// was read, like a `/db/load` of a Cairn backup, which restores the device registry).
    #[error("{0}")]
    Forbidden(String),
}

impl Error {
    /// True when the operation can be sent to (or retried at) the leader: nothing was done.
    pub fn is_not_leader(&self) -> bool {
        matches!(self, Error::NotLeader(_) | Error::NoLeader)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Storage(e.to_string())
    }
}
