//! `cairn shell`: SQL and rqlite's dot commands against one node, one statement per line,
//! with history (`line`) and rqlite's output modes (`.mode column|csv|json|line|list`).

use std::io::Write;
use std::path::Path;

use serde_json::{Value as Json, json};

use super::line::{Input, Reader};
use super::{Api, backup, check, download, load_file, restore};
use crate::db::tables;

/// How query results are printed (`.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Aligned columns under a header, `|`-separated (the default).
    Column,
    /// RFC 4180 CSV with a header line; NULL is an empty field.
    Csv,
    /// One JSON object per row, in an array.
    Json,
    /// `column = value`, one per line, a blank line between rows.
    Line,
    /// `a|b|c` with a header line, as sqlite3's list mode.
    List,
}

impl Mode {
    const ALL: [(&'static str, Mode); 5] = [
        ("column", Mode::Column),
        ("csv", Mode::Csv),
        ("json", Mode::Json),
        ("line", Mode::Line),
        ("list", Mode::List),
    ];

    fn parse(s: &str) -> Option<Mode> {
        Mode::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s))
            .map(|(_, m)| *m)
    }

    fn name(self) -> &'static str {
        Mode::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map(|(n, _)| *n)
            .unwrap_or("column")
    }
}

fn cell(v: &Json) -> String {
    match v {
        Json::Null => "NULL".into(),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints rqlite results: rows in `mode`, row counts, errors.
fn print_results(v: &Json, mode: Mode, out: &mut impl Write) -> std::io::Result<()> {
    let Some(results) = v["results"].as_array() else {
        return writeln!(out, "{v}");
    };
    for r in results {
        if let Some(e) = r.get("error") {
            writeln!(out, "ERROR: {}", cell(e))?;
        } else if let Some(cols) = r.get("columns").and_then(|c| c.as_array()) {
            let rows: Vec<&Vec<Json>> = r["values"]
                .as_array()
                .map(|rows| rows.iter().filter_map(|row| row.as_array()).collect())
                .unwrap_or_default();
            let heads: Vec<String> = cols.iter().map(cell).collect();
            print_rows(&heads, &rows, mode, out)?;
        } else if let Some(n) = r.get("rows_affected") {
            writeln!(out, "{} row(s) affected", cell(n))?;
        }
    }
    Ok(())
}

fn print_rows(
    heads: &[String],
    rows: &[&Vec<Json>],
    mode: Mode,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let text = |row: &Vec<Json>| row.iter().map(cell).collect::<Vec<_>>();
    match mode {
        Mode::Column => {
            let rows: Vec<Vec<String>> = rows.iter().map(|r| text(r)).collect();
            let widths: Vec<usize> = (0..heads.len())
                .map(|i| {
                    rows.iter()
                        .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                        .max()
                        .unwrap_or(0)
                        .max(heads[i].chars().count())
                })
                .collect();
            let line = |cells: &[String]| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            writeln!(out, "{}", line(heads))?;
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            writeln!(out, "{}", rule.join("-+-"))?;
            for r in &rows {
                writeln!(out, "{}", line(r))?;
            }
        }
        Mode::List => {
            writeln!(out, "{}", heads.join("|"))?;
            for r in rows {
                writeln!(out, "{}", text(r).join("|"))?;
            }
        }
        Mode::Csv => {
            let field = |s: &str| {
                if s.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", s.replace('"', "\"\""))
                } else {
                    s.to_string()
                }
            };
            let csv = |cells: Vec<String>| cells.iter().map(|c| field(c)).collect::<Vec<_>>();
            writeln!(out, "{}", csv(heads.to_vec()).join(","))?;
            for r in rows {
                let cells = r
                    .iter()
                    .map(|v| if v.is_null() { String::new() } else { cell(v) })
                    .collect();
                writeln!(out, "{}", csv(cells).join(","))?;
            }
        }
        Mode::Json => {
            let objects: Vec<serde_json::Map<String, Json>> = rows
                .iter()
                .map(|r| heads.iter().cloned().zip(r.iter().cloned()).collect())
                .collect();
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&objects).map_err(std::io::Error::other)?
            )?;
        }
        Mode::Line => {
            let w = heads.iter().map(|h| h.chars().count()).max().unwrap_or(0);
            for (i, r) in rows.iter().enumerate() {
                if i > 0 {
                    writeln!(out)?;
                }
                for (h, v) in heads.iter().zip(r.iter()) {
                    writeln!(out, "{h:>w$} = {}", cell(v))?;
                }
            }
        }
    }
    Ok(())
}

