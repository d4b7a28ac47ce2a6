//! `cairn backup list --from URL` and `cairn restore --from URL --data-dir DIR`: the
//! continuous backup read back (see `backup/`), with a progress bar on a terminal and plain
//! lines otherwise.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use clap::Args;

use crate::backup::object::BackupKey;
use crate::backup::restore::{self, Catalog, Point, Progress};
use crate::backup::target::Target;
use crate::db::schema::utc_text;

/// Where a backup is and how to open it.
#[derive(Debug, Clone, Args)]
pub struct BackupSource {
    /// file:///DIR or s3://BUCKET/PREFIX.
    #[arg(long)]
    pub from: String,
    /// The `--backup-key-file` the backup was written with (needed for encrypted objects).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// S3-compatible endpoint such as http://127.0.0.1:9000 (default: AWS, or AWS_ENDPOINT_URL).
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    #[arg(long)]
    pub s3_region: Option<String>,
    /// Default: AWS_ACCESS_KEY_ID.
    #[arg(long)]
    pub s3_access_key_id: Option<String>,
    /// Default: AWS_SECRET_ACCESS_KEY.
    #[arg(long)]
    pub s3_secret_access_key: Option<String>,
    #[arg(long)]
    pub s3_ca_cert: Option<PathBuf>,
}

impl BackupSource {
    fn s3(&self) -> crate::backup::s3::S3Options {
        crate::backup::s3_options(
            self.s3_endpoint.clone(),
            self.s3_region.clone(),
            self.s3_access_key_id.clone(),
            self.s3_secret_access_key.clone(),
            self.s3_ca_cert.clone(),
        )
    }

    fn key(&self) -> anyhow::Result<Option<BackupKey>> {
        self.key_file.as_deref().map(BackupKey::load).transpose()
    }
}

/// A bar on a terminal, a line per 10% otherwise.
pub struct Bar {
    bar: std::sync::OnceLock<indicatif::ProgressBar>,
    plain: Mutex<(String, u64, u64, u64)>,
}

impl Bar {
    pub fn new() -> Self {
        Bar {
            bar: std::sync::OnceLock::new(),
            plain: Mutex::new((String::new(), 0, 0, 0)),
        }
    }
}

impl Default for Bar {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_message(what.to_string());
            let _ = self.bar.set(bar);
        } else {
            eprintln!("{what}: {total} bytes");
            *self.plain.lock().unwrap_or_else(|p| p.into_inner()) = (what.to_string(), total, 0, 0);
        }
    }

    fn advance(&self, n: u64) {
        if let Some(b) = self.bar.get() {
            return b.inc(n);
        }
        let mut p = self.plain.lock().unwrap_or_else(|p| p.into_inner());
        p.2 += n;
        let tenth = (p.2 * 10).checked_div(p.1).unwrap_or(10);
        if tenth > p.3 {
            p.3 = tenth;
            eprintln!("{}: {} of {} bytes", p.0, p.2, p.1);
        }
    }

    fn finish(&self, msg: &str) {
        match self.bar.get() {
            Some(b) => b.finish_with_message(msg.to_string()),
            None => eprintln!("{msg}"),
        }
    }
}

/// `cairn backup list --from URL`.
pub fn list(src: &BackupSource) -> anyhow::Result<()> {
    let spinner = std::io::stderr().is_terminal().then(|| {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(format!("listing {}", src.from));
        s.enable_steady_tick(std::time::Duration::from_millis(100));
        s
    });
    let catalog = super::runtime()?
        .block_on(async { Catalog::load(&Target::open(&src.from, &src.s3())?).await })?;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    if catalog.epochs.is_empty() {
        println!("{}: no backup objects", src.from);
    }
    for (epoch, o) in &catalog.epochs {
        println!("history epoch {epoch}:");
        for (s, size) in &o.snapshots {
            println!(
                "  snapshot  index {:>10}  {}  {size:>12} bytes",
                s.last,
                utc_text(s.last_stamp)
            );
        }
        for (first, last, t0, t1, n, bytes) in o.segment_runs() {
            println!(
                "  segments  index {first}..{last}  {} .. {}  {n} objects  {bytes} bytes",
                utc_text(t0),
                utc_text(t1)
            );
        }
        if let Some(p) = o.last_position() {
            println!(
                "  restorable through index {} ({})",
                p.index,
                utc_text(p.stamp_ms)
            );
        }
    }
    if catalog.foreign > 0 {
        println!("({} other objects ignored)", catalog.foreign);
    }
    Ok(())
}

/// Parses `--to-time` (RFC 3339) to Unix ms.
pub fn parse_time(s: &str) -> anyhow::Result<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| anyhow::anyhow!("--to-time {s:?}: not RFC 3339 ({e})"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// `cairn restore --from URL --data-dir DIR [--to-time T | --to-index N]`.
pub fn restore_from(
    src: &BackupSource,
    data_dir: &std::path::Path,
    to_time: Option<&str>,
    to_index: Option<u64>,
) -> anyhow::Result<()> {
    let point = Point {
        to_time: to_time.map(parse_time).transpose()?,
        to_index,
    };
    let key = src.key()?;
    let bar = Bar::new();
    let r = super::runtime()?.block_on(restore::restore(
        &src.from,
        &src.s3(),
        key.as_ref(),
        data_dir,
        point,
        &bar,
    ))?;
    println!(
        "restored {} through index {} (stamped {}): snapshot at index {} + {} entries from {} \
         segments, history epoch {} -> {}\nstart it: cairn node --data-dir {} --bootstrap",
        src.from,
        r.last.index,
        utc_text(r.last_stamp_ms),
        r.snapshot.last,
        r.entries,
        r.segments,
        r.epoch,
        r.new_epoch,
        data_dir.display()
    );
    Ok(())
}
