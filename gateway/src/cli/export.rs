//! `cairn export forget NAME`: `DELETE /export/{name}` (see [`crate::http::export`]).

use super::{Api, answer, check};

/// Forgets destination `name` (removed from every gateway's config): its cursor no longer
/// holds the export journal and, with `keep_unexported`, the stream rows back.
pub fn forget(api: &Api, name: &str) -> anyhow::Result<()> {
    let (status, body) = answer(api.delete(&format!("/export/{name}")).call()?)?;
    check(status, &body)?;
    println!("export destination {name}: forgotten");
    Ok(())
}
