//! The authorizer every user statement runs under, the pragma allowlists, and the lexical
//! pre-check of what the authorizer cannot see.

use std::collections::BTreeSet;

use rusqlite::Connection;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};

use super::{LOCAL, Mode, mode, system};
use crate::db::lex::{significant_tokens, significant_words};
use crate::db::schema::Schema;
use crate::db::{DBPAGE, tables};

/// Pragmas that only describe the schema or the build: the same on every replica, allowed in
/// reads and writes. Those marked in [`PRAGMAS_WITH_ARGUMENT`] take a table or index name;
/// the others may not be given a value (that would set them), except [`SETTABLE_PRAGMAS`].
pub const INSPECT_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "collation_list",
    "function_list",
    "module_list",
    "pragma_list",
    "compile_options",
    "encoding",
    "foreign_keys",
    "user_version",
    "application_id",
];

/// Pragmas whose argument names a table or an index (not a setting).
pub const PRAGMAS_WITH_ARGUMENT: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
];

/// Pragmas a write may set: they live in the database header and replicate like data.
pub const SETTABLE_PRAGMAS: &[&str] = &["user_version", "application_id"];

/// Pragmas whose answer is this node's (file layout, path, connection): reads only.
pub const NODE_PRAGMAS: &[&str] = &[
    "database_list",
    "page_count",
    "page_size",
    "freelist_count",
    "data_version",
    "schema_version",
    "integrity_check",
    "quick_check",
    // SQLAlchemy's SQLite dialect reads it on connect for the isolation level.
    "read_uncommitted",
];

/// Virtual table modules a user may create tables with (deterministic, content-only).
const VTAB_MODULES: &[&str] = &["fts3", "fts4", "fts5", "rtree", "rtree_i32"];

pub(super) fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// A Cairn table: `_cairn_*`.
pub fn is_cairn(name: &str) -> bool {
    lower(name).starts_with("_cairn_")
}

fn is_sqlite(name: &str) -> bool {
    lower(name).starts_with("sqlite_")
}

fn is_stream(name: &str) -> bool {
    LOCAL.with(|l| l.streams.borrow().contains(&lower(name)))
}

pub(super) fn authorize(ctx: AuthContext<'_>) -> Authorization {
    let mode = match mode() {
        // Cairn runs no triggers or views of its own: these are the user's.
        Mode::System if ctx.accessor.is_some() => Mode::Write,
        m => m,
    };
    match rule(mode, &ctx) {
        Ok(a) => a,
        Err(reason) => {
            LOCAL.with(|l| *l.denied.borrow_mut() = Some(reason));
            Authorization::Deny
        }
    }
}

fn reserved_name(name: &str) -> Result<Authorization, String> {
    // SQLite itself refuses user objects named sqlite_* (and creates sqlite_sequence and
    // sqlite_stat1 on its own).
    if is_cairn(name) {
        Err(format!(
            "names starting with _cairn_ or sqlite_ are reserved ({name})"
        ))
    } else {
        Ok(Authorization::Allow)
    }
}

fn ddl_target(table: &str, what: &str) -> Result<Authorization, String> {
    if is_cairn(table) {
        Err(format!(
            "{table} is Cairn's own table: {what} on it is not allowed"
        ))
    } else if is_sqlite(table) {
        Err(format!(
            "{table} is SQLite's own table: {what} on it is not allowed"
        ))
    } else if is_stream(table) {
        Err(format!(
            "{table} is a device stream table: {what} on it is not allowed (its schema follows \
             the stream definitions, and device batches must apply identically on every replica)"
        ))
    } else {
        Ok(Authorization::Allow)
    }
}

fn pragma_rule(mode: Mode, name: &str, value: Option<&str>) -> Result<Authorization, String> {
    let name = lower(name);
    let n = name.as_str();
    let with_arg = PRAGMAS_WITH_ARGUMENT.contains(&n);
    let ok = match mode {
        Mode::System => true,
        Mode::Write => {
            (INSPECT_PRAGMAS.contains(&n) && (value.is_none() || with_arg))
                || SETTABLE_PRAGMAS.contains(&n)
        }
        Mode::Read | Mode::Load => {
            (INSPECT_PRAGMAS.contains(&n) || NODE_PRAGMAS.contains(&n))
                && (value.is_none() || with_arg)
        }
    };
    match (ok, mode) {
        (true, _) => Ok(Authorization::Allow),
        // A dump's `PRAGMA foreign_keys=OFF` and friends: a no-op in the scratch database.
        (false, Mode::Load) => Ok(Authorization::Ignore),
        (false, Mode::Write) if NODE_PRAGMAS.contains(&n) && value.is_none() => Err(format!(
            "PRAGMA {n} answers this node's own value (it differs between replicas): use it in a read (/db/query)"
        )),
        (false, _) => Err(format!(
            "PRAGMA {n}{} is not allowed: user SQL may run the schema-inspection pragmas \
             (table_info, index_list, foreign_key_list, ...; the README lists them) and set \
             only user_version and application_id",
            if value.is_some() { " with a value" } else { "" },
        )),
    }
}

