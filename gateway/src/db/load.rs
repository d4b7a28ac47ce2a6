//! `/db/load`: the statements that replace the database's user tables with the contents of an
//! uploaded SQLite file or SQL text. They go through Raft as one SQL command, so every replica
//! loads the same rows.

use rusqlite::Connection;

use super::sql::{Params, Statement, Value};
use super::tables;

/// User tables and views of a database: `(type, name)`, excluding SQLite's and Cairn's own.
pub fn user_objects(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st = conn.prepare(
        "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view') \
         AND name NOT LIKE 'sqlite_%' AND name != ?1 ORDER BY type DESC, name",
    )?;
    let rows = st.query_map([tables::RAFT], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Statements that replace a database holding `existing` objects with the contents of `data`
/// (a SQLite file, or SQL text such as `sqlite3 .dump` output), for `/db/load`.
pub fn load_statements(
    data: &[u8],
    scratch_dir: &std::path::Path,
    existing: &[(String, String)],
) -> anyhow::Result<Vec<Statement>> {
    let mut tmp = None;
    let src = if data.starts_with(b"SQLite format 3\0") {
        let path = scratch_dir.join(format!("load-{}.db", rand::random::<u64>()));
        std::fs::write(&path, data)?;
        tmp = Some(path.clone());
        super::open_read_only(&path)?
    } else {
        let text = std::str::from_utf8(data)
            .map_err(|_| anyhow::anyhow!("body is neither a SQLite file nor UTF-8 SQL"))?;
        let c = Connection::open_in_memory()?;
        c.execute_batch(text)?;
        c
    };
    let result = (|| -> anyhow::Result<Vec<Statement>> {
        let mut out: Vec<Statement> = existing
            .iter()
            .map(|(kind, name)| {
                Statement::new(format!(
                    "DROP {} IF EXISTS {}",
                    kind.to_uppercase(),
                    quote_ident(name)
                ))
            })
            .collect();
        let mut st = src.prepare(
            "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL \
             AND name NOT LIKE 'sqlite_%' AND name != ?1 \
             ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 WHEN 'view' THEN 2 ELSE 3 END, rowid",
        )?;
        let objects: Vec<(String, String, String)> = st
            .query_map([tables::RAFT], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (kind, _, sql) in objects.iter().filter(|o| o.0 == "table") {
            let _ = kind;
            out.push(Statement::new(sql.clone()));
        }
        for (_, name, _) in objects.iter().filter(|o| o.0 == "table") {
            let mut rows = src.prepare(&format!("SELECT * FROM {}", quote_ident(name)))?;
            let n = rows.column_count();
            let insert = format!(
                "INSERT INTO {} VALUES({})",
                quote_ident(name),
                vec!["?"; n].join(", ")
            );
            let mut q = rows.raw_query();
            while let Some(row) = q.next()? {
                let values = (0..n)
                    .map(|i| row.get_ref(i).map(Value::from))
                    .collect::<rusqlite::Result<_>>()?;
                out.push(Statement {
                    sql: insert.clone(),
                    params: Params::Positional(values),
                });
            }
        }
        for (_, _, sql) in objects.iter().filter(|o| o.0 != "table") {
            out.push(Statement::new(sql.clone()));
        }
        Ok(out)
    })();
    drop(src);
    if let Some(p) = tmp {
        let _ = std::fs::remove_file(p);
    }
    result
}
