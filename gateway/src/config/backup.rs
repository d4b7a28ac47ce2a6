//! Durations as the config writes them, and the checks of the `backup_*` settings.

use super::NodeConfig;

/// A duration as the config writes it: `250ms`, `1s`, `5m`, `2h`, `7d`.
pub fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("duration {s:?}: expected a number and ms, s, m, h or d"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" | "" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => anyhow::bail!("duration {s:?}: unit must be ms, s, m, h or d"),
    };
    let ms = n
        .checked_mul(unit_ms)
        .ok_or_else(|| anyhow::anyhow!("duration {s:?} too large"))?;
    Ok(std::time::Duration::from_millis(ms))
}

impl NodeConfig {
    /// The `backup_*` settings are consistent.
    pub(super) fn validate_backup(&self) -> anyhow::Result<()> {
        for d in [
            &self.backup_interval,
            &self.backup_snapshot_interval,
            &self.backup_retention,
        ] {
            anyhow::ensure!(
                !parse_duration(d)?.is_zero(),
                "backup durations must be positive"
            );
        }
        anyhow::ensure!(
            !self.restore_if_empty || !self.backup_url.is_empty(),
            "restore_if_empty needs backup_url"
        );
        Ok(())
    }
}
