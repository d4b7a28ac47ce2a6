//! `cargo xtask faults --schedules N [--seed S] [--steps K] [--focus F] [--unsafe-no-fsync]
//! [--qemu] [--host-board] [--real-every K]`: seeded fault schedules against a real cluster (kill -9, SIGSTOP,
//! partitions and packet loss in network namespaces, disk full on tmpfs, membership changes,
//! power cuts on faultfs, clock jumps with libfaketime, two or three of them at once), then
//! the checkers; prints one summary line `faults: schedules=N faults=F
//! kinds=kill:..,...,devcut:..,overlap:.. acked=A lost=0 duplicated=0 diverged=0
//! nonlinearizable=0 real_devices=R`.
//!
//! `--qemu` builds the release QEMU image with the flash outbox (as `cargo xtask qemu` does),
//! `--host-board` the host board (`boards/host`, as `cargo xtask host-smoke` does), and runs
//! them as real devices next to the simulated ones in the middle schedule of every
//! `--real-every K` (default every schedule), with a device power cut in that schedule: each
//! killed while records wait unacknowledged, then booted again (QEMU on the same flash file).
//!
//! `cargo xtask soak --schedules N | --hours H [--dir D] [...]`: the same, resumable: state,
//! summary and every failing seed with its replay command in `D` (default `target/soak`);
//! running it again goes on where it stopped.
//!
//! The work is done by `cairn-faults` (tests/src/bin), built here with the `cairn` daemon.
//! Partitions, loss, disk full and power cuts need root; without it the schedules use the
//! other faults. `--unsafe-no-fsync` runs the nodes on a `cairn` built with the gateway's
//! test-only `unsafe-no-fsync` feature (the Raft log never fsync'd): the power cuts must
//! catch it. `cargo xtask test` runs [`BOUNDED`] (overlap, power cut and clock schedules in
//! turn, the real devices in the power-cut one); with `CAIRN_SOAK=1` it runs [`SOAK`] with a seed from the clock (printed, so a
//! failure can be replayed with `--seed`); then [`SECURE`] with `--secure` (every node with
//! `--auth`, HTTPS and node mutual TLS).

use crate::util::{cargo, root, run, step};
use anyhow::Result;
use std::path::PathBuf;
use std::process::Command;

/// (schedules, steps per schedule, first seed) for `cargo xtask test`: one overlap, one power
/// cut and one clock schedule (`--mix` takes them in turn), a few minutes in all.
pub const BOUNDED: (u64, u64, u64) = (3, 3, 1);
/// The same with `CAIRN_SOAK=1`.
pub const SOAK: (u64, u64) = (30, 8);
/// The real devices join one schedule of this many in the bounded set (the power-cut one of
/// the three), and in soaks.
const REAL_EVERY_BOUNDED: &str = "3";
const REAL_EVERY_SOAK: &str = "10";
/// The real devices' flags (xtask's; [`with_real_devices`] turns them into binaries).
const REAL_DEVICES: [&str; 2] = ["--qemu", "--host-board"];
/// (schedules, steps, first seed) run again with `--secure` (auth, HTTPS, node mutual TLS on
/// every node) by `cargo xtask test`: about a minute.
pub const SECURE: (u64, u64, u64) = (2, 4, 101);

/// The no-fsync daemon's name next to `cairn` in `target/debug`.
const NO_FSYNC_BIN: &str = "cairn-unsafe-no-fsync";

pub fn run_command(args: &[String]) -> Result<()> {
    step("faults", || faults(args))
}

