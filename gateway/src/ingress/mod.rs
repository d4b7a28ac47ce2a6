//! Device ingress: the device port of every gateway.
//!
//! ```text
//! device ─TCP─▶ listener ─▶ connection task (one per device; connection.rs)
//!                              │ leader here?  ── yes ─▶ leader GroupQueue ─▶ RaftSink: one entry per group
//!                              │               ── no ──▶ forward GroupQueue ─▶ POST /ingress/forward on the leader
//!                              ◀── outcomes in order ── Ack{through_seq} after commit + apply
//! ```
//!
//! - [`apply`]: the [`Command::DeviceBatches`](crate::command::Command::DeviceBatches) payload
//!   and its apply function (rows + high-water in the entry's transaction).
//! - [`batcher`]: the bounded grouping queue shared by the leader and follower paths.
//! - [`leader`]: the Raft end of the leader's queue.
//! - [`forward`]: the follower end (HTTP to the leader) and the HTTP routes: forwarded batches,
//!   linearizable high-water reads, and the device admin API.
//! - [`connection`]: the per-connection protocol state machine.
//! - [`metrics`]: counters for `/status`.
//! - [`admin`]: `cairn device add|list|remove`.

pub mod admin;
pub mod apply;
pub mod batcher;
pub mod connection;
pub mod forward;
pub mod leader;
pub mod metrics;

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_protocol::GatewayAddr;
use openraft::async_runtime::watch::WatchReceiver;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use self::apply::DeviceBatch;
use self::batcher::{GroupLimits, GroupQueue, IngestError, Outcomes};
use crate::network::HttpClient;
use crate::raft_types::{NodeId, Peer, Raft};
use crate::registry::{self, DeviceKey};
use crate::schema::Schema;
use crate::state_machine::Store;

/// Records in a full batch frame of typical readings (about 50 three-value records fit in
/// `MAX_FRAME`): converts queue slots (batches) into credit (records).
const RECORDS_PER_BATCH: usize = 50;

/// Settings of the device path.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// Records a device may send past its last ack (Welcome/Ack credit) when the queue is
    /// empty; scaled down as the leader's queue fills.
    pub credit: u16,
    /// The leader's grouping queue (and, with one group in flight, the follower's).
    pub limits: GroupLimits,
    /// Stream tables, proposed by this node when it becomes leader.
    pub schema: Schema,
    /// A connection with no frame for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            credit: 1024,
            limits: GroupLimits::default(),
            schema: Schema::default(),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// The device path of one node.
pub struct Ingress {
    raft: Raft,
    store: Arc<Store>,
    config: IngressConfig,
    leader_queue: GroupQueue,
    forward_queue: GroupQueue,
    http: HttpClient,
    /// Last authenticated Hello per device: `(boot, counter)`, to refuse a replayed Hello.
    hellos: Mutex<HashMap<u64, (u32, u32)>>,
}