/// True if `action` reads, writes or creates a table of the raw-page module ([`DBPAGE`]).
fn raw_pages(action: &AuthAction<'_>) -> bool {
    use AuthAction as A;
    let name = match *action {
        A::Read { table_name, .. }
        | A::Insert { table_name }
        | A::Update { table_name, .. }
        | A::Delete { table_name } => table_name,
        A::CreateVtable { module_name, .. } => module_name,
        _ => return false,
    };
    name.eq_ignore_ascii_case(DBPAGE)
}

fn rule(mode: Mode, ctx: &AuthContext<'_>) -> Result<Authorization, String> {
    use AuthAction as A;
    use Authorization::{Allow, Ignore};
    if mode == Mode::System {
        return Ok(Allow);
    }
    // Also dropped from every connection user SQL runs on (`connection::harden`): the raw
    // pages would show Cairn's own tables byte for byte and, written, bypass every rule.
    if raw_pages(&ctx.action) {
        return Err(format!(
            "{DBPAGE} (the database's raw pages) is not readable or writable by SQL"
        ));
    }
    let load = mode == Mode::Load;
    let temp = ctx
        .database_name
        .is_some_and(|d| d.eq_ignore_ascii_case("temp"));
    let no_temp = || {
        Err(
            "temporary tables, views, triggers and indexes are not allowed: they would exist \
             in one connection of one node only"
                .to_string(),
        )
    };
    Ok(match ctx.action {
        A::Select | A::Recursive => Allow,
        A::Attach { .. } => return Err("ATTACH is not allowed".into()),
        A::Detach { .. } => return Err("DETACH is not allowed".into()),
        A::Read { table_name, .. } => {
            if is_cairn(table_name) && !load {
                return Err(format!(
                    "the contents of Cairn's table {table_name} are not readable by SQL"
                ));
            }
            let t = lower(table_name);
            if let Some(p) = t.strip_prefix("pragma_") {
                return pragma_rule(mode, p, None);
            }
            if t == "dbstat" && mode == Mode::Write {
                return Err(
                    "dbstat describes this node's file layout (it differs between replicas): \
                     use it in a read"
                        .into(),
                );
            }
            Allow
        }
        A::Function { function_name } => match lower(function_name).as_str() {
            "load_extension" => return Err("load_extension() is not allowed".into()),
            f @ ("changes" | "total_changes" | "last_insert_rowid" | "sqlite_offset")
                if mode == Mode::Write =>
            {
                return Err(format!(
                    "{f}() is not allowed in a write: its value depends on this node's \
                     connection or file layout, so replicas would store different values"
                ));
            }
            _ => Allow,
        },
        A::Pragma {
            pragma_name,
            pragma_value,
        } => return pragma_rule(mode, pragma_name, pragma_value),
        A::Transaction { .. } | A::Savepoint { .. } if load => Allow,
        A::Transaction { .. } | A::Savepoint { .. } => {
            return Err(
                "transaction control is not allowed: each request is one transaction; use \
                 ?transaction to run statements atomically"
                    .into(),
            );
        }
        _ if mode == Mode::Read => {
            return Err("attempt to change database via query operation".into());
        }
        _ if load => Allow,
        A::Insert { table_name } | A::Delete { table_name } | A::Update { table_name, .. } => {
            if temp {
                return no_temp();
            }
            if is_cairn(table_name) {
                return Err(format!("Cairn's table {table_name} is not writable by SQL"));
            }
            // DDL writes the schema table itself (SQLite refuses direct writes to it, and
            // `writable_schema` is refused above).
            let schema_table = matches!(
                lower(table_name).as_str(),
                "sqlite_master" | "sqlite_schema"
            );
            if is_sqlite(table_name) && !schema_table {
                return Err(format!(
                    "SQLite's table {table_name} is not writable by SQL"
                ));
            }
            if let A::Insert { table_name } = ctx.action {
                LOCAL.with(|l| l.inserted.borrow_mut().insert(table_name.to_string()));
            }
            Allow
        }
        A::CreateTable { table_name } => return reserved_name(table_name),
        A::CreateView { view_name } => return reserved_name(view_name),
        A::CreateVtable {
            table_name,
            module_name,
        } => {
            if !VTAB_MODULES.contains(&lower(module_name).as_str()) {
                return Err(format!(
                    "virtual tables using {module_name} are not allowed (allowed: {})",
                    VTAB_MODULES.join(", ")
                ));
            }
            return reserved_name(table_name);
        }
        A::CreateIndex {
            index_name,
            table_name,
        } => {
            reserved_name(index_name)?;
            if is_stream(table_name) && !is_cairn(table_name) {
                // The index of a PRIMARY KEY or UNIQUE constraint of the table being created
                // (a backup's stream table, in `/db/load`): part of the table's own schema.
                let implied = lower(index_name).starts_with("sqlite_autoindex_");
                if implied || LOCAL.with(|l| l.plain_index.get()) {
                    return Ok(Allow);
                }
                return Err(format!(
                    "{table_name} is a device stream table: only plain indexes \
                     (CREATE INDEX name ON {table_name}(column, ...)) are allowed on it; unique, \
                     partial and expression indexes could make device batches fail or lose records"
                ));
            }
            return ddl_target(table_name, "CREATE INDEX");
        }
        A::CreateTrigger { table_name, .. } => return ddl_target(table_name, "CREATE TRIGGER"),
        A::AlterTable { table_name, .. } => return ddl_target(table_name, "ALTER TABLE"),
        A::DropTable { table_name } => return ddl_target(table_name, "DROP TABLE"),
        A::DropVtable { table_name, .. } => return ddl_target(table_name, "DROP TABLE"),
        A::DropIndex { table_name, .. } => {
            if is_cairn(table_name) {
                return ddl_target(table_name, "DROP INDEX");
            }
            Allow
        }
        A::DropTrigger { table_name, .. } => {
            if is_cairn(table_name) {
                return ddl_target(table_name, "DROP TRIGGER");
            }
            Allow
        }
        A::DropView { view_name } => return reserved_name(view_name),
        A::Reindex { .. } => Allow,
        // ANALYZE skips Cairn's tables (their row counts are Cairn's business).
        A::Analyze { table_name } if is_cairn(table_name) => Ignore,
        A::Analyze { .. } => Allow,
        A::CreateTempIndex { .. }
        | A::CreateTempTable { .. }
        | A::CreateTempTrigger { .. }
        | A::CreateTempView { .. }
        | A::DropTempIndex { .. }
        | A::DropTempTable { .. }
        | A::DropTempTrigger { .. }
        | A::DropTempView { .. } => return no_temp(),
        other => return Err(format!("{other:?} is not allowed")),
    })
}

