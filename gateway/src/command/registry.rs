//! [`Command::DeviceRegistry`](super::Command::DeviceRegistry): registering and removing
//! devices, and installing the stream definitions (which travel the same way).

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::streams::{SchemaV1, install};
use crate::db::registry::{DeviceKey, create_tables};
use crate::db::schema::Schema;
use crate::db::tables::DEVICES as DEVICES_TABLE;

/// A change to the registry (or to the stream definitions, which travel the same way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryCommand {
    /// Register a device, or replace its key.
    Add { device_id: u64, key: DeviceKey },
    /// Forget a device's key.
    Remove { device_id: u64 },
    /// Install the stream tables and definitions: what earlier releases proposed, kept so
    /// their logs apply alike. New definitions travel as `StreamsCommand::Define`.
    DefineStreams(SchemaV1),
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
        RegistryCommand::DefineStreams(legacy) => match install(conn, &Schema::from(legacy))? {
            Ok(()) => RegistryOutcome::StreamsDefined,
            Err(e) => RegistryOutcome::Failed(e),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::registry::{DeviceInfo, device_key, list_devices};

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
}
