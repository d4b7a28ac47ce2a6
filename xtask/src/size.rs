//! `cargo xtask size`: flash and static RAM of every firmware board, built as the network
//! skeleton (no Cairn client) and with the client, so Cairn's own cost shows as a delta.
//!
//! Flash = `text` (code, read-only data, vector table) + `data` (its initial values live in
//! flash too); static RAM = `data` + `bss`, as `arm-none-eabi-size` reports them for the
//! release ELF (opt-level "s", fat LTO, codegen-units 1). Stacks and heap are not included
//! (there is no heap). Boards without a `flash-outbox` feature skip that row (see the
//! board READMEs for why).

use crate::boards::{Board, FIRMWARE_BOARDS};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

/// A build of a board with a set of its cargo features.
struct Variant {
    name: &'static str,
    features: &'static [&'static str],
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "skeleton (no client)",
        features: &[],
    },
    Variant {
        name: "client",
        features: &["client"],
    },
    Variant {
        name: "client + flash-outbox",
        features: &["client", "flash-outbox"],
    },
];

#[derive(Clone, Copy)]
struct Size {
    text: u64,
    data: u64,
    bss: u64,
}

impl Size {
    fn flash(self) -> u64 {
        self.text + self.data
    }
    fn ram(self) -> u64 {
        self.data + self.bss
    }
}

pub fn run_command(_args: &[String]) -> Result<()> {
    let mut rows = Vec::new();
    for board in FIRMWARE_BOARDS {
        let mut baseline = None;
        for variant in VARIANTS {
            if !variant.features.iter().all(|f| has_feature(board, f)) {
                continue;
            }
            println!("building boards/{} ({})", board.dir, variant.name);
            let elf = board.build(variant.features, &[])?;
            let size = measure(&elf)?;
            let base = *baseline.get_or_insert(size);
            rows.push(format!(
                "| {} | {} | {} | {} | {:+} | {:+} |",
                board.dir,
                variant.name,
                size.flash(),
                size.ram(),
                size.flash() as i64 - base.flash() as i64,
                size.ram() as i64 - base.ram() as i64,
            ));
        }
    }
    println!();
    println!(
        "The client's RAM outbox is {} B of its static RAM (`OUTBOX_BYTES`, boards/app/src/client.rs);",
        outbox_bytes()?
    );
    println!("the skeleton has the same TCP socket buffers, so the deltas are Cairn's own cost.");
    println!();
    println!(
        "| board | build | flash (B) | static RAM (B) | Δ flash vs skeleton | Δ RAM vs skeleton |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

/// The outbox size the app is built with, read from its source (one place to change it).
fn outbox_bytes() -> Result<u64> {
    let path = crate::util::root().join("boards/app/src/client.rs");
    let source = std::fs::read_to_string(&path)?;
    source
        .lines()
        .find_map(|l| l.strip_prefix("pub const OUTBOX_BYTES: usize = "))
        .and_then(|v| v.trim_end_matches(';').replace('_', "").parse().ok())
        .with_context(|| {
            format!(
                "no `pub const OUTBOX_BYTES: usize = N;` in {}",
                path.display()
            )
        })
}

/// Whether the board's Cargo.toml declares `feature`.
fn has_feature(board: &Board, feature: &str) -> bool {
    std::fs::read_to_string(board.path().join("Cargo.toml"))
        .map(|manifest| {
            manifest
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{feature} =")))
        })
        .unwrap_or(false)
}

fn measure(elf: &Path) -> Result<Size> {
    let out = Command::new("arm-none-eabi-size")
        .arg(elf)
        .output()
        .context(
            "cannot run arm-none-eabi-size (cargo xtask setup installs binutils-arm-none-eabi)",
        )?;
    if !out.status.success() {
        bail!(
            "arm-none-eabi-size {}: {}",
            elf.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Berkeley format: a header line, then "text data bss dec hex filename".
    let text = String::from_utf8(out.stdout)?;
    let fields: Vec<u64> = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected arm-none-eabi-size output: {text}"))?;
    let [text, data, bss] = fields[..] else {
        bail!("unexpected arm-none-eabi-size output: {text}");
    };
    Ok(Size { text, data, bss })
}
