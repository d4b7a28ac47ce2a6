//! Export: data leaves the site exactly once. The leader runs one runner per `[[export]]`
//! destination; each reads the stored device records after its cursor in commit order
//! (the journal of `db::export`), delivers them at least once with an idempotency key per
//! record, and then commits its cursor through the log (`Command::Export`). A new leader
//! resumes from the last committed cursor, so a destination that de-duplicates by key
//! (PostgreSQL's primary key, JetStream's `Nats-Msg-Id`) ends with exactly one copy.
//!
//! The same supervisor runs retention (leader only, `ExportCommand::Retain` entries stamped
//! with the leader's clock) and the disk guard (every node: free space or database size past
//! its mark refuses new device batches with Overloaded and SQL writes with 503, see
//! `cluster::Cluster::propose`; it lifts by itself when space returns).
//!
//! A destination with `changes = "REGEX"` also delivers the changes of the user tables the
//! regex matches (format version 2): the leader registers the pattern through the log
//! (`ExportCommand::Capture`), every replica then journals those tables' row changes while it
//! applies SQL (`db::changes`), and the runner reads both journals after its one cursor.
//!
//! - [`reader`]: journal + stream tables → batches of [`reader::ExportRecord`].
//! - [`changes`]: the change journal merged in → [`changes::Batch`]; changes' keys and forms.
//! - [`postgres`], [`nats`], [`mqtt`], [`webhook`]: the destination kinds.

pub mod changes;
pub mod mqtt;
pub mod nats;
pub mod postgres;
pub mod reader;
pub mod webhook;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::command::export::{ExportCommand, ExportOutcome};
use crate::command::{Command, CommandResponse};
use crate::config::NodeConfig;
use crate::config::export::{ExportDef, ExportKind, parse_duration_ms};
use crate::db::export::{self as journal, Cursor, Position};
use crate::error::Error;
use crate::metrics::export::DestinationStats;

/// How often the supervisor looks at leadership and the disk.
const TICK: Duration = Duration::from_millis(200);
/// How long a caught-up runner waits before looking again.
const IDLE: Duration = Duration::from_millis(50);
/// Rows one retention entry deletes at most.
const RETAIN_PER_ENTRY: u64 = 5_000;
/// How often the leader runs retention at most (a short retention runs every half of it,
/// but not more often than every second).
const RETAIN_EVERY: Duration = Duration::from_secs(10);
/// How often the leader looks for registered destinations its config does not declare.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// How often a runner measures its lag.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// A delivered cursor is committed at least this often while a runner is busy.
const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// How often the leader compares the registered change captures with its config, and an idle
/// capturing runner looks for change-journal rows left to trim.
const CAPTURE_EVERY: Duration = Duration::from_secs(2);

/// What the export supervisor runs, from the node's settings.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub site: Option<String>,
    pub destinations: Vec<ExportDef>,
    pub retention_ms: Option<i64>,
    pub keep_unexported: bool,
    pub disk_guard_free_bytes: u64,
    pub disk_guard_db_bytes: u64,
    pub data_dir: PathBuf,
}

impl ExportSettings {
    pub fn from_config(c: &NodeConfig) -> anyhow::Result<Self> {
        Ok(ExportSettings {
            site: c.site.clone(),
            destinations: c.exports()?,
            retention_ms: c.retention.as_deref().map(parse_duration_ms).transpose()?,
            keep_unexported: c.keep_unexported,
            disk_guard_free_bytes: c.disk_guard_free_mib << 20,
            disk_guard_db_bytes: c.disk_guard_db_mib << 20,
            data_dir: c.data_dir.clone(),
        })
    }
}

/// Runs until `stop` turns true: the disk guard on this node, and while it leads, the
/// destinations and retention.
pub async fn supervise(
    cluster: Arc<Cluster>,
    settings: ExportSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    cluster
        .metrics()
        .exports
        .set_configured(settings.destinations.iter().map(|d| d.name.clone()));
    let settings = Arc::new(settings);
    let mut leading: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        disk_guard(&cluster, &settings);
        let leads = cluster.is_leader();
        match (&leading, leads) {
            (None, true) => {
                leading = Some(tokio::spawn(lead(cluster.clone(), settings.clone())));
            }
            (Some(h), false) => {
                h.abort();
                leading = None;
                stopped(&cluster, &settings);
            }
            (Some(h), true) if h.is_finished() => {
                // The term's set-up failed (leadership was changing): start again.
                leading = Some(tokio::spawn(lead(cluster.clone(), settings.clone())));
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|s| *s) => {
                if let Some(h) = leading { h.abort(); }
                stopped(&cluster, &settings);
                return;
            }
        }
    }
}

