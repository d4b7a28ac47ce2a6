//! Debian packages of the `cairn` daemon, made with `dpkg-deb` alone.
//!
//! cargo-deb would first have to be compiled (minutes on two cores, every fresh CI
//! machine) and would add nothing a few files and `dpkg-deb --build --root-owner-group`
//! do not: the package tree is written here, the maintainer scripts, unit and default
//! configuration live in `packaging/`, and man pages come from the binary's own `--help`
//! (see [`crate::manpage`]). `Depends` is computed from the binary's ELF dynamic section
//! the way dpkg-shlibdeps would, which cannot run for foreign architectures here.

use crate::dist::LinuxTarget;
use crate::util::{self, have, output};
use anyhow::{Context, Result, bail};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const PACKAGE: &str = "cairn";
/// Debian revision of the package; bump when only the packaging changes.
const REVISION: &str = "1";
const MAINTAINER: &str = "Cairn maintainers <cairn@example.invalid>";
const HOMEPAGE: &str = "https://example.invalid/cairn";

/// Where the systemd unit goes (debhelper's location on Debian 12).
pub const UNIT_PATH: &str = "lib/systemd/system/cairn.service";
pub const CONFIG_PATH: &str = "etc/cairn/cairn.toml";

/// Files every package must contain (paths as `dpkg-deb --contents` prints them).
const EXPECTED: &[&str] = &[
    "./usr/bin/cairn",
    "./lib/systemd/system/cairn.service",
    "./usr/lib/sysusers.d/cairn.conf",
    "./etc/cairn/cairn.toml",
    "./usr/share/man/man1/cairn.1.gz",
    "./usr/share/man/man1/cairn-node.1.gz",
    "./usr/share/doc/cairn/copyright",
    "./usr/share/doc/cairn/changelog.Debian.gz",
];

/// The package version: the workspace version plus the Debian revision.
pub fn version() -> String {
    format!("{}-{REVISION}", env!("CARGO_PKG_VERSION"))
}

/// How `dpkg-deb` compresses the package's data.
#[derive(Clone, Copy)]
pub enum Compression {
    /// Smallest package, for release (`cargo xtask dist`).
    Xz,
    /// Ten times less CPU than xz, for packages that are only tested (`cargo xtask test`).
    Gzip,
}

