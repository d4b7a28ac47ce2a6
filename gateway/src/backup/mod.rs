//! Continuous backup to object storage and point-in-time restore (Litestream's model, on top
//! of a Raft quorum).
//!
//! The leader ships what the quorum committed: the log entries applied since the last upload
//! go to each `--backup-url` as one *segment* once the oldest of them waited
//! `backup_interval`, or as soon as they reach `backup_segment_bytes`; and now and then (every
//! `backup_snapshot_interval` or `backup_snapshot_entries`, at the first start, and whenever
//! the log was purged past what the target holds) a full *snapshot* of the replicated
//! database. Only committed entries are shipped, so a segment never has to be taken back, and
//! since every entry carries the leader's stamp (`command::Command::Stamped`), a restore can
//! stop exactly after the last entry stamped at or before a time. The Raft log is never held
//! back for a slow or dead target: a gap becomes a snapshot, and `/status` shows it.
//!
//! - [`object`]: object names (a listing alone plans a restore) and bytes (zstd, SHA-256,
//!   XChaCha20-Poly1305 with the name as associated data).
//! - [`target`]: a directory or an S3-compatible bucket ([`s3`], SigV4 over hyper).
//! - [`shipper`]: the leader's loop for one target; the shipped position goes through Raft
//!   (`Command::BackupShipped`) so that a new leader resumes there.
//! - [`compact`]: runs of small old segments merged into one (after each snapshot), with
//!   retention (`backup_retention`, `backup_retention_snapshots`) in the shipper.
//! - [`restore`]: `cairn restore --from URL`, `cairn backup list`, `--restore-if-empty`.
//!
//! Objects of one history epoch live under `{epoch:06}/` of the target; a restore starts a new
//! epoch, so the restored site's backup never mixes with the one it was restored from.

pub mod compact;
pub mod object;
pub mod restore;
pub mod s3;
pub mod shipper;
pub mod target;

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::config::{NodeConfig, parse_duration};
use crate::raft::log_store::LogStore;

use self::object::BackupKey;
use self::s3::S3Options;

/// Unix milliseconds of the wall clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The backup settings of one node, resolved from its config.
#[derive(Debug, Clone)]
pub struct BackupSettings {
    pub urls: Vec<String>,
    pub interval: Duration,
    /// A segment leaves as soon as the entries waiting reach this many encoded bytes.
    pub segment_bytes: usize,
    pub snapshot_interval: Duration,
    pub snapshot_entries: u64,
    /// A snapshot once this many encoded bytes of entries were shipped since the last one.
    pub snapshot_bytes: u64,
    pub retention: Duration,
    pub retention_snapshots: usize,
    pub key: Option<BackupKey>,
    pub s3: S3Options,
}

/// S3 options from explicit values, else the usual AWS environment variables.
pub fn s3_options(
    endpoint: Option<String>,
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    ca_cert: Option<std::path::PathBuf>,
) -> S3Options {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    S3Options {
        endpoint: endpoint.or_else(|| env("AWS_ENDPOINT_URL")),
        region: region
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into()),
        access_key_id: access_key_id
            .or_else(|| env("AWS_ACCESS_KEY_ID"))
            .unwrap_or_default(),
        secret_access_key: secret_access_key
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"))
            .unwrap_or_default(),
        session_token: env("AWS_SESSION_TOKEN"),
        ca_cert,
    }
}

impl BackupSettings {
    /// The node's backup settings; `None` without `backup_url`.
    pub fn from_config(c: &NodeConfig) -> anyhow::Result<Option<Self>> {
        if c.backup_url.is_empty() {
            return Ok(None);
        }
        Ok(Some(BackupSettings {
            urls: c.backup_url.clone(),
            interval: parse_duration(&c.backup_interval)?,
            segment_bytes: (c.backup_segment_bytes as usize).max(1),
            snapshot_interval: parse_duration(&c.backup_snapshot_interval)?,
            snapshot_entries: c.backup_snapshot_entries.max(1),
            snapshot_bytes: c.backup_snapshot_bytes.max(1),
            retention: parse_duration(&c.backup_retention)?,
            retention_snapshots: c.backup_retention_snapshots.max(1),
            key: c
                .backup_key_file
                .as_deref()
                .map(BackupKey::load)
                .transpose()?,
            s3: s3_options(
                c.backup_s3_endpoint.clone(),
                c.backup_s3_region.clone(),
                c.backup_s3_access_key_id.clone(),
                c.backup_s3_secret_access_key.clone(),
                c.backup_s3_ca_cert.clone(),
            ),
        }))
    }
}

/// Starts one shipper per target; they run while `stop` is false and ship while this node
/// leads.
pub fn start(
    cluster: Arc<Cluster>,
    log: LogStore,
    settings: BackupSettings,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let settings = Arc::new(settings);
    let mut tasks = Vec::new();
    for url in &settings.urls {
        let target = target::Target::open(url, &settings.s3)?;
        let shipper = shipper::Shipper::new(
            cluster.clone(),
            log.clone(),
            target,
            url.clone(),
            settings.clone(),
        );
        tasks.push(tokio::spawn(Arc::new(shipper).run(stop.clone())));
    }
    Ok(tasks)
}
