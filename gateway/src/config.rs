//! `cairn node` settings: TOML file keys and command-line flags (flags win).
//!
//! Every key of [`NodeConfig`] is a key in the TOML file and, with `_` as `-`, a flag:
//!
//! ```toml
//! node_id = 1                      # or, rqlite-style: node_name = "gw-north"
//! data_dir = "/var/lib/cairn"
//! http_addr = "0.0.0.0:4001"
//! raft_addr = "0.0.0.0:4002"
//! device_addr = "0.0.0.0:4003"
//! http_adv_addr = "10.0.0.5:4001"   # what other nodes and clients are told
//! raft_adv_addr = "10.0.0.5:4002"
//! bootstrap = false
//! join = "http://10.0.0.4:4001"      # comma-separated URLs or Raft addresses; bootstrap_expect = N
//! non_voter = false
//! replace = 3                        # with join: take the place of node 3, whose disk was lost
//! raft_cluster_remove_shutdown = false # a node stopped with SIGTERM leaves the cluster
//! raft_reap_node_timeout_ms = 0      # and raft_reap_read_only_node_timeout_ms: 0 never reaps
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
//! write_queue_capacity = 1024        # rqlite's queued writes (?queue): requests waiting
//! write_queue_batch_size = 128       # statements per queued batch (one Raft entry)
//! write_queue_timeout_ms = 50        # a queued batch leaves at most this long after its first
//! write_queue_tx = false             # run each queued batch as one transaction
//! log_cache_mib = 64                 # recent Raft entries kept in memory for replication/apply
//! read_timeout_ms = 30000            # a read (/db/query) is interrupted after this long
//! read_max_rows = 1000000            # rows one read request may return
//! read_max_bytes = 268435456         # bytes one read request may return
//! max_db_size_mib = 4096             # a /db/load or a peer's snapshot of a larger database is refused
//! device_adv_addr = "10.0.0.5:4003" # leader hint sent to devices (default: the bound address)
//! undeclared_streams = "telemetry"   # or "reject"; see `db/schema.rs` for [[stream]] tables
//! # security (see `security/mod.rs`); names as rqlite's flags
//! auth = "/etc/cairn/auth.json"      # rqlite's users/passwords/perms file
//! http_cert = "/etc/cairn/tls/gw1.crt"
//! http_key = "/etc/cairn/tls/gw1.key"
//! http_ca_cert = "/etc/cairn/tls/ca.crt"   # CA of client certificates
//! http_verify_client = false
//! node_cert = "/etc/cairn/tls/gw1.crt"
//! node_key = "/etc/cairn/tls/gw1.key"
//! node_ca_cert = "/etc/cairn/tls/ca.crt"   # the cluster CA
//! node_verify_client = true
//! join_as = "joiner"                 # user of `auth` whose password a join sends
//! insecure = false                   # listen beyond loopback without auth / node TLS
//! feed_capacity = 1024               # committed device batches kept for slow subscribers (embedding)
//! # continuous backup (see `backup/`); the leader ships the log to every URL
//! backup_url = ["s3://bucket/site-a", "file:///mnt/usb/cairn"]
//! backup_interval = "1s"             # a committed entry is shipped at most this long after...
//! backup_segment_bytes = 1048576      # ...or once this many bytes of entries wait (before zstd)
//! backup_snapshot_interval = "1h"    # a full snapshot at least this often...
//! backup_snapshot_entries = 100000   # ...or after this many entries
//! backup_snapshot_bytes = 12582912    # ...or this many bytes of entries (a restore replays less)
//! backup_retention = "24h"           # older snapshots (and the segments before them) go
//! backup_retention_snapshots = 2     # but at least this many snapshots stay
//! backup_key_file = "/etc/cairn/backup.key"  # 32 bytes (or 64 hex digits): objects encrypted
//! backup_s3_endpoint = "http://127.0.0.1:9000"  # S3-compatible service; AWS when unset
//! backup_s3_region = "us-east-1"
//! backup_s3_access_key_id = "..."    # or AWS_ACCESS_KEY_ID
//! backup_s3_secret_access_key = "..."  # or AWS_SECRET_ACCESS_KEY
//! backup_s3_ca_cert = "/etc/cairn/s3-ca.crt"  # CAs for an https endpoint (default: system's)
//! restore_if_empty = false           # an empty data dir restores the latest backup, then bootstraps
//!
//! [[stream]]
//! id = 1
//! table = "climate"
//! columns = [{ name = "temperature", type = "real" }, { name = "humidity", type = "real" }]
//! on_mismatch = "dead-letter"        # or "reject"
//! ```
//!
//! Export, retention and the disk guard (see `config/export.rs` for `[[export]]`):
//!
//! ```toml
//! site = "north-field"               # idempotency keys of exports; default a generated id
//! cdc_config = "http://h:8000/cdc"   # rqlite's --cdc-config: a URL or a JSON file
//! retention = "7d"                   # delete stream rows received longer ago
//! keep_unexported = true             # ... only once every export delivered them
//! disk_guard_free_mib = 256          # below this much free space: ingest refused (0: off)
//! disk_guard_db_mib = 0              # above this database size: ingest refused (0: off)
//! ```
//!
//! `[[stream]]` and `undeclared_streams` are read again on SIGHUP and `POST /streams/reload`
//! (see `cluster::streams`); the other keys only at start.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

