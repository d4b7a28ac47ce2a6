//! Applying [`Command::DeviceBatches`](super::Command::DeviceBatches): one Raft entry
//! holding batches of many devices, applied in the entry's single SQLite transaction together
//! with each device's new high-water seq.
//!
//! Per batch, in entry order (the same on every replica):
//! 0. the device is revoked (`cairn device revoke`, an earlier entry): [`BatchOutcome::Revoked`],
//!    nothing written (a batch read before the revoke but committed after it is not stored);
//!    in a `Command::SessionBatches` entry, the batch was read in a session of the device
//!    that a later `RegistryCommand::OpenSession` replaced: [`BatchOutcome::Stale`], nothing
//!    written (the device was welcomed again with a high-water that did not count it, and
//!    may already have sent other records under the same seqs);
//! 1. `last_seq <= high_water`: already stored, [`BatchOutcome::Duplicate`] (acked through the
//!    high-water, not applied);
//! 2. `first_seq > high_water + 1`: records are missing before it, [`BatchOutcome::Gap`];
//! 3. a record that does not fit its stream's table and may not be dead-lettered (its stream
//!    says `on_mismatch = "reject"`, or it is undeclared and `undeclared_streams = "reject"`):
//!    [`BatchOutcome::SchemaMismatch`], nothing of the batch is written;
//! 4. otherwise the records above the high-water are inserted (those that do not fit their
//!    stream into `dead_letter`, see [`super::dead_letter`]) and the high-water becomes
//!    `last_seq`: [`BatchOutcome::Applied`].
//!
//! Time: the receiving gateway stamps `received_at_ms` (its clock; the proposer raises it to
//! the entry's stamp minus `raft::proposer::RECEIVE_SLACK_MS`) before proposing; a record
//! taken at device uptime `u` is stored with `time_ms = received_at_ms - (sent_uptime_ms - u)`
//! and `age_ms = received_at_ms - time_ms` (the generated `time` and `received_at` columns show
//! them as text, see `db::schema`). Both inputs are in the entry, so every replica stores the
//! same integers. A record's time never goes below the device's previous stored record
//! ([`tables::DEVICE_TIMES`](crate::db::tables::DEVICE_TIMES)): the offset `received_at_ms -
//! sent_uptime_ms` moves with network delay from batch to batch, and a gateway's clock can
//! be stepped back (NTP) or differ from the last gateway's after a failover. The floored
//! record keeps `age_ms >= 0`.

use std::collections::HashMap;

use cairn_protocol::{BatchHeader, BatchView, RecordView};
use rusqlite::types::ToSqlOutput;
use rusqlite::{CachedStatement, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::ApplyContext;
use super::dead_letter::{self, DeadLetters, Placement};
use crate::db::registry::create_tables;
use crate::db::schema::{Schema, TELEMETRY_TABLE, column_value, int, values_json};
use crate::db::tables::{DEVICE_TIMES as DEVICE_TIMES_TABLE, HIGH_WATER as HIGH_WATER_TABLE};

/// One device's batch as it travels in the log: the authenticated, decrypted Batch body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBatch {
    pub device_id: u64,
    /// Unix ms on the receiving gateway's clock when the frame was read.
    pub received_at_ms: i64,
    /// The Batch body (clear text, validated with `BatchView::parse` before proposing).
    #[serde(with = "serde_bytes_vec")]
    pub body: Vec<u8>,
    /// The device session the batch was read in (`RegistryCommand::OpenSession`; 0: none).
    /// Not part of this struct's encoding (entries of version 1 have none): it travels in
    /// `Command::SessionBatches` and in the session-aware forward.
    #[serde(skip)]
    pub session: u64,
}

/// Bytes as one postcard byte string rather than a sequence of u8 (same bytes in postcard,
/// but far more compact in any self-describing format).
pub(super) mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

impl DeviceBatch {
    /// The parsed body. Bodies are validated before they are proposed, so this fails only for
    /// an entry written by a broken node; every replica then answers `Malformed` alike.
    pub fn view(&self) -> Option<BatchView<'_>> {
        BatchView::parse(&self.body).ok()
    }
}

