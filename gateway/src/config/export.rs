//! Export, retention and disk-guard settings (`[[export]]`, `retention`, `disk_guard_*`,
//! `--cdc-config`); the `export` layer runs them.
//!
//! ```toml
//! site = "north-field"            # in every idempotency key; default: a generated cluster id
//!
//! [[export]]
//! name = "warehouse"
//! kind = "postgres"               # postgres | nats | mqtt | webhook
//! url = "host=db.example user=cairn dbname=telemetry"
//! tables = ["climate"]            # stream tables to export; empty: all
//! changes = "^orders$|^sites_.*"  # also changes of the user tables this regex matches
//! batch_records = 500             # records per delivery
//! rate = 20000                    # records/s cap (0: none)
//! priority = 10                   # higher catches up first
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What kind of system a destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportKind {
    /// A table per stream, `ON CONFLICT DO NOTHING` on the key.
    Postgres,
    /// JetStream publish with `Nats-Msg-Id` = key, awaiting the stream's ack.
    Nats,
    /// QoS 1 publish, one JSON message per record.
    Mqtt,
    /// HTTP POST of batches in rqlite's CDC JSON envelope.
    Webhook,
}

/// One `[[export]]` destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportDef {
    /// Names the destination's cursor in the replicated database: keep it stable.
    pub name: String,
    pub kind: ExportKind,
    /// postgres: a libpq connection string; nats: `nats://host:port`; mqtt:
    /// `mqtt://host:port`; webhook: the endpoint URL.
    pub url: String,
    /// Stream tables to export (empty: all, `telemetry` included).
    #[serde(default)]
    pub tables: Vec<String>,
    /// Also export the changes (insert, update, delete with the rows before and after) of the
    /// user tables whose name this regex matches (`regex` crate syntax, searched anywhere in
    /// the name as created: anchor it with `^...$`). Device stream tables, `dead_letter` and
    /// Cairn's tables never match. Needs cluster format version 2.
    #[serde(default)]
    pub changes: Option<String>,
    /// nats: subject template of changes (default `cairn.{site}.changes.{table}`); mqtt: topic
    /// template (default `cairn/{site}/changes/{table}`). `{site}`, `{table}`, `{op}`.
    #[serde(default)]
    pub changes_subject: Option<String>,
    #[serde(default = "default_batch")]
    pub batch_records: usize,
    /// Records per second at most (0: no cap).
    #[serde(default)]
    pub rate: u64,
    /// Destinations with a higher priority catch up first; the others wait while one of them
    /// is more than a batch behind.
    #[serde(default)]
    pub priority: i32,
    /// One delivery's time limit, ms.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// postgres: prefix of the destination tables (`{prefix}{table}`).
    #[serde(default)]
    pub table_prefix: String,
    /// nats: the JetStream stream (created with `cairn.>` if missing).
    #[serde(default = "default_nats_stream")]
    pub stream: String,
    /// nats: subject template; mqtt: topic template. `{site}`, `{table}`, `{device_id}`.
    #[serde(default)]
    pub subject: Option<String>,
    /// webhook: `service_id` of the envelope (default: the site id).
    #[serde(default)]
    pub service_id: Option<String>,
    /// webhook (`https://`): the CA certificates (PEM) the endpoint's certificate must chain
    /// to. Default: the system's bundle (`SSL_CERT_FILE`, else
    /// `/etc/ssl/certs/ca-certificates.crt`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// webhook (`https://`): a client certificate and its key (PEM), for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// webhook (`https://`): the name the endpoint's certificate must carry (default: the
    /// URL's host).
    #[serde(default)]
    pub server_name: Option<String>,
    /// webhook (`https://`): accept any certificate (testing only; a warning at every start).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

fn default_batch() -> usize {
    500
}

fn default_timeout() -> u64 {
    10_000
}

fn default_nats_stream() -> String {
    "CAIRN".into()
}

impl ExportDef {
    /// The subject (nats) or topic (mqtt) template.
    pub fn subject_template(&self) -> &str {
        match (&self.subject, self.kind) {
            (Some(s), _) => s,
            (None, ExportKind::Mqtt) => "cairn/{site}/{table}/{device_id}",
            (None, _) => "cairn.{site}.{table}.{device_id}",
        }
    }

    /// The subject (nats) or topic (mqtt) template of changes.
    pub fn changes_subject_template(&self) -> &str {
        match (&self.changes_subject, self.kind) {
            (Some(s), _) => s,
            (None, ExportKind::Mqtt) => "cairn/{site}/changes/{table}",
            (None, _) => "cairn.{site}.changes.{table}",
        }
    }