mod backup;
pub mod cluster;
pub mod export;
mod tls;

pub use backup::parse_duration;

/// Committed device batches the record feed keeps for slow subscribers by default.
pub const DEFAULT_FEED_CAPACITY: usize = 1024;

/// Settings of one gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: u64,
    /// An rqlite-style node name (`--node-id NAME`, see `config::cluster`).
    pub node_name: Option<String>,
    pub data_dir: PathBuf,
    pub http_addr: String,
    pub raft_addr: String,
    pub device_addr: String,
    pub http_adv_addr: Option<String>,
    pub raft_adv_addr: Option<String>,
    pub bootstrap: bool,
    pub join: Option<String>,
    /// `--replace OLD_ID` with `--join`: this blank node takes node OLD_ID's place (see
    /// `cluster::membership`); OLD_ID may be this node's own id.
    pub replace: Option<u64>,
    /// rqlite's `-bootstrap-expect` (see `cluster::bootstrap`).
    pub bootstrap_expect: usize,
    /// rqlite's `-extensions-path`: refused at start (`config::cluster`).
    pub extensions_path: Option<PathBuf>,
    pub non_voter: bool,
    /// rqlite's `-raft-cluster-remove-shutdown`: on a graceful stop, leave the cluster.
    pub raft_cluster_remove_shutdown: bool,
    /// rqlite's `-raft-reap-node-timeout` and `-raft-reap-read-only-node-timeout` (0: never).
    pub raft_reap_node_timeout_ms: u64,
    pub raft_reap_read_only_node_timeout_ms: u64,
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
    /// rqlite's queued writes (`/db/execute?queue`, `cluster::queue`): requests that may wait,
    /// statements per batch, ms a batch waits for more, one transaction per batch.
    pub write_queue_capacity: usize,
    pub write_queue_batch_size: usize,
    pub write_queue_timeout_ms: u64,
    pub write_queue_tx: bool,
    /// MiB of flushed Raft entries kept in memory (see [`crate::raft::log_store`]); lower it on
    /// boards with little RAM, replication then reads older entries back from disk.
    pub log_cache_mib: usize,
    /// A read is interrupted after this many ms (reads are local: a per-node setting).
    pub read_timeout_ms: u64,
    /// Rows one read request may return.
    pub read_max_rows: u64,
    /// Bytes of values one read request may return.
    pub read_max_bytes: u64,
    /// A `/db/load` whose database is larger (MiB) is refused; its upload is cut off there.
    pub max_db_size_mib: u64,
    /// Device address advertised to devices as the leader hint (default: the bound address).
    pub device_adv_addr: Option<String>,
    /// Device stream tables (`[[stream]]`), see [`crate::db::schema`].
    pub stream: Vec<crate::db::schema::StreamDef>,
    pub undeclared_streams: crate::db::schema::Undeclared,
    /// The file these settings were read from (`--config`): a reload (SIGHUP,
    /// `POST /streams/reload`) reads its `[[stream]]` tables again. Not a key.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// rqlite's auth file (users, passwords, permissions); without it the HTTP API is open.
    pub auth: Option<PathBuf>,
    pub http_cert: Option<PathBuf>,
    pub http_key: Option<PathBuf>,
    pub http_ca_cert: Option<PathBuf>,
    pub http_verify_client: bool,
    pub node_cert: Option<PathBuf>,
    pub node_key: Option<PathBuf>,
    pub node_ca_cert: Option<PathBuf>,
    pub node_verify_client: bool,
    /// The user (of `auth`) a join authenticates as.
    pub join_as: Option<String>,
    /// Listen beyond loopback without auth or node TLS (logged as a warning at every start).
    pub insecure: bool,
    /// Committed device batches kept for subscribers of the record feed that fall behind
    /// (the embedding API's `Node::subscribe`; see `command::feed`).
    pub feed_capacity: usize,
    /// Accept protocol 1 devices (a migration period; see protocol/SPEC.md appendix A).
    pub accept_protocol_1: bool,
    /// Device connections open at once on this node; more are closed at once.
    pub device_max_connections: usize,
    /// Device connections open at once from one IP address.
    pub device_max_per_address: usize,
    /// A device connection must deliver its Hello within this many ms.
    pub device_handshake_timeout_ms: u64,
    /// A device connection with no frame for this many ms is closed.
    pub device_idle_timeout_ms: u64,
    /// Continuous backup targets (`file:///DIR`, `s3://BUCKET/PREFIX`); empty: no backup.
    pub backup_url: Vec<String>,
    pub backup_interval: String,
    pub backup_segment_bytes: u64,
    pub backup_snapshot_interval: String,
    pub backup_snapshot_entries: u64,
    pub backup_snapshot_bytes: u64,
    pub backup_retention: String,
    pub backup_retention_snapshots: usize,
    pub backup_key_file: Option<PathBuf>,
    pub backup_s3_endpoint: Option<String>,
    pub backup_s3_region: Option<String>,
    pub backup_s3_access_key_id: Option<String>,
    pub backup_s3_secret_access_key: Option<String>,
    pub backup_s3_ca_cert: Option<PathBuf>,
    /// Start from the latest backup of `backup_url` when the data dir is empty.
    pub restore_if_empty: bool,
    /// The site id every exported record's key starts with (default: a generated cluster
    /// id, stored in the replicated database on first leadership).
    pub site: Option<String>,
    /// Export destinations (`config::export`).
    pub export: Vec<export::ExportDef>,
    /// rqlite's `--cdc-config`: one more webhook destination named `cdc`.
    pub cdc_config: Option<String>,
    /// Stream rows received longer ago than this are deleted (`"7d"`).
    pub retention: Option<String>,
    /// Retention deletes only rows every export destination has delivered.
    pub keep_unexported: bool,
    /// Ingest is refused while the data dir's file system has less free space (MiB; 0: off).
    pub disk_guard_free_mib: u64,
    /// Ingest is refused while the database is larger (MiB; 0: off).
    pub disk_guard_db_mib: u64,
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
            node_name: None,
            data_dir: PathBuf::from("cairn-data"),
            http_addr: "127.0.0.1:4001".into(),
            raft_addr: "127.0.0.1:4002".into(),
            device_addr: "127.0.0.1:4003".into(),
            http_adv_addr: None,
            raft_adv_addr: None,
            bootstrap: false,
            join: None,
            replace: None,
            bootstrap_expect: 0,
            extensions_path: None,
            non_voter: false,
            raft_cluster_remove_shutdown: false,
            raft_reap_node_timeout_ms: 0,
            raft_reap_read_only_node_timeout_ms: 0,
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
            write_queue_capacity: 1024,
            write_queue_batch_size: 128,
            write_queue_timeout_ms: 50,
            write_queue_tx: false,
            log_cache_mib: 64,
            read_timeout_ms: 30_000,
            read_max_rows: 1_000_000,
            read_max_bytes: 256 << 20,
            max_db_size_mib: 4096,
            device_adv_addr: None,
            stream: Vec::new(),
            undeclared_streams: crate::db::schema::Undeclared::Telemetry,
            config_file: None,
            auth: None,
            http_cert: None,
            http_key: None,
            http_ca_cert: None,
            http_verify_client: false,
            node_cert: None,
            node_key: None,
            node_ca_cert: None,
            node_verify_client: false,
            join_as: None,
            insecure: false,
            feed_capacity: DEFAULT_FEED_CAPACITY,
            accept_protocol_1: false,
            device_max_connections: 8192,
            device_max_per_address: 1024,
            device_handshake_timeout_ms: 5_000,
            device_idle_timeout_ms: 120_000,
            backup_url: Vec::new(),
            backup_interval: "1s".into(),
            backup_segment_bytes: 1 << 20,
            backup_snapshot_interval: "1h".into(),
            backup_snapshot_entries: 100_000,
            backup_snapshot_bytes: 12 << 20,
            backup_retention: "24h".into(),
            backup_retention_snapshots: 2,
            backup_key_file: None,
            backup_s3_endpoint: None,
            backup_s3_region: None,
            backup_s3_access_key_id: None,
            backup_s3_secret_access_key: None,
            backup_s3_ca_cert: None,
            restore_if_empty: false,
            site: None,
            export: Vec::new(),
            cdc_config: None,
            retention: None,
            keep_unexported: false,
            disk_guard_free_mib: 0,
            disk_guard_db_mib: 0,
        }
    }
}

