//! Cluster format versions: what a binary speaks and stores, in one place.
//!
//! One integer names every format nodes share or keep. A binary supports every version up to
//! [`SUPPORTED`]; the cluster's *active* version is raised by a committed
//! `Command::ActivateVersion` entry once every member, learners included, supports it, and
//! never goes down. Until then a newer binary speaks the active version's formats exactly.
//!
//! | version | release | what it adds |
//! |---|---|---|
//! | 1 | v0.1.0 (commit 0b11d7a) | the formats below as that release wrote them |
//! | 2 | this tree | `Command::ActivateVersion` (the active version, with its migration); the `cairn-version` header on Raft RPCs; `format_version` in `raft.db`'s `meta`; `_cairn_migrations` in the replicated database; apply semantics: the write budget's page cap on user SQL (`db::sandbox::WRITE_BUDGET_BYTES`) and a dead-letter replay journaling the moved records for export; `Command::Members` (incarnations, `cairn recover`); `RegistryCommand::NameNode` (rqlite-style node names); device sessions: `RegistryCommand::OpenSession` and `Command::SessionBatches` with `_cairn_device_sessions` (created by the first session), a batch of a replaced session not stored; `ExportCommand::Capture` (export of changes to user tables) with `_cairn_change_capture` and `_cairn_change_journal` (created by the first one) and the apply semantics: a SQL entry journals the row changes of captured user tables (`db::changes`; SQLite built with `SQLITE_ENABLE_PREUPDATE_HOOK`); apply semantics: retention with `keep_unexported` trims the export journal once no destination is registered (the last one forgotten, `DELETE /export/NAME`); stream, `telemetry` and `dead_letter` tables created from then on compute the generated `time` and `received_at` with `datetime(..., 'subsec')` (`db::schema::TIME_COLUMNS`: the same text as version 1's `strftime`, at under half the insert cost; tables created before keep version 1's) |
//!
//! What each version covers:
//!
//! - **Log entry kinds**: the `Command` variants (postcard, variant = position; only ever
//!   appended). Every variant added after version 1 names its version in
//!   `Command::min_version` (the one gate: the leader proposes a kind only when the active
//!   version reaches it).
//! - **Raft RPC bodies**: openraft's `AppendEntriesRequest`, `VoteRequest`, their responses and
//!   the snapshot head `(Vote, SnapshotMeta)`, postcard, as version 1 (`raft::network`'s table;
//!   frozen by `gateway/tests/golden_v1.rs`). From version 2 every RPC request and response
//!   carries [`HEADER`] with the sender's [`SUPPORTED`]; a version 1 node sends none.
//! - **Snapshots**: the replicated database file itself, so its layout version is the active
//!   version recorded inside it (`_cairn_raft`, key `active_version`; absent = 1). A leader
//!   never sends a snapshot to a node that supports less.
//! - **Replicated database layout**: Cairn's `_cairn_*` tables. Changed only by the migration
//!   steps an `ActivateVersion` entry runs (same index on every replica, each step bounded);
//!   version 2 adds `_cairn_migrations(version, log_index)`.
//! - **Node-local files**: `raft.db` (tables `log`, `meta`) carries `format_version` in `meta`
//!   (absent = 1). Migrated on start in one SQLite transaction; a newer one is refused.
//! - **SQLite**: the bundled library ([`sqlite_version`]) is part of apply semantics; a
//!   release that bumps it bumps the format version.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// The highest cluster format version this binary supports.
pub const SUPPORTED: u32 = 2;

/// The version of a node, entry or file that says nothing: the v0.1.0 release.
pub const V1: u32 = 1;

/// The first version after v0.1.0 (this tree): what apply does differently once it is
/// active is listed in the table above.
pub const V2: u32 = 2;

/// The HTTP header on Raft RPCs (requests and responses) carrying the sender's [`SUPPORTED`].
pub const HEADER: &str = "cairn-version";

/// The bundled SQLite this binary applies entries with (`3.x.y`).
pub fn sqlite_version() -> &'static str {
    rusqlite::version()
}