/// What became of one batch; the ingress turns it into an Ack or an Error for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchOutcome {
    /// Stored; every record through `through_seq` is committed.
    Applied { through_seq: u64 },
    /// Already stored before; `through_seq` is the device's high-water (SPEC §8 rule 3).
    Duplicate { through_seq: u64 },
    /// Refused: the batch starts above `high_water + 1`.
    Gap { high_water: u64 },
    /// Refused: a record does not fit its stream (or the stream is undeclared and rejected).
    SchemaMismatch,
    /// Refused: the body does not parse.
    Malformed,
    /// Refused: the device was revoked by an earlier entry.
    Revoked,
    /// Not stored: read in a session of the device that a later one replaced (the device
    /// connected again, possibly elsewhere, and was welcomed with a high-water that did not
    /// count this batch). The connection it came from is closed.
    Stale,
}

/// Statistics of one applied entry, for the metrics and the dead-letter warnings.
#[derive(Debug, Default, Clone)]
pub struct ApplyStats {
    pub batches: u64,
    pub records: u64,
    /// Records that did not fit (dead-lettered, or the first of a refused batch).
    pub misfits: Vec<dead_letter::Misfit>,
    /// When `Some` (someone subscribes to the [`Feed`](super::feed::Feed)): per stored
    /// batch, its index in the entry and the first seq stored.
    pub stored: Option<Vec<(usize, u64)>>,
    /// Per stored batch (always): its index in the entry and the first seq stored, for the
    /// export journal (`db::export`).
    pub journal: Vec<(usize, u64)>,
}

/// The stored time (Unix ms) of a record taken at device uptime `uptime_ms`, in a batch sent
/// at `sent_uptime_ms` and read at `received_at_ms` (see the module doc).
pub fn record_time_ms(received_at_ms: i64, sent_uptime_ms: u64, uptime_ms: u64) -> i64 {
    let age = sent_uptime_ms.saturating_sub(uptime_ms);
    received_at_ms.saturating_sub(age.min(i64::MAX as u64) as i64)
}

/// A record's stored time columns: `time_ms` (when the device took it) and `age_ms` (how long
/// it waited before the gateway read it; `received_at` is `time_ms + age_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordTime {
    pub time_ms: i64,
    pub age_ms: i64,
}

impl RecordTime {
    /// Record `r` taken at device uptime `r.uptime_ms`, in a batch sealed at
    /// `h.sent_uptime_ms` and read at `received_at_ms` (see the module documentation). A
    /// record cannot be younger than its batch; a device that says so gets age 0.
    pub fn of(received_at_ms: i64, h: &BatchHeader, r: &RecordView<'_>) -> Self {
        let time_ms = record_time_ms(received_at_ms, h.sent_uptime_ms, r.uptime_ms);
        RecordTime {
            time_ms,
            age_ms: received_at_ms.saturating_sub(time_ms),
        }
    }

    /// This time, or `floor` (the device's previous record) when it is earlier; the age
    /// shrinks by as much, never below 0.
    pub fn at_least(self, floor: Option<i64>) -> Self {
        match floor {
            Some(f) if f > self.time_ms => RecordTime {
                time_ms: f,
                age_ms: self
                    .age_ms
                    .saturating_sub(f.saturating_sub(self.time_ms))
                    .max(0),
            },
            _ => self,
        }
    }
}

/// Insert statements, prepared once per entry and per table.
pub(crate) struct Inserts<'c> {
    conn: &'c Connection,
    pub(crate) schema: Schema,
    by_stream: HashMap<u16, CachedStatement<'c>>,
    telemetry: Option<CachedStatement<'c>>,
}

impl<'c> Inserts<'c> {
    pub(crate) fn new(conn: &'c Connection, schema: Schema) -> Self {
        // Room for every stream table's insert next to the SQL API's statements.
        conn.set_prepared_statement_cache_capacity(64 + schema.streams.len());
        Inserts {
            conn,
            schema,
            by_stream: HashMap::new(),
            telemetry: None,
        }
    }

