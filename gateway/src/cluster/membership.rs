//! Membership through openraft's own API, behind the service layer and its error type:
//! joining (learner first, then voter), removing, and handing leadership over on shutdown.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use openraft::ChangeMembers;

use super::Cluster;
use crate::error::Error;
use crate::raft::{NodeId, Peer, raft_error};

/// The body of `POST /join` (rqlite's shape plus the HTTP address).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JoinRequest {
    pub id: NodeId,
    /// Raft address.
    pub addr: String,
    pub http_addr: String,
    /// Device address (the leader hint devices get), absent from plain rqlite clients.
    #[serde(default)]
    pub device_addr: String,
    #[serde(default = "yes")]
    pub voter: bool,
}

fn yes() -> bool {
    true
}

impl JoinRequest {
    /// The addresses the joining node asks to be reached at.
    pub fn peer(&self) -> Peer {
        Peer {
            raft_addr: self.addr.clone(),
            http_addr: self.http_addr.clone(),
            device_addr: self.device_addr.clone(),
        }
    }
}

impl Cluster {
    /// Adds a node (or updates its addresses): as a learner that is caught up before this
    /// returns, then promoted to voter if it asks to be one. The leader only.
    ///
    /// A new or re-addressed node must first answer on its Raft address (`/raft/ping`): with
    /// node mutual TLS that proves it holds a node certificate of the cluster CA naming that
    /// address, so a process without one never becomes a member.
    pub async fn join(&self, jr: &JoinRequest) -> Result<(), Error> {
        self.require_leader()?;
        self.check_join_version(jr.id, &jr.addr).await?;
        let peer = jr.peer();
        let m = self.raft_metrics();
        let membership = m.membership_config.membership().clone();
        let is_voter = membership.voter_ids().any(|v| v == jr.id);
        let failed = |e| match raft_error(e) {
            Error::Unavailable(msg) => Error::Unavailable(format!("join: {msg}")),
            other => other,
        };
        if membership.get_node(&jr.id) != Some(&peer) {
            self.check_reachable(jr.id, &peer.raft_addr).await?;
        }
        match membership.get_node(&jr.id) {
            Some(existing) if *existing != peer => {
                self.raft
                    .change_membership(
                        ChangeMembers::SetNodes(BTreeMap::from([(jr.id, peer.clone())])),
                        false,
                    )
                    .await
                    .map_err(failed)?;
            }
            Some(_) => {}
            None => {
                tracing::info!(id = jr.id, %peer, "adding learner");
                self.raft
                    .add_learner(jr.id, peer.clone(), true)
                    .await
                    .map_err(failed)?;
            }
        }
        if jr.voter && !is_voter {
            tracing::info!(id = jr.id, "promoting to voter");
            self.raft
                .change_membership(ChangeMembers::AddVoterIds([jr.id].into()), false)
                .await
                .map_err(failed)?;
        }
        Ok(())
    }

    /// Whether node `id` answers on its Raft address `addr` (over node TLS when on).
    async fn check_reachable(&self, id: NodeId, addr: &str) -> Result<(), Error> {
        let url = self.client.url(addr, "/raft/ping");
        let req = hyper::Request::get(&url)
            .body(crate::raft::network::full(bytes::Bytes::new()))
            .map_err(|e| Error::BadRequest(format!("join: Raft address {addr:?}: {e}")))?;
        match self.client.send(req, Duration::from_secs(5)).await {
            Ok((s, _, _)) if s.is_success() => Ok(()),
            Ok((s, _, _)) => Err(Error::BadRequest(format!(
                "join: node {id} at {addr} answered {s} on its Raft port"
            ))),
            Err(e) => Err(Error::BadRequest(format!(
                "join: node {id} does not answer at {url} (with node TLS it needs a node \
                 certificate of the cluster CA naming that address): {e}"
            ))),
        }
    }

    /// Removes a voter or a learner. The leader only.
    pub async fn remove(&self, id: NodeId) -> Result<(), Error> {
        self.require_leader()?;
        let m = self.raft_metrics();
        let membership = m.membership_config.membership();
        let change = if membership.voter_ids().any(|v| v == id) {
            ChangeMembers::RemoveVoters([id].into())
        } else if membership.get_node(&id).is_some() {
            ChangeMembers::RemoveNodes([id].into())
        } else {
            return Err(Error::NotFound(format!("node {id} is not a member")));
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(|e| match raft_error(e) {
                Error::Unavailable(msg) => Error::Unavailable(format!("remove: {msg}")),
                other => other,
            })?;
        Ok(())
    }

    /// True when this node is a voter in the membership it holds.
    pub fn is_voter(&self) -> bool {
        self.raft_metrics()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.id)
    }

