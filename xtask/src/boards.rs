//! Building the board packages under `boards/`. Each is its own cargo project (own
//! target, `.cargo/config.toml`, `Cargo.lock` and `target/`), so cargo runs inside the
//! board's directory, where its config applies.

use crate::util::{root, run};
use anyhow::{Context, Result};
use std::path::PathBuf;
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

/// `boards/host` (a Linux process; only its formatting is checked through `Board`).
pub const HOST_FMT: Board = Board {
    dir: "host",
    target: "",
};

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

    /// `cargo fmt --check` in the board's package (not part of the workspace's fmt run).
    pub fn fmt_check(&self) -> Result<()> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run(Command::new(cargo)
            .current_dir(self.path())
            .args(["fmt", "--", "--check"]))
    }

    /// `cargo build --release` with exactly `features` (no default features) and the
    /// given `CAIRN_*` settings; returns the ELF.
    pub fn build(&self, features: &[&str], env: &[(&str, &str)]) -> Result<PathBuf> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(self.path()).args([
            "build",
            "--release",
            "--quiet",
            "--no-default-features",
        ]);
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
