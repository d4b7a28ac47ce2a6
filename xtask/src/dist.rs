//! `cargo xtask dist`: the `cairn` daemon for gateway boards, built and packaged.
//!
//! Builds `cairn` with the size-optimised `dist` profile for the three Linux targets the
//! project ships, then wraps each binary in a Debian package (see [`crate::deb`]):
//!
//! ```text
//! target/dist/cairn-<triple>             stripped binary
//! target/dist/cairn_<version>-1_<arch>.deb
//! ```
//!
//! The packages hold the bare daemon: cairn-gateway without its default feature `sim`, so no
//! `cairn sim`, no simulated devices in `cairn dev`, and neither cairn-firmware nor its
//! embassy-time driver in the binary ([`check_bare_daemon`] keeps it that way).
//!
//! Cross builds link with Debian's cross gcc, which also compiles the bundled SQLite. The
//! xtask sets the linker, `CC` and `AR` per target itself, so no `.cargo/config.toml` or
//! shell environment is needed, and installs the gcc packages when they are missing.

use crate::util::{self, step};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A Linux target `cairn` is built and packaged for.
pub struct LinuxTarget {
    /// Rust target triple.
    pub triple: &'static str,
    /// Debian architecture name.
    pub deb_arch: &'static str,
    /// Prefix of the Debian cross toolchain (`<prefix>-gcc`), `None` for the host.
    pub gcc_prefix: Option<&'static str>,
    /// Debian package providing `<prefix>-gcc`.
    pub gcc_package: &'static str,
    /// Width of `usize` in bits.
    pub pointer_width: u32,
    /// qemu-user program that runs the binary on an x86_64 host, with the sysroot for `-L`.
    pub qemu: Option<(&'static str, &'static str)>,
}

pub const X86_64: LinuxTarget = LinuxTarget {
    triple: "x86_64-unknown-linux-gnu",
    deb_arch: "amd64",
    gcc_prefix: None,
    gcc_package: "gcc",
    pointer_width: 64,
    qemu: None,
};

pub const AARCH64: LinuxTarget = LinuxTarget {
    triple: "aarch64-unknown-linux-gnu",
    deb_arch: "arm64",
    gcc_prefix: Some("aarch64-linux-gnu"),
    gcc_package: "gcc-aarch64-linux-gnu",
    pointer_width: 64,
    qemu: Some(("qemu-aarch64", "/usr/aarch64-linux-gnu")),
};

pub const ARMV7: LinuxTarget = LinuxTarget {
    triple: "armv7-unknown-linux-gnueabihf",
    deb_arch: "armhf",
    gcc_prefix: Some("arm-linux-gnueabihf"),
    gcc_package: "gcc-arm-linux-gnueabihf",
    pointer_width: 32,
    qemu: Some(("qemu-arm", "/usr/arm-linux-gnueabihf")),
};

pub const TARGETS: [&LinuxTarget; 3] = [&AARCH64, &ARMV7, &X86_64];

impl LinuxTarget {
    /// A command that runs `binary` (built for this target) on the build machine: directly
    /// for the host, under qemu-user with the Debian cross sysroot for ARM.
    pub fn runner(&self, binary: &Path) -> Command {
        match self.qemu {
            None => Command::new(binary),
            Some((qemu, sysroot)) => {
                let mut cmd = Command::new(qemu);
                cmd.arg("-L").arg(sysroot).arg(binary);
                cmd
            }
        }
    }

    /// Sets the environment cargo and the `cc` crate need to cross-compile for this target.
    fn cross_env(&self, cmd: &mut Command) {
        let Some(prefix) = self.gcc_prefix else {
            return;
        };
        let upper = self.triple.to_uppercase().replace('-', "_");
        let lower = self.triple.replace('-', "_");
        cmd.env(
            format!("CARGO_TARGET_{upper}_LINKER"),
            format!("{prefix}-gcc"),
        )
        .env(format!("CC_{lower}"), format!("{prefix}-gcc"))
        .env(format!("AR_{lower}"), format!("{prefix}-ar"));
    }
}

/// Makes sure the cross gcc for each target is installed.
pub fn ensure_toolchains(targets: &[&LinuxTarget]) -> Result<()> {
    let wanted: Vec<(String, &str)> = targets
        .iter()
        .filter_map(|t| t.gcc_prefix.map(|p| (format!("{p}-gcc"), t.gcc_package)))
        .collect();
    let wanted: Vec<(&str, &str)> = wanted.iter().map(|(b, p)| (b.as_str(), *p)).collect();
    crate::setup::ensure_packages(&wanted)
}

