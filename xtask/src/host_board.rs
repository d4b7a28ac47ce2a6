//! `cargo xtask host-smoke`: the board application as a Linux process (`boards/host`,
//! embassy-net over TAP) inside a network namespace this command creates, against an echo
//! listener on the namespace's side of the TAP device. Needs root (CI runs as root).
//!
//! The listener is this very binary re-run inside the namespace (`__echo-listener`), so
//! no other program is needed.

use crate::qemu::{SMOKE_DEVICE, SMOKE_SAMPLES, echo_packets};
use crate::util::{root, run, step};
use anyhow::{Context, Result, bail, ensure};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TAP: &str = "cairn0";
const NS_SIDE: &str = "10.77.0.1";
const DEVICE_ADDR: &str = "10.77.0.2/24";
const PORT: u16 = 4003;

pub fn run_command(_args: &[String]) -> Result<()> {
    step("host board smoke (TAP in a network namespace)", smoke)
}

/// Builds `boards/host` (release) and returns the binary.
pub fn build(features: &[&str]) -> Result<PathBuf> {
    let dir = root().join("boards/host");
    let mut cmd = crate::boards::cargo_in(&dir);
    cmd.args(["build", "--release", "--quiet", "--no-default-features"]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    run(&mut cmd).context("building boards/host")?;
    Ok(dir.join("target/release/cairn-board-host"))
}

/// A network namespace removed on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Result<Self> {
        // A namespace left over from a killed run.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name])?;
        let ns = Self(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec NS program`.
    pub fn exec(&self, program: impl Into<PathBuf>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0]).arg(program.into());
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).context("ip (needs root and iproute2)")
}

fn smoke() -> Result<()> {
    let binary = build(&[])?;
    let ns = Netns::new(format!("cairn-host-smoke-{}", std::process::id()))?;
    ip(&["-n", &ns.0, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
    ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        &format!("{NS_SIDE}/24"),
        "dev",
        TAP,
    ])?;
    ip(&["-n", &ns.0, "link", "set", TAP, "up"])?;

    let mut listener = ns
        .exec(std::env::current_exe()?)
        .args(["__echo-listener", &format!("{NS_SIDE}:{PORT}")])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(listener.stdout.take().expect("piped")).lines();
    ensure!(
        lines.next().transpose()?.as_deref() == Some("listening"),
        "echo listener did not start"
    );

    let started = Instant::now();
    let mut device = ns
        .exec(&binary)
        .args(["--tap", TAP, "--address", DEVICE_ADDR])
        .arg(format!("device-id={SMOKE_DEVICE}"))
        .arg(format!("gateways={NS_SIDE}:{PORT}"))
        .arg(format!("samples={SMOKE_SAMPLES}"))
        .arg("period-ms=20")
        .spawn()?;
    let deadline = started + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = device.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = device.kill();
            let _ = listener.kill();
            bail!("cairn-board-host still running after 60 s: killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let echoed = lines.next().transpose()?.unwrap_or_default();
    let _ = listener.wait();
    println!(
        "host smoke: ran {:.1} s, {status}, listener: {echoed}",
        started.elapsed().as_secs_f64()
    );
    ensure!(status.success(), "cairn-board-host failed: {status}");
    ensure!(
        echoed == format!("echoed {SMOKE_SAMPLES}"),
        "expected `echoed {SMOKE_SAMPLES}`"
    );
    Ok(())
}

/// The hidden `__echo-listener ADDR` command: prints `listening`, echoes one connection's
/// packets (see [`echo_packets`]), prints `echoed N`.
pub fn echo_listener(args: &[String]) -> Result<()> {
    let addr = args.first().context("__echo-listener ADDR")?;
    let listener = TcpListener::bind(addr)?;
    println!("listening");
    let count = echo_packets(listener)?;
    println!("echoed {count}");
    Ok(())
}
