//! The Raft log command: what one entry asks every replica to do.
//!
//! # Extension point
//!
//! Every command kind is one variant of [`Command`] with its payload type and its apply
//! function in a module of its own: [`sql`] for [`Command::Sql`], [`device`] for
//! [`Command::DeviceBatches`] (with [`dead_letter`] for the records that do not fit),
//! [`registry`] for [`Command::DeviceRegistry`], [`streams`] for [`Command::Streams`]. [`apply`] is the
//! only place that dispatches on the variant. To add a command:
//!
//! 1. put the payload type and `fn apply_xxx(conn: &Connection, ctx: &ApplyContext, cmd: &Xxx)
//!    -> CommandResponse` in a new module;
//! 2. add a variant here, an arm to [`apply`] and, if it answers something new, a variant to
//!    [`CommandResponse`];
//! 3. propose it through the service layer (`cluster::Cluster::write`), which hands it to the
//!    one proposer (`raft::proposer`).
//!
//! Rules every apply function keeps (the state machine relies on them):
//! - it runs inside the entry's open SQLite transaction and never commits or rolls it back
//!   (use `SAVEPOINT` for partial rollback); the caller stores the applied log id in the same
//!   transaction and commits;
//! - it is deterministic: same database + same command = same bytes, on every replica. No
//!   clocks, no randomness: the leader puts such values into the command before proposing
//!   (user SQL's "now" and `random()` come from the entry, see `db::sandbox`);
//! - a failure that depends on the data (a SQL error, a constraint) is a *result*, returned in
//!   the response and identical everywhere; only storage failures are `Err`.
//!
//! Variants are never renumbered or removed: entries are postcard-encoded, which identifies a
//! variant by its position. New variants go at the end.

pub mod backup;
pub mod dead_letter;
pub mod device;
pub mod export;
pub mod feed;
pub mod load;
pub mod members;
pub mod registry;
pub mod rewrite;
pub mod sql;
pub mod streams;
pub mod version;

use std::fmt;

use serde::{Deserialize, Serialize};

use self::device::{BatchOutcome, DeviceBatch};
use self::export::{ExportCommand, ExportOutcome};
use self::feed::Feed;
use self::load::LoadChunk;
use self::registry::{RegistryCommand, RegistryOutcome};
use self::sql::SqlCommand;
use self::streams::{StreamsCommand, StreamsOutcome};
use crate::db::sql::StatementResult;
use crate::metrics::Metrics;

/// One Raft log entry's application payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// rqlite-style SQL statements (`/db/execute`, `/db/request`, strong reads).
    Sql(SqlCommand),
    /// Device batches grouped by the leader's ingress ([`device`]).
    DeviceBatches(Vec<DeviceBatch>),
    /// Device registry and stream definitions ([`registry`]).
    DeviceRegistry(RegistryCommand),
    /// SQL with the leader's clock when it proposed the entry (Unix ms): "now" for the
    /// entry's SQL on every replica (see `db::sandbox`).
    SqlAt { stamp_ms: i64, sql: SqlCommand },
    /// One chunk of a `/db/load` ([`load`]); the last one swaps the load in.
    LoadChunk(LoadChunk),
    /// Stream definitions with `on_mismatch`, and dead-letter replays ([`streams`]).
    Streams(StreamsCommand),
    /// Any other command with the leader's wall clock when it proposed the entry (Unix ms),
    /// never lower than the previous entry's (`raft::proposer`): the entry's time for
    /// point-in-time restore. The inner command applies as it would alone.
    Stamped { stamp_ms: i64, cmd: Box<Command> },
    /// How far the continuous backup stored the log on one target ([`backup`]).
    BackupShipped(backup::BackupShipped),
    /// Site id, export cursors and retention, proposed by the leader ([`export`]).
    Export(ExportCommand),
    /// Format version 2: raises the cluster's active format version to this one and runs
    /// the replicated database's migrations up to it ([`version`]). Proposed by the leader
    /// once every member supports it.
    ActivateVersion(u32),
    /// Members' incarnations and the first entry after `cairn recover` ([`members`]).
    Members(members::MembersCommand),
    /// Format version 2: device batches with the session each was read in (`sessions[i]`
    /// for `batches[i]`, see `RegistryCommand::OpenSession`); a batch of a session that is
    /// no longer the device's current one is not stored ([`device`]).
    SessionBatches {
        sessions: Vec<u64>,
        batches: Vec<DeviceBatch>,
    },
}

