//! One gateway: storage, Raft, the two HTTP listeners, membership on start-up, and a clean
//! stop (leadership handed over first).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body as AxumBody;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use bytes::Bytes;
use futures_util::StreamExt;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::config::NodeConfig;
use crate::group_commit::GroupCommit;
use crate::log_store::LogStore;
use crate::network::{self, HttpClient, Network, decode, encode};
use crate::raft_types::{NodeId, Peer, Raft, io_err};
use crate::state_machine::{SnapshotFile, StateMachine, Store};

/// Everything a request handler needs.
pub struct Node {
    pub id: NodeId,
    pub config: NodeConfig,
    pub raft: Raft,
    pub store: Arc<Store>,
    pub client: HttpClient,
    pub writes: GroupCommit,
    pub log_stats: Arc<crate::log_store::LogStats>,
    /// This node's advertised addresses.
    pub peer: Peer,
    pub started: Instant,
    pub http_requests: AtomicU64,
    /// The device port's shared state.
    pub ingress: Arc<crate::ingress::Ingress>,
}

/// The addresses a node actually bound, written to `DATA_DIR/addrs.json` at start-up so that
/// scripts and tests can use port 0 and still find the node.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BoundAddrs {
    pub http_addr: String,
    pub raft_addr: String,
    #[serde(default)]
    pub device_addr: String,
}

