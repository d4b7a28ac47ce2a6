//! Reading what a destination has to deliver: the journal after its cursor, in commit order,
//! joined with the stream tables, in bounded batches.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use rusqlite::Connection;
use rusqlite::types::Value;
use serde_json::{Map, Value as Json};

pub use crate::db::changes::value_json;
use crate::db::export::{self, JournalRow, Position};
use crate::db::tables::DEAD_LETTER;

/// The columns of one stream table, with SQLite's declared types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    pub table: String,
    /// (name, declared type upper-cased) in table order.
    pub columns: Vec<(String, String)>,
}

/// One stored device record on its way out.
#[derive(Debug, Clone)]
pub struct ExportRecord {
    pub shape: Arc<TableShape>,
    pub device_id: u64,
    pub epoch: u64,
    pub seq: u64,
    /// Log index of the entry that stored it, and its receive time (Unix ms).
    pub log_index: u64,
    pub at_ms: i64,
    /// One value per column of `shape`.
    pub values: Vec<Value>,
}

impl ExportRecord {
    /// The idempotency key: unique for the life of the site. A dead-lettered record has its
    /// own key space (`:dead_letter` appended), so once it is replayed into its stream it is
    /// delivered again there under the record's plain key.
    pub fn key(&self, site: &str) -> String {
        let dead = if self.table() == DEAD_LETTER {
            ":dead_letter"
        } else {
            ""
        };
        format!(
            "{site}:{}:{}:{}{dead}",
            self.device_id, self.epoch, self.seq
        )
    }

    pub fn table(&self) -> &str {
        &self.shape.table
    }

    /// The row as a JSON object (blobs as base64, like rqlite).
    pub fn row_json(&self) -> Map<String, Json> {
        self.shape
            .columns
            .iter()
            .zip(&self.values)
            .map(|((c, _), v)| (c.clone(), value_json(v)))
            .collect()
    }

    /// The message body of nats and mqtt: the key, where it comes from, and the row.
    pub fn message_json(&self, site: &str) -> Json {
        serde_json::json!({
            "key": self.key(site),
            "site": site,
            "table": self.table(),
            "epoch": self.epoch,
            "index": self.log_index,
            "row": self.row_json(),
        })
    }
}

/// A batch read for one destination: its records and the journal position after them.
#[derive(Debug, Default)]
pub struct ExportBatch {
    pub records: Vec<ExportRecord>,
    /// The last journal row read (the cursor to commit once delivered).
    pub through: Option<Position>,
    /// Receive time of the first journal row read.
    pub oldest_ms: Option<i64>,
}

/// Reads after `after` until about `max_records` records (whole journal rows: a row is
/// never split), from the stream tables and `dead_letter` in `filter` (empty: all).
pub fn read_batch(
    conn: &Connection,
    after: Position,
    max_records: usize,
    filter: &[String],
) -> rusqlite::Result<ExportBatch> {
    let tables: Vec<String> = tables_of(conn, filter).into_iter().collect();
    let mut shapes = HashMap::new();
    for t in &tables {
        if let Some(s) = shape(conn, t)? {
            shapes.insert(t.clone(), Arc::new(s));
        }
    }
    let mut out = ExportBatch::default();
    // Journal rows hold up to a frame of records each; read a few more than needed.
    let rows = export::journal_after(conn, after, max_records.clamp(1, 4096))?;
    for row in rows {
        if !out.records.is_empty() && out.records.len() >= max_records {
            break;
        }
        out.oldest_ms.get_or_insert(row.at_ms);
        read_row(conn, &row, &tables, &shapes, &mut out.records)?;
        out.through = Some(row.pos);
    }
    Ok(out)
}

fn read_row(
    conn: &Connection,
    row: &JournalRow,
    tables: &[String],
    shapes: &HashMap<String, Arc<TableShape>>,
    out: &mut Vec<ExportRecord>,
) -> rusqlite::Result<()> {
    let start = out.len();
    for t in tables {
        let Some(shape) = shapes.get(t) else { continue };
        let cols: Vec<String> = shape
            .columns
            .iter()
            .map(|(c, _)| format!("\"{}\"", c.replace('"', "\"\"")))
            .collect();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {} FROM \"{t}\" WHERE device_id = ?1 AND seq BETWEEN ?2 AND ?3 ORDER BY seq",
            cols.join(", ")
        ))?;
        let seq_col = shape.columns.iter().position(|(c, _)| c == "seq");
        let mut rows = stmt.query(rusqlite::params![
            row.device_id as i64,
            row.from_seq as i64,
            row.to_seq as i64
        ])?;
        while let Some(r) = rows.next()? {
            let values: Vec<Value> = (0..shape.columns.len())
                .map(|i| r.get::<_, Value>(i))
                .collect::<rusqlite::Result<_>>()?;
            let seq = match seq_col.map(|i| &values[i]) {
                Some(Value::Integer(s)) => *s as u64,
                _ => continue,
            };
            out.push(ExportRecord {
                shape: shape.clone(),
                device_id: row.device_id,
                epoch: row.epoch,
                seq,
                log_index: row.pos.log_index,
                at_ms: row.at_ms,
                values,
            });
        }
    }
    // A batch may span several stream tables: deliver its records in seq order.
    out[start..].sort_by_key(|r| r.seq);
    Ok(())
}

