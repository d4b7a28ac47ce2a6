//! The device registry: which devices may send, with which pre-shared key, and how far each
//! one's records are committed (its high-water seq). Replicated through Raft as
//! [`Command::DeviceRegistry`](crate::command::Command::DeviceRegistry); read locally.
//!
//! Tables (created on first use, inside the replicated database):
//!
//! - `_cairn_devices(device_id INTEGER PRIMARY KEY, key BLOB NOT NULL)`: registered devices.
//! - `_cairn_high_water(device_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL)`: the highest
//!   applied seq per device, written in the same transaction as the device's rows
//!   (see [`crate::ingress::apply`]).
//!
//! Removing a device forgets its key, not its high-water: if it is added again its records
//! still never repeat a committed seq (its next Welcome tells it where to continue).

use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::schema::Schema;

pub const DEVICES_TABLE: &str = "_cairn_devices";
pub const HIGH_WATER_TABLE: &str = "_cairn_high_water";

/// A device's pre-shared key.
pub type DeviceKey = [u8; cairn_protocol::KEY_LEN];

/// A change to the registry (or to the stream definitions, which travel the same way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryCommand {
    /// Register a device, or replace its key.
    Add { device_id: u64, key: DeviceKey },
    /// Forget a device's key.
    Remove { device_id: u64 },
    /// Install the stream tables and definitions (proposed by each new leader).
    DefineStreams(Schema),
}

impl std::fmt::Display for RegistryCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryCommand::Add { device_id, .. } => write!(f, "add device {device_id}"),
            RegistryCommand::Remove { device_id } => write!(f, "remove device {device_id}"),
            RegistryCommand::DefineStreams(s) => write!(f, "define {} streams", s.streams.len()),
        }
    }
}

/// What applying a [`RegistryCommand`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryOutcome {
    /// The device is registered (`replaced`: it was already, with a key now replaced).
    Added {
        replaced: bool,
    },
    /// `existed`: false if there was no such device.
    Removed {
        existed: bool,
    },
    StreamsDefined,
    /// Installing the stream definitions failed (same everywhere); nothing changed.
    Failed(String),
}

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

/// Applies a registry command inside the entry's transaction.
pub fn apply_registry(
    conn: &Connection,
    cmd: &RegistryCommand,
) -> rusqlite::Result<RegistryOutcome> {
    create_tables(conn)?;
    Ok(match cmd {
        RegistryCommand::Add { device_id, key } => {
            let replaced = conn.execute(
                &format!("UPDATE {DEVICES_TABLE} SET key = ?2 WHERE device_id = ?1"),
                rusqlite::params![*device_id as i64, &key[..]],
            )? > 0;
            if !replaced {
                conn.execute(
                    &format!("INSERT INTO {DEVICES_TABLE}(device_id, key) VALUES (?1, ?2)"),
                    rusqlite::params![*device_id as i64, &key[..]],
                )?;
            }
            RegistryOutcome::Added { replaced }
        }
        RegistryCommand::Remove { device_id } => {
            let n = conn.execute(
                &format!("DELETE FROM {DEVICES_TABLE} WHERE device_id = ?1"),
                [*device_id as i64],
            )?;
            RegistryOutcome::Removed { existed: n > 0 }
        }
        RegistryCommand::DefineStreams(schema) => {
            conn.execute_batch("SAVEPOINT define_streams")?;
            match schema.install(conn) {
                Ok(()) => {
                    conn.execute_batch("RELEASE define_streams")?;
                    RegistryOutcome::StreamsDefined
                }
                Err(e) => {
                    conn.execute_batch("ROLLBACK TO define_streams; RELEASE define_streams")?;
                    RegistryOutcome::Failed(e.to_string())
                }
            }
        }
    })
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

/// Parses a key given as 64 hex digits.
pub fn parse_key(hex: &str) -> Result<DeviceKey, String> {
    let hex = hex.trim();
    if hex.len() != 2 * cairn_protocol::KEY_LEN || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "a device key is {} hex digits ({} bytes)",
            2 * cairn_protocol::KEY_LEN,
            cairn_protocol::KEY_LEN
        ));
    }
    let mut key = [0u8; cairn_protocol::KEY_LEN];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(key)
}

/// A key as 64 lowercase hex digits.
pub fn key_hex(key: &DeviceKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_add_list_remove() {
        let conn = Connection::open_in_memory().unwrap();
        assert_eq!(device_key(&conn, 5).unwrap(), None);
        assert_eq!(list_devices(&conn).unwrap(), vec![]);
        let add = RegistryCommand::Add {
            device_id: 5,
            key: [1; 32],
        };
        assert_eq!(
            apply_registry(&conn, &add).unwrap(),
            RegistryOutcome::Added { replaced: false }
        );
        let add2 = RegistryCommand::Add {
            device_id: 5,
            key: [2; 32],
        };
        assert_eq!(
            apply_registry(&conn, &add2).unwrap(),
            RegistryOutcome::Added { replaced: true }
        );
        assert_eq!(device_key(&conn, 5).unwrap(), Some([2; 32]));
        assert_eq!(
            list_devices(&conn).unwrap(),
            vec![DeviceInfo {
                device_id: 5,
                high_water: 0
            }]
        );
        let rm = RegistryCommand::Remove { device_id: 5 };
        assert_eq!(
            apply_registry(&conn, &rm).unwrap(),
            RegistryOutcome::Removed { existed: true }
        );
        assert_eq!(
            apply_registry(&conn, &rm).unwrap(),
            RegistryOutcome::Removed { existed: false }
        );
        assert_eq!(device_key(&conn, 5).unwrap(), None);
    }

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
