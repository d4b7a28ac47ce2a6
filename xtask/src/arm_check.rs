//! The ARM gateway check in `cargo xtask test`: the real `cairn` daemon, cross-compiled,
//! packaged and run under qemu-user.
//!
//! - aarch64: the binary and default config come out of the arm64 `.deb` (so the package
//!   is what gets tested). A one-node cluster bootstraps with a temp data dir; SQL goes in
//!   and comes out over HTTP; a device is registered with the emulated `cairn device add`;
//!   a host `cairn sim` fleet pushes records to it and each acknowledged record is queried;
//!   the node is killed with SIGKILL and started again with the same command line (as
//!   systemd would), and the rows and the device must still be there; SIGTERM then stops
//!   it cleanly (exit status 0).
//! - armv7: `--help` answers and `node` bootstraps and serves a query.
//! - the static musl binaries (aarch64, armv7) for gateways without Debian: `file` must call
//!   them statically linked (qemu-user then runs them without any sysroot), `--help`
//!   answers, and `node` bootstraps and serves a write and a read over HTTP on loopback.
//!
//! The emulated nodes run through the test harness's launcher ([`Cluster`] with a qemu-user
//! [`Options::launcher`]); requests go through its HTTP client.
//!
//! A fresh-machine `cargo xtask test` should stay under 50 minutes on two cores, so these
//! builds use [`TEST_PROFILE`] rather than the `dist` profile (see its doc for the
//! measurements behind the choice), and the two gcc targets build in one cargo run. Measured
//! on a fresh clone (`33ccfaf`, this machine): the four cross builds take 295 s (aarch64 and
//! armv7 gnu together) + 161 s (aarch64 musl) + 213 s (armv7 musl, std from source) of a
//! 45-minute run.

use crate::dist::{self, AARCH64, AARCH64_MUSL, ARMV7, ARMV7_MUSL, LinuxTarget};
use crate::util::{self, step};
use anyhow::{Context, Result, ensure};
use cairn_tests::device::{sim_command, sim_summary};
use cairn_tests::{Cluster, Node, Options, get, poll, stmts};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Cargo profile of the emulated builds.
pub const TEST_PROFILE: &str = "dev";

/// How long a node under qemu may take to elect itself and answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// `cargo xtask arm [--musl]`: the whole ARM step, or (`--musl`) only its static musl part.
pub fn run_command(args: &[String]) -> Result<()> {
    match args {
        [] => run(),
        [flag] if flag == "--musl" => {
            let work = work_dir()?;
            run_musl(&work)
        }
        _ => anyhow::bail!("usage: cargo xtask arm [--musl]"),
    }
}

/// A fresh `target/xtask-arm` for the emulated nodes' data and logs.
fn work_dir() -> Result<PathBuf> {
    let work = crate::util::root().join("target").join("xtask-arm");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    Ok(work)
}

pub fn run() -> Result<()> {
    let mut binaries = Vec::new();
    step("arm: cross toolchains", || {
        dist::ensure_toolchains(&[&AARCH64, &ARMV7])
    })?;
    step(
        &format!(
            "arm: build {} and {} ({TEST_PROFILE})",
            AARCH64.triple, ARMV7.triple
        ),
        || {
            binaries = dist::build_cairns(&[&AARCH64, &ARMV7], TEST_PROFILE)?;
            Ok(())
        },
    )?;
    let work = work_dir()?;

    let root = work.join("arm64-root");
    step("arm: package arm64", || {
        let package =
            crate::deb::build(&AARCH64, &binaries[0], &work, crate::deb::Compression::Gzip)?;
        crate::deb::verify(&package)?;
        crate::deb::extract(&package, &root)
    })?;
    let mut host_cairn = PathBuf::new();
    step("arm: host cairn (for cairn sim)", || {
        // The plain host build (target/debug), which the workspace tests have already built;
        // `--target x86_64-...` would compile the whole gateway a second time.
        util::cargo(&["build", "--locked", "-p", "cairn-gateway", "--bin", "cairn"])?;
        host_cairn = util::root().join("target/debug/cairn");
        Ok(())
    })?;
    step(
        "arm: aarch64 node under qemu (sim, kill -9, restart)",
        || aarch64_node(&root, &work, &host_cairn),
    )?;
    step("arm: armv7 --help and node under qemu", || {
        help_and_sql(&ARMV7, &binaries[1], &work)
    })?;
    run_musl(&work)
}

