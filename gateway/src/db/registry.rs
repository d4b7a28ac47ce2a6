//! The device registry as stored in the replicated database: which devices may send, with
//! which pre-shared key, and how far each one's records are committed (its high-water seq).
//! Changed only by applying `command::registry`; read locally.
//!
//! Tables (created on first use): [`tables::DEVICES`] and [`tables::HIGH_WATER`]. The
//! high-water is written in the same transaction as the device's rows (`command::device`).
//! Removing a device forgets its key, not its high-water: if it is added again its records
//! still never repeat a committed seq (its next Welcome tells it where to continue).
//!
//! Key rotation, revocation and the protocol a device is registered for live in
//! [`tables::DEVICE_KEYS`], one row per device that ever had any of them (no row: protocol 2,
//! one key, not revoked). It is created by the first command that writes it (`Rekey`,
//! `Revoke`, `SetProtocol`), never by older entries, so a log written before it existed applies
//! to the same bytes on every release.

use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::tables;

const DEVICES_TABLE: &str = tables::DEVICES;
const HIGH_WATER_TABLE: &str = tables::HIGH_WATER;
const KEYS_TABLE: &str = tables::DEVICE_KEYS;

/// A device's pre-shared key.
pub type DeviceKey = [u8; cairn_protocol::KEY_LEN];

/// A registered device as `cairn device list` shows it (never its key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device_id: u64,
    pub high_water: u64,
}

/// Creates the registry tables if needed.
pub fn create_tables(conn: &Connection) -> rusqlite::Result<()> {
    // Runs for every applied device entry: once they exist, three schema lookups and no
    // statement run.
    let mut missing = false;
    for t in [DEVICES_TABLE, HIGH_WATER_TABLE, tables::DEVICE_TIMES] {
        missing |= !super::table_exists(conn, t)?;
    }
    if !missing {
        return Ok(());
    }
    conn.prepare_cached(&format!(
        "CREATE TABLE IF NOT EXISTS {DEVICES_TABLE} (device_id INTEGER PRIMARY KEY, key BLOB NOT NULL)"
    ))?
    .execute([])?;
    conn.prepare_cached(&format!(
        "CREATE TABLE IF NOT EXISTS {HIGH_WATER_TABLE} (device_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL)"
    ))?
    .execute([])?;
    conn.prepare_cached(&format!(
        "CREATE TABLE IF NOT EXISTS {} (device_id INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL)",
        tables::DEVICE_TIMES
    ))?
    .execute([])?;
    Ok(())
}

/// The key of a registered device.
pub fn device_key(conn: &Connection, device_id: u64) -> rusqlite::Result<Option<DeviceKey>> {
    let key: Option<Vec<u8>> = match conn
        .query_row(
            &format!("SELECT key FROM {DEVICES_TABLE} WHERE device_id = ?1"),
            [device_id as i64],
            |r| r.get(0),
        )
        .optional()
    {
        Ok(k) => k,
        Err(rusqlite::Error::SqliteFailure(_, Some(msg))) if msg.contains("no such table") => None,
        Err(e) => return Err(e),
    };
    Ok(key.and_then(|k| k.try_into().ok()))
}

/// The highest applied seq of a device (0: none).
pub fn high_water(conn: &Connection, device_id: u64) -> rusqlite::Result<u64> {
    match conn
        .query_row(
            &format!("SELECT seq FROM {HIGH_WATER_TABLE} WHERE device_id = ?1"),
            [device_id as i64],
            |r| r.get::<_, i64>(0),
        )
        .optional()
    {
        Ok(s) => Ok(s.unwrap_or(0) as u64),
        Err(rusqlite::Error::SqliteFailure(_, Some(msg))) if msg.contains("no such table") => Ok(0),
        Err(e) => Err(e),
    }
}

/// The device's current session (0: none opened yet, or no session table). On the writer
/// (apply): [`super::table_exists`].
pub fn current_session(conn: &Connection, device_id: u64) -> rusqlite::Result<u64> {
    // Every device entry asks, once per batch: no statement text built, none prepared in vain.
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT session FROM {} WHERE device_id = ?1",
            tables::DEVICE_SESSIONS
        )
    });
    if !super::table_exists(conn, tables::DEVICE_SESSIONS)? {
        return Ok(0);
    }
    let s = conn
        .prepare_cached(&SQL)?
        .query_row([device_id as i64], |r| r.get::<_, i64>(0))
        .optional()?;
    Ok(s.unwrap_or(0) as u64)
}

