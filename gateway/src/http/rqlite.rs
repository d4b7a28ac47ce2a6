//! rqlite's request and response shapes: statements in a JSON array, `{"results": [...]}`
//! answers, query-string flags, and errors as a status plus `{"results": [{"error": ...}]}`.

use std::collections::HashMap;
use std::time::Instant;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
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
}

impl Opts {
    pub fn from(q: &HashMap<String, String>) -> Self {
        let flag = |k: &str| {
            q.get(k)
                .is_some_and(|v| !matches!(v.as_str(), "false" | "0"))
        };
        Opts {
            transaction: flag("transaction"),
            timings: flag("timings"),
            associative: flag("associative"),
            pretty: flag("pretty"),
            redirect: flag("redirect"),
            level: q.get("level").cloned().unwrap_or_else(|| "weak".into()),
        }
    }
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

pub fn json_response(status: StatusCode, v: &Json, pretty: bool) -> Response {
    let body = if pretty {
        serde_json::to_vec_pretty(v)
    } else {
        serde_json::to_vec(v)
    }
    .unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// rqlite's error shape for `e`, with its status.
pub fn error_response(e: &Error, pretty: bool) -> Response {
    json_response(
        status_of(e),
        &json!({"results": [{"error": e.to_string()}]}),
        pretty,
    )
}

/// The JSON rqlite uses for a cell: blobs are base64 strings, like Go's `[]byte`.
pub fn cell_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Integer(i) => (*i).into(),
        Value::Real(r) => serde_json::Number::from_f64(*r)
            .map(Json::Number)
            .unwrap_or(Json::Null),
        Value::Text(s) => s.clone().into(),
        Value::Blob(b) => base64(b).into(),
    }
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

pub fn result_json(r: &StatementResult, o: &Opts) -> Json {
    let mut m = serde_json::Map::new();
    if let Some(e) = &r.error {
        m.insert("error".into(), e.clone().into());
    } else if r.is_query {
        if o.associative {
            let types: serde_json::Map<_, _> = r
                .columns
                .iter()
                .zip(&r.types)
                .map(|(c, t)| (c.clone(), Json::from(t.clone())))
                .collect();
            let rows: Vec<Json> = r
                .values
                .iter()
                .map(|row| {
                    Json::Object(
                        r.columns
                            .iter()
                            .zip(row)
                            .map(|(c, v)| (c.clone(), cell_json(v)))
                            .collect(),
                    )
                })
                .collect();
            m.insert("types".into(), Json::Object(types));
            m.insert("rows".into(), rows.into());
        } else {
            m.insert("columns".into(), json!(r.columns));
            m.insert("types".into(), json!(r.types));
            if !r.values.is_empty() {
                let values: Vec<Json> = r
                    .values
                    .iter()
                    .map(|row| row.iter().map(cell_json).collect())
                    .collect();
                m.insert("values".into(), values.into());
            }
        }
    } else {
        m.insert("last_insert_id".into(), r.last_insert_id.into());
        m.insert("rows_affected".into(), r.rows_affected.into());
    }
    if o.timings {
        m.insert("time".into(), r.time.into());
    }
    Json::Object(m)
}

pub fn results_response(results: &[StatementResult], o: &Opts, start: Instant) -> Response {
    let mut body =
        json!({"results": results.iter().map(|r| result_json(r, o)).collect::<Vec<_>>()});
    if o.timings {
        body["time"] = start.elapsed().as_secs_f64().into();
    }
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
}
