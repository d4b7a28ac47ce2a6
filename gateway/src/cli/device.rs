//! `cairn device add|list|remove`: the registry admin API (`/devices`, see
//! [`crate::http::devices`]) from the command line.

use serde_json::json;

use super::{Api, answer, check};
use crate::db::registry;

/// Registers device `id` with key `key_hex` (64 hex digits).
pub fn add(api: &Api, id: u64, key_hex: &str) -> anyhow::Result<()> {
    registry::parse_key(key_hex)?;
    let (status, body) = api.post_json("/devices", &json!({"id": id, "key": key_hex}))?;
    check(status, &body)?;
    if body["replaced"].as_bool() == Some(true) {
        println!("device {id}: key replaced");
    } else {
        println!("device {id}: registered");
    }
    Ok(())
}

/// Prints the registered devices and their committed high-water seqs.
pub fn list(api: &Api) -> anyhow::Result<()> {
    let (status, body) = api.get_json("/devices")?;
    check(status, &body)?;
    let devices = body["devices"].as_array().cloned().unwrap_or_default();
    println!("{:>20}  {:>20}", "device_id", "high_water");
    for d in &devices {
        println!(
            "{:>20}  {:>20}",
            d["device_id"].to_string(),
            d["high_water"].to_string()
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
