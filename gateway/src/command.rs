//! The Raft log command: what one entry asks every replica to do.
//!
//! # Extension point
//!
//! Every command kind is one variant of [`Command`] with its payload type and its apply
//! function in a module of its own (`sql.rs` for [`Command::Sql`]). [`apply`] is the only
//! place that dispatches on the variant. To add a command (for example the ingress session's
//! `DeviceBatches(..)` and `DeviceRegistry(..)`):
//!
//! 1. put the payload type and `fn apply_xxx(conn: &Connection, ctx: &ApplyContext, cmd: &Xxx)
//!    -> CommandResponse` in a new module;
//! 2. add a variant here, an arm to [`apply`] and, if it answers something new, a variant to
//!    [`CommandResponse`];
//! 3. propose it with `GroupCommit::submit(Command::Xxx(..))`.
//!
//! Rules every apply function keeps (the state machine relies on them):
//! - it runs inside the entry's open SQLite transaction and never commits or rolls it back
//!   (use `SAVEPOINT` for partial rollback); the caller stores the applied log id in the same
//!   transaction and commits;
//! - it is deterministic: same database + same command = same bytes, on every replica. No
//!   clocks, no randomness: the leader puts such values into the command before proposing;
//! - a failure that depends on the data (a SQL error, a constraint) is a *result*, returned in
//!   the response and identical everywhere; only storage failures are `Err`.
//!
//! Variants are never renumbered or removed: entries are postcard-encoded, which identifies a
//! variant by its position. New variants go at the end.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ingress::apply::{BatchOutcome, DeviceBatch};
use crate::raft_types::LogId;
use crate::registry::{RegistryCommand, RegistryOutcome};
use crate::sql::{SqlCommand, StatementResult};

/// One Raft log entry's application payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// rqlite-style SQL statements (`/db/execute`, `/db/request`, strong reads).
    Sql(SqlCommand),
    /// Device batches grouped by the leader's ingress (`ingress/apply.rs`).
    DeviceBatches(Vec<DeviceBatch>),
    /// Device registry and stream definitions (`registry.rs`).
    DeviceRegistry(RegistryCommand),
    /// SQL with the leader's clock when it proposed the entry (Unix ms): "now" for the
    /// entry's SQL on every replica (see `sandbox.rs`).
    SqlAt { stamp_ms: i64, sql: SqlCommand },
}

impl Command {
    /// The leader's stamp SQL time functions see while this entry applies, if it has one.
    pub fn stamp_ms(&self) -> Option<i64> {
        match self {
            Command::SqlAt { stamp_ms, .. } => Some(*stamp_ms),
            Command::DeviceBatches(b) => b.iter().map(|b| b.received_at_ms).max(),
            Command::Sql(_) | Command::DeviceRegistry(_) => None,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Sql(c) => write!(
                f,
                "Sql({} statements, transaction={})",
                c.statements.len(),
                c.transaction
            ),
            Command::DeviceBatches(b) => write!(f, "DeviceBatches({} batches)", b.len()),
            Command::DeviceRegistry(c) => write!(f, "DeviceRegistry({c})"),
            Command::SqlAt { stamp_ms, sql } => write!(
                f,
                "SqlAt({stamp_ms}, {} statements, transaction={})",
                sql.statements.len(),
                sql.transaction
            ),
        }
    }
}

/// What applying a command answers to the client that proposed it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Blank and membership entries answer nothing.
    #[default]
    Empty,
    /// One result per SQL statement, in order.
    Sql(Vec<StatementResult>),
    /// One outcome per device batch, in order.
    DeviceBatches(Vec<BatchOutcome>),
    DeviceRegistry(RegistryOutcome),
}

/// Facts about the entry being applied, for apply functions that need them.
pub struct ApplyContext<'a> {
    /// The id of the entry being applied.
    pub log_id: &'a LogId,
}

/// Applies `cmd` inside the caller's open transaction on `conn`: the one dispatch point.
pub fn apply(
    conn: &rusqlite::Connection,
    ctx: &ApplyContext<'_>,
    cmd: &Command,
) -> rusqlite::Result<CommandResponse> {
    let _entry = crate::sandbox::enter_entry(ctx.log_id.index, cmd.stamp_ms());
    match cmd {
        Command::Sql(sql) | Command::SqlAt { sql, .. } => {
            crate::sql::apply_sql(conn, sql).map(CommandResponse::Sql)
        }
        Command::DeviceBatches(b) => {
            crate::ingress::apply::apply(conn, b).map(CommandResponse::DeviceBatches)
        }
        Command::DeviceRegistry(c) => {
            crate::registry::apply_registry(conn, c).map(CommandResponse::DeviceRegistry)
        }
    }
}
