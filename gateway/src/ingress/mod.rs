//! Device ingress: the device port of every gateway.
//!
//! ```text
//! device ─TCP─▶ listener ─▶ connection task (one per device; connection.rs)
//!                              │ leader here?  ── yes ─▶ leader GroupQueue ─▶ ProposeSink: one entry per group
//!                              │               ── no ──▶ forward GroupQueue ─▶ POST /ingress/forward on the leader
//!                              ◀── outcomes in order ── Ack{through_seq} after commit + apply
//! ```
//!
//! The ingress speaks to the service layer ([`Cluster`]) only: groups enter Raft through the
//! one proposer, node-to-node calls go through the one leader client. What a group does on
//! every replica is `command::device`.
//!
//! - [`batcher`]: the bounded grouping queue shared by the leader and follower paths.
//! - [`leader`]: the proposer end of the leader's queue.
//! - [`forward`]: the follower end (to the leader's internal listener) and the internal routes
//!   it calls: forwarded batches, linearizable high-water and key lookups.
//! - [`connection`]: the per-connection protocol state machine.

pub mod batcher;
pub mod connection;
pub mod forward;
pub mod leader;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering::Relaxed;

use cairn_protocol::{ErrorCode, GatewayAddr};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use self::batcher::{GroupLimits, GroupQueue, Outcomes};
use crate::cluster::Cluster;
use crate::command::device::DeviceBatch;
use crate::command::registry::RegistryCommand;
use crate::command::{Command, CommandResponse};
use crate::db::registry::{self, DeviceKey, DeviceKeys, KeyState};
use crate::error::Error;
use crate::metrics::Metrics;

/// The protocol error a device gets for an [`Error`]: the one mapping from the service
/// layer's errors to device codes.
pub fn code_of(e: &Error) -> ErrorCode {
    match e {
        // Retry, here or at the leader the Welcome/Ack hint names.
        Error::NotLeader(_) | Error::NoLeader | Error::LeaderChanged | Error::Unavailable(_) => {
            ErrorCode::NotLeader
        }
        Error::Overloaded => ErrorCode::Overloaded,
        Error::BadRequest(_)
        | Error::NotFound(_)
        | Error::Fatal(_)
        | Error::Storage(_)
        | Error::Forbidden(_) => ErrorCode::Internal,
    }
}

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
    /// A connection with no frame for this long is closed.
    pub idle_timeout: Duration,
    /// A connection must deliver its Hello within this long.
    pub handshake_timeout: Duration,
    /// Connections open at once, in all and from one IP address; more are closed at once.
    pub max_connections: usize,
    pub max_per_address: usize,
    /// Accept protocol 1 Hellos of devices registered for protocol 1 (migration period).
    pub accept_protocol_1: bool,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            credit: 1024,
            limits: GroupLimits::default(),
            idle_timeout: Duration::from_secs(120),
            handshake_timeout: Duration::from_secs(5),
            max_connections: 8192,
            max_per_address: 1024,
            accept_protocol_1: false,
        }
    }
}

/// The device path of one node.
pub struct Ingress {
    cluster: Arc<Cluster>,
    config: IngressConfig,
    leader_queue: GroupQueue,
    forward_queue: GroupQueue,
    /// Protocol 1 only: last authenticated Hello per device, `(boot, counter)`, to refuse a
    /// replayed Hello (protocol 2 needs no state for that).
    hellos: Mutex<HashMap<u64, (u32, u32)>>,
    /// Open connections per peer IP address.
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// Follower only: devices the leader did not know, and when it said so.
    unknown: Mutex<HashMap<u64, Instant>>,
    /// Registry notes already sent or proposed from this node (one per fact).
    noted: Mutex<HashSet<(u64, Note)>>,
}

/// A fact about a device a gateway learns at its Hello and the registry keeps: proposed by
/// the leader (a follower sends it there, `POST /ingress/note/{device_id}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Note {
    /// The device authenticated with the key installed by the rekey at `rekeyed_at_ms`.
    KeySeen { rekeyed_at_ms: i64, at_ms: i64 },
    /// A device registered for protocol 1 said a protocol 2 Hello: it is registered for 2
    /// from now on (no way back to 1).
    SpokeV2,
}

impl Note {
    fn command(self, device_id: u64) -> RegistryCommand {
        match self {
            Note::KeySeen {
                rekeyed_at_ms,
                at_ms,
            } => RegistryCommand::KeySeen {
                device_id,
                rekeyed_at_ms,
                at_ms,
            },
            Note::SpokeV2 => RegistryCommand::SetProtocol {
                device_id,
                version: cairn_protocol::PROTOCOL_VERSION,
            },
        }
    }

