//! The cluster's active format version, on the service layer (`crate::version` has the
//! formats): the gate every proposal passes, the leader's task that raises the active version
//! once every member supports it, and the check that refuses a joining node too old for it.

use std::sync::Arc;
use std::time::Duration;

use super::Cluster;
use crate::command::Command;
use crate::error::Error;
use crate::raft::NodeId;
use crate::raft::network::version_of;
use crate::version::SUPPORTED;

/// How often the leader looks whether it can raise the active version (reading two metrics).
/// Often: a new cluster's stream tables wait for it (`ingress::leader`), so a new cluster
/// activates the version its binaries support within a tick of its first election.
const RAISE_EVERY: Duration = Duration::from_millis(100);

impl Cluster {
    /// The highest format version every member, learners included, is known to support
    /// (from the version each one answers Raft RPCs with); `None` while one has not answered.
    pub fn members_support(&self) -> Option<u32> {
        let m = self.raft_metrics();
        let members: Vec<NodeId> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        self.metrics().versions.common(self.id(), members)
    }

    /// The gate of [`Command::min_version`]: a command of a kind newer than the active
    /// version is refused (an older member could not decode it); `ActivateVersion(v)` needs
    /// every member to support `v`.
    pub(super) fn allowed_by_version(&self, cmd: &Command) -> Result<(), Error> {
        let need = cmd.min_version();
        let versions = &self.metrics().versions;
        let allowed = match cmd.unstamped() {
            // Needed by every member, not the cluster: a joiner's incarnation is recorded
            // before its first RPC, also in a new cluster's first second (before activation).
            Command::ActivateVersion(_) | Command::Members(_) => {
                self.members_support().unwrap_or(0)
            }
            _ => versions.active(),
        };
        if need > allowed {
            return Err(Error::Unavailable(format!(
                "{} needs cluster format version {need}; the active version is {} (a member \
                 runs an older release: upgrade every node)",
                kind(cmd),
                versions.active()
            )));
        }
        Ok(())
    }

    /// Refuses node `id` at `raft_addr` if it does not support the active version (it says
    /// what it supports on its Raft listener; a v0.1.0 node says nothing: version 1).
    pub async fn check_join_version(&self, id: NodeId, raft_addr: &str) -> Result<(), Error> {
        let client = self.http();
        let url = client.url(raft_addr, "/raft/ping");
        let req = hyper::Request::get(&url)
            .body(crate::raft::network::full(bytes::Bytes::new()))
            .map_err(|e| Error::BadRequest(format!("join: Raft address {raft_addr:?}: {e}")))?;
        let theirs = match client.send(req, Duration::from_secs(5)).await {
            Ok((s, headers, _)) if s.is_success() => version_of(&headers),
            // Reachability is checked (and reported) by the join itself.
            _ => return Ok(()),
        };
        let active = self.metrics().versions.active();
        if theirs < active {
            return Err(Error::Forbidden(format!(
                "join: node {id} supports cluster format version {theirs}, the cluster's active \
                 version is {active}: run a newer cairn on it"
            )));
        }
        self.metrics().versions.note_peer(id, theirs);
        Ok(())
    }
}

fn kind(cmd: &Command) -> String {
    let text = cmd.unstamped().to_string();
    text.split('(').next().unwrap_or_default().to_string()
}

/// The leader's task: once every member supports a version above the active one, proposes
/// `ActivateVersion` to it (one committed entry; apply runs the migrations). Runs until the
/// node stops.
pub async fn raise_active_version(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(RAISE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !cluster.running() {
            return;
        }
        let active = cluster.metrics().versions.active();
        if active >= SUPPORTED || !cluster.is_leader() {
            continue;
        }
        let Some(common) = cluster.members_support() else {
            continue;
        };
        if common <= active {
            continue;
        }
        tracing::info!("every member supports cluster format version {common}: activating it");
        match cluster.write(Command::ActivateVersion(common)).await {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("activating format version {common}: {e}");
                // Not ten warnings a second while, say, the quorum is away.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
