//! `cairn node` settings: TOML file keys and command-line flags (flags win).
//!
//! Every key of [`NodeConfig`] is a key in the TOML file and, with `_` as `-`, a flag:
//!
//! ```toml
//! node_id = 1
//! data_dir = "/var/lib/cairn"
//! http_addr = "0.0.0.0:4001"
//! raft_addr = "0.0.0.0:4002"
//! device_addr = "0.0.0.0:4003"
//! http_adv_addr = "10.0.0.5:4001"   # what other nodes and clients are told
//! raft_adv_addr = "10.0.0.5:4002"
//! bootstrap = false
//! join = "http://10.0.0.4:4001"      # comma-separated list allowed
//! non_voter = false
//! log_format = "text"                # or "json"
//! log_level = "info"                 # RUST_LOG overrides
//! heartbeat_ms = 50
//! election_timeout_min_ms = 150
//! election_timeout_max_ms = 300
//! snapshot_threshold = 8192          # entries since the last snapshot
//! snapshot_keep_logs = 1024          # entries kept in the log behind a snapshot
//! snapshot_log_mib = 32              # also take a snapshot when the Raft log holds more (0: off)
//! write_batch_max = 1024             # commands per proposal to Raft (the write queue)
//! write_queue_depth = 8192           # bounded queue in front of Raft
//! log_cache_mib = 64                 # recent Raft entries kept in memory for replication/apply
//! device_adv_addr = "10.0.0.5:4003" # leader hint sent to devices (default: the bound address)
//! undeclared_streams = "telemetry"   # or "reject"; see `db/schema.rs` for [[stream]] tables
//!
//! [[stream]]
//! id = 1
//! table = "climate"
//! columns = [{ name = "temperature", type = "real" }, { name = "humidity", type = "real" }]
//! ```

use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

/// Settings of one gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub http_addr: String,
    pub raft_addr: String,
    pub device_addr: String,
    pub http_adv_addr: Option<String>,
    pub raft_adv_addr: Option<String>,
    pub bootstrap: bool,
    pub join: Option<String>,
    pub non_voter: bool,
    pub log_format: LogFormat,
    pub log_level: String,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_threshold: u64,
    pub snapshot_keep_logs: u64,
    /// Take a snapshot when the Raft log holds more than this many MiB (0: only
    /// `snapshot_threshold`), so the log is bounded in bytes too; see
    /// [`crate::raft::snapshot_on_log_size`].
    pub snapshot_log_mib: u64,
    pub write_batch_max: usize,
    pub write_queue_depth: usize,
    /// MiB of flushed Raft entries kept in memory (see [`crate::raft::log_store`]); lower it on
    /// boards with little RAM, replication then reads older entries back from disk.
    pub log_cache_mib: usize,
    /// Device address advertised to devices as the leader hint (default: the bound address).
    pub device_adv_addr: Option<String>,
    /// Device stream tables (`[[stream]]`), see [`crate::db::schema`].
    pub stream: Vec<crate::db::schema::StreamDef>,
    pub undeclared_streams: crate::db::schema::Undeclared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 1,
            data_dir: PathBuf::from("cairn-data"),
            http_addr: "127.0.0.1:4001".into(),
            raft_addr: "127.0.0.1:4002".into(),
            device_addr: "127.0.0.1:4003".into(),
            http_adv_addr: None,
            raft_adv_addr: None,
            bootstrap: false,
            join: None,
            non_voter: false,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            // LAN defaults: a follower notices a dead leader after 150-300 ms.
            heartbeat_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_threshold: 8192,
            snapshot_keep_logs: 1024,
            snapshot_log_mib: 32,
            write_batch_max: 1024,
            write_queue_depth: 8192,
            log_cache_mib: 64,
            device_adv_addr: None,
            stream: Vec::new(),
            undeclared_streams: crate::db::schema::Undeclared::Telemetry,
        }
    }
}

