//! `cargo xtask template`: the board template (`firmware/template`) the way a newcomer uses
//! it. Each variant is copied to a temporary directory outside the repository, its
//! dependency lines (the ones firmware/README.md shows, `git = "https://example.invalid/cairn",
//! rev = "COMMIT"`) are pointed at this checkout (`git = "file://ROOT"`, `rev` = HEAD), and it
//! is built `--locked` against a Cargo.lock seeded from the project's own (the NUCLEO-H743ZI
//! board's for the F429 board, the workspace's for the host): only the Cairn packages may
//! be added to the seed, so the template builds with the versions the project tests. Then the
//! host variant runs against a real 3-node cluster (the cairn-tests harness) with a settings
//! file from `cairn device add --generate --provision-out`, and its records must be stored.
//!
//! Cargo reads a git dependency's workspace root inside the fetched repository, so
//! `cairn-firmware`'s `workspace = true` dependencies resolve there exactly as in the checkout.
//! The dependencies come from HEAD: commit before running this.

use crate::qemu_e2e::{cluster, provision_at, stored_rows};
use crate::util::{output, root, run, step};
use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The dependency source the template's (and firmware/README.md's) lines name.
const PLACEHOLDER: &str = r#"git = "https://example.invalid/cairn", rev = "COMMIT""#;
const DEVICE: u64 = 0x7e1;
const RECORDS: u64 = 20;

pub fn run_command() -> Result<()> {
    step(
        "template: out of tree, NUCLEO-F429ZI and host, host against a cluster",
        inner,
    )
}

