//! `cargo xtask qemu`: the real firmware image under qemu-system-arm.
//!
//! Without options: the end-to-end run against a real cluster, see `qemu_e2e.rs`.
//! `--smoke` boots the network skeleton (the app without the Cairn client) against a TCP
//! echo listener on the host's 127.0.0.1 (10.0.2.2 inside QEMU's user network) and checks
//! that it got an address by DHCP, connected, and every packet came back intact.
//!
//! Images run through the test harness's [`cairn_tests::qemu`] (one way of booting them, the
//! fault suite's real device included). The defmt log is decoded by `defmt-print` (installed with `cargo install defmt-print
//! --locked` when missing, about 80 s once): decoding defmt by hand would mean reading the
//! ELF's string table and the rzCOBS framing, and linking `defmt-decoder` into xtask would
//! add its compile time to every workspace build.

use crate::boards::QEMU;
use crate::util::{have, run, step};
use anyhow::{Result, bail, ensure};
pub use cairn_tests::qemu::{Image, boot};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
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
