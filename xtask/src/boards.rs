//! Building the board packages under `boards/`. Each is its own cargo project (own
//! target, `.cargo/config.toml`, `Cargo.lock` and `target/`), so cargo runs inside the
//! board's directory, where its config applies.

use crate::util::{root, run};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A board package: `boards/<dir>/`, binary `cairn-board-<dir>`.
pub struct Board {
    pub dir: &'static str,
    pub target: &'static str,
}

pub const QEMU: Board = Board {
    dir: "qemu-mps2-an386",
    target: "thumbv7em-none-eabihf",
};

pub const NUCLEO: Board = Board {
    dir: "nucleo-h743zi",
    target: "thumbv7em-none-eabihf",
};

pub const RP2040: Board = Board {
    dir: "rp2040-w5500",
    target: "thumbv6m-none-eabi",
};

/// Every package under `boards/` (the workspace's `cargo fmt` and tests do not reach them).
pub const PACKAGES: &[&str] = &[
    "app",
    "host",
    "qemu-mps2-an386",
    "nucleo-h743zi",
    "rp2040-w5500",
];

/// `cargo` (the one running xtask) in `dir`, where that package's `.cargo/config.toml` applies.
pub fn cargo_in(dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(dir);
    cmd
}

/// `cargo fmt --check` in every board package, and the shared app's unit tests.
pub fn check_sources() -> Result<()> {
    for package in PACKAGES {
        let dir = root().join("boards").join(package);
        run(cargo_in(&dir).args(["fmt", "--", "--check"]))
            .with_context(|| format!("boards/{package} is not formatted (cargo fmt there)"))?;
    }
    run(cargo_in(&root().join("boards/app")).args(["test", "--quiet"]))
}

/// The firmware boards, in the order tables list them.
pub const FIRMWARE_BOARDS: &[&Board] = &[&QEMU, &NUCLEO, &RP2040];

impl Board {
    pub fn path(&self) -> PathBuf {
        root().join("boards").join(self.dir)
    }

    pub fn elf(&self) -> PathBuf {
        self.path()
            .join("target")
            .join(self.target)
            .join("release")
            .join(format!("cairn-board-{}", self.dir))
    }

    /// `cargo build --release` with exactly `features` (no default features) and the
    /// given `CAIRN_*` settings; returns the ELF.
    pub fn build(&self, features: &[&str], env: &[(&str, &str)]) -> Result<PathBuf> {
        let mut cmd = cargo_in(&self.path());
        cmd.args(["build", "--release", "--quiet", "--no-default-features"]);
        if !features.is_empty() {
            cmd.args(["--features", &features.join(",")]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(&mut cmd).with_context(|| format!("building boards/{}", self.dir))?;
        Ok(self.elf())
    }
}