/// Builds `cairn_<version>_<arch>.deb` for `binary` into `out_dir` and returns its path.
pub fn build(
    target: &LinuxTarget,
    binary: &Path,
    out_dir: &Path,
    compression: Compression,
) -> Result<PathBuf> {
    for tool in ["dpkg-deb", "gzip", "readelf", "strip", "md5sum"] {
        if !have(tool) {
            bail!("`{tool}` is needed to build Debian packages (dpkg, gzip, binutils, coreutils)");
        }
    }
    let packaging = util::root().join("packaging");
    let stage = out_dir.join(format!("deb-{}", target.deb_arch));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let version = version();
    let epoch = source_date_epoch();

    install(&stage, "usr/bin/cairn", &fs::read(binary)?, 0o755)?;
    // Policy wants stripped binaries; `dist` builds already are, test builds are not.
    let strip = match target.gcc_prefix {
        Some(prefix) => format!("{prefix}-strip"),
        None => "strip".into(),
    };
    util::run(
        Command::new(&strip)
            .args(["--remove-section=.comment", "--remove-section=.note"])
            .arg(stage.join("usr/bin/cairn")),
    )?;
    install(
        &stage,
        UNIT_PATH,
        &fs::read(packaging.join("cairn.service"))?,
        0o644,
    )?;
    install(
        &stage,
        "usr/lib/sysusers.d/cairn.conf",
        &fs::read(packaging.join("cairn.sysusers"))?,
        0o644,
    )?;
    install(
        &stage,
        CONFIG_PATH,
        &fs::read(packaging.join("cairn.toml"))?,
        0o644,
    )?;
    let date = date_utc(epoch, "%F")?;
    // Run the staged copy so clap's usage lines say `cairn`, whatever the file is called.
    let staged = stage.join("usr/bin/cairn");
    for page in crate::manpage::render_all(target, &staged, env!("CARGO_PKG_VERSION"), &date)? {
        install(
            &stage,
            &format!("usr/share/man/man1/{}.gz", page.file_name),
            &gzip(page.roff.as_bytes())?,
            0o644,
        )?;
    }
    install(
        &stage,
        "usr/share/doc/cairn/copyright",
        &fs::read(packaging.join("debian/copyright"))?,
        0o644,
    )?;
    install(
        &stage,
        "usr/share/lintian/overrides/cairn",
        &fs::read(packaging.join("debian/lintian-overrides"))?,
        0o644,
    )?;
    let changelog = format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\n  * Built by `cargo xtask dist`.\n\n -- {MAINTAINER}  {}\n",
        date_utc(epoch, "%a, %d %b %Y %H:%M:%S +0000")?
    );
    install(
        &stage,
        "usr/share/doc/cairn/changelog.Debian.gz",
        &gzip(changelog.as_bytes())?,
        0o644,
    )?;

    // Control area: md5sums is computed before DEBIAN/ exists so it lists data files only.
    let md5sums = md5sums(&stage)?;
    let installed_kib = tree_size(&stage)?.div_ceil(1024);
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Section: database\n\
         Priority: optional\n\
         Homepage: {HOMEPAGE}\n\
         Description: gateway daemon keeping device telemetry in a Raft quorum of SQLite replicas\n \
         Cairn runs on Linux gateway boards. Several boards form a Raft cluster, each\n \
         holding a SQLite replica; microcontroller devices push records over TCP and\n \
         keep them until a quorum has them on disk. Queries go over an\n \
         rqlite-compatible HTTP API.\n \
         .\n \
         This package ships the `cairn` binary, a hardened systemd unit running as\n \
         the `cairn` user with its data in /var/lib/cairn, and a commented default\n \
         configuration in /etc/cairn/cairn.toml.\n",
        arch = target.deb_arch,
        depends = depends(binary)?,
    );
    install(&stage, "DEBIAN/control", control.as_bytes(), 0o644)?;
    install(
        &stage,
        "DEBIAN/conffiles",
        format!("/{CONFIG_PATH}\n").as_bytes(),
        0o644,
    )?;
    install(&stage, "DEBIAN/md5sums", md5sums.as_bytes(), 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &stage,
            &format!("DEBIAN/{script}"),
            &fs::read(packaging.join("debian").join(script))?,
            0o755,
        )?;
    }

    let package = out_dir.join(format!("{PACKAGE}_{version}_{}.deb", target.deb_arch));
    util::run(
        Command::new("dpkg-deb")
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .args(["--build", "--root-owner-group"])
            .arg(match compression {
                Compression::Xz => "-Zxz",
                Compression::Gzip => "-Zgzip",
            })
            .arg(&stage)
            .arg(&package),
    )?;
    Ok(package)
}