fn stopped(cluster: &Cluster, settings: &ExportSettings) {
    let exports = &cluster.metrics().exports;
    for d in &settings.destinations {
        exports.destination(&d.name).running.store(0, Relaxed);
    }
    // Only the leader lists registered destinations its config does not declare.
    exports.keep_unconfigured(&[]);
}

/// Holds or lifts the disk guard on this node.
fn disk_guard(cluster: &Cluster, s: &ExportSettings) {
    let mut why = None;
    if s.disk_guard_free_bytes > 0
        && let Some(free) = crate::db::free_bytes(&s.data_dir)
        && free < s.disk_guard_free_bytes
    {
        why = Some(format!(
            "{} MiB free in {}, below disk_guard_free_mib ({})",
            free >> 20,
            s.data_dir.display(),
            s.disk_guard_free_bytes >> 20
        ));
    }
    let size = cluster.store().size();
    if s.disk_guard_db_bytes > 0 && size > s.disk_guard_db_bytes {
        why = Some(format!(
            "database is {} MiB, above disk_guard_db_mib ({})",
            size >> 20,
            s.disk_guard_db_bytes >> 20
        ));
    }
    let guard = &cluster.metrics().disk_guard;
    match why {
        Some(w) => {
            guard.hold("ingest (disk guard)", &w);
        }
        None => guard.clear("ingest (disk guard)"),
    }
}

async fn export_write(cluster: &Cluster, cmd: ExportCommand) -> Result<ExportOutcome, Error> {
    match cluster.write(Command::Export(cmd)).await? {
        CommandResponse::Export(o) => Ok(o),
        other => Err(Error::Storage(format!("unexpected response {other:?}"))),
    }
}

/// One term of leadership: the site id, the destinations' cursors, the runners, retention.
async fn lead(cluster: Arc<Cluster>, settings: Arc<ExportSettings>) {
    if let Err(e) = lead_term(&cluster, &settings).await {
        tracing::debug!("export: term set-up stopped: {e}");
    }
}

