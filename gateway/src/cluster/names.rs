//! rqlite's string node ids. A node started with `--node-id NAME` (any string that is not a
//! positive integer) runs under the Raft id `config::node_id_for_name(NAME)`: ids derive from
//! names, so a name given to `/remove` or in a join needs no lookup. The names themselves are
//! replicated in `_cairn_node_names` (a registry command), so every node shows every member's
//! name in `/status`, `/nodes` and `/leader`; the Raft formats keep u64 ids.
//!
//! A named node records its name itself: once it is a member, it asks the leader (or, leading,
//! proposes) until its replica holds the name.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use hyper::Method;

use super::Cluster;
use crate::command::registry::{RegistryCommand, RegistryOutcome};
use crate::command::{Command, CommandResponse};
use crate::error::Error;
use crate::raft::NodeId;
use crate::raft::network::{decode, encode};

impl Cluster {
    /// Members' names as this replica holds them (empty if none has one).
    pub async fn node_names(&self) -> BTreeMap<NodeId, String> {
        self.read(crate::db::registry::node_names)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Records `name` for member `id`. The leader only.
    pub async fn name_node(&self, id: NodeId, name: String) -> Result<(), Error> {
        let m = self.raft_metrics();
        if m.membership_config.membership().get_node(&id).is_none() {
            return Err(Error::BadRequest(format!("node {id} is not a member")));
        }
        match self
            .write(Command::DeviceRegistry(RegistryCommand::NameNode {
                id,
                name,
            }))
            .await?
        {
            CommandResponse::DeviceRegistry(RegistryOutcome::Named) => Ok(()),
            other => Err(Error::Storage(format!("unexpected response {other:?}"))),
        }
    }

    /// Until this node's replica holds `name` for it: asks the leader to record it (or
    /// records it, leading). Runs until the node stops.
    pub async fn keep_name(self: Arc<Self>, name: String) {
        while self.running() {
            let member = self
                .raft_metrics()
                .membership_config
                .membership()
                .get_node(&self.id)
                .is_some();
            if member && self.node_names().await.get(&self.id) == Some(&name) {
                return;
            }
            if member && self.leader().is_some() {
                let r = if self.is_leader() {
                    self.name_node(self.id, name.clone()).await
                } else {
                    self.call_leader_internal::<Result<(), Error>>(
                        Method::POST,
                        "/cluster/name",
                        encode(&(self.id, name.clone())),
                        Duration::from_secs(10),
                    )
                    .await
                    .and_then(|r| r)
                };
                match r {
                    Ok(()) => tracing::info!(%name, "node name recorded"),
                    Err(e) => tracing::debug!(%name, "node name not recorded yet: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// How a node id is shown: its name, if it has one, else the number.
pub fn shown(names: &BTreeMap<NodeId, String>, id: NodeId) -> String {
    names.get(&id).cloned().unwrap_or_else(|| id.to_string())
}

/// The node-to-node route a named follower uses (on the Raft listener): `POST /cluster/name`,
/// postcard `(id, name)`, answered with postcard `Result<(), Error>`.
pub fn routes(cluster: Arc<Cluster>) -> axum::Router {
    axum::Router::new()
        .route("/cluster/name", post(name))
        .with_state(cluster)
}

async fn name(State(cluster): State<Arc<Cluster>>, body: Bytes) -> Vec<u8> {
    let r = match decode::<(NodeId, String)>(&body) {
        Ok((id, name)) => cluster.name_node(id, name).await,
        Err(_) => Err(Error::BadRequest("undecodable node name".into())),
    };
    encode(&r)
}
