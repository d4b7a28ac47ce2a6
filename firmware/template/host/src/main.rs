//! A Cairn device as a Linux process: reads its identity from a settings file (`cairn device
//! add --generate --provision-out FILE` or `cairn device provision`), pushes readings through
//! the firmware client over tokio TCP and exits once every one is acknowledged (committed on a
//! quorum of gateways).
//!
//! `cairn-template-host SETTINGS_FILE [RECORDS]` (default 10 records, one every 100 ms).
//! Prints `template host: device N pushed=P acked=A` and exits 0 when all are acknowledged,
//! 1 after 60 s without.

use std::time::{Duration, Instant};

use cairn_firmware::settings::DeviceSettings;
use cairn_firmware::tokio::TcpTransport;
use cairn_firmware::{BootNonce, Client, Config, OverflowPolicy, Value};
use embassy_sync::blocking_mutex::raw::NoopRawMutex;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: cairn-template-host SETTINGS_FILE [RECORDS]")?;
    let records: u64 = args.next().map_or(Ok(10), |n| n.parse())?;

    // Who am I: the settings file, decoded by the same codec the firmware uses.
    let region = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
    let identity = DeviceSettings::decode(&region).map_err(|e| format!("{path}: {e}"))?;
    // A boot number and a boot nonce that differ on every start, from the OS RNG (the nonce
    // must never repeat under the device's key: protocol/SPEC.md §5.2).
    let mut boot = [0u8; 4];
    let mut nonce = [0u8; 12];
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut urandom, &mut boot)?;
    std::io::Read::read_exact(&mut urandom, &mut nonce)?;

    // The client and its settings live as long as the program.
    let identity: &'static DeviceSettings = Box::leak(Box::new(identity));
    let config: &'static Config<'static> = Box::leak(Box::new(Config::new(
        identity.device_id,
        identity.key,
        u32::from_le_bytes(boot),
        BootNonce::from_rng(nonce),
        identity.gateways(),
    )));
    let client: &'static Client<NoopRawMutex, 4096> =
        Box::leak(Box::new(Client::new(OverflowPolicy::RejectNewest)));

    // One thread, a LocalSet: the client is `!Send` with `NoopRawMutex`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let acked = tokio::task::LocalSet::new().block_on(&rt, async {
        tokio::task::spawn_local(async { client.run(&mut TcpTransport::new(), config).await });
        for n in 0..records {
            let reading = [
                Value::F32(21.0 + (n % 10) as f32 * 0.1),
                Value::F32(45.0),
                Value::F32(1013.25),
            ];
            while let Err(e) = client.push(1, &reading) {
                eprintln!("push refused ({e}), waiting for room");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while client.status().acked < records && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.status().acked
    });
    let status = client.status();
    println!(
        "template host: device {} pushed={} acked={acked} last_error={:?}",
        identity.device_id, status.pushed, status.last_error
    );
    if acked < records {
        return Err(format!("{} records unacknowledged", records - acked).into());
    }
    Ok(())
}
