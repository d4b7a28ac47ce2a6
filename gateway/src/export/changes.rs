//! Changes of user tables on their way out: reading the change journal (`db::changes`) after a
//! destination's cursor, merged in commit order with the device journal, and their forms at
//! the destinations.
//!
//! Device batches and SQL are never in the same log entry, so both journals share one
//! position space `(log_index, ordinal)` and one cursor per destination: a batch takes rows of
//! both up to a bound neither journal has unread rows below.
//!
//! The idempotency key of a change is `site:sql:history:log_index:ordinal` (`sql` keeps it
//! apart from device keys `site:device_id:epoch:seq` in a shared NATS stream).

use regex::Regex;
use rusqlite::Connection;
use serde_json::{Value as Json, json};

use super::reader::{self, ExportRecord};
use crate::db::changes::{self, ChangeRow};
use crate::db::export::{self as journal, Position};

impl ChangeRow {
    /// The idempotency key: unique for the life of the site.
    pub fn key(&self, site: &str) -> String {
        format!(
            "{site}:sql:{}:{}:{}",
            self.history, self.pos.log_index, self.pos.ordinal
        )
    }

    /// The event of rqlite's CDC envelope (`old_row_id`/`new_row_id` as rqlite: absent when
    /// 0, which a `WITHOUT ROWID` table always reports), with `key` beside rqlite's fields.
    pub fn cdc_event(&self, site: &str) -> Json {
        let mut e = json!({
            "op": self.op.as_str(),
            "table": self.table,
            "key": self.key(site),
        });
        if self.new_row_id != 0 {
            e["new_row_id"] = json!(self.new_row_id);
        }
        if self.old_row_id != 0 {
            e["old_row_id"] = json!(self.old_row_id);
        }
        if let Some(b) = &self.before {
            e["before"] = Json::Object(b.clone());
        }
        if let Some(a) = &self.after {
            e["after"] = Json::Object(a.clone());
        }
        e
    }

    /// The message body of nats and mqtt.
    pub fn message_json(&self, site: &str) -> Json {
        json!({
            "key": self.key(site),
            "site": site,
            "table": self.table,
            "op": self.op.as_str(),
            "history": self.history,
            "index": self.pos.log_index,
            "ordinal": self.pos.ordinal,
            "at_ms": self.at_ms,
            "old_row_id": self.old_row_id,
            "new_row_id": self.new_row_id,
            "before": self.before,
            "after": self.after,
        })
    }

    /// `template` with `{site}`, `{table}` and `{op}` filled in.
    pub fn subject(&self, template: &str, site: &str) -> String {
        template
            .replace("{site}", site)
            .replace("{table}", &self.table)
            .replace("{op}", &self.op.as_str().to_ascii_lowercase())
    }
}

/// A device record or a change as a message of its own (nats, mqtt).
pub trait Outgoing {
    /// A change of a user table (subjects from `changes_subject`), not a device record.
    const CHANGE: bool;
    fn key(&self, site: &str) -> String;
    fn message_json(&self, site: &str) -> Json;
    /// `template` filled in for this item.
    fn subject(&self, template: &str, site: &str) -> String;
}

impl Outgoing for ExportRecord {
    const CHANGE: bool = false;

    fn key(&self, site: &str) -> String {
        ExportRecord::key(self, site)
    }

    fn message_json(&self, site: &str) -> Json {
        ExportRecord::message_json(self, site)
    }

    /// `{site}`, `{table}` and `{device_id}` filled in.
    fn subject(&self, template: &str, site: &str) -> String {
        template
            .replace("{site}", site)
            .replace("{table}", self.table())
            .replace("{device_id}", &self.device_id.to_string())
    }
}

impl Outgoing for ChangeRow {
    const CHANGE: bool = true;

    fn key(&self, site: &str) -> String {
        ChangeRow::key(self, site)
    }

    fn message_json(&self, site: &str) -> Json {
        ChangeRow::message_json(self, site)
    }

    fn subject(&self, template: &str, site: &str) -> String {
        ChangeRow::subject(self, template, site)
    }
}