impl Node {
    /// The leader as this node currently believes, with its addresses.
    pub fn leader(&self) -> Option<(NodeId, Peer)> {
        let m = self.raft.metrics().borrow_watched().clone();
        let id = m.current_leader?;
        let peer = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, peer))
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// Waits up to `timeout` for some node to be leader.
    pub async fn wait_leader(&self, timeout: Duration) -> Option<(NodeId, Peer)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// If leader, hands leadership to the most up-to-date voter and waits (up to 3 s) for it
    /// to take over.
    pub async fn step_down(&self) {
        let m = self.raft.metrics().borrow_watched().clone();
        if m.current_leader != Some(self.id) {
            return;
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
        let Some(target) = voters.iter().max_by_key(|id| matched(id)).copied() else {
            return;
        };
        tracing::info!(target, "transferring leadership before shutdown");
        if let Err(e) = self.raft.trigger().transfer_leader(target).await {
            tracing::warn!("transfer leader: {e}");
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let leader = self.raft.metrics().borrow_watched().current_leader;
            if leader.is_some() && leader != Some(self.id) {
                tracing::info!(new_leader = ?leader, "leadership transferred");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!("leadership transfer did not complete in 3 s");
    }
}

/// Runs a gateway until `shutdown` resolves (or Raft fails fatally), then stops cleanly.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let started = start(config).await?;
    let node = started.node.clone();
    let mut metrics = node.raft.metrics();
    let fatal = async {
        loop {
            if let Err(e) = &metrics.borrow_watched().running_state {
                return e.to_string();
            }
            if metrics.changed().await.is_err() {
                return "raft stopped".to_string();
            }
        }
    };
    tokio::select! {
        _ = shutdown => {
            tracing::info!(node_id = node.id, "shutting down");
            started.stop().await;
            Ok(())
        }
        e = fatal => {
            tracing::error!(node_id = node.id, "FATAL: raft stopped: {e}");
            started.stop().await;
            anyhow::bail!("fatal raft error on node {}: {e}", node.id)
        }
    }
}

/// A started node and its server tasks.
pub struct Started {
    pub node: Arc<Node>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Started {
    /// Hands over leadership, stops Raft, then the listeners.
    pub async fn stop(self) {
        self.node.step_down().await;
        if let Err(e) = self.node.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
        let _ = self.stop_tx.send(true);
        for s in self.servers {
            let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
        }
    }
}

/// Opens storage, starts Raft and the listeners, bootstraps or joins. Returns once serving.
pub async fn start(config: NodeConfig) -> anyhow::Result<Started> {
    std::fs::create_dir_all(&config.data_dir)?;
    let http_listener = TcpListener::bind(&config.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding HTTP address {}: {e}", config.http_addr))?;
    let raft_listener = TcpListener::bind(&config.raft_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding Raft address {}: {e}", config.raft_addr))?;
    let device_listener = TcpListener::bind(&config.device_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding device address {}: {e}", config.device_addr))?;
    let bound = BoundAddrs {
        http_addr: http_listener.local_addr()?.to_string(),
        raft_addr: raft_listener.local_addr()?.to_string(),
        device_addr: device_listener.local_addr()?.to_string(),
    };
    let peer = Peer {
        http_addr: config
            .http_adv_addr
            .clone()
            .unwrap_or_else(|| bound.http_addr.clone()),
        raft_addr: config
            .raft_adv_addr
            .clone()
            .unwrap_or_else(|| bound.raft_addr.clone()),
        device_addr: config
            .device_adv_addr
            .clone()
            .unwrap_or_else(|| bound.device_addr.clone()),
    };
    write_atomic(
        &config.data_dir.join("addrs.json"),
        &serde_json::to_vec(&bound)?,
    )?;

    let log_store =
        LogStore::open_with_cache(&config.data_dir.join("raft.db"), config.log_cache_mib << 20)?;
    let log_stats = log_store.stats();
    let sm = StateMachine::open(&config.data_dir.join("sm"))?;
    let store = sm.store();
    let client = HttpClient::new();
    let raft = Raft::new(
        config.node_id,
        Arc::new(config.raft_config()?),
        Network::new(client.clone()),
        log_store,
        sm,
    )
    .await?;
    let writes = GroupCommit::start(
        raft.clone(),
        config.write_queue_depth,
        config.write_batch_max,
    );
    let ingress = crate::ingress::Ingress::new(
        raft.clone(),
        store.clone(),
        client.clone(),
        crate::ingress::IngressConfig {
            schema: config.schema(),
            ..Default::default()
        },
    );
    let node = Arc::new(Node {
        id: config.node_id,
        config: config.clone(),
        raft: raft.clone(),
        store,
        client,
        writes,
        log_stats,
        peer: peer.clone(),
        started: Instant::now(),
        http_requests: AtomicU64::new(0),
        ingress: ingress.clone(),
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for (listener, router) in [
        (raft_listener, raft_router(node.clone())),
        (
            http_listener,
            crate::api::router(node.clone())
                .merge(crate::ingress::forward::routes(ingress.clone())),
        ),
    ] {
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(async move {
            let graceful = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            // Small responses (Raft RPC answers, acks of writes) go out at once.
            let listener = axum::serve::ListenerExt::tap_io(listener, |s| {
                let _ = s.set_nodelay(true);
            });
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(graceful)
                .await
            {
                tracing::error!("server: {e}");
            }
        }));
    }
    let mut stop = stop_rx.clone();
    servers.push(tokio::spawn(async move {
        tokio::select! {
            () = ingress.serve(device_listener) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }));
    tracing::info!(
        node_id = node.id,
        http = %bound.http_addr,
        raft = %bound.raft_addr,
        device = %bound.device_addr,
        "cairn node started"
    );

    let initialized = raft.is_initialized().await?;
    if !initialized && config.bootstrap {
        tracing::info!("bootstrapping a new cluster");
        raft.initialize(BTreeMap::from([(node.id, peer.clone())]))
            .await?;
    } else if let Some(join) = &config.join
        && (!initialized || (!config.non_voter && !is_voter(&node)))
    {
        // A fresh node joins; so does one that crashed after joining as a learner but before
        // its promotion (the leader then only promotes it).
        let urls: Vec<String> = join
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .collect();
        tokio::spawn(join_loop(node.clone(), urls));
    }
    Ok(Started {
        node,
        stop_tx,
        servers,
    })
}

fn is_voter(node: &Node) -> bool {
    let m = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    m.membership().voter_ids().any(|v| v == node.id)
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(tmp, path)
}

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

async fn join_loop(node: Arc<Node>, urls: Vec<String>) {
    let req = JoinRequest {
        id: node.id,
        addr: node.peer.raft_addr.clone(),
        http_addr: node.peer.http_addr.clone(),
        device_addr: node.peer.device_addr.clone(),
        voter: !node.config.non_voter,
    };
    let body = serde_json::to_vec(&req).expect("json");
    loop {
        for url in &urls {
            let r = hyper::Request::post(format!("{url}/join"))
                .header("content-type", "application/json")
                .body(network::full(body.clone()))
                .map_err(io_err);
            let res = match r {
                Ok(r) => node.client.send(r, Duration::from_secs(120)).await,
                Err(e) => Err(e),
            };
            match res {
                Ok((s, _, _)) if s.is_success() => {
                    tracing::info!(%url, "joined the cluster");
                    return;
                }
                Ok((s, _, b)) => {
                    tracing::warn!(%url, "join refused ({s}): {}", String::from_utf8_lossy(&b))
                }
                Err(e) => tracing::warn!(%url, "join failed: {e}"),
            }
        }
        if node.raft.metrics().borrow_watched().running_state.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Raft RPC server (the other half of `network.rs`).
// ---------------------------------------------------------------------------------------------

fn raft_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/raft/append", post(rpc_append))
        .route("/raft/vote", post(rpc_vote))
        .route("/raft/pre-vote", post(rpc_pre_vote))
        .route("/raft/transfer-leader", post(rpc_transfer_leader))
        .route("/raft/snapshot", post(rpc_snapshot))
        .layer(DefaultBodyLimit::disable())
        .with_state(node)
}

fn reply<T: serde::Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Vec<u8> {
    encode(&r.map_err(|e| e.to_string()))
}

async fn rpc_append(State(n): State<Arc<Node>>, body: Bytes) -> Vec<u8> {
    match decode(&body) {
        Ok(req) => reply(n.raft.append_entries(req).await),
        Err(e) => reply::<(), _>(Err(e)),
    }
}

async fn rpc_vote(State(n): State<Arc<Node>>, body: Bytes) -> Vec<u8> {
    match decode(&body) {
        Ok(req) => reply(n.raft.vote(req).await),
        Err(e) => reply::<(), _>(Err(e)),
    }
}

async fn rpc_pre_vote(State(n): State<Arc<Node>>, body: Bytes) -> Vec<u8> {
    match decode(&body) {
        Ok(req) => reply(n.raft.pre_vote(req).await),
        Err(e) => reply::<(), _>(Err(e)),
    }
}

async fn rpc_transfer_leader(State(n): State<Arc<Node>>, body: Bytes) -> Vec<u8> {
    match decode(&body) {
        Ok(req) => reply(n.raft.handle_transfer_leader(req).await),
        Err(e) => reply::<(), _>(Err(e)),
    }
}

async fn rpc_snapshot(State(n): State<Arc<Node>>, body: AxumBody) -> Vec<u8> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tag = format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let path = StateMachine::incoming_path(&n.store, &tag);
    let r = receive_snapshot(&n, body, &path).await;
    let _ = std::fs::remove_file(&path);
    reply(r)
}

/// Streams an uploaded snapshot to a file, then hands it to Raft to install.
async fn receive_snapshot(
    n: &Node,
    body: AxumBody,
    path: &Path,
) -> std::io::Result<openraft::raft::SnapshotResponse<crate::raft_types::TypeConfig>> {
    let mut stream = body.into_data_stream();
    let mut file = tokio::fs::File::create(path).await?;
    let mut head_buf = Vec::new();
    let mut head = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(io_err)?;
        if head.is_some() {
            file.write_all(&chunk).await?;
            continue;
        }
        head_buf.extend_from_slice(&chunk);
        if let Some(r) = network::decode_snapshot_head(&head_buf) {
            let (vote, meta, offset) = r?;
            file.write_all(&head_buf[offset..]).await?;
            head = Some((vote, meta));
        }
    }
    file.sync_all().await?;
    drop(file);
    let (vote, meta) = head.ok_or_else(|| io_err("snapshot upload ended before its header"))?;
    let snapshot = SnapshotFile {
        file: std::fs::File::open(path)?,
        path: path.to_path_buf(),
    };
    n.raft
        .install_full_snapshot(vote, openraft::Snapshot { meta, snapshot })
        .await
        .map_err(io_err)
}
