//! A simulated network and gateway cluster for the device client.
//!
//! The gateway side speaks the real protocol (`cairn_protocol::GatewaySession`) over in-memory
//! byte streams (`tokio::io::duplex`), and keeps one device's committed rows like the state
//! machine does: seqs at or below high-water are acknowledged without being applied again,
//! a seq above high-water + 1 is a gap (`SeqGap`). Faults: gateways down, connections killed
//! mid-stream (with the batches they carried either lost or committed late, after the device
//! reconnected), acks dropped, acks delayed, followers that redirect or refuse.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration as StdDuration;

use cairn_firmware::backoff::Prng;
use cairn_firmware::tokio::{TokioConnection, read_frame};
use cairn_firmware::{GatewayAddr, Transport, TransportError};
use cairn_protocol::{
    Ack, BatchView, Error, ErrorCode, FrameReassembler, GatewaySession, MAX_FRAME, Message, Pong,
    Redirect, Welcome,
};
use tokio::io::{AsyncWriteExt, DuplexStream, WriteHalf};

pub const KEY: [u8; 32] = [7; 32];

/// With `CAIRN_SIM_TRACE` set (and the crate's `log` feature), the client's log goes to stderr.
pub fn trace_logger() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            eprintln!("{} {}", r.level(), r.args());
        }
        fn flush(&self) {}
    }
    if std::env::var_os("CAIRN_SIM_TRACE").is_some() {
        let _ = log::set_logger(&Stderr);
        log::set_max_level(log::LevelFilter::Trace);
    }
}
pub const DEVICE: u64 = 42;

pub fn gateway_addr(i: usize) -> GatewayAddr {
    GatewayAddr::new([10, 0, 0, 1], 4001 + i as u16)
}

/// How followers treat a device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FollowerMode {
    /// Accept and "forward" (shared state).
    Forward,
    /// Answer `Redirect` to the leader, as a loopback address.
    Redirect,
    /// Answer `Error(NotLeader)`.
    NotLeader,
}

#[derive(Clone, Debug)]
pub struct Faults {
    /// Probability (per mille) that a received batch kills the connection.
    pub kill_per_mille: u64,
    /// Probability (per mille) that an ack is not sent and the connection is killed.
    pub drop_ack_per_mille: u64,
    /// Acks wait between these ("quorum fsync").
    pub ack_delay_min_ms: u64,
    pub ack_delay_max_ms: u64,
    /// Of the batches pending on a killed connection, per mille committed late anyway.
    pub late_commit_per_mille: u64,
    pub credit: u16,
    pub follower: FollowerMode,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            kill_per_mille: 0,
            drop_ack_per_mille: 0,
            ack_delay_min_ms: 0,
            ack_delay_max_ms: 0,
            late_commit_per_mille: 0,
            credit: 256,
            follower: FollowerMode::Forward,
        }
    }
}

/// What the cluster committed for the device, plus every seq/content pair it ever saw.
#[derive(Default)]
pub struct Cluster {
    pub hw: u64,
    /// Committed rows, in seq order: (seq, content).
    pub rows: Vec<(u64, String)>,
    /// Every (seq -> content) the gateway received, committed or not.
    pub seen: HashMap<u64, String>,
    /// Violations found (seq reused with other content, gaps); tests assert this stays empty.
    pub violations: Vec<String>,
    pub gaps: u64,
    pub down: Vec<bool>,
    pub leader: usize,
    pub connects: Vec<u64>,
    pub hellos: Vec<(usize, u32)>,
    pub faults: Faults,
    pub rng: Option<Prng>,
    /// Connection attempt instants (ms since test start) per gateway.
    pub attempts: Vec<(usize, u64)>,
    /// Force every Hello to be answered with this error, sealed (the gateway accepted the
    /// Hello, then refused).
    pub reject_with: Option<ErrorCode>,
    /// Force every Hello to be answered with this error, unsealed (a gateway that cannot seal,
    /// or anyone on the path).
    pub reject_unsealed: Option<ErrorCode>,
    /// When set, every frame a gateway sends is recorded here.
    pub recording: Option<Vec<Vec<u8>>>,
    /// When set, an attacker answers every Hello with these bytes instead of a gateway.
    pub replay: Option<Vec<u8>>,
    /// When set, an attacker on the path writes these bytes right after the gateway's real
    /// Welcome on every connection.
    pub inject_after_welcome: Option<Vec<u8>>,
    /// When set, an attacker on the path flips a ciphertext byte of every Ack.
    pub tamper_acks: bool,
    pub epoch: Option<std::time::Instant>,
    /// Batches received and not yet committed or lost, over all connections.
    pub in_pipeline: u64,
    /// Gateways whose TCP handshake never completes (connect hangs).
    pub black_hole: Vec<bool>,
}