/// One message to publish: subject (or topic), key, JSON body.
pub type Message = (String, String, Vec<u8>);

/// A destination's subject (nats) or topic (mqtt) templates: of device records, of changes.
#[derive(Debug, Clone)]
pub struct Subjects {
    pub records: String,
    pub changes: String,
}

impl Subjects {
    pub fn of(d: &crate::config::export::ExportDef) -> Self {
        Subjects {
            records: d.subject_template().to_string(),
            changes: d.changes_subject_template().to_string(),
        }
    }

    /// The message of each item.
    pub fn messages<T: Outgoing>(&self, site: &str, items: &[T]) -> Result<Vec<Message>, String> {
        let template = if T::CHANGE {
            &self.changes
        } else {
            &self.records
        };
        items
            .iter()
            .map(|i| {
                let body = serde_json::to_vec(&i.message_json(site)).map_err(|e| e.to_string())?;
                Ok((i.subject(template, site), i.key(site), body))
            })
            .collect()
    }
}

/// The payload messages of rqlite's CDC envelope for `changes`: one per log entry.
pub fn cdc_payload(site: &str, changes: &[ChangeRow]) -> Vec<Json> {
    let mut payload: Vec<Json> = Vec::new();
    let mut last_index = None;
    for c in changes {
        let event = c.cdc_event(site);
        if last_index == Some(c.pos.log_index)
            && let Some(Json::Array(events)) = payload.last_mut().and_then(|m| m.get_mut("events"))
        {
            events.push(event);
            continue;
        }
        last_index = Some(c.pos.log_index);
        payload.push(json!({
            "index": c.pos.log_index,
            "commit_timestamp": c.at_ms.saturating_mul(1_000_000),
            "events": [event],
        }));
    }
    payload
}

