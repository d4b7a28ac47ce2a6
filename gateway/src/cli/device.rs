//! `cairn device add|list|remove|reset`: the registry admin API (`/devices`, see
//! [`crate::http::devices`]) from the command line.

use serde_json::{Value as Json, json};

use super::{agent, get_json, post_json};
use crate::db::registry;

fn check(status: u16, body: &Json) -> anyhow::Result<()> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let msg = body["error"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    anyhow::bail!("{msg} (HTTP {status})")
}

/// Registers device `id` with key `key_hex` (64 hex digits).
pub fn add(host: &str, id: u64, key_hex: &str) -> anyhow::Result<()> {
    registry::parse_key(key_hex)?;
    let host = host.trim_end_matches('/');
    let (status, body) = post_json(
        &agent(),
        &format!("{host}/devices"),
        &json!({"id": id, "key": key_hex}),
    )?;
    check(status, &body)?;
    if body["replaced"].as_bool() == Some(true) {
        println!("device {id}: key replaced");
    } else {
        println!("device {id}: registered");
    }
    Ok(())
}

/// Prints the registered devices and their committed high-water seqs.
pub fn list(host: &str) -> anyhow::Result<()> {
    let host = host.trim_end_matches('/');
    let body = get_json(&agent(), &format!("{host}/devices"))?;
    if let Some(e) = body["error"].as_str() {
        anyhow::bail!("{e}");
    }
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
pub fn remove(host: &str, id: u64) -> anyhow::Result<()> {
    let host = host.trim_end_matches('/');
    let mut resp = agent().delete(&format!("{host}/devices/{id}")).call()?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string()?;
    let body: Json = serde_json::from_str(&text).unwrap_or(Json::String(text));
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
pub fn reset(host: &str, id: u64, seq: u64) -> anyhow::Result<()> {
    let host = host.trim_end_matches('/');
    let (status, body) = post_json(
        &agent(),
        &format!("{host}/devices/{id}/reset"),
        &json!({ "seq": seq }),
    )?;
    check(status, &body)?;
    println!(
        "device {id}: high-water {} -> {}",
        body["previous"], body["high_water"]
    );
    Ok(())
}
