//! [`Command::LoadChunk`](super::Command::LoadChunk): a `/db/load` travelling the log in
//! bounded chunks, never as one giant entry (as rqlite's chunked load does).
//!
//! The leader prepares the loaded database as a file (`db::load::prepare`) and proposes it in
//! chunks of at most [`CHUNK_BYTES`]. Each replica stores a chunk in the replicated table
//! `_cairn_load` (so a snapshot taken in the middle of a load carries the chunks so far, and a
//! follower that installs it can still finish the load). The last chunk reassembles the file
//! next to the database, swaps it in (`db::load::swap_in`) and deletes the chunks, all in that
//! entry's one transaction: the load takes effect at the last chunk's index, on every replica.
//! A load whose leader went away leaves chunks behind; the next load's first chunk removes
//! them.

use std::io::Write;
use std::path::PathBuf;

use rusqlite::{Connection, ffi};
use serde::{Deserialize, Serialize};

use crate::db::load::{SwapError, swap_in};
use crate::db::sandbox;
use crate::db::sql::StatementResult;
use crate::db::tables;

/// Largest chunk of a load in one log entry.
pub const CHUNK_BYTES: usize = 4 << 20;

/// One chunk of a load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadChunk {
    /// Chosen by the leader for this load.
    pub load_id: u64,
    /// Where in the file this chunk starts.
    pub offset: u64,
    #[serde(with = "super::device::serde_bytes_vec")]
    pub data: Vec<u8>,
    /// Set on the last chunk.
    pub last: Option<LoadEnd>,
}

/// What the last chunk says about the whole load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadEnd {
    /// The file's length: every replica checks it has all of it.
    pub len: u64,
    /// A Cairn backup: restore Cairn's state with the data (`db::load`).
    pub restore_state: bool,
}

/// Applies one chunk inside the entry's transaction: `None` until the last chunk, whose
/// result is the load's (rows loaded, or the error every replica got).
pub fn apply_chunk(
    conn: &Connection,
    chunk: &LoadChunk,
) -> rusqlite::Result<Option<StatementResult>> {
    let table = tables::LOAD;
    sandbox::system(|| -> rusqlite::Result<Option<StatementResult>> {
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (load_id INTEGER NOT NULL, \
             offset INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (load_id, offset)) \
             WITHOUT ROWID"
        ))?;
        let id = chunk.load_id as i64;
        if chunk.offset == 0 {
            conn.execute(&format!("DELETE FROM {table} WHERE load_id != ?1"), [id])?;
        }
        conn.execute(
            &format!("INSERT OR REPLACE INTO {table}(load_id, offset, data) VALUES(?1, ?2, ?3)"),
            rusqlite::params![id, chunk.offset as i64, &chunk.data],
        )?;
        let Some(end) = chunk.last else {
            return Ok(None);
        };
        let file = scratch_path(conn, chunk.load_id);
        let assembled = assemble(conn, chunk.load_id, end.len, &file);
        conn.execute(&format!("DELETE FROM {table} WHERE load_id = ?1"), [id])?;
        let result = match assembled {
            Err(e) => Err(e),
            Ok(Err(msg)) => Ok(StatementResult::error(msg)),
            Ok(Ok(())) => {
                conn.execute_batch("SAVEPOINT cairn_load")?;
                match swap_in(conn, &file, end.restore_state) {
                    Ok(rows) => {
                        conn.execute_batch("RELEASE cairn_load")?;
                        Ok(StatementResult {
                            rows_affected: rows as i64,
                            ..Default::default()
                        })
                    }
                    Err(SwapError::Data(msg)) => {
                        conn.execute_batch("ROLLBACK TO cairn_load; RELEASE cairn_load")?;
                        Ok(StatementResult::error(format!("load: {msg}")))
                    }
                    Err(SwapError::Env(e)) => Err(e),
                }
            }
        };
        let _ = std::fs::remove_file(&file);
        result.map(Some)
    })
}

/// Where the last chunk reassembles the file: next to the live database (node-local).
fn scratch_path(conn: &Connection, load_id: u64) -> PathBuf {
    let dir = conn
        .path()
        .and_then(|p| std::path::Path::new(p).parent().map(|d| d.to_path_buf()))
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("load-{load_id}.db"))
}

/// Writes the load's chunks, in order, to `file`. `Ok(Err)` when they do not make up `len`
/// bytes (the same on every replica); `Err` for a failure of this replica's disk.
fn assemble(
    conn: &Connection,
    load_id: u64,
    len: u64,
    file: &std::path::Path,
) -> rusqlite::Result<Result<(), String>> {
    let mut out = std::fs::File::create(file).map_err(disk)?;
    let mut st = conn.prepare(&format!(
        "SELECT offset, data FROM {} WHERE load_id = ?1 ORDER BY offset",
        tables::LOAD
    ))?;
    let mut rows = st.query([load_id as i64])?;
    let mut at = 0u64;
    while let Some(row) = rows.next()? {
        let offset = row.get::<_, i64>(0)? as u64;
        let data = row.get_ref(1)?.as_blob()?;
        if offset != at {
            return Ok(Err(format!(
                "load: chunk at byte {offset} where byte {at} was expected"
            )));
        }
        out.write_all(data).map_err(disk)?;
        at += data.len() as u64;
    }
    if at != len {
        return Ok(Err(format!("load: {at} bytes of {len} arrived")));
    }
    out.sync_all().map_err(disk)?;
    Ok(Ok(()))
}

/// A failure writing the reassembled file, as the SQLite error `db::failure` classifies: a
/// full disk is held and retried, anything else is an I/O error.
fn disk(e: std::io::Error) -> rusqlite::Error {
    let code = if e.kind() == std::io::ErrorKind::StorageFull {
        ffi::SQLITE_FULL
    } else {
        ffi::SQLITE_IOERR
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(code), Some(e.to_string()))
}