/// What a destination delivers next: device records and changes, and the position after them.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<ExportRecord>,
    pub changes: Vec<ChangeRow>,
    /// The last journal position read (the cursor to commit once delivered).
    pub through: Option<Position>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.records.len() + self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads after `after`: about `max` device records of the stream tables in `tables` (see
/// [`reader::read_batch`]) and, with `changes`, up to `max` journaled changes, of which those
/// of tables it matches are kept; the batch ends where neither journal has unread rows
/// before it.
pub fn read_batch(
    conn: &Connection,
    after: Position,
    max: usize,
    tables: &[String],
    changes: Option<&Regex>,
) -> rusqlite::Result<Batch> {
    let dev = reader::read_batch(conn, after, max, tables)?;
    let Some(filter) = changes else {
        return Ok(Batch {
            records: dev.records,
            changes: Vec::new(),
            through: dev.through,
        });
    };
    let limit = max.max(1);
    let rows = changes::changes_after(conn, after, limit)?;
    let rows_last = rows.last().map(|r| r.pos);
    // A journal read to its limit may have more rows: the batch cannot pass its last one.
    let dev_more = match dev.through {
        Some(t) => !journal::journal_after(conn, t, 1)?.is_empty(),
        None => false,
    };
    let open = [
        dev.through.filter(|_| dev_more),
        rows_last.filter(|_| rows.len() >= limit),
    ];
    let through = match open.iter().flatten().min() {
        Some(bound) => Some(*bound),
        None => dev.through.max(rows_last),
    };
    let Some(bound) = through else {
        return Ok(Batch::default());
    };
    Ok(Batch {
        // A log index holds device rows or changes, never both: the index decides.
        records: dev
            .records
            .into_iter()
            .filter(|r| r.log_index <= bound.log_index)
            .collect(),
        changes: rows
            .into_iter()
            .filter(|r| r.pos <= bound && filter.is_match(&r.table))
            .collect(),
        through,
    })
}

/// Journal rows after `after` (device records, plus changes when `changes`) and the oldest
/// one's time: a destination's lag.
pub fn backlog(
    conn: &Connection,
    after: Position,
    changes: bool,
) -> rusqlite::Result<(u64, Option<i64>)> {
    let (n, oldest) = journal::backlog(conn, after)?;
    if !changes {
        return Ok((n, oldest));
    }
    let (m, oldest_change) = changes::backlog(conn, after)?;
    let oldest = match (oldest, oldest_change) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok((n + m, oldest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::device::{ApplyStats, apply_device_batches, tests::batch};
    use crate::command::sql::{SqlCommand, apply_sql};
    use crate::db::export::Cursor;
    use crate::db::sql::Statement;
    use cairn_protocol::Value as V;

    /// Device batches at log indices 2 and 5, SQL changes at 3 (two rows, one table not
    /// exported) and 4: one batch of each size holds whole positions in commit order.
    #[test]
    fn test_merged_in_commit_order_with_one_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::sandbox::open_writer(&dir.path().join("db.sqlite")).unwrap();
        crate::db::schema::test_climate().install(&conn).unwrap();
        conn.execute_batch(&format!(
            "CREATE TABLE {raft} (key TEXT PRIMARY KEY, value BLOB NOT NULL);
             INSERT INTO {raft} VALUES ('active_version', CAST('2' AS BLOB));
             CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT);
             CREATE TABLE other (id INTEGER PRIMARY KEY);",
            raft = crate::db::tables::RAFT
        ))
        .unwrap();
        let c = Cursor {
            name: "x".into(),
            pos: Position::default(),
            delivered: 0,
        };
        journal::advance_cursor(&conn, &c).unwrap();
        changes::set_capture(&conn, "x", Some(".*"))
            .unwrap()
            .unwrap();
        let v: &[V<'_>] = &[V::F32(1.5)];
        apply_device_batches(&conn, &[batch(7, 1, &[(1, v)])], &mut ApplyStats::default()).unwrap();
        journal::journal(&conn, 2, &[(0, 7, 1, 1, 10)]).unwrap();
        let sql = |index, sts: &[&str]| {
            let cmd = SqlCommand {
                statements: sts.iter().map(|s| Statement::new(*s)).collect(),
                transaction: false,
            };
            let _e = crate::db::sandbox::enter_entry(index, Some(20));
            apply_sql(&conn, index, Some(20), &cmd).unwrap();
        };
        sql(
            3,
            &[
                "INSERT INTO orders VALUES (1, 'a')",
                "INSERT INTO other VALUES (1)",
            ],
        );
        sql(4, &["UPDATE orders SET item = 'b' WHERE id = 1"]);
        apply_device_batches(&conn, &[batch(7, 2, &[(1, v)])], &mut ApplyStats::default()).unwrap();
        journal::journal(&conn, 5, &[(0, 7, 2, 2, 30)]).unwrap();

        let only_orders = Regex::new("^orders$").unwrap();
        let all = read_batch(&conn, Position::default(), 100, &[], Some(&only_orders)).unwrap();
        assert_eq!(all.records.len(), 2);
        let ops: Vec<(u64, &str)> = all
            .changes
            .iter()
            .map(|c| (c.pos.log_index, c.op.as_str()))
            .collect();
        assert_eq!(ops, [(3, "INSERT"), (4, "UPDATE")]);
        assert_eq!(all.through.unwrap().log_index, 5);
        assert_eq!(all.changes[1].key("s"), "s:sql:0:4:0");
        let e = all.changes[1].cdc_event("s");
        assert_eq!(
            (&e["before"]["item"], &e["after"]["item"], &e["new_row_id"]),
            (&json!("a"), &json!("b"), &json!(1))
        );
        assert_eq!(cdc_payload("s", &all.changes).len(), 2);

        // One row at a time: every position once, in order.
        let mut pos = Position::default();
        let mut seen = Vec::new();
        while let Some(t) = read_batch(&conn, pos, 1, &[], Some(&only_orders))
            .unwrap()
            .through
        {
            seen.push(t.log_index);
            pos = t;
        }
        assert_eq!(seen, [2, 3, 3, 4, 5]);
        assert_eq!(backlog(&conn, Position::default(), true).unwrap().0, 5);
        // Without changes the destination sees device records only.
        let dev = read_batch(&conn, Position::default(), 100, &[], None).unwrap();
        assert!(dev.changes.is_empty() && dev.records.len() == 2);
    }
}