/// `cairn node` flags; each overrides the same key of the config file when given.
#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// TOML file with any of the keys below (flags win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub node_id: Option<u64>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// HTTP API listen address (default 127.0.0.1:4001; port 0 lets the OS choose).
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Raft transport listen address (default 127.0.0.1:4002).
    #[arg(long)]
    pub raft_addr: Option<String>,
    /// Device ingress listen address (default 127.0.0.1:4003).
    #[arg(long)]
    pub device_addr: Option<String>,
    /// HTTP address advertised to other nodes (default: the bound address).
    #[arg(long)]
    pub http_adv_addr: Option<String>,
    /// Raft address advertised to other nodes (default: the bound address).
    #[arg(long)]
    pub raft_adv_addr: Option<String>,
    /// Device address sent to devices as the leader hint (default: the bound address).
    #[arg(long)]
    pub device_adv_addr: Option<String>,
    /// Initialise a new single-node cluster if this node holds no state yet.
    #[arg(long, conflicts_with = "join")]
    pub bootstrap: bool,
    /// Join the cluster through this node's HTTP API (comma-separated list allowed).
    #[arg(long)]
    pub join: Option<String>,
    /// Join as a read replica that never votes.
    #[arg(long)]
    pub non_voter: bool,
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter such as `info` or `cairn_gateway=debug` (RUST_LOG wins).
    #[arg(long)]
    pub log_level: Option<String>,
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    #[arg(long)]
    pub election_timeout_min_ms: Option<u64>,
    #[arg(long)]
    pub election_timeout_max_ms: Option<u64>,
    /// Take a snapshot (and allow purging the log) after this many entries.
    #[arg(long)]
    pub snapshot_threshold: Option<u64>,
    /// Entries to keep in the log behind the latest snapshot.
    #[arg(long)]
    pub snapshot_keep_logs: Option<u64>,
    /// Also take a snapshot when the Raft log holds more than this many MiB (default 32, 0: off).
    #[arg(long)]
    pub snapshot_log_mib: Option<u64>,
    #[arg(long)]
    pub write_batch_max: Option<usize>,
    #[arg(long)]
    pub write_queue_depth: Option<usize>,
    /// MiB of recent Raft entries kept in memory for replication and apply (default 64).
    #[arg(long)]
    pub log_cache_mib: Option<usize>,
}

impl NodeConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// The file (if any) overridden by the flags that were given.
    pub fn resolve(args: &NodeArgs) -> anyhow::Result<Self> {
        let mut c = match &args.config {
            Some(p) => Self::from_file(p)?,
            None => Self::default(),
        };
        macro_rules! over {
            ($($f:ident),*) => {$( if let Some(v) = &args.$f { c.$f = v.clone().into(); } )*};
        }
        over!(
            node_id,
            data_dir,
            http_addr,
            raft_addr,
            device_addr,
            log_format,
            log_level,
            heartbeat_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
            snapshot_threshold,
            snapshot_keep_logs,
            snapshot_log_mib,
            write_batch_max,
            write_queue_depth,
            log_cache_mib
        );
        if args.http_adv_addr.is_some() {
            c.http_adv_addr = args.http_adv_addr.clone();
        }
        if args.device_adv_addr.is_some() {
            c.device_adv_addr = args.device_adv_addr.clone();
        }
        if args.raft_adv_addr.is_some() {
            c.raft_adv_addr = args.raft_adv_addr.clone();
        }
        if args.join.is_some() {
            c.join = args.join.clone();
            c.bootstrap = false;
        }
        if args.bootstrap {
            c.bootstrap = true;
            c.join = None;
        }
        if args.non_voter {
            c.non_voter = true;
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.node_id > 0, "node_id must be at least 1");
        anyhow::ensure!(
            self.election_timeout_min_ms > self.heartbeat_ms
                && self.election_timeout_max_ms > self.election_timeout_min_ms,
            "need heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms"
        );
        anyhow::ensure!(
            self.write_batch_max > 0 && self.write_queue_depth > 0,
            "write queue sizes must be positive"
        );
        self.schema()
            .validate()
            .map_err(|e| anyhow::anyhow!("[[stream]]: {e}"))?;
        Ok(())
    }

    /// The device stream mapping these settings declare.
    pub fn schema(&self) -> crate::db::schema::Schema {
        crate::db::schema::Schema {
            streams: self.stream.clone(),
            undeclared: self.undeclared_streams,
        }
    }

    /// The openraft configuration these settings imply.
    pub fn raft_config(&self) -> anyhow::Result<openraft::Config> {
        let c = openraft::Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_threshold),
            max_in_snapshot_log_to_keep: self.snapshot_keep_logs,
            // A follower further behind than this gets a snapshot instead of entries.
            replication_lag_threshold: self.snapshot_threshold.max(1) * 2,
            install_snapshot_timeout: 60_000,
            max_payload_entries: 1024,
            // A restarted leader must win an election again (standard Raft). openraft's
            // default lets it resume as leader of its old term, which its own docs call unsafe
            // when the state machine and the committed id are not fsync'd on apply (ours are
            // not: synchronous=NORMAL); it also made a restarted old leader claim leadership
            // for seconds next to the real one.
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        Ok(c.validate()?)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    #[test]
    fn test_flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cairn.toml");
        std::fs::write(
            &p,
            "node_id = 7\nhttp_addr = \"0.0.0.0:5001\"\nheartbeat_ms = 20\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            p.to_str().unwrap(),
            "--node-id",
            "3",
            "--bootstrap",
        ]);
        let c = NodeConfig::resolve(&cli.node).unwrap();
        assert_eq!(c.node_id, 3);
        assert_eq!(c.http_addr, "0.0.0.0:5001");
        assert_eq!(c.heartbeat_ms, 20);
        assert_eq!(c.raft_addr, "127.0.0.1:4002");
        assert!(c.bootstrap);
        c.raft_config().unwrap();
    }

    #[test]
    fn test_unknown_key_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cairn.toml");
        std::fs::write(&p, "nodeid = 7\n").unwrap();
        assert!(NodeConfig::from_file(&p).is_err());
    }
}