impl Command {
    /// The leader's stamp SQL time functions see while this entry applies, if it has one.
    pub fn stamp_ms(&self) -> Option<i64> {
        match self {
            // The entry's stamp is its "now" (for SQL it is the clock the rewrite read, unless
            // the previous entry's stamp was later). Device batches keep the receive times
            // their records are converted with.
            Command::Stamped { stamp_ms, cmd } => match cmd.as_ref() {
                Command::DeviceBatches(_) | Command::SessionBatches { .. } => cmd.stamp_ms(),
                _ => Some(*stamp_ms),
            },
            Command::SqlAt { stamp_ms, .. } => Some(*stamp_ms),
            Command::DeviceBatches(b) | Command::SessionBatches { batches: b, .. } => {
                b.iter().map(|b| b.received_at_ms).max()
            }
            Command::Sql(_)
            | Command::DeviceRegistry(_)
            | Command::LoadChunk(_)
            | Command::Streams(_)
            | Command::BackupShipped(_)
            | Command::Export(_)
            | Command::ActivateVersion(_)
            | Command::Members(_) => None,
        }
    }

    /// The cluster format version an entry of this kind needs (`crate::version`): the one
    /// gate every kind added after version 1 goes through. The leader proposes a command only
    /// when the active version reaches it (`cluster::Cluster::propose`), so an older member
    /// never meets it. No wildcard: a new variant must name its version here.
    pub fn min_version(&self) -> u32 {
        match self {
            Command::Stamped { cmd, .. } => cmd.min_version(),
            Command::ActivateVersion(v) => (*v).max(crate::version::V2),
            Command::Members(_) | Command::SessionBatches { .. } => crate::version::V2,
            // Kinds added after version 1 inside older commands.
            Command::DeviceRegistry(
                registry::RegistryCommand::NameNode { .. }
                | registry::RegistryCommand::OpenSession { .. },
            )
            | Command::Export(ExportCommand::Capture { .. }) => crate::version::V2,
            Command::Sql(_)
            | Command::DeviceBatches(_)
            | Command::DeviceRegistry(_)
            | Command::SqlAt { .. }
            | Command::LoadChunk(_)
            | Command::Streams(_)
            | Command::BackupShipped(_)
            | Command::Export(_) => crate::version::V1,
        }
    }

    /// The version a binary newer than this one would need to apply this entry, if this
    /// binary cannot apply it (an `ActivateVersion` beyond [`crate::version::SUPPORTED`]).
    pub fn needs_newer_binary(&self) -> Option<u32> {
        match self.unstamped() {
            Command::ActivateVersion(v) if *v > crate::version::SUPPORTED => Some(*v),
            _ => None,
        }
    }

    /// The leader's stamp on the entry (`None` for entries proposed before stamping).
    pub fn entry_stamp_ms(&self) -> Option<i64> {
        match self {
            Command::Stamped { stamp_ms, .. } => Some(*stamp_ms),
            _ => None,
        }
    }

    /// The device batches of a device entry (either kind), without its stamp.
    pub fn device_batches(&self) -> Option<&[DeviceBatch]> {
        match self.unstamped() {
            Command::DeviceBatches(b) | Command::SessionBatches { batches: b, .. } => Some(b),
            _ => None,
        }
    }

    /// The command without its stamp.
    pub fn unstamped(&self) -> &Command {
        match self {
            Command::Stamped { cmd, .. } => cmd.unstamped(),
            c => c,
        }
    }

