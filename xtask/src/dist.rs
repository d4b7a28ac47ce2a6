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
//!
//! For gateways without Debian (OpenWrt and other musl or busybox systems) `dist` also builds
//! fully static musl binaries for aarch64 and armv7:
//!
//! ```text
//! target/dist/cairn-<triple>             static, stripped (aarch64-unknown-linux-musl, ...)
//! target/dist/cairn-<version>-<triple>.tar.gz   that binary, an OpenWrt init script, the config
//! ```
//!
//! Debian has no musl cross compiler (musl-tools targets the host only), so these link with
//! cargo-zigbuild, which drives `zig cc` (from the `ziglang` Python package) as C compiler
//! for the bundled SQLite and ring and as linker against zig's own musl. Setup installs both
//! from PyPI. Where the Rust toolchain's distribution offers no prebuilt standard library
//! for a target ([`std_from_source`]), it is built from the `rust-src` component.

use crate::util::{self, step};
use anyhow::{Context, Result, bail, ensure};
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
    /// qemu-user program that runs the binary on an x86_64 host, with the sysroot for `-L`
    /// (empty for static binaries, which load nothing).
    pub qemu: Option<(&'static str, &'static str)>,
    /// Static musl binary linked by cargo-zigbuild (no Debian package: a tarball).
    pub musl: bool,
}

pub const X86_64: LinuxTarget = LinuxTarget {
    triple: "x86_64-unknown-linux-gnu",
    deb_arch: "amd64",
    gcc_prefix: None,
    gcc_package: "gcc",
    pointer_width: 64,
    qemu: None,
    musl: false,
};

pub const AARCH64: LinuxTarget = LinuxTarget {
    triple: "aarch64-unknown-linux-gnu",
    deb_arch: "arm64",
    gcc_prefix: Some("aarch64-linux-gnu"),
    gcc_package: "gcc-aarch64-linux-gnu",
    pointer_width: 64,
    qemu: Some(("qemu-aarch64", "/usr/aarch64-linux-gnu")),
    musl: false,
};

pub const ARMV7: LinuxTarget = LinuxTarget {
    triple: "armv7-unknown-linux-gnueabihf",
    deb_arch: "armhf",
    gcc_prefix: Some("arm-linux-gnueabihf"),
    gcc_package: "gcc-arm-linux-gnueabihf",
    pointer_width: 32,
    qemu: Some(("qemu-arm", "/usr/arm-linux-gnueabihf")),
    musl: false,
};

/// Static aarch64 binary for gateways without Debian (OpenWrt on 64-bit ARM boards).
pub const AARCH64_MUSL: LinuxTarget = LinuxTarget {
    triple: "aarch64-unknown-linux-musl",
    deb_arch: "arm64",
    gcc_prefix: None,
    gcc_package: "",
    pointer_width: 64,
    qemu: Some(("qemu-aarch64", "")),
    musl: true,
};

/// Static ARMv7 hard-float binary for gateways without Debian (OpenWrt on 32-bit ARM).
pub const ARMV7_MUSL: LinuxTarget = LinuxTarget {
    triple: "armv7-unknown-linux-musleabihf",
    deb_arch: "armhf",
    gcc_prefix: None,
    gcc_package: "",
    pointer_width: 32,
    qemu: Some(("qemu-arm", "")),
    musl: true,
};

pub const TARGETS: [&LinuxTarget; 5] = [&AARCH64, &ARMV7, &X86_64, &AARCH64_MUSL, &ARMV7_MUSL];