/// `cargo xtask soak`: [`faults`] with a soak directory (default `target/soak`).
pub fn soak_command(args: &[String]) -> Result<()> {
    let mut args = args.to_vec();
    if let Some(i) = args.iter().position(|a| a == "--dir") {
        args[i] = "--soak-dir".into();
    } else {
        args.push("--soak-dir".into());
        args.push(target().join("soak").display().to_string());
    }
    if !args.iter().any(|a| a == "--schedules") {
        // --hours alone: no schedule limit.
        args.extend(["--schedules".into(), u64::MAX.to_string()]);
    }
    if !args.iter().any(|a| a == "--quiet") {
        args.push("--quiet".into());
    }
    // The real devices in one schedule of every ten, unless asked otherwise or resuming a
    // soak that ran without them (its options must stay the same).
    let dir = &args[args
        .iter()
        .position(|a| a == "--soak-dir")
        .expect("set above")
        + 1];
    let state = std::fs::read_to_string(PathBuf::from(dir).join("state.json")).ok();
    let resumed_without = state.is_some_and(|s| !s.contains("--qemu"));
    if let Some(i) = args.iter().position(|a| a == "--no-devices") {
        args.remove(i);
    } else if resumed_without {
        println!("soak: {dir} holds a soak without real devices: resuming it so");
    } else if !args.iter().any(|a| REAL_DEVICES.contains(&a.as_str())) {
        args.extend(REAL_DEVICES.map(String::from));
        args.extend(["--real-every".into(), REAL_EVERY_SOAK.into()]);
    }
    step("soak", || faults(&args))
}

fn target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| root().join("target"))
}

/// Builds both binaries (and the no-fsync daemon when asked) and runs `cairn-faults` with
/// `args`.
pub fn faults(args: &[String]) -> Result<()> {
    let bin = if args.iter().any(|a| a == "--unsafe-no-fsync") {
        // Built under its own name, then the real daemon is built again, so `target/debug/cairn`
        // is never left without its fsyncs.
        let features = ["--features", "cairn-gateway/unsafe-no-fsync"];
        cargo(
            &[
                &["build", "-q", "-p", "cairn-gateway", "--bin", "cairn"][..],
                &features,
            ]
            .concat(),
        )?;
        std::fs::copy(
            target().join("debug/cairn"),
            target().join("debug").join(NO_FSYNC_BIN),
        )?;
        cargo(&["build", "-q", "-p", "cairn-gateway", "--bin", "cairn"])?;
        target().join("debug").join(NO_FSYNC_BIN)
    } else {
        cargo(&["build", "-q", "-p", "cairn-gateway", "--bin", "cairn"])?;
        target().join("debug/cairn")
    };
    cargo(&["build", "-q", "-p", "cairn-tests", "--bin", "cairn-faults"])?;
    let args = with_real_devices(args)?;
    run(Command::new(target().join("debug/cairn-faults"))
        .args(&args)
        .env("CAIRN_BIN", bin)
        .current_dir(root()))
}

/// `args` with `--qemu` replaced by `--qemu-elf ELF` (the release image with the flash
/// outbox, built as `cargo xtask qemu` builds it) and `--host-board` by `--host-board BIN`
/// (`boards/host` with the client, as `cargo xtask host-smoke` builds it), both copied to
/// `target/faults/` (a later build of the board with other features must not change the file
/// under a running device).
fn with_real_devices(args: &[String]) -> Result<Vec<String>> {
    let mut args = args.to_vec();
    if let Some(i) = args.iter().position(|a| a == "--qemu") {
        crate::qemu::ensure_defmt_print()?;
        let built = crate::boards::QEMU.build(&["client", "flash-outbox"], &[])?;
        let elf = copy_to_faults(&built, "qemu-flash-outbox.elf")?;
        args.splice(i..=i, ["--qemu-elf".into(), elf]);
    }
    if let Some(i) = args.iter().position(|a| a == "--host-board") {
        let built = crate::host_board::build(&["client"])?;
        let bin = copy_to_faults(&built, "cairn-board-host")?;
        args.splice(i..=i, ["--host-board".into(), bin]);
    }
    Ok(args)
}

/// Copies a built device to `target/faults/NAME`; returns the copy's path.
fn copy_to_faults(built: &std::path::Path, name: &str) -> Result<String> {
    let dir = target().join("faults");
    std::fs::create_dir_all(&dir)?;
    let to = dir.join(name);
    std::fs::copy(built, &to)?;
    Ok(to.display().to_string())
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
            .chain(REAL_DEVICES.map(String::from))
            .chain(["--real-every".into(), REAL_EVERY_SOAK.into()])
            .collect()
    } else {
        schedule_args(
            BOUNDED,
            &[
                "--mix",
                "--qemu",
                "--host-board",
                "--real-every",
                REAL_EVERY_BOUNDED,
            ],
        )
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
