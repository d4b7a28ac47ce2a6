//! `cairn device add|list|remove|reset|provision`: the registry admin API (`/devices`, see
//! [`crate::http::devices`]) from the command line, and the device settings regions it
//! writes (`cairn_protocol::settings`: id, key, gateways).
//!
//! No route returns a key: a key is shown when it is generated here (`add --generate`) and
//! otherwise only exists where the operator keeps it. `provision` never contacts the cluster.
//! `cairn device rekey --id N --generate --provision-out FILE` (the device-sessions issue's
//! grace window) is meant to reuse [`generate_key`], [`write_settings`] and [`ProvisionOut`].

use std::io::Write as _;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use cairn_protocol::GatewayAddr;
use cairn_protocol::settings::DeviceSettings;
use serde_json::json;

use super::{Api, answer, check};
use crate::db::registry;

/// Where `cairn device add` gets the device's key.
pub enum KeySource {
    /// Given on the command line (64 hex digits).
    Hex(String),
    /// Generated here from the operating system's randomness, shown once.
    Generate,
}

/// A settings region to write for the device (`--provision-out FILE --gateway IP:PORT...`).
pub struct ProvisionOut {
    pub file: PathBuf,
    pub gateways: Vec<SocketAddrV4>,
}

/// A fresh device key from the operating system's random source (`getrandom`).
pub fn generate_key() -> anyhow::Result<registry::DeviceKey> {
    use rand::TryRngCore;
    let mut key = [0u8; cairn_protocol::KEY_LEN];
    rand::rngs::OsRng
        .try_fill_bytes(&mut key)
        .map_err(|e| anyhow::anyhow!("no randomness from the operating system: {e}"))?;
    Ok(key)
}

/// Registers device `id` with its key (given or generated) and, with `provision`, writes its
/// settings region. The file is written before the key is registered and removed again if
/// registering fails, so a registered generated key always exists in the file (and on the
/// terminal), and a failed registration leaves no file behind.
pub fn add(
    api: &Api,
    id: u64,
    key: KeySource,
    provision: Option<ProvisionOut>,
) -> anyhow::Result<()> {
    let (key, generated) = match key {
        KeySource::Hex(hex) => (registry::parse_key(&hex)?, false),
        KeySource::Generate => (generate_key()?, true),
    };
    let written = match &provision {
        Some(p) => Some(write_settings(&p.file, &settings(id, key, &p.gateways)?)?),
        None => None,
    };
    let registered = register(api, id, &key);
    if let Err(e) = registered {
        if let Some(file) = &written {
            let _ = std::fs::remove_file(file);
        }
        return Err(e);
    }
    if let Some(p) = &provision {
        println!(
            "device {id}: settings region written to {} ({} bytes)",
            p.file.display(),
            cairn_protocol::settings::SETTINGS_LEN
        );
    }
    if generated {
        println!(
            "device {id}: generated key {} (shown this once; no command reads it back)",
            registry::key_hex(&key)
        );
    }
    Ok(())
}

fn register(api: &Api, id: u64, key: &registry::DeviceKey) -> anyhow::Result<()> {
    let (status, body) = api.post_json(
        "/devices",
        &json!({"id": id, "key": registry::key_hex(key)}),
    )?;
    check(status, &body)?;
    if body["replaced"].as_bool() == Some(true) {
        println!("device {id}: key replaced");
    } else {
        println!("device {id}: registered");
    }
    Ok(())
}

/// `cairn device provision`: writes the settings region of device `id` with `key_hex` to
/// `out`. Offline: contacts no gateway (register the key with `cairn device add`).
pub fn provision(
    id: u64,
    key_hex: &str,
    gateways: &[SocketAddrV4],
    out: &Path,
) -> anyhow::Result<()> {
    let key = registry::parse_key(key_hex)?;
    write_settings(out, &settings(id, key, gateways)?)?;
    println!(
        "device {id}: settings region written to {} ({} bytes)",
        out.display(),
        cairn_protocol::settings::SETTINGS_LEN
    );
    Ok(())
}

fn settings(
    id: u64,
    key: registry::DeviceKey,
    gateways: &[SocketAddrV4],
) -> anyhow::Result<DeviceSettings> {
    let gateways: Vec<GatewayAddr> = gateways.iter().copied().map(GatewayAddr::from).collect();
    DeviceSettings::new(id, key, &gateways).map_err(|e| {
        anyhow::anyhow!(
            "{e}: give each gateway's device address as the device reaches it, --gateway IP:PORT"
        )
    })
}

/// Writes the encoded settings block to a new file `path` (never over an existing one: it
/// holds a key), readable only by its owner. The file is the region's first bytes: flash it at
/// the board's settings offset, or pass it to the QEMU board as `flash=PATH` (its flash file
/// starts with the settings region and is extended to full size, erased, on first boot).
pub fn write_settings(path: &Path, settings: &DeviceSettings) -> anyhow::Result<PathBuf> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    file.write_all(&settings.encode())?;
    file.sync_all()?;
    Ok(path.to_owned())
}

/// Prints the registered devices and their committed high-water seqs.
pub fn list(api: &Api) -> anyhow::Result<()> {
    let (status, body) = api.get_json("/devices")?;
    check(status, &body)?;
    let devices = body["devices"].as_array().cloned().unwrap_or_default();
    println!("{:>20}  {:>20}  dead_letter", "device_id", "high_water");
    for d in &devices {
        let dead: Vec<String> = d["dead_letter"]
            .as_object()
            .map(|m| m.iter().map(|(s, n)| format!("stream {s}: {n}")).collect())
            .unwrap_or_default();
        println!(
            "{:>20}  {:>20}  {}",
            d["device_id"].to_string(),
            d["high_water"].to_string(),
            dead.join(", ")
        );
    }
    println!("{} device(s)", devices.len());
    Ok(())
}

/// Forgets device `id`'s key (its stored records and high-water stay).
pub fn remove(api: &Api, id: u64) -> anyhow::Result<()> {
    let (status, body) = answer(api.delete(&format!("/devices/{id}")).call()?)?;
    check(status, &body)?;
    if body["removed"].as_bool() == Some(true) {
        println!("device {id}: removed");
        Ok(())
    } else {
        anyhow::bail!("device {id} is not registered")
    }
}

/// Sets device `id`'s committed high-water seq to `seq` (a logged admin action; refused while
/// stored records of the device lie above `seq`).
pub fn reset(api: &Api, id: u64, seq: u64) -> anyhow::Result<()> {
    let (status, body) = api.post_json(&format!("/devices/{id}/reset"), &json!({ "seq": seq }))?;
    check(status, &body)?;
    println!(
        "device {id}: high-water {} -> {}",
        body["previous"], body["high_water"]
    );
    Ok(())
}
