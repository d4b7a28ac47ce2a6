//! Installs what the tests need on a Debian machine, using sudo only when not root.
//! Rust targets come from `rust-toolchain.toml` (rustup installs them on first use).

use crate::util::{have, run as exec, step};
use anyhow::Result;
use std::process::Command;

/// (program that proves the package is there, Debian package)
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-arm", "qemu-system-arm"),
    ("qemu-aarch64", "qemu-user"),
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    ("arm-none-eabi-size", "binutils-arm-none-eabi"),
    ("iptables", "iptables"),
    ("ip", "iproute2"),
];

pub fn run_setup() -> Result<()> {
    ensure_packages(PACKAGES)?;
    // Make sure the pinned toolchain and its targets are installed.
    exec(
        Command::new("rustup")
            .args(["toolchain", "install"])
            .current_dir(crate::util::root()),
    )?;
    Ok(())
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