/// Builds the bare `cairn` binary (no `sim` feature) for `target` with cargo profile `profile`
/// and returns its path.
/// All builds share the workspace's `target/` directory, so build scripts and proc macros
/// are compiled once per profile, not once per target.
pub fn build_cairn(target: &LinuxTarget, profile: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(util::root()).args([
        "build",
        "--locked",
        "-p",
        "cairn-gateway",
        "--bin",
        "cairn",
        "--no-default-features",
        "--profile",
        profile,
        "--target",
        target.triple,
    ]);
    if target.pointer_width == 32 {
        // base2histogram 0.2.3 (openraft's runtime-stats histograms) shifts a `usize` where
        // it means `u64`, which overflows on 32-bit targets: with overflow checks (dev
        // builds) the node panics at start-up; release builds, what ships, wrap (only
        // openraft's internal latency histograms are affected). Build it the way it ships.
        cmd.arg("--config").arg(format!(
            "profile.{profile}.package.base2histogram.overflow-checks=false"
        ));
    }
    target.cross_env(&mut cmd);
    util::run(&mut cmd)?;
    // Cargo names the output directory of the built-in `dev` profile `debug`.
    let dir = if profile == "dev" { "debug" } else { profile };
    let binary = util::root()
        .join("target")
        .join(target.triple)
        .join(dir)
        .join("cairn");
    if !binary.is_file() {
        bail!("cargo reported success but {} is missing", binary.display());
    }
    Ok(binary)
}

/// Crates the bare daemon must not link: the device client and its host time driver come
/// only with the `sim` feature.
const NOT_IN_BARE_DAEMON: [&str; 3] = ["cairn-firmware", "cairn-sim", "embassy-time"];

/// Checks that cairn-gateway without default features depends on none of
/// [`NOT_IN_BARE_DAEMON`] and that it lints clean that way (code behind `sim` leaves nothing
/// unused).
pub fn check_bare_daemon() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = util::output(Command::new(cargo).current_dir(util::root()).args([
        "tree",
        "--locked",
        "-p",
        "cairn-gateway",
        "--no-default-features",
        "-e",
        "normal",
        "--prefix",
        "none",
    ]))?;
    let linked: Vec<&str> = tree
        .lines()
        .filter(|line| {
            let name = line.split_whitespace().next().unwrap_or("");
            NOT_IN_BARE_DAEMON.contains(&name)
        })
        .collect();
    if !linked.is_empty() {
        bail!("cairn-gateway --no-default-features depends on {linked:?}");
    }
    util::cargo(&[
        "clippy",
        "-p",
        "cairn-gateway",
        "--no-default-features",
        "--",
        "-D",
        "warnings",
    ])
}

/// The output directory of `cargo xtask dist`.
pub fn out_dir() -> PathBuf {
    util::root().join("target").join("dist")
}

const HELP: &str = "\
cargo xtask dist [--target TRIPLE]...

Builds `cairn` with the `dist` profile (opt-level s, fat LTO, one codegen unit, stripped,
panic=abort) and without the `sim` feature (no `cairn sim`), and a Debian package per target
into target/dist/. Without --target, all of:
  aarch64-unknown-linux-gnu (arm64), armv7-unknown-linux-gnueabihf (armhf),
  x86_64-unknown-linux-gnu (amd64)
";

/// `cargo xtask dist [--target TRIPLE]...`
pub fn run(args: &[String]) -> Result<()> {
    let mut targets: Vec<&LinuxTarget> = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--target" => {
                let triple = args.next().context("--target needs a triple")?;
                let target = TARGETS
                    .iter()
                    .find(|t| t.triple == triple || t.deb_arch == triple)
                    .with_context(|| format!("unknown target `{triple}`\n\n{HELP}"))?;
                targets.push(target);
            }
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n\n{HELP}"),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }

    step("dist: toolchains", || ensure_toolchains(&targets))?;
    let out = out_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut rows = Vec::new();
    for target in &targets {
        let mut binary = PathBuf::new();
        step(&format!("dist: build {}", target.triple), || {
            let built = build_cairn(target, "dist")?;
            binary = out.join(format!("cairn-{}", target.triple));
            std::fs::copy(&built, &binary)
                .with_context(|| format!("copying {} to {}", built.display(), binary.display()))?;
            Ok(())
        })?;
        let mut package = PathBuf::new();
        step(&format!("dist: package {}", target.deb_arch), || {
            package = crate::deb::build(target, &binary, &out, crate::deb::Compression::Xz)?;
            crate::deb::verify(&package)
        })?;
        rows.push((
            target.triple,
            file_size(&binary)?,
            package.clone(),
            file_size(&package)?,
        ));
    }

    println!("\n{:<32} {:>12}  package", "target", "binary");
    for (triple, bin_size, package, deb_size) in rows {
        let name = package.file_name().unwrap_or_default().to_string_lossy();
        println!(
            "{triple:<32} {:>12}  {name} ({})",
            human(bin_size),
            human(deb_size)
        );
    }
    println!("in {}", out.display());
    Ok(())
}

pub fn file_size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .len())
}

/// `1234567` -> `"1205.6 KiB (1234567 B)"`.
pub fn human(bytes: u64) -> String {
    format!("{:.1} KiB ({bytes} B)", bytes as f64 / 1024.0)
}
