//! Determinism: what the leader does to a SQL write before it enters the log (rqlite keeps the
//! same rewrite next to its command, `command/sql/`).

use std::time::{SystemTime, UNIX_EPOCH};

use super::sql::SqlCommand;
use crate::db::lex::{TokKind, tokenize, transaction_control_keyword};
use crate::db::schema::civil_date;
use crate::error::Error;

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
pub fn prepare_write(cmd: &mut SqlCommand, stamp: &Stamp) -> Result<(), Error> {
    for (i, st) in cmd.statements.iter_mut().enumerate() {
        if let Some(kw) = transaction_control_keyword(&st.sql) {
            return Err(Error::BadRequest(format!(
                "statement {i}: {kw} is not allowed; use ?transaction to run statements atomically"
            )));
        }
        crate::db::sandbox::precheck(&st.sql)
            .map_err(|e| Error::BadRequest(format!("statement {i}: not authorized: {e}")))?;
        st.sql = rewrite_nondeterministic(&st.sql, stamp)
            .map_err(|e| Error::BadRequest(format!("statement {i}: {e}")))?;
    }
    Ok(())
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

/// UTC formatting without a date crate.
fn format_utc(t: SystemTime, f: Format) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (year, month, day) = civil_date(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let (h, m, s) = (sod / 3600, (sod % 3600) / 60, sod % 60);
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
    use crate::db::sql::Statement;

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
                .to_string()
                .contains("BEGIN")
        );
    }
}
