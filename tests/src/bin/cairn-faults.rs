//! `cairn-faults`: runs seeded fault schedules against a real cluster and prints one summary
//! line. `cargo xtask faults` is the usual way in; see `cairn_tests::faults` for what a
//! schedule does and checks.
//!
//! ```text
//! cairn-faults [--schedules N] [--seed S] [--steps K] [--nodes 3] [--loopback] [--quiet]
//!              [--secure]                 # --auth, HTTPS and node mutual TLS on every node
//!              [--read-level none|weak]   # show the checker catching stale reads
//! cairn-faults --check FILE     # re-run the checkers on a saved failing run
//! ```
//! Schedule `i` uses seed `S + i`; without `--seed`, `S` comes from the clock and is printed.

use std::process::ExitCode;

use cairn_tests::faults::{self, Config};
use cairn_tests::history::Run;

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
    let schedules = num("--schedules", 1);
    let seed = value("--seed").map_or_else(
        || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        },
        |v| v.parse().expect("--seed wants a number"),
    );
    let quiet = args.iter().any(|a| a == "--quiet");
    let mut total = faults::Outcome::default();
    let mut failures = Vec::new();
    for i in 0..schedules {
        let mut cfg = Config::new(seed + i);
        cfg.steps = num("--steps", cfg.steps as u64) as usize;
        cfg.nodes = num("--nodes", cfg.nodes as u64) as usize;
        cfg.verbose = !quiet;
        if let Some(level) = value("--read-level") {
            cfg.read_level = level;
        }
        if args.iter().any(|a| a == "--loopback") {
            cfg.isolation = false;
        }
        cfg.secure = args.iter().any(|a| a == "--secure");
        cfg.out_dir = std::env::var_os("CAIRN_FAULTS_DIR")
            .map(Into::into)
            .unwrap_or_else(std::env::temp_dir);
        let t = std::time::Instant::now();
        let o = faults::run(&cfg);
        println!(
            "schedule seed={} faults={} ops={} acked={} verified={} lost={} duplicated={} \
             diverged={} nonlinearizable={} crashed={} ({:.0} s){}",
            o.seed,
            o.faults,
            o.ops,
            o.acked,
            o.verified,
            o.lost,
            o.duplicated,
            o.diverged,
            o.nonlinearizable,
            o.crashed,
            t.elapsed().as_secs_f64(),
            if o.passed() { "" } else { " FAILED" }
        );
        for n in &o.notes {
            println!("    note: {n}");
        }
        total.faults += o.faults;
        total.acked += o.acked;
        total.verified += o.verified;
        total.lost += o.lost;
        total.duplicated += o.duplicated + o.phantom;
        total.diverged += o.diverged;
        total.nonlinearizable += o.nonlinearizable + o.undecided;
        if let Some(f) = o.failure {
            eprintln!("{f}");
            failures.push(o.seed);
        }
    }
    println!(
        "faults: schedules={schedules} faults={} acked={} lost={} duplicated={} diverged={} \
         nonlinearizable={}",
        total.faults,
        total.acked,
        total.lost,
        total.duplicated,
        total.diverged,
        total.nonlinearizable
    );
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("failing seeds: {failures:?}");
        ExitCode::FAILURE
    }
}
