//! Raft RPCs between gateways, both halves: HTTP/1.1 on `--raft-addr`, postcard bodies.
//!
//! | path | request body | response body |
//! |---|---|---|
//! | `POST /raft/append` | `AppendEntriesRequest` | `Result<AppendEntriesResponse, String>` |
//! | `POST /raft/vote` | `VoteRequest` | `Result<VoteResponse, String>` |
//! | `POST /raft/pre-vote` | `VoteRequest` | `Result<VoteResponse, String>` |
//! | `POST /raft/transfer-leader` | `TransferLeaderRequest` | `Result<TransferLeaderResponse, String>` |
//! | `POST /raft/snapshot` | `u32` LE length, postcard `(Vote, SnapshotMeta)`, then the database's pages in order (a database file) | `Result<SnapshotResponse, String>` |
//!
//! From format version 2 every request and response also carries the header
//! `cairn-version` ([`crate::version::HEADER`]) with the sender's highest supported format
//! version; a version 1 node (v0.1.0) sends none. The bodies are version 1's, unchanged
//! (`gateway/tests/golden_v1.rs` freezes them). The leader notes each peer's version from its
//! answers (`Metrics::versions`): that is how it learns when every member supports a version.
//! Every `/raft/*` request also carries the sender's and the expected receiver's incarnation
//! in headers, and a node answers `409` to one not meant for it (`raft::incarnation`).
//!
//! The `Err(String)` arm carries a remote failure (the remote Raft stopped); transport problems
//! are HTTP or socket errors. Connections are pooled and reused (keep-alive), `TCP_NODELAY` is
//! set, connecting times out after 500 ms and every RPC after openraft's hard TTL (at least
//! [`APPEND_TTL_FLOOR`] for appends). Snapshots are
//! streamed in 64 KiB chunks: from the sender's live database (one read transaction, page by
//! page), to a file on the receiver.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body as AxumBody;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncReadExt;

use super::incarnation::Incarnations;
use super::state_machine::{SnapshotData, StateMachine};
use super::{NodeId, Peer, Raft, SnapshotMeta, TypeConfig, Vote, io_err};
use crate::metrics::Metrics;
use crate::security::tls::{NodeConnector, node_connector};
use crate::version::{self, SUPPORTED};

/// The shortest time an AppendEntries RPC (heartbeats included) may take before it counts as
/// failed.
pub const APPEND_TTL_FLOOR: Duration = Duration::from_millis(500);

/// Request and response body type of the shared HTTP client.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A pooled HTTP/1.1 client, shared by the Raft transport, the device path's node-to-node
/// calls and the API's forwarding: `https://` with node mutual TLS (`--node-cert` and
/// friends), `http://` without.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<NodeConnector, Body>,
    scheme: &'static str,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new(None)
    }
}

/// A body from bytes in memory.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A body streamed from a file, 64 KiB at a time, after an optional prefix.
pub fn file_body(prefix: Vec<u8>, file: std::fs::File) -> Body {
    let file = tokio::fs::File::from_std(file);
    let stream =
        futures_util::stream::unfold((Some(prefix), file), |(prefix, mut file)| async move {
            if let Some(p) = prefix {
                return Some((Ok(Frame::data(Bytes::from(p))), (None, file)));
            }
            let mut buf = vec![0u8; 64 * 1024];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Frame::data(Bytes::from(buf))), (None, file)))
                }
                Err(e) => Some((Err(e), (None, file))),
            }
        });
    BodyExt::boxed(StreamBody::new(stream))
}

