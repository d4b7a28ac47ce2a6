//! `cairn streams show|reload|replay`: the stream admin API (`/streams`, see
//! [`crate::http::streams`]) from the command line.

use serde_json::{Value as Json, json};

use super::{agent, get_json, post_json};

fn answer(status: u16, body: Json) -> anyhow::Result<Json> {
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let msg = body["error"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    anyhow::bail!("{msg} (HTTP {status})")
}

/// Prints the node's configured and the replicated definitions and the dead-letter rows.
pub fn show(host: &str) -> anyhow::Result<()> {
    let host = host.trim_end_matches('/');
    let body = get_json(&agent(), &format!("{host}/streams"))?;
    if let Some(e) = body["error"].as_str() {
        anyhow::bail!("{e}");
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

/// Has the node at `host` read its config file again and the leader apply its streams.
pub fn reload(host: &str) -> anyhow::Result<()> {
    let host = host.trim_end_matches('/');
    let (status, body) = post_json(&agent(), &format!("{host}/streams/reload"), &json!({}))?;
    let body = answer(status, body)?;
    println!("{} stream(s) reloaded and applied", body["streams"]);
    Ok(())
}

/// Moves the dead-letter rows of `stream` (of `device`, or all) that fit the replicated
/// definitions into the stream's table.
pub fn replay(host: &str, stream: u16, device: Option<u64>) -> anyhow::Result<()> {
    let host = host.trim_end_matches('/');
    let query = device.map(|d| format!("?device={d}")).unwrap_or_default();
    let (status, body) = post_json(
        &agent(),
        &format!("{host}/streams/{stream}/replay{query}"),
        &json!({}),
    )?;
    let body = answer(status, body)?;
    println!(
        "stream {stream}: {} row(s) moved from dead_letter, {} still do not fit",
        body["moved"], body["remaining"]
    );
    Ok(())
}