async fn lead_term(cluster: &Arc<Cluster>, settings: &Arc<ExportSettings>) -> Result<(), Error> {
    let stored = cluster.read(journal::site).await??;
    let site = match stored {
        Some(s) => {
            if let Some(want) = &settings.site
                && *want != s
            {
                tracing::warn!(
                    stored = %s, configured = %want,
                    "site: the stored site id is kept (keys already exported use it)"
                );
            }
            s
        }
        None => {
            let want = settings
                .site
                .clone()
                .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
            match export_write(cluster, ExportCommand::SetSite(want)).await? {
                ExportOutcome::Site(s) => s,
                other => return Err(Error::Storage(format!("set site: {other:?}"))),
            }
        }
    };
    let cursors = cluster.read(journal::cursors).await??;
    for d in &settings.destinations {
        if !cursors.iter().any(|c| c.name == d.name) {
            export_write(
                cluster,
                ExportCommand::Cursor(Cursor {
                    name: d.name.clone(),
                    pos: Position::default(),
                    delivered: 0,
                }),
            )
            .await?;
            tracing::info!(destination = %d.name, "export: destination registered");
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    let peers: Arc<Vec<(i32, usize, Arc<DestinationStats>)>> = Arc::new(
        settings
            .destinations
            .iter()
            .map(|d| {
                (
                    d.priority,
                    d.batch_records,
                    cluster.metrics().exports.destination(&d.name),
                )
            })
            .collect(),
    );
    for d in &settings.destinations {
        let sink = match Sink::new(d, cluster.id(), &site) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(destination = %d.name, "export: {e}");
                cluster
                    .metrics()
                    .exports
                    .destination(&d.name)
                    .set_error(Some(e));
                continue;
            }
        };
        tasks.spawn(run(
            cluster.clone(),
            d.clone(),
            site.clone(),
            sink,
            peers.clone(),
        ));
    }
    tasks.spawn(watch_unconfigured(cluster.clone()));
    if let Some(keep_ms) = settings.retention_ms {
        tasks.spawn(retain(cluster.clone(), keep_ms, settings.keep_unexported));
    }
    tasks.spawn(register_captures(cluster.clone(), settings.clone()));
    // Runs until the supervisor aborts this term (the JoinSet aborts its tasks on drop).
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// A destination of one kind.
enum Sink {
    Postgres(postgres::Postgres),
    Nats(nats::Nats),
    Mqtt(mqtt::Mqtt),
    Webhook(webhook::Webhook),
}

impl Sink {
    fn new(d: &ExportDef, node_id: u64, site: &str) -> Result<Self, String> {
        let timeout = Duration::from_millis(d.timeout_ms.max(1));
        Ok(match d.kind {
            ExportKind::Postgres => {
                Sink::Postgres(postgres::Postgres::new(&d.url, &d.table_prefix, timeout))
            }
            ExportKind::Nats => Sink::Nats(nats::Nats::new(
                &d.url,
                &d.stream,
                changes::Subjects::of(d),
                timeout,
            )),
            ExportKind::Mqtt => Sink::Mqtt(mqtt::Mqtt::new(
                &d.url,
                format!("cairn-{site}-{}-{node_id}", d.name),
                changes::Subjects::of(d),
                timeout,
            )?),
            ExportKind::Webhook => Sink::Webhook(webhook::Webhook::new(d, node_id, timeout)?),
        })
    }

    /// Delivers a batch: its device records, then its changes (stream tables and user tables
    /// are apart, so each table's order is kept).
    async fn deliver(&mut self, site: &str, batch: &changes::Batch) -> Result<(), String> {
        let records = &batch.records[..];
        if !records.is_empty() {
            match self {
                Sink::Postgres(s) => s.deliver(site, records).await,
                Sink::Nats(s) => s.deliver(site, records).await,
                Sink::Mqtt(s) => s.deliver(site, records).await,
                Sink::Webhook(s) => s.deliver(site, records).await,
            }?;
        }
        let changes = &batch.changes[..];
        if changes.is_empty() {
            return Ok(());
        }
        match self {
            Sink::Postgres(s) => s.deliver_changes(site, changes).await,
            Sink::Nats(s) => s.deliver(site, changes).await,
            Sink::Mqtt(s) => s.deliver(site, changes).await,
            Sink::Webhook(s) => s.deliver_changes(site, changes).await,
        }
    }
}

/// One destination's loop on the leader: read after the cursor, deliver (retrying with
/// back-off until it succeeds), commit the cursor.
async fn run(
    cluster: Arc<Cluster>,
    d: ExportDef,
    site: String,
    mut sink: Sink,
    peers: Arc<Vec<(i32, usize, Arc<DestinationStats>)>>,
) {
    let stats = cluster.metrics().exports.destination(&d.name);
    *stats.kind.lock().unwrap_or_else(|p| p.into_inner()) = format!("{:?}", d.kind).to_lowercase();
    let name = d.name.clone();
    let committed = match cluster.read(journal::cursors).await {
        Ok(Ok(c)) => c.into_iter().find(|c| c.name == name),
        _ => None,
    };
    let Some(mut cursor) = committed else {
        tracing::warn!(destination = %d.name, "export: no committed cursor; not running");
        return;
    };
    // Checked by `config::export::validate`.
    let capture = d.changes.as_deref().and_then(|p| regex::Regex::new(p).ok());
    let captures = capture.is_some();
    stats.running.store(1, Relaxed);
    stats.cursor_index.store(cursor.pos.log_index, Relaxed);
    let mut committed_pos = cursor.pos;
    let mut last_commit = Instant::now();
    let mut last_lag = Instant::now() - LAG_EVERY;
    let mut last_trim = Instant::now();
    loop {
        if last_lag.elapsed() >= LAG_EVERY {
            refresh_lag(&cluster, cursor.pos, captures, &stats).await;
            last_lag = Instant::now();
        }
        // Priority: wait while a destination ranked above is more than a batch behind.
        let behind = peers
            .iter()
            .any(|(p, batch, s)| *p > d.priority && s.lag_records.load(Relaxed) > *batch as u64);
        if behind {
            tokio::time::sleep(IDLE).await;
            continue;
        }
        let (pos, max, filter) = (cursor.pos, d.batch_records, d.tables.clone());
        let wanted = capture.clone();
        let batch = match cluster
            .read(move |c| changes::read_batch(c, pos, max, &filter, wanted.as_ref()))
            .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(destination = %d.name, "export: reading: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(destination = %d.name, "export: reading: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(through) = batch.through else {
            if committed_pos != cursor.pos {
                commit(&cluster, &cursor, &mut committed_pos, &stats).await;
                last_commit = Instant::now();
            }
            stats.lag_records.store(0, Relaxed);
            stats.lag_ms.store(0, Relaxed);
            // Change-journal rows everyone passed, left by a bounded trim: one more commit of
            // the same cursor deletes the next part.
            if captures && last_trim.elapsed() >= CAPTURE_EVERY {
                last_trim = Instant::now();
                if let Ok(Ok(true)) = cluster.read(crate::db::changes::trim_pending).await {
                    commit(&cluster, &cursor, &mut committed_pos, &stats).await;
                }
            }
            tokio::time::sleep(IDLE).await;
            continue;
        };
        let started = Instant::now();
        if !batch.is_empty() {
            let lag = (&*cluster, cursor.pos, captures);
            deliver(&mut sink, &site, &batch, &stats, &d.name, lag).await;
        }
        let n = batch.len() as u64;
        stats.delivered.fetch_add(n, Relaxed);
        cursor.pos = through;
        cursor.delivered += n;
        if last_commit.elapsed() >= COMMIT_EVERY {
            commit(&cluster, &cursor, &mut committed_pos, &stats).await;
            last_commit = Instant::now();
        }
        if d.rate > 0 {
            let due = Duration::from_secs_f64(n as f64 / d.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Sets a destination's lag: the journal's records after `pos` (and the captured changes
/// after it, if the destination takes them) and the oldest one's age.
async fn refresh_lag(cluster: &Cluster, pos: Position, captures: bool, stats: &DestinationStats) {
    if let Ok(Ok((records, oldest))) = cluster
        .read(move |c| changes::backlog(c, pos, captures))
        .await
    {
        stats.lag_records.store(records, Relaxed);
        let age = oldest.map_or(0, |t| {
            (crate::command::rewrite::Stamp::now().unix_ms() - t).max(0)
        });
        stats.lag_ms.store(age, Relaxed);
    }
}

/// Delivers `batch`, retrying with back-off (100 ms doubling to 5 s) until it succeeds:
/// the cursor only moves past what was delivered. While it retries, the lag after the
/// cursor (`lag`: the cluster, the cursor's position, whether changes count) keeps being
/// measured.
async fn deliver(
    sink: &mut Sink,
    site: &str,
    batch: &changes::Batch,
    stats: &DestinationStats,
    name: &str,
    lag: (&Cluster, Position, bool),
) {
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0u64;
    loop {
        match sink.deliver(site, batch).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(destination = %name, failures, "export: delivering again");
                }
                stats.set_error(None);
                return;
            }
            Err(e) => {
                if failures == 0 || failures.is_multiple_of(50) {
                    tracing::warn!(destination = %name, "export: delivery failed: {e}");
                }
                failures += 1;
                stats.retries.fetch_add(1, Relaxed);
                stats.set_error(Some(e));
                refresh_lag(lag.0, lag.1, lag.2, stats).await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn commit(
    cluster: &Cluster,
    cursor: &Cursor,
    committed: &mut Position,
    stats: &DestinationStats,
) {
    match export_write(cluster, ExportCommand::Cursor(cursor.clone())).await {
        Ok(ExportOutcome::Cursor(c)) => {
            *committed = c.pos;
            stats.cursor_index.store(c.pos.log_index, Relaxed);
        }
        Ok(other) => tracing::warn!("export: cursor commit answered {other:?}"),
        // Not leading any more: the supervisor stops this runner; the next leader resumes
        // from the last committed cursor.
        Err(e) => tracing::debug!("export: cursor not committed: {e}"),
    }
}

/// Keeps the replicated change captures as this leader's config says, for the destinations
/// it configures (a registered destination it does not know keeps its pattern, as it keeps
/// its cursor). Proposals wait for format version 2 to be active.
async fn register_captures(cluster: Arc<Cluster>, settings: Arc<ExportSettings>) {
    let mut waiting_logged = false;
    loop {
        let stored = cluster
            .read(crate::db::changes::captures)
            .await
            .ok()
            .and_then(Result::ok);
        let want: Vec<_> = settings
            .destinations
            .iter()
            .filter(|d| {
                stored
                    .as_ref()
                    .is_some_and(|s| s.get(&d.name) != d.changes.as_ref())
            })
            .collect();
        let active = cluster.metrics().versions.active();
        if !want.is_empty() && active < crate::version::V2 {
            if !waiting_logged {
                tracing::info!(
                    "export: changes of user tables are captured once cluster format version 2 \
                     is active (now {active})"
                );
                waiting_logged = true;
            }
        } else {
            for d in want {
                let cmd = ExportCommand::Capture {
                    name: d.name.clone(),
                    pattern: d.changes.clone(),
                };
                match export_write(&cluster, cmd).await {
                    Ok(ExportOutcome::Capture(p)) => {
                        tracing::info!(destination = %d.name, pattern = ?p, "export: change capture registered");
                    }
                    Ok(other) => {
                        tracing::warn!(destination = %d.name, "export: change capture: {other:?}")
                    }
                    Err(e) => tracing::debug!("export: change capture not registered: {e}"),
                }
            }
        }
        tokio::time::sleep(CAPTURE_EVERY).await;
    }
}

/// On the leader, every [`WATCH_EVERY`]: the registered destinations this node's config does
/// not declare, with their cursor and lag, in `/status` (`"configured": false`), and a
/// warning for each once per term: they hold the journal (and with `keep_unexported` the
/// stream rows) back until they are configured again or forgotten (`DELETE /export/NAME`).
async fn watch_unconfigured(cluster: Arc<Cluster>) {
    let exports = &cluster.metrics().exports;
    let mut warned = std::collections::BTreeSet::new();
    loop {
        if let Ok(Ok(cursors)) = cluster.read(journal::cursors).await {
            let registered: Vec<String> = cursors.iter().map(|c| c.name.clone()).collect();
            exports.keep_unconfigured(&registered);
            for c in cursors.iter().filter(|c| !exports.is_configured(&c.name)) {
                if warned.insert(c.name.clone()) {
                    tracing::warn!(
                        destination = %c.name,
                        "export: a registered destination is not in this leader's config; its \
                         cursor holds the export journal back until it is configured again or \
                         forgotten (cairn export forget {})",
                        c.name
                    );
                }
                let stats = exports.destination(&c.name);
                stats.cursor_index.store(c.pos.log_index, Relaxed);
                // Device records only: its change capture, if any, is not this leader's to know.
                refresh_lag(&cluster, c.pos, false, &stats).await;
            }
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// Retention on the leader: every [`RETAIN_EVERY`] (or half the retention), each stream
/// table's rows received more than `keep_ms` ago, in entries of at most [`RETAIN_PER_ENTRY`]
/// rows.
async fn retain(cluster: Arc<Cluster>, keep_ms: i64, keep_unexported: bool) {
    let every = Duration::from_millis((keep_ms / 2).max(0) as u64)
        .clamp(Duration::from_secs(1), RETAIN_EVERY);
    loop {
        let tables = cluster
            .read(crate::db::sandbox::stream_tables)
            .await
            .unwrap_or_default();
        for table in tables {
            loop {
                let cmd = ExportCommand::Retain {
                    stamp_ms: crate::command::rewrite::Stamp::now().unix_ms(),
                    table: table.clone(),
                    keep_ms,
                    keep_unexported,
                    limit: RETAIN_PER_ENTRY,
                };
                match export_write(&cluster, cmd).await {
                    Ok(ExportOutcome::Retained { deleted, more }) => {
                        if deleted > 0 {
                            tracing::info!(%table, deleted, "retention: rows deleted");
                        }
                        if !more {
                            break;
                        }
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!("retention: {e}");
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
