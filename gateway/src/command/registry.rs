//! [`Command::DeviceRegistry`](super::Command::DeviceRegistry): registering and removing
//! devices, rotating and revoking their keys, and installing the stream definitions (which
//! travel the same way).
//!
//! Key rotation and revocation (`cairn device rekey|revoke`, `db::registry::KeyState`):
//! - `Revoke` marks the device revoked: every gateway refuses its Hellos and closes its open
//!   sessions when it applies the entry (`ingress`); its stored records and high-water stay.
//! - `Rekey` installs a new key and keeps the old one as `previous_key`, accepted by Hellos
//!   until `grace_until_ms`; a revoked device's old key is never kept (the rekey lifts the
//!   revocation with the new key only). `KeySeen` records, once per rekey, when a gateway
//!   first saw the device authenticate with the new key.
//! - `Add` over a registered device replaces its key at once and clears rotation and
//!   revocation (it is the operator's explicit re-registration); `Remove` forgets all of it.
//! - `SetProtocol` registers the device for protocol 1 (accepted only with
//!   `--accept-protocol-1`) or back for 2; a gateway sets 2 when such a device says a
//!   protocol 2 Hello, so it cannot be downgraded again.
//!
//! Times in these commands are the proposing leader's clock, put into the command before it
//! is proposed, so every replica stores the same values.

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::streams::{SchemaV1, install};
use crate::db::registry::{DeviceKey, create_key_table, create_tables, has_key_table};
use crate::db::schema::Schema;
use crate::db::tables::{
    DEVICE_KEYS as KEYS_TABLE, DEVICES as DEVICES_TABLE, HIGH_WATER as HIGH_WATER_TABLE,
};

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
    /// Refuse the device's Hellos and close its open sessions, from this entry on.
    Revoke { device_id: u64, at_ms: i64 },
    /// Install `key`, keeping the current key accepted until `grace_until_ms`.
    Rekey {
        device_id: u64,
        key: DeviceKey,
        at_ms: i64,
        grace_until_ms: i64,
    },
    /// Register the device for protocol `version` (1 or 2).
    SetProtocol { device_id: u64, version: u8 },
    /// A gateway saw the device authenticate with the key of the rekey at `rekeyed_at_ms`.
    KeySeen {
        device_id: u64,
        rekeyed_at_ms: i64,
        at_ms: i64,
    },
    /// Record a member's rqlite-style name (`--node-id NAME`); Raft keeps the u64 id.
    NameNode { id: u64, name: String },
    /// A gateway welcomes the device on a new connection (format version 2): the device's
    /// next session, and its high-water as of this entry. From here on, batches read in an
    /// earlier session (one still on its way from another gateway) are not stored
    /// (`BatchOutcome::Stale`): the Welcome's high-water stays the last seq stored before
    /// the device's new records (SPEC §8 gateway rule 2).
    OpenSession { device_id: u64 },
}