impl Ingress {
    /// Starts the grouping tasks; call [`Ingress::serve`] with the bound device listener.
    pub fn new(
        raft: Raft,
        store: Arc<Store>,
        http: HttpClient,
        config: IngressConfig,
    ) -> Arc<Self> {
        let leader_queue = GroupQueue::spawn(
            leader::RaftSink::new(raft.clone(), config.schema.clone()),
            config.limits,
        );
        let forward_queue = GroupQueue::spawn(
            forward::ForwardSink::new(raft.clone(), http.clone()),
            GroupLimits {
                max_in_flight: 1,
                ..config.limits
            },
        );
        Arc::new(Ingress {
            raft,
            store,
            config,
            leader_queue,
            forward_queue,
            http,
            hellos: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts device connections forever, one task each.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(connection::serve(self.clone(), stream));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a device connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The Raft handle (for the HTTP routes).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The key of a registered device, from this node's replica.
    pub fn device_key(&self, device_id: u64) -> Result<Option<DeviceKey>, IngestError> {
        match self.store.read(|c| registry::device_key(c, device_id)) {
            Ok(Ok(k)) => Ok(k),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the device registry");
                Err(IngestError::Internal)
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the device registry");
                Err(IngestError::Internal)
            }
        }
    }

    /// The key for a Hello: this replica's, or, if it does not know the device and is not the
    /// leader, the leader's (a device registered a moment ago may reach a lagging follower).
    pub async fn hello_key(&self, device_id: u64) -> Result<Option<DeviceKey>, IngestError> {
        match self.device_key(device_id)? {
            Some(k) => Ok(Some(k)),
            None if self.raft.is_leader() => Ok(None),
            // A node that knows no leader (still joining, or electing) cannot tell an unknown
            // device from one registered after its last applied entry: NotLeader, retry soon.
            None if self.leader_id().is_none() => Err(IngestError::NotLeader),
            None => forward::remote_device_key(self, device_id).await,
        }
    }

    /// Records an authenticated Hello; false if it is not newer than the last one of the same
    /// boot (a replayed connection start).
    pub fn fresh_hello(&self, device_id: u64, boot: u32, counter: u32) -> bool {
        let mut hellos = self.hellos.lock().expect("hello table");
        match hellos.get(&device_id) {
            Some(&(b, c)) if b == boot && counter <= c => false,
            _ => {
                hellos.insert(device_id, (boot, counter));
                true
            }
        }
    }

    /// Where a batch goes: this node's Raft if it leads, else the leader by forwarding.
    pub fn submit(&self, batch: DeviceBatch) -> Result<oneshot::Receiver<Outcomes>, IngestError> {
        if self.raft.is_leader() {
            self.leader_queue.try_submit(vec![batch])
        } else if self.leader_id().is_some() {
            metrics::METRICS
                .batches_forwarded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.forward_queue.try_submit(vec![batch])
        } else {
            Err(IngestError::NotLeader)
        }
    }

    /// Batches forwarded by a follower, committed here as the leader.
    pub async fn submit_forwarded(&self, batches: Vec<DeviceBatch>) -> Outcomes {
        if !self.raft.is_leader() {
            return Err(IngestError::NotLeader);
        }
        metrics::METRICS
            .batches_received_forwarded
            .fetch_add(batches.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.leader_queue.submit(batches).await
    }

    /// The device's committed high-water, read linearizably: on the leader after confirming
    /// leadership and applying up to the read index; on a follower by asking the leader.
    pub async fn high_water(&self, device_id: u64) -> Result<u64, IngestError> {
        if self.raft.is_leader() {
            self.local_high_water(device_id).await
        } else {
            forward::remote_high_water(self, device_id).await
        }
    }

    /// The linearizable read on the leader (SPEC §8 gateway rule 2): first every batch of this
    /// device still queued or in flight here is decided, then leadership is confirmed and the
    /// state machine caught up to the read index, then the high-water is read.
    pub async fn local_high_water(&self, device_id: u64) -> Result<u64, IngestError> {
        if !self
            .leader_queue
            .settled(device_id, Duration::from_secs(10))
            .await
        {
            return Err(IngestError::Overloaded);
        }
        if let Err(e) = crate::raft_types::confirm_leadership(&self.raft).await {
            tracing::info!(device_id, error = %e, "high-water read: leadership not confirmed");
            return Err(IngestError::NotLeader);
        }
        match self.store.read(|c| registry::high_water(c, device_id)) {
            Ok(Ok(hw)) => Ok(hw),
            _ => Err(IngestError::Internal),
        }
    }

    /// The credit for the next Welcome/Ack: each open connection's share of the free room in
    /// the queue its batches go to (the leader's, or the forward queue on a follower), so a
    /// large fleet does not overfill it (`Overloaded`), capped at the configured credit. At
    /// least one full batch while there is room, so batches stay large; 1 when the queue is
    /// full (a device can always make progress once it is acked).
    pub fn credit(&self) -> u16 {
        let free = if self.raft.is_leader() {
            self.leader_queue.free_slots()
        } else {
            self.forward_queue.free_slots()
        };
        if free == 0 {
            return 1;
        }
        let cap = usize::from(self.config.credit).max(1);
        let connections = (metrics::METRICS
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed) as usize)
            .max(1);
        (free * RECORDS_PER_BATCH / connections).clamp(RECORDS_PER_BATCH.min(cap), cap) as u16
    }

    fn leader_id(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    fn leader_peer(&self) -> Option<Peer> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let leader = m.current_leader?;
        m.membership_config.membership().get_node(&leader).cloned()
    }

    /// The leader's device address, when this node knows it and is not the leader.
    pub fn leader_hint(&self) -> Option<GatewayAddr> {
        if self.raft.is_leader() {
            return None;
        }
        let peer = self.leader_peer()?;
        device_gateway_addr(&peer.device_addr)
    }
}

/// A `host:port` device address as a protocol [`GatewayAddr`] (IPv4 only; names are resolved).
pub fn device_gateway_addr(addr: &str) -> Option<GatewayAddr> {
    let sock = addr
        .parse::<SocketAddr>()
        .ok()
        .or_else(|| addr.to_socket_addrs().ok()?.find(SocketAddr::is_ipv4))?;
    match sock {
        SocketAddr::V4(v4) => Some(GatewayAddr::from(v4)),
        SocketAddr::V6(_) => None,
    }
}