/// A body of a snapshot view's pages, read on a blocking thread 256 KiB at a time, after a
/// prefix. When the last page is read the view's transaction ends and the WAL, which grew
/// meanwhile, is truncated.
fn pages_body(prefix: Vec<u8>, mut pages: crate::db::Pages) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let _ = tx.try_send(Ok(Bytes::from(prefix)));
    tokio::task::spawn_blocking(move || {
        loop {
            let chunk = match pages.next_chunk(256 * 1024) {
                Ok(Some(c)) => Ok(Bytes::from(c)),
                Ok(None) => break,
                Err(e) => Err(io_err(e)),
            };
            let failed = chunk.is_err();
            // The receiver went away (the transfer was cancelled or failed): stop reading.
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
        super::finish_transfer(pages);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (c.map(Frame::data), rx))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

impl HttpClient {
    /// `tls`: this node's client side of node TLS (`tls::node_client_config`), or `None` for
    /// plain text.
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        Self::with_connector(
            node_connector(Self::tcp(Duration::from_millis(500)), tls),
            scheme,
        )
    }

    /// The TCP side of a connector: `TCP_NODELAY`, connects fail after `connect_timeout`.
    pub fn tcp(connect_timeout: Duration) -> HttpConnector {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector
    }

    /// A client over `connector` (an export destination's, `tls::destination_connector`);
    /// `scheme` is what [`Self::url`] puts in front.
    pub fn with_connector(connector: NodeConnector, scheme: &'static str) -> Self {
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        HttpClient { inner, scheme }
    }

    /// The URL of `path` on a peer's listener at `addr` (`https://` with node TLS).
    pub fn url(&self, addr: &str, path: &str) -> String {
        format!("{}://{addr}{path}", self.scheme)
    }

    /// Sends `req` and collects the whole response, failing after `timeout`.
    pub async fn send(
        &self,
        req: hyper::Request<Body>,
        timeout: Duration,
    ) -> std::io::Result<(hyper::StatusCode, hyper::HeaderMap, Bytes)> {
        let fut = async {
            // hyper's own message is only "client error (Connect)": the causes say what failed
            // (refused, a certificate of an unknown issuer, ...).
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| io_err(with_causes(&e)))?;
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await.map_err(io_err)?.to_bytes();
            Ok::<_, std::io::Error>((parts.status, parts.headers, bytes))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))?
    }

    /// POSTs a postcard `body` to `path` on the peer at `addr`; the answer's body, or an error
    /// for a non-2xx status.
    pub async fn post(
        &self,
        addr: &str,
        path: &str,
        body: Body,
        timeout: Duration,
    ) -> std::io::Result<Bytes> {
        self.post_as(addr, path, "application/octet-stream", body, timeout)
            .await
    }

    /// [`Self::post`] with a JSON body (tests and tools calling a node's API).
    pub async fn post_json(
        &self,
        addr: &str,
        path: &str,
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> std::io::Result<Bytes> {
        self.post_as(addr, path, "application/json", full(body), timeout)
            .await
    }

    async fn post_as(
        &self,
        addr: &str,
        path: &str,
        content_type: &str,
        body: Body,
        timeout: Duration,
    ) -> std::io::Result<Bytes> {
        let req = hyper::Request::post(self.url(addr, path))
            .header("content-type", content_type)
            .body(body)
            .map_err(io_err)?;
        let (status, _, bytes) = self.send(req, timeout).await?;
        if !status.is_success() {
            return Err(io_err(format!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        Ok(bytes)
    }
}

/// `e` and its causes, `: `-separated (repeats of the same text left out).
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Encodes an RPC body.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding of a Raft message cannot fail")
}

/// Decodes an RPC body.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> std::io::Result<T> {
    postcard::from_bytes(b).map_err(|e| io_err(format!("undecodable RPC body: {e}")))
}

/// Creates one [`PeerConnection`] per target; all share the pooled client.
#[derive(Clone, Default)]
pub struct Network {
    client: HttpClient,
    /// Where peers' format versions are noted (`versions`).
    metrics: Arc<Metrics>,
    incarnations: Option<Arc<Incarnations>>,
}

impl Network {
    pub fn new(client: HttpClient) -> Self {
        Network {
            client,
            metrics: Arc::default(),
            incarnations: None,
        }
    }

    /// Sends this node's and the receiver's incarnations with every RPC.
    pub fn with_incarnations(mut self, incarnations: Arc<Incarnations>) -> Self {
        self.incarnations = Some(incarnations);
        self
    }

    /// Notes the format version each peer answers with into `metrics.versions`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

/// The format version a request or response's headers name (none: version 1).
pub fn version_of(headers: &hyper::HeaderMap) -> u32 {
    version::from_header(headers.get(version::HEADER).map(|v| v.as_bytes()))
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Peer) -> Self::Network {
        PeerConnection {
            target,
            addr: Arc::from(node.raft_addr.as_str()),
            client: self.client.clone(),
            metrics: self.metrics.clone(),
            incarnations: self.incarnations.clone(),
        }
    }
}

/// The Raft RPC client for one peer.
pub struct PeerConnection {
    target: NodeId,
    addr: Arc<str>,
    client: HttpClient,
    metrics: Arc<Metrics>,
    incarnations: Option<Arc<Incarnations>>,
}

impl PeerConnection {
    /// POSTs `body` to `path` with this node's version header and the incarnation headers;
    /// notes the peer's version from a successful answer.
    async fn post(&self, path: &str, body: Body, timeout: Duration) -> std::io::Result<Bytes> {
        let mut req = hyper::Request::post(self.client.url(&self.addr, path))
            .header("content-type", "application/octet-stream")
            .header(version::HEADER, SUPPORTED.to_string());
        if let Some(i) = &self.incarnations {
            for (k, v) in i.headers(self.target) {
                req = req.header(k, v);
            }
        }
        let req = req.body(body).map_err(io_err)?;
        let (status, headers, bytes) = self.client.send(req, timeout).await?;
        if !status.is_success() {
            return Err(io_err(format!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        self.metrics
            .versions
            .note_peer(self.target, version_of(&headers));
        Ok(bytes)
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let bytes = self
            .post(path, full(encode(req)), timeout)
            .await
            .map_err(|e| {
                if matches!(e.kind(), std::io::ErrorKind::TimedOut) {
                    RPCError::Network(NetworkError::new(&e))
                } else {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
            })?;
        let r: Result<Resp, String> =
            decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|remote| {
            RPCError::Network(NetworkError::new(&io_err(format!(
                "node {}: {remote}",
                self.target
            ))))
        })
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft's TTL for appends is one heartbeat interval (50 ms by default): too short
        // for a follower to take a 1 MiB group entry on a loaded machine, and an append that
        // times out is sent again, which loads the follower more. Give it a floor.
        let ttl = option.hard_ttl().max(APPEND_TTL_FLOOR);
        self.call("/raft/append", &rpc, ttl).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("/raft/vote", &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("/raft/pre-vote", &rpc, option.hard_ttl()).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("/raft/transfer-leader", &req, option.hard_ttl())
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // A snapshot is the database in the active version's layout: never sent to a node
        // that does not support it (it would not know the layout).
        let layout = self.metrics.versions.active();
        let theirs = self
            .metrics
            .versions
            .peer(self.target)
            .unwrap_or(version::V1);
        if layout > theirs {
            let e = io_err(format!(
                "not sending node {} a snapshot of format version {layout}: it supports up to {theirs}",
                self.target
            ));
            return Err(StreamingError::Unreachable(Unreachable::new(&e)));
        }
        let head = encode(&(vote, snapshot.meta.clone()));
        let mut prefix = (head.len() as u32).to_le_bytes().to_vec();
        prefix.extend_from_slice(&head);
        let body = match snapshot.snapshot {
            SnapshotData::Live(pages) => pages_body(prefix, pages),
            SnapshotData::Received(path) => {
                let file = std::fs::File::open(path)
                    .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
                file_body(prefix, file)
            }
        };
        let send = self.post("/raft/snapshot", body, Duration::from_secs(600));
        let bytes = tokio::select! {
            r = send => r.map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let r: Result<SnapshotResponse<TypeConfig>, String> =
            decode(&bytes).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        r.map_err(|remote| StreamingError::Network(NetworkError::new(&io_err(remote))))
    }
}

/// Decodes the head of a snapshot upload: `(vote, meta)` and where the file bytes start.
pub fn decode_snapshot_head(buf: &[u8]) -> Option<std::io::Result<(Vote, SnapshotMeta, usize)>> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let head = buf.get(4..4 + len)?;
    Some(decode::<(Vote, SnapshotMeta)>(head).map(|(v, m)| (v, m, 4 + len)))
}

// ---------------------------------------------------------------------------------------------
// The server half: the routes on `--raft-addr`.
// ---------------------------------------------------------------------------------------------

/// What the RPC handlers need: the local Raft and where incoming snapshots go.
struct RpcServer {
    raft: Raft,
    /// Where an accepted AppendEntries is noted (`freshness` of `none` reads).
    contact: Arc<crate::metrics::Metrics>,
    state_machine: StateMachine,
    /// Numbers incoming snapshot files.
    snapshots: AtomicU64,
    /// The largest snapshot stream accepted (the configured maximum database size).
    max_snapshot: u64,
}

/// The largest vote, pre-vote or transfer-leader body: a few hundred bytes in practice.
pub const SMALL_RPC_LIMIT: usize = 64 << 10;

/// The largest AppendEntries body: twice the API's body limit, so the largest write the API
/// accepts still replicates (with room for the entries around it); held in memory.
pub const APPEND_LIMIT: usize = 512 << 20;

/// The Raft RPC routes (the table above), to be served on the Raft listener only, with
/// their body limits: [`SMALL_RPC_LIMIT`], [`APPEND_LIMIT`], and `max_snapshot` bytes for a
/// snapshot stream (written to a file as it arrives). `GET /raft/ping` answers 200: the
/// reachability check of `/nodes` and of joins (with node TLS it proves the peer holds a
/// certificate of the cluster CA for that address).
pub fn routes(
    raft: Raft,
    state_machine: StateMachine,
    max_snapshot: u64,
    metrics: Arc<crate::metrics::Metrics>,
) -> Router {
    let server = Arc::new(RpcServer {
        raft,
        contact: metrics,
        state_machine,
        snapshots: AtomicU64::new(0),
        max_snapshot,
    });
    let small = DefaultBodyLimit::max(SMALL_RPC_LIMIT);
    Router::new()
        .route(
            "/raft/append",
            post(rpc_append).layer(DefaultBodyLimit::max(APPEND_LIMIT)),
        )
        .route("/raft/vote", post(rpc_vote).layer(small))
        .route("/raft/pre-vote", post(rpc_pre_vote).layer(small))
        .route(
            "/raft/transfer-leader",
            post(rpc_transfer_leader).layer(small),
        )
        .route(
            "/raft/snapshot",
            post(rpc_snapshot).layer(DefaultBodyLimit::disable()),
        )
        .route("/raft/ping", axum::routing::get(|| async { "ok" }))
        .layer(axum::middleware::map_response(with_version))
        .with_state(server)
}

/// Every answer on the Raft routes names this node's highest supported format version.
async fn with_version(mut r: axum::response::Response) -> axum::response::Response {
    r.headers_mut()
        .insert(version::HEADER, hyper::header::HeaderValue::from(SUPPORTED));
    r
}

fn reply<T: serde::Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Vec<u8> {
    encode(&r.map_err(|e| e.to_string()))
}

/// Decodes the request, hands it to `call` and encodes its result (the `Err(String)` arm
/// also carries an undecodable request).
async fn serve_rpc<Req, Resp, E, Fut>(body: &[u8], call: impl FnOnce(Req) -> Fut) -> Vec<u8>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    E: std::fmt::Display,
    Fut: Future<Output = Result<Resp, E>>,
{
    match decode(body) {
        Ok(req) => reply(call(req).await),
        Err(e) => reply::<(), _>(Err(e)),
    }
}

async fn rpc_append(
    State(n): State<Arc<RpcServer>>,
    headers: hyper::HeaderMap,
    body: Bytes,
) -> Vec<u8> {
    // Entries a newer leader sent that this binary cannot decode: say which version they
    // need and refuse them (the leader sends them again); nothing is applied, nothing lost.
    let sender = version_of(&headers);
    if sender > SUPPORTED
        && let Err(e) = decode::<AppendEntriesRequest<TypeConfig>>(&body)
    {
        n.contact.versions.block(version::needs_newer(
            &format!("entries from a leader of format version {sender} ({e})"),
            sender,
        ));
        return reply::<(), _>(Err(e));
    }
    serve_rpc(&body, |req: AppendEntriesRequest<TypeConfig>| async {
        let commit = req.leader_commit.map(|l| l.index);
        let r = n.raft.append_entries(req).await;
        if matches!(
            r,
            Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_))
                | Ok(AppendEntriesResponse::Conflict)
        ) {
            n.contact.leader_contact.touch(commit);
        }
        r
    })
    .await
}

async fn rpc_vote(State(n): State<Arc<RpcServer>>, body: Bytes) -> Vec<u8> {
    serve_rpc(&body, |req| n.raft.vote(req)).await
}

async fn rpc_pre_vote(State(n): State<Arc<RpcServer>>, body: Bytes) -> Vec<u8> {
    serve_rpc(&body, |req| n.raft.pre_vote(req)).await
}

async fn rpc_transfer_leader(State(n): State<Arc<RpcServer>>, body: Bytes) -> Vec<u8> {
    serve_rpc(&body, |req| n.raft.handle_transfer_leader(req)).await
}

async fn rpc_snapshot(State(n): State<Arc<RpcServer>>, body: AxumBody) -> Vec<u8> {
    let tag = format!(
        "{}-{}",
        std::process::id(),
        n.snapshots.fetch_add(1, Ordering::Relaxed)
    );
    let path = n.state_machine.incoming_path(&tag);
    let r = receive_snapshot(&n, body, &path).await;
    let _ = std::fs::remove_file(&path);
    reply(r)
}

/// The format version of a received snapshot's layout (the active version it records).
fn snapshot_layout(path: &Path) -> std::io::Result<u32> {
    let conn = rusqlite::Connection::open(path).map_err(io_err)?;
    crate::command::version::read_active(&conn).map_err(io_err)
}

/// Streams an uploaded snapshot to a file, then hands it to Raft to install.
async fn receive_snapshot(
    n: &RpcServer,
    body: AxumBody,
    path: &Path,
) -> std::io::Result<SnapshotResponse<TypeConfig>> {
    // The file is written on a blocking thread through a 4 MiB buffer: the body comes in
    // chunks of one socket read, and a blocking-pool hop per chunk (`tokio::fs`) made the
    // receiver set the transfer's pace, while the serving node's WAL grows for as long as
    // the transfer lasts.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let file_path = path.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut out =
            std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(&file_path)?);
        while let Some(b) = rx.blocking_recv() {
            out.write_all(&b)?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    });
    let streamed = async {
        let mut stream = body.into_data_stream();
        let mut head_buf = Vec::new();
        let mut head = None;
        let mut received = 0u64;
        let stopped = || io_err("snapshot file writer stopped");
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(io_err)?;
            received += chunk.len() as u64;
            if received > n.max_snapshot.saturating_add(SMALL_RPC_LIMIT as u64) {
                return Err(io_err(format!(
                    "snapshot larger than the maximum database size ({} bytes, max_db_size_mib)",
                    n.max_snapshot
                )));
            }
            if head.is_none() && head_buf.len() > SMALL_RPC_LIMIT {
                return Err(io_err("snapshot header too large"));
            }
            if head.is_some() {
                tx.send(chunk).await.map_err(|_| stopped())?;
                continue;
            }
            head_buf.extend_from_slice(&chunk);
            if let Some(r) = decode_snapshot_head(&head_buf) {
                let (vote, meta, offset) = r?;
                let rest = Bytes::copy_from_slice(&head_buf[offset..]);
                tx.send(rest).await.map_err(|_| stopped())?;
                head = Some((vote, meta));
            }
        }
        Ok(head)
    }
    .await;
    drop(tx);
    // The writer's own error first (a full disk), rather than "stopped".
    let head = match (streamed, writer.await.map_err(io_err)?) {
        (_, Err(e)) | (Err(e), Ok(())) => return Err(e),
        (Ok(head), Ok(())) => head,
    };
    let (vote, meta) = head.ok_or_else(|| io_err("snapshot upload ended before its header"))?;
    let layout = snapshot_layout(path)?;
    if layout > SUPPORTED {
        let why = version::needs_newer(&format!("a snapshot of format version {layout}"), layout);
        n.contact.versions.block(why.clone());
        return Err(io_err(why));
    }
    let snapshot = SnapshotData::Received(path.to_path_buf());
    n.raft
        .install_full_snapshot(vote, openraft::Snapshot { meta, snapshot })
        .await
        .map_err(io_err)
}
