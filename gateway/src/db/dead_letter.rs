//! The `dead_letter` table: device records that did not fit their stream's declared columns,
//! kept with the reason instead of blocking their device (`on_mismatch = "dead-letter"`, the
//! default; see [`super::schema`]).
//!
//! | column | SQLite type | meaning |
//! |---|---|---|
//! | `device_id`, `seq` | INTEGER | the record's key, as in the stream tables |
//! | `stream` | INTEGER | the stream it was sent on |
//! | `time`, `received_at` | TEXT, virtual | as in the stream tables (generated from `time_ms` and `age_ms`) |
//! | `reason` | TEXT | what did not fit: `expected (k integer, t real), received (f32, f32, f32)` |
//! | `values` | TEXT | the values as a JSON array, like `telemetry` (an `f32` as the shortest decimal that reads back as it) |
//! | `record` | BLOB | the record as it arrived (a one-record `DeviceBatch`, postcard), so a replay stores exactly what a direct apply would have |
//! | `time_ms`, `age_ms` | INTEGER | what is stored, as in the stream tables |
//!
//! A `(device_id, seq)` is in at most one of the stream tables, `telemetry` and `dead_letter`:
//! the device's high-water decides once whether a record is applied, and a replay
//! (`command::dead_letter`) moves a row, in one transaction.

use cairn_protocol::{RecordView, Value};
use rusqlite::Connection;

use super::schema::{
    ColumnType, DEAD_LETTER_TABLE, STORED_TIME_COLUMNS, StreamDef, column_fits, time_columns,
};

/// Creates the table if it is missing (at the first dead-lettered record, and when stream
/// definitions are installed by `command::streams`).
pub fn create_table(conn: &Connection) -> rusqlite::Result<()> {
    if super::table_exists(conn, DEAD_LETTER_TABLE)? {
        return Ok(());
    }
    let time_columns = time_columns(conn)?;
    conn.prepare_cached(&format!(
        "CREATE TABLE IF NOT EXISTS {DEAD_LETTER_TABLE} (device_id INTEGER NOT NULL, \
         seq INTEGER NOT NULL, stream INTEGER NOT NULL, {time_columns}, \
         reason TEXT NOT NULL, \"values\" TEXT NOT NULL, record BLOB NOT NULL, \
         {STORED_TIME_COLUMNS}, PRIMARY KEY (device_id, seq)) WITHOUT ROWID"
    ))?
    .execute([])
    .map(drop)
}

/// The insert of one row; `?1..?8` are the stored columns in table order.
pub fn insert_sql() -> String {
    format!(
        "INSERT OR IGNORE INTO {DEAD_LETTER_TABLE} (device_id, seq, stream, reason, \"values\", \
         record, time_ms, age_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    )
}

/// True if the table exists (reads must not create it).
pub fn exists(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [DEAD_LETTER_TABLE],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// How many rows each device holds per stream: `(device_id, stream, rows)`, in key order.
pub fn counts(conn: &Connection) -> rusqlite::Result<Vec<(u64, u16, u64)>> {
    if !exists(conn)? {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare(&format!(
        "SELECT device_id, stream, count(*) FROM {DEAD_LETTER_TABLE} \
         GROUP BY device_id, stream ORDER BY device_id, stream"
    ))?;
    st.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)? as u16,
            r.get::<_, i64>(2)? as u64,
        ))
    })?
    .collect()
}

/// A dead-lettered record as a replay reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRow {
    pub device_id: u64,
    pub seq: u64,
    /// The record as a one-record batch, postcard-encoded.
    pub record: Vec<u8>,
    /// The stored time columns, kept when the record moves.
    pub time_ms: i64,
    pub age_ms: i64,
}

/// The rows of `stream` (of one device, or all), in key order.
pub fn rows_of_stream(
    conn: &Connection,
    stream: u16,
    device: Option<u64>,
) -> rusqlite::Result<Vec<DeadRow>> {
    if !exists(conn)? {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare(&format!(
        "SELECT device_id, seq, record, time_ms, age_ms FROM {DEAD_LETTER_TABLE} \
         WHERE stream = ?1 AND (?2 IS NULL OR device_id = ?2) ORDER BY device_id, seq"
    ))?;
    st.query_map(
        rusqlite::params![i64::from(stream), device.map(|d| d as i64)],
        |r| {
            Ok(DeadRow {
                device_id: r.get::<_, i64>(0)? as u64,
                seq: r.get::<_, i64>(1)? as u64,
                record: r.get(2)?,
                time_ms: r.get(3)?,
                age_ms: r.get(4)?,
            })
        },
    )?
    .collect()
}

/// Deletes one row; true if it was there.
pub fn delete(conn: &Connection, device_id: u64, seq: u64) -> rusqlite::Result<bool> {
    conn.prepare_cached(&format!(
        "DELETE FROM {DEAD_LETTER_TABLE} WHERE device_id = ?1 AND seq = ?2"
    ))?
    .execute([device_id as i64, seq as i64])
    .map(|n| n > 0)
}

/// The name of a value's type as a device sends it.
fn value_type(v: &Value<'_>) -> &'static str {
    match v {
        Value::Bool(_) => "bool",
        Value::I64(_) => "i64",
        Value::U64(_) => "u64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bytes(_) => "bytes",
        Value::Str(_) => "str",
    }
}

fn column_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Integer => "integer",
        ColumnType::Real => "real",
        ColumnType::Text => "text",
        ColumnType::Blob => "blob",
        ColumnType::Bool => "bool",
    }
}