    /// If leader, hands leadership to the most up-to-date voter and waits (up to 3 s) for it
    /// to take over.
    pub async fn step_down(&self) {
        match self.step_down_to(None).await {
            // Not the leader, or no other voter (a single node): nothing to hand over.
            Ok(_) | Err(Error::NotLeader(_) | Error::BadRequest(_)) => {}
            Err(e) => tracing::warn!("stepping down: {e}"),
        }
    }

    /// rqlite's `POST /leader`: hands leadership to `target` (a voter), or to the most
    /// up-to-date voter, and waits (up to 3 s) for a new leader; its id. The leader only.
    pub async fn step_down_to(&self, target: Option<NodeId>) -> Result<NodeId, Error> {
        let m = self.raft_metrics();
        if m.current_leader != Some(self.id) {
            return Err(Error::NotLeader(m.current_leader));
        }
        let voters: Vec<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.id)
            .collect();
        let matched = |id: &NodeId| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(id).cloned().flatten())
                .map(|l| l.index)
        };
        let target = match target {
            Some(t) if voters.contains(&t) => t,
            Some(t) => return Err(Error::BadRequest(format!("node {t} is not another voter"))),
            None => voters
                .iter()
                .max_by_key(|id| matched(id))
                .copied()
                .ok_or_else(|| Error::BadRequest("no other voter to hand leadership to".into()))?,
        };
        tracing::info!(target, "transferring leadership");
        self.raft
            .trigger()
            .transfer_leader(target)
            .await
            .map_err(|e| Error::Unavailable(format!("transfer leader: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let leader = self.raft_metrics().current_leader;
            if let Some(l) = leader.filter(|l| *l != self.id) {
                tracing::info!(new_leader = l, "leadership transferred");
                return Ok(l);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::Unavailable(
            "leadership transfer did not complete in 3 s".into(),
        ))
    }

    /// rqlite's `-raft-cluster-remove-shutdown`: a node stopping gracefully leaves the cluster.
    /// A leader hands leadership over first; then the leader removes this node (asked on its
    /// Raft listener, `POST /cluster/leave`).
    pub async fn leave(&self) -> Result<(), Error> {
        if self.is_leader() {
            self.step_down_to(None).await?;
        }
        let id = self.id;
        // A membership change still in progress (this node's own promotion, say) refuses the
        // removal for a moment: asked again for up to 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self
                .on_leader(
                    || self.remove(id),
                    || async {
                        self.call_leader_internal::<Result<(), Error>>(
                            hyper::Method::POST,
                            "/cluster/leave",
                            crate::raft::network::encode(&id),
                            Duration::from_secs(10),
                        )
                        .await?
                    },
                )
                .await;
            match r {
                Err(Error::Unavailable(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => return r,
            }
        }
    }

    /// rqlite's `POST /snapshot`: this node snapshots its state machine now (and may then
    /// purge its log); waits up to `wait` for the snapshot to cover what was applied when
    /// asked. The snapshot's last index.
    pub async fn snapshot_now(&self, wait: Duration) -> Result<u64, Error> {
        let applied = self
            .raft_metrics()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0);
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Error::Unavailable(format!("snapshot: {e}")))?;
        let deadline = Instant::now() + wait;
        loop {
            let at = self.raft_metrics().snapshot.map(|l| l.index).unwrap_or(0);
            if at >= applied {
                return Ok(at);
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable("snapshot not finished in time".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Watches this node's storage until `stop` is set: a leader whose storage has been held
    /// (a full disk, see `db::failure`) for a second hands leadership to another voter. It can
    /// neither apply nor answer writes until space returns; the others can, and it cannot win
    /// an election meanwhile (its vote would have to be written first).
    pub async fn hand_over_while_held(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        const GRACE: Duration = Duration::from_secs(1);
        let mut since: Option<Instant> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let held = self.storage_held();
            if held.is_empty() {
                since = None;
                continue;
            }
            let t = *since.get_or_insert_with(Instant::now);
            if t.elapsed() >= GRACE && self.is_leader() {
                tracing::warn!(?held, "storage held on the leader: handing leadership over");
                self.step_down().await;
                since = Some(Instant::now());
            }
        }
    }
}
