//! Processes, ports and scratch directories for bench runs.

use anyhow::{Context, Result, bail};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process that is killed (SIGKILL) and reaped when dropped, however the bench exits.
pub struct Guarded {
    pub name: String,
    pub child: Option<Child>,
}

impl Guarded {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Guarded> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Guarded {
            name: name.into(),
            child: Some(child),
        })
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("{} exited early with {status}", self.name);
        }
        Ok(())
    }

    /// SIGKILL now and reap; no-op if already gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for a normal exit, failing on a non-zero status or after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let Some(c) = self.child.as_mut() else {
            return Ok(());
        };
        loop {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                if !status.success() {
                    bail!("{} exited with {status}", self.name);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `perf record` of one process for a while (software cpu-clock event: hardware counters are
/// not available in every VM), reported as a flat profile by symbol.
pub struct PerfRecord {
    proc: Guarded,
    data: PathBuf,
    report: PathBuf,
}

impl PerfRecord {
    /// Samples `pid` at 499 Hz for `seconds`, writing `<name>.perf.data` in `target/bench/`.
    pub fn start(pid: u32, seconds: f64, name: &str) -> Result<PerfRecord> {
        let dir = crate::util::root().join("target/bench");
        let data = dir.join(format!("{name}.perf.data"));
        let proc = Guarded::spawn(
            "perf record",
            Command::new("perf")
                .args(["record", "-e", "cpu-clock", "-F", "499", "-g", "-q", "-o"])
                .arg(&data)
                .args(["-p", &pid.to_string(), "--", "sleep", &format!("{seconds}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        Ok(PerfRecord {
            proc,
            data,
            report: dir.join(format!("{name}.profile.txt")),
        })
    }

    /// Waits for the recording and writes the flat profile; returns its path.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.proc.wait_timeout(Duration::from_secs(120))?;
        let out = crate::util::output(
            Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--sort",
                    "dso,symbol",
                    "-g",
                    "none",
                ])
                .arg("-i")
                .arg(&self.data),
        )?;
        std::fs::write(&self.report, out)?;
        Ok(self.report)
    }
}

/// A loopback port the OS reports free right now (bind to port 0, read it, release it).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Polls until something accepts TCP connections at `addr`.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("nothing listening on {addr} after {timeout:?}")
}

/// A fresh, empty scratch directory `target/bench/work/<name>`.
pub fn scratch(name: &str) -> Result<PathBuf> {
    let dir = crate::util::root().join("target/bench/work").join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Resident set size of a process in KiB, from /proc/<pid>/status (VmRSS).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS for pid {pid}"))
}

/// CPU time (user + system) a process has used, from /proc/<pid>/stat, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    // USER_HZ is 100 on every Linux this runs on.
    Ok(ticks / 100.0)
}

/// p-quantile (0..=1) of an ascending slice, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn cpu_of_self() {
        let before = cpu_seconds(std::process::id()).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(100) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0 && cpu_seconds(std::process::id()).unwrap() >= before);
    }

    #[test]
    fn rss_of_self() {
        assert!(rss_kib(std::process::id()).unwrap() > 100);
    }
}
