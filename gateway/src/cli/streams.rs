//! `cairn streams show|reload|replay`: the stream admin API (`/streams`, see
//! [`crate::http::streams`]) from the command line.

use serde_json::json;

use super::{Api, check};

/// Prints the node's configured and the replicated definitions and the dead-letter rows.
pub fn show(api: &Api) -> anyhow::Result<()> {
    let (status, body) = api.get_json("/streams")?;
    check(status, &body)?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

/// Has the node read its config file again and the leader apply its streams.
pub fn reload(api: &Api) -> anyhow::Result<()> {
    let (status, body) = api.post_json("/streams/reload", &json!({}))?;
    check(status, &body)?;
    println!("{} stream(s) reloaded and applied", body["streams"]);
    Ok(())
}

/// Moves the dead-letter rows of `stream` (of `device`, or all) that fit the replicated
/// definitions into the stream's table.
pub fn replay(api: &Api, stream: u16, device: Option<u64>) -> anyhow::Result<()> {
    let query = device.map(|d| format!("?device={d}")).unwrap_or_default();
    let (status, body) = api.post_json(&format!("/streams/{stream}/replay{query}"), &json!({}))?;
    check(status, &body)?;
    println!(
        "stream {stream}: {} row(s) moved from dead_letter, {} still do not fit",
        body["moved"], body["remaining"]
    );
    Ok(())
}
