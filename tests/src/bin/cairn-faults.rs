//! `cairn-faults`: runs seeded fault schedules against a real cluster and prints one summary
//! line. `cargo xtask faults` and `cargo xtask soak` are the usual ways in; see
//! `cairn_tests::faults` for what a schedule does and checks.
//!
//! ```text
//! cairn-faults [--schedules N] [--seed S] [--steps K] [--nodes 3] [--loopback] [--quiet]
//!              [--focus mixed|overlap|powercut|clock] [--mix]   # --mix: cycle overlap, powercut, clock
//!              [--secure]                 # --auth, HTTPS and node mutual TLS on every node
//!              [--read-level none|weak]   # show the checker catching stale reads
//!              [--unsafe-no-fsync]        # CAIRN_BIN was built so: only labels the replay lines
//!              [--qemu-elf ELF] [--host-board BIN] [--real-every K]
//!                     # real devices (the QEMU image, the host board on TAP) with a device
//!                     # power cut, in the middle schedule of every K (default: every one)
//!              [--soak-dir DIR [--hours H]]   # resumable: state and summary in DIR
//! cairn-faults --check FILE     # re-run the checkers on a saved failing run
//! ```
//! Schedule `i` uses seed `S + i`; without `--seed`, `S` comes from the clock and is printed.
//! With `--soak-dir`, `DIR/state.json` keeps the base seed, the next schedule and the totals
//! after every schedule, so a soak stopped at any point goes on where it was; `DIR/summary.txt`
//! holds the summary line and every failing seed with its replay command; `touch DIR/stop`
//! ends the soak after the schedule that is running.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cairn_tests::faults::{self, Config};
use cairn_tests::history::Run;
use cairn_tests::nemesis::{Focus, KINDS};
use serde::{Deserialize, Serialize};

/// Totals over many schedules; also the soak's resumable state.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Totals {
    base_seed: u64,
    /// The options that shape the schedules (`--steps`, `--focus`, ...): a resumed soak
    /// must run the same ones.
    #[serde(default)]
    options: String,
    /// Schedules run so far (the next one is `base_seed + schedules`).
    schedules: u64,
    faults: u64,
    kinds: BTreeMap<String, u64>,
    overlap: u64,
    /// Real devices (QEMU images, host boards) that took part, summed over schedules.
    #[serde(default)]
    real_devices: u64,
    acked: u64,
    lost: u64,
    duplicated: u64,
    diverged: u64,
    nonlinearizable: u64,
    misordered: u64,
    crashed: u64,
    /// Seconds spent running schedules, over every resumed part.
    seconds: f64,
    /// (seed, replay command, first line of why).
    failures: Vec<(u64, String, String)>,
    /// Failing schedules by what failed first ([`category`]).
    #[serde(default)]
    failed_by: BTreeMap<String, u64>,
}

/// What failed in a schedule, most serious first: a soak's failures sorted into kinds.
fn category(o: &faults::Outcome) -> &'static str {
    if o.lost > 0 {
        "lost"
    } else if o.duplicated + o.phantom > 0 {
        "duplicated"
    } else if o.diverged > 0 {
        "diverged"
    } else if o.nonlinearizable + o.undecided > 0 {
        "nonlinearizable"
    } else if o.crashed > 0 {
        "crashed or harness"
    } else if o.misordered > 0 {
        "record time order"
    } else {
        "other"
    }
}

impl Totals {
    fn add(&mut self, o: &faults::Outcome) {
        self.schedules += 1;
        self.faults += o.faults as u64;
        for (k, n) in &o.kinds {
            *self.kinds.entry((*k).to_string()).or_default() += *n as u64;
        }
        self.overlap += o.overlaps as u64;
        self.real_devices += o.real_devices as u64;
        self.acked += o.acked;
        self.lost += o.lost as u64;
        self.duplicated += (o.duplicated + o.phantom) as u64;
        self.diverged += o.diverged as u64;
        self.nonlinearizable += (o.nonlinearizable + o.undecided) as u64;
        self.misordered += o.misordered as u64;
        self.crashed += o.crashed as u64;
    }

