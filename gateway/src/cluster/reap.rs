//! rqlite's reaping: the leader removes members it has not reached for a while
//! (`--raft-reap-node-timeout-ms` for voters, `--raft-reap-read-only-node-timeout-ms` for
//! read replicas; 0 leaves them), and `POST /reap` removes unreachable read replicas at once.
//!
//! "Reached" is the leader's last acknowledged heartbeat or replication to the member
//! (openraft's heartbeat metrics); a member never acknowledged counts from when this node
//! started leading.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::Instant as _;

use super::Cluster;
use crate::error::Error;
use crate::raft::NodeId;

/// openraft's clock (its heartbeat metrics are in it).
type Instant = openraft::alias::InstantOf<crate::raft::TypeConfig>;

/// How long members may go unreached before they are removed (`None`: never).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    pub voter: Option<Duration>,
    pub read_only: Option<Duration>,
}

impl Timeouts {
    pub fn from_ms(voter_ms: u64, read_only_ms: u64) -> Timeouts {
        let d = |ms| (ms > 0).then(|| Duration::from_millis(ms));
        Timeouts {
            voter: d(voter_ms),
            read_only: d(read_only_ms),
        }
    }

    pub fn any(&self) -> bool {
        self.voter.is_some() || self.read_only.is_some()
    }
}

impl Cluster {
    /// The members (other than this leader) not reached for longer than their timeout.
    /// `leading_since` stands in for members never acknowledged.
    fn unreached(&self, t: Timeouts, leading_since: Instant) -> Vec<NodeId> {
        let m = self.raft_metrics();
        let Some(heartbeat) = m.heartbeat.as_ref() else {
            return Vec::new();
        };
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.id)
            .filter(|id| {
                let limit = if voters.contains(id) {
                    t.voter
                } else {
                    t.read_only
                };
                let Some(limit) = limit else {
                    return false;
                };
                let last = heartbeat
                    .get(id)
                    .and_then(|h| h.as_ref())
                    .map(|i| **i)
                    .unwrap_or(leading_since)
                    .max(leading_since);
                last.elapsed() > limit
            })
            .collect()
    }

    /// `POST /reap`: removes every read replica this leader has not reached for longer than
    /// `timeout`; returns their ids. The leader only.
    pub async fn reap(&self, timeout: Duration) -> Result<Vec<NodeId>, Error> {
        self.require_leader()?;
        let since = self.leading_since();
        let gone = self.unreached(
            Timeouts {
                voter: None,
                read_only: Some(timeout),
            },
            since,
        );
        for id in &gone {
            tracing::warn!(id, ?timeout, "reaping an unreachable read replica");
            self.remove(*id).await?;
        }
        Ok(gone)
    }

    /// When this node became leader (as far as this process saw), for members never reached.
    fn leading_since(&self) -> Instant {
        let m = self.raft_metrics();
        let term = m.current_term;
        let mut since = self.reap_since.lock().expect("reap");
        match *since {
            Some((t, at)) if t == term => at,
            _ => {
                let now = Instant::now();
                *since = Some((term, now));
                now
            }
        }
    }

    /// The leader's reaping loop (`--raft-reap-*-timeout-ms`), until `stop`.
    pub async fn reap_while_leading(
        &self,
        t: Timeouts,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut failed: BTreeMap<NodeId, Instant> = BTreeMap::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if !self.is_leader() {
                continue;
            }
            let since = self.leading_since();
            for id in self.unreached(t, since) {
                // A removal that failed (an election, a change in flight) is tried again later.
                if failed
                    .get(&id)
                    .is_some_and(|at| at.elapsed() < Duration::from_secs(2))
                {
                    continue;
                }
                tracing::warn!(id, "reaping a member not reached within its reap timeout");
                match self.remove(id).await {
                    Ok(()) => {
                        failed.remove(&id);
                    }
                    Err(e) => {
                        tracing::warn!(id, "reaping failed: {e}");
                        failed.insert(id, Instant::now());
                    }
                }
            }
        }
    }
}