    /// One entry per fact: the time a key was seen does not make a new fact.
    fn dedup_key(self) -> Note {
        match self {
            Note::KeySeen { rekeyed_at_ms, .. } => Note::KeySeen {
                rekeyed_at_ms,
                at_ms: 0,
            },
            n => n,
        }
    }
}

/// The keys a Hello may authenticate under, and where they came from.
#[derive(Debug, Clone)]
pub struct HelloKeys {
    pub keys: DeviceKeys,
    /// False when this replica does not know the device yet and the leader answered.
    pub from_replica: bool,
}

/// How long a follower answers Hellos of a device the leader did not know from its own cache.
const UNKNOWN_DEVICE_TTL: Duration = Duration::from_secs(5);
/// The negative cache's bound: beyond it, expired entries are dropped, then all of them.
const UNKNOWN_DEVICE_MAX: usize = 65_536;

/// One open device connection counted against the caps; uncounted when dropped.
pub struct Slot {
    ingress: Arc<Ingress>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.ingress
            .metrics()
            .connections_open
            .fetch_sub(1, Relaxed);
        let mut map = self.ingress.per_address.lock().expect("per-address table");
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Ingress {
    /// Starts the grouping tasks; call [`Ingress::serve`] with the bound device listener.
    pub fn new(cluster: Arc<Cluster>, config: IngressConfig) -> Arc<Self> {
        let metrics = cluster.metrics().clone();
        let leader_queue = GroupQueue::spawn(
            leader::ProposeSink::new(cluster.clone()),
            config.limits,
            metrics.clone(),
        );
        let forward_queue = GroupQueue::spawn(
            forward::ForwardSink::new(cluster.clone()),
            GroupLimits {
                max_in_flight: 1,
                ..config.limits
            },
            metrics,
        );
        if config.accept_protocol_1 {
            let registered_v1 = cluster
                .store()
                .read(registry::key_states)
                .ok()
                .and_then(Result::ok)
                .map(|ks| ks.iter().filter(|(_, k)| k.protocol == 1).count());
            tracing::warn!(
                registered_v1,
                "accepting protocol 1 Hellos (--accept-protocol-1), only of devices registered \
                 for protocol 1 (`cairn device add --protocol 1`): their recorded connections \
                 can be replayed and their nonces depend on unique boot numbers; move them to \
                 protocol 2 and drop the flag"
            );
        }
        Arc::new(Ingress {
            cluster,
            config,
            leader_queue,
            forward_queue,
            hellos: Mutex::new(HashMap::new()),
            per_address: Mutex::new(HashMap::new()),
            unknown: Mutex::new(HashMap::new()),
            noted: Mutex::new(HashSet::new()),
        })
    }

    /// This node's counters.
    pub fn metrics(&self) -> &Metrics {
        self.cluster.metrics()
    }

    /// Accepts device connections forever, one task each, within the connection caps.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // Over a cap the socket is dropped at once: no task, no buffer.
                    if let Some(slot) = self.admit(peer.ip()) {
                        tokio::spawn(connection::serve(self.clone(), stream, slot));
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a device connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Counts a new connection from `ip` against the global and per-address caps.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let m = self.metrics();
        m.connections_accepted.fetch_add(1, Relaxed);
        if m.connections_open.load(Relaxed) as usize >= self.config.max_connections {
            m.connections_over_cap.fetch_add(1, Relaxed);
            return None;
        }
        {
            let mut map = self.per_address.lock().expect("per-address table");
            let n = map.entry(ip).or_insert(0);
            if *n >= self.config.max_per_address {
                m.connections_over_address_cap.fetch_add(1, Relaxed);
                return None;
            }
            *n += 1;
        }
        m.connections_open.fetch_add(1, Relaxed);
        Some(Slot {
            ingress: self.clone(),
            ip,
        })
    }

    /// The keys of a registered device, from this node's replica.
    pub fn device_keys(&self, device_id: u64) -> Result<Option<DeviceKeys>, Error> {
        self.cluster
            .store()
            .read(|c| registry::device_keys(c, device_id))
            .and_then(|k| k)
            .map_err(|e| {
                tracing::warn!(error = %e, "reading the device registry");
                Error::from(e)
            })
    }

    /// The key a Hello of the device would be accepted under now (not a revoked device's),
    /// as the leader answers a follower that does not know the device.
    pub fn device_key(&self, device_id: u64) -> Result<Option<DeviceKey>, Error> {
        Ok(self
            .device_keys(device_id)?
            .filter(|k| k.state.revoked_at_ms.is_none())
            .map(|k| k.key))
    }

    /// The keys for a Hello: this replica's, or, if it does not know the device and is not the
    /// leader, the leader's (a device registered a moment ago may reach a lagging follower).
    pub async fn hello_keys(&self, device_id: u64) -> Result<Option<HelloKeys>, Error> {
        match self.device_keys(device_id)? {
            Some(keys) => Ok(Some(HelloKeys {
                keys,
                from_replica: true,
            })),
            None if self.cluster.is_leader() => Ok(None),
            // A node that knows no leader (still joining, or electing) cannot tell an unknown
            // device from one registered after its last applied entry: NotLeader, retry soon.
            None if self.cluster.leader().is_none() => Err(Error::NoLeader),
            None => {
                // No leader round trip per Hello of an unknown device: the leader's answer is
                // kept for a few seconds (a device registered meanwhile waits that long here).
                if let Some(at) = self
                    .unknown
                    .lock()
                    .expect("unknown-device cache")
                    .get(&device_id)
                    && at.elapsed() < UNKNOWN_DEVICE_TTL
                {
                    self.metrics().unknown_device_cached.fetch_add(1, Relaxed);
                    return Ok(None);
                }
                let key = forward::remote_device_key(&self.cluster, device_id).await?;
                let mut unknown = self.unknown.lock().expect("unknown-device cache");
                if key.is_none() {
                    if unknown.len() >= UNKNOWN_DEVICE_MAX {
                        unknown.retain(|_, at| at.elapsed() < UNKNOWN_DEVICE_TTL);
                        if unknown.len() >= UNKNOWN_DEVICE_MAX {
                            unknown.clear();
                        }
                    }
                    unknown.insert(device_id, Instant::now());
                } else {
                    unknown.remove(&device_id);
                }
                Ok(key.map(|key| HelloKeys {
                    keys: DeviceKeys {
                        key,
                        state: KeyState::NONE,
                    },
                    from_replica: false,
                }))
            }
        }
    }

    /// Until when a session opened under `key` may go on, seen at `now_ms`: `None` if no
    /// longer (revoked, key replaced or removed), `Some(None)` while `key` is the device's key,
    /// `Some(Some(t))` until `t` when it is the previous key in its grace window. A session
    /// whose keys came from the leader (`from_replica` false) stays while this replica does
    /// not know the device yet.
    pub fn session_valid_until(
        &self,
        device_id: u64,
        key: &DeviceKey,
        from_replica: bool,
        now_ms: i64,
    ) -> Option<Option<i64>> {
        match self.device_keys(device_id) {
            Ok(Some(k)) if k.state.revoked_at_ms.is_some() => None,
            Ok(Some(k)) if k.key == *key => Some(None),
            Ok(Some(k)) if k.state.previous_at(now_ms) == Some(*key) => {
                Some(k.state.grace_until_ms)
            }
            Ok(Some(_)) => None,
            Ok(None) if from_replica => None,
            // A replica that cannot read its registry keeps its sessions: storage trouble is
            // reported elsewhere, and the next Hello checks again.
            Ok(None) | Err(_) => Some(None),
        }
    }

    /// Has the leader record `note` about the device (once per fact and node), in the
    /// background: a Hello never waits for it.
    pub fn note(self: &Arc<Self>, device_id: u64, note: Note) {
        if !self
            .noted
            .lock()
            .expect("noted set")
            .insert((device_id, note.dedup_key()))
        {
            return;
        }
        let ingress = self.clone();
        tokio::spawn(async move {
            let r = if ingress.cluster.is_leader() {
                ingress.propose_note(device_id, note).await
            } else {
                forward::remote_note(&ingress.cluster, device_id, note).await
            };
            if let Err(e) = r {
                tracing::info!(device_id, ?note, error = %e, "registry note not recorded; next Hello retries");
                ingress
                    .noted
                    .lock()
                    .expect("noted set")
                    .remove(&(device_id, note.dedup_key()));
            }
        });
    }

    /// The leader's end of [`Ingress::note`].
    pub async fn propose_note(&self, device_id: u64, note: Note) -> Result<(), Error> {
        match self
            .cluster
            .write(Command::DeviceRegistry(note.command(device_id)))
            .await?
        {
            CommandResponse::DeviceRegistry(_) => Ok(()),
            other => Err(Error::Storage(format!("unexpected response {other:?}"))),
        }
    }

    /// Protocol 1: records an authenticated Hello; false if it is not newer than the last one
    /// of the same boot (a replayed connection start).
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
    pub fn submit(&self, batch: DeviceBatch) -> Result<oneshot::Receiver<Outcomes>, Error> {
        if self.cluster.is_leader() {
            self.leader_queue.try_submit(vec![batch])
        } else if self.cluster.leader().is_some() {
            self.metrics().batches_forwarded.fetch_add(1, Relaxed);
            self.forward_queue.try_submit(vec![batch])
        } else {
            Err(Error::NoLeader)
        }
    }

    /// Batches forwarded by a follower, committed here as the leader.
    pub async fn submit_forwarded(&self, batches: Vec<DeviceBatch>) -> Outcomes {
        if !self.cluster.is_leader() {
            return Err(Error::NotLeader(None));
        }
        self.metrics()
            .batches_received_forwarded
            .fetch_add(batches.len() as u64, Relaxed);
        self.leader_queue.submit(batches).await
    }

    /// A new session of the device, for its Welcome: `(high_water, session)`. With format
    /// version 2 active, a committed `RegistryCommand::OpenSession` on the leader (after the
    /// device's batches queued there are decided): batches of the device's earlier sessions
    /// that reach the log after it (say, forwarded by another gateway and delayed) are not
    /// stored, so nothing above the returned high-water is stored but this session's records
    /// (SPEC §8 gateway rule 2). Before version 2: the linearizable high-water read, session 0.
    pub async fn open_session(&self, device_id: u64) -> Result<(u64, u64), Error> {
        if self.cluster.metrics().versions.active() < crate::version::V2 {
            return Ok((self.high_water(device_id).await?, 0));
        }
        if self.cluster.is_leader() {
            self.local_open_session(device_id).await
        } else {
            forward::remote_open_session(&self.cluster, device_id).await
        }
    }

    /// The leader's end of [`Ingress::open_session`].
    pub async fn local_open_session(&self, device_id: u64) -> Result<(u64, u64), Error> {
        if !self
            .leader_queue
            .settled(device_id, Duration::from_secs(10))
            .await
        {
            return Err(Error::Overloaded);
        }
        let cmd = Command::DeviceRegistry(RegistryCommand::OpenSession { device_id });
        match self.cluster.write(cmd).await? {
            CommandResponse::DeviceRegistry(
                crate::command::registry::RegistryOutcome::SessionOpened {
                    session,
                    high_water,
                },
            ) => Ok((high_water, session)),
            other => Err(Error::Storage(format!("unexpected response {other:?}"))),
        }
    }

    /// The device's committed high-water, read linearizably: on the leader after confirming
    /// leadership and applying up to the read index; on a follower by asking the leader.
    pub async fn high_water(&self, device_id: u64) -> Result<u64, Error> {
        if self.cluster.is_leader() {
            self.local_high_water(device_id).await
        } else {
            forward::remote_high_water(&self.cluster, device_id).await
        }
    }

    /// The linearizable read on the leader (SPEC §8 gateway rule 2): first every batch of this
    /// device still queued or in flight here is decided, then leadership is confirmed and the
    /// state machine caught up to the read index, then the high-water is read.
    pub async fn local_high_water(&self, device_id: u64) -> Result<u64, Error> {
        if !self
            .leader_queue
            .settled(device_id, Duration::from_secs(10))
            .await
        {
            return Err(Error::Overloaded);
        }
        if let Err(e) = self.cluster.confirm_leadership().await {
            tracing::info!(device_id, error = %e, "high-water read: leadership not confirmed");
            return Err(e);
        }
        Ok(self
            .cluster
            .store()
            .read(|c| registry::high_water(c, device_id))??)
    }

    /// The credit for the next Welcome/Ack: each open connection's share of the free room in
    /// the queue its batches go to (the leader's, or the forward queue on a follower), so a
    /// large fleet does not overfill it (`Overloaded`), capped at the configured credit. At
    /// least one full batch while there is room, so batches stay large; 1 when the queue is
    /// full (a device can always make progress once it is acked).
    pub fn credit(&self) -> u16 {
        let free = if self.cluster.is_leader() {
            self.leader_queue.free_slots()
        } else {
            self.forward_queue.free_slots()
        };
        if free == 0 {
            return 1;
        }
        let cap = usize::from(self.config.credit).max(1);
        let connections = (self.metrics().connections_open.load(Relaxed) as usize).max(1);
        (free * RECORDS_PER_BATCH / connections).clamp(RECORDS_PER_BATCH.min(cap), cap) as u16
    }

    /// The leader's device address, when this node knows it and is not the leader.
    pub fn leader_hint(&self) -> Option<GatewayAddr> {
        if self.cluster.is_leader() {
            return None;
        }
        let (_, peer) = self.cluster.leader()?;
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