    /// The summary line (the issue's format).
    fn line(&self) -> String {
        let kinds: Vec<String> = KINDS
            .iter()
            .map(|k| format!("{k}:{}", self.kinds.get(*k).copied().unwrap_or(0)))
            .chain([format!("overlap:{}", self.overlap)])
            .collect();
        format!(
            "faults: schedules={} faults={} kinds={} acked={} lost={} duplicated={} diverged={} \
             nonlinearizable={} real_devices={}",
            self.schedules,
            self.faults,
            kinds.join(","),
            self.acked,
            self.lost,
            self.duplicated,
            self.diverged,
            self.nonlinearizable,
            self.real_devices
        )
    }

    fn report(&self) -> String {
        let mut s = format!(
            "{}\nbase seed {}, options {:?}, {:.1} h of schedules; misordered record times {}, \
             crashed nodes {}\n",
            self.line(),
            self.base_seed,
            self.options,
            self.seconds / 3600.0,
            self.misordered,
            self.crashed
        );
        if self.failures.is_empty() {
            s += "failing seeds: none\n";
        } else {
            let by: Vec<String> = self
                .failed_by
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            s += &format!(
                "failing seeds ({}; {}):\n",
                self.failures.len(),
                by.join(", ")
            );
            for (seed, replay, why) in &self.failures {
                s += &format!("  seed {seed}: {replay}\n      {why}\n");
            }
        }
        s
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so a soak killed mid-write
/// leaves the previous state whole.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num = |flag: &str, default: u64| -> u64 {
        value(flag).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{flag} wants a number, got {v:?}"))
        })
    };
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if let Some(file) = value("--check") {
        let text = std::fs::read(&file).unwrap_or_else(|e| panic!("reading {file}: {e}"));
        let run: Run = serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let problems = faults::recheck(&run);
        if problems.is_empty() {
            println!("seed {}: {} ops, all checks pass", run.seed, run.ops.len());
            return ExitCode::SUCCESS;
        }
        println!("seed {}: {}", run.seed, problems.join("\n"));
        return ExitCode::FAILURE;
    }
    let soak_dir = value("--soak-dir").map(PathBuf::from);
    let state_path = soak_dir.as_ref().map(|d| d.join("state.json"));
    let mut total: Totals = state_path
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .map(|b| serde_json::from_slice(&b).expect("a readable soak state.json"))
        .unwrap_or_default();
    // Everything that changes what schedule `i` is, or how it runs.
    let options: Vec<String> = [
        "--steps",
        "--nodes",
        "--focus",
        "--read-level",
        "--real-every",
    ]
    .iter()
    .filter_map(|f| value(f).map(|v| format!("{f} {v}")))
    .chain(
        ["--mix", "--secure", "--loopback", "--unsafe-no-fsync"]
            .iter()
            .filter(|f| has(f))
            .map(|f| f.to_string()),
    )
    .chain(has("--qemu-elf").then(|| "--qemu".to_string()))
    .chain(has("--host-board").then(|| "--host-board".to_string()))
    .collect();
    let options = options.join(" ");
    let resumed = total.schedules > 0;
    assert!(
        !resumed || total.options == options,
        "the soak dir holds a run with options {:?}, not {options:?}: use the same ones, or \
         another --soak-dir",
        total.options
    );
    total.options = options;
    if !resumed {
        total.base_seed = value("--seed").map_or_else(
            || {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            },
            |v| v.parse().expect("--seed wants a number"),
        );
    }
    let schedules = num("--schedules", 1);
    let deadline = value("--hours").map(|h| {
        let h: f64 = h.parse().expect("--hours wants a number");
        Instant::now() + Duration::from_secs_f64(h * 3600.0)
    });
    if let Some(d) = &soak_dir {
        std::fs::create_dir_all(d).expect("creating the soak dir");
        let limit = if schedules == u64::MAX {
            "no limit".to_string()
        } else {
            schedules.to_string()
        };
        println!(
            "soak in {}: {} base seed {}, {} schedules done (of {limit})",
            d.display(),
            if resumed { "resuming," } else { "starting," },
            total.base_seed,
            total.schedules,
        );
    }
    let focus: Option<Focus> = value("--focus").map(|f| f.parse().expect("--focus"));
    let quiet = has("--quiet");
    let out_dir: PathBuf = soak_dir.clone().unwrap_or_else(|| {
        std::env::var_os("CAIRN_FAULTS_DIR")
            .map(Into::into)
            .unwrap_or_else(std::env::temp_dir)
    });
    let mut run_now = 0u64;
    // `touch DIR/stop` ends a soak cleanly after the schedule that is running.
    let stop_file = soak_dir.as_ref().map(|d| d.join("stop"));
    let stop_asked = || stop_file.as_ref().is_some_and(|f| f.exists());
    while total.schedules < schedules
        && deadline.is_none_or(|d| Instant::now() < d)
        && !stop_asked()
    {
        let i = total.schedules;
        let mut cfg = Config::new(total.base_seed + i);
        cfg.steps = num("--steps", cfg.steps as u64) as usize;
        cfg.nodes = num("--nodes", cfg.nodes as u64) as usize;
        cfg.verbose = !quiet;
        // --mix: overlap, power cut and clock in turn; otherwise --focus or a mix of all.
        cfg.focus = if has("--mix") {
            [Focus::Overlap, Focus::PowerCut, Focus::Clock][(i % 3) as usize]
        } else {
            focus.unwrap_or_default()
        };
        cfg.unsafe_no_fsync = has("--unsafe-no-fsync");
        if let Some(level) = value("--read-level") {
            cfg.read_level = level;
        }
        if has("--loopback") {
            cfg.isolation = false;
        }
        cfg.secure = has("--secure");
        // Real devices join the middle schedule of every `--real-every` (1: all of them;
        // 3 with --mix: the power-cut one).
        let every = num("--real-every", 1).max(1);
        if i % every == (every - 1) / 2 {
            cfg.qemu_elf = value("--qemu-elf").map(PathBuf::from);
            cfg.host_board = value("--host-board").map(PathBuf::from);
        }
        cfg.out_dir = out_dir.clone();
        let t = Instant::now();
        let o = match std::panic::catch_unwind(|| faults::run(&cfg)) {
            Ok(o) => o,
            // A harness failure (a cluster that never came back, say) fails the schedule too.
            Err(p) => faults::Outcome {
                seed: cfg.seed,
                crashed: 1,
                failure: Some(format!(
                    "FAILED seed={} (replay: {}): harness: {}",
                    cfg.seed,
                    cfg.replay(),
                    panic_text(&*p)
                )),
                ..Default::default()
            },
        };
        let secs = t.elapsed().as_secs_f64();
        let kinds: Vec<String> = o.kinds.iter().map(|(k, n)| format!("{k}:{n}")).collect();
        println!(
            "schedule seed={} focus={} faults={} [{}] overlaps={} ops={} acked={} verified={} \
             lost={} duplicated={} diverged={} nonlinearizable={} misordered={} crashed={} \
             real_devices={} ({secs:.0} s){}",
            o.seed,
            cfg.focus,
            o.faults,
            kinds.join(","),
            o.overlaps,
            o.ops,
            o.acked,
            o.verified,
            o.lost,
            o.duplicated,
            o.diverged,
            o.nonlinearizable,
            o.misordered,
            o.crashed,
            o.real_devices,
            if o.passed() { "" } else { " FAILED" }
        );
        for n in &o.notes {
            // What the real device did is worth a line even when quiet.
            if !quiet || n.contains(" device ") && n.contains(" boots (restored") {
                println!("    note: {n}");
            }
        }
        total.add(&o);
        total.seconds += secs;
        run_now += 1;
        if let Some(f) = &o.failure {
            eprintln!("{f}");
            let why = f
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            total.failures.push((o.seed, cfg.replay(), why));
            *total.failed_by.entry(category(&o).into()).or_default() += 1;
        }
        if let (Some(d), Some(p)) = (&soak_dir, &state_path) {
            write_atomic(p, &serde_json::to_string_pretty(&total).expect("state"));
            write_atomic(&d.join("summary.txt"), &total.report());
        }
    }
    if let Some(f) = stop_file.as_ref().filter(|f| f.exists()) {
        let _ = std::fs::remove_file(f);
        println!("stopped: {} was there", f.display());
    }
    if soak_dir.is_some() {
        println!("ran {run_now} schedules now");
        print!("{}", total.report());
    } else {
        println!("{}", total.line());
    }
    if total.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        let seeds: Vec<u64> = total.failures.iter().map(|f| f.0).collect();
        eprintln!("failing seeds: {seeds:?}");
        ExitCode::FAILURE
    }
}