    /// `self` stamped with `stamp_ms` (an old stamp is replaced).
    pub fn stamped(self, stamp_ms: i64) -> Command {
        let cmd = match self {
            Command::Stamped { cmd, .. } => cmd,
            c => Box::new(c),
        };
        Command::Stamped { stamp_ms, cmd }
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
            Command::SessionBatches { batches, .. } => {
                write!(f, "SessionBatches({} batches)", batches.len())
            }
            Command::DeviceRegistry(c) => write!(f, "DeviceRegistry({c})"),
            Command::LoadChunk(c) => write!(
                f,
                "LoadChunk(load {}, {} bytes at {}{})",
                c.load_id,
                c.data.len(),
                c.offset,
                if c.last.is_some() { ", last" } else { "" }
            ),
            Command::SqlAt { stamp_ms, sql } => write!(
                f,
                "SqlAt({stamp_ms}, {} statements, transaction={})",
                sql.statements.len(),
                sql.transaction
            ),
            Command::Streams(c) => write!(f, "Streams({c})"),
            Command::Stamped { stamp_ms, cmd } => write!(f, "Stamped({stamp_ms}, {cmd})"),
            Command::BackupShipped(b) => write!(
                f,
                "BackupShipped({} through {})",
                b.target, b.position.index
            ),
            Command::Export(c) => write!(f, "Export({c})"),
            Command::ActivateVersion(v) => write!(f, "ActivateVersion({v})"),
            Command::Members(c) => write!(f, "Members({c})"),
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
    Streams(StreamsOutcome),
    Export(ExportOutcome),
}

/// What an apply function may use besides the connection: the entry's log index (it seeds
/// the entry's deterministic `random()`), this replica's counters and its feed of stored
/// device records (they observe, they never change what is applied).
pub struct ApplyContext<'a> {
    pub index: u64,
    pub metrics: &'a Metrics,
    pub feed: &'a Feed,
}

/// Applies `cmd` inside the caller's open transaction on `conn`: the one dispatch point.
pub fn apply(
    conn: &rusqlite::Connection,
    ctx: &ApplyContext<'_>,
    cmd: &Command,
) -> rusqlite::Result<CommandResponse> {
    let _entry = crate::db::sandbox::enter_entry(ctx.index, cmd.stamp_ms());
    match cmd.unstamped() {
        Command::Sql(sql) | Command::SqlAt { sql, .. } => {
            sql::apply_sql(conn, ctx.index, cmd.stamp_ms(), sql).map(CommandResponse::Sql)
        }
        Command::DeviceBatches(b) => {
            device::apply(conn, ctx, b, None).map(CommandResponse::DeviceBatches)
        }
        Command::SessionBatches { sessions, batches } => {
            device::apply(conn, ctx, batches, Some(sessions)).map(CommandResponse::DeviceBatches)
        }
        Command::DeviceRegistry(c) => {
            if let Some(device) = c.changes_keys_of() {
                ctx.feed.stage_registry_change(Some(device));
            }
            registry::apply_registry(conn, c).map(CommandResponse::DeviceRegistry)
        }
        Command::LoadChunk(c) => {
            if c.last.is_some() {
                // A restored backup brings its own registry.
                ctx.feed.stage_registry_change(None);
            }
            load::apply_chunk(conn, c).map(|r| match r {
                Some(result) => CommandResponse::Sql(vec![result]),
                None => CommandResponse::Empty,
            })
        }
        Command::Streams(c) => {
            streams::apply_streams(conn, ctx.index, c).map(CommandResponse::Streams)
        }
        Command::BackupShipped(b) => {
            backup::apply_shipped(conn, b).map(|()| CommandResponse::Empty)
        }
        // `unstamped` took every stamp off.
        Command::Stamped { .. } => Ok(CommandResponse::Empty),
        Command::Export(c) => export::apply_export(conn, c).map(CommandResponse::Export),
        Command::ActivateVersion(v) => {
            version::apply_activate(conn, ctx, *v).map(|()| CommandResponse::Empty)
        }
        Command::Members(c) => {
            members::apply_members(conn, ctx, c).map(|()| CommandResponse::Empty)
        }
    }
}
