//! `cairn device add|list|remove|reset|revoke|rekey|provision`: the registry admin API
//! (`/devices`, see [`crate::http::devices`]) from the command line, and the device settings
//! regions it writes (`cairn_protocol::settings`: id, key, gateways).
//!
//! No route returns a key: a key is shown when it is generated here (`add --generate`,
//! `rekey --generate`) and otherwise only exists where the operator keeps it. `provision`
//! never contacts the cluster.

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

/// The key and settings-region flags of `add` and `rekey`: `--key HEX` or `--generate`, and
/// `--provision-out FILE --gateway IP:PORT...`.
pub fn key_flags(
    key: Option<String>,
    generate: bool,
    provision_out: Option<PathBuf>,
    gateways: Vec<SocketAddrV4>,
) -> (KeySource, Option<ProvisionOut>) {
    let key = match key {
        Some(hex) if !generate => KeySource::Hex(hex),
        _ => KeySource::Generate,
    };
    let provision = provision_out.map(|file| ProvisionOut { file, gateways });
    (key, provision)
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
    protocol: Option<u8>,
) -> anyhow::Result<()> {
    install_key(id, key, provision, |key| register(api, id, key, protocol))
}

/// Gets the key (given or generated), writes the settings region if asked, then runs
/// `install`; the file is removed again if `install` fails.
fn install_key(
    id: u64,
    key: KeySource,
    provision: Option<ProvisionOut>,
    install: impl FnOnce(&registry::DeviceKey) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (key, generated) = match key {
        KeySource::Hex(hex) => (registry::parse_key(&hex)?, false),
        KeySource::Generate => (generate_key()?, true),
    };
    let written = match &provision {
        Some(p) => Some(write_settings(&p.file, &settings(id, key, &p.gateways)?)?),
        None => None,
    };
    let registered = install(&key);
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

fn register(
    api: &Api,
    id: u64,
    key: &registry::DeviceKey,
    protocol: Option<u8>,
) -> anyhow::Result<()> {
    let mut req = json!({"id": id, "key": registry::key_hex(key)});
    if let Some(v) = protocol {
        req["protocol"] = v.into();
    }
    let (status, body) = api.post_json("/devices", &req)?;
    check(status, &body)?;
    if protocol == Some(1) {
        println!(
            "device {id}: registered for protocol 1 (accepted only by gateways started with \
             --accept-protocol-1; its first protocol 2 Hello moves it to 2 for good)"
        );
    }
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

/// A time the registry holds (Unix ms) as UTC text.
fn utc(ms: &serde_json::Value) -> String {
    ms.as_i64()
        .map(crate::db::schema::utc_text)
        .unwrap_or_else(|| "-".into())
}

/// A device's key state as `cairn device list` and `rekey --status` print it.
fn key_state(d: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    if d["protocol"].as_u64() == Some(1) {
        parts.push("protocol 1".to_string());
    }
    if !d["revoked_at_ms"].is_null() {
        parts.push(format!("REVOKED at {}", utc(&d["revoked_at_ms"])));
    }
    let r = &d["rekey"];
    if !r.is_null() {
        let old = if r["grace_until_ms"].is_null() {
            "old key refused".to_string()
        } else {
            format!("old key until {}", utc(&r["grace_until_ms"]))
        };
        let seen = if r["new_key_seen_ms"].is_null() {
            "new key not seen yet".to_string()
        } else {
            format!("new key seen {}", utc(&r["new_key_seen_ms"]))
        };
        parts.push(format!("rekeyed {}, {old}, {seen}", utc(&r["at_ms"])));
    }
    parts.join("; ")
}

/// Prints the registered devices, their committed high-water seqs and key state.
pub fn list(api: &Api) -> anyhow::Result<()> {
    let (status, body) = api.get_json("/devices")?;
    check(status, &body)?;
    let devices = body["devices"].as_array().cloned().unwrap_or_default();
    println!(
        "{:>20}  {:>20}  dead_letter  keys",
        "device_id", "high_water"
    );
    for d in &devices {
        let dead: Vec<String> = d["dead_letter"]
            .as_object()
            .map(|m| m.iter().map(|(s, n)| format!("stream {s}: {n}")).collect())
            .unwrap_or_default();
        println!(
            "{:>20}  {:>20}  {}  {}",
            d["device_id"].to_string(),
            d["high_water"].to_string(),
            if dead.is_empty() {
                "-".into()
            } else {
                dead.join(", ")
            },
            key_state(d)
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

/// Revokes device `id`: every gateway closes its sessions and refuses its Hellos (its stored
/// records stay). Undone only by installing a new key (`rekey` or `add`).
pub fn revoke(api: &Api, id: u64) -> anyhow::Result<()> {
    let (status, body) = api.post_json(&format!("/devices/{id}/revoke"), &json!({}))?;
    check(status, &body)?;
    println!("device {id}: revoked (sessions closed on every gateway, Hellos refused)");
    Ok(())
}

/// Installs a new key for device `id` (given or generated, optionally written to a settings
/// region); its current key stays accepted for `grace_s` seconds.
pub fn rekey(
    api: &Api,
    id: u64,
    key: KeySource,
    provision: Option<ProvisionOut>,
    grace_s: u64,
) -> anyhow::Result<()> {
    install_key(id, key, provision, |key| {
        let (status, body) = api.post_json(
            &format!("/devices/{id}/rekey"),
            &json!({"key": registry::key_hex(key), "grace_s": grace_s}),
        )?;
        check(status, &body)?;
        if body["grace_until_ms"].is_null() {
            println!("device {id}: new key installed; it was revoked, its old key stays refused");
        } else {
            println!(
                "device {id}: new key installed; the old key is accepted until {}",
                utc(&body["grace_until_ms"])
            );
        }
        Ok(())
    })?;
    println!(
        "device {id}: see `cairn device rekey --id {id} --status` for when it uses the new key"
    );
    Ok(())
}

/// Prints device `id`'s key state: when it was rekeyed, until when its old key is accepted,
/// and when a gateway first saw it with the new key.
pub fn rekey_status(api: &Api, id: u64) -> anyhow::Result<()> {
    let (status, body) = api.get_json("/devices")?;
    check(status, &body)?;
    let Some(d) = body["devices"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["device_id"].as_u64() == Some(id)))
    else {
        anyhow::bail!("device {id} is not registered")
    };
    let state = key_state(d);
    if state.is_empty() {
        println!("device {id}: one key, never rekeyed");
    } else {
        println!("device {id}: {state}");
    }
    Ok(())
}