/// The columns of `table`, or `None` if it does not exist (yet).
fn shape(conn: &Connection, table: &str) -> rusqlite::Result<Option<TableShape>> {
    let mut stmt = conn.prepare("SELECT name, upper(type) FROM pragma_table_xinfo(?1)")?;
    let columns: Vec<(String, String)> = stmt
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok((!columns.is_empty()).then(|| TableShape {
        table: table.to_string(),
        columns,
    }))
}

/// The stream tables and `dead_letter` that `filter` selects (for destinations that set up
/// tables; one that does not exist yet is skipped when read).
pub fn tables_of(conn: &Connection, filter: &[String]) -> BTreeSet<String> {
    let mut all = crate::db::sandbox::stream_tables(conn);
    all.insert(DEAD_LETTER.to_string());
    all.into_iter()
        .filter(|t| filter.is_empty() || filter.iter().any(|f| f.eq_ignore_ascii_case(t)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::device::{ApplyStats, apply_device_batches, tests::batch};
    use cairn_protocol::Value as V;

    #[test]
    fn test_read_in_commit_order_whole_rows() {
        let conn = Connection::open_in_memory().unwrap();
        crate::db::schema::test_climate().install(&conn).unwrap();
        let v: &[V<'_>] = &[V::F32(1.5)];
        let b1 = batch(7, 1, &[(1, v), (9, &[V::I64(1)]), (1, v)]);
        let b2 = batch(8, 1, &[(1, v)]);
        apply_device_batches(&conn, &[b1, b2], &mut ApplyStats::default()).unwrap();
        let c = export::Cursor {
            name: "x".into(),
            pos: Position::default(),
            delivered: 0,
        };
        export::advance_cursor(&conn, &c).unwrap();
        export::journal(&conn, 4, &[(0, 7, 1, 3, 10), (1, 8, 1, 1, 11)]).unwrap();
        let b = read_batch(&conn, Position::default(), 1, &[]).unwrap();
        assert_eq!(b.records.len(), 3, "a journal row is read whole");
        assert_eq!(
            b.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(b.records[1].table(), "telemetry");
        assert_eq!(b.records[0].key("s"), "s:7:0:1");
        let b = read_batch(&conn, b.through.unwrap(), 10, &["climate".into()]).unwrap();
        assert_eq!(b.records.len(), 1);
        assert_eq!(b.records[0].device_id, 8);
        assert_eq!(b.records[0].row_json()["temperature"], 1.5);
    }

    /// A record that does not fit goes out from `dead_letter` under its own key; once the
    /// stream is fixed and the record replayed, it goes out again as a record of its stream.
    #[test]
    fn test_dead_letter_exported_then_replayed_record() {
        use crate::db::schema::{Column, ColumnType};
        let conn = Connection::open_in_memory().unwrap();
        let mut schema = crate::db::schema::test_climate();
        schema.install(&conn).unwrap();
        crate::db::dead_letter::create_table(&conn).unwrap();
        let c = export::Cursor {
            name: "x".into(),
            pos: Position::default(),
            delivered: 0,
        };
        export::advance_cursor(&conn, &c).unwrap();
        let b = batch(
            7,
            1,
            &[(1, &[V::F32(1.5)]), (1, &[V::F32(2.5), V::F32(3.5)])],
        );
        apply_device_batches(&conn, &[b], &mut ApplyStats::default()).unwrap();
        export::journal(&conn, 4, &[(0, 7, 1, 2, 10)]).unwrap();
        let first = read_batch(&conn, Position::default(), 10, &[]).unwrap();
        let keys: Vec<String> = first.records.iter().map(|r| r.key("s")).collect();
        assert_eq!(keys, ["s:7:0:1", "s:7:0:2:dead_letter"]);
        assert_eq!(first.records[1].table(), "dead_letter");

        schema.streams[0].columns.push(Column {
            name: "humidity".into(),
            ty: ColumnType::Real,
        });
        schema.install(&conn).unwrap();
        let moved = crate::command::dead_letter::replay(&conn, Some(5), 1, None).unwrap();
        assert_eq!(moved.moved, 1);
        let next = read_batch(&conn, first.through.unwrap(), 10, &[]).unwrap();
        assert_eq!(next.records.len(), 1);
        assert_eq!(next.records[0].key("s"), "s:7:0:2");
        assert_eq!(next.records[0].table(), "climate");
        assert_eq!(next.records[0].log_index, 5);
        assert_eq!(next.records[0].row_json()["humidity"], 3.5);
    }
}
