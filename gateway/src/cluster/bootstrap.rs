//! Forming a cluster from the command line, as rqlite does it: `--join` (to any member, named
//! by its HTTP URL or, as rqlite takes it, its Raft address) and `--bootstrap-expect N` (the
//! founding nodes list each other with `--join`, each tells the others it exists
//! (`POST /notify`), and each founds the cluster of all of them once it knows of N nodes).
//!
//! A Raft address is reached on that node's Raft listener, where the public API is served under
//! `/api` (node TLS when configured; the same permission checks); an HTTP URL on its API.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Cluster;
use super::membership::JoinRequest;
use crate::raft::network::{HttpClient, full};
use crate::raft::{NodeId, Peer};
use crate::security::Credentials;

/// One `--join` entry, ready to be posted to.
#[derive(Clone)]
pub struct Target {
    client: HttpClient,
    /// The API's base URL: `http(s)://host:port` or `http(s)://host:port/api`.
    base: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

/// The `--join` list: `http://` and `https://` entries are HTTP API URLs (posted to with
/// `http`), bare `host:port` entries Raft addresses (posted to with `raft`, the node-to-node
/// client, under [`crate::http::FORWARD_PREFIX`]).
pub fn targets(list: &str, http: &HttpClient, raft: &HttpClient, prefix: &str) -> Vec<Target> {
    list.split(',')
        .map(|s| s.trim().trim_end_matches('/'))
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.starts_with("http://") || s.starts_with("https://") {
                Target {
                    client: http.clone(),
                    base: s.to_string(),
                }
            } else {
                Target {
                    client: raft.clone(),
                    base: raft.url(s, prefix),
                }
            }
        })
        .collect()
}

/// The nodes that notified this one (rqlite's `/notify`), kept until the cluster forms.
#[derive(Default)]
pub struct Notified(Mutex<BTreeMap<NodeId, Peer>>);

impl Notified {
    fn insert(&self, id: NodeId, peer: Peer) -> usize {
        let mut m = self.0.lock().expect("notified");
        m.insert(id, peer);
        m.len()
    }

    fn all(&self) -> BTreeMap<NodeId, Peer> {
        self.0.lock().expect("notified").clone()
    }
}

/// The answer to `POST /notify`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct NotifyAnswer {
    /// True when the notified node already belongs to a cluster (a latecomer joins it).
    pub initialized: bool,
    /// How many founding nodes the notified node knows of, itself included.
    pub known: usize,
}

impl Cluster {
    /// Records a founding node's notification (rqlite's `/notify`).
    pub async fn notify(&self, jr: &JoinRequest) -> NotifyAnswer {
        self.notified.insert(self.id, self.peer.clone());
        let known = self.notified.insert(jr.id, jr.peer());
        tracing::info!(id = jr.id, addr = %jr.addr, known, "bootstrap: notified");
        NotifyAnswer {
            initialized: self.raft.is_initialized().await.unwrap_or(false),
            known,
        }
    }
}

async fn post(
    t: &Target,
    path: &str,
    body: &[u8],
    creds: Option<&Credentials>,
) -> std::io::Result<(hyper::StatusCode, bytes::Bytes)> {
    let mut r = hyper::Request::post(format!("{}{path}", t.base))
        .header("content-type", "application/json");
    if let Some(c) = creds {
        r = r.header(hyper::header::AUTHORIZATION, c.authorization());
    }
    let r = r.body(full(body.to_vec())).map_err(std::io::Error::other)?;
    let (s, _, b) = t.client.send(r, Duration::from_secs(120)).await?;
    Ok((s, b))
}

/// Asks the nodes at `targets` (any member; it forwards to the leader) to add this one, until
/// one accepts or Raft stops. `creds` (`--join-as`) go as Basic credentials.
pub async fn join_loop(
    cluster: Arc<Cluster>,
    req: JoinRequest,
    targets: Vec<Target>,
    creds: Option<Credentials>,
) {
    let body = serde_json::to_vec(&req).expect("json");
    loop {
        for t in &targets {
            match post(t, "/join", &body, creds.as_ref()).await {
                Ok((s, _)) if s.is_success() => {
                    tracing::info!(url = %t, "joined the cluster");
                    return;
                }
                Ok((s, b)) => {
                    tracing::warn!(url = %t, "join refused ({s}): {}", String::from_utf8_lossy(&b))
                }
                Err(e) => tracing::warn!(url = %t, "join failed: {e}"),
            }
        }
        if !cluster.running() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// rqlite's `-bootstrap-expect`: notifies every target until this node knows of `expect`
/// founding nodes, then founds the cluster of exactly those (every founder does the same with
/// the same set, which Raft allows); stops once this node belongs to a cluster. A target that
/// already belongs to one (this node came late) is joined instead.
pub async fn expect_loop(
    cluster: Arc<Cluster>,
    req: JoinRequest,
    targets: Vec<Target>,
    creds: Option<Credentials>,
    expect: usize,
) {
    let body = serde_json::to_vec(&req).expect("json");
    cluster.notified.insert(cluster.id, cluster.peer.clone());
    loop {
        if cluster.raft.is_initialized().await.unwrap_or(false) {
            tracing::info!("bootstrap: this node belongs to the cluster");
            return;
        }
        for t in &targets {
            match post(t, "/notify", &body, creds.as_ref()).await {
                Ok((s, b)) if s.is_success() => {
                    let late =
                        serde_json::from_slice::<NotifyAnswer>(&b).is_ok_and(|a| a.initialized);
                    if late && !cluster.raft.is_initialized().await.unwrap_or(false) {
                        tracing::info!(url = %t, "bootstrap: the cluster exists; joining it");
                        return join_loop(cluster, req, targets, creds).await;
                    }
                }
                Ok((s, b)) => tracing::warn!(
                    url = %t,
                    "bootstrap: notify refused ({s}): {}",
                    String::from_utf8_lossy(&b)
                ),
                Err(e) => tracing::debug!(url = %t, "bootstrap: notify failed: {e}"),
            }
        }
        let known = cluster.notified.all();
        if known.len() >= expect {
            let ids: Vec<_> = known.keys().collect();
            tracing::info!(
                ?ids,
                "bootstrap: {expect} nodes known; founding the cluster"
            );
            match cluster.raft.initialize(known).await {
                Ok(()) => {}
                // Another founder's leader reached this node first: it is a member already.
                Err(e) => tracing::info!("bootstrap: {e}"),
            }
            return;
        }
        if !cluster.running() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
