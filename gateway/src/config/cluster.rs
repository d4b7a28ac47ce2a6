//! A node's place in its cluster: its id (a number, or an rqlite-style name), the Raft
//! settings, and the rqlite flags Cairn refuses.

use super::NodeConfig;

/// `--node-id` as rqlite takes it: a positive integer is the Raft id itself; any other string
/// (`"0"` included) is a name, returned as the error.
pub fn parse_node_id(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n > 0 && s == n.to_string() => Ok(n),
        _ => Err(s.to_string()),
    }
}

/// The Raft id of an rqlite-style node name: FNV-1a of its bytes folded into
/// `[2^52, 2^53)`, so it never equals a small integer id and stays exact as a JSON number
/// (a double). The same on every node and release: ids derive from names with no lookup.
pub fn node_id_for_name(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (1 << 52) | (h & ((1 << 52) - 1))
}

impl NodeConfig {
    /// The limits of one read request on this node.
    pub fn read_limits(&self) -> crate::db::sandbox::ReadLimits {
        crate::db::sandbox::ReadLimits {
            timeout: std::time::Duration::from_millis(self.read_timeout_ms),
            max_rows: self.read_max_rows,
            max_bytes: self.read_max_bytes,
        }
    }

    /// The openraft configuration these settings imply.
    pub fn raft_config(&self) -> anyhow::Result<openraft::Config> {
        let c = openraft::Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_threshold),
            max_in_snapshot_log_to_keep: self.snapshot_keep_logs,
            // A follower further behind than this gets a snapshot instead of entries.
            replication_lag_threshold: self.snapshot_threshold.max(1) * 2,
            install_snapshot_timeout: 60_000,
            max_payload_entries: 1024,
            // A restarted leader must win an election again (standard Raft). openraft's
            // default lets it resume as leader of its old term, which its own docs call unsafe
            // when the state machine and the committed id are not fsync'd on apply (ours are
            // not: synchronous=NORMAL); it also made a restarted old leader claim leadership
            // for seconds next to the real one.
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        Ok(c.validate()?)
    }

    /// Applies `--node-id` (a number, or a name) over the file's `node_id`/`node_name`; a
    /// name sets the Raft id derived from it.
    pub(super) fn resolve_node_id(&mut self, flag: Option<&str>) -> anyhow::Result<()> {
        if let Some(id) = flag {
            match parse_node_id(id) {
                Ok(n) => (self.node_id, self.node_name) = (n, None),
                Err(name) => self.node_name = Some(name),
            }
        }
        if let Some(name) = &self.node_name {
            anyhow::ensure!(!name.is_empty(), "node_name must not be empty");
            self.node_id = node_id_for_name(name);
        }
        Ok(())
    }

    pub(super) fn validate_cluster(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.election_timeout_min_ms > self.heartbeat_ms
                && self.election_timeout_max_ms > self.election_timeout_min_ms,
            "need heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms"
        );
        anyhow::ensure!(
            self.write_batch_max > 0
                && self.write_queue_depth > 0
                && self.write_queue_capacity > 0
                && self.write_queue_batch_size > 0,
            "write queue sizes must be positive"
        );
        // Every replica re-executes the log's SQL, so a function an extension adds would have
        // to exist, and return the same value, on every node for ever, and native code loaded
        // into the process runs outside the SQL sandbox: Cairn does not load extensions.
        anyhow::ensure!(
            self.extensions_path.is_none(),
            "extensions_path: Cairn does not load SQLite extensions (every replica must apply the \
             log identically, and extension code would run outside the SQL sandbox); remove \
             --extensions-path"
        );
        anyhow::ensure!(
            self.bootstrap_expect == 0 || (self.join.is_some() && !self.bootstrap),
            "bootstrap_expect needs join (the founding nodes' addresses) and no bootstrap"
        );
        Ok(())
    }
}