    /// A webhook destination from rqlite's `--cdc-config`: an endpoint URL, or a JSON file in
    /// rqlite's CDC config format (`endpoint`, `service_id`, `max_batch_size`,
    /// `transmit_timeout`; durations as Go's nanoseconds or `"5s"`; TLS in a `tls` object or
    /// at the top level as rqlite's `Config` has them: `ca_cert_file`, `cert_file`,
    /// `key_file`, `server_name`, `insecure_skip_verify`, and the older `ca_cert`,
    /// `client_cert`, `client_key`, `skip_verify`; Cairn's addition: `changes`, the regex of
    /// user tables whose changes go out too). Delivery never drops a batch (rqlite's
    /// `transmit_max_retries` is accepted and ignored).
    pub fn from_cdc_config(arg: &str) -> anyhow::Result<Self> {
        let mut def = ExportDef {
            name: "cdc".into(),
            kind: ExportKind::Webhook,
            url: String::new(),
            tables: Vec::new(),
            changes: None,
            changes_subject: None,
            batch_records: 100,
            rate: 0,
            priority: 0,
            timeout_ms: 5_000,
            table_prefix: String::new(),
            stream: default_nats_stream(),
            subject: None,
            service_id: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: None,
            insecure_skip_verify: false,
        };
        if arg.starts_with("http://") || arg.starts_with("https://") {
            def.url = arg.to_string();
            return Ok(def);
        }
        let text = std::fs::read_to_string(Path::new(arg))
            .map_err(|e| anyhow::anyhow!("reading --cdc-config {arg}: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--cdc-config {arg}: {e}"))?;
        def.url = v["endpoint"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("--cdc-config {arg}: no \"endpoint\""))?
            .to_string();
        def.service_id = v["service_id"].as_str().map(str::to_string);
        def.changes = v["changes"].as_str().map(str::to_string);
        if let Some(n) = v["max_batch_size"].as_u64().filter(|n| *n > 0) {
            def.batch_records = n as usize;
        }
        if let Some(ms) = go_duration_ms(&v["transmit_timeout"]).filter(|ms| *ms > 0) {
            def.timeout_ms = ms;
        }
        // rqlite's documented `tls` object first, then its `Config`'s top-level fields.
        let tls = |names: &[&str]| {
            [&v["tls"], &v]
                .into_iter()
                .flat_map(|o| names.iter().map(move |n| &o[*n]))
                .find(|f| !f.is_null())
                .cloned()
        };
        let path = |names: &[&str]| {
            tls(names)
                .and_then(|f| f.as_str().map(PathBuf::from))
                .filter(|p| !p.as_os_str().is_empty())
        };
        def.ca_file = path(&["ca_cert_file", "ca_cert"]);
        def.cert_file = path(&["cert_file", "client_cert"]);
        def.key_file = path(&["key_file", "client_key"]);
        def.server_name = tls(&["server_name"])
            .and_then(|f| f.as_str().map(str::to_string))
            .filter(|s| !s.is_empty());
        def.insecure_skip_verify = tls(&["insecure_skip_verify", "skip_verify"])
            .and_then(|f| f.as_bool())
            .unwrap_or(false);
        Ok(def)
    }

    /// True when the destination sets any TLS option of its own.
    fn has_tls_options(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || self.server_name.is_some()
            || self.insecure_skip_verify
    }
}

/// A Go `time.Duration` in JSON (integer nanoseconds, or a string such as `"5s"`) in ms.
fn go_duration_ms(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|ns| ns / 1_000_000),
        serde_json::Value::String(s) => parse_duration_ms(s).ok().map(|ms| ms as u64),
        _ => None,
    }
}

/// `"500ms"`, `"30s"`, `"15m"`, `"12h"`, `"7d"` in ms (the unit is required here).
pub fn parse_duration_ms(s: &str) -> anyhow::Result<i64> {
    anyhow::ensure!(
        s.trim().ends_with(|c: char| c.is_ascii_alphabetic()),
        "duration {s:?} needs a unit (ms, s, m, h, d)"
    );
    Ok(i64::try_from(super::parse_duration(s)?.as_millis())?)
}