impl RegistryCommand {
    /// The device whose accepted keys this command may change (open sessions recheck theirs).
    pub fn changes_keys_of(&self) -> Option<u64> {
        match self {
            RegistryCommand::Add { device_id, .. }
            | RegistryCommand::Remove { device_id }
            | RegistryCommand::Revoke { device_id, .. }
            | RegistryCommand::Rekey { device_id, .. } => Some(*device_id),
            RegistryCommand::DefineStreams(_)
            | RegistryCommand::ResetHighWater { .. }
            | RegistryCommand::SetProtocol { .. }
            | RegistryCommand::KeySeen { .. }
            | RegistryCommand::NameNode { .. }
            | RegistryCommand::OpenSession { .. } => None,
        }
    }
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
            RegistryCommand::Revoke { device_id, .. } => write!(f, "revoke device {device_id}"),
            RegistryCommand::Rekey {
                device_id,
                grace_until_ms,
                ..
            } => write!(
                f,
                "rekey device {device_id}, old key until {grace_until_ms}"
            ),
            RegistryCommand::SetProtocol { device_id, version } => {
                write!(f, "device {device_id} speaks protocol {version}")
            }
            RegistryCommand::NameNode { id, name } => write!(f, "node {id} is named {name:?}"),
            RegistryCommand::OpenSession { device_id } => {
                write!(f, "new session of device {device_id}")
            }
            RegistryCommand::KeySeen { device_id, .. } => {
                write!(f, "device {device_id} seen with its new key")
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
    /// `existed`: false if there was no such device (nothing written).
    Revoked {
        existed: bool,
    },
    /// The new key is installed; the old one is accepted until `grace_until_ms` (`None`: not
    /// at all, the device was revoked).
    Rekeyed {
        grace_until_ms: Option<i64>,
    },
    ProtocolSet {
        previous: u8,
    },
    /// `noted`: false if the rekey was already seen (or is not the latest).
    KeySeen {
        noted: bool,
    },
    /// The command needs a registered device; nothing changed.
    NotRegistered,
    /// Refused (same everywhere); nothing changed.
    KeyRefused(String),
    /// The node's name is recorded.
    Named,
    /// The device's new session and its high-water as of it.
    SessionOpened {
        session: u64,
        high_water: u64,
    },
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
                // Removed and added again: possibly another device under the old id, whose
                // seqs may repeat old ones; exports key its records with a new epoch.
                if crate::db::export::was_removed(conn, *device_id)? {
                    crate::db::export::bump_epoch(conn, *device_id, None)?;
                }
                conn.execute(
                    &format!("INSERT INTO {DEVICES_TABLE}(device_id, key) VALUES (?1, ?2)"),
                    rusqlite::params![*device_id as i64, &key[..]],
                )?;
            }
            if has_key_table(conn)? {
                conn.execute(
                    &format!(
                        "UPDATE {KEYS_TABLE} SET previous_key = NULL, grace_until_ms = NULL, \
                         rekeyed_at_ms = NULL, new_key_seen_ms = NULL, revoked_at_ms = NULL \
                         WHERE device_id = ?1"
                    ),
                    [*device_id as i64],
                )?;
            }
            RegistryOutcome::Added { replaced }
        }
        RegistryCommand::Remove { device_id } => {
            let n = conn.execute(
                &format!("DELETE FROM {DEVICES_TABLE} WHERE device_id = ?1"),
                [*device_id as i64],
            )?;
            if has_key_table(conn)? {
                conn.execute(
                    &format!("DELETE FROM {KEYS_TABLE} WHERE device_id = ?1"),
                    [*device_id as i64],
                )?;
            }
            if n > 0 {
                crate::db::export::mark_removed(conn, *device_id)?;
            }
            RegistryOutcome::Removed { existed: n > 0 }
        }
        RegistryCommand::Revoke { device_id, at_ms } => {
            let existed = crate::db::registry::device_key(conn, *device_id)?.is_some();
            if existed {
                create_key_table(conn)?;
                conn.execute(
                    &format!(
                        "INSERT INTO {KEYS_TABLE}(device_id, revoked_at_ms) VALUES (?1, ?2) \
                         ON CONFLICT(device_id) DO UPDATE SET revoked_at_ms = excluded.revoked_at_ms, \
                         previous_key = NULL, grace_until_ms = NULL"
                    ),
                    rusqlite::params![*device_id as i64, at_ms],
                )?;
                tracing::warn!(device_id, "device revoked");
            }
            RegistryOutcome::Revoked { existed }
        }
        RegistryCommand::Rekey {
            device_id,
            key,
            at_ms,
            grace_until_ms,
        } => rekey(conn, *device_id, key, *at_ms, *grace_until_ms)?,
        RegistryCommand::SetProtocol { device_id, version } => {
            if !matches!(version, 1 | 2) {
                RegistryOutcome::KeyRefused(format!(
                    "protocol {version} does not exist: devices speak 1 or 2"
                ))
            } else if crate::db::registry::device_key(conn, *device_id)?.is_none() {
                RegistryOutcome::NotRegistered
            } else {
                let previous = crate::db::registry::key_state(conn, *device_id)?.protocol;
                create_key_table(conn)?;
                conn.execute(
                    &format!(
                        "INSERT INTO {KEYS_TABLE}(device_id, protocol) VALUES (?1, ?2) \
                         ON CONFLICT(device_id) DO UPDATE SET protocol = excluded.protocol"
                    ),
                    rusqlite::params![*device_id as i64, version],
                )?;
                RegistryOutcome::ProtocolSet { previous }
            }
        }
        RegistryCommand::KeySeen {
            device_id,
            rekeyed_at_ms,
            at_ms,
        } => {
            let noted = has_key_table(conn)?
                && conn.execute(
                    &format!(
                        "UPDATE {KEYS_TABLE} SET new_key_seen_ms = ?3 WHERE device_id = ?1 \
                         AND rekeyed_at_ms = ?2 AND new_key_seen_ms IS NULL"
                    ),
                    rusqlite::params![*device_id as i64, rekeyed_at_ms, at_ms],
                )? > 0;
            RegistryOutcome::KeySeen { noted }
        }
        RegistryCommand::ResetHighWater { device_id, seq } => {
            reset_high_water(conn, *device_id, *seq)?
        }
        RegistryCommand::NameNode { id, name } => {
            crate::db::registry::set_node_name(conn, *id, name)?;
            RegistryOutcome::Named
        }
        RegistryCommand::OpenSession { device_id } => RegistryOutcome::SessionOpened {
            session: crate::db::registry::open_session(conn, *device_id)?,
            high_water: crate::db::registry::high_water(conn, *device_id)?,
        },
        RegistryCommand::DefineStreams(legacy) => match install(conn, &Schema::from(legacy))? {
            Ok(()) => RegistryOutcome::StreamsDefined,
            Err(e) => RegistryOutcome::Failed(e),
        },
    })
}

