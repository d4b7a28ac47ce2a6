//! `cargo xtask faults --schedules N [--seed S] [--steps K]`: seeded fault schedules against a
//! real cluster (kill -9, SIGSTOP, partitions and packet loss in network namespaces, disk
//! full on tmpfs, membership changes), then the checkers; prints one summary line
//! `faults: schedules=N faults=F acked=A lost=0 duplicated=0 diverged=0 nonlinearizable=0`.
//!
//! The work is done by `cairn-faults` (tests/src/bin), built here with the `cairn` daemon.
//! Partitions, loss and disk full need root; without it the schedules use the other faults.
//! `cargo xtask test` runs [`BOUNDED`]; with `CAIRN_SOAK=1` it runs [`SOAK`] with a seed from
//! the clock (printed, so a failure can be replayed with `--seed`); then [`SECURE`] with
//! `--secure` (every node with `--auth`, HTTPS and node mutual TLS).

use crate::util::{cargo, root, run, step};
use anyhow::Result;
use std::process::Command;

/// (schedules, steps per schedule, first seed) for `cargo xtask test`: about two minutes.
pub const BOUNDED: (u64, u64, u64) = (4, 4, 1);
/// The same with `CAIRN_SOAK=1`.
pub const SOAK: (u64, u64) = (30, 8);
/// (schedules, steps, first seed) run again with `--secure` (auth, HTTPS, node mutual TLS on
/// every node) by `cargo xtask test`: about a minute.
pub const SECURE: (u64, u64, u64) = (2, 4, 101);

pub fn run_command(args: &[String]) -> Result<()> {
    step("faults", || faults(args))
}

/// Builds both binaries and runs `cairn-faults` with `args`.
pub fn faults(args: &[String]) -> Result<()> {
    cargo(&["build", "-q", "-p", "cairn-gateway", "--bin", "cairn"])?;
    cargo(&["build", "-q", "-p", "cairn-tests", "--bin", "cairn-faults"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| root().join("target"));
    run(Command::new(target.join("debug/cairn-faults"))
        .args(args)
        .env("CAIRN_BIN", target.join("debug/cairn"))
        .current_dir(root()))
}

/// The `cargo xtask test` step: the bounded set, or the soak set with `CAIRN_SOAK=1`.
pub fn test_step() -> Result<()> {
    let soak = std::env::var("CAIRN_SOAK").is_ok_and(|v| v == "1");
    let args: Vec<String> = if soak {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (n, steps) = SOAK;
        ["--schedules", &n.to_string(), "--steps", &steps.to_string()]
            .into_iter()
            .map(String::from)
            .chain(["--seed".into(), seed.to_string(), "--quiet".into()])
            .collect()
    } else {
        schedule_args(BOUNDED, &[])
    };
    step(
        &format!("faults ({})", if soak { "soak" } else { "bounded" }),
        || faults(&args),
    )?;
    let secure = schedule_args(SECURE, &["--secure"]);
    step("faults (secure: auth, HTTPS, node mTLS)", || {
        faults(&secure)
    })
}

/// `cairn-faults` arguments for (schedules, steps, first seed), quiet, plus `extra`.
fn schedule_args((n, steps, seed): (u64, u64, u64), extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--schedules", "--steps", "--seed"]
        .into_iter()
        .zip([n, steps, seed])
        .flat_map(|(flag, v)| [flag.to_string(), v.to_string()])
        .collect();
    args.push("--quiet".into());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
