//! rqlite-shaped SQL on a connection: values, statements with their parameters, and the
//! result of running one, typed the way rqlite types columns.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql};
use serde::{Deserialize, Serialize};

use super::lex::transaction_control_keyword;
use super::sandbox;

/// A SQL value as a parameter or a result cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl From<ValueRef<'_>> for Value {
    fn from(v: ValueRef<'_>) -> Self {
        match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(r) => Value::Real(r),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

/// Parameters of one statement, as rqlite accepts them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Params {
    #[default]
    None,
    /// `["INSERT .. VALUES(?, ?)", 1, "a"]`
    Positional(Vec<Value>),
    /// `["INSERT .. VALUES(:a)", {"a": 1}]`; names without the `:`/`@`/`$` prefix.
    Named(Vec<(String, Value)>),
}

/// One SQL statement and its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    pub sql: String,
    pub params: Params,
}

impl Statement {
    pub fn new(sql: impl Into<String>) -> Self {
        Statement {
            sql: sql.into(),
            params: Params::None,
        }
    }
}

/// The outcome of one statement, shaped like an rqlite result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatementResult {
    /// True when the statement returned rows (a query, or `.. RETURNING`).
    pub is_query: bool,
    pub columns: Vec<String>,
    pub types: Vec<String>,
    pub values: Vec<Vec<Value>>,
    pub last_insert_id: i64,
    pub rows_affected: i64,
    pub error: Option<String>,
    /// Seconds spent executing, for `?timings`. Not part of the replicated state.
    pub time: f64,
}

impl StatementResult {
    pub fn error(msg: impl Into<String>) -> Self {
        StatementResult {
            error: Some(msg.into()),
            ..Default::default()
        }
    }
}

fn bind(stmt: &mut rusqlite::Statement<'_>, params: &Params) -> rusqlite::Result<()> {
    match params {
        Params::None => {}
        Params::Positional(values) => {
            for (i, v) in values.iter().enumerate() {
                stmt.raw_bind_parameter(i + 1, v)?;
            }
        }
        Params::Named(values) => {
            for (name, v) in values {
                let idx = [":", "@", "$", ""]
                    .iter()
                    .find_map(|p| stmt.parameter_index(&format!("{p}{name}")).ok().flatten())
                    .ok_or_else(|| rusqlite::Error::InvalidParameterName(name.clone()))?;
                stmt.raw_bind_parameter(idx, v)?;
            }
        }
    }
    Ok(())
}

/// Runs one statement: rows if it returns any, else rows affected and last insert id.
/// SQL errors become the result's `error`.
pub fn run_statement(conn: &Connection, st: &Statement) -> StatementResult {
    run_checked(conn, st).unwrap_or_else(|e| StatementResult::error(sandbox::describe(&e)))
}

/// Like [`run_statement`], but an error of this node's environment (disk full, I/O, ...) is
/// an `Err` rather than a result: apply must never record one (see [`sandbox`]).
pub fn run_checked(conn: &Connection, st: &Statement) -> rusqlite::Result<StatementResult> {
    let start = Instant::now();
    if let Some(kw) = transaction_control_keyword(&st.sql) {
        // Would end the entry's (or the reader's) transaction behind the caller's back.
        return Ok(StatementResult::error(format!(
            "{kw} is not allowed; use ?transaction to run statements atomically"
        )));
    }
    if let Err(e) = sandbox::precheck(&st.sql) {
        return Ok(StatementResult::error(format!("not authorized: {e}")));
    }
    let mut res = match run_statement_inner(conn, st) {
        Ok(r) => r,
        Err(e) if sandbox::is_environment_error(&e) => return Err(e),
        Err(e) => StatementResult::error(sandbox::describe(&e)),
    };
    res.time = start.elapsed().as_secs_f64();
    Ok(res)
}

fn run_statement_inner(conn: &Connection, st: &Statement) -> rusqlite::Result<StatementResult> {
    let mut stmt = conn.prepare(&st.sql)?;
    bind(&mut stmt, &st.params)?;
    let ncol = stmt.column_count();
    if ncol == 0 {
        // `changes()` and `last_insert_rowid()` keep the values of the connection's last
        // INSERT/UPDATE/DELETE: a statement that changed no row (DDL, a no-op UPDATE) reports
        // neither, as rqlite answers `{}` for DDL.
        let (total, rowid) = (conn.total_changes(), conn.last_insert_rowid());
        stmt.raw_execute()?;
        let changed = conn.total_changes() != total;
        let inserted = changed
            && (conn.last_insert_rowid() != rowid
                || matches!(
                    super::lex::significant_words(&st.sql)
                        .first()
                        .map(String::as_str),
                    Some("INSERT" | "REPLACE")
                ));
        return Ok(StatementResult {
            last_insert_id: if inserted {
                conn.last_insert_rowid()
            } else {
                0
            },
            rows_affected: if changed { conn.changes() as i64 } else { 0 },
            ..Default::default()
        });
    }
    let columns: Vec<String> = stmt.column_names().map(|s| s.to_string()).collect();
    let decl: Vec<Option<String>> = stmt
        .columns()
        .map(|c| c.decl_type().map(|t| t.to_ascii_lowercase()))
        .collect();
    let mut values = Vec::new();
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next()? {
        let mut out = Vec::with_capacity(ncol);
        let mut bytes = 0;
        for i in 0..ncol {
            let v = row.get_ref(i)?;
            bytes += match v {
                ValueRef::Text(b) | ValueRef::Blob(b) => b.len(),
                _ => 8,
            };
            out.push(Value::from(v));
        }
        sandbox::charge_row(bytes).map_err(|msg| {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_TOOBIG),
                Some(msg),
            )
        })?;
        values.push(out);
    }
    // rqlite reports the declared type; for expressions it falls back to the value's type.
    let types = (0..ncol)
        .map(|i| {
            decl[i].clone().unwrap_or_else(|| {
                match values.first().map(|r| &r[i]) {
                    Some(Value::Integer(_)) => "integer",
                    Some(Value::Real(_)) => "real",
                    Some(Value::Text(_)) => "text",
                    Some(Value::Blob(_)) => "blob",
                    _ => "",
                }
                .to_string()
            })
        })
        .collect();
    Ok(StatementResult {
        is_query: true,
        columns,
        types,
        values,
        ..Default::default()
    })
}

/// Runs read-only statements on a reader connection (no savepoints, no log), under the
/// sandbox's read rules and `limits`; `cancel` stops the read when it becomes true.
pub fn query(
    conn: &Connection,
    statements: &[Statement],
    transaction: bool,
    limits: &sandbox::ReadLimits,
    cancel: Option<Arc<AtomicBool>>,
) -> Vec<StatementResult> {
    if transaction {
        let _ = conn.execute_batch("BEGIN");
    }
    let out = {
        let _read = sandbox::enter_read(limits, cancel);
        statements
            .iter()
            .map(|s| sandbox::user(sandbox::Mode::Read, || run_statement(conn, s)))
            .collect()
    };
    if transaction {
        let _ = conn.execute_batch("COMMIT");
    }
    out
}

/// True when SQLite says every statement is read-only (prepared under the read rules).
/// Statements that do not prepare (for example because an earlier statement creates their
/// table) count as writes.
pub fn all_read_only(conn: &Connection, sqls: &[String]) -> bool {
    sandbox::user(sandbox::Mode::Read, || {
        sqls.iter()
            .all(|s| conn.prepare(s).map(|p| p.readonly()).unwrap_or(false))
    })
}

/// Standard base64 with padding, for blob cells.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_base64() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