impl LinuxTarget {
    /// A command that runs `binary` (built for this target) on the build machine: directly
    /// for the host, under qemu-user with the Debian cross sysroot for ARM.
    pub fn runner(&self, binary: &Path) -> Command {
        match self.qemu {
            None => Command::new(binary),
            Some((qemu, sysroot)) => {
                let mut cmd = Command::new(qemu);
                if !sysroot.is_empty() {
                    cmd.arg("-L").arg(sysroot);
                }
                cmd.arg(binary);
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

/// Makes sure the cross gcc for each target is installed, and cargo-zigbuild with zig for
/// the musl targets.
pub fn ensure_toolchains(targets: &[&LinuxTarget]) -> Result<()> {
    if targets.iter().any(|t| t.musl) {
        crate::setup::ensure_zigbuild()?;
    }
    let wanted: Vec<(String, &str)> = targets
        .iter()
        .filter_map(|t| t.gcc_prefix.map(|p| (format!("{p}-gcc"), t.gcc_package)))
        .collect();
    let wanted: Vec<(&str, &str)> = wanted.iter().map(|(b, p)| (b.as_str(), *p)).collect();
    crate::setup::ensure_packages(&wanted)
}

/// Builds the bare `cairn` binary (no `sim` feature) for `target` with cargo profile `profile`
/// and returns its path.
pub fn build_cairn(target: &LinuxTarget, profile: &str) -> Result<PathBuf> {
    Ok(build_cairns(&[target], profile)?.remove(0))
}

/// Builds the bare `cairn` binary for each of `targets` with cargo profile `profile` in one
/// cargo run and returns their paths, in order: on two cores the end of one target's build,
/// where the gateway crate compiles alone on one core, overlaps with the other's. The
/// targets must link the same way (gcc or zig, prebuilt std or std from source).
/// All builds share the workspace's `target/` directory, so build scripts and proc macros
/// are compiled once per profile, not once per target (but for a target whose std is built
/// from source: see below).
pub fn build_cairns(targets: &[&LinuxTarget], profile: &str) -> Result<Vec<PathBuf>> {
    let how =
        |t: &LinuxTarget| -> Result<(bool, bool)> { Ok((t.musl, t.musl && std_from_source(t)?)) };
    let Some(first) = targets.first() else {
        return Ok(Vec::new());
    };
    let (musl, from_source) = how(first)?;
    for t in targets {
        ensure!(
            how(t)? == (musl, from_source),
            "{} and {} link differently: build them in separate runs",
            first.triple,
            t.triple
        );
    }
    build_group(targets, musl, from_source, profile)
}

/// One cargo run building `cairn` for `targets`, which all link the same way.
fn build_group(
    targets: &[&LinuxTarget],
    musl: bool,
    std_from_source: bool,
    profile: &str,
) -> Result<Vec<PathBuf>> {
    let mut target_dir: PathBuf = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| util::root().join("target"));
    let mut cmd = if musl {
        // `cargo-zigbuild zigbuild ARGS` is `cargo build ARGS` with zig as `CC`, `AR` and
        // linker for the target; it runs the `cargo` named by `CARGO` (the pinned toolchain's).
        let mut cmd = Command::new(crate::setup::cargo_zigbuild()?);
        cmd.arg("zigbuild");
        if std_from_source {
            // This toolchain's distribution has no prebuilt std for the target: build it from
            // rust-src with the rest (an unstable cargo flag, hence RUSTC_BOOTSTRAP). Its
            // self-contained start files and libunwind come with the prebuilt std only, so
            // zig's musl supplies them (`link-self-contained=no`).
            // RUSTC_BOOTSTRAP changes the fingerprint of every unit, the host's build scripts
            // and proc macros too: in the shared `target/` the other builds and this one
            // would rebuild each other's in turn. This one gets its own directory.
            target_dir = target_dir.join("std-from-source");
            cmd.env("RUSTC_BOOTSTRAP", "1")
                .env("CARGO_TARGET_DIR", &target_dir)
                .arg("-Zbuild-std=std,panic_abort");
            for t in targets {
                let upper = t.triple.to_uppercase().replace('-', "_");
                cmd.env(
                    format!("CARGO_TARGET_{upper}_RUSTFLAGS"),
                    "-C link-self-contained=no",
                );
            }
        }
        cmd
    } else {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.arg("build");
        cmd
    };
    cmd.current_dir(util::root()).args([
        "--locked",
        "-p",
        "cairn-gateway",
        "--bin",
        "cairn",
        "--no-default-features",
        "--profile",
        profile,
    ]);
    for t in targets {
        cmd.args(["--target", t.triple]);
        t.cross_env(&mut cmd);
    }
    if targets.iter().any(|t| t.pointer_width == 32) {
        // base2histogram 0.2.3 (openraft's runtime-stats histograms) shifts a `usize` where
        // it means `u64`, which overflows on 32-bit targets: with overflow checks (dev
        // builds) the node panics at start-up; release builds, what ships, wrap (only
        // openraft's internal latency histograms are affected). Build it the way it ships
        // (for every target of the run: cargo's config is not per target).
        cmd.arg("--config").arg(format!(
            "profile.{profile}.package.base2histogram.overflow-checks=false"
        ));
    }
    util::run(&mut cmd)?;
    // Cargo names the output directory of the built-in `dev` profile `debug`.
    let dir = if profile == "dev" { "debug" } else { profile };
    targets
        .iter()
        .map(|t| {
            let binary = target_dir.join(t.triple).join(dir).join("cairn");
            if !binary.is_file() {
                bail!("cargo reported success but {} is missing", binary.display());
            }
            Ok(binary)
        })
        .collect()
}

/// True when the pinned toolchain has no prebuilt standard library for `target` installed
/// (setup installs it where the distribution offers one, `rust-src` otherwise).
pub fn std_from_source(target: &LinuxTarget) -> Result<bool> {
    let installed = util::output(
        Command::new("rustup")
            .args(["target", "list", "--installed"])
            .current_dir(util::root()),
    )?;
    Ok(!installed.lines().any(|l| l.trim() == target.triple))
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
panic=abort) and without the `sim` feature (no `cairn sim`), and a Debian package per glibc
target or a tarball per static musl target (for OpenWrt and other gateways without Debian)
into target/dist/. Without --target, all of:
  aarch64-unknown-linux-gnu (arm64), armv7-unknown-linux-gnueabihf (armhf),
  x86_64-unknown-linux-gnu (amd64),
  aarch64-unknown-linux-musl, armv7-unknown-linux-musleabihf (static, cargo-zigbuild)
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
                    .find(|t| t.triple == triple || (!t.musl && t.deb_arch == triple))
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
        if target.musl {
            step(&format!("dist: tarball {}", target.triple), || {
                package = tarball(target, &binary, &out)?;
                Ok(())
            })?;
        } else {
            step(&format!("dist: package {}", target.deb_arch), || {
                package = crate::deb::build(target, &binary, &out, crate::deb::Compression::Xz)?;
                crate::deb::verify(&package)
            })?;
        }
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

/// Where the OpenWrt tarball's configuration keeps the data: persistent storage (OpenWrt's
/// `/var` is RAM); the README says to point it at an eMMC, SSD or USB mount.
const OPENWRT_DATA_DIR: &str = "/srv/cairn";

/// `cairn-<version>-<triple>.tar.gz` for a gateway without Debian, unpacked at `/`:
/// `usr/bin/cairn` (the static binary), `etc/init.d/cairn` (OpenWrt's procd script from
/// `packaging/openwrt/`) and `etc/cairn/cairn.toml` (the packages' configuration with
/// `data_dir` on persistent storage). Reproducible: sorted, root-owned, the last commit's time.
fn tarball(target: &LinuxTarget, binary: &Path, out: &Path) -> Result<PathBuf> {
    let stage = out.join(format!("tar-{}", target.triple));
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let packaging = util::root().join("packaging");
    crate::deb::install(&stage, "usr/bin/cairn", &std::fs::read(binary)?, 0o755)?;
    crate::deb::install(
        &stage,
        "etc/init.d/cairn",
        &std::fs::read(packaging.join("openwrt/cairn.init"))?,
        0o755,
    )?;
    let config = std::fs::read_to_string(packaging.join("cairn.toml"))?;
    let debian_dir = "data_dir = \"/var/lib/cairn\"";
    if !config.contains(debian_dir) {
        bail!("packaging/cairn.toml no longer sets `{debian_dir}`: update xtask/src/dist.rs");
    }
    let config = config.replace(
        debian_dir,
        &format!(
            "# OpenWrt keeps /var in RAM: use persistent storage, best an eMMC, SSD or USB\n\
             # mount rather than the flash overlay (every acknowledged record is fsync'd).\n\
             data_dir = \"{OPENWRT_DATA_DIR}\""
        ),
    );
    crate::deb::install(&stage, "etc/cairn/cairn.toml", config.as_bytes(), 0o644)?;
    let tarball = out.join(format!(
        "{}-{}-{}.tar.gz",
        crate::deb::PACKAGE,
        env!("CARGO_PKG_VERSION"),
        target.triple
    ));
    util::run(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg(format!("--mtime=@{}", crate::deb::source_date_epoch()))
            .args(["--use-compress-program", "gzip -9n", "-cf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&stage)
            .args(["usr", "etc"]),
    )?;
    let listing = util::output(Command::new("tar").arg("-tvzf").arg(&tarball))?;
    println!("{listing}");
    for path in ["usr/bin/cairn", "etc/init.d/cairn", "etc/cairn/cairn.toml"] {
        if !listing.lines().any(|l| l.ends_with(&format!(" {path}"))) {
            bail!("{} lacks {path}", tarball.display());
        }
    }
    std::fs::remove_dir_all(&stage)?;
    Ok(tarball)
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
