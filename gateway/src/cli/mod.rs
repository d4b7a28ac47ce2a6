//! The `cairn` subcommands other than `node`: `dev`, `shell`, `backup`, `restore`, `device`,
//! `streams`, plus the process plumbing they share (logging, runtime, signals).

pub mod backup;
pub mod device;
pub mod export;
mod line;
pub mod recover;
mod shell;
pub mod streams;

pub use shell::shell;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value as Json;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, NodeConfig};

/// Logs to stderr, human-readable or JSON. `RUST_LOG` overrides `level`.
pub fn init_logging(format: LogFormat, level: &str) {
    let default = if level.contains("openraft") {
        level.to_string()
    } else {
        format!("{level},openraft=error")
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// `cairn dev`: three nodes in this process on loopback, until Ctrl-C. The stream tables are
/// [`dev_streams`], or the `[[stream]]` tables and `undeclared_streams` of `config` (a `cairn
/// node` config file; its other keys are not used, and it is read again on SIGHUP or `POST
/// /streams/reload`). `fleet` is called once the nodes are starting, with node 1's HTTP API
/// and every node's device port: the binary starts its simulated devices there, on stream
/// [`DEV_FLEET_STREAM`], when it is built with the `sim` feature.
pub async fn dev(
    data_dir: PathBuf,
    config: Option<PathBuf>,
    fleet: impl FnOnce(&str, &[String]),
) -> anyhow::Result<()> {
    let (stream, undeclared_streams) = match &config {
        Some(path) => {
            let c = NodeConfig::from_file(path)?;
            c.schema()
                .validate()
                .map_err(|e| anyhow::anyhow!("{}: [[stream]]: {e}", path.display()))?;
            (c.stream, c.undeclared_streams)
        }
        None => (dev_streams(), crate::db::schema::Undeclared::Telemetry),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut nodes = Vec::new();
    let mut device_addrs = Vec::new();
    for i in 1..=3u64 {
        let base = 4001 + (i - 1) * 10;
        let c = NodeConfig {
            node_id: i,
            data_dir: data_dir.join(format!("node{i}")),
            http_addr: format!("127.0.0.1:{base}"),
            raft_addr: format!("127.0.0.1:{}", base + 1),
            device_addr: format!("127.0.0.1:{}", base + 2),
            stream: stream.clone(),
            undeclared_streams,
            config_file: config.clone(),
            bootstrap: i == 1,
            join: (i != 1).then(|| "http://127.0.0.1:4001".to_string()),
            ..NodeConfig::default()
        };
        device_addrs.push(c.device_addr.clone());
        let mut stop = stop_rx.clone();
        nodes.push(tokio::spawn(crate::daemon::run(c, async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    println!("cairn dev: three nodes, data in {}", data_dir.display());
    for i in 0..3 {
        println!(
            "  node {}: http://127.0.0.1:{}  (raft :{}, devices :{})",
            i + 1,
            4001 + i * 10,
            4002 + i * 10,
            4003 + i * 10
        );
    }
    print!(
        "{}",
        describe_streams(
            &crate::db::schema::Schema {
                streams: stream,
                undeclared: undeclared_streams,
            },
            config.as_deref(),
        )
    );
    println!(
        "try:\n  curl -XPOST 'http://127.0.0.1:4001/db/execute?pretty' -H 'Content-Type: application/json' \\\n    \
         -d '[\"CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)\", [\"INSERT INTO notes(body) VALUES(?)\", \"hello\"]]'\n  \
         curl -G 'http://127.0.0.1:4011/db/query?pretty&level=linearizable' --data-urlencode 'q=SELECT * FROM notes'\n  \
         cairn shell --host http://127.0.0.1:4001\nCtrl-C stops all three."
    );
    fleet("http://127.0.0.1:4001", &device_addrs);
    shutdown_signal().await;
    println!("stopping...");
    let _ = stop_tx.send(true);
    for n in nodes {
        match n.await {
            Ok(Err(e)) => eprintln!("node: {e:#}"),
            Err(e) => eprintln!("node task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

/// The stream `cairn dev`'s simulated devices push on (`cairn sim --stream`): not stream 1,
/// which the firmware README's example uses.
pub const DEV_FLEET_STREAM: u16 = 2;

/// The stream tables `cairn dev` declares without `--config`: stream 1 →
/// `climate(temperature, humidity, pressure)`, the three reals of the firmware README's
/// example, and stream [`DEV_FLEET_STREAM`] → `readings(k, temperature)`, what `cairn sim`
/// pushes.
pub fn dev_streams() -> Vec<crate::db::schema::StreamDef> {
    use crate::db::schema::{Column, ColumnType, OnMismatch, StreamDef};
    let col = |name: &str, ty| Column {
        name: name.into(),
        ty,
    };
    vec![
        StreamDef {
            id: 1,
            table: "climate".into(),
            columns: vec![
                col("temperature", ColumnType::Real),
                col("humidity", ColumnType::Real),
                col("pressure", ColumnType::Real),
            ],
            on_mismatch: OnMismatch::DeadLetter,
        },
        StreamDef {
            id: DEV_FLEET_STREAM,
            table: "readings".into(),
            columns: vec![
                col("k", ColumnType::Integer),
                col("temperature", ColumnType::Real),
            ],
            on_mismatch: OnMismatch::DeadLetter,
        },
    ]
}

/// What `cairn dev` prints about its streams: each declared table, where other streams go,
/// and where the simulated devices' records land.
pub fn describe_streams(schema: &crate::db::schema::Schema, config: Option<&Path>) -> String {
    use crate::db::schema::{OnMismatch, Undeclared};
    use std::fmt::Write as _;
    let mut out = match config {
        Some(p) => format!("  streams (from {}):\n", p.display()),
        None => "  streams (built in; --config FILE to declare your own):\n".to_string(),
    };
    for s in &schema.streams {
        let _ = writeln!(
            out,
            "    stream {:<5} -> {} {}{}",
            s.id,
            s.table,
            crate::db::dead_letter::expected_shape(s),
            match s.on_mismatch {
                OnMismatch::DeadLetter => "  (misfits to dead_letter)",
                OnMismatch::Reject => "  (misfits rejected)",
            }
        );
    }
    let _ = writeln!(
        out,
        "    other streams -> {}",
        match schema.undeclared {
            Undeclared::Telemetry => "telemetry",
            Undeclared::Reject => "rejected (SchemaMismatch)",
        }
    );
    let fleet = match schema.stream(DEV_FLEET_STREAM) {
        Some(s) => format!("table {}", s.table),
        None if schema.undeclared == Undeclared::Telemetry => "table telemetry".to_string(),
        None => "nowhere (undeclared streams are rejected)".to_string(),
    };
    let _ = writeln!(
        out,
        "  simulated devices (if built with them) push (k u64, temperature f32) on stream \
         {DEV_FLEET_STREAM}: {fleet}"
    );
    out
}

/// How a CLI command reaches a node: `--host` (user-info allowed), `--user` (password from
/// `CAIRN_PASSWORD`; or `CAIRN_USER`), `--ca-cert` for `https://` hosts.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// The node's HTTP API; `https://` with --ca-cert; `http://user:pass@host` also works.
    #[arg(long, global = true, default_value = "http://127.0.0.1:4001")]
    pub host: String,
    /// User of the node's --auth file (password from CAIRN_PASSWORD); or set CAIRN_USER.
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// CA certificate (PEM) that signed the node's HTTPS certificate (`cairn certs`).
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
}

/// A node's API with the credentials and trust a CLI command was given.
pub struct Api {
    /// The host without user-info or trailing `/`.
    pub host: String,
    agent: ureq::Agent,
    authorization: Option<String>,
}

impl Api {
    pub fn connect(c: &ConnArgs) -> anyhow::Result<Api> {
        let (host, creds) =
            crate::security::Credentials::for_cli(&c.host, c.user.as_deref(), |k| {
                std::env::var(k).ok()
            });
        // Redirects are followed by hand (`backup`), keeping the credentials.
        let mut b = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(60)));
        if let Some(ca) = &c.ca_cert {
            let roots = crate::security::tls::load_certs(ca)?
                .into_iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect::<Vec<_>>();
            b = b.tls_config(
                ureq::tls::TlsConfig::builder()
                    .provider(ureq::tls::TlsProvider::Rustls)
                    .unversioned_rustls_crypto_provider(crate::security::tls::provider())
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
                    .build(),
            );
        }
        let authorization = creds
            .map(|c| c.authorization().to_str().map(str::to_string))
            .transpose()?;
        Ok(Api {
            host: host.trim_end_matches('/').to_string(),
            agent: b.build().into(),
            authorization,
        })
    }

    fn auth<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(a) => r.header("authorization", a),
            None => r,
        }
    }

    pub fn get(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.auth(self.agent.get(format!("{}{path}", self.host)))
    }

    pub fn post(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        self.auth(self.agent.post(format!("{}{path}", self.host)))
    }

    pub fn delete(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.auth(self.agent.delete(format!("{}{path}", self.host)))
    }

    /// `POST path` with a JSON body: the status and the answer (JSON, or its text).
    pub fn post_json(&self, path: &str, body: &Json) -> anyhow::Result<(u16, Json)> {
        answer(self.post(path).send_json(body)?)
    }

    /// `GET path`: the status and the answer.
    pub fn get_json(&self, path: &str) -> anyhow::Result<(u16, Json)> {
        answer(self.get(path).call()?)
    }
}

/// A response's status and its body as JSON (or the text, when it is not JSON).
pub(crate) fn answer(mut resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<(u16, Json)> {
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string()?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Json::String(text)),
    ))
}

/// Fails with the node's error text unless `status` is 2xx.
pub(crate) fn check(status: u16, body: &Json) -> anyhow::Result<()> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let msg = body["error"]
        .as_str()
        .or_else(|| body["results"][0]["error"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    anyhow::bail!("{msg} (HTTP {status})")
}

/// `cairn backup FILE`: streams `/db/backup` (from the leader) into FILE.
pub fn backup(api: &Api, file: &Path) -> anyhow::Result<()> {
    download(api, "/db/backup", file)
}

/// Streams `path` (from the leader) into FILE.
fn download(api: &Api, path: &str, file: &Path) -> anyhow::Result<()> {
    let mut resp = api.get(path).call()?;
    if resp.status().is_redirection()
        && let Some(to) = resp.headers().get("location").and_then(|l| l.to_str().ok())
    {
        // The leader's address: same credentials, same trust.
        resp = api.auth(api.agent.get(to)).call()?;
    }
    if !resp.status().is_success() {
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        anyhow::bail!("backup failed ({}): {text}", resp.status());
    }
    let tmp = file.with_extension("part");
    let mut out = std::fs::File::create(&tmp)?;
    let n = std::io::copy(&mut resp.into_body().into_reader(), &mut out)?;
    out.sync_all()?;
    std::fs::rename(&tmp, file)?;
    println!("backed up {n} bytes to {}", file.display());
    Ok(())
}

/// `cairn restore FILE`: replaces the database with FILE through `/db/load`.
pub fn restore(api: &Api, file: &Path) -> anyhow::Result<()> {
    load_file(api, "/db/load", file)
}

/// Sends a SQLite file (or, to `/db/load`, a SQL dump) to `route`.
fn load_file(api: &Api, route: &str, file: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let mut resp = api
        .post(route)
        .header("content-type", "application/octet-stream")
        .send(f)?;
    let status = resp.status();
    let text = resp.body_mut().read_to_string()?;
    if !status.is_success() || text.contains("\"error\"") {
        anyhow::bail!("restore failed ({status}): {text}");
    }
    println!("restored {}: {text}", file.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::schema::{Schema, Undeclared};

    /// The built-in streams keep the simulated devices off stream 1, which the firmware
    /// README's example declares as three reals; what `cairn dev` prints names both.
    #[test]
    fn test_dev_streams_and_their_description() {
        let schema = Schema {
            streams: dev_streams(),
            undeclared: Undeclared::Telemetry,
        };
        schema.validate().unwrap();
        assert_ne!(DEV_FLEET_STREAM, 1);
        assert_eq!(schema.stream(1).unwrap().columns.len(), 3);
        let text = describe_streams(&schema, None);
        assert!(
            text.contains(
                "stream 1     -> climate (temperature real, humidity real, pressure real)"
            ),
            "{text}"
        );
        assert!(text.contains("on stream 2: table readings"), "{text}");
        let only_telemetry = Schema {
            streams: vec![],
            undeclared: Undeclared::Reject,
        };
        let text = describe_streams(&only_telemetry, Some(Path::new("my.toml")));
        assert!(
            text.contains("(from my.toml)") && text.contains("nowhere"),
            "{text}"
        );
    }
}
