//! `cargo xtask qemu`: the real firmware image under qemu-system-arm.
//!
//! Without options: the end-to-end run against a real cluster, see `qemu_e2e.rs`.
//! `--smoke` boots the network skeleton (the app without the Cairn client) against a TCP
//! echo listener on the host's 127.0.0.1 (10.0.2.2 inside QEMU's user network) and checks
//! that it got an address by DHCP, connected, and every packet came back intact.
//!
//! The defmt log is decoded by `defmt-print` (installed with `cargo install defmt-print
//! --locked` when missing, about 80 s once): decoding defmt by hand would mean reading the
//! ELF's string table and the rzCOBS framing, and linking `defmt-decoder` into xtask would
//! add its compile time to every workspace build.

use crate::boards::QEMU;
use crate::util::{have, run, step};
use anyhow::{Context, Result, bail, ensure};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The device id the smoke image is built with (and the echo listener checks).
pub const SMOKE_DEVICE: u64 = 0x5a0e;
pub const SMOKE_SAMPLES: u32 = 20;
const SMOKE_PACKET: usize = 24;

pub fn run_command(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("--smoke") => step("qemu smoke (network skeleton)", smoke),
        Some("--leader-kill") => crate::qemu_e2e::leader_kill(),
        Some("--power-cut") => crate::qemu_e2e::power_cut(),
        Some("--settings") => crate::qemu_e2e::settings(),
        Some(other) => bail!(
            "unknown option `{other}` (expected --smoke, --leader-kill, --power-cut, --settings \
             or nothing)"
        ),
        None => crate::qemu_e2e::run(),
    }
}