/// The static musl binaries for gateways without Debian, built with cargo-zigbuild: each
/// must be static, answer `--help` and serve SQL under qemu-user without a sysroot.
fn run_musl(work: &Path) -> Result<()> {
    step("arm: cargo-zigbuild and zig", || {
        dist::ensure_toolchains(&[&AARCH64_MUSL, &ARMV7_MUSL])
    })?;
    for target in [&AARCH64_MUSL, &ARMV7_MUSL] {
        let mut binary = PathBuf::new();
        step(
            &format!("arm: build {} ({TEST_PROFILE})", target.triple),
            || {
                binary = dist::build_cairn(target, TEST_PROFILE)?;
                Ok(())
            },
        )?;
        step(
            &format!("arm: static {} under qemu (no sysroot)", target.triple),
            || {
                check_static(&binary)?;
                help_and_sql(target, &binary, work)
            },
        )?;
    }
    Ok(())
}

/// `file` must call `binary` statically linked: no interpreter, no shared library to find on
/// a gateway that has neither glibc nor Debian.
fn check_static(binary: &Path) -> Result<()> {
    let description = util::output(std::process::Command::new("file").arg("-b").arg(binary))?;
    println!("file: {}", description.trim());
    ensure!(
        description.contains("statically linked") && !description.contains("interpreter"),
        "{} is not a static binary: {description}",
        binary.display()
    );
    Ok(())
}

/// A one-node cluster of `binary` under qemu-user, data and `node.log` in `dir`. Its
/// `--bootstrap` stays on the command line across restarts, as in a config file: a node
/// that already holds a cluster must ignore it.
fn emulated_node(
    target: &'static LinuxTarget,
    binary: &Path,
    config: Option<PathBuf>,
    dir: PathBuf,
) -> Cluster {
    let binary = binary.to_path_buf();
    let extra = config
        .map(|c| vec!["--config".to_string(), c.display().to_string()])
        .unwrap_or_default();
    let cluster = Cluster::start_with(
        1,
        Options {
            launcher: Some(Arc::new(move || target.runner(&binary))),
            extra,
            dir: Some(dir),
            timeout: Some(READY_TIMEOUT),
            ..Options::default()
        },
    );
    println!("node ready: {}", cluster.nodes[0].url(""));
    cluster
}

/// One-node cluster from the unpacked arm64 package: write, read, SIGKILL, restart, read.
fn aarch64_node(root: &Path, work: &Path, host_cairn: &Path) -> Result<()> {
    let binary = root.join("usr/bin/cairn");
    let config = root.join(crate::deb::CONFIG_PATH);
    let mut c = emulated_node(&AARCH64, &binary, Some(config), work.join("aarch64"));
    execute(
        &c,
        &[
            "CREATE TABLE readings (id INTEGER PRIMARY KEY, sensor TEXT NOT NULL, value REAL)",
            "INSERT INTO readings (sensor, value) VALUES ('t1', 21.5)",
            "INSERT INTO readings (sensor, value) VALUES ('t2', -3.25)",
        ],
    )?;
    let expected = serde_json::json!([[1, "t1", 21.5], [2, "t2", -3.25]]);
    let sql = "SELECT id, sensor, value FROM readings ORDER BY id";
    ensure!(
        query(&c.nodes[0], sql) == expected,
        "rows read back differ from rows written"
    );
    // A device registered through the ARM CLI (so the client side runs emulated too).
    let key = "5a".repeat(32);
    let add = AARCH64
        .runner(&binary)
        .args(["device", "add", "--id", "7", "--key", &key, "--host"])
        .arg(c.nodes[0].url(""))
        .output()?;
    ensure!(
        add.status.success(),
        "cairn device add failed: {}",
        String::from_utf8_lossy(&add.stderr)
    );
    ensure!(
        devices(&c.nodes[0])? == [7],
        "device 7 not listed after `device add`"
    );
    // A fleet of host devices (the real firmware client in `cairn sim`) pushes records to
    // the emulated gateway's device port; every one must be acknowledged and stored once.
    let acked = sim(host_cairn, &c.nodes[0])?;
    let count_sql = format!(
        "SELECT COUNT(*), COUNT(DISTINCT device_id || ':' || seq) FROM telemetry \
         WHERE device_id >= {SIM_FIRST_ID}"
    );
    ensure!(
        query(&c.nodes[0], &count_sql) == serde_json::json!([[acked, acked]]),
        "telemetry does not hold exactly the {acked} acknowledged records"
    );
    // A bad statement is an error result, and the node keeps serving.
    let bad = c.nodes[0].execute(&stmts(&["INSERT INTO no_such_table VALUES (1)"]), "");
    ensure!(
        bad.body.pointer("/results/0/error").is_some(),
        "bad SQL did not return an error result: {:?}",
        bad.body
    );

    c.kill9(0);
    println!("node killed with SIGKILL; restarting with the same command line");
    c.restart(0);
    let rows = query(&c.nodes[0], sql);
    ensure!(
        rows == expected,
        "after kill -9 and restart the rows are {rows}, expected {expected}"
    );
    ensure!(
        devices(&c.nodes[0])? == [7, SIM_FIRST_ID, SIM_FIRST_ID + 1, SIM_FIRST_ID + 2],
        "devices lost in kill -9 and restart"
    );
    let records = query(&c.nodes[0], &count_sql);
    ensure!(
        records == serde_json::json!([[acked, acked]]),
        "after kill -9 and restart telemetry counts are {records}, expected {acked}"
    );
    println!(
        "aarch64: rows, device registry and {acked} device records survived kill -9 and restart"
    );
    stop(&mut c)
}

