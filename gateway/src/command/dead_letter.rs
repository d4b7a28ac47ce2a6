//! Records that do not fit their stream: where a device batch's records go
//! ([`placements`]), writing them to `dead_letter` ([`DeadLetters`]), and moving them back
//! into their stream once the definitions fit them ([`replay`], the apply of
//! [`StreamsCommand::Replay`](super::streams::StreamsCommand::Replay)). The table is
//! [`crate::db::dead_letter`].
//!
//! Exactly-once: a dead-lettered record is applied like any other (the device's high-water
//! moves past it in the same transaction, and it is acknowledged), so it is written once, to
//! one table; a replay deletes the row in the transaction that inserts it into the stream.

use cairn_protocol::{BatchEncoder, BatchHeader, BatchView, MAX_FRAME, Record, RecordView, Value};
use rusqlite::{CachedStatement, Connection};
use serde::{Deserialize, Serialize};

use super::device::{DeviceBatch, Inserts, RecordTime};
use crate::db::dead_letter as table;
use crate::db::schema::{OnMismatch, Schema, Undeclared, values_json};
use crate::metrics::Metrics;

/// Where one record of a batch goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Its stream's table (it fits), or `telemetry` (undeclared stream, stored there).
    Store,
    /// `dead_letter`: it does not fit and its stream dead-letters.
    DeadLetter,
}

/// Where each record of `view` goes, in order; `None` if the batch is refused with
/// `SchemaMismatch` (a record of a `reject` stream does not fit, an undeclared stream is
/// rejected, or a record does not parse). Undeclared streams are never dead-lettered.
pub fn placements(schema: &Schema, view: &BatchView<'_>) -> Option<Vec<Placement>> {
    view.records()
        .map(|r| {
            let r = r.ok()?;
            match schema.stream(r.stream) {
                Some(def) if table::fits(def, &r) => Some(Placement::Store),
                Some(def) => match def.on_mismatch {
                    OnMismatch::DeadLetter => Some(Placement::DeadLetter),
                    OnMismatch::Reject => None,
                },
                None => (schema.undeclared == Undeclared::Telemetry).then_some(Placement::Store),
            }
        })
        .collect()
}

/// A record that did not fit its stream, for this replica's counters and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit {
    pub device_id: u64,
    pub stream: u16,
    pub seq: u64,
    pub reason: String,
    /// Written to `dead_letter` (else its batch was refused with `SchemaMismatch`).
    pub dead_lettered: bool,
}

/// The first record of `b` that makes [`placements`] refuse it, with the reason.
pub fn refusal(schema: &Schema, b: &DeviceBatch, view: &BatchView<'_>) -> Option<Misfit> {
    view.records().find_map(|r| {
        let r = r.ok()?;
        let reason = match schema.stream(r.stream) {
            Some(def) if def.on_mismatch == OnMismatch::Reject && !table::fits(def, &r) => {
                table::reason(def, &r)
            }
            None if schema.undeclared == Undeclared::Reject => format!(
                "stream {} is not declared and undeclared_streams = \"reject\"",
                r.stream
            ),
            _ => return None,
        };
        Some(Misfit {
            device_id: b.device_id,
            stream: r.stream,
            seq: r.seq,
            reason,
            dead_lettered: false,
        })
    })
}

/// The `dead_letter` insert, prepared at the first dead-lettered record of an entry.
pub struct DeadLetters<'c> {
    conn: &'c Connection,
    insert: Option<CachedStatement<'c>>,
}

impl<'c> DeadLetters<'c> {
    pub fn new(conn: &'c Connection) -> Self {
        DeadLetters { conn, insert: None }
    }

    /// Before any record of batch `b` is written: if some go to `dead_letter` (per
    /// `places`) and the table cannot take them (a user table of that name with other
    /// columns), the batch is refused with `SchemaMismatch` instead (nothing written, the
    /// device keeps it) and this says why. The same on every replica: it depends on the
    /// database only (an SQLite error of the plain "SQL error" kind; storage failures stay
    /// errors).
    pub fn refuse_if_unusable(
        &mut self,
        b: &DeviceBatch,
        view: &BatchView<'_>,
        places: &[Placement],
    ) -> rusqlite::Result<Option<Misfit>> {
        if self.insert.is_some() || !places.contains(&Placement::DeadLetter) {
            return Ok(None);
        }
        table::create_table(self.conn)?;
        let why = match self.conn.prepare_cached(&table::insert_sql()) {
            Ok(stmt) => {
                self.insert = Some(stmt);
                return Ok(None);
            }
            Err(rusqlite::Error::SqliteFailure(e, msg))
                if e.code == rusqlite::ErrorCode::Unknown =>
            {
                msg.unwrap_or_default()
            }
            Err(e) => return Err(e),
        };
        let r = view
            .records()
            .zip(places)
            .find_map(|(r, p)| (*p == Placement::DeadLetter).then_some(r.ok()?))
            .expect("a dead-lettered record");
        Ok(Some(Misfit {
            device_id: b.device_id,
            stream: r.stream,
            seq: r.seq,
            reason: format!(
                "table {} cannot take it: {why}",
                crate::db::tables::DEAD_LETTER
            ),
            dead_lettered: false,
        }))
    }