/// Checks names are unique and set, and durations parse.
pub fn validate(exports: &[ExportDef], retention: Option<&str>) -> anyhow::Result<()> {
    let mut names = std::collections::BTreeSet::new();
    for e in exports {
        anyhow::ensure!(!e.name.is_empty(), "[[export]]: a destination needs a name");
        anyhow::ensure!(
            names.insert(e.name.as_str()),
            "[[export]]: two destinations named {:?}",
            e.name
        );
        anyhow::ensure!(!e.url.is_empty(), "[[export]] {}: url is empty", e.name);
        anyhow::ensure!(
            e.batch_records > 0,
            "[[export]] {}: batch_records must be positive",
            e.name
        );
        if let Some(p) = &e.changes {
            regex::Regex::new(p)
                .map_err(|err| anyhow::anyhow!("[[export]] {}: changes: {err}", e.name))?;
        }
        anyhow::ensure!(
            e.cert_file.is_some() == e.key_file.is_some(),
            "[[export]] {}: cert_file and key_file go together",
            e.name
        );
        anyhow::ensure!(
            !e.has_tls_options()
                || (e.kind == ExportKind::Webhook && e.url.starts_with("https://")),
            "[[export]] {}: ca_file, cert_file, key_file, server_name and insecure_skip_verify \
             are for a webhook with an https:// url",
            e.name
        );
    }
    if let Some(r) = retention {
        anyhow::ensure!(parse_duration_ms(r)? > 0, "retention must be longer than 0");
    }
    Ok(())
}

impl super::NodeConfig {
    /// The export destinations: `[[export]]` and `--cdc-config`.
    pub fn exports(&self) -> anyhow::Result<Vec<ExportDef>> {
        let mut out = self.export.clone();
        if let Some(c) = &self.cdc_config {
            out.push(ExportDef::from_cdc_config(c)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_duration() {
        assert_eq!(parse_duration_ms("7d").unwrap(), 7 * 86_400_000);
        assert_eq!(parse_duration_ms("250ms").unwrap(), 250);
        assert!(parse_duration_ms("7").is_err());
        assert!(parse_duration_ms("7w").is_err());
    }

    #[test]
    fn test_cdc_config_file_and_url() {
        let d = ExportDef::from_cdc_config("http://127.0.0.1:9/cdc").unwrap();
        assert_eq!(
            (d.kind, d.url.as_str()),
            (ExportKind::Webhook, "http://127.0.0.1:9/cdc")
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cdc.json");
        std::fs::write(
            &f,
            r#"{"endpoint":"http://h/x","service_id":"s1","max_batch_size":7,"transmit_timeout":2000000000,"changes":"^orders$"}"#,
        )
        .unwrap();
        let d = ExportDef::from_cdc_config(f.to_str().unwrap()).unwrap();
        assert_eq!(d.url, "http://h/x");
        assert_eq!(d.service_id.as_deref(), Some("s1"));
        assert_eq!((d.batch_records, d.timeout_ms), (7, 2000));
        assert_eq!(d.changes.as_deref(), Some("^orders$"));
        let mut bad = d.clone();
        bad.changes = Some("(".into());
        assert!(validate(&[bad], None).is_err());
        assert_eq!(d.ca_file, None);
        // rqlite's documented `tls` object, and its Config's top-level fields.
        std::fs::write(
            &f,
            r#"{"endpoint":"https://h/x","tls":{"ca_cert_file":"/ca.pem","cert_file":"/c.pem",
               "key_file":"/k.pem","server_name":"hook.example","insecure_skip_verify":false}}"#,
        )
        .unwrap();
        let d = ExportDef::from_cdc_config(f.to_str().unwrap()).unwrap();
        assert_eq!(d.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(d.cert_file.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(d.key_file.as_deref(), Some(Path::new("/k.pem")));
        assert_eq!(d.server_name.as_deref(), Some("hook.example"));
        assert!(validate(std::slice::from_ref(&d), None).is_ok());
        std::fs::write(
            &f,
            r#"{"endpoint":"https://h/x","ca_cert_file":"/ca.pem","insecure_skip_verify":true}"#,
        )
        .unwrap();
        let d = ExportDef::from_cdc_config(f.to_str().unwrap()).unwrap();
        assert_eq!(d.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert!(d.insecure_skip_verify);
        // TLS options on a plain-text endpoint are a mistake worth hearing about.
        let mut plain = d.clone();
        plain.url = "http://h/x".into();
        assert!(validate(&[plain], None).is_err());
        let mut half = d;
        half.cert_file = Some("/c.pem".into());
        assert!(validate(&[half], None).is_err());
    }
}
