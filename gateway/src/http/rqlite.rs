//! rqlite's request and response shapes: statements in a JSON array, `{"results": [...]}`
//! answers, query-string flags, and errors as a status plus `{"results": [{"error": ...}]}`.
//!
//! Answers are written the way rqlite's Go encoder writes them (its `command/encoding`
//! package and `http.Response`), so clients that compare bytes or look for a key see the same:
//! - fields in rqlite's order, zero counters and empty lists omitted (`omitempty`): a DDL
//!   statement answers `{}`, a query without rows has no `values`;
//! - associative rows are objects with sorted keys (a Go map), `types` likewise, and an
//!   execute result of `/db/request` carries `"rows": null`;
//! - floats as Go prints them (`1`, not `1.0`; `1e+21`), `<`, `>`, `&`, U+2028 and U+2029
//!   escaped as `\u003c` ...;
//! - `?pretty` indents by four spaces.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq};
use serde_json::ser::{CompactFormatter, Formatter, PrettyFormatter};
use serde_json::{Value as Json, json};

use crate::db::sql::{Params, Statement, StatementResult, Value, base64};
use crate::error::Error;

/// The query-string flags rqlite understands. A bare `?flag` means true.
pub struct Opts {
    pub transaction: bool,
    pub timings: bool,
    pub associative: bool,
    pub pretty: bool,
    pub redirect: bool,
    pub level: String,
    /// `?queue`: queue the write and answer with its sequence number at once.
    pub queue: bool,
    /// `?wait` (with `queue`): answer once the queued write is committed.
    pub wait: bool,
    /// `?timeout=` (Go duration): how long `wait` (and other waits) may take; 30 s.
    pub timeout: Duration,
    /// `?freshness=` (Go duration): a `none` read on a follower fails when the leader was
    /// last heard from longer ago.
    pub freshness: Option<Duration>,
    /// `?freshness_strict`: and the follower must have applied what the leader had committed.
    pub freshness_strict: bool,
    /// `?db_timeout=` (Go duration): a read is interrupted after this long.
    pub db_timeout: Option<Duration>,
    /// `?blob_array`: blobs as arrays of byte values instead of base64 strings.
    pub blob_array: bool,
}

impl Opts {
    pub fn from(q: &HashMap<String, String>) -> Self {
        let flag = |k: &str| flag(q, k);
        let dur = |k: &str| {
            q.get(k)
                .and_then(|v| parse_go_duration(v).ok())
                .filter(|d| !d.is_zero())
        };
        Opts {
            transaction: flag("transaction"),
            timings: flag("timings"),
            associative: flag("associative"),
            pretty: flag("pretty"),
            redirect: flag("redirect"),
            level: q.get("level").cloned().unwrap_or_else(|| "weak".into()),
            queue: flag("queue"),
            wait: flag("wait"),
            timeout: dur("timeout").unwrap_or(Duration::from_secs(30)),
            freshness: dur("freshness"),
            freshness_strict: flag("freshness_strict"),
            db_timeout: dur("db_timeout"),
            blob_array: flag("blob_array"),
        }
    }

    /// Rejects a malformed duration parameter (rqlite answers 400 for those).
    pub fn check(q: &HashMap<String, String>) -> Result<(), Error> {
        for k in ["timeout", "freshness", "db_timeout", "linearizable_timeout"] {
            if let Some(v) = q.get(k) {
                parse_go_duration(v)
                    .map_err(|e| Error::BadRequest(format!("invalid {k} {v:?}: {e}")))?;
            }
        }
        Ok(())
    }
}

/// A query-string flag: present and not `false`/`0`.
pub fn flag(q: &HashMap<String, String>, k: &str) -> bool {
    q.get(k)
        .is_some_and(|v| !matches!(v.as_str(), "false" | "0"))
}

/// Parses a Go duration string (`300ms`, `1.5s`, `1m30s`, `2h`; units ns, us, µs, ms, s, m,
/// h), as rqlite's `timeout`, `freshness` and `db_timeout` take them.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or("missing unit in duration")?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().map_err(|_| format!("bad number {num:?}"))?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("unknown unit {other:?}")),
        };
        total += n * secs;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|e| e.to_string())
}

