//! The node-local format of `raft.db` (tables `log` and `meta`): its version stamp in `meta`
//! ([`FORMAT_KEY`], absent = 1), migrated on start in one transaction; a newer one is refused
//! (`crate::version`).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

/// The `meta` key holding the node-local format version of `raft.db` (`crate::version`).
pub const FORMAT_KEY: &str = "format_version";

/// Refuses a `raft.db` of a newer format version, and migrates an older one to
/// [`SUPPORTED`](crate::version::SUPPORTED) in one transaction (the whole migration commits
/// or none of it). Version 1 → 2 keeps `log` and `meta` as they are and adds the stamp.
pub fn migrate_local(conn: &Connection, path: &Path) -> anyhow::Result<()> {
    use crate::version::{SUPPORTED, V1};
    let tx = conn.unchecked_transaction()?;
    let found: Option<Vec<u8>> = tx
        .query_row("SELECT value FROM meta WHERE key = ?1", [FORMAT_KEY], |r| {
            r.get(0)
        })
        .optional()?;
    let found = match found {
        None => V1,
        Some(b) => String::from_utf8_lossy(&b)
            .parse::<u32>()
            .map_err(|_| anyhow::anyhow!("{}: unreadable {FORMAT_KEY} in meta", path.display()))?,
    };
    anyhow::ensure!(
        found <= SUPPORTED,
        "{}: this data directory was written by cluster format version {found}; this binary          (cairn {}) supports up to format version {SUPPORTED}: run a cairn that supports version          {found} (data directories are never downgraded)",
        path.display(),
        env!("CARGO_PKG_VERSION")
    );
    if found < SUPPORTED {
        tx.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES(?1, ?2)",
            params![FORMAT_KEY, SUPPORTED.to_string().into_bytes()],
        )?;
        tracing::info!(
            "{}: node-local format {found} -> {SUPPORTED}",
            path.display()
        );
    }
    tx.commit()?;
    Ok(())
}