    /// Writes record `r` of batch `b` (header `h`, stored at `time`) to `dead_letter` with the
    /// reason it does not fit its stream in `schema`.
    pub fn insert(
        &mut self,
        schema: &Schema,
        b: &DeviceBatch,
        h: &BatchHeader,
        r: &RecordView<'_>,
        time: RecordTime,
    ) -> rusqlite::Result<Misfit> {
        let reason = schema
            .stream(r.stream)
            .map(|def| table::reason(def, r))
            .unwrap_or_else(|| format!("stream {} is not declared", r.stream));
        let record = one_record(b, h, r)?;
        let stmt = match &mut self.insert {
            Some(s) => s,
            slot => slot.insert({
                table::create_table(self.conn)?;
                self.conn.prepare_cached(&table::insert_sql())?
            }),
        };
        stmt.execute(rusqlite::params![
            b.device_id as i64,
            r.seq as i64,
            i64::from(r.stream),
            &reason,
            values_json(r.values()),
            record,
            time.time_ms,
            time.age_ms,
        ])?;
        Ok(Misfit {
            device_id: b.device_id,
            stream: r.stream,
            seq: r.seq,
            reason,
            dead_lettered: true,
        })
    }
}

/// Record `r` of `b` as a batch of its own (same device, seq, uptimes and reception time),
/// postcard-encoded: the `record` column. A replay stores it exactly as a direct apply would.
fn one_record(b: &DeviceBatch, h: &BatchHeader, r: &RecordView<'_>) -> rusqlite::Result<Vec<u8>> {
    let bad = |what: &str| {
        rusqlite::Error::ToSqlConversionFailure(format!("dead-letter record: {what}").into())
    };
    let values: Vec<Value<'_>> = r.values().collect();
    let mut buf = [0u8; MAX_FRAME];
    let mut enc = BatchEncoder::new(&mut buf, r.seq, h.sent_uptime_ms);
    enc.push(&Record {
        stream: r.stream,
        uptime_ms: r.uptime_ms,
        values: &values,
    })
    .map_err(|e| bad(&e.to_string()))?;
    let view = enc.finish().map_err(|e| bad(&e.to_string()))?;
    let one = DeviceBatch {
        device_id: b.device_id,
        received_at_ms: b.received_at_ms,
        body: view.as_bytes().to_vec(),
        session: b.session,
    };
    postcard::to_allocvec(&one).map_err(|e| bad(&e.to_string()))
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Replayed {
    /// Rows moved into their stream's table (or `telemetry`, for a stream no longer declared).
    pub moved: u64,
    /// Rows of the stream left in `dead_letter` (they still do not fit).
    pub remaining: u64,
}

/// Moves the `dead_letter` rows of `stream` (of `device`, or every device) that fit the
/// current stream definitions into their table under the same `(device_id, seq)`. A row whose
/// key is already taken there (written by SQL) stays. With `journal_at` (the replay's log
/// index, from format version 2) each moved record is journaled for export (its dead-letter
/// row went out under its own key; now it goes out as a record of its stream).
pub fn replay(
    conn: &Connection,
    journal_at: Option<u64>,
    stream: u16,
    device: Option<u64>,
) -> rusqlite::Result<Replayed> {
    let mut out = Replayed::default();
    let mut journal = Vec::new();
    let rows = table::rows_of_stream(conn, stream, device)?;
    if rows.is_empty() {
        return Ok(out);
    }
    let mut inserts = Inserts::new(conn, Schema::load(conn)?);
    for row in rows {
        let time = RecordTime {
            time_ms: row.time_ms,
            age_ms: row.age_ms,
        };
        let moved = match postcard::from_bytes::<DeviceBatch>(&row.record) {
            Ok(b) if b.device_id == row.device_id => {
                move_one(conn, &mut inserts, &b, row.seq, time)?
            }
            // A row changed by SQL: left for a person to look at.
            _ => false,
        };
        if moved {
            let ordinal = journal.len() as u32;
            let received = row.time_ms.saturating_add(row.age_ms);
            journal.push((ordinal, row.device_id, row.seq, row.seq, received));
            out.moved += 1;
        } else {
            out.remaining += 1;
        }
    }
    if let Some(index) = journal_at {
        crate::db::export::journal(conn, index, &journal)?;
    }
    Ok(out)
}

/// Moves one dead-lettered record (a one-record batch `b`, stored with `time`) if it now
/// fits; it keeps its time.
fn move_one(
    conn: &Connection,
    inserts: &mut Inserts<'_>,
    b: &DeviceBatch,
    seq: u64,
    time: RecordTime,
) -> rusqlite::Result<bool> {
    let Some(view) = b.view() else {
        return Ok(false);
    };
    let Some(Ok(r)) = view.records().next() else {
        return Ok(false);
    };
    if r.seq != seq || placements(&inserts.schema, &view) != Some(vec![Placement::Store]) {
        return Ok(false);
    }
    Ok(inserts.store(b.device_id, &r, time)? == 1 && table::delete(conn, b.device_id, seq)?)
}

/// Counts dead-lettered records on this replica and logs a warning per device and stream, at
/// most one every [`crate::metrics::DEAD_LETTER_WARN_EVERY`] (with how many were not logged).
pub fn report(m: &Metrics, misfits: &[Misfit]) {
    for e in misfits {
        let Some(unlogged) = m.dead_letters.count(e.device_id, e.stream, e.dead_lettered) else {
            continue;
        };
        let what = if e.dead_lettered {
            "stored in dead_letter"
        } else {
            "batch refused with SchemaMismatch"
        };
        tracing::warn!(
            device_id = e.device_id,
            stream = e.stream,
            seq = e.seq,
            unlogged,
            "record does not fit its stream, {what}: {}",
            e.reason
        );
    }
}
