//! Where device records land: the `[[stream]]` tables of the config, the generic `telemetry`
//! table, and the conversion of a record's values into a row.
//!
//! ```toml
//! undeclared_streams = "telemetry"   # or "reject": undeclared streams get SchemaMismatch
//!
//! [[stream]]
//! id = 1
//! table = "climate"
//! columns = [{ name = "temperature", type = "real" }, { name = "humidity", type = "real" }]
//! on_mismatch = "dead-letter"        # default; or "reject": the batch gets SchemaMismatch
//! ```
//!
//! Every stream table starts with the same four columns, then the declared ones in order:
//!
//! | column | SQLite type | meaning |
//! |---|---|---|
//! | `device_id` | INTEGER | the sending device |
//! | `seq` | INTEGER | the record's per-device sequence number; `(device_id, seq)` is the key |
//! | `time` | TEXT | when the device took the record, UTC, `2026-11-25T18:44:00.123Z` |
//! | `received_at` | TEXT | when the gateway that received the frame read it, same format |
//!
//! Undeclared streams go to `telemetry(device_id, seq, stream, time, received_at, "values")`
//! with the values as a JSON array (bytes as base64 strings, like rqlite's blobs).
//!
//! # Determinism
//!
//! The definitions are replicated: the leader proposes its configuration
//! (`StreamsCommand::Define` in `command::streams`) when it takes office, before any device
//! batch of its term, and a node proposes it when it reloads its config file; apply reads them
//! back from `_cairn_streams`. So every replica maps a record the same way even if nodes run
//! different config files (the latest leader's or reload's wins; the others warn).
//!
//! Type rules (a record that breaks one goes to `dead_letter` with the reason, see
//! [`super::dead_letter`], or with `on_mismatch = "reject"` its batch is refused whole with
//! `SchemaMismatch`): the record has
//! exactly as many values as the table has declared columns; `integer` takes I64 and U64 up to
//! `i64::MAX`; `real` takes F32, F64 and integers; `text` takes Str; `blob` takes Bytes;
//! `bool` takes Bool (stored as 0/1).

use std::fmt::Write as _;

use cairn_protocol::Value;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

pub use super::tables::{
    DEAD_LETTER as DEAD_LETTER_TABLE, STREAMS as STREAMS_TABLE, TELEMETRY as TELEMETRY_TABLE,
};

/// Column names every stream table starts with; declared columns may not reuse them.
pub const FIXED_COLUMNS: [&str; 4] = ["device_id", "seq", "time", "received_at"];

/// Why a set of stream definitions is refused (names the stream and what is wrong).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSchema(String);

/// The type of a declared column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Integer,
    Real,
    Text,
    Blob,
    Bool,
}

impl ColumnType {
    fn sql(self) -> &'static str {
        match self {
            ColumnType::Integer | ColumnType::Bool => "INTEGER",
            ColumnType::Real => "REAL",
            ColumnType::Text => "TEXT",
            ColumnType::Blob => "BLOB",
        }
    }
}

/// One declared column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ColumnType,
}

/// What happens to a record of a declared stream that does not fit its columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnMismatch {
    /// Store it in `dead_letter` with the reason and acknowledge it.
    #[default]
    DeadLetter,
    /// Refuse its whole batch with `SchemaMismatch` (the device retries it).
    Reject,
}

/// One `[[stream]]` entry: records of stream `id` go to `table`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDef {
    pub id: u16,
    pub table: String,
    pub columns: Vec<Column>,
    #[serde(default)]
    pub on_mismatch: OnMismatch,
}

/// What happens to records of a stream the config does not declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Undeclared {
    /// Store them in the generic `telemetry` table.
    #[default]
    Telemetry,
    /// Refuse the batch with `SchemaMismatch`.
    Reject,
}

/// The whole mapping: declared streams plus the rule for the others.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Schema {
    pub streams: Vec<StreamDef>,
    pub undeclared: Undeclared,
}

fn valid_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 64
}