/// The declared shape of a stream: `(k integer, temperature real)`.
pub fn expected_shape(def: &StreamDef) -> String {
    let cols: Vec<String> = def
        .columns
        .iter()
        .map(|c| format!("{} {}", c.name, column_type(c.ty)))
        .collect();
    format!("({})", cols.join(", "))
}

/// The shape a record arrived with: `(f32, f32, f32)`.
pub fn received_shape(r: &RecordView<'_>) -> String {
    let types: Vec<&str> = r.values().map(|v| value_type(&v)).collect();
    format!("({})", types.join(", "))
}

/// True if every value of `r` fits `def`'s columns (count and types).
pub fn fits(def: &StreamDef, r: &RecordView<'_>) -> bool {
    r.value_count() == def.columns.len()
        && r.values()
            .zip(&def.columns)
            .all(|(v, c)| column_fits(c.ty, &v))
}

/// Why `r` does not fit `def` (the `reason` column): the first value that does not fit, or
/// the counts, then both shapes.
pub fn reason(def: &StreamDef, r: &RecordView<'_>) -> String {
    let what = if r.value_count() != def.columns.len() {
        format!(
            "{} values for {} columns",
            r.value_count(),
            def.columns.len()
        )
    } else {
        r.values()
            .zip(&def.columns)
            .find(|(v, c)| !column_fits(c.ty, v))
            .map(|(v, c)| {
                format!(
                    "{} value {v} does not fit column {} {}",
                    value_type(&v),
                    c.name,
                    column_type(c.ty)
                )
            })
            .unwrap_or_default()
    };
    format!(
        "{what}: table {} expects {}, received {}",
        def.table,
        expected_shape(def),
        received_shape(r)
    )
}

#[cfg(test)]
mod tests {
    use cairn_protocol::{BatchEncoder, MAX_FRAME, Record};

    use super::*;
    use crate::db::schema::{Column, OnMismatch};

    fn def() -> StreamDef {
        StreamDef {
            id: 1,
            table: "readings".into(),
            columns: vec![
                Column {
                    name: "k".into(),
                    ty: ColumnType::Integer,
                },
                Column {
                    name: "temperature".into(),
                    ty: ColumnType::Real,
                },
            ],
            on_mismatch: OnMismatch::DeadLetter,
        }
    }

    fn check(values: &[Value<'_>], f: impl FnOnce(&RecordView<'_>)) {
        let mut buf = [0u8; MAX_FRAME];
        let mut enc = BatchEncoder::new(&mut buf, 1, 10);
        enc.push(&Record {
            stream: 1,
            uptime_ms: 10,
            values,
        })
        .unwrap();
        let view = enc.finish().unwrap();
        f(&view.records().next().unwrap().unwrap());
    }

    #[test]
    fn test_reason_names_both_shapes() {
        check(&[Value::F32(1.0), Value::F32(2.0), Value::F32(3.0)], |r| {
            assert!(!fits(&def(), r));
            assert_eq!(
                reason(&def(), r),
                "3 values for 2 columns: table readings expects (k integer, temperature real), \
                 received (f32, f32, f32)"
            );
        });
        check(&[Value::Str("x"), Value::F32(2.0)], |r| {
            assert_eq!(
                reason(&def(), r),
                "str value \"x\" does not fit column k integer: table readings expects \
                 (k integer, temperature real), received (str, f32)"
            );
        });
        check(&[Value::U64(1), Value::F32(2.0)], |r| {
            assert!(fits(&def(), r))
        });
    }

    #[test]
    fn test_reads_without_the_table() {
        let conn = Connection::open_in_memory().unwrap();
        assert!(!exists(&conn).unwrap());
        assert_eq!(counts(&conn).unwrap(), vec![]);
        assert_eq!(rows_of_stream(&conn, 1, None).unwrap(), vec![]);
        create_table(&conn).unwrap();
        create_table(&conn).unwrap();
        assert!(exists(&conn).unwrap());
        assert!(!delete(&conn, 1, 1).unwrap());
    }
}