/// `cairn shell`: one statement per line; dot commands like the rqlite shell.
pub fn shell(conn: &super::ConnArgs) -> anyhow::Result<()> {
    let api = Api::connect(conn)?;
    let host = api.host.as_str();
    let (code, status) = api
        .get_json("/status")
        .map_err(|e| anyhow::anyhow!("cannot reach {host}: {e}"))?;
    check(code, &status)?;
    println!(
        "connected to {host} (node {}, {}); .help for help",
        status["node_id"], status["raft"]["state"]
    );
    let mut input = Reader::new();
    let mut out = std::io::stdout();
    let mut level = "weak".to_string();
    let mut timer = false;
    let mut mode = Mode::Column;
    let prompt = format!(
        "{}> ",
        host.trim_start_matches("http://")
            .trim_start_matches("https://")
    );
    loop {
        let line = match input.read(&prompt)? {
            Input::Line(l) => l,
            Input::Eof => {
                println!();
                return Ok(());
            }
        };
        let line = line.trim().trim_end_matches(';').trim();
        if line.is_empty() {
            continue;
        }
        let r: anyhow::Result<()> = (|| {
            match line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase()
                .as_str()
            {
                ".quit" | ".exit" => std::process::exit(0),
                ".help" => println!(
                    ".tables              list tables\n.schema              show CREATE statements\n\
                     .indexes             list indexes\n\
                     .nodes               cluster members\n.status              this node's status\n\
                     .leader              the leader\n.ready               whether the node is ready\n\
                     .expvar              counters (/debug/vars)\n\
                     .consistency [LEVEL] show or set read level (none|weak|linearizable|strong|auto)\n\
                     .timer on|off        show the time each request took\n\
                     .mode [MODE]         show or set the output mode (column|csv|json|line|list)\n\
                     .sysdump FILE        write /status, /nodes and /debug/vars to FILE\n\
                     .snapshot            snapshot this node now\n.remove ID           remove a member\n\
                     .backup FILE         download the database\n.dump FILE           write the user tables as SQL\n\
                     .restore FILE        load a SQLite file or SQL dump\n\
                     .boot FILE           load a SQLite file into a single-node cluster\n\
                     .exit                leave\nanything else is SQL, sent to /db/request"
                ),
                ".indexes" => {
                    let v = api.post_json(
                        &format!("/db/query?level={level}"),
                        &json!([
                            "SELECT name, tbl_name AS \"table\" FROM sqlite_master WHERE type='index' ORDER BY name"
                        ]),
                    )?;
                    print_results(&v.1, mode, &mut out)?;
                }
                ".leader" => println!(
                    "{}",
                    serde_json::to_string_pretty(&api.get_json("/leader")?.1)?
                ),
                ".ready" => {
                    let mut resp = api.get("/readyz").call()?;
                    print!("{}", resp.body_mut().read_to_string()?);
                }
                ".expvar" => println!(
                    "{}",
                    serde_json::to_string_pretty(&api.get_json("/debug/vars")?.1)?
                ),
                ".timer" => match line.split_whitespace().nth(1) {
                    Some("on") => timer = true,
                    Some("off") => timer = false,
                    _ => println!("usage: .timer on|off"),
                },
                ".mode" => match line.split_whitespace().nth(1) {
                    Some(m) => match Mode::parse(m) {
                        Some(m) => mode = m,
                        None => println!("unknown mode {m}: column, csv, json, line or list"),
                    },
                    None => println!("{}", mode.name()),
                },
                ".sysdump" => match line.split_whitespace().nth(1) {
                    Some(f) => {
                        let mut dump = String::new();
                        for path in ["/status?pretty", "/nodes?pretty&nonvoters", "/debug/vars"] {
                            let (_, v) = api.get_json(path)?;
                            dump.push_str(&format!(
                                "{path}\n{}\n\n",
                                serde_json::to_string_pretty(&v)?
                            ));
                        }
                        std::fs::write(f, dump)?;
                        println!("wrote {f}");
                    }
                    None => println!("usage: .sysdump FILE"),
                },
                ".snapshot" => {
                    let (code, v) = api.post_json("/snapshot", &json!({}))?;
                    check(code, &v)?;
                    println!("{v}");
                }
                ".remove" => match line.split_whitespace().nth(1) {
                    Some(id) => {
                        let mut resp = api
                            .delete("/remove")
                            .force_send_body()
                            .header("content-type", "application/json")
                            .send(json!({ "id": id }).to_string())?;
                        let code = resp.status().as_u16();
                        println!("{code} {}", resp.body_mut().read_to_string()?);
                    }
                    None => println!("usage: .remove ID"),
                },
                ".dump" => match line.split_whitespace().nth(1) {
                    Some(f) => download(&api, "/db/backup?fmt=sql", Path::new(f))?,
                    None => println!("usage: .dump FILE"),
                },
                ".boot" => match line.split_whitespace().nth(1) {
                    Some(f) => load_file(&api, "/boot", Path::new(f))?,
                    None => println!("usage: .boot FILE"),
                },
                ".tables" => {
                    let v = api.post_json(
                        &format!("/db/query?level={level}"),
                        &json!([format!(
                            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' AND name != '{}' ORDER BY name",
                            tables::RAFT
                        )]),
                    )?;
                    print_results(&v.1, mode, &mut out)?;
                }
                ".schema" => {
                    let v = api.post_json(
                        &format!("/db/query?level={level}"),
                        &json!([format!(
                            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name != '{}'",
                            tables::RAFT
                        )]),
                    )?;
                    print_results(&v.1, mode, &mut out)?;
                }
                ".nodes" => println!(
                    "{}",
                    serde_json::to_string_pretty(&api.get_json("/nodes")?.1)?
                ),
                ".status" => println!(
                    "{}",
                    serde_json::to_string_pretty(&api.get_json("/status")?.1)?
                ),
                ".consistency" => match line.split_whitespace().nth(1) {
                    Some(l) => level = l.to_string(),
                    None => println!("{level}"),
                },
                ".backup" => match line.split_whitespace().nth(1) {
                    Some(f) => backup(&api, Path::new(f))?,
                    None => println!("usage: .backup FILE"),
                },
                ".restore" => match line.split_whitespace().nth(1) {
                    Some(f) => restore(&api, Path::new(f))?,
                    None => println!("usage: .restore FILE"),
                },
                w if w.starts_with('.') => println!("unknown command {w}; .help for help"),
                _ => {
                    let timings = if timer { "&timings" } else { "" };
                    let (_, v) = api.post_json(
                        &format!("/db/request?level={level}{timings}"),
                        &json!([line]),
                    )?;
                    print_results(&v, mode, &mut out)?;
                    if let Some(t) = v["time"].as_f64() {
                        println!("Run Time: {t:.6} seconds");
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            println!("ERROR: {e}");
        }
    }
}