    /// Stores record `r` of device `device_id` with time `t` in its stream's table, or
    /// `telemetry`; the rows written (0 if the key was already there). The record must fit
    /// (checked by [`dead_letter::placements`]).
    pub(crate) fn store(
        &mut self,
        device_id: u64,
        r: &RecordView<'_>,
        t: RecordTime,
    ) -> rusqlite::Result<usize> {
        let RecordTime { time_ms, age_ms } = t;
        let dev = int(device_id as i64);
        let seq = int(r.seq as i64);
        match self.schema.stream(r.stream) {
            Some(def) => {
                let stmt = match self.by_stream.entry(r.stream) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        // Built once per entry and stream: pushed, not formatted piece by piece.
                        use std::fmt::Write;
                        let mut sql = String::with_capacity(128);
                        sql.push_str("INSERT OR IGNORE INTO \"");
                        sql.push_str(&def.table);
                        sql.push_str("\" (device_id, seq, time_ms, age_ms");
                        for c in &def.columns {
                            sql.push_str(", \"");
                            sql.push_str(&c.name);
                            sql.push('"');
                        }
                        sql.push_str(") VALUES (?1, ?2, ?3, ?4");
                        for i in 0..def.columns.len() {
                            let _ = write!(sql, ", ?{}", i + 5);
                        }
                        sql.push(')');
                        e.insert(self.conn.prepare_cached(&sql)?)
                    }
                };
                let mut params: Vec<ToSqlOutput<'_>> = Vec::with_capacity(4 + def.columns.len());
                params.push(dev);
                params.push(seq);
                params.push(int(time_ms));
                params.push(int(age_ms));
                for (v, c) in r.values().zip(&def.columns) {
                    // Checked by `dead_letter::placements` before any insert of this batch.
                    params.push(column_value(c.ty, &v).ok_or(rusqlite::Error::InvalidQuery)?);
                }
                stmt.execute(rusqlite::params_from_iter(params.iter()))
            }
            None => {
                let stmt = match &mut self.telemetry {
                    Some(s) => s,
                    slot => slot.insert({
                        // Also when no definitions were ever applied (see `create_telemetry`);
                        // once per entry that writes here, not on every entry.
                        crate::db::schema::create_telemetry(self.conn)?;
                        self.conn.prepare_cached(&format!(
                        "INSERT OR IGNORE INTO {TELEMETRY_TABLE} \
                         (device_id, seq, stream, time_ms, age_ms, \"values\") VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                        ))?
                    }),
                };
                stmt.execute(rusqlite::params![
                    dev,
                    seq,
                    i64::from(r.stream),
                    time_ms,
                    age_ms,
                    values_json(r.values())
                ])
            }
        }
    }
}

/// The command's apply function: [`apply_device_batches`] plus this replica's metrics and
/// its [`Feed`](super::feed::Feed) of stored records.
pub fn apply(
    conn: &Connection,
    ctx: &ApplyContext<'_>,
    batches: &[DeviceBatch],
    sessions: Option<&[u64]>,
) -> rusqlite::Result<Vec<BatchOutcome>> {
    use std::sync::atomic::Ordering::Relaxed;
    let m = ctx.metrics;
    let mut stats = ApplyStats {
        stored: ctx.feed.wanted().then(Vec::new),
        ..ApplyStats::default()
    };
    let out = apply_in_sessions(conn, batches, sessions, &mut stats)?;
    dead_letter::report(m, &stats.misfits);
    let journal: Vec<_> = stats
        .journal
        .iter()
        .filter_map(|&(i, from)| {
            let last = batches[i].view()?.header().last_seq();
            let b = &batches[i];
            Some((i as u32, b.device_id, from, last, b.received_at_ms))
        })
        .collect();
    crate::db::export::journal(conn, ctx.index, &journal)?;
    for &(i, from_seq) in stats.stored.iter().flatten() {
        ctx.feed.stage(&batches[i], from_seq);
    }
    m.batches_applied.fetch_add(stats.batches, Relaxed);
    m.records_applied.fetch_add(stats.records, Relaxed);
    let dups = out
        .iter()
        .filter(|o| matches!(o, BatchOutcome::Duplicate { .. }))
        .count();
    m.batches_duplicate.fetch_add(dups as u64, Relaxed);
    Ok(out)
}

/// Applies a group of device batches inside the entry's transaction; one outcome per batch.
pub fn apply_device_batches(
    conn: &Connection,
    batches: &[DeviceBatch],
    stats: &mut ApplyStats,
) -> rusqlite::Result<Vec<BatchOutcome>> {
    apply_in_sessions(conn, batches, None, stats)
}

/// The high-water and record-time statements of [`apply_in_sessions`], built once (their
/// text is the statement cache's key; formatting it per entry cost a few percent of apply).
static STATEMENTS: std::sync::LazyLock<[String; 4]> = std::sync::LazyLock::new(|| {
    [
        format!("SELECT seq FROM {HIGH_WATER_TABLE} WHERE device_id = ?1"),
        format!(
            "INSERT INTO {HIGH_WATER_TABLE}(device_id, seq) VALUES (?1, ?2) \
             ON CONFLICT(device_id) DO UPDATE SET seq = excluded.seq"
        ),
        format!("SELECT time_ms FROM {DEVICE_TIMES_TABLE} WHERE device_id = ?1"),
        format!(
            "INSERT INTO {DEVICE_TIMES_TABLE}(device_id, time_ms) VALUES (?1, ?2) \
             ON CONFLICT(device_id) DO UPDATE SET time_ms = excluded.time_ms"
        ),
    ]
});

