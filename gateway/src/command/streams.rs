//! [`Command::Streams`](super::Command::Streams): installing the stream definitions and
//! replaying dead-lettered records.
//!
//! # Entry format
//!
//! [`StreamsCommand::Define`] carries the definitions with `on_mismatch` per stream. It
//! replaces `RegistryCommand::DefineStreams`, whose payload keeps the layout it was written
//! with ([`SchemaV1`], no `on_mismatch`; applied as `"reject"`, what it meant then), so logs
//! and snapshots of earlier releases apply to the same bytes. Entries are postcard: the
//! payload layout of a variant never changes; a definition that needs more fields is a new
//! variant at the end (and waits for the cluster's active version, see docs/DESIGN.md
//! "Operations").

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::dead_letter::{self, Replayed};
use crate::db::dead_letter as table;
use crate::db::schema::{Column, OnMismatch, Schema, StreamDef, Undeclared};

/// A change to the stream definitions, or a replay of dead-lettered records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamsCommand {
    /// Install the stream tables and definitions (proposed by each new leader, and by a node
    /// that reloads its configuration). Also creates `dead_letter`.
    Define(Schema),
    /// Move the `dead_letter` rows of `stream` (of `device`, or all) that fit the current
    /// definitions into their table ([`dead_letter::replay`]).
    Replay { stream: u16, device: Option<u64> },
}

impl std::fmt::Display for StreamsCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamsCommand::Define(s) => write!(f, "define {} streams", s.streams.len()),
            StreamsCommand::Replay {
                stream,
                device: Some(d),
            } => write!(f, "replay stream {stream} of device {d}"),
            StreamsCommand::Replay { stream, .. } => write!(f, "replay stream {stream}"),
        }
    }
}

/// What applying a [`StreamsCommand`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamsOutcome {
    Defined,
    /// Installing the definitions failed (same everywhere); nothing changed.
    Failed(String),
    Replayed(Replayed),
}

/// Installs `schema` in a savepoint: on failure nothing changed and the reason is returned
/// (a result, the same on every replica).
pub fn install(conn: &Connection, schema: &Schema) -> rusqlite::Result<Result<(), String>> {
    conn.execute_batch("SAVEPOINT define_streams")?;
    match schema.install(conn) {
        Ok(()) => {
            conn.execute_batch("RELEASE define_streams")?;
            Ok(Ok(()))
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO define_streams; RELEASE define_streams")?;
            Ok(Err(e.to_string()))
        }
    }
}

/// Applies a streams command (the entry at log index `index`) inside the entry's transaction.
pub fn apply_streams(
    conn: &Connection,
    index: u64,
    cmd: &StreamsCommand,
) -> rusqlite::Result<StreamsOutcome> {
    Ok(match cmd {
        StreamsCommand::Define(schema) => {
            table::create_table(conn)?;
            match install(conn, schema)? {
                Ok(()) => StreamsOutcome::Defined,
                Err(e) => StreamsOutcome::Failed(e),
            }
        }
        StreamsCommand::Replay { stream, device } => {
            // v0.1.0 replicas journal nothing for a replay.
            let journal_at =
                (super::version::read_active(conn)? >= crate::version::V2).then_some(index);
            StreamsOutcome::Replayed(dead_letter::replay(conn, journal_at, *stream, *device)?)
        }
    })
}

/// The stream definitions as `RegistryCommand::DefineStreams` carries them (the layout before
/// `on_mismatch`; frozen).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaV1 {
    pub streams: Vec<StreamDefV1>,
    pub undeclared: Undeclared,
}

/// One stream of a [`SchemaV1`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDefV1 {
    pub id: u16,
    pub table: String,
    pub columns: Vec<Column>,
}

impl From<&SchemaV1> for Schema {
    /// Streams defined before `on_mismatch` existed refused what did not fit.
    fn from(s: &SchemaV1) -> Schema {
        Schema {
            streams: s
                .streams
                .iter()
                .map(|d| StreamDef {
                    id: d.id,
                    table: d.table.clone(),
                    columns: d.columns.clone(),
                    on_mismatch: OnMismatch::Reject,
                })
                .collect(),
            undeclared: s.undeclared,
        }
    }
}

#[cfg(test)]
mod tests {
    use cairn_protocol::Value;

    use super::*;
    use crate::command::device::{ApplyStats, BatchOutcome, apply_device_batches};
    use crate::command::{Command, registry::RegistryCommand};
    use crate::db::schema::ColumnType;

    fn readings(on_mismatch: OnMismatch, columns: &[(&str, ColumnType)]) -> Schema {
        Schema {
            streams: vec![
                StreamDef {
                    id: 1,
                    table: "readings".into(),
                    columns: columns
                        .iter()
                        .map(|(n, t)| Column {
                            name: (*n).into(),
                            ty: *t,
                        })
                        .collect(),
                    on_mismatch,
                },
                StreamDef {
                    id: 2,
                    table: "power".into(),
                    columns: vec![Column {
                        name: "watts".into(),
                        ty: ColumnType::Real,
                    }],
                    on_mismatch,
                },
            ],
            undeclared: Undeclared::Reject,
        }
    }