// ---------------------------------------------------------------------------------------------
// Statement-level checks (lexical, before SQLite sees the statement).
// ---------------------------------------------------------------------------------------------

/// Words of a statement outside string literals, quoted identifiers and comments, uppercased.
fn words(sql: &str) -> Vec<String> {
    significant_words(sql)
}

/// Refuses, before preparing, what the authorizer cannot see: `VACUUM`, and `ROLLBACK`
/// conflict resolution (`INSERT OR ROLLBACK`, `ON CONFLICT ROLLBACK`, `RAISE(ROLLBACK, ..)`),
/// which would end the entry's transaction from inside. Also notes whether a `CREATE INDEX`
/// is a plain one (allowed on stream tables).
pub fn precheck(sql: &str) -> Result<(), String> {
    let w = words(sql);
    let first = w.first().map(String::as_str).unwrap_or("");
    if first == "VACUUM" {
        return Err("VACUUM is not allowed (Cairn compacts its own snapshots)".into());
    }
    if first == "ATTACH" || first == "DETACH" {
        return Err(format!("{first} is not allowed"));
    }
    if w.iter().skip(1).any(|t| t == "ROLLBACK") {
        return Err(
            "ROLLBACK conflict resolution is not allowed (it would end the entry's \
             transaction on every replica): use ABORT, FAIL or IGNORE"
                .into(),
        );
    }
    LOCAL.with(|l| l.plain_index.set(is_plain_index(sql)));
    Ok(())
}

/// `CREATE INDEX [IF NOT EXISTS] name ON table(col [COLLATE c] [ASC|DESC], ...)`: nothing else.
pub(super) fn is_plain_index(sql: &str) -> bool {
    let toks = significant_tokens(sql);
    let up: Vec<String> = toks.iter().map(|t| t.to_ascii_uppercase()).collect();
    if up.len() < 6 || up[0] != "CREATE" || up[1] != "INDEX" {
        return false;
    }
    let Some(open) = up.iter().position(|t| t == "(") else {
        return false;
    };
    if up.last().map(String::as_str) == Some(";") {
        return false;
    }
    let Some(close) = up.iter().rposition(|t| t == ")") else {
        return false;
    };
    if close != up.len() - 1 {
        return false;
    }
    up[open + 1..close].iter().all(|t| {
        t == ","
            || t == "COLLATE"
            || t == "ASC"
            || t == "DESC"
            || t.chars().next().is_some_and(|c| {
                c.is_ascii_alphabetic() || c == '_' || c == '"' || c == '`' || c == '['
            })
    }) && !up[open + 1..close].iter().any(|t| t == "(")
}

/// The stream tables of a database (the configured `[[stream]]` tables and `telemetry`),
/// read without creating anything.
pub fn stream_tables(conn: &Connection) -> BTreeSet<String> {
    let mut out = BTreeSet::from([lower(tables::TELEMETRY)]);
    let json: Option<String> = system(|| {
        conn.query_row(
            &format!("SELECT value FROM {} WHERE key = 'schema'", tables::STREAMS),
            [],
            |r| r.get(0),
        )
        .ok()
    });
    if let Some(schema) = json.and_then(|j| serde_json::from_str::<Schema>(&j).ok()) {
        out.extend(schema.streams.iter().map(|s| lower(&s.table)));
    }
    out
}
