//! Membership through openraft's own API, behind the service layer and its error type:
//! joining (learner first, then voter), replacing a node that lost its disk (`--replace`),
//! removing, and handing leadership over on shutdown.
//!
//! Incarnations (`raft::incarnation`): a joining node sends the one its log will store with
//! its first vote, and the leader records it (`Command::Members`) before adding the node, so
//! that the node's first RPCs already name it. A member whose id has a recorded incarnation
//! joins again only under that incarnation; a node that lost its disk is refused and told to
//! use `--replace`. A member whose log predates incarnations records its own
//! ([`Cluster::record_own_incarnation`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use openraft::{ChangeMembers, Instant as _};

use super::Cluster;
use crate::command::Command;
use crate::command::members::MembersCommand;
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
    /// The joining node's incarnation (absent from plain rqlite clients and older releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<u64>,
    /// `--replace OLD_ID`: remove node OLD_ID first (it lost its disk); may be the joining
    /// node's own id. Needs the `remove` permission besides `join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace: Option<NodeId>,
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
        let known = self.membership_node(jr.id);
        // Before anything changes: a node that cannot prove it belongs never gets further.
        if known.as_ref() != Some(&peer) {
            self.check_reachable(jr.id, &peer.raft_addr).await?;
        }
        if let Some(old) = jr.replace {
            self.remove_replaced(old, jr).await?;
        }
        let recorded = self.incarnations.of_now(jr.id).await;
        if self.membership_node(jr.id).is_some() {
            // A member joins again only as itself (a restart before its promotion). One without
            // a record (its log predates incarnations) records its own over the Raft listener.
            if recorded.is_some() && recorded != jr.incarnation {
                return Err(Error::BadRequest(format!(
                    "node {id} is a member under another incarnation: its Raft log was lost or \
                     replaced (a blank disk), and a node that forgot its votes must not vote \
                     again under the same id. Start it with --replace {id}: node {id} is \
                     removed, then joins again as a new node",
                    id = jr.id
                )));
            }
        } else if let Some(inc) = jr.incarnation
            && recorded != Some(inc)
            && self.may_propose_members()
        {
            // Recorded before the node is added: its first RPCs name it.
            self.write(Command::Members(MembersCommand::Incarnation {
                id: jr.id,
                incarnation: inc,
            }))
            .await?;
        }
        let m = self.raft_metrics();
        let membership = m.membership_config.membership().clone();
        let is_voter = membership.voter_ids().any(|v| v == jr.id);
        let failed = |e| match raft_error(e) {
            Error::Unavailable(msg) => Error::Unavailable(format!("join: {msg}")),
            other => other,
        };
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

    /// The first step of `--replace OLD`: removes node `old` unless it is gone already (a join
    /// retried after the removal) or is the joining node itself under its new incarnation. The
    /// leader is never replaced, and the removal must leave a quorum of the remaining voters
    /// answering.
    async fn remove_replaced(&self, old: NodeId, jr: &JoinRequest) -> Result<(), Error> {
        if old == self.id {
            return Err(Error::BadRequest(format!(
                "--replace {old}: node {old} is the leader and answers; it has not lost its                  disk (hand leadership over first with POST /leader if it must go)"
            )));
        }
        let m = self.raft_metrics();
        let membership = m.membership_config.membership().clone();
        if membership.get_node(&old).is_none()
            || (old == jr.id
                && jr.incarnation.is_some()
                && self.incarnations.of_now(old).await == jr.incarnation)
        {
            return Ok(());
        }
        let rest: Vec<NodeId> = membership.voter_ids().filter(|v| *v != old).collect();
        // A voter answered the leader's heartbeats (every 50 ms by default) within this long.
        let recent = Duration::from_secs(2);
        let answering = rest
            .iter()
            .filter(|v| {
                **v == self.id
                    || m.heartbeat.as_ref().is_some_and(|h| {
                        h.get(v)
                            .and_then(|t| t.as_ref())
                            .is_some_and(|t| t.elapsed() < recent)
                    })
            })
            .count();
        let quorum = rest.len() / 2 + 1;
        if rest.is_empty() || answering < quorum {
            return Err(Error::BadRequest(format!(
                "--replace {old}: without node {old} the cluster has {} voters, of which {answering}                  answer the leader; a quorum needs {quorum}, so the removal could not commit or                  would leave the cluster without a working quorum. Bring the others back first                  (after a lost majority see `cairn recover`)",
                rest.len()
            )));
        }
        tracing::warn!(old, new = jr.id, "replacing a node: removing it first");
        self.remove(old).await
    }

    /// Records this node's incarnation through the leader when its membership lists it and no
    /// incarnation is recorded for it (a log that predates incarnations, or a bootstrap node).
    /// Tried every second until done or `stop`. Never overwrites a recorded one: a different
    /// record means this node was replaced while it was away, and it says so.
    pub async fn record_own_incarnation(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut warned = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let inc = &self.incarnations;
            let member = self
                .raft_metrics()
                .membership_config
                .membership()
                .get_node(&self.id)
                .is_some();
            if !member || inc.is_blank() || !self.may_propose_members() {
                continue;
            }
            match inc.of_now(self.id).await {
                Some(r) if r == inc.own() => return,
                Some(r) => {
                    if !warned {
                        tracing::error!(
                            "the cluster records incarnation {r} for node {}, this node is {}: it                              was replaced while away and takes no part (its RPCs are refused);                              wipe its data dir and join it with --replace {} to bring it back",
                            self.id,
                            inc.own(),
                            self.id
                        );
                        warned = true;
                    }
                    continue;
                }
                None => {}
            }
            let (id, own) = (self.id, inc.own());
            let r = self
                .on_leader(
                    || self.record_incarnation(id, own),
                    || async {
                        self.call_leader_internal::<Result<(), Error>>(
                            hyper::Method::POST,
                            "/cluster/incarnation",
                            crate::raft::network::encode(&(id, own)),
                            Duration::from_secs(10),
                        )
                        .await?
                    },
                )
                .await;
            if let Err(e) = r {
                tracing::debug!("recording this node's incarnation: {e}");
            }
        }
    }

    /// On the leader: records `incarnation` for member `id` if none is recorded yet.
    pub async fn record_incarnation(&self, id: NodeId, incarnation: u64) -> Result<(), Error> {
        self.require_leader()?;
        let member = self
            .raft_metrics()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some();
        if !member {
            return Err(Error::NotFound(format!("node {id} is not a member")));
        }
        match self.incarnations.of_now(id).await {
            None => self
                .write(Command::Members(MembersCommand::Incarnation {
                    id,
                    incarnation,
                }))
                .await
                .map(drop),
            Some(r) if r == incarnation => Ok(()),
            Some(_) => Err(Error::BadRequest(format!(
                "node {id} already has another incarnation recorded"
            ))),
        }
    }

    /// `/status`'s `raft.incarnation`: this node's, whether it is blank (no vote stored yet),
    /// and the members' as this replica recorded them.
    pub fn incarnation_json(&self) -> serde_json::Value {
        let inc = &self.incarnations;
        let recorded: BTreeMap<String, u64> = inc
            .recorded()
            .iter()
            .map(|(id, i)| (id.to_string(), *i))
            .collect();
        serde_json::json!({"own": inc.own(), "blank": inc.is_blank(), "members": recorded})
    }

    /// Whether new `Command::Members` entries may be proposed: every member must be able to
    /// apply them, so once every member answers with format version 2 (in a new cluster from
    /// the start; in a rolling upgrade once the last node runs this release). Until then joins
    /// record no incarnation and each member records its own once it may.
    pub fn may_propose_members(&self) -> bool {
        self.members_support().unwrap_or(0) >= crate::version::V2
    }

    /// On the leader: removes node `id` for a member leaving the cluster (`POST
    /// /cluster/leave`). A member may remove only itself: the request names its incarnation,
    /// which must be the one recorded for `id`. A request without one (a release without
    /// incarnations) is taken only while no incarnation is recorded for `id`.
    pub async fn leave_for(&self, id: NodeId, incarnation: Option<u64>) -> Result<(), Error> {
        match (self.incarnations.of_now(id).await, incarnation) {
            (None, _) => {}
            (Some(r), Some(i)) if r == i => {}
            _ => {
                return Err(Error::BadRequest(format!(
                    "/cluster/leave: a member removes only itself, under its own incarnation;                      node {id}'s is not the one given (use DELETE /remove with the remove                      permission)"
                )));
            }
        }
        self.remove(id).await
    }

    /// Node `id`'s addresses in the membership this node holds, if it is a member.
    fn membership_node(&self, id: NodeId) -> Option<crate::raft::Peer> {
        self.raft_metrics()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
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
                            // The id alone is what releases without incarnations send (and
                            // read: postcard ignores the bytes after it).
                            crate::raft::network::encode(&(id, self.incarnations.own())),
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
