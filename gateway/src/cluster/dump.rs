//! rqlite's `/db/backup?fmt=sql`: this node's user tables as SQL text, in rqlite's layout
//! (`PRAGMA foreign_keys=OFF; BEGIN TRANSACTION;`, each table's `CREATE` and its rows as
//! `INSERT INTO "t" VALUES(...)`, then indexes, triggers and views, `COMMIT;`), read in one
//! read transaction. Cairn's own `_cairn_*` tables are never in it; `sqlite_sequence` is
//! written as rqlite does (emptied, then its rows), other `sqlite_*` tables are left out.
//! The text is built in memory (a known limit for very large databases).

use rusqlite::Connection;
use rusqlite::types::ValueRef;

use super::Cluster;
use crate::db::sandbox::is_cairn;
use crate::error::Error;

impl Cluster {
    /// The dump of this node's database; with `only`, just those tables (and their indexes
    /// and triggers).
    pub async fn dump_sql(&self, only: Option<Vec<String>>) -> Result<String, Error> {
        self.read(move |c| dump(c, only.as_deref()))
            .await?
            .map_err(|e| Error::Storage(format!("dump: {e}")))
    }
}

/// `name` as a quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn rows_of(c: &Connection, sql: &str) -> rusqlite::Result<Vec<Vec<String>>> {
    let mut st = c.prepare(sql)?;
    let n = st.column_count();
    st.query_map([], |r| {
        (0..n)
            .map(|i| {
                Ok(match r.get_ref(i)? {
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    ValueRef::Integer(v) => v.to_string(),
                    _ => String::new(),
                })
            })
            .collect()
    })?
    .collect()
}

fn dump(c: &Connection, only: Option<&[String]>) -> rusqlite::Result<String> {
    // One read transaction, so the tables are read at one point in time.
    let began = c.is_autocommit();
    if began {
        c.execute_batch("BEGIN")?;
    }
    let r = dump_in_transaction(c, only);
    if began {
        let _ = c.execute_batch("ROLLBACK");
    }
    r
}

fn dump_in_transaction(c: &Connection, only: Option<&[String]>) -> rusqlite::Result<String> {
    let wanted = |t: &str| !is_cairn(t) && only.is_none_or(|o| o.iter().any(|w| w == t));
    let mut out = String::from("PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n");
    let tables = rows_of(
        c,
        // `sqlite_sequence` last: it exists only once an AUTOINCREMENT table does (rqlite's
        // plain name order would empty it before the table that creates it).
        "SELECT name, sql FROM sqlite_master WHERE sql NOT NULL AND type = 'table' \
         ORDER BY name = 'sqlite_sequence', name",
    )?;
    for t in &tables {
        let (name, sql) = (&t[0], &t[1]);
        if !wanted(name) {
            continue;
        }
        if name == "sqlite_sequence" {
            out.push_str("DELETE FROM \"sqlite_sequence\";\n");
        } else if name.starts_with("sqlite_") {
            continue;
        } else {
            out.push_str(sql);
            out.push_str(";\n");
        }
        let q = ident(name);
        let cols = rows_of(c, &format!("PRAGMA table_info({q})"))?;
        let values = cols
            .iter()
            .map(|col| format!("quote({})", ident(&col[1])))
            .collect::<Vec<_>>()
            .join(" || ',' || ");
        let prefix = format!("INSERT INTO {q} VALUES(").replace('\'', "''");
        for row in rows_of(c, &format!("SELECT '{prefix}' || {values} || ')' FROM {q}"))? {
            out.push_str(&row[0]);
            out.push_str(";\n");
        }
    }
    let others = rows_of(
        c,
        "SELECT tbl_name, sql FROM sqlite_master WHERE sql NOT NULL \
         AND type IN ('index', 'trigger', 'view') ORDER BY rowid",
    )?;
    for o in others.iter().filter(|o| wanted(&o[0])) {
        out.push_str(&o[1]);
        out.push_str(";\n");
    }
    out.push_str("COMMIT;\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_dump_reloads_to_the_same_rows() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE \"we\"\"ird\" (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT, b BLOB);
             INSERT INTO \"we\"\"ird\"(v, b) VALUES('it''s', x'0102'), (NULL, NULL);
             CREATE INDEX wi ON \"we\"\"ird\"(v);
             CREATE TABLE _cairn_secret (k);
             INSERT INTO _cairn_secret VALUES('key');",
        )
        .unwrap();
        let text = dump(&c, None).unwrap();
        assert!(!text.contains("_cairn"), "{text}");
        assert!(text.starts_with("PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n"));
        assert!(text.contains("DELETE FROM \"sqlite_sequence\";"), "{text}");
        let d = Connection::open_in_memory().unwrap();
        d.execute_batch(&text).unwrap();
        let got: Vec<(Option<String>, Option<Vec<u8>>)> = d
            .prepare("SELECT v, b FROM \"we\"\"ird\" ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            got,
            vec![(Some("it's".into()), Some(vec![1, 2])), (None, None)]
        );
        let only = dump(&c, Some(&["nothing".to_string()])).unwrap();
        assert!(!only.contains("CREATE"), "{only}");
    }
}
