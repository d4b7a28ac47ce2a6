//! The device registry as stored in the replicated database: which devices may send, with
//! which pre-shared key, and how far each one's records are committed (its high-water seq).
//! Changed only by applying `command::registry`; read locally.
//!
//! Tables (created on first use): [`tables::DEVICES`] and [`tables::HIGH_WATER`]. The
//! high-water is written in the same transaction as the device's rows (`command::device`).
//! Removing a device forgets its key, not its high-water: if it is added again its records
//! still never repeat a committed seq (its next Welcome tells it where to continue).

use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::tables;

const DEVICES_TABLE: &str = tables::DEVICES;
const HIGH_WATER_TABLE: &str = tables::HIGH_WATER;

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
    // Runs for every applied device entry: cached statements skip the parse.
    conn.prepare_cached(&format!(
        "CREATE TABLE IF NOT EXISTS {DEVICES_TABLE} (device_id INTEGER PRIMARY KEY, key BLOB NOT NULL)"
    ))?
    .execute([])?;
    conn.prepare_cached(&format!(
        "CREATE TABLE IF NOT EXISTS {HIGH_WATER_TABLE} (device_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL)"
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

/// The key parser `cairn device add`/`provision` and the `/devices` API share with the
/// firmware's settings codec (64 hex digits).
pub use cairn_protocol::settings::{BadKey, parse_key};

/// A key as 64 lowercase hex digits.
pub fn key_hex(key: &DeviceKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
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
}
