//! The embedding API: a Rust program on a gateway links `cairn-gateway`, starts a node inside
//! its own process and talks to it through a [`Node`] handle instead of the HTTP API, the way
//! an application embeds dqlite.
//!
//! [`Node::start`] is the same start-up as `cairn node` (`daemon::start`): the node binds its
//! three listeners (the HTTP API, Raft, the device port), so other gateways, `cairn shell` and
//! devices reach it as they reach any node. The handle adds the service layer's operations:
//!
//! - [`Node::execute`] and [`Node::transaction`]: SQL through the Raft log (on a follower the
//!   statements go to the leader; results come back typed);
//! - [`Node::query`] at each [`Level`]: `None` reads this replica, the others go to the leader;
//! - [`Node::subscribe`]: the device records this replica stores, each once, as their entries
//!   commit;
//! - [`Node::shutdown`]: hand over leadership, stop Raft and the listeners.
//!
//! As with rqlite, a statement that fails is a result, not an error: its
//! [`StatementResult::error`] says why, and in a transaction the first failure rolls back the
//! whole request. [`Error`] means the request was not served (no leader, overloaded, ...).
//!
//! `examples/embedded.rs` starts a three-node cluster in one process; the crate documentation
//! has a short example.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::cluster::forward::SqlRequest;
use crate::daemon::{self, Started};
use crate::raft::{NodeId, Peer};

pub use crate::cluster::Level;
pub use crate::command::feed::{CommittedBatch, CommittedRecord, FeedError, Subscription};
pub use crate::config::NodeConfig;
pub use crate::db::sql::{Params, Statement, StatementResult, Value};
pub use crate::error::Error;

/// A gateway node running inside this process.
pub struct Node {
    started: Started,
}

impl Node {
    /// Opens the node's storage under `config.data_dir`, binds its listeners (port 0 lets the
    /// OS choose; [`Node::peer`] tells which) and starts Raft; bootstraps or joins as the
    /// configuration says. Returns once the node serves; [`Node::wait_ready`] waits for the
    /// cluster.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        Ok(Node {
            started: daemon::start(config).await?,
        })
    }

    pub fn id(&self) -> NodeId {
        self.started.cluster.id()
    }

    /// The addresses this node advertises: HTTP API, Raft, device port.
    pub fn peer(&self) -> &Peer {
        self.started.cluster.peer()
    }

    /// The service layer under the handle, for what the handle does not offer (membership,
    /// backups, status).
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.started.cluster
    }

    /// The leader as this node believes.
    pub fn leader(&self) -> Option<NodeId> {
        self.started.cluster.leader().map(|(id, _)| id)
    }

    pub fn is_leader(&self) -> bool {
        self.started.cluster.is_leader()
    }

    /// Waits up to `timeout` until this node knows a leader and holds a membership of at least
    /// `voters` voters (itself included once it joined); returns the leader.
    pub async fn wait_ready(&self, voters: usize, timeout: Duration) -> Result<NodeId, Error> {
        let m = self
            .started
            .cluster
            .raft()
            .wait(Some(timeout))
            .metrics(
                |m| {
                    crate::cluster::elected_leader(m).is_some()
                        && m.membership_config.membership().voter_ids().count() >= voters
                },
                "leader and voters",
            )
            .await
            .map_err(|e| Error::Unavailable(format!("cluster not ready: {e}")))?;
        crate::cluster::elected_leader(&m).ok_or(Error::NoLeader)
    }

    /// Runs `statements` through the Raft log as one entry, each on its own: a failing
    /// statement reports its error in its result and the others still apply.
    pub async fn execute<S: Into<Statement>>(
        &self,
        statements: impl IntoIterator<Item = S>,
    ) -> Result<Vec<StatementResult>, Error> {
        self.write(statements, false).await
    }

    /// Runs `statements` through the Raft log as one transaction (`?transaction`): the first
    /// statement that fails rolls all of them back; its result says why.
    pub async fn transaction<S: Into<Statement>>(
        &self,
        statements: impl IntoIterator<Item = S>,
    ) -> Result<Vec<StatementResult>, Error> {
        self.write(statements, true).await
    }

    async fn write<S: Into<Statement>>(
        &self,
        statements: impl IntoIterator<Item = S>,
        transaction: bool,
    ) -> Result<Vec<StatementResult>, Error> {
        self.started
            .cluster
            .sql(SqlRequest::Execute {
                statements: statements.into_iter().map(Into::into).collect(),
                transaction,
            })
            .await
    }

    /// Runs read-only `statements` at `level`: [`Level::None`] on this replica (it may lag
    /// behind the leader), [`Level::Weak`] on the leader, [`Level::Linearizable`] on the
    /// leader once a quorum confirmed it leads, [`Level::Strong`] through the Raft log. A
    /// statement that would write is refused at `Strong` and fails at the other levels.
    pub async fn query<S: Into<Statement>>(
        &self,
        statements: impl IntoIterator<Item = S>,
        level: Level,
    ) -> Result<Vec<StatementResult>, Error> {
        self.started
            .cluster
            .sql(SqlRequest::Query {
                statements: statements.into_iter().map(Into::into).collect(),
                level,
                transaction: false,
            })
            .await
    }

    /// The device records this replica stores from now on, each once, in log order, as their
    /// entries commit. A subscriber that falls more than `feed_capacity` batches behind gets
    /// [`FeedError::Lagged`] (publishing never waits for it).
    pub fn subscribe(&self) -> Subscription {
        self.started.cluster.subscribe()
    }

    /// Hands leadership over (if this node leads), stops Raft, then the listeners.
    pub async fn shutdown(self) {
        self.started.stop().await;
    }
}

impl From<&str> for Statement {
    fn from(sql: &str) -> Self {
        Statement::new(sql)
    }
}

impl From<String> for Statement {
    fn from(sql: String) -> Self {
        Statement::new(sql)
    }
}

/// `("INSERT INTO t VALUES(?, ?)", vec![Value::Integer(1), Value::Text("a".into())])`
impl<S: Into<String>> From<(S, Vec<Value>)> for Statement {
    fn from((sql, params): (S, Vec<Value>)) -> Self {
        Statement {
            sql: sql.into(),
            params: Params::Positional(params),
        }
    }
}