/// Opens a new session for the device: its number (one above the last), from this entry on
/// the only one whose batches are stored.
pub fn open_session(conn: &Connection, device_id: u64) -> rusqlite::Result<u64> {
    conn.prepare_cached(&format!(
        "CREATE TABLE IF NOT EXISTS {} (device_id INTEGER PRIMARY KEY, session INTEGER NOT NULL)",
        tables::DEVICE_SESSIONS
    ))?
    .execute([])?;
    let session = current_session(conn, device_id)?.saturating_add(1);
    conn.prepare_cached(&format!(
        "INSERT INTO {}(device_id, session) VALUES (?1, ?2) \
         ON CONFLICT(device_id) DO UPDATE SET session = excluded.session",
        tables::DEVICE_SESSIONS
    ))?
    .execute([device_id as i64, session as i64])?;
    Ok(session)
}

/// Every registered device, by id.
pub fn list_devices(conn: &Connection) -> rusqlite::Result<Vec<DeviceInfo>> {
    let sql = format!(
        "SELECT d.device_id, coalesce(h.seq, 0) FROM {DEVICES_TABLE} d \
         LEFT JOIN {HIGH_WATER_TABLE} h ON h.device_id = d.device_id ORDER BY d.device_id"
    );
    let mut stmt = match conn.prepare(&sql) {
        Ok(s) => s,
        Err(rusqlite::Error::SqliteFailure(_, Some(msg))) if msg.contains("no such table") => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    stmt.query_map([], |r| {
        Ok(DeviceInfo {
            device_id: r.get::<_, i64>(0)? as u64,
            high_water: r.get::<_, i64>(1)? as u64,
        })
    })?
    .collect()
}

/// Creates the key-state table if needed (only commands that write it call this).
pub fn create_key_table(conn: &Connection) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (device_id INTEGER PRIMARY KEY, \
         previous_key BLOB, grace_until_ms INTEGER, rekeyed_at_ms INTEGER, \
         new_key_seen_ms INTEGER, revoked_at_ms INTEGER, protocol INTEGER NOT NULL DEFAULT 2)"
    ))?
    .execute([])?;
    Ok(())
}

/// Whether the key-state table exists (it does once any device was rekeyed, revoked or
/// registered for protocol 1).
pub fn has_key_table(conn: &Connection) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
    )?
    .query_row([KEYS_TABLE], |r| r.get(0))
}

/// A device's key rotation, revocation and protocol, as replicated (times are the leader's
/// clock, Unix ms, carried in the commands).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// The key before the last `rekey`, accepted until `grace_until_ms`.
    #[serde(skip)]
    pub previous_key: Option<DeviceKey>,
    pub grace_until_ms: Option<i64>,
    pub rekeyed_at_ms: Option<i64>,
    /// When a gateway first saw the device authenticate with the key installed by the last
    /// `rekey`.
    pub new_key_seen_ms: Option<i64>,
    /// Set: every Hello of the device is refused (its stored records stay).
    pub revoked_at_ms: Option<i64>,
    /// The protocol version the device is registered for: 2, or 1 (accepted only with
    /// `--accept-protocol-1`).
    pub protocol: u8,
}

impl KeyState {
    /// A device with no row: protocol 2, one key.
    pub const NONE: KeyState = KeyState {
        previous_key: None,
        grace_until_ms: None,
        rekeyed_at_ms: None,
        new_key_seen_ms: None,
        revoked_at_ms: None,
        protocol: cairn_protocol::PROTOCOL_VERSION,
    };

    /// The previous key while it is still accepted at `now_ms`.
    pub fn previous_at(&self, now_ms: i64) -> Option<DeviceKey> {
        match (self.previous_key, self.grace_until_ms) {
            (Some(k), Some(until)) if now_ms < until && self.revoked_at_ms.is_none() => Some(k),
            _ => None,
        }
    }
}

/// What a gateway needs to accept a Hello: the device's key and its key state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeys {
    pub key: DeviceKey,
    pub state: KeyState,
}