/// [`apply_device_batches`] of `Command::SessionBatches`: with `sessions` (one per batch), a
/// batch whose session is not the device's current one is [`BatchOutcome::Stale`].
pub fn apply_in_sessions(
    conn: &Connection,
    batches: &[DeviceBatch],
    sessions: Option<&[u64]>,
    stats: &mut ApplyStats,
) -> rusqlite::Result<Vec<BatchOutcome>> {
    create_tables(conn)?;
    let mut inserts = Inserts::new(conn, Schema::load(conn)?);
    let mut dead = DeadLetters::new(conn);
    let [get_hw, set_hw, get_time, set_time] = &*STATEMENTS;
    let mut get_hw = conn.prepare_cached(get_hw)?;
    let mut set_hw = conn.prepare_cached(set_hw)?;
    let mut get_time = conn.prepare_cached(get_time)?;
    let mut set_time = conn.prepare_cached(set_time)?;
    let revoked = crate::db::registry::revoked_devices(conn)?;
    let mut out = Vec::with_capacity(batches.len());
    for (i, b) in batches.iter().enumerate() {
        if revoked.contains(&b.device_id) {
            out.push(BatchOutcome::Revoked);
            continue;
        }
        if let Some(sessions) = sessions
            && sessions.get(i).copied().unwrap_or(0)
                != crate::db::registry::current_session(conn, b.device_id)?
        {
            out.push(BatchOutcome::Stale);
            continue;
        }
        let Some(view) = b.view() else {
            out.push(BatchOutcome::Malformed);
            continue;
        };
        let h = view.header();
        let hw = get_hw
            .query_row([b.device_id as i64], |r| r.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0) as u64;
        let last = h.last_seq();
        if last <= hw {
            out.push(BatchOutcome::Duplicate { through_seq: hw });
            continue;
        }
        // Checked: a high-water of u64::MAX has no next seq (every batch is a duplicate).
        if hw.checked_add(1).is_none_or(|next| h.first_seq > next) {
            out.push(BatchOutcome::Gap { high_water: hw });
            continue;
        }
        let Some(placements) = dead_letter::placements(&inserts.schema, &view) else {
            stats
                .misfits
                .extend(dead_letter::refusal(&inserts.schema, b, &view));
            out.push(BatchOutcome::SchemaMismatch);
            continue;
        };
        if let Some(refused) = dead.refuse_if_unusable(b, &view, &placements)? {
            stats.misfits.push(refused);
            out.push(BatchOutcome::SchemaMismatch);
            continue;
        }
        let mut floor: Option<i64> = get_time
            .query_row([b.device_id as i64], |r| r.get(0))
            .optional()?;
        for (r, place) in view.records().zip(placements) {
            let r = r.map_err(|_| rusqlite::Error::InvalidQuery)?;
            if r.seq <= hw {
                continue;
            }
            let time = RecordTime::of(b.received_at_ms, &h, &r).at_least(floor);
            floor = Some(time.time_ms);
            match place {
                Placement::Store => {
                    inserts.store(b.device_id, &r, time)?;
                }
                Placement::DeadLetter => {
                    let event = dead.insert(&inserts.schema, b, &h, &r, time)?;
                    stats.misfits.push(event);
                }
            }
            stats.records += 1;
        }
        if let Some(t) = floor {
            set_time.execute([b.device_id as i64, t])?;
        }
        set_hw.execute([b.device_id as i64, last as i64])?;
        stats.journal.push((i, hw + 1));
        if let Some(stored) = &mut stats.stored {
            stored.push((i, hw + 1));
        }
        stats.batches += 1;
        out.push(BatchOutcome::Applied { through_seq: last });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use cairn_protocol::{BatchEncoder, MAX_FRAME, Record, Value};

    use super::*;
    use crate::db::schema::Undeclared;

    pub(crate) fn batch(
        device_id: u64,
        first_seq: u64,
        records: &[(u16, &[Value<'_>])],
    ) -> DeviceBatch {
        let mut buf = [0u8; MAX_FRAME];
        let mut enc = BatchEncoder::new(&mut buf, first_seq, 10_000);
        for (i, (stream, values)) in records.iter().enumerate() {
            enc.push(&Record {
                stream: *stream,
                uptime_ms: 9_000 + i as u64,
                values,
            })
            .unwrap();
        }
        let view = enc.finish().unwrap();
        DeviceBatch {
            device_id,
            received_at_ms: 1_795_632_240_000,
            body: view.as_bytes().to_vec(),
            session: 0,
        }
    }

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        let mut schema = crate::db::schema::test_climate();
        // Today's refusal; dead-lettering is tested in `command::streams`.
        schema.streams[0].on_mismatch = crate::db::schema::OnMismatch::Reject;
        schema.install(&conn).unwrap();
        conn
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    /// A batch applied before any stream definitions (a leader whose DefineStreams entry was
    /// not committed) used to fail with "no such table: telemetry", fatal on every replica.
    #[test]
    fn test_batch_before_any_definitions_goes_to_telemetry() {
        let conn = Connection::open_in_memory().unwrap();
        let b = batch(9, 1, &[(4, &[Value::F32(1.5)]), (4, &[Value::F32(2.5)])]);
        let mut stats = ApplyStats::default();
        let out = apply_device_batches(&conn, &[b], &mut stats).unwrap();
        assert_eq!(out, vec![BatchOutcome::Applied { through_seq: 2 }]);
        assert_eq!(count(&conn, TELEMETRY_TABLE), 2);
    }

    /// The race a device's power cut opens: its batch of seqs 1..=2 read in session 1 is
    /// still on its way (forwarded by another gateway) when the device, rebooted without
    /// those records, is welcomed in session 2 with high-water 0 and sends other records
    /// under the same seqs. The late batch must not take their seqs: it is `Stale`, and the
    /// new session's records are stored.
    #[test]
    fn test_batch_of_a_replaced_session_is_not_stored() {
        let conn = db();
        let mut stats = ApplyStats::default();
        let old = batch(5, 1, &[(9, &[Value::I64(111)]), (9, &[Value::I64(112)])]);
        let new = batch(5, 1, &[(9, &[Value::I64(221)]), (9, &[Value::I64(222)])]);
        assert_eq!(crate::db::registry::current_session(&conn, 5).unwrap(), 0);
        assert_eq!(crate::db::registry::open_session(&conn, 5).unwrap(), 1);
        assert_eq!(crate::db::registry::open_session(&conn, 5).unwrap(), 2);
        let out = apply_in_sessions(&conn, &[old.clone(), new], Some(&[1, 2]), &mut stats).unwrap();
        assert_eq!(
            out,
            vec![
                BatchOutcome::Stale,
                BatchOutcome::Applied { through_seq: 2 }
            ]
        );
        let values: Vec<String> = conn
            .prepare("SELECT \"values\" FROM telemetry WHERE device_id = 5 ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(values, ["[221]", "[222]"]);
        // A batch without a session (read before version 2, or proposed as version 1 wrote
        // them) is stale once the device has one; another device's is not.
        let other = batch(6, 1, &[(9, &[Value::I64(1)])]);
        let out = apply_in_sessions(&conn, &[old, other], Some(&[0, 0]), &mut stats).unwrap();
        assert_eq!(
            out,
            vec![
                BatchOutcome::Stale,
                BatchOutcome::Applied { through_seq: 1 }
            ]
        );
    }

    #[test]
    fn test_same_batch_three_times_stored_once() {
        let conn = db();
        let b = batch(
            7,
            1,
            &[
                (1, &[Value::F32(20.5)]),
                (9, &[Value::I64(-3), Value::Str("x")]),
            ],
        );
        let mut stats = ApplyStats::default();
        let out = apply_device_batches(&conn, &[b.clone(), b.clone()], &mut stats).unwrap();
        assert_eq!(
            out,
            vec![
                BatchOutcome::Applied { through_seq: 2 },
                BatchOutcome::Duplicate { through_seq: 2 }
            ]
        );
        let out = apply_device_batches(&conn, &[b], &mut stats).unwrap();
        assert_eq!(out, vec![BatchOutcome::Duplicate { through_seq: 2 }]);
        assert_eq!(count(&conn, "climate"), 1);
        assert_eq!(count(&conn, "telemetry"), 1);
        let (time, received, temp): (String, String, f64) = conn
            .query_row(
                "SELECT time, received_at, temperature FROM climate",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(received, "2026-11-25T18:44:00.000Z");
        assert_eq!(time, "2026-11-25T18:43:59.000Z");
        assert_eq!(temp, 20.5);
        let values: String = conn
            .query_row("SELECT \"values\" FROM telemetry WHERE seq = 2", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(values, r#"[-3,"x"]"#);
        assert_eq!(stats.records, 2);
    }

    /// Batch 2 read 400 ms earlier relative to the device's uptime than batch 1 (less network
    /// delay, or the gateway's clock stepped back): its records are stored at the previous
    /// record's time, never before it, with the age shrunk (not below 0); records of
    /// undeclared streams (`telemetry`) too.
    #[test]
    fn test_record_time_never_goes_back() {
        let conn = db();
        let v: &[Value<'_>] = &[Value::F64(1.0)];
        let first = batch(1, 1, &[(1, v), (1, v)]);
        let mut second = batch(1, 3, &[(1, v), (9, v)]);
        second.received_at_ms = first.received_at_ms - 400;
        let mut stats = ApplyStats::default();
        apply_device_batches(&conn, &[first, second], &mut stats).unwrap();
        let times: Vec<(i64, i64, i64)> = conn
            .prepare(
                "SELECT seq, time_ms, age_ms FROM climate \
                 UNION ALL SELECT seq, time_ms, age_ms FROM telemetry ORDER BY seq",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let t0 = 1_795_632_240_000;
        // Records at uptime 9,000 and 9,001 of batches sealed at uptime 10,000.
        assert_eq!(
            times,
            [
                (1, t0 - 1_000, 1_000),
                (2, t0 - 999, 999),
                (3, t0 - 999, 599),
                (4, t0 - 999, 599)
            ]
        );
        let floor: i64 = conn
            .query_row(
                "SELECT time_ms FROM _cairn_device_times WHERE device_id = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(floor, t0 - 999);
        // A gateway clock far behind: the age never goes negative.
        let mut late = batch(1, 5, &[(1, v)]);
        late.received_at_ms = t0 - 60_000;
        apply_device_batches(&conn, &[late], &mut stats).unwrap();
        let (time, age): (i64, i64) = conn
            .query_row(
                "SELECT time_ms, age_ms FROM climate WHERE seq = 5",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((time, age), (t0 - 999, 0));
    }

    #[test]
    fn test_overlap_gap_and_mismatch() {
        let conn = db();
        let mut stats = ApplyStats::default();
        let v: &[Value<'_>] = &[Value::F64(1.0)];
        let first = batch(1, 1, &[(1, v), (1, v), (1, v)]);
        let overlap = batch(1, 2, &[(1, v), (1, v), (1, v)]);
        let gap = batch(1, 9, &[(1, v)]);
        let wrong_type = batch(1, 5, &[(1, v), (1, &[Value::Str("hot")])]);
        let wrong_count = batch(1, 5, &[(1, &[])]);
        let out = apply_device_batches(
            &conn,
            &[first, overlap, gap, wrong_type, wrong_count],
            &mut stats,
        )
        .unwrap();
        assert_eq!(
            out,
            vec![
                BatchOutcome::Applied { through_seq: 3 },
                BatchOutcome::Applied { through_seq: 4 },
                BatchOutcome::Gap { high_water: 4 },
                BatchOutcome::SchemaMismatch,
                BatchOutcome::SchemaMismatch,
            ]
        );
        assert_eq!(count(&conn, "climate"), 4);
        assert_eq!(crate::db::registry::high_water(&conn, 1).unwrap(), 4);
    }

    #[test]
    fn test_undeclared_rejected() {
        let conn = Connection::open_in_memory().unwrap();
        Schema {
            streams: vec![],
            undeclared: Undeclared::Reject,
        }
        .install(&conn)
        .unwrap();
        let out = apply_device_batches(
            &conn,
            &[batch(1, 1, &[(4, &[Value::Bool(true)])])],
            &mut ApplyStats::default(),
        )
        .unwrap();
        assert_eq!(out, vec![BatchOutcome::SchemaMismatch]);
        assert_eq!(count(&conn, "telemetry"), 0);
    }

    #[test]
    fn test_postcard_round_trip() {
        let b = batch(3, 1, &[(1, &[Value::F32(1.0)])]);
        let bytes = postcard::to_allocvec(&b).unwrap();
        assert!(bytes.len() < b.body.len() + 16);
        assert_eq!(postcard::from_bytes::<DeviceBatch>(&bytes).unwrap(), b);
    }
}
