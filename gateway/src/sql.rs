//! rqlite-shaped SQL: request parsing, execution on a connection, and the rewrite that makes
//! writes deterministic before they enter the log.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql};
use serde::{Deserialize, Serialize};

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

impl Value {
    /// The JSON rqlite uses for a cell: blobs are base64 strings, like Go's `[]byte`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Integer(i) => (*i).into(),
            Value::Real(r) => serde_json::Number::from_f64(*r)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Text(s) => s.clone().into(),
            Value::Blob(b) => base64(b).into(),
        }
    }

    fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        Ok(match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Integer(i64::from(*b)),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                None => Value::Real(n.as_f64().ok_or("number out of range")?),
            },
            serde_json::Value::String(s) => Value::Text(s.clone()),
            serde_json::Value::Array(a) => {
                // rqlite accepts a blob as an array of byte values.
                let bytes: Option<Vec<u8>> = a
                    .iter()
                    .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect();
                Value::Blob(bytes.ok_or("array parameters must be byte values 0..=255")?)
            }
            serde_json::Value::Object(_) => return Err("object is not a valid parameter".into()),
        })
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

/// The payload of [`crate::command::Command::Sql`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SqlCommand {
    pub statements: Vec<Statement>,
    /// All statements succeed or none does (`?transaction`).
    pub transaction: bool,
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

/// Parses an rqlite request body: a JSON array whose items are either a SQL string or an array
/// `[sql, params...]` / `[sql, {named params}]`.
pub fn parse_statements(body: &[u8]) -> Result<Vec<Statement>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let items = v
        .as_array()
        .ok_or("request body must be a JSON array of statements")?;
    items.iter().map(parse_statement).collect()
}

