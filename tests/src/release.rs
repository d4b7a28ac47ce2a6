//! The previous release, built from source: what the rolling-upgrade test starts a cluster
//! on before replacing its binaries with the working tree's.
//!
//! The release is named by its commit ([`PREVIOUS_COMMIT`], tagged [`PREVIOUS_TAG`]): a
//! clean clone of main may not carry tags, but main's history always holds the commit. It is
//! checked out once with `git worktree add --detach` under `target/prev/<tag>/src` and built
//! in the dev profile into its own `target/prev/<tag>/target`, then reused. A missing commit
//! or a failed build fails the calling test; it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// v0.1.0: main when the upgrade issue started (format version 1).
pub const PREVIOUS_COMMIT: &str = "0b11d7aaca5bdc7eea088fafd3a198f2685b4ac2";
/// Its tag (informational: the commit is what is checked out).
pub const PREVIOUS_TAG: &str = "v0.1.0";

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn head_of(dir: &Path) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Path of the previous release's `cairn` binary, checked out and built on first use.
pub fn previous_release_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        let base = target.join("prev").join(PREVIOUS_TAG);
        let src = base.join("src");
        let out = base.join("target");
        let bin = out.join("debug").join("cairn");
        let stamp = base.join("built-commit");
        let built = std::fs::read_to_string(&stamp).ok();
        if bin.exists() && built.as_deref().map(str::trim) == Some(PREVIOUS_COMMIT) {
            return bin;
        }
        run(
            Command::new("git").arg("-C").arg(&root).args([
                "cat-file",
                "-e",
                &format!("{PREVIOUS_COMMIT}^{{commit}}"),
            ]),
            &format!(
                "finding the previous release's commit {PREVIOUS_COMMIT} ({PREVIOUS_TAG}) in \
                 the repository (fetch main's full history)"
            ),
        );
        std::fs::create_dir_all(&base).expect("creating target/prev");
        if head_of(&src).as_deref() != Some(PREVIOUS_COMMIT) {
            // A worktree left registered by an earlier, removed target dir is pruned first.
            run(
                Command::new("git")
                    .arg("-C")
                    .arg(&root)
                    .args(["worktree", "prune"]),
                "git worktree prune",
            );
            if src.join(".git").exists() {
                run(
                    Command::new("git").arg("-C").arg(&src).args([
                        "checkout",
                        "--detach",
                        PREVIOUS_COMMIT,
                    ]),
                    "checking out the previous release",
                );
            } else {
                run(
                    Command::new("git")
                        .arg("-C")
                        .arg(&root)
                        .args(["worktree", "add", "--detach"])
                        .arg(&src)
                        .arg(PREVIOUS_COMMIT),
                    "git worktree add of the previous release",
                );
            }
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "cairn-gateway", "--bin", "cairn"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", &out)
            .status()
            .expect("running cargo build for the previous release");
        assert!(status.success(), "building {PREVIOUS_TAG} failed");
        assert!(bin.exists(), "{} missing after build", bin.display());
        std::fs::write(&stamp, PREVIOUS_COMMIT).expect("writing the build stamp");
        bin
    })
    .clone()
}