pub type ClusterRef = Rc<RefCell<Cluster>>;

pub fn cluster(gateways: usize, faults: Faults, seed: u64) -> ClusterRef {
    Rc::new(RefCell::new(Cluster {
        down: vec![false; gateways],
        black_hole: vec![false; gateways],
        connects: vec![0; gateways],
        faults,
        rng: Some(Prng::new(seed)),
        epoch: Some(std::time::Instant::now()),
        ..Default::default()
    }))
}

impl Cluster {
    fn roll(&mut self, per_mille: u64) -> bool {
        per_mille > 0 && self.rng.as_mut().unwrap().between(0, 999) < per_mille
    }

    fn delay_ms(&mut self) -> u64 {
        let (min, max) = (self.faults.ack_delay_min_ms, self.faults.ack_delay_max_ms);
        self.rng.as_mut().unwrap().between(min, max)
    }

    /// Apply a batch like the state machine; returns Err(SeqGap) on a gap.
    fn apply(&mut self, batch: &BatchView<'_>) -> Result<(), ErrorCode> {
        let first = batch.header().first_seq;
        if std::env::var_os("CAIRN_SIM_TRACE").is_some() {
            let ks: Vec<String> = batch
                .records()
                .map(|r| {
                    r.unwrap()
                        .values()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect();
            eprintln!("apply first={first} hw={} ks={}", self.hw, ks.join(" "));
        }
        for (i, rec) in batch.records().enumerate() {
            let rec = rec.expect("records decode");
            let seq = first + i as u64;
            let content = format!(
                "{}:{}",
                rec.stream,
                rec.values()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            if let Some(old) = self.seen.get(&seq)
                && *old != content
            {
                self.violations
                    .push(format!("seq {seq} reused: {old} then {content}"));
            }
            self.seen.insert(seq, content.clone());
            if seq <= self.hw {
                continue;
            }
            if seq > self.hw + 1 {
                self.gaps += 1;
                return Err(ErrorCode::SeqGap);
            }
            self.hw = seq;
            self.rows.push((seq, content));
        }
        Ok(())
    }

    /// The `u64` payloads of the committed rows (tests push `[U64(k)]` records on stream 1).
    pub fn payloads(&self) -> Vec<u64> {
        self.rows
            .iter()
            .map(|(_, c)| {
                c.strip_prefix("1:")
                    .expect("stream 1")
                    .parse()
                    .expect("u64")
            })
            .collect()
    }
}

/// The device's side of the simulated network.
pub struct SimTransport {
    pub cluster: ClusterRef,
}

impl Transport for SimTransport {
    type Connection<'a> = TokioConnection<DuplexStream>;

    async fn connect(&mut self, addr: GatewayAddr) -> Result<Self::Connection<'_>, TransportError> {
        let index = (addr.port - 4001) as usize;
        let black_hole = {
            let mut c = self.cluster.borrow_mut();
            let at = c.epoch.unwrap().elapsed().as_millis() as u64;
            c.attempts.push((index, at));
            if addr.ip != [10, 0, 0, 1] || index >= c.down.len() || c.down[index] {
                return Err(TransportError::ConnectFailed);
            }
            c.connects[index] += 1;
            c.black_hole[index]
        };
        if black_hole {
            std::future::pending::<()>().await;
        }
        let (device, gateway) = tokio::io::duplex(8192);
        tokio::task::spawn_local(serve(self.cluster.clone(), index, gateway));
        Ok(TokioConnection::new(device))
    }
}

struct Replies {
    cluster: ClusterRef,
    session: RefCell<GatewaySession>,
    writer: tokio::sync::Mutex<WriteHalf<DuplexStream>>,
    alive: RefCell<bool>,
}

impl Replies {
    async fn send(&self, msg: &Message<'_>) {
        if !*self.alive.borrow() {
            return;
        }
        let mut buf = [0u8; 1024];
        let n = self
            .session
            .borrow_mut()
            .encode(msg, &mut buf)
            .expect("encode reply");
        if let Some(rec) = self.cluster.borrow_mut().recording.as_mut() {
            rec.push(buf[..n].to_vec());
        }
        if matches!(msg, Message::Ack(_)) && self.cluster.borrow().tamper_acks {
            buf[cairn_protocol::HEADER_LEN] ^= 0x01;
        }
        let mut w = self.writer.lock().await;
        if w.write_all(&buf[..n]).await.is_err() {
            *self.alive.borrow_mut() = false;
        }
    }

    async fn kill(&self) {
        *self.alive.borrow_mut() = false;
        let _ = self.writer.lock().await.shutdown().await;
    }
}

/// One gateway connection: handshake, then batches through a commit pipeline.
async fn serve(cluster: ClusterRef, index: usize, stream: DuplexStream) {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut frames = FrameReassembler::<MAX_FRAME>::new();
    let Ok(Some(hello_frame)) = read_frame(&mut r, &mut frames).await else {
        return;
    };
    let hello = GatewaySession::peek_hello(hello_frame).expect("hello");
    assert_eq!(hello.device_id, DEVICE);
    let replay = cluster.borrow().replay.clone();
    if let Some(bytes) = replay {
        // Not a gateway: whatever was recorded or forged, then read until the device closes.
        cluster.borrow_mut().hellos.push((index, hello.boot));
        let _ = w.write_all(&bytes).await;
        while let Ok(Some(_)) = read_frame(&mut r, &mut frames).await {
            cluster
                .borrow_mut()
                .violations
                .push("device sent after a replay".into());
        }
        return;
    }
    // A fresh challenge per connection, as real gateways draw (SPEC §5.5).
    let mut challenge = [0u8; cairn_protocol::CHALLENGE_LEN];
    {
        let mut c = cluster.borrow_mut();
        let rng = c.rng.as_mut().unwrap();
        challenge[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
        challenge[8..].copy_from_slice(&rng.next_u64().to_le_bytes()[..4]);
    }
    let session =
        GatewaySession::accept(&KEY, hello_frame, challenge).expect("hello authenticates");
    cluster.borrow_mut().hellos.push((index, hello.boot));
    let reject_unsealed = cluster.borrow().reject_unsealed;
    if let Some(code) = reject_unsealed {
        let mut buf = [0u8; 64];
        let n = cairn_protocol::encode_unsealed_error(code, &mut buf).unwrap();
        let _ = w.write_all(&buf[..n]).await;
        return;
    }
    let replies = Rc::new(Replies {
        cluster: cluster.clone(),
        session: RefCell::new(session),
        writer: tokio::sync::Mutex::new(w),
        alive: RefCell::new(true),
    });
    let reject_with = cluster.borrow().reject_with;
    if let Some(code) = reject_with {
        replies.send(&Message::Error(Error { code })).await;
        return;
    }
    let (leader, mode, credit) = {
        let c = cluster.borrow();
        (c.leader, c.faults.follower, c.faults.credit)
    };
    if index != leader {
        match mode {
            FollowerMode::Redirect => {
                let to = GatewayAddr::new([127, 0, 0, 1], 4001 + leader as u16);
                replies
                    .send(&Message::Redirect(Redirect { addr: to }))
                    .await;
                return;
            }
            FollowerMode::NotLeader => {
                replies
                    .send(&Message::Error(Error {
                        code: ErrorCode::NotLeader,
                    }))
                    .await;
                return;
            }
            FollowerMode::Forward => {}
        }
    }
    // SPEC §8 gateway rule 2: Welcome's high-water is read only after every batch that can
    // still carry records of this device is decided (committed or lost).
    while cluster.borrow().in_pipeline > 0 {
        tokio::time::sleep(StdDuration::from_millis(1)).await;
    }
    let hw = cluster.borrow().hw;
    // Hints come as loopback addresses, like a gateway listening on 127.0.0.1 sends them.
    let leader_hint =
        (index != leader).then(|| GatewayAddr::new([127, 0, 0, 1], 4001 + leader as u16));
    // The credit window this connection granted: no batch may reach past it.
    let window = Rc::new(std::cell::Cell::new(hw + u64::from(credit)));
    replies
        .send(&Message::Welcome(Welcome {
            high_water: hw,
            leader: leader_hint,
            credit,
        }))
        .await;
    let inject = cluster.borrow().inject_after_welcome.clone();
    if let Some(bytes) = inject {
        let _ = replies.writer.lock().await.write_all(&bytes).await;
    }

    // Commit pipeline: batches are committed in order, each after a random delay.
    let pending: Rc<RefCell<VecDeque<Vec<u8>>>> = Rc::default();
    let wake = Rc::new(tokio::sync::Notify::new());
    let committer = {
        let (cluster, replies, pending, wake, window) = (
            cluster.clone(),
            replies.clone(),
            pending.clone(),
            wake.clone(),
            window.clone(),
        );
        tokio::task::spawn_local(async move {
            let mut lost_one = false;
            loop {
                let next = pending.borrow_mut().pop_front();
                let Some(body) = next else {
                    if !*replies.alive.borrow() {
                        return;
                    }
                    wake.notified().await;
                    continue;
                };
                let delay = cluster.borrow_mut().delay_ms();
                if delay > 0 {
                    tokio::time::sleep(StdDuration::from_millis(delay)).await;
                }
                let alive = *replies.alive.borrow();
                if !alive {
                    // The connection died with this batch in the pipeline: lost, or committed
                    // late (after the device may already have reconnected elsewhere). Like a
                    // Raft log, the pipeline keeps order: after one loss the rest is lost too.
                    let late = !lost_one && {
                        let mut c = cluster.borrow_mut();
                        let p = c.faults.late_commit_per_mille;
                        c.roll(p)
                    };
                    lost_one |= !late;
                    if late {
                        let view = BatchView::parse(&body).expect("batch");
                        let _ = cluster.borrow_mut().apply(&view);
                    }
                    cluster.borrow_mut().in_pipeline -= 1;
                    continue;
                }
                let view = BatchView::parse(&body).expect("batch");
                let result = cluster.borrow_mut().apply(&view);
                cluster.borrow_mut().in_pipeline -= 1;
                match result {
                    Err(code) => {
                        replies.send(&Message::Error(Error { code })).await;
                        replies.kill().await;
                    }
                    Ok(()) => {
                        let (drop_ack, hw, credit) = {
                            let mut c = cluster.borrow_mut();
                            let p = c.faults.drop_ack_per_mille;
                            (c.roll(p), c.hw, c.faults.credit)
                        };
                        if drop_ack {
                            replies.kill().await;
                        } else {
                            window.set(window.get().max(hw + u64::from(credit)));
                            let ack = Ack {
                                through_seq: hw,
                                credit,
                                leader: leader_hint,
                            };
                            replies.send(&Message::Ack(ack)).await;
                        }
                    }
                }
            }
        })
    };

    loop {
        if !*replies.alive.borrow() {
            break;
        }
        let Ok(Some(frame)) = read_frame(&mut r, &mut frames).await else {
            break;
        };
        if !*replies.alive.borrow() {
            // Killed while this frame was on its way (its committer may be gone): lost.
            break;
        }
        if cluster.borrow().down[index] {
            // The gateway went down: the frame is lost with the connection.
            replies.kill().await;
            break;
        }
        let msg = replies.session.borrow_mut().decode(frame);
        match msg {
            Ok(Message::Batch(view)) => {
                let last = view.header().last_seq();
                if last > window.get() {
                    let msg = format!("batch through {last} beyond credit window {}", window.get());
                    cluster.borrow_mut().violations.push(msg);
                }
                let body = view.as_bytes().to_vec();
                pending.borrow_mut().push_back(body);
                cluster.borrow_mut().in_pipeline += 1;
                wake.notify_one();
                let kill = {
                    let mut c = cluster.borrow_mut();
                    let p = c.faults.kill_per_mille;
                    c.roll(p)
                };
                if kill {
                    replies.kill().await;
                    break;
                }
            }
            Ok(Message::Ping(p)) => replies.send(&Message::Pong(Pong { nonce: p.nonce })).await,
            Ok(other) => panic!("unexpected message from device: {other}"),
            Err(e) => panic!("device frame did not decode: {e}"),
        }
    }
    *replies.alive.borrow_mut() = false;
    wake.notify_one();
    let _ = committer.await;
}

/// Poll `cond` every 5 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: StdDuration, mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(StdDuration::from_millis(5)).await;
    }
    cond()
}

/// Fast settings for tests (real time, so keep everything short).
pub fn fast_config(gateways: &[GatewayAddr], boot: u32) -> cairn_firmware::Config<'_> {
    let mut c = cairn_firmware::Config::new(DEVICE, KEY, boot, boot_nonce(boot), gateways);
    c.connect_timeout = embassy_time::Duration::from_millis(200);
    c.response_timeout = embassy_time::Duration::from_millis(1000);
    c.ping_interval = embassy_time::Duration::from_millis(150);
    c.backoff_floor = embassy_time::Duration::from_millis(2);
    c.backoff_base = embassy_time::Duration::from_millis(5);
    c.backoff_max = embassy_time::Duration::from_millis(80);
    c.overloaded_delay = embassy_time::Duration::from_millis(60);
    c.max_batch = 32;
    c
}

/// A boot nonce no other client of this test process gets (a counter, as flash boards have).
pub fn boot_nonce(boot: u32) -> cairn_firmware::BootNonce {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    cairn_firmware::BootNonce::from_counter(boot, n.to_le_bytes())
}