/// The HTTP status of an [`Error`]: the one mapping from the service layer's errors to
/// statuses (every route, rqlite's and the device admin API's).
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::BadRequest(_) => StatusCode::BAD_REQUEST,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Error::NotLeader(_)
        | Error::NoLeader
        | Error::LeaderChanged
        | Error::Overloaded
        | Error::Unavailable(_)
        | Error::Fatal(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// `v` as JSON bytes the way rqlite's Go encoder writes them (see the module doc).
pub fn go_json<T: Serialize + ?Sized>(v: &T, pretty: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let r = if pretty {
        let f = GoFloats(PrettyFormatter::with_indent(b"    "));
        v.serialize(&mut serde_json::Serializer::with_formatter(&mut out, f))
    } else {
        let f = GoFloats(CompactFormatter);
        v.serialize(&mut serde_json::Serializer::with_formatter(&mut out, f))
    };
    if r.is_err() {
        return b"{}".to_vec();
    }
    escape_like_go(out)
}

pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, v: &T, pretty: bool) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        go_json(v, pretty),
    )
        .into_response()
}

/// rqlite's error shape for `e`, with its status.
pub fn error_response(e: &Error, pretty: bool) -> Response {
    json_response(
        status_of(e),
        &json!({"results": [{"error": e.to_string()}]}),
        pretty,
    )
}

/// Go's encoder escapes `<`, `>`, `&` and the two JavaScript line separators in strings;
/// they can only occur inside strings, so a byte-level pass is exact.
fn escape_like_go(out: Vec<u8>) -> Vec<u8> {
    let needs = out.iter().any(|b| matches!(b, b'<' | b'>' | b'&' | 0xE2));
    if !needs {
        return out;
    }
    let mut esc = Vec::with_capacity(out.len() + 16);
    let mut i = 0;
    while i < out.len() {
        match out[i] {
            b'<' => esc.extend_from_slice(b"\\u003c"),
            b'>' => esc.extend_from_slice(b"\\u003e"),
            b'&' => esc.extend_from_slice(b"\\u0026"),
            0xE2 if out.get(i + 1) == Some(&0x80)
                && matches!(out.get(i + 2), Some(0xA8 | 0xA9)) =>
            {
                esc.extend_from_slice(if out[i + 2] == 0xA8 {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                });
                i += 2;
            }
            b => esc.push(b),
        }
        i += 1;
    }
    esc
}

/// A formatter that writes floats as Go's `encoding/json` does and everything else as the
/// wrapped formatter.
struct GoFloats<F>(F);

/// A float as Go's `encoding/json` writes it: shortest round-trip digits, no exponent within
/// [1e-6, 1e21), else `1e-07`-style exponents cleaned to `1e-7` and `1e+21`.
pub fn go_float(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || (1e-6..1e21).contains(&a) {
        format!("{v}")
    } else {
        let s = format!("{v:e}");
        match s.split_once('e') {
            Some((m, e)) if !e.starts_with('-') => format!("{m}e+{e}"),
            _ => s,
        }
    }
}

macro_rules! delegate {
    ($($name:ident($($arg:ident: $t:ty),*)),* $(,)?) => {$(
        fn $name<W: ?Sized + io::Write>(&mut self, w: &mut W $(, $arg: $t)*) -> io::Result<()> {
            self.0.$name(w $(, $arg)*)
        }
    )*};
}

impl<F: Formatter> Formatter for GoFloats<F> {
    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, v: f64) -> io::Result<()> {
        w.write_all(go_float(v).as_bytes())
    }
    delegate!(
        begin_array(),
        end_array(),
        begin_array_value(first: bool),
        end_array_value(),
        begin_object(),
        end_object(),
        begin_object_key(first: bool),
        begin_object_value(),
        end_object_value(),
    );
}

/// A result cell as rqlite writes it: blobs as base64 strings like Go's `[]byte`, or as arrays
/// of byte values with `?blob_array`; a float that is not finite as `null`.
pub struct Cell<'a> {
    pub value: &'a Value,
    pub blob_array: bool,
}

impl Serialize for Cell<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.value {
            Value::Null => s.serialize_none(),
            Value::Integer(i) => s.serialize_i64(*i),
            Value::Real(r) if r.is_finite() => s.serialize_f64(*r),
            Value::Real(_) => s.serialize_none(),
            Value::Text(t) => s.serialize_str(t),
            Value::Blob(b) if self.blob_array => {
                let mut seq = s.serialize_seq(Some(b.len()))?;
                for byte in b {
                    seq.serialize_element(byte)?;
                }
                seq.end()
            }
            Value::Blob(b) => s.serialize_str(&base64(b)),
        }
    }
}

/// The JSON rqlite uses for a cell (base64 blobs), as a [`Json`] value.
pub fn cell_json(v: &Value) -> Json {
    serde_json::to_value(Cell {
        value: v,
        blob_array: false,
    })
    .unwrap_or(Json::Null)
}