impl Schema {
    /// Checks names and ids; run on the config before anything is proposed.
    pub fn validate(&self) -> Result<(), InvalidSchema> {
        let mut ids = std::collections::HashSet::new();
        let mut tables = std::collections::HashSet::new();
        for s in &self.streams {
            if !ids.insert(s.id) {
                return Err(InvalidSchema(format!("stream {} declared twice", s.id)));
            }
            let lower = s.table.to_ascii_lowercase();
            if !valid_ident(&s.table) || lower.starts_with("_cairn") || lower.starts_with("sqlite_")
            {
                return Err(InvalidSchema(format!(
                    "stream {}: table name {:?} must be letters, digits and _, not starting with _cairn or sqlite_",
                    s.id, s.table
                )));
            }
            if lower == TELEMETRY_TABLE || lower == DEAD_LETTER_TABLE || !tables.insert(lower) {
                return Err(InvalidSchema(format!(
                    "stream {}: table {:?} is already used",
                    s.id, s.table
                )));
            }
            if s.columns.len() > cairn_protocol::MAX_VALUES {
                return Err(InvalidSchema(format!(
                    "stream {}: at most {} columns (a record holds at most that many values)",
                    s.id,
                    cairn_protocol::MAX_VALUES
                )));
            }
            let mut names = std::collections::HashSet::new();
            for c in &s.columns {
                let lc = c.name.to_ascii_lowercase();
                if !valid_ident(&c.name)
                    || FIXED_COLUMNS.contains(&lc.as_str())
                    || !names.insert(lc)
                {
                    return Err(InvalidSchema(format!(
                        "stream {}: column {:?} is not a valid, unique name (device_id, seq, time and received_at are taken)",
                        s.id, c.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// The definition of stream `id`, if declared.
    pub fn stream(&self, id: u16) -> Option<&StreamDef> {
        self.streams.iter().find(|s| s.id == id)
    }

    /// Creates (or extends with missing columns) every table and stores the definitions.
    /// Runs inside the applying entry's transaction.
    pub fn install(&self, conn: &Connection) -> rusqlite::Result<()> {
        create_meta(conn)?;
        create_telemetry(conn)?;
        for s in &self.streams {
            let mut ddl = format!(
                "CREATE TABLE IF NOT EXISTS \"{}\" (device_id INTEGER NOT NULL, seq INTEGER NOT NULL, \
                 time TEXT NOT NULL, received_at TEXT NOT NULL",
                s.table
            );
            for c in &s.columns {
                let _ = write!(ddl, ", \"{}\" {}", c.name, c.ty.sql());
            }
            ddl.push_str(", PRIMARY KEY (device_id, seq)) WITHOUT ROWID");
            conn.execute_batch(&ddl)?;
            // A table made by an older definition gets the columns it lacks.
            let existing: Vec<String> = conn
                .prepare(&format!(
                    "SELECT name FROM pragma_table_info('{}')",
                    s.table
                ))?
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            for c in &s.columns {
                if !existing.iter().any(|e| e.eq_ignore_ascii_case(&c.name)) {
                    conn.execute_batch(&format!(
                        "ALTER TABLE \"{}\" ADD COLUMN \"{}\" {}",
                        s.table,
                        c.name,
                        c.ty.sql()
                    ))?;
                }
            }
        }
        let json = serde_json::to_string(self)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
        conn.execute(
            &format!("INSERT OR REPLACE INTO {STREAMS_TABLE}(key, value) VALUES ('schema', ?1)"),
            [json],
        )?;
        Ok(())
    }

    /// The definitions stored by the last [`Schema::install`] (the default if none were
    /// ever installed). Stored definitions that do not parse are an error, never the default:
    /// records would silently land elsewhere than on the replicas that can read them.
    pub fn load(conn: &Connection) -> rusqlite::Result<Schema> {
        create_meta(conn)?;
        let json: Option<String> = conn
            .prepare_cached(&format!(
                "SELECT value FROM {STREAMS_TABLE} WHERE key = 'schema'"
            ))?
            .query_row([], |r| r.get(0))
            .optional()?;
        let Some(json) = json else {
            return Ok(Schema::default());
        };
        let bad = |e: serde_json::Error| {
            rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                format!("stored stream definitions in {STREAMS_TABLE}: {e}").into(),
            )
        };
        let mut v: serde_json::Value = serde_json::from_str(&json).map_err(bad)?;
        // Definitions stored before `on_mismatch` existed were applied with today's "reject"
        // (the serde default is the config file's, "dead-letter").
        if let Some(streams) = v.get_mut("streams").and_then(|s| s.as_array_mut()) {
            for s in streams.iter_mut().filter_map(|s| s.as_object_mut()) {
                s.entry("on_mismatch").or_insert_with(|| "reject".into());
            }
        }
        serde_json::from_value(v).map_err(bad)
    }
}

/// Creates the table of undeclared streams if it is missing. Device batches can be applied
/// before any stream definitions (a leader whose definitions were not committed), and every
/// replica then creates it at the same entry.
pub fn create_telemetry(conn: &Connection) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "CREATE TABLE IF NOT EXISTS {TELEMETRY_TABLE} (device_id INTEGER NOT NULL, \
         seq INTEGER NOT NULL, stream INTEGER NOT NULL, time TEXT NOT NULL, \
         received_at TEXT NOT NULL, \"values\" TEXT NOT NULL, \
         PRIMARY KEY (device_id, seq)) WITHOUT ROWID"
    ))?
    .execute([])
    .map(drop)
}

fn create_meta(conn: &Connection) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "CREATE TABLE IF NOT EXISTS {STREAMS_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
    ))?
    .execute([])
    .map(drop)
}

