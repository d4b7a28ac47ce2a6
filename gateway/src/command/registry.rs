//! [`Command::DeviceRegistry`](super::Command::DeviceRegistry): registering and removing
//! devices, and installing the stream definitions (which travel the same way).

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::streams::{SchemaV1, install};
use crate::db::registry::{DeviceKey, create_tables};
use crate::db::schema::Schema;
use crate::db::tables::{DEVICES as DEVICES_TABLE, HIGH_WATER as HIGH_WATER_TABLE};

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
    /// Set a device's high-water seq (`cairn device reset`): the one way besides the device's
    /// own batches that it moves (SQL cannot write it, see `db::sandbox`). Refused while
    /// stored records of the device lie above `seq`: the device would resend those seqs and
    /// they would be taken for duplicates.
    ResetHighWater { device_id: u64, seq: u64 },
}

impl std::fmt::Display for RegistryCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryCommand::Add { device_id, .. } => write!(f, "add device {device_id}"),
            RegistryCommand::Remove { device_id } => write!(f, "remove device {device_id}"),
            RegistryCommand::DefineStreams(s) => write!(f, "define {} streams", s.streams.len()),
            RegistryCommand::ResetHighWater { device_id, seq } => {
                write!(f, "reset device {device_id}'s high-water to {seq}")
            }
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
    /// The device's high-water was `previous` and is now the requested seq.
    HighWaterReset {
        previous: u64,
    },
    /// The reset was refused (same everywhere); nothing changed.
    ResetRefused(String),
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
        RegistryCommand::ResetHighWater { device_id, seq } => {
            reset_high_water(conn, *device_id, *seq)?
        }
        RegistryCommand::DefineStreams(legacy) => match install(conn, &Schema::from(legacy))? {
            Ok(()) => RegistryOutcome::StreamsDefined,
            Err(e) => RegistryOutcome::Failed(e),
        },
    })
}

/// Sets `device_id`'s high-water to `seq` unless stored records lie above it.
fn reset_high_water(
    conn: &Connection,
    device_id: u64,
    seq: u64,
) -> rusqlite::Result<RegistryOutcome> {
    let previous = crate::db::registry::high_water(conn, device_id)?;
    // Seqs are stored as the i64 with the same bits: above 2^63 they read negative.
    let above = if seq <= i64::MAX as u64 {
        "device_id = ?1 AND (seq > ?2 OR seq < 0)"
    } else {
        "device_id = ?1 AND seq < 0 AND seq > ?2"
    };
    let mut stored = Vec::new();
    for table in crate::db::sandbox::stream_tables(conn) {
        let exists: bool = conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND lower(name) = ?1",
            [&table],
            |r| r.get(0),
        )?;
        if !exists {
            continue;
        }
        let n: i64 = conn.query_row(
            &format!("SELECT count(*) FROM \"{table}\" WHERE {above}"),
            rusqlite::params![device_id as i64, seq as i64],
            |r| r.get(0),
        )?;
        if n > 0 {
            stored.push(format!("{n} in {table}"));
        }
    }
    if !stored.is_empty() {
        return Ok(RegistryOutcome::ResetRefused(format!(
            "device {device_id} has stored records above seq {seq} ({}): the device would \
             resend those seqs and they would be taken for duplicates; delete them first \
             (DELETE FROM <table> WHERE device_id = {device_id} AND seq > {seq}) or reset to a \
             seq at or above the highest stored one",
            stored.join(", ")
        )));
    }
    conn.execute(
        &format!(
            "INSERT INTO {HIGH_WATER_TABLE}(device_id, seq) VALUES (?1, ?2) \
             ON CONFLICT(device_id) DO UPDATE SET seq = excluded.seq"
        ),
        rusqlite::params![device_id as i64, seq as i64],
    )?;
    tracing::warn!(
        device_id,
        previous,
        seq,
        "device high-water reset by an admin"
    );
    Ok(RegistryOutcome::HighWaterReset { previous })
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

    #[test]
    fn test_reset_high_water() {
        let conn = Connection::open_in_memory().unwrap();
        create_tables(&conn).unwrap();
        crate::db::schema::create_telemetry(&conn).unwrap();
        conn.execute_batch(
            "INSERT INTO _cairn_high_water VALUES(7, 20);
             INSERT INTO telemetry(device_id, seq, stream, time_ms, age_ms, \"values\") \
             VALUES(7, 19, 1, 0, 0, '[]'), (7, 20, 1, 0, 0, '[]');",
        )
        .unwrap();
        let reset = |seq| {
            apply_registry(
                &conn,
                &RegistryCommand::ResetHighWater { device_id: 7, seq },
            )
            .unwrap()
        };
        let refused = reset(10);
        assert!(
            matches!(&refused, RegistryOutcome::ResetRefused(m) if m.contains("2 in telemetry")),
            "{refused:?}"
        );
        assert_eq!(crate::db::registry::high_water(&conn, 7).unwrap(), 20);
        assert_eq!(
            reset(u64::MAX),
            RegistryOutcome::HighWaterReset { previous: 20 }
        );
        assert_eq!(crate::db::registry::high_water(&conn, 7).unwrap(), u64::MAX);
        assert_eq!(
            reset(20),
            RegistryOutcome::HighWaterReset { previous: u64::MAX }
        );
        conn.execute_batch("DELETE FROM telemetry WHERE seq > 5")
            .unwrap();
        assert_eq!(reset(5), RegistryOutcome::HighWaterReset { previous: 20 });
        assert_eq!(crate::db::registry::high_water(&conn, 7).unwrap(), 5);
    }
}