/// Installs `key` for a registered device, keeping its current key until `grace_until_ms`
/// (unless the device is revoked: then its old key is never accepted again).
fn rekey(
    conn: &Connection,
    device_id: u64,
    key: &DeviceKey,
    at_ms: i64,
    grace_until_ms: i64,
) -> rusqlite::Result<RegistryOutcome> {
    let Some(current) = crate::db::registry::device_keys(conn, device_id)? else {
        return Ok(RegistryOutcome::NotRegistered);
    };
    if current.key == *key {
        return Ok(RegistryOutcome::KeyRefused(format!(
            "device {device_id} already has this key: a rekey needs a new one"
        )));
    }
    let revoked = current.state.revoked_at_ms.is_some();
    let (previous, until) = if revoked {
        (None, None)
    } else {
        (Some(&current.key[..]), Some(grace_until_ms))
    };
    create_key_table(conn)?;
    conn.execute(
        &format!("UPDATE {DEVICES_TABLE} SET key = ?2 WHERE device_id = ?1"),
        rusqlite::params![device_id as i64, &key[..]],
    )?;
    conn.execute(
        &format!(
            "INSERT INTO {KEYS_TABLE}(device_id, previous_key, grace_until_ms, rekeyed_at_ms) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT(device_id) DO UPDATE SET \
             previous_key = excluded.previous_key, grace_until_ms = excluded.grace_until_ms, \
             rekeyed_at_ms = excluded.rekeyed_at_ms, new_key_seen_ms = NULL, revoked_at_ms = NULL"
        ),
        rusqlite::params![device_id as i64, previous, until, at_ms],
    )?;
    tracing::info!(device_id, revoked, grace_until_ms = until, "device rekeyed");
    Ok(RegistryOutcome::Rekeyed {
        grace_until_ms: until,
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
    // Seqs above `seq` will be sent again and name new records: a new epoch keeps their
    // export keys apart from the old ones.
    let epoch = crate::db::export::bump_epoch(conn, device_id, Some(seq))?;
    tracing::warn!(
        device_id,
        previous,
        seq,
        epoch,
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

    #[test]
    fn test_revoke_rekey_protocol() {
        use crate::db::registry::{KeyState, device_keys, key_state};
        let conn = Connection::open_in_memory().unwrap();
        let apply = |cmd: RegistryCommand| apply_registry(&conn, &cmd).unwrap();
        // Nothing of it touches a device that is not registered, nor creates the table.
        assert_eq!(
            apply(RegistryCommand::Revoke {
                device_id: 5,
                at_ms: 1
            }),
            RegistryOutcome::Revoked { existed: false }
        );
        let rekey = |key, at_ms| RegistryCommand::Rekey {
            device_id: 5,
            key,
            at_ms,
            grace_until_ms: at_ms + 100,
        };
        assert_eq!(apply(rekey([2; 32], 10)), RegistryOutcome::NotRegistered);
        assert!(!has_key_table(&conn).unwrap());
        apply(RegistryCommand::Add {
            device_id: 5,
            key: [1; 32],
        });
        assert_eq!(key_state(&conn, 5).unwrap(), KeyState::NONE);
        assert!(matches!(
            apply(rekey([1; 32], 10)),
            RegistryOutcome::KeyRefused(_)
        ));

        // Rekey: the new key, the old one until the grace window ends.
        assert_eq!(
            apply(rekey([2; 32], 10)),
            RegistryOutcome::Rekeyed {
                grace_until_ms: Some(110)
            }
        );
        let k = device_keys(&conn, 5).unwrap().unwrap();
        assert_eq!(k.key, [2; 32]);
        assert_eq!(k.state.previous_at(109), Some([1; 32]));
        assert_eq!(k.state.previous_at(110), None);
        assert_eq!(k.state.rekeyed_at_ms, Some(10));
        let seen = |rekeyed_at_ms, at_ms| RegistryCommand::KeySeen {
            device_id: 5,
            rekeyed_at_ms,
            at_ms,
        };
        assert_eq!(
            apply(seen(9, 20)),
            RegistryOutcome::KeySeen { noted: false }
        );
        assert_eq!(
            apply(seen(10, 20)),
            RegistryOutcome::KeySeen { noted: true }
        );
        assert_eq!(
            apply(seen(10, 30)),
            RegistryOutcome::KeySeen { noted: false }
        );
        assert_eq!(key_state(&conn, 5).unwrap().new_key_seen_ms, Some(20));

        // Revoke: no key accepted, the previous one dropped; the high-water stays.
        conn.execute_batch("INSERT INTO _cairn_high_water VALUES(5, 42)")
            .unwrap();
        assert_eq!(
            apply(RegistryCommand::Revoke {
                device_id: 5,
                at_ms: 50
            }),
            RegistryOutcome::Revoked { existed: true }
        );
        let k = device_keys(&conn, 5).unwrap().unwrap();
        assert_eq!(k.state.revoked_at_ms, Some(50));
        assert_eq!(k.state.previous_at(60), None);
        assert_eq!(crate::db::registry::high_water(&conn, 5).unwrap(), 42);
        // Batches of a revoked device committed after the revoke are not stored; others are.
        {
            use crate::command::device::{BatchOutcome, apply_device_batches, tests::batch};
            crate::db::schema::create_telemetry(&conn).unwrap();
            let v = [cairn_protocol::Value::U64(1)];
            let batches = [batch(5, 43, &[(9, &v)]), batch(6, 1, &[(9, &v)])];
            let out = apply_device_batches(&conn, &batches, &mut Default::default()).unwrap();
            assert_eq!(
                out,
                vec![
                    BatchOutcome::Revoked,
                    BatchOutcome::Applied { through_seq: 1 }
                ]
            );
            assert_eq!(crate::db::registry::high_water(&conn, 5).unwrap(), 42);
        }
        // A rekey of a revoked device lifts the revocation with the new key only.
        assert_eq!(
            apply(rekey([3; 32], 70)),
            RegistryOutcome::Rekeyed {
                grace_until_ms: None
            }
        );
        let k = device_keys(&conn, 5).unwrap().unwrap();
        assert_eq!((k.key, k.state.revoked_at_ms), ([3; 32], None));
        assert_eq!(k.state.previous_at(71), None);

        // Protocol: 1 or 2, kept by a re-add, forgotten by a remove.
        let set = |version| RegistryCommand::SetProtocol {
            device_id: 5,
            version,
        };
        assert!(matches!(apply(set(3)), RegistryOutcome::KeyRefused(_)));
        assert_eq!(apply(set(1)), RegistryOutcome::ProtocolSet { previous: 2 });
        apply(RegistryCommand::Add {
            device_id: 5,
            key: [4; 32],
        });
        let k = key_state(&conn, 5).unwrap();
        assert_eq!(
            (k.protocol, k.rekeyed_at_ms, k.revoked_at_ms),
            (1, None, None)
        );
        apply(RegistryCommand::Remove { device_id: 5 });
        assert_eq!(key_state(&conn, 5).unwrap(), KeyState::NONE);
    }
}