fn value_from_json(v: &Json) -> Result<Value, String> {
    Ok(match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Integer(i64::from(*b)),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().ok_or("number out of range")?),
        },
        Json::String(s) => Value::Text(s.clone()),
        Json::Array(a) => {
            // rqlite accepts a blob as an array of byte values.
            let bytes: Option<Vec<u8>> = a
                .iter()
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            Value::Blob(bytes.ok_or("array parameters must be byte values 0..=255")?)
        }
        Json::Object(_) => return Err("object is not a valid parameter".into()),
    })
}

/// Parses an rqlite request body: a JSON array whose items are either a SQL string or an array
/// `[sql, params...]` / `[sql, {named params}]`.
pub fn parse_statements(body: &[u8]) -> Result<Vec<Statement>, Error> {
    parse_body(body).map_err(Error::BadRequest)
}

fn parse_body(body: &[u8]) -> Result<Vec<Statement>, String> {
    let v: Json = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let items = v
        .as_array()
        .ok_or("request body must be a JSON array of statements")?;
    items.iter().map(parse_statement).collect()
}

fn parse_statement(item: &Json) -> Result<Statement, String> {
    match item {
        Json::String(s) => Ok(Statement::new(s.clone())),
        Json::Array(parts) => {
            let sql = parts
                .first()
                .and_then(|s| s.as_str())
                .ok_or("a parameterized statement must start with the SQL string")?;
            let rest = &parts[1..];
            let params = match rest {
                [] => Params::None,
                [Json::Object(map)] => Params::Named(
                    map.iter()
                        .map(|(k, v)| Ok((k.clone(), value_from_json(v)?)))
                        .collect::<Result<_, String>>()?,
                ),
                _ => Params::Positional(
                    rest.iter()
                        .map(value_from_json)
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

/// Which rqlite endpoint the results answer: it decides their shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `/db/execute`: `{last_insert_id, rows_affected}` per statement.
    Execute,
    /// `/db/query`: `{columns, types, values}` per statement.
    Query,
    /// `/db/request`: either, per statement; associative execute results carry `rows: null`.
    Request,
}

/// One statement's result as rqlite renders it for `shape` and `o`.
pub struct ResultJson<'a> {
    pub r: &'a StatementResult,
    pub shape: Shape,
    pub associative: bool,
    pub timings: bool,
    pub blob_array: bool,
}

impl ResultJson<'_> {
    pub fn new<'a>(r: &'a StatementResult, shape: Shape, o: &Opts) -> ResultJson<'a> {
        ResultJson {
            r,
            shape,
            associative: o.associative,
            timings: o.timings,
            blob_array: o.blob_array,
        }
    }

    fn cell<'v>(&self, value: &'v Value) -> Cell<'v> {
        Cell {
            value,
            blob_array: self.blob_array,
        }
    }
}

impl Serialize for ResultJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.r;
        let time = (self.timings && r.time > 0.0).then_some(r.time);
        let mut m = s.serialize_map(None)?;
        if let Some(e) = &r.error {
            // A failed query keeps its (empty) associative rows, as rqlite's encoder does.
            if self.associative && self.shape == Shape::Query {
                m.serialize_entry("rows", &[(); 0])?;
            }
            m.serialize_entry("error", e)?;
            return m.end();
        }
        if r.is_query || self.shape == Shape::Query {
            if self.associative {
                let types: BTreeMap<&str, &str> = r
                    .columns
                    .iter()
                    .zip(&r.types)
                    .map(|(c, t)| (c.as_str(), t.as_str()))
                    .collect();
                if !types.is_empty() {
                    m.serialize_entry("types", &types)?;
                }
                let rows: Vec<BTreeMap<&str, Cell>> = r
                    .values
                    .iter()
                    .map(|row| {
                        r.columns
                            .iter()
                            .map(String::as_str)
                            .zip(row.iter().map(|v| self.cell(v)))
                            .collect()
                    })
                    .collect();
                m.serialize_entry("rows", &rows)?;
            } else {
                if !r.columns.is_empty() {
                    m.serialize_entry("columns", &r.columns)?;
                    m.serialize_entry("types", &r.types)?;
                }
                if !r.values.is_empty() {
                    let values: Vec<Vec<Cell>> = r
                        .values
                        .iter()
                        .map(|row| row.iter().map(|v| self.cell(v)).collect())
                        .collect();
                    m.serialize_entry("values", &values)?;
                }
            }
        } else {
            if r.last_insert_id != 0 {
                m.serialize_entry("last_insert_id", &r.last_insert_id)?;
            }
            if r.rows_affected != 0 {
                m.serialize_entry("rows_affected", &r.rows_affected)?;
            }
        }
        if let Some(t) = time {
            m.serialize_entry("time", &t)?;
        }
        if self.associative && self.shape == Shape::Request && !r.is_query {
            m.serialize_entry("rows", &())?;
        }
        m.end()
    }
}

