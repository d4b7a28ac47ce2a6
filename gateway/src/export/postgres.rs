//! `postgres`: one table per stream table (`{table_prefix}{table}`), created on first use
//! with the stream's columns plus `site` and `epoch`, keyed by (site, device_id, epoch, seq);
//! each delivery is one multi-row `INSERT ... ON CONFLICT DO NOTHING` per table, so a batch
//! delivered twice (a retry, a new leader) leaves one row per record.
//!
//! Types: SQLite INTEGER → BIGINT, REAL → DOUBLE PRECISION, BLOB → BYTEA, anything else TEXT.
//!
//! Changes of user tables go to one table, `{table_prefix}cairn_changes` (user tables' columns
//! change over time; a change keeps the row as it was): `site`, `history`, `log_index`,
//! `ordinal` (the key, primary key, `ON CONFLICT DO NOTHING`), `key`, `tbl`, `op`,
//! `old_row_id`, `new_row_id`, `before` and `after` as JSONB, `at_ms` (the entry's stamp).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rusqlite::types::Value;
use tokio_postgres::types::ToSql;

use super::reader::{ExportRecord, TableShape};
use crate::db::changes::ChangeRow;

/// Parameters one statement may carry (PostgreSQL's limit is 65535).
const MAX_PARAMS: usize = 60_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum PgType {
    Int,
    Real,
    Text,
    Bytes,
}

impl PgType {
    fn of(decl: &str) -> Self {
        if decl.contains("INT") {
            PgType::Int
        } else if decl.contains("REAL") || decl.contains("FLOA") || decl.contains("DOUB") {
            PgType::Real
        } else if decl.contains("BLOB") {
            PgType::Bytes
        } else {
            PgType::Text
        }
    }

    fn sql(self) -> &'static str {
        match self {
            PgType::Int => "BIGINT",
            PgType::Real => "DOUBLE PRECISION",
            PgType::Text => "TEXT",
            PgType::Bytes => "BYTEA",
        }
    }

    /// `v` as a parameter of this column type (SQLite's affinity may have stored another).
    fn param(self, v: &Value) -> Box<dyn ToSql + Sync + Send> {
        match (self, v) {
            (_, Value::Null) => match self {
                PgType::Int => Box::new(None::<i64>),
                PgType::Real => Box::new(None::<f64>),
                PgType::Text => Box::new(None::<String>),
                PgType::Bytes => Box::new(None::<Vec<u8>>),
            },
            (PgType::Int, Value::Integer(i)) => Box::new(*i),
            (PgType::Int, Value::Real(f)) => Box::new(*f as i64),
            (PgType::Real, Value::Integer(i)) => Box::new(*i as f64),
            (PgType::Real, Value::Real(f)) => Box::new(*f),
            (PgType::Bytes, Value::Blob(b)) => Box::new(b.clone()),
            (PgType::Bytes, Value::Text(s)) => Box::new(s.as_bytes().to_vec()),
            (_, other) => Box::new(match super::reader::value_json(other) {
                serde_json::Value::String(s) => s,
                j => j.to_string(),
            }),
        }
    }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub struct Postgres {
    url: String,
    prefix: String,
    timeout: Duration,
    client: Option<tokio_postgres::Client>,
    created: HashSet<String>,
}

impl Postgres {
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Self {
        Postgres {
            url: url.to_string(),
            prefix: prefix.to_string(),
            timeout,
            client: None,
            created: HashSet::new(),
        }
    }