/// A record value as a SQLite parameter for a column of type `ty`, or `None` if it does not fit.
pub fn column_value(ty: ColumnType, v: &Value<'_>) -> Option<ToSqlOutput<'static>> {
    use rusqlite::types::Value as Sql;
    Some(ToSqlOutput::Owned(match (ty, *v) {
        (ColumnType::Integer, Value::I64(i)) => Sql::Integer(i),
        (ColumnType::Integer, Value::U64(u)) => Sql::Integer(i64::try_from(u).ok()?),
        (ColumnType::Real, Value::F32(f)) => Sql::Real(f64::from(f)),
        (ColumnType::Real, Value::F64(f)) => Sql::Real(f),
        (ColumnType::Real, Value::I64(i)) => Sql::Real(i as f64),
        (ColumnType::Real, Value::U64(u)) => Sql::Real(u as f64),
        (ColumnType::Text, Value::Str(s)) => Sql::Text(s.to_owned()),
        (ColumnType::Blob, Value::Bytes(b)) => Sql::Blob(b.to_vec()),
        (ColumnType::Bool, Value::Bool(b)) => Sql::Integer(i64::from(b)),
        _ => return None,
    }))
}

/// A borrowed value for the telemetry JSON column writer.
pub fn values_json<'a>(values: impl Iterator<Item = Value<'a>>) -> String {
    let mut out = String::from("[");
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = match v {
            Value::Bool(b) => write!(out, "{b}"),
            Value::I64(i) => write!(out, "{i}"),
            Value::U64(u) => write!(out, "{u}"),
            Value::F32(f) if f.is_finite() => write!(out, "{}", f64::from(f)),
            Value::F64(f) if f.is_finite() => write!(out, "{f}"),
            Value::F32(_) | Value::F64(_) => write!(out, "null"),
            Value::Bytes(b) => write!(out, "\"{}\"", super::sql::base64(b)),
            Value::Str(s) => write!(out, "{}", serde_json::Value::from(s)),
        };
    }
    out.push(']');
    out
}

/// The proleptic Gregorian `(year, month, day)` of a day counted from 1970-01-01 (Howard
/// Hinnant's days-to-civil algorithm; no date crate needed).
pub fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.sssZ` (proleptic Gregorian, UTC).
pub fn utc_text(unix_ms: i64) -> String {
    let (year, month, day) = civil_date(unix_ms.div_euclid(86_400_000));
    let ms_of_day = unix_ms.rem_euclid(86_400_000);
    let (h, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

/// A parameter that borrows nothing: lets rows mix owned and borrowed cells.
pub fn int(i: i64) -> ToSqlOutput<'static> {
    ToSqlOutput::Borrowed(ValueRef::Integer(i))
}

/// A schema with one stream (id 1, table `climate`, a `temperature` real), for tests.
#[cfg(test)]
pub fn test_climate() -> Schema {
    Schema {
        streams: vec![StreamDef {
            id: 1,
            table: "climate".into(),
            columns: vec![Column {
                name: "temperature".into(),
                ty: ColumnType::Real,
            }],
            on_mismatch: OnMismatch::default(),
        }],
        undeclared: Undeclared::Telemetry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn climate() -> Schema {
        Schema {
            streams: vec![StreamDef {
                id: 1,
                table: "climate".into(),
                columns: vec![
                    Column {
                        name: "temperature".into(),
                        ty: ColumnType::Real,
                    },
                    Column {
                        name: "label".into(),
                        ty: ColumnType::Text,
                    },
                ],
                on_mismatch: OnMismatch::DeadLetter,
            }],
            undeclared: Undeclared::Telemetry,
        }
    }

    #[test]
    fn test_utc_text() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_text(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc_text(1_795_632_240_000), "2026-11-25T18:44:00.000Z");
        assert_eq!(utc_text(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn test_validate() {
        assert!(climate().validate().is_ok());
        let mut s = climate();
        s.streams[0].columns[0].name = "seq".into();
        assert!(s.validate().is_err());
        let mut s = climate();
        s.streams[0].table = "x; DROP TABLE y".into();
        assert!(s.validate().is_err());
        let mut s = climate();
        s.streams.push(s.streams[0].clone());
        assert!(s.validate().is_err());
        let mut s = climate();
        s.streams[0].table = "telemetry".into();
        assert!(s.validate().is_err());
        let mut s = climate();
        s.streams[0].table = "Dead_Letter".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn test_install_and_load() {
        let conn = Connection::open_in_memory().unwrap();
        let s = climate();
        s.install(&conn).unwrap();
        s.install(&conn).unwrap();
        assert_eq!(Schema::load(&conn).unwrap(), s);
        let mut wider = s.clone();
        wider.streams[0].columns.push(Column {
            name: "ok".into(),
            ty: ColumnType::Bool,
        });
        wider.install(&conn).unwrap();
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('climate')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 7);
    }

    #[test]
    fn test_column_value() {
        assert!(column_value(ColumnType::Real, &Value::I64(3)).is_some());
        assert!(column_value(ColumnType::Integer, &Value::F32(3.0)).is_none());
        assert!(column_value(ColumnType::Integer, &Value::U64(u64::MAX)).is_none());
        assert!(column_value(ColumnType::Text, &Value::Bytes(b"x")).is_none());
        assert_eq!(
            values_json(
                [
                    Value::Bool(true),
                    Value::F32(1.5),
                    Value::Str("a\"b"),
                    Value::Bytes(&[0xff])
                ]
                .into_iter()
            ),
            r#"[true,1.5,"a\"b","/w=="]"#
        );
    }
}