/// The format version a [`HEADER`] value names; no header is a version 1 node.
pub fn from_header(value: Option<&[u8]>) -> u32 {
    value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(V1)
}

/// This node's view of versions: the cluster's active version (as applied here), what each
/// peer said it supports, and what stopped this node (an entry or RPC from a newer version).
#[derive(Debug)]
pub struct Versions {
    active: AtomicU32,
    peers: Mutex<BTreeMap<u64, u32>>,
    blocked: Mutex<Option<String>>,
}

impl Default for Versions {
    fn default() -> Self {
        Versions {
            active: AtomicU32::new(V1),
            peers: Mutex::default(),
            blocked: Mutex::default(),
        }
    }
}

impl Versions {
    /// The cluster's active version as this replica applied it.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Raises the active version (never lowers it).
    pub fn raise_active(&self, v: u32) {
        self.active.fetch_max(v, Ordering::Relaxed);
    }

    /// Sets the active version as a database says it (after an install or at open).
    pub fn set_active(&self, v: u32) {
        self.active.store(v, Ordering::Relaxed);
    }

    /// Notes what peer `id` said it supports.
    pub fn note_peer(&self, id: u64, supported: u32) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, supported);
    }

    /// What peer `id` last said it supports, if it said anything yet.
    pub fn peer(&self, id: u64) -> Option<u32> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(&id).copied()
    }

    /// Every peer's last reported version.
    pub fn peers(&self) -> BTreeMap<u64, u32> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The highest version every one of `members` (this node counts as [`SUPPORTED`]) is known
    /// to support; `None` while one of them has not reported.
    pub fn common(&self, me: u64, members: impl IntoIterator<Item = u64>) -> Option<u32> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        members
            .into_iter()
            .map(|id| {
                if id == me {
                    Some(SUPPORTED)
                } else {
                    peers.get(&id).copied()
                }
            })
            .try_fold(SUPPORTED, |acc, v| v.map(|v| acc.min(v)))
    }

    /// Records that this node met something it cannot apply (logged the first time).
    pub fn block(&self, why: String) {
        let mut b = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        if b.as_deref() != Some(why.as_str()) {
            tracing::error!("{why}");
        }
        *b = Some(why);
    }

    /// Clears a block (the node applied again).
    pub fn unblock(&self) {
        let mut b = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        if b.take().is_some() {
            tracing::info!("applying again");
        }
    }

    /// Why this node cannot go on, if it cannot.
    pub fn blocked(&self) -> Option<String> {
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `{"supported", "active", "sqlite", "peers", "blocked"}` for `/status`.
    pub fn to_json(&self) -> serde_json::Value {
        let peers: BTreeMap<String, u32> = self
            .peers()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        serde_json::json!({
            "supported": SUPPORTED,
            "active": self.active(),
            "sqlite": sqlite_version(),
            "peers": peers,
            "blocked": self.blocked(),
        })
    }
}

/// The message for something that needs a newer binary.
pub fn needs_newer(what: &str, needed: u32) -> String {
    format!(
        "{what} needs cluster format version {needed}; this binary (cairn {}) supports up to \
         {SUPPORTED}: this replica stops applying and keeps its data; upgrade its binary and \
         it resumes",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_common_version_waits_for_every_member() {
        let v = Versions::default();
        assert_eq!(v.common(1, [1]), Some(SUPPORTED));
        assert_eq!(v.common(1, [1, 2, 3]), None);
        v.note_peer(2, SUPPORTED);
        v.note_peer(3, V1);
        assert_eq!(v.common(1, [1, 2, 3]), Some(V1));
        v.note_peer(3, SUPPORTED + 1);
        assert_eq!(v.common(1, [1, 2, 3]), Some(SUPPORTED));
    }

    #[test]
    fn test_active_never_goes_down_by_raise() {
        let v = Versions::default();
        assert_eq!(v.active(), V1);
        v.raise_active(2);
        v.raise_active(1);
        assert_eq!(v.active(), 2);
    }

    #[test]
    fn test_header_parse() {
        assert_eq!(from_header(None), V1);
        assert_eq!(from_header(Some(b"2")), 2);
        assert_eq!(from_header(Some(b"junk")), V1);
    }
}