/// Checks a built package: control fields, conffiles, the expected files with the right
/// modes; prints `--info` and `--contents`; runs lintian when it is installed.
pub fn verify(package: &Path) -> Result<()> {
    let info = output(Command::new("dpkg-deb").arg("--info").arg(package))?;
    let contents = output(Command::new("dpkg-deb").arg("--contents").arg(package))?;
    println!("{info}{contents}");

    let field = |name: &str| -> Result<String> {
        Ok(output(
            Command::new("dpkg-deb")
                .arg("--field")
                .arg(package)
                .arg(name),
        )?
        .trim()
        .to_string())
    };
    if field("Package")? != PACKAGE || field("Version")? != version() {
        bail!("{}: wrong Package or Version", package.display());
    }
    if !field("Depends")?.contains("libc6 (>= ") {
        bail!("{}: Depends lacks a versioned libc6", package.display());
    }
    let conffiles = output(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(package)
            .arg("conffiles"),
    )?;
    if conffiles.trim() != format!("/{CONFIG_PATH}") {
        bail!("{}: conffiles is {conffiles:?}", package.display());
    }
    for path in EXPECTED {
        let line = contents
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .with_context(|| format!("{} lacks {path}", package.display()))?;
        if !line.contains(" root/root ") {
            bail!("{}: {path} is not owned by root: {line}", package.display());
        }
        let mode = if *path == "./usr/bin/cairn" {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        if !line.starts_with(mode) {
            bail!("{}: {path} should be {mode}: {line}", package.display());
        }
    }
    let root = package.with_extension("verify");
    extract(package, &root)?;
    verify_unit(&root)?;
    fs::remove_dir_all(&root)?;
    if have("lintian") {
        // Errors fail the build; warnings and info are printed for whoever reads the log.
        util::run(
            Command::new("lintian")
                .args(["--fail-on", "error"])
                .arg(package),
        )?;
    } else {
        println!("(lintian not installed: skipped)");
    }
    Ok(())
}

/// Unpacks the data part of `package` into a fresh `dir`.
pub fn extract(package: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    util::run(Command::new("dpkg-deb").arg("-x").arg(package).arg(dir))
}

/// `systemd-analyze verify` on the packaged unit, pointed at the packaged binary (the tool
/// insists the ExecStart program exists). Any complaint, such as an unknown key, fails.
fn verify_unit(root: &Path) -> Result<()> {
    if !have("systemd-analyze") {
        println!("(systemd-analyze not installed: unit not verified)");
        return Ok(());
    }
    let unit = fs::read_to_string(root.join(UNIT_PATH))?;
    let binary = root.join("usr/bin/cairn");
    let unit = unit.replace(
        "ExecStart=/usr/bin/cairn",
        &format!("ExecStart={}", binary.display()),
    );
    let copy = root.join("cairn.service");
    fs::write(&copy, unit)?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .context("running systemd-analyze")?;
    let complaints = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !complaints.trim().is_empty() {
        bail!(
            "systemd-analyze verify {UNIT_PATH}: {}\n{complaints}",
            out.status
        );
    }
    Ok(())
}

/// `Depends:` from the binary's NEEDED libraries and the newest glibc symbol version it uses.
fn depends(binary: &Path) -> Result<String> {
    let dynamic = output(Command::new("readelf").arg("-d").arg(binary))?;
    let versions = output(Command::new("readelf").args(["-V", "-W"]).arg(binary))?;
    let glibc = versions
        .split(|c: char| c.is_whitespace() || c == ':')
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let parts: Option<Vec<u32>> = v.split('.').map(|p| p.parse().ok()).collect();
            parts
        })
        .max()
        .context("no GLIBC_ symbol versions: is this a glibc binary?")?;
    let glibc = glibc
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(".");
    let mut deps = vec![format!("libc6 (>= {glibc})")];
    for line in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
        let lib = line
            .split('[')
            .nth(1)
            .and_then(|s| s.split(']').next())
            .unwrap_or_default();
        match lib {
            "libc.so.6"
            | "libm.so.6"
            | "libpthread.so.0"
            | "libdl.so.2"
            | "librt.so.1"
            | "ld-linux-aarch64.so.1"
            | "ld-linux-armhf.so.3"
            | "ld-linux-x86-64.so.2" => {}
            "libgcc_s.so.1" => deps.push("libgcc-s1 (>= 3.0)".into()),
            other => bail!(
                "{} needs {other}: add its Debian package to xtask/src/deb.rs",
                binary.display()
            ),
        }
    }
    Ok(deps.join(", "))
}

/// Writes `contents` to `stage/rel` with `mode`, creating directories (0755) as needed.
pub fn install(stage: &Path, rel: &str, contents: &[u8], mode: u32) -> Result<()> {
    let path = stage.join(rel);
    let dir = path.parent().expect("package paths have a directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `gzip -9n`: maximum compression, no name or timestamp, as Debian policy asks for.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting gzip")?;
    let mut stdin = child.stdin.take().expect("piped");
    let data = data.to_vec();
    // Write from another thread so a full stdout pipe cannot deadlock us.
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    writer.join().expect("gzip writer thread")?;
    if !out.status.success() {
        bail!("gzip exited with {}", out.status);
    }
    Ok(out.stdout)
}

/// `md5sums` for every regular file under `stage` (relative paths, sorted).
fn md5sums(stage: &Path) -> Result<String> {
    let mut files = Vec::new();
    walk(stage, &mut files)?;
    files.sort();
    let rel: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(stage)
                .expect("under stage")
                .display()
                .to_string()
        })
        .collect();
    output(Command::new("md5sum").args(&rel).current_dir(stage))
}

/// Total size of the regular files under `dir`.
fn tree_size(dir: &Path) -> Result<u64> {
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.iter().map(|f| crate::dist::file_size(f)).sum()
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// The last commit's time, so rebuilding the same commit gives the same package.
pub fn source_date_epoch() -> u64 {
    if let Some(epoch) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return epoch;
    }
    Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(util::root())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Formats a Unix time with `date -u` (an RFC 2822 date is needed for the changelog).
fn date_utc(epoch: u64, format: &str) -> Result<String> {
    Ok(output(
        Command::new("date")
            .env("LC_ALL", "C")
            .arg("-u")
            .arg("-d")
            .arg(format!("@{epoch}"))
            .arg(format!("+{format}")),
    )?
    .trim()
    .to_string())
}
