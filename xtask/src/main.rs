//! Cairn's own automation: `cargo xtask <command>`.
//!
//! - `test`: everything CI checks (set-up, fmt, clippy, no_std builds, tests).
//! - `bench`, `dist`, `qemu`, `size`, `faults`: see `cargo xtask help`.

mod arm_check;
mod bench;
mod boards;
mod deb;
mod dist;
mod faults;
mod host_board;
mod manpage;
mod qemu;
mod qemu_e2e;
mod setup;
mod size;
mod template;
mod util;

use anyhow::{Result, bail};

const HELP: &str = "\
cargo xtask <command>

commands:
  setup   install what the tests need (Debian packages, rustup targets)
  test    everything CI checks: set-up, fmt, clippy, no_std builds, all tests
  size    flash and static RAM per board, with and without the Cairn client
  firmware-size  the client's own cost in a minimal Cortex-M4F image (firmware/size-probe)
  host-smoke  the board app as a Linux process on TAP in a network namespace (root)
  qemu    the firmware image under qemu-system-arm (`--smoke`: network skeleton only)
  template  the board template built out of tree (NUCLEO-F429ZI, host) and run on a cluster
  arm     the ARM step of `test` alone: cross-build, package, run under qemu-user
          (`--musl`: only the static musl binaries)
  bench   Cairn against dqlite, Mosquitto and hiqlite on this machine (`--quick`: < 3 min)
  faults  seeded fault schedules on a real cluster (`--schedules N [--seed S] [--steps K]
          [--focus mixed|overlap|powercut|clock] [--mix] [--unsafe-no-fsync]
          [--qemu] [--host-board] [--real-every K]`: real devices, the QEMU image and the
          host board on TAP, in one schedule of every K)
  soak    long fault runs, resumable (`--schedules N | --hours H [--dir D]`, same options;
          both real devices in one schedule of ten unless `--no-devices`)
  dist    size-optimised `cairn` for aarch64, armv7, x86_64 and a .deb each, and static
          musl `cairn` for aarch64 and armv7 in a tarball each, in target/dist/
  help    this text
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("help");
    let rest = &args[args.len().min(1)..];
    match cmd {
        "setup" => setup::run(),
        "test" => test(rest),
        "qemu" => qemu::run_command(rest),
        "template" => template::run_command(),
        "dist" => dist::run(rest),
        "faults" => faults::run_command(rest),
        "soak" => faults::soak_command(rest),
        "bench" => bench::run(rest),
        "arm" => arm_check::run_command(rest),
        "size" => size::run_command(rest),
        "firmware-size" => util::step(
            "cairn-firmware size probe (thumbv7em, release)",
            firmware_size_probe,
        ),
        "host-smoke" => host_board::run_command(rest),
        "__echo-listener" => host_board::echo_listener(rest),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n\n{HELP}"),
    }
}

/// Links cairn-firmware into a minimal Cortex-M4F image (firmware/size-probe) without and with
/// the client and its flash outbox, and prints `arm-none-eabi-size` of each: proves the client
/// links on the target and shows what it costs.
fn firmware_size_probe() -> Result<()> {
    let dir = util::root().join("firmware/size-probe");
    let elf = dir.join("target/thumbv7em-none-eabihf/release/cairn-firmware-size-probe");
    for features in ["", "client", "flash"] {
        let mut build =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build
            .args(["build", "--release", "--quiet"])
            .current_dir(&dir);
        if !features.is_empty() {
            build.args(["--features", features]);
        }
        util::run(&mut build)?;
        let size = util::output(std::process::Command::new("arm-none-eabi-size").arg(&elf))?;
        let row = size.lines().nth(1).unwrap_or_default();
        let label = if features.is_empty() {
            "skeleton"
        } else {
            features
        };
        println!("size-probe {label:>8}: {row}");
    }
    Ok(())
}

/// Feature combinations of cairn-firmware that must build for both no_std targets.
const FIRMWARE_FEATURE_SETS: [&str; 3] = [
    "flash-outbox",
    "defmt,embassy-net",
    "defmt,embassy-net,flash-outbox",
];

/// The one command CI runs. Steps run in order; the first failure stops the run.
fn test(_args: &[String]) -> Result<()> {
    setup::run()?;
    util::step("fmt", || util::cargo(&["fmt", "--all", "--", "--check"]))?;
    util::step("clippy", || {
        util::cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
    })?;
    // SPEC.md's derived keys and sealed frames (protocol 2 and appendix A) recomputed with
    // Python's `cryptography`, and found in the spec's hex blocks.
    util::step("protocol cross-check", || {
        util::run(
            std::process::Command::new("python3")
                .arg(util::root().join("protocol/tests/crosscheck.py")),
        )
    })?;
    for target in ["thumbv7em-none-eabihf", "thumbv6m-none-eabi"] {
        util::step(&format!("no_std build ({target})"), || {
            util::cargo(&["build", "-p", "cairn-protocol", "--target", target])?;
            util::cargo(&["build", "-p", "cairn-firmware", "--target", target])?;
            for features in FIRMWARE_FEATURE_SETS {
                util::cargo(&[
                    "build",
                    "-p",
                    "cairn-firmware",
                    "--target",
                    target,
                    "--features",
                    features,
                ])?;
            }
            Ok(())
        })?;
    }
    util::step("cairn-firmware with all host features", || {
        let features = "flash-outbox,embassy-net,log,tokio";
        util::cargo(&[
            "clippy",
            "-p",
            "cairn-firmware",
            "--all-targets",
            "--features",
            features,
            "--",
            "-D",
            "warnings",
        ])?;
        util::cargo(&["test", "-p", "cairn-firmware", "--features", features])
    })?;
    util::step("bare daemon (no sim feature)", dist::check_bare_daemon)?;
    util::step("workspace tests", || util::cargo(&["test", "--workspace"]))?;
    faults::test_step()?;
    // The ARM gateway: cross-built, packaged as .deb, run under qemu-user.
    arm_check::run()?;
    util::step("boards: fmt, app tests", boards::check_sources)?;
    util::step("boards build (nucleo-h743zi, rp2040-w5500)", || {
        for board in [&boards::NUCLEO, &boards::RP2040] {
            board.build(&[], &[])?;
            board.build(&["client", "flash-outbox"], &[])?;
        }
        Ok(())
    })?;
    // The image against a real cluster: leader killed, the device's power cut, one image as
    // two provisioned devices.
    qemu::run_command(&[])?;
    // The template a newcomer copies: out of tree, --locked, the host variant on a cluster.
    template::run_command()?;
    host_board::run_command(&[])?;
    println!("xtask test: all steps passed");
    Ok(())
}