fn parse_statement(item: &serde_json::Value) -> Result<Statement, String> {
    match item {
        serde_json::Value::String(s) => Ok(Statement::new(s.clone())),
        serde_json::Value::Array(parts) => {
            let sql = parts
                .first()
                .and_then(|s| s.as_str())
                .ok_or("a parameterized statement must start with the SQL string")?;
            let rest = &parts[1..];
            let params = match rest {
                [] => Params::None,
                [serde_json::Value::Object(map)] => Params::Named(
                    map.iter()
                        .map(|(k, v)| Ok((k.clone(), Value::from_json(v)?)))
                        .collect::<Result<_, String>>()?,
                ),
                _ => Params::Positional(
                    rest.iter()
                        .map(Value::from_json)
                        .collect::<Result<_, String>>()?,
                ),
            };
            Ok(Statement {
                sql: sql.to_string(),
                params,
            })
        }
        _ => Err("each statement must be a string or an array".into()),
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
    run_checked(conn, st).unwrap_or_else(|e| StatementResult::error(crate::sandbox::describe(&e)))
}

/// Like [`run_statement`], but an error of this node's environment (disk full, I/O, ...) is
/// an `Err` rather than a result: apply must never record one (see [`crate::sandbox`]).
pub fn run_checked(conn: &Connection, st: &Statement) -> rusqlite::Result<StatementResult> {
    let start = Instant::now();
    if let Some(kw) = transaction_control_keyword(&st.sql) {
        // Would end the entry's (or the reader's) transaction behind the caller's back.
        return Ok(StatementResult::error(format!(
            "{kw} is not allowed; use ?transaction to run statements atomically"
        )));
    }
    if let Err(e) = crate::sandbox::precheck(&st.sql) {
        return Ok(StatementResult::error(format!("not authorized: {e}")));
    }
    let mut res = match run_statement_inner(conn, st) {
        Ok(r) => r,
        Err(e) if crate::sandbox::is_environment_error(&e) => return Err(e),
        Err(e) => StatementResult::error(crate::sandbox::describe(&e)),
    };
    res.time = start.elapsed().as_secs_f64();
    Ok(res)
}

fn run_statement_inner(conn: &Connection, st: &Statement) -> rusqlite::Result<StatementResult> {
    let mut stmt = conn.prepare(&st.sql)?;
    bind(&mut stmt, &st.params)?;
    let ncol = stmt.column_count();
    if ncol == 0 {
        stmt.raw_execute()?;
        return Ok(StatementResult {
            last_insert_id: conn.last_insert_rowid(),
            rows_affected: conn.changes() as i64,
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
        crate::sandbox::charge_row(bytes).map_err(|msg| {
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

/// Applies a SQL command inside the entry's open transaction.
///
/// With `transaction`, all statements share one savepoint: the first error rolls all of them
/// back and the remaining statements are not run (their results are absent, as in rqlite).
/// Without it, each statement has its own savepoint, so a failing statement leaves the
/// others' effects in place, like autocommit.
pub fn apply_sql(conn: &Connection, cmd: &SqlCommand) -> rusqlite::Result<Vec<StatementResult>> {
    struct Runner<'a>(&'a SqlCommand);
    impl crate::sandbox::StatementRunner for Runner<'_> {
        type Result = StatementResult;
        fn run(&mut self, conn: &Connection, i: usize) -> rusqlite::Result<StatementResult> {
            run_checked(conn, &self.0.statements[i])
        }
        fn error(r: &StatementResult) -> Option<&str> {
            r.error.as_deref()
        }
        fn failed(msg: String) -> StatementResult {
            StatementResult::error(msg)
        }
        fn fail(r: &mut StatementResult, msg: String) {
            *r = StatementResult::error(msg);
        }
    }
    crate::sandbox::apply_statements(
        conn,
        &mut Runner(cmd),
        cmd.statements.len(),
        cmd.transaction,
    )
}

/// Runs read-only statements on a reader connection (no savepoints, no log), under the
/// sandbox's read rules and `limits`; `cancel` stops the read when it becomes true.
pub fn query(
    conn: &Connection,
    statements: &[Statement],
    transaction: bool,
    limits: &crate::sandbox::ReadLimits,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> Vec<StatementResult> {
    if transaction {
        let _ = conn.execute_batch("BEGIN");
    }
    let out = {
        let _read = crate::sandbox::enter_read(limits, cancel);
        statements
            .iter()
            .map(|s| crate::sandbox::user(crate::sandbox::Mode::Read, || run_statement(conn, s)))
            .collect()
    };
    if transaction {
        let _ = conn.execute_batch("COMMIT");
    }
    out
}

/// User tables and views of a database: `(type, name)`, excluding SQLite's and Cairn's own.
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
    streams: &std::collections::BTreeSet<String>,
) -> anyhow::Result<Vec<Statement>> {
    use crate::sandbox::{self, Kind};
    let mut tmp = None;
    let src = if data.starts_with(b"SQLite format 3\0") {
        let path = scratch_dir.join(format!("load-{}.db", rand::random::<u64>()));
        std::fs::write(&path, data)?;
        tmp = Some(path.clone());
        let mut c = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
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
        sandbox::user(sandbox::Mode::Load, || c.execute_batch(text)).map_err(|e| {
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

// ---------------------------------------------------------------------------------------------
// Determinism: what the leader does to a write before it enters the log.
// ---------------------------------------------------------------------------------------------

/// The leader's clock and randomness, fixed once per proposed command.
pub struct Stamp {
    pub now: SystemTime,
}

impl Stamp {
    /// This node's clock, never lower than a stamp it gave before.
    pub fn now() -> Self {
        static LAST_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let prev = LAST_MS.fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
        Stamp {
            now: UNIX_EPOCH + std::time::Duration::from_millis(ms.max(prev) as u64),
        }
    }

    /// The stamp in Unix ms, as entries carry it.
    pub fn unix_ms(&self) -> i64 {
        self.now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// Makes a write command deterministic: rewrites `RANDOM()`, `RANDOMBLOB(n)`,
/// `CURRENT_TIMESTAMP`/`CURRENT_DATE`/`CURRENT_TIME` and `'now'` inside date and time functions
/// into constants, and rejects statements that would break the one-transaction-per-entry rule.
/// Errors are per statement: the command is refused as a whole with a message naming it.
pub fn prepare_write(cmd: &mut SqlCommand, stamp: &Stamp) -> Result<(), String> {
    for (i, st) in cmd.statements.iter_mut().enumerate() {
        if let Some(kw) = transaction_control_keyword(&st.sql) {
            return Err(format!(
                "statement {i}: {kw} is not allowed; use ?transaction to run statements atomically"
            ));
        }
        crate::sandbox::precheck(&st.sql)
            .map_err(|e| format!("statement {i}: not authorized: {e}"))?;
        st.sql =
            rewrite_nondeterministic(&st.sql, stamp).map_err(|e| format!("statement {i}: {e}"))?;
    }
    Ok(())
}

/// The words of `sql` outside string literals, quoted identifiers and comments, uppercased.
pub(crate) fn significant_words(sql: &str) -> Vec<String> {
    tokenize(sql)
        .into_iter()
        .filter(|t| t.kind == TokKind::Word)
        .map(|t| t.text(sql).to_ascii_uppercase())
        .collect()
}

/// Every token of `sql` except spaces and comments, as written.
pub(crate) fn significant_tokens(sql: &str) -> Vec<&str> {
    tokenize(sql)
        .into_iter()
        .filter(|t| !matches!(t.kind, TokKind::Space | TokKind::Comment))
        .map(|t| t.text(sql))
        .collect()
}

/// The keyword if `sql` starts with a transaction-control statement.
pub fn transaction_control_keyword(sql: &str) -> Option<String> {
    let first = tokenize(sql)
        .into_iter()
        .find(|t| !matches!(t.kind, TokKind::Space | TokKind::Comment))?;
    let word = first.text(sql).to_ascii_uppercase();
    matches!(
        word.as_str(),
        "BEGIN" | "COMMIT" | "END" | "ROLLBACK" | "SAVEPOINT" | "RELEASE"
    )
    .then_some(word)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum TokKind {
    Word,
    /// `'...'` string literal.
    Str,
    /// `"..."`, `` `...` ``, `[...]` quoted identifiers.
    QuotedIdent,
    Space,
    Comment,
    Punct,
}

#[derive(Debug, Clone, Copy)]
struct Tok {
    kind: TokKind,
    start: usize,
    end: usize,
}

impl Tok {
    fn text<'a>(&self, s: &'a str) -> &'a str {
        &s[self.start..self.end]
    }
}

/// A small SQL lexer: just enough to never touch text inside literals, identifiers or comments.
fn tokenize(s: &str) -> Vec<Tok> {
    let b = s.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let c = b[i];
        let kind = if c.is_ascii_whitespace() {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            TokKind::Space
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            TokKind::Comment
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i = (i + 2).min(b.len());
            TokKind::Comment
        } else if c == b'\'' || c == b'"' || c == b'`' || c == b'[' {
            let close = if c == b'[' { b']' } else { c };
            i += 1;
            loop {
                if i >= b.len() {
                    break;
                }
                if b[i] == close {
                    // A doubled quote is an escaped quote.
                    if close != b']' && b.get(i + 1) == Some(&close) {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
            if c == b'\'' {
                TokKind::Str
            } else {
                TokKind::QuotedIdent
            }
        } else if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80 || b[i] == b'$')
            {
                i += 1;
            }
            TokKind::Word
        } else {
            i += 1;
            TokKind::Punct
        };
        toks.push(Tok {
            kind,
            start,
            end: i,
        });
    }
    toks
}

const TIME_FUNCTIONS: &[&str] = &[
    "date",
    "time",
    "datetime",
    "julianday",
    "unixepoch",
    "strftime",
    "timediff",
];

fn rewrite_nondeterministic(sql: &str, stamp: &Stamp) -> Result<String, String> {
    let toks = tokenize(sql);
    let mut out = String::with_capacity(sql.len());
    // Paren depth of each open date/time function call, innermost last.
    let mut time_calls: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut pending_time_fn = false;
    let next_sig = |from: usize| {
        toks[from..]
            .iter()
            .position(|t| !matches!(t.kind, TokKind::Space | TokKind::Comment))
            .map(|p| from + p)
    };
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        let text = t.text(sql);
        match t.kind {
            TokKind::Word => {
                let upper = text.to_ascii_uppercase();
                let call_open = next_sig(i + 1).filter(|&j| toks[j].text(sql) == "(");
                match upper.as_str() {
                    "RANDOM" if call_open.is_some() => {
                        let open = call_open.unwrap_or(i);
                        let close = next_sig(open + 1).filter(|&j| toks[j].text(sql) == ")");
                        let Some(close) = close else {
                            return Err("RANDOM() takes no arguments".into());
                        };
                        out.push_str(&rand::random::<i64>().to_string());
                        i = close + 1;
                        continue;
                    }
                    "RANDOMBLOB" if call_open.is_some() => {
                        let open = call_open.unwrap_or(i);
                        let arg = next_sig(open + 1);
                        let close = arg.and_then(|a| next_sig(a + 1));
                        let n = arg.and_then(|a| toks[a].text(sql).parse::<usize>().ok());
                        match (n, close.filter(|&c| toks[c].text(sql) == ")")) {
                            (Some(n), Some(close)) if n <= 1 << 20 => {
                                let bytes: Vec<u8> =
                                    (0..n.max(1)).map(|_| rand::random::<u8>()).collect();
                                out.push_str("X'");
                                for byte in bytes {
                                    out.push_str(&format!("{byte:02X}"));
                                }
                                out.push('\'');
                                i = close + 1;
                                continue;
                            }
                            _ => {
                                return Err(
                                    "RANDOMBLOB() in a write needs an integer literal length (at most 1 MiB)"
                                        .into(),
                                );
                            }
                        }
                    }
                    "CURRENT_TIMESTAMP" => {
                        out.push_str(&format!("'{}'", format_utc(stamp.now, Format::DateTime)));
                    }
                    "CURRENT_DATE" => {
                        out.push_str(&format!("'{}'", format_utc(stamp.now, Format::Date)))
                    }
                    "CURRENT_TIME" => {
                        out.push_str(&format!("'{}'", format_utc(stamp.now, Format::Time)))
                    }
                    _ => {
                        if call_open.is_some()
                            && TIME_FUNCTIONS.contains(&upper.to_ascii_lowercase().as_str())
                        {
                            pending_time_fn = true;
                        }
                        out.push_str(text);
                    }
                }
            }
            TokKind::Punct if text == "(" => {
                depth += 1;
                if pending_time_fn {
                    time_calls.push(depth);
                    pending_time_fn = false;
                }
                out.push_str(text);
            }
            TokKind::Punct if text == ")" => {
                if time_calls.last() == Some(&depth) {
                    time_calls.pop();
                }
                depth = depth.saturating_sub(1);
                out.push_str(text);
            }
            TokKind::Str if !time_calls.is_empty() && text.eq_ignore_ascii_case("'now'") => {
                out.push_str(&format!(
                    "'{}'",
                    format_utc(stamp.now, Format::DateTimeMillis)
                ));
            }
            _ => out.push_str(text),
        }
        i += 1;
    }
    Ok(out)
}

enum Format {
    DateTime,
    DateTimeMillis,
    Date,
    Time,
}

/// UTC formatting without a date crate (days-to-civil from Howard Hinnant's algorithms).
fn format_utc(t: SystemTime, f: Format) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (h, m, s) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    match f {
        Format::Date => format!("{year:04}-{month:02}-{day:02}"),
        Format::Time => format!("{h:02}:{m:02}:{s:02}"),
        Format::DateTime => format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}"),
        Format::DateTimeMillis => format!(
            "{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}.{:03}",
            d.subsec_millis()
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn stamp() -> Stamp {
        // 2024-02-29 12:34:56.789 UTC
        Stamp {
            now: UNIX_EPOCH + Duration::from_millis(1_709_210_096_789),
        }
    }

    #[test]
    fn test_rewrite_time() {
        let s = stamp();
        assert_eq!(
            rewrite_nondeterministic(
                "INSERT INTO t VALUES(CURRENT_TIMESTAMP, current_date, CURRENT_TIME)",
                &s
            )
            .unwrap(),
            "INSERT INTO t VALUES('2024-02-29 12:34:56', '2024-02-29', '12:34:56')"
        );
        assert_eq!(
            rewrite_nondeterministic("INSERT INTO t VALUES(datetime('now', '+1 day'), 'now')", &s)
                .unwrap(),
            "INSERT INTO t VALUES(datetime('2024-02-29 12:34:56.789', '+1 day'), 'now')"
        );
        assert_eq!(
            rewrite_nondeterministic("UPDATE t SET a = strftime('%s', 'NOW')", &s).unwrap(),
            "UPDATE t SET a = strftime('%s', '2024-02-29 12:34:56.789')"
        );
    }

    #[test]
    fn test_rewrite_leaves_literals_alone() {
        let s = stamp();
        let sql = "INSERT INTO t VALUES('RANDOM()', \"CURRENT_TIME\") -- random()";
        assert_eq!(rewrite_nondeterministic(sql, &s).unwrap(), sql);
    }

    #[test]
    fn test_rewrite_random() {
        let s = stamp();
        let out = rewrite_nondeterministic(
            "INSERT INTO t VALUES(random(), RANDOMBLOB(4), abs(RANDOM ( )))",
            &s,
        )
        .unwrap();
        assert!(!out.to_ascii_uppercase().contains("RANDOM"), "{out}");
        assert!(out.contains("X'"), "{out}");
        assert!(rewrite_nondeterministic("SELECT randomblob(x) FROM t", &s).is_err());
    }

    #[test]
    fn test_transaction_control_rejected() {
        let mut cmd = SqlCommand {
            statements: vec![
                Statement::new("  begin"),
                Statement::new("INSERT INTO t VALUES(1)"),
            ],
            transaction: false,
        };
        assert!(
            prepare_write(&mut cmd, &stamp())
                .unwrap_err()
                .contains("BEGIN")
        );
    }

    #[test]
    fn test_parse_statements() {
        let st = parse_statements(
            br#"["CREATE TABLE t(a)", ["INSERT INTO t VALUES(?, ?)", 1, "x"], ["INSERT INTO t VALUES(:a)", {"a": 2.5}]]"#,
        )
        .unwrap();
        assert_eq!(st[0].params, Params::None);
        assert_eq!(
            st[1].params,
            Params::Positional(vec![Value::Integer(1), Value::Text("x".into())])
        );
        assert_eq!(
            st[2].params,
            Params::Named(vec![("a".into(), Value::Real(2.5))])
        );
        assert!(parse_statements(b"{}").is_err());
    }

    #[test]
    fn test_apply_sql_savepoints() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT); BEGIN")
            .unwrap();
        let cmd = SqlCommand {
            statements: vec![
                Statement::new("INSERT INTO t(b) VALUES('x')"),
                Statement::new("INSERT INTO nope VALUES(1)"),
                Statement {
                    sql: "INSERT INTO t(b) VALUES(:b)".into(),
                    params: Params::Named(vec![("b".into(), Value::Text("y".into()))]),
                },
            ],
            transaction: false,
        };
        let r = apply_sql(&conn, &cmd).unwrap();
        assert_eq!(r.len(), 3);
        assert!(r[1].error.as_deref().unwrap().contains("no such table"));
        assert_eq!(r[2].last_insert_id, 2);
        let tx = SqlCommand {
            transaction: true,
            ..cmd
        };
        let r = apply_sql(&conn, &tx).unwrap();
        assert_eq!(r.len(), 2, "stops at the first error");
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2, "the transaction's first insert was rolled back");
    }

    #[test]
    fn test_transaction_control_is_an_error_result_in_apply() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(a); BEGIN").unwrap();
        let cmd = SqlCommand {
            statements: vec![
                Statement::new("COMMIT"),
                Statement::new("INSERT INTO t VALUES(1)"),
            ],
            transaction: false,
        };
        let r = apply_sql(&conn, &cmd).unwrap();
        assert!(r[0].error.as_deref().unwrap().contains("COMMIT"));
        assert!(
            !conn.is_autocommit(),
            "the entry's transaction is still open"
        );
    }

    #[test]
    fn test_base64() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