/// `cairn node` flags; each overrides the same key of the config file when given.
#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// TOML file with any of the keys below (flags win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id: a positive integer, or (as rqlite takes it) any other string, a name
    /// (`"0"` included) that Cairn maps to a Raft id of its own.
    #[arg(long)]
    pub node_id: Option<String>,
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
    /// Join the cluster through these nodes (comma-separated): HTTP API URLs
    /// (`http://host:4001`) or, as rqlite takes them, Raft addresses (`host:4002`). Ignored (and
    /// logged) when this node already holds Raft state.
    #[arg(long)]
    pub join: Option<String>,
    /// With --join: take the place of node OLD_ID, whose disk was lost (it is removed first,
    /// then this node joins as a learner, catches up and becomes a voter). Needs the `join`
    /// and `remove` permissions.
    #[arg(long, value_name = "OLD_ID", requires = "join")]
    pub replace: Option<u64>,
    /// With --join naming the founders: form their cluster once this many know each other.
    #[arg(long, requires = "join")]
    pub bootstrap_expect: Option<usize>,
    /// rqlite's -extensions-path: not supported; the node refuses to start with it.
    #[arg(long)]
    pub extensions_path: Option<PathBuf>,
    /// Join as a read replica that never votes.
    #[arg(long)]
    pub non_voter: bool,
    /// On a graceful stop (SIGTERM), leave the cluster (rqlite's -raft-cluster-remove-shutdown).
    #[arg(long)]
    pub raft_cluster_remove_shutdown: bool,
    /// The leader removes a voter unreached this many ms (rqlite's -raft-reap-node-timeout).
    #[arg(long)]
    pub raft_reap_node_timeout_ms: Option<u64>,
    /// ... a read replica (rqlite's -raft-reap-read-only-node-timeout).
    #[arg(long)]
    pub raft_reap_read_only_node_timeout_ms: Option<u64>,
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
    /// Queued writes (`?queue`) that may wait before writers block (rqlite's default 1024).
    #[arg(long)]
    pub write_queue_capacity: Option<usize>,
    /// Statements per queued batch, one Raft entry (default 128).
    #[arg(long)]
    pub write_queue_batch_size: Option<usize>,
    /// Milliseconds a queued batch waits for more requests (default 50).
    #[arg(long)]
    pub write_queue_timeout_ms: Option<u64>,
    /// Run each queued batch as one transaction.
    #[arg(long)]
    pub write_queue_tx: bool,
    /// MiB of recent Raft entries kept in memory for replication and apply (default 64).
    #[arg(long)]
    pub log_cache_mib: Option<usize>,
    /// rqlite's auth file: JSON list of {"username", "password", "perms"}; "*" is anonymous.
    #[arg(long)]
    pub auth: Option<PathBuf>,
    /// HTTPS for the API: certificate (PEM; reloaded when the file changes).
    #[arg(long)]
    pub http_cert: Option<PathBuf>,
    /// HTTPS for the API: private key (PEM).
    #[arg(long)]
    pub http_key: Option<PathBuf>,
    /// CA of HTTP client certificates.
    #[arg(long)]
    pub http_ca_cert: Option<PathBuf>,
    /// Require HTTP clients to present a certificate of --http-ca-cert.
    #[arg(long)]
    pub http_verify_client: bool,
    /// Node-to-node TLS: this node's certificate (PEM; `cairn certs issue`).
    #[arg(long)]
    pub node_cert: Option<PathBuf>,
    /// Node-to-node TLS: this node's private key (PEM).
    #[arg(long)]
    pub node_key: Option<PathBuf>,
    /// Node-to-node TLS: the cluster CA (`cairn certs init`).
    #[arg(long)]
    pub node_ca_cert: Option<PathBuf>,
    /// Require peers to present a certificate of the cluster CA on the Raft port.
    #[arg(long)]
    pub node_verify_client: bool,
    /// Join as this user of the --auth file (its password is sent with the join).
    #[arg(long)]
    pub join_as: Option<String>,
    /// Allow listening beyond loopback without --auth or node TLS.
    #[arg(long)]
    pub insecure: bool,
    /// A read is interrupted after this many ms (default 30000).
    #[arg(long)]
    pub read_timeout_ms: Option<u64>,
    /// Rows one read request may return (default 1000000).
    #[arg(long)]
    pub read_max_rows: Option<u64>,
    /// Bytes one read request may return (default 256 MiB).
    #[arg(long)]
    pub read_max_bytes: Option<u64>,
    /// Largest database a `/db/load` may bring, in MiB (default 4096).
    #[arg(long)]
    pub max_db_size_mib: Option<u64>,
    /// Committed device batches kept for slow subscribers of the record feed (default 1024).
    #[arg(long)]
    pub feed_capacity: Option<usize>,
    /// Also accept devices that speak protocol 1 (a migration period: a recorded protocol 1
    /// connection can be replayed; logged at every start).
    #[arg(long)]
    pub accept_protocol_1: bool,
    /// Device connections open at once on this node (default 8192).
    #[arg(long)]
    pub device_max_connections: Option<usize>,
    /// Device connections open at once from one IP address (default 1024).
    #[arg(long)]
    pub device_max_per_address: Option<usize>,
    /// Milliseconds a device connection has to send its Hello (default 5000).
    #[arg(long)]
    pub device_handshake_timeout_ms: Option<u64>,
    /// Milliseconds without a frame after which a device connection is closed (default 120000).
    #[arg(long)]
    pub device_idle_timeout_ms: Option<u64>,
    /// Continuous backup to file:///DIR or s3://BUCKET/PREFIX (repeat for several targets).
    #[arg(long)]
    pub backup_url: Vec<String>,
    /// A committed entry is shipped at most this long after it applied (default 1s).
    #[arg(long)]
    pub backup_interval: Option<String>,
    /// A segment is shipped as soon as this many bytes of entries wait (default 1048576).
    #[arg(long)]
    pub backup_segment_bytes: Option<u64>,
    /// A full snapshot at least this often (default 1h).
    #[arg(long)]
    pub backup_snapshot_interval: Option<String>,
    /// A full snapshot after this many entries (default 100000).
    #[arg(long)]
    pub backup_snapshot_entries: Option<u64>,
    /// A full snapshot after this many bytes of shipped entries (default 12582912).
    #[arg(long)]
    pub backup_snapshot_bytes: Option<u64>,
    /// Keep snapshots (and the segments after them) this long (default 24h).
    #[arg(long)]
    pub backup_retention: Option<String>,
    /// Keep at least this many snapshots whatever their age (default 2).
    #[arg(long)]
    pub backup_retention_snapshots: Option<usize>,
    /// Encrypt backup objects with this key (32 bytes, or 64 hex digits).
    #[arg(long)]
    pub backup_key_file: Option<PathBuf>,
    /// S3-compatible endpoint such as http://127.0.0.1:9000 (default: AWS).
    #[arg(long)]
    pub backup_s3_endpoint: Option<String>,
    #[arg(long)]
    pub backup_s3_region: Option<String>,
    /// S3 access key id (default: AWS_ACCESS_KEY_ID).
    #[arg(long)]
    pub backup_s3_access_key_id: Option<String>,
    /// S3 secret key (default: AWS_SECRET_ACCESS_KEY).
    #[arg(long)]
    pub backup_s3_secret_access_key: Option<String>,
    /// CAs (PEM) to trust for an https S3 endpoint (default: the system's).
    #[arg(long)]
    pub backup_s3_ca_cert: Option<PathBuf>,
    /// With an empty data dir, restore the latest backup of --backup-url and bootstrap.
    #[arg(long)]
    pub restore_if_empty: bool,
    /// Site id of exported records' keys (default: a generated cluster id).
    #[arg(long)]
    pub site: Option<String>,
    /// rqlite's CDC: a webhook URL or a JSON config file in rqlite's format.
    #[arg(long)]
    pub cdc_config: Option<String>,
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
            Some(p) => Self {
                config_file: Some(p.clone()),
                ..Self::from_file(p)?
            },
            None => Self::default(),
        };
        macro_rules! over {
            ($($f:ident),*) => {$( if let Some(v) = &args.$f { c.$f = v.clone().into(); } )*};
        }
        c.resolve_node_id(args.node_id.as_deref())?;
        over!(
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
            write_queue_capacity,
            write_queue_batch_size,
            write_queue_timeout_ms,
            log_cache_mib,
            read_timeout_ms,
            read_max_rows,
            read_max_bytes,
            max_db_size_mib,
            feed_capacity,
            device_max_connections,
            device_max_per_address,
            device_handshake_timeout_ms,
            device_idle_timeout_ms,
            backup_interval,
            backup_segment_bytes,
            backup_snapshot_interval,
            backup_snapshot_entries,
            backup_snapshot_bytes,
            backup_retention,
            backup_retention_snapshots,
            bootstrap_expect,
            raft_reap_node_timeout_ms,
            raft_reap_read_only_node_timeout_ms
        );
        if args.accept_protocol_1 {
            c.accept_protocol_1 = true;
        }
        c.write_queue_tx |= args.write_queue_tx;
        c.raft_cluster_remove_shutdown |= args.raft_cluster_remove_shutdown;
        if !args.backup_url.is_empty() {
            c.backup_url = args.backup_url.clone();
        }
        c.restore_if_empty |= args.restore_if_empty;
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
        if args.replace.is_some() {
            c.replace = args.replace;
        }
        if args.bootstrap {
            c.bootstrap = true;
            c.join = None;
        }
        if args.non_voter {
            c.non_voter = true;
        }
        macro_rules! some {
            ($($f:ident),*) => {$( if args.$f.is_some() { c.$f = args.$f.clone(); } )*};
        }
        some!(
            auth,
            http_cert,
            http_key,
            http_ca_cert,
            node_cert,
            node_key,
            node_ca_cert,
            join_as,
            backup_key_file,
            backup_s3_endpoint,
            backup_s3_region,
            backup_s3_access_key_id,
            backup_s3_secret_access_key,
            backup_s3_ca_cert,
            site,
            cdc_config,
            extensions_path
        );
        c.http_verify_client |= args.http_verify_client;
        c.node_verify_client |= args.node_verify_client;
        c.insecure |= args.insecure;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.node_id > 0, "node_id must be at least 1");
        self.validate_cluster()?;
        anyhow::ensure!(self.feed_capacity > 0, "feed_capacity must be positive");
        self.validate_backup()?;
        export::validate(&self.exports()?, self.retention.as_deref())?;
        self.schema()
            .validate()
            .map_err(|e| anyhow::anyhow!("[[stream]]: {e}"))?;
        let node_tls = self.node_tls()?;
        self.http_tls()?;
        crate::security::check_exposure(&crate::security::Exposure {
            http_addr: &self.http_addr,
            raft_addr: &self.raft_addr,
            auth: self.auth.is_some(),
            node_mtls: node_tls.is_some_and(|t| t.verify_client),
            insecure: self.insecure,
        })
        .map_err(anyhow::Error::msg)?;
        Ok(())
    }

    /// The device stream mapping these settings declare.
    pub fn schema(&self) -> crate::db::schema::Schema {
        crate::db::schema::Schema {
            streams: self.stream.clone(),
            undeclared: self.undeclared_streams,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use cluster::{node_id_for_name, parse_node_id};

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
            "node_id = 7\nhttp_addr = \"0.0.0.0:5001\"\nheartbeat_ms = 20\ninsecure = true\n",
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

    /// rqlite's `-node-id` takes any string: integers are Raft ids, anything else a name
    /// with a Raft id of its own; the TOML key `node_name` alike; `--extensions-path` and
    /// `--bootstrap-expect` without `--join` are refused.
    #[test]
    fn test_node_names_and_refused_flags() {
        assert_eq!(parse_node_id("12"), Ok(12));
        for name in ["0", "gw-north", "007", "-1", ""] {
            assert_eq!(parse_node_id(name), Err(name.to_string()));
        }
        let id = node_id_for_name("gw-north");
        assert!((1 << 52..1 << 53).contains(&id));
        assert_eq!(id, node_id_for_name("gw-north"));
        assert_ne!(id, node_id_for_name("gw-south"));
        let c = NodeConfig::resolve(&Cli::parse_from(["x", "--node-id", "gw-north"]).node).unwrap();
        assert_eq!((c.node_id, c.node_name.as_deref()), (id, Some("gw-north")));
        let c = NodeConfig::resolve(&Cli::parse_from(["x", "--node-id", "0"]).node).unwrap();
        assert_eq!(c.node_id, node_id_for_name("0"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cairn.toml");
        std::fs::write(&p, "node_name = \"gw-north\"\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", p.to_str().unwrap()]);
        assert_eq!(NodeConfig::resolve(&cli.node).unwrap().node_id, id);
        let cli = Cli::parse_from(["x", "--config", p.to_str().unwrap(), "--node-id", "4"]);
        let c = NodeConfig::resolve(&cli.node).unwrap();
        assert_eq!((c.node_id, c.node_name), (4, None));

        let e = NodeConfig::resolve(&Cli::parse_from(["x", "--extensions-path", "/x"]).node);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("does not load SQLite extensions")
        );
        let cli = Cli::parse_from(["x", "--bootstrap-expect", "3", "--join", "h:4002"]);
        assert_eq!(NodeConfig::resolve(&cli.node).unwrap().bootstrap_expect, 3);
    }

    #[test]
    fn test_security_keys_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cairn.toml");
        std::fs::write(
            &p,
            "http_addr = \"0.0.0.0:4001\"\nauth = \"/etc/cairn/auth.json\"\n\
             node_cert = \"n.crt\"\nnode_key = \"n.key\"\nnode_ca_cert = \"ca.crt\"\n\
             node_verify_client = true\njoin_as = \"joiner\"\n",
        )
        .unwrap();
        let cli = Cli::parse_from(["x", "--config", p.to_str().unwrap()]);
        let c = NodeConfig::resolve(&cli.node).unwrap();
        assert_eq!(c.auth.as_deref(), Some(Path::new("/etc/cairn/auth.json")));
        assert_eq!(c.join_as.as_deref(), Some("joiner"));
        let t = c.node_tls().unwrap().unwrap();
        assert!(t.verify_client);
        assert_eq!(t.ca_cert, Path::new("ca.crt"));
        assert_eq!(c.http_tls().unwrap(), None);

        let cli = Cli::parse_from([
            "x",
            "--http-addr",
            "0.0.0.0:4001",
            "--raft-addr",
            "0.0.0.0:4002",
            "--auth",
            "a.json",
            "--http-cert",
            "h.crt",
            "--http-key",
            "h.key",
            "--http-ca-cert",
            "ca.crt",
            "--http-verify-client",
            "--node-cert",
            "n.crt",
            "--node-key",
            "n.key",
            "--node-ca-cert",
            "ca.crt",
            "--node-verify-client",
            "--join-as",
            "j",
        ]);
        let c = NodeConfig::resolve(&cli.node).unwrap();
        let h = c.http_tls().unwrap().unwrap();
        assert!(h.verify_client);
        assert_eq!(h.ca_cert.as_deref(), Some(Path::new("ca.crt")));
    }

    #[test]
    fn test_secure_by_default_refusal() {
        let cli = Cli::parse_from(["x", "--http-addr", "0.0.0.0:4001"]);
        let e = NodeConfig::resolve(&cli.node).unwrap_err().to_string();
        assert!(e.contains("--auth FILE") && e.contains("--insecure"), "{e}");
        let cli = Cli::parse_from(["x", "--http-addr", "0.0.0.0:4001", "--insecure"]);
        assert!(NodeConfig::resolve(&cli.node).unwrap().insecure);
        // Node TLS without client verification is not mutual: still refused beyond loopback.
        let cli = Cli::parse_from([
            "x",
            "--raft-addr",
            "10.0.0.5:4002",
            "--node-cert",
            "n.crt",
            "--node-key",
            "n.key",
            "--node-ca-cert",
            "ca.crt",
        ]);
        let e = NodeConfig::resolve(&cli.node).unwrap_err().to_string();
        assert!(e.contains("--node-verify-client"), "{e}");
    }

    #[test]
    fn test_tls_files_go_together() {
        for flags in [
            &["--http-cert", "h.crt"][..],
            &["--http-ca-cert", "ca.crt"],
            &["--http-verify-client"],
            &["--node-cert", "n.crt", "--node-key", "n.key"],
            &["--node-verify-client"],
        ] {
            let cli = Cli::parse_from(std::iter::once("x").chain(flags.iter().copied()));
            assert!(NodeConfig::resolve(&cli.node).is_err(), "{flags:?}");
        }
    }

    #[test]
    fn test_unknown_key_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cairn.toml");
        std::fs::write(&p, "nodeid = 7\n").unwrap();
        assert!(NodeConfig::from_file(&p).is_err());
    }
}