/// A scratch directory outside the repository, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn inner() -> Result<()> {
    let root = root();
    let readme = std::fs::read_to_string(root.join("firmware/README.md"))?;
    ensure!(
        readme.contains(&format!("cairn-firmware = {{ {PLACEHOLDER}")),
        "firmware/README.md no longer shows the dependency line the template uses"
    );
    // rustfmt on the files (cargo fmt would resolve the placeholder dependency).
    let mut fmt = Command::new("rustfmt");
    fmt.args(["--edition", "2024", "--check"]);
    for file in ["board/src/main.rs", "board/src/fmt.rs", "host/src/main.rs"] {
        fmt.arg(root.join("firmware/template").join(file));
    }
    run(&mut fmt).context("firmware/template is not formatted (rustfmt --edition 2024)")?;
    let rev = output(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&root),
    )?
    .trim()
    .to_owned();
    let dirty = output(
        Command::new("git")
            .args([
                "status",
                "--porcelain",
                "--",
                "firmware",
                "protocol",
                "Cargo.toml",
            ])
            .current_dir(&root),
    )?;
    if !dirty.trim().is_empty() {
        println!(
            "template: note: uncommitted changes under firmware/ or protocol/ are not in HEAD {rev}"
        );
    }
    let scratch =
        Scratch(std::env::temp_dir().join(format!("cairn-template-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    std::fs::create_dir_all(&scratch.0)?;
    // Compiled dependencies are kept between runs (the project is not).
    let target = root.join("target/template");

    let started = Instant::now();
    let board = prepare(
        &root,
        &scratch.0,
        "board",
        &rev,
        &root.join("boards/nucleo-h743zi/Cargo.lock"),
    )?;
    run(cargo(&board, &target).args(["build", "--release", "--locked"]))
        .context("building the NUCLEO-F429ZI template out of tree")?;
    let elf = target.join("thumbv7em-none-eabihf/release/cairn-template-board");
    ensure!(elf.is_file(), "no ELF at {}", elf.display());
    if crate::util::have("arm-none-eabi-size") {
        let size = output(Command::new("arm-none-eabi-size").arg(&elf))?;
        println!(
            "template board (NUCLEO-F429ZI, release): {}",
            size.lines().nth(1).unwrap_or_default().trim()
        );
    }
    let board_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let host = prepare(&root, &scratch.0, "host", &rev, &root.join("Cargo.lock"))?;
    run(cargo(&host, &target).args(["build", "--locked"]))
        .context("building the host template out of tree")?;
    let host_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let cluster = cluster("template-host");
    // Includes building the debug `cairn` when it is stale (`cairn_bin`).
    let cluster_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let settings = scratch.0.join("device.bin");
    provision_at(&cluster, DEVICE, &settings, "127.0.0.1")?;
    let bin = target.join("debug/cairn-template-host");
    let out = Command::new(&bin)
        .arg(&settings)
        .arg(RECORDS.to_string())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    ensure!(
        out.status.success(),
        "the host template failed: {}",
        out.status
    );
    let rows = stored_rows(&cluster.nodes[cluster.leader()], DEVICE)?;
    let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    ensure!(
        seqs == (1..=RECORDS).collect::<Vec<_>>(),
        "stored seqs {seqs:?}, expected 1..={RECORDS}"
    );
    for r in &rows {
        let v: Vec<f64> = r.values.iter().filter_map(|v| v.as_f64()).collect();
        let n = (r.seq - 1) % 10;
        let want = [21.0 + n as f64 * 0.1, 45.0, 1013.25];
        ensure!(
            r.stream == 1 && v.len() == 3 && v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-3),
            "seq {}: stream {} values {:?}, the template pushes {want:?}",
            r.seq,
            r.stream,
            r.values
        );
    }
    let run_secs = started.elapsed().as_secs_f64();
    println!(
        "template: board build {:.1} min, host build {:.1} min, cluster start {cluster_secs:.1} s, \
         host run {run_secs:.1} s ({} records stored); {:.1} min in all",
        board_secs / 60.0,
        host_secs / 60.0,
        rows.len(),
        (board_secs + host_secs + cluster_secs + run_secs) / 60.0
    );
    Ok(())
}

/// `cargo` in `dir` with its own config, the shared target directory, and a git fetch that
/// works from a worktree checkout.
fn cargo(dir: &Path, target: &Path) -> Command {
    let mut cmd = crate::boards::cargo_in(dir);
    cmd.env("CARGO_TARGET_DIR", target)
        .env("CARGO_NET_GIT_FETCH_WITH_CLI", "true");
    cmd
}

/// Copies `firmware/template/VARIANT` into `scratch`, points its Cairn dependency at this
/// checkout and seeds its Cargo.lock from `seed`, completing it with the Cairn packages
/// (fetched from the checkout at `rev`) and nothing else.
fn prepare(root: &Path, scratch: &Path, variant: &str, rev: &str, seed: &Path) -> Result<PathBuf> {
    let dir = scratch.join(variant);
    copy_dir(&root.join("firmware/template").join(variant), &dir)?;
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)?;
    ensure!(
        text.contains(PLACEHOLDER),
        "{variant}/Cargo.toml has no `{PLACEHOLDER}` line"
    );
    let text = text.replace(
        PLACEHOLDER,
        &format!(r#"git = "file://{}", rev = "{rev}""#, root.display()),
    );
    std::fs::write(&manifest, text)?;
    std::fs::copy(seed, dir.join("Cargo.lock"))?;
    let target = root.join("target/template");
    run(cargo(&dir, &target).arg("fetch"))
        .with_context(|| format!("resolving the {variant} template"))?;
    let seeded = lock_packages(seed)?;
    let resolved = lock_packages(&dir.join("Cargo.lock"))?;
    for ((name, version), source) in &resolved {
        let from_registry = source.starts_with("registry+");
        if from_registry && !seeded.contains_key(&(name.clone(), version.clone())) {
            bail!(
                "the {variant} template resolves {name} {version}, which {} does not pin",
                seed.display()
            );
        }
        if !from_registry && !name.starts_with("cairn-") {
            bail!("the {variant} template pulls {name} from {source:?}");
        }
    }
    Ok(dir)
}

/// (name, version) -> source of every package in a Cargo.lock ("" for path packages).
fn lock_packages(lock: &Path) -> Result<BTreeMap<(String, String), String>> {
    let text = std::fs::read_to_string(lock)?;
    let mut packages = BTreeMap::new();
    for block in text.split("[[package]]").skip(1) {
        let field = |key: &str| {
            block.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|r| r.trim().strip_prefix('='))
                    .map(|v| v.trim().trim_matches('"').to_owned())
            })
        };
        let name = field("name ").context("package without a name")?;
        let version = field("version ").context("package without a version")?;
        packages.insert((name, version), field("source ").unwrap_or_default());
    }
    Ok(packages)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "target" {
            continue;
        }
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to.join(&name))?;
        } else {
            std::fs::copy(entry.path(), to.join(&name))?;
        }
    }
    Ok(())
}
