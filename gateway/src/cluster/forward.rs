//! SQL that reaches the leader from any node: [`Cluster::sql`] runs a write or a read here when
//! this node may serve it, else sends it to the leader's node-to-node listener
//! (`--raft-addr`), where this route runs it:
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /cluster/sql` | postcard [`SqlRequest`] | postcard `Result<Vec<StatementResult>, Error>` |
//! | `POST /cluster/leave` | postcard node id | postcard `Result<(), Error>`: the leader removes the member ([`Cluster::leave`]) |
//!
//! Values travel typed (postcard), unlike a detour through the JSON API. The route never
//! forwards again: a node that no longer leads answers `NotLeader`. The HTTP API keeps its
//! own forwarding (it relays rqlite's answer as it came).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::Method;
use axum::routing::post;
use serde::{Deserialize, Serialize};

use super::{Cluster, Level};
use crate::db::sql::{Statement, StatementResult};
use crate::error::Error;
use crate::raft::network::{decode, encode};

/// How long a forwarded SQL request may take on the leader.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// A SQL request as it travels to the leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SqlRequest {
    /// Statements through the log as one entry, made deterministic first ([`Cluster::execute`]).
    Execute {
        statements: Vec<Statement>,
        transaction: bool,
    },
    /// Read-only statements at `level` ([`Cluster::query`]).
    Query {
        statements: Vec<Statement>,
        level: Level,
        transaction: bool,
    },
}

impl Cluster {
    /// Runs `req` on this node, whatever it is (the leader checks are the callee's).
    async fn sql_here(&self, req: &SqlRequest) -> Result<Vec<StatementResult>, Error> {
        match req {
            SqlRequest::Execute {
                statements,
                transaction,
            } => self.execute(statements.clone(), *transaction, true).await,
            SqlRequest::Query {
                statements,
                level,
                transaction,
            } => self.query(statements.clone(), *level, *transaction).await,
        }
    }

    /// Runs `req` where it must run: a read at [`Level::None`] here, anything else on the
    /// leader, by [`Cluster::on_leader`]'s rules (here if this node leads, else forwarded).
    pub async fn sql(&self, req: SqlRequest) -> Result<Vec<StatementResult>, Error> {
        if matches!(
            req,
            SqlRequest::Query {
                level: Level::None,
                ..
            }
        ) {
            return self.sql_here(&req).await;
        }
        self.on_leader(
            || self.sql_here(&req),
            || async {
                self.call_leader_internal::<Result<Vec<StatementResult>, Error>>(
                    Method::POST,
                    "/cluster/sql",
                    encode(&req),
                    FORWARD_TIMEOUT,
                )
                .await?
            },
        )
        .await
    }
}

/// The node-to-node SQL route, served on the Raft listener.
pub fn routes(cluster: Arc<Cluster>) -> axum::Router {
    axum::Router::new()
        .route("/cluster/sql", post(forwarded))
        .route("/cluster/leave", post(leave))
        .route("/cluster/incarnation", post(incarnation))
        // As much as the HTTP API takes.
        .layer(DefaultBodyLimit::max(256 << 20))
        .with_state(cluster)
}

async fn forwarded(State(cluster): State<Arc<Cluster>>, body: Bytes) -> Vec<u8> {
    let results = match decode::<SqlRequest>(&body) {
        Ok(req) => cluster.sql_here(&req).await,
        Err(e) => Err(Error::BadRequest(e.to_string())),
    };
    encode(&results)
}

/// A member stopping with `--raft-cluster-remove-shutdown` asks the leader to remove it:
/// postcard `(id, incarnation)`, or `id` alone from a release without incarnations.
async fn leave(State(cluster): State<Arc<Cluster>>, body: Bytes) -> Vec<u8> {
    let r = match decode::<(crate::raft::NodeId, u64)>(&body) {
        Ok((id, inc)) => cluster.leave_for(id, Some(inc)).await,
        Err(_) => match decode::<crate::raft::NodeId>(&body) {
            Ok(id) => cluster.leave_for(id, None).await,
            Err(e) => Err(Error::BadRequest(e.to_string())),
        },
    };
    encode(&r)
}

/// A member whose log predates incarnations records its own: postcard `(id, incarnation)`.
async fn incarnation(State(cluster): State<Arc<Cluster>>, body: Bytes) -> Vec<u8> {
    let r = match decode::<(crate::raft::NodeId, u64)>(&body) {
        Ok((id, inc)) => cluster.record_incarnation(id, inc).await,
        Err(e) => Err(Error::BadRequest(e.to_string())),
    };
    encode(&r)
}