fn key_state_of(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<KeyState> {
    let previous: Option<Vec<u8>> = r.get(at)?;
    Ok(KeyState {
        previous_key: previous.and_then(|k| k.try_into().ok()),
        grace_until_ms: r.get(at + 1)?,
        rekeyed_at_ms: r.get(at + 2)?,
        new_key_seen_ms: r.get(at + 3)?,
        revoked_at_ms: r.get(at + 4)?,
        protocol: r.get(at + 5)?,
    })
}

const KEY_STATE_COLUMNS: &str =
    "previous_key, grace_until_ms, rekeyed_at_ms, new_key_seen_ms, revoked_at_ms, protocol";

/// A device's key state (no row: [`KeyState::NONE`]).
pub fn key_state(conn: &Connection, device_id: u64) -> rusqlite::Result<KeyState> {
    if !has_key_table(conn)? {
        return Ok(KeyState::NONE);
    }
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {KEY_STATE_COLUMNS} FROM {KEYS_TABLE} WHERE device_id = ?1"
        ))?
        .query_row([device_id as i64], |r| key_state_of(r, 0))
        .optional()?
        .unwrap_or(KeyState::NONE))
}

/// The keys and key state of a registered device.
pub fn device_keys(conn: &Connection, device_id: u64) -> rusqlite::Result<Option<DeviceKeys>> {
    let Some(key) = device_key(conn, device_id)? else {
        return Ok(None);
    };
    Ok(Some(DeviceKeys {
        key,
        state: key_state(conn, device_id)?,
    }))
}

/// The revoked devices (read once per applied entry of device batches: a small set).
pub fn revoked_devices(conn: &Connection) -> rusqlite::Result<std::collections::HashSet<u64>> {
    // Only apply asks (the writer, whose schema is never stale), once per device entry.
    if !super::table_exists(conn, KEYS_TABLE)? {
        return Ok(Default::default());
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT device_id FROM {KEYS_TABLE} WHERE revoked_at_ms IS NOT NULL"
    ))?;
    stmt.query_map([], |r| Ok(r.get::<_, i64>(0)? as u64))?
        .collect()
}

/// Every device with a key-state row, by id.
pub fn key_states(conn: &Connection) -> rusqlite::Result<Vec<(u64, KeyState)>> {
    if !has_key_table(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT device_id, {KEY_STATE_COLUMNS} FROM {KEYS_TABLE} ORDER BY device_id"
    ))?;
    stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)? as u64, key_state_of(r, 1)?))
    })?
    .collect()
}

/// The key parser `cairn device add`/`provision` and the `/devices` API share with the
/// firmware's settings codec (64 hex digits).
pub use cairn_protocol::settings::{BadKey, parse_key};

/// A key as 64 lowercase hex digits.
pub fn key_hex(key: &DeviceKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Records `name` for node `id` (a name moves to the id it is given last: a replaced node).
pub fn set_node_name(conn: &Connection, id: u64, name: &str) -> rusqlite::Result<()> {
    use super::tables::NODE_NAMES;
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {NODE_NAMES} (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)"
    ))?;
    conn.execute(
        &format!("DELETE FROM {NODE_NAMES} WHERE name = ?1 AND id != ?2"),
        rusqlite::params![name, id as i64],
    )?;
    conn.execute(
        &format!("INSERT OR REPLACE INTO {NODE_NAMES}(id, name) VALUES (?1, ?2)"),
        rusqlite::params![id as i64, name],
    )?;
    Ok(())
}

/// The recorded node names, by Raft id (empty before the first).
pub fn node_names(conn: &Connection) -> rusqlite::Result<std::collections::BTreeMap<u64, String>> {
    let mut st = match conn.prepare(&format!(
        "SELECT id, name FROM {}",
        super::tables::NODE_NAMES
    )) {
        Ok(st) => st,
        Err(rusqlite::Error::SqliteFailure(_, Some(msg))) if msg.contains("no such table") => {
            return Ok(Default::default());
        }
        Err(e) => return Err(e),
    };
    let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_key() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let key = parse_key(hex).unwrap();
        assert_eq!(key[1], 0x11);
        assert_eq!(key_hex(&key), hex.to_ascii_lowercase());
        assert!(parse_key("0011").is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
    }

    /// Names by id; a name moves to the id it is given last; none before the first.
    #[test]
    fn test_node_names() {
        let conn = Connection::open_in_memory().unwrap();
        assert!(node_names(&conn).unwrap().is_empty());
        set_node_name(&conn, 1, "a").unwrap();
        set_node_name(&conn, 2, "b").unwrap();
        set_node_name(&conn, 1, "c").unwrap();
        set_node_name(&conn, 3, "b").unwrap();
        let names: Vec<(u64, String)> = node_names(&conn).unwrap().into_iter().collect();
        assert_eq!(names, vec![(1, "c".into()), (3, "b".into())]);
    }
}