    async fn connect(&mut self) -> Result<&tokio_postgres::Client, String> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("postgres connect: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("postgres export connection ended: {e}");
                }
            });
            self.client = Some(client);
            self.created.clear();
        }
        Ok(self.client.as_ref().expect("connected"))
    }

    pub async fn deliver(&mut self, site: &str, records: &[ExportRecord]) -> Result<(), String> {
        let r = tokio::time::timeout(self.timeout, self.deliver_inner(site, records)).await;
        self.settle(r)
    }

    pub async fn deliver_changes(
        &mut self,
        site: &str,
        changes: &[ChangeRow],
    ) -> Result<(), String> {
        let r = tokio::time::timeout(self.timeout, self.changes_inner(site, changes)).await;
        self.settle(r)
    }

    /// A delivery's outcome; after a failure the next one connects again.
    fn settle(
        &mut self,
        r: Result<Result<(), String>, tokio::time::error::Elapsed>,
    ) -> Result<(), String> {
        let r = r.unwrap_or_else(|_| Err("postgres: delivery timed out".into()));
        if r.is_err() {
            self.client = None;
        }
        r
    }

    async fn changes_inner(&mut self, site: &str, changes: &[ChangeRow]) -> Result<(), String> {
        self.connect().await?;
        let dest = format!("{}cairn_changes", self.prefix);
        let client = self.client.as_ref().expect("connected");
        if !self.created.contains(&dest) {
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {} (site TEXT NOT NULL, history BIGINT NOT NULL, \
                 log_index BIGINT NOT NULL, ordinal BIGINT NOT NULL, key TEXT NOT NULL, \
                 tbl TEXT NOT NULL, op TEXT NOT NULL, old_row_id BIGINT NOT NULL, \
                 new_row_id BIGINT NOT NULL, before JSONB, after JSONB, at_ms BIGINT NOT NULL, \
                 PRIMARY KEY (site, history, log_index, ordinal))",
                quote(&dest)
            );
            client
                .batch_execute(&ddl)
                .await
                .map_err(|e| format!("postgres: creating {dest}: {e}"))?;
            self.created.insert(dest.clone());
        }
        const PER_ROW: usize = 12;
        for chunk in changes.chunks(MAX_PARAMS / PER_ROW) {
            let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
            let mut tuples = Vec::with_capacity(chunk.len());
            for c in chunk {
                let base = params.len();
                let json = |m: &Option<serde_json::Map<String, serde_json::Value>>| {
                    m.as_ref()
                        .map(|m| serde_json::Value::Object(m.clone()).to_string())
                };
                params.push(Box::new(site.to_string()));
                params.push(Box::new(c.history as i64));
                params.push(Box::new(c.pos.log_index as i64));
                params.push(Box::new(i64::from(c.pos.ordinal)));
                params.push(Box::new(c.key(site)));
                params.push(Box::new(c.table.clone()));
                params.push(Box::new(c.op.as_str().to_string()));
                params.push(Box::new(c.old_row_id));
                params.push(Box::new(c.new_row_id));
                params.push(Box::new(json(&c.before)));
                params.push(Box::new(json(&c.after)));
                params.push(Box::new(c.at_ms));
                let marks: Vec<String> = (1..=PER_ROW)
                    .map(|i| match i {
                        10 | 11 => format!("${}::text::jsonb", base + i),
                        _ => format!("${}", base + i),
                    })
                    .collect();
                tuples.push(format!("({})", marks.join(", ")));
            }
            let sql = format!(
                "INSERT INTO {} (site, history, log_index, ordinal, key, tbl, op, old_row_id, \
                 new_row_id, before, after, at_ms) VALUES {} \
                 ON CONFLICT (site, history, log_index, ordinal) DO NOTHING",
                quote(&dest),
                tuples.join(", ")
            );
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            client
                .execute(&sql, &refs)
                .await
                .map_err(|e| format!("postgres: insert into {dest}: {e}"))?;
        }
        Ok(())
    }

    async fn deliver_inner(&mut self, site: &str, records: &[ExportRecord]) -> Result<(), String> {
        let mut by_table: BTreeMap<&str, Vec<&ExportRecord>> = BTreeMap::new();
        for r in records {
            by_table.entry(r.table()).or_default().push(r);
        }
        self.connect().await?;
        for (table, rows) in by_table {
            let shape = rows[0].shape.clone();
            let dest = format!("{}{}", self.prefix, table);
            if !self.created.contains(&dest) {
                let ddl = create_sql(&dest, &shape);
                let client = self.client.as_ref().expect("connected");
                client
                    .batch_execute(&ddl)
                    .await
                    .map_err(|e| format!("postgres: creating {dest}: {e}"))?;
                self.created.insert(dest.clone());
            }
            let types: Vec<PgType> = shape.columns.iter().map(|(_, t)| PgType::of(t)).collect();
            let per_row = types.len() + 2;
            for chunk in rows.chunks((MAX_PARAMS / per_row).max(1)) {
                let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
                let mut tuples = Vec::with_capacity(chunk.len());
                for r in chunk {
                    let base = params.len();
                    params.push(Box::new(site.to_string()));
                    params.push(Box::new(r.epoch as i64));
                    for (ty, v) in types.iter().zip(&r.values) {
                        params.push(ty.param(v));
                    }
                    let marks: Vec<String> =
                        (1..=per_row).map(|i| format!("${}", base + i)).collect();
                    tuples.push(format!("({})", marks.join(", ")));
                }
                let cols: Vec<String> = shape.columns.iter().map(|(c, _)| quote(c)).collect();
                let sql = format!(
                    "INSERT INTO {} (site, epoch, {}) VALUES {} \
                     ON CONFLICT (site, device_id, epoch, seq) DO NOTHING",
                    quote(&dest),
                    cols.join(", "),
                    tuples.join(", ")
                );
                let refs: Vec<&(dyn ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                let client = self.client.as_ref().expect("connected");
                client
                    .execute(&sql, &refs)
                    .await
                    .map_err(|e| format!("postgres: insert into {dest}: {e}"))?;
            }
        }
        Ok(())
    }
}

fn create_sql(dest: &str, shape: &TableShape) -> String {
    let cols: Vec<String> = shape
        .columns
        .iter()
        .map(|(c, t)| {
            let null = if c == "device_id" || c == "seq" {
                " NOT NULL"
            } else {
                ""
            };
            format!("{} {}{null}", quote(c), PgType::of(t).sql())
        })
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {} (site TEXT NOT NULL, epoch BIGINT NOT NULL, {}, \
         PRIMARY KEY (site, device_id, epoch, seq))",
        quote(dest),
        cols.join(", ")
    )
}