    const K_TEMP: &[(&str, ColumnType)] = &[
        ("k", ColumnType::Integer),
        ("temperature", ColumnType::Real),
    ];
    const THREE_REALS: &[(&str, ColumnType)] = &[
        ("temperature", ColumnType::Real),
        ("humidity", ColumnType::Real),
        ("pressure", ColumnType::Real),
    ];

    fn rows(conn: &Connection, sql: &str) -> Vec<(i64, i64)> {
        conn.prepare(sql)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn define(conn: &Connection, s: Schema) {
        assert_eq!(
            apply_streams(conn, 1, &StreamsCommand::Define(s)).unwrap(),
            StreamsOutcome::Defined
        );
    }

    /// One bad record between good ones on two streams: all applied and acknowledged, the bad
    /// one in dead_letter once (also when the batch comes again), then replayed into its
    /// stream once the definition fits it.
    #[test]
    fn test_mismatch_dead_lettered_once_then_replayed() {
        let conn = Connection::open_in_memory().unwrap();
        define(&conn, readings(OnMismatch::DeadLetter, K_TEMP));
        let three: &[Value<'_>] = &[Value::F32(20.1), Value::F32(48.0), Value::F32(1013.0)];
        let good: &[Value<'_>] = &[Value::U64(1), Value::F32(20.0)];
        let watts: &[Value<'_>] = &[Value::F64(3.5)];
        let b = crate::command::device::tests::batch(
            7,
            1,
            &[(1, good), (2, watts), (1, three), (2, watts), (1, good)],
        );
        let mut stats = ApplyStats::default();
        let out = apply_device_batches(&conn, &[b.clone(), b], &mut stats).unwrap();
        assert_eq!(
            out,
            vec![
                BatchOutcome::Applied { through_seq: 5 },
                BatchOutcome::Duplicate { through_seq: 5 }
            ]
        );
        assert_eq!(stats.misfits.len(), 1);
        assert_eq!(stats.misfits[0].seq, 3);
        assert!(stats.misfits[0].dead_lettered);
        assert_eq!(
            rows(&conn, "SELECT device_id, seq FROM readings ORDER BY seq"),
            vec![(7, 1), (7, 5)]
        );
        assert_eq!(
            rows(&conn, "SELECT device_id, seq FROM power ORDER BY seq"),
            vec![(7, 2), (7, 4)]
        );
        assert_eq!(
            rows(&conn, "SELECT device_id, seq FROM dead_letter"),
            vec![(7, 3)]
        );
        let (reason, values, time): (String, String, String) = conn
            .query_row(
                "SELECT reason, \"values\", time FROM dead_letter",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert!(reason.contains("received (f32, f32, f32)"), "{reason}");
        // Values as sent (20.1, not 20.100000381469727); time stored as integers, shown as text.
        assert_eq!(values, "[20.1,48,1013]");
        assert_eq!(time, "2026-11-25T18:43:59.002Z");
        let stored: (String, i64, i64) = conn
            .query_row(
                "SELECT received_at, time_ms, age_ms FROM dead_letter",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            stored,
            ("2026-11-25T18:44:00.000Z".into(), 1_795_632_239_002, 998)
        );

        // Still does not fit: a replay leaves it.
        let replay = StreamsCommand::Replay {
            stream: 1,
            device: None,
        };
        assert_eq!(
            apply_streams(&conn, 1, &replay).unwrap(),
            StreamsOutcome::Replayed(Replayed {
                moved: 0,
                remaining: 1
            })
        );
        // The table fixed to three reals: another device's replay moves nothing, this one's
        // moves the row, under the same key and time.
        define(&conn, readings(OnMismatch::DeadLetter, THREE_REALS));
        let other = StreamsCommand::Replay {
            stream: 1,
            device: Some(8),
        };
        assert_eq!(
            apply_streams(&conn, 1, &other).unwrap(),
            StreamsOutcome::Replayed(Replayed::default())
        );
        let mine = StreamsCommand::Replay {
            stream: 1,
            device: Some(7),
        };
        assert_eq!(
            apply_streams(&conn, 1, &mine).unwrap(),
            StreamsOutcome::Replayed(Replayed {
                moved: 1,
                remaining: 0
            })
        );
        let (time, temperature, pressure): (String, f64, f64) = conn
            .query_row(
                "SELECT time, temperature, pressure FROM readings WHERE seq = 3",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            (time.as_str(), temperature, pressure),
            ("2026-11-25T18:43:59.002Z", 20.1, 1013.0)
        );
        assert_eq!(
            rows(&conn, "SELECT device_id, seq FROM dead_letter"),
            vec![]
        );
        assert_eq!(
            apply_streams(&conn, 1, &mine).unwrap(),
            StreamsOutcome::Replayed(Replayed::default())
        );
    }

    #[test]
    fn test_reject_and_undeclared_keep_schema_mismatch() {
        let conn = Connection::open_in_memory().unwrap();
        define(&conn, readings(OnMismatch::Reject, K_TEMP));
        let good: &[Value<'_>] = &[Value::U64(1), Value::F32(20.0)];
        let bad: &[Value<'_>] = &[Value::F32(20.0)];
        let mut stats = ApplyStats::default();
        let batches = [
            crate::command::device::tests::batch(7, 1, &[(1, good), (1, bad)]),
            // Stream 9 is undeclared and undeclared streams are rejected: never dead-lettered.
            crate::command::device::tests::batch(8, 1, &[(9, good)]),
        ];
        let out = apply_device_batches(&conn, &batches, &mut stats).unwrap();
        assert_eq!(
            out,
            vec![BatchOutcome::SchemaMismatch, BatchOutcome::SchemaMismatch]
        );
        // Both logged, neither stored.
        let refused: Vec<_> = stats
            .misfits
            .iter()
            .map(|m| (m.device_id, m.seq, m.dead_lettered))
            .collect();
        assert_eq!(refused, vec![(7, 2, false), (8, 1, false)]);
        assert!(stats.misfits[0].reason.contains("received (f32)"));
        assert_eq!(rows(&conn, "SELECT device_id, seq FROM readings"), vec![]);
        assert_eq!(
            rows(&conn, "SELECT device_id, seq FROM dead_letter"),
            vec![]
        );
        assert_eq!(crate::db::registry::high_water(&conn, 7).unwrap(), 0);
    }

    /// A user table named `dead_letter` that cannot take the rows: the batch is refused as
    /// before (nothing lost, the device keeps it), not a failed apply.
    #[test]
    fn test_unusable_dead_letter_table_refuses_the_batch() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE dead_letter (note TEXT)")
            .unwrap();
        define(&conn, readings(OnMismatch::DeadLetter, K_TEMP));
        let bad: &[Value<'_>] = &[Value::F32(20.0)];
        let mut stats = ApplyStats::default();
        let out = apply_device_batches(
            &conn,
            &[crate::command::device::tests::batch(7, 1, &[(1, bad)])],
            &mut stats,
        )
        .unwrap();
        assert_eq!(out, vec![BatchOutcome::SchemaMismatch]);
        assert!(
            stats.misfits[0].reason.contains("cannot take it"),
            "{:?}",
            stats.misfits
        );
        assert_eq!(crate::db::registry::high_water(&conn, 7).unwrap(), 0);
    }

    /// An entry written by an earlier release (`DefineStreams` without `on_mismatch`) still
    /// decodes, and its streams still refuse what does not fit, as they did then; so do
    /// definitions stored in `_cairn_streams` by that release.
    #[test]
    fn test_legacy_definitions_apply_as_reject() {
        let legacy = SchemaV1 {
            streams: vec![StreamDefV1 {
                id: 1,
                table: "readings".into(),
                columns: vec![Column {
                    name: "k".into(),
                    ty: ColumnType::Integer,
                }],
            }],
            undeclared: Undeclared::Telemetry,
        };
        let bytes = postcard::to_allocvec(&Command::DeviceRegistry(
            RegistryCommand::DefineStreams(legacy.clone()),
        ))
        .unwrap();
        // Variant 2 (DeviceRegistry), variant 2 (DefineStreams), one stream, id 1, "readings".
        assert_eq!(&bytes[..5], &[2, 2, 1, 1, 8]);
        let Command::DeviceRegistry(RegistryCommand::DefineStreams(back)) =
            postcard::from_bytes(&bytes).unwrap()
        else {
            panic!("decoded to another command");
        };
        assert_eq!(back, legacy);
        let conn = Connection::open_in_memory().unwrap();
        crate::command::registry::apply_registry(&conn, &RegistryCommand::DefineStreams(back))
            .unwrap();
        assert_eq!(
            Schema::load(&conn).unwrap().streams[0].on_mismatch,
            OnMismatch::Reject
        );
        // What that release stored: no on_mismatch key.
        conn.execute(
            "UPDATE _cairn_streams SET value = '{\"streams\":[{\"id\":1,\"table\":\"readings\",\
             \"columns\":[{\"name\":\"k\",\"type\":\"integer\"}]}],\"undeclared\":\"telemetry\"}'",
            [],
        )
        .unwrap();
        assert_eq!(Schema::load(&conn).unwrap(), Schema::from(&legacy));
        let out = apply_device_batches(
            &conn,
            &[crate::command::device::tests::batch(
                7,
                1,
                &[(1, &[Value::Str("x")])],
            )],
            &mut ApplyStats::default(),
        )
        .unwrap();
        assert_eq!(out, vec![BatchOutcome::SchemaMismatch]);
        // Definitions that do not parse stop the apply instead of falling back to none.
        conn.execute("UPDATE _cairn_streams SET value = '{\"streams\": 5}'", [])
            .unwrap();
        assert!(Schema::load(&conn).is_err());
    }
}