/// `--help` lists the subcommands; `node` bootstraps and serves a write and a read over HTTP
/// (data and log in `work/<triple>`); SIGTERM stops it cleanly.
fn help_and_sql(target: &'static LinuxTarget, binary: &Path, work: &Path) -> Result<()> {
    let triple = target.triple;
    let help = target
        .runner(binary)
        .arg("--help")
        .output()
        .with_context(|| format!("running the {triple} cairn --help under qemu"))?;
    let text = String::from_utf8_lossy(&help.stdout);
    ensure!(
        help.status.success() && text.contains("node"),
        "{triple} `cairn --help` failed ({}): {text}{}",
        help.status,
        String::from_utf8_lossy(&help.stderr)
    );
    let mut c = emulated_node(target, binary, None, work.join(triple));
    execute(
        &c,
        &[
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
            &format!("INSERT INTO t (v) VALUES ('{triple}')"),
        ],
    )?;
    let rows = query(&c.nodes[0], "SELECT id, v FROM t");
    ensure!(
        rows == serde_json::json!([[1, triple]]),
        "{triple} read back {rows}"
    );
    println!("{triple}: node bootstrapped and served a write and a read");
    stop(&mut c)
}

/// SIGTERM, then the node must exit on its own, successfully.
fn stop(c: &mut Cluster) -> Result<()> {
    if c.terminate(0) {
        return Ok(());
    }
    let log = c.nodes[0].log();
    let lines: Vec<&str> = log.lines().collect();
    anyhow::bail!(
        "node exited with an error on SIGTERM\n--- last lines of its log ---\n{}",
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// `POST /db/execute` on the leader, retried while a fresh leader refuses writes; every
/// statement must succeed.
fn execute(c: &Cluster, statements: &[&str]) -> Result<()> {
    let body = c.execute(&stmts(statements));
    let results = body["results"]
        .as_array()
        .with_context(|| format!("execute answer has no results: {body}"))?;
    ensure!(
        results.len() == statements.len() && results.iter().all(|r| r.get("error").is_none()),
        "execute failed: {body}"
    );
    Ok(())
}

/// The rows of a linearizable query (a `503` while a leader settles is retried).
fn query(node: &Node, sql: &str) -> Value {
    Value::from(node.rows(sql, "linearizable"))
}

/// First device id of the simulated fleet.
const SIM_FIRST_ID: u64 = 100;

/// Runs `cairn sim` on the host against the node: 3 devices, 20 records/s each for 3 s.
/// Returns how many records were acknowledged, after checking none was dropped or left.
fn sim(host_cairn: &Path, node: &Node) -> Result<u64> {
    let out = sim_command(host_cairn, &[&node.device], &node.url(""))
        .args(["--devices", "3", "--rate", "20", "--duration", "3"])
        .args(["--drain", "60", "--json", "--quiet"])
        .args(["--first-id", &SIM_FIRST_ID.to_string()])
        .output()
        .context("running cairn sim")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "cairn sim failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = sim_summary(&out.stdout)
        .with_context(|| format!("cairn sim printed no JSON summary: {stdout}"))?;
    println!("cairn sim: {summary}");
    let field = |name: &str| summary[name].as_u64().unwrap_or(u64::MAX);
    let acked = field("acked");
    ensure!(
        acked > 0 && acked == field("pushed") && field("dropped") == 0 && field("queued") == 0,
        "not every pushed record was acknowledged: {summary}"
    );
    Ok(acked)
}

/// Sorted ids from `GET /devices` (read linearizably on the leader), retried for a while: a
/// new leader may refuse requests for a moment.
fn devices(node: &Node) -> Result<Vec<u64>> {
    let body = poll(Duration::from_secs(20), "GET /devices to answer", || {
        let r = get(&node.url("/devices"));
        (r.status == 200).then_some(r.body)
    });
    let mut ids = body["devices"]
        .as_array()
        .with_context(|| format!("GET /devices: {body}"))?
        .iter()
        .map(|d| d["device_id"].as_u64().context("device without device_id"))
        .collect::<Result<Vec<u64>>>()?;
    ids.sort_unstable();
    Ok(ids)
}