/// rqlite's `http.Response`: `results`, then `time` with `?timings`, then a queued write's
/// `sequence_number`.
pub struct ResponseJson<'a> {
    pub results: Vec<ResultJson<'a>>,
    pub time: Option<f64>,
    pub sequence_number: Option<i64>,
}

impl Serialize for ResponseJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("results", &self.results)?;
        if let Some(t) = self.time.filter(|t| *t > 0.0) {
            m.serialize_entry("time", &t)?;
        }
        if let Some(n) = self.sequence_number.filter(|n| *n != 0) {
            m.serialize_entry("sequence_number", &n)?;
        }
        m.end()
    }
}

pub fn results_response(
    results: &[StatementResult],
    shape: Shape,
    o: &Opts,
    start: Instant,
) -> Response {
    let body = ResponseJson {
        results: results
            .iter()
            .map(|r| ResultJson::new(r, shape, o))
            .collect(),
        time: o.timings.then(|| start.elapsed().as_secs_f64()),
        sequence_number: None,
    };
    json_response(StatusCode::OK, &body, o.pretty)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn test_go_duration() {
        let ms = |n| Duration::from_millis(n);
        assert_eq!(parse_go_duration("300ms").unwrap(), ms(300));
        assert_eq!(parse_go_duration("1.5s").unwrap(), ms(1500));
        assert_eq!(parse_go_duration("1m30s").unwrap(), ms(90_000));
        assert_eq!(parse_go_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("5 parsecs").is_err());
    }

    #[test]
    fn test_go_float() {
        assert_eq!(go_float(1.0), "1");
        assert_eq!(go_float(-2.5), "-2.5");
        assert_eq!(go_float(0.1), "0.1");
        assert_eq!(go_float(1e21), "1e+21");
        assert_eq!(go_float(1e-7), "1e-7");
        assert_eq!(go_float(123456789.0), "123456789");
    }

    fn render(r: &StatementResult, shape: Shape, q: &str) -> String {
        let q: HashMap<String, String> = q
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
        let o = Opts::from(&q);
        let body = ResponseJson {
            results: vec![ResultJson::new(r, shape, &o)],
            time: None,
            sequence_number: None,
        };
        String::from_utf8(go_json(&body, o.pretty)).unwrap()
    }

    #[test]
    fn test_shapes() {
        let ddl = StatementResult::default();
        assert_eq!(render(&ddl, Shape::Execute, ""), r#"{"results":[{}]}"#);
        let insert = StatementResult {
            last_insert_id: 3,
            rows_affected: 1,
            ..Default::default()
        };
        assert_eq!(
            render(&insert, Shape::Execute, ""),
            r#"{"results":[{"last_insert_id":3,"rows_affected":1}]}"#
        );
        assert_eq!(
            render(&insert, Shape::Request, "associative"),
            r#"{"results":[{"last_insert_id":3,"rows_affected":1,"rows":null}]}"#
        );
        let rows = StatementResult {
            is_query: true,
            columns: vec!["b".into(), "a".into()],
            types: vec!["real".into(), "blob".into()],
            values: vec![vec![Value::Real(1.0), Value::Blob(vec![1, 2])]],
            ..Default::default()
        };
        assert_eq!(
            render(&rows, Shape::Query, ""),
            r#"{"results":[{"columns":["b","a"],"types":["real","blob"],"values":[[1,"AQI="]]}]}"#
        );
        assert_eq!(
            render(&rows, Shape::Query, "associative&blob_array"),
            r#"{"results":[{"types":{"a":"blob","b":"real"},"rows":[{"a":[1,2],"b":1}]}]}"#
        );
        let empty = StatementResult {
            is_query: true,
            columns: vec!["a".into()],
            types: vec!["text".into()],
            ..Default::default()
        };
        assert_eq!(
            render(&empty, Shape::Query, ""),
            r#"{"results":[{"columns":["a"],"types":["text"]}]}"#
        );
        let err = StatementResult::error("no such table: <x>");
        assert_eq!(
            render(&err, Shape::Execute, ""),
            r#"{"results":[{"error":"no such table: \u003cx\u003e"}]}"#
        );
        assert_eq!(
            render(&ddl, Shape::Execute, "pretty"),
            "{\n    \"results\": [\n        {}\n    ]\n}"
        );
    }
}