/// Installs defmt-print when it is not on PATH.
pub fn ensure_defmt_print() -> Result<()> {
    if have("defmt-print") {
        return Ok(());
    }
    println!("installing defmt-print (once, about 80 s)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(["install", "defmt-print", "--locked", "--quiet"]))
}

fn smoke() -> Result<()> {
    ensure_defmt_print()?;
    let device = SMOKE_DEVICE.to_string();
    // A development build: no settings region, the identity is the build's.
    let elf = QEMU.build(&["dev-settings"], &[("CAIRN_DEVICE_ID", &device)])?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let echo = thread::spawn(move || echo_packets(listener));

    let started = Instant::now();
    let run = boot(
        &elf,
        &format!(
            "samples={SMOKE_SAMPLES} period-ms=20 gateways=10.0.2.2:{port} flash={}",
            // Blank (a development build needs none), and not in the working directory.
            crate::bench::proc::scratch("qemu-smoke-flash")?
                .join("flash.bin")
                .display()
        ),
        Duration::from_secs(120),
    )?;
    println!(
        "qemu smoke: image ran {:.1} s, {}",
        started.elapsed().as_secs_f64(),
        run.status
    );
    ensure!(run.status.success(), "image failed: {}", run.status);
    let expected =
        format!("done samples={SMOKE_SAMPLES} pushed={SMOKE_SAMPLES} acked={SMOKE_SAMPLES}");
    ensure!(
        run.lines.iter().any(|l| l.contains(&expected)),
        "image never logged `{expected}`"
    );
    ensure!(
        run.lines.iter().any(|l| l.contains("address 10.0.2.15")),
        "image never logged its DHCP address"
    );
    let echoed = echo
        .join()
        .map_err(|_| anyhow::anyhow!("echo listener panicked"))??;
    ensure!(
        echoed == SMOKE_SAMPLES,
        "listener echoed {echoed} packets, expected {SMOKE_SAMPLES}"
    );
    println!("qemu smoke: DHCP, TCP connect and {echoed} echoed packets ok");
    Ok(())
}

/// Accepts one connection and echoes fixed-size packets until the image closes it,
/// checking each carries the smoke device id and the next sample number.
pub fn echo_packets(listener: TcpListener) -> Result<u32> {
    let (mut conn, peer) = listener.accept()?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    eprintln!("echo listener: connection from {peer}");
    let mut count = 0u32;
    let mut packet = [0u8; SMOKE_PACKET];
    loop {
        if !read_packet(&mut conn, &mut packet)? {
            return Ok(count);
        }
        let device = u64::from_le_bytes(packet[0..8].try_into()?);
        let n = u32::from_le_bytes(packet[8..12].try_into()?);
        ensure!(device == SMOKE_DEVICE, "packet from device {device:#x}");
        ensure!(n == count, "sample {n} arrived, expected {count}");
        conn.write_all(&packet)?;
        count += 1;
    }
}

/// Reads one whole packet; false on a clean end of stream before its first byte.
fn read_packet(conn: &mut TcpStream, packet: &mut [u8]) -> Result<bool> {
    let mut got = 0;
    while got < packet.len() {
        match conn.read(&mut packet[got..])? {
            0 if got == 0 => return Ok(false),
            0 => bail!("connection closed mid-packet"),
            n => got += n,
        }
    }
    Ok(true)
}

/// What one boot of the image did.
pub struct Boot {
    pub status: ExitStatus,
    /// The decoded defmt log, one entry per line.
    pub lines: Vec<String>,
}

/// Boots `elf` and waits for it to exit (killing it after `limit`), collecting its log.
pub fn boot(elf: &Path, cmdline: &str, limit: Duration) -> Result<Boot> {
    let deadline = Instant::now() + limit;
    let mut image = Image::boot(elf, cmdline)?;
    let mut lines = Vec::new();
    while let Some(line) = image.next_line(deadline) {
        lines.push(line);
    }
    let status = image.wait(deadline)?;
    Ok(Boot { status, lines })
}

/// A running image: qemu-system-arm as HARDWARE-NOTES.md says, with `cmdline` as the
/// semihosting command line, its defmt log decoded by defmt-print and echoed with a
/// `qemu|` prefix. Killed when dropped.
pub struct Image {
    qemu: Child,
    decoder: Child,
    lines: mpsc::Receiver<String>,
}

impl Image {
    pub fn boot(elf: &Path, cmdline: &str) -> Result<Image> {
        let mut qemu = Command::new("qemu-system-arm")
            .args([
                "-M",
                "mps2-an386",
                "-nographic",
                "-monitor",
                "none",
                "-serial",
                "none",
            ])
            .args(["-semihosting-config", "enable=on,target=native"])
            .args([
                "-netdev",
                "user,id=n0",
                "-net",
                "nic,netdev=n0,model=lan9118",
            ])
            .arg("-kernel")
            .arg(elf)
            .args(["-append", cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start qemu-system-arm (cargo xtask setup installs it)")?;
        let log = qemu.stdout.take().expect("piped");
        let mut decoder = Command::new("defmt-print")
            .arg("-e")
            .arg(elf)
            .stdin(Stdio::from(log))
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start defmt-print")?;
        let decoded = decoder.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(decoded).lines().map_while(Result::ok) {
                println!("  qemu| {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Image {
            qemu,
            decoder,
            lines,
        })
    }

    /// The next decoded log line; `None` once the log ends (the image exited) or at
    /// `deadline`.
    pub fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.checked_duration_since(Instant::now())?;
        self.lines.recv_timeout(left).ok()
    }

    /// Waits for QEMU to exit and returns the image's exit status (semihosting exit code);
    /// kills it and fails at `deadline`.
    pub fn wait(&mut self, deadline: Instant) -> Result<ExitStatus> {
        let limit = deadline.saturating_duration_since(Instant::now());
        let status = wait_with_limit(&mut self.qemu, limit)?;
        // defmt-print ends when QEMU's stdout closes.
        self.decoder.wait()?;
        Ok(status)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.decoder.wait();
    }
}

fn wait_with_limit(child: &mut Child, limit: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            bail!("QEMU still running after {} s: killed", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(50));
    }
}
