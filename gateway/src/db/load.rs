//! `/db/load`: the statements that replace the database's user tables with the contents of an
//! uploaded SQLite file or SQL text. They go through Raft as one SQL command, so every replica
//! loads the same rows.

use std::collections::BTreeSet;

use rusqlite::Connection;

use super::sandbox::{self, Kind, Mode};
use super::sql::{Params, Statement, Value};

/// User tables and views of a database: `(type, name)`, excluding SQLite's and Cairn's own
/// (`_cairn_*`).
pub fn user_objects(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st = conn.prepare(
        "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view') \
         AND name NOT LIKE 'sqlite_%' AND substr(name, 1, 7) != '_cairn_' ORDER BY type DESC, name",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Statements that replace a database holding `existing` objects with the contents of `data`
/// (a SQLite file, or SQL text such as `sqlite3 .dump` output), for `/db/load`.
///
/// Cairn's own tables (`_cairn_*`) are neither dropped nor loaded. Device stream tables
/// (`streams`) keep their schema: their rows are replaced. SQL text runs in a scratch
/// database under the sandbox's load rules (no ATTACH, VACUUM, extensions; other pragmas are
/// no-ops), a time limit and a size cap.
pub fn load_statements(
    data: &[u8],
    scratch_dir: &std::path::Path,
    existing: &[(String, String)],
    streams: &BTreeSet<String>,
) -> anyhow::Result<Vec<Statement>> {
    let mut tmp = None;
    let src = if data.starts_with(b"SQLite format 3\0") {
        let path = scratch_dir.join(format!("load-{}.db", rand::random::<u64>()));
        std::fs::write(&path, data)?;
        tmp = Some(path.clone());
        let mut c = super::open_read_only(&path)?;
        sandbox::harden(&mut c, Kind::Scratch)?;
        c
    } else {
        let text = std::str::from_utf8(data)
            .map_err(|_| anyhow::anyhow!("body is neither a SQLite file nor UTF-8 SQL"))?;
        let mut c = Connection::open_in_memory()?;
        sandbox::harden(&mut c, Kind::Scratch)?;
        // The loaded database may be a few times its SQL text, never unbounded (a recursive
        // CTE in a dump would otherwise become an entry of any size).
        let pages = (data.len() as u64 * 4 + (16 << 20)) / 4096;
        c.pragma_update(None, "max_page_count", pages as i64)?;
        let _load = sandbox::enter_load(&sandbox::ReadLimits {
            timeout: std::time::Duration::from_secs(60),
            ..Default::default()
        });
        sandbox::user(Mode::Load, || c.execute_batch(text)).map_err(|e| {
            match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DiskFull) => anyhow::anyhow!(
                    "the loaded SQL grew beyond {} bytes (4 x its text + 16 MiB)",
                    pages * 4096
                ),
                _ => anyhow::anyhow!("{}", sandbox::describe(&e)),
            }
        })?;
        c
    };
    let is_stream = |name: &str| streams.contains(&name.to_ascii_lowercase());
    let result = (|| -> anyhow::Result<Vec<Statement>> {
        let mut out: Vec<Statement> = existing
            .iter()
            .map(|(kind, name)| {
                Statement::new(if is_stream(name) {
                    format!("DELETE FROM {}", quote_ident(name))
                } else {
                    format!(
                        "DROP {} IF EXISTS {}",
                        kind.to_uppercase(),
                        quote_ident(name)
                    )
                })
            })
            .collect();
        let mut st = src.prepare(
            "SELECT type, name, sql, tbl_name FROM sqlite_master WHERE sql IS NOT NULL \
             AND name NOT LIKE 'sqlite_%' AND substr(name, 1, 7) != '_cairn_' \
             AND substr(tbl_name, 1, 7) != '_cairn_' \
             ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 WHEN 'view' THEN 2 ELSE 3 END, rowid",
        )?;
        let objects: Vec<(String, String, String, String)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (_, _, sql, _) in objects
            .iter()
            .filter(|o| o.0 == "table" && !is_stream(&o.1))
        {
            out.push(Statement::new(sql.clone()));
        }
        for (_, name, _, _) in objects.iter().filter(|o| o.0 == "table") {
            let mut rows = src.prepare(&format!("SELECT * FROM {}", quote_ident(name)))?;
            let n = rows.column_count();
            let cols: Vec<String> = rows.column_names().map(quote_ident).collect();
            let insert = format!(
                "INSERT INTO {}({}) VALUES({})",
                quote_ident(name),
                cols.join(", "),
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
        // Indexes, views and triggers; a stream table keeps its own (Cairn's) schema.
        for (_, _, sql, _) in objects
            .iter()
            .filter(|o| o.0 != "table" && !is_stream(&o.3))
        {
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
