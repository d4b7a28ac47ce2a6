//! One device connection: Hello → Welcome, then batches in and cumulative Acks out.
//!
//! ```text
//! Hello ──▶ version 2 (or 1 with --accept-protocol-1 for a device registered for 1, else
//!           unsealed UnsupportedVersion)
//!           key lookup (local registry) ─ unknown or revoked ─▶ unsealed Error(UnknownDevice), close
//!           accept (tag, version) under the key, or the previous key in its rekey grace
//!           window; fresh challenge ─ bad ─▶ unsealed Error(code), close
//!           (protocol 1 only: replayed Hello, same boot and counter not newer ─▶ Error(Replay))
//!           high-water read linearizably on the leader ─▶ Welcome{high_water, leader, credit}
//! Batch ──▶ decode (tag, counter, body) ─ bad ─▶ Error(code), close; nothing applied
//!           submit to the leader's queue (or forward) ─ full ─▶ Error(Overloaded)
//!           outcomes come back in order ─▶ Ack{through_seq} (after commit and apply; one Ack for
//!                                           the batches decided together)
//!                                        ─▶ Error(SeqGap | SchemaMismatch | NotLeader | Overloaded),
//!                                           connection kept (SPEC §7.6); other codes close it
//! Ping  ──▶ Pong
//! registry change applied here ─▶ the session's key no longer accepted (revoked, replaced)
//!           ─▶ close;  grace window of the previous key over ─▶ close
//! ```
//!
//! Bounded: admitted within the global and per-address caps (`Ingress::serve`), one frame
//! buffer of `2 * MAX_FRAME`, at most [`MAX_PENDING`] batches awaiting their outcome (then the
//! connection stops reading and TCP pushes back), a handshake deadline, an idle timeout, and
//! a write deadline (a device that does not read its replies is dropped). Every rejection is
//! counted in the metrics by its error code. A failure only ever closes this connection.
//!
//! A recorded protocol 2 connection replayed here gets a fresh challenge, so its recorded
//! frames do not open (`BadAuth`): nothing is stored or acknowledged.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_protocol::{
    Ack, EncodeError, Error, ErrorCode, Frame, FrameError, FrameReassembler, GatewaySession,
    MAX_FRAME, Message, PROTOCOL_VERSION, Pong, Welcome, encode_unsealed_error_version, v1,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, oneshot};

use super::batcher::{Outcomes, closed};
use super::{HelloKeys, Ingress, Note, Slot, code_of};
use crate::command::device::{BatchOutcome, DeviceBatch};
use crate::db::registry::DeviceKey;
use crate::metrics::Metrics;

/// Batches of one connection awaiting their outcome before reading stops.
pub const MAX_PENDING: usize = 64;

/// How long one reply may take to write: a device that does not read is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The session of a connection, in the device's protocol version.
enum Session {
    V2(GatewaySession),
    /// Only with `--accept-protocol-1`.
    V1(v1::GatewaySession),
}

impl Session {
    fn encode(&mut self, msg: &Message<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
        match self {
            Session::V2(s) => s.encode(msg, out),
            Session::V1(s) => s.encode(msg, out),
        }
    }

    fn decode<'b>(&mut self, frame: &'b mut [u8]) -> Result<Message<'b>, FrameError> {
        match self {
            Session::V2(s) => s.decode(frame),
            Session::V1(s) => s.decode(frame),
        }
    }
}

/// Reads whole frames off a stream through the protocol's [`FrameReassembler`] (two frames
/// of room, so one read often brings several pipelined batches). `next` is cancel-safe: bytes
/// read stay in the buffer if the future is dropped.
struct FrameReader(Box<FrameReassembler<{ 2 * MAX_FRAME }>>);

/// Why no frame came.
enum ReadEnd {
    /// The device closed between frames.
    Closed,
    /// The stream ended or broke in the middle of a frame, or the header is bad.
    Frame(FrameError),
    Io,
}

impl FrameReader {
    fn new() -> Self {
        FrameReader(Box::default())
    }

    async fn next(&mut self, stream: &mut TcpStream) -> Result<&mut [u8], ReadEnd> {
        let frames = &mut *self.0;
        while !frames.frame_ready().map_err(ReadEnd::Frame)? {
            let n = stream
                .read(frames.read_buf())
                .await
                .map_err(|_| ReadEnd::Io)?;
            if n == 0 {
                return Err(frames
                    .finish()
                    .map_or_else(ReadEnd::Frame, |()| ReadEnd::Closed));
            }
            frames.commit(n);
        }
        frames
            .next_frame()
            .map_err(ReadEnd::Frame)?
            .ok_or(ReadEnd::Frame(FrameError::Truncated))
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Counts a rejection and writes an Error frame, sealed if a session exists (else unsealed,
/// in protocol 2 framing unless the device spoke protocol 1).
async fn reject(
    m: &Metrics,
    stream: &mut TcpStream,
    session: Option<&mut Session>,
    code: ErrorCode,
) {
    reject_in(m, stream, session, code, PROTOCOL_VERSION).await
}

async fn reject_in(
    m: &Metrics,
    stream: &mut TcpStream,
    session: Option<&mut Session>,
    code: ErrorCode,
    version: u8,
) {
    m.rejects.count(code);
    let mut out = [0u8; 64];
    let n = match session {
        Some(s) => s.encode(&Message::Error(Error { code }), &mut out),
        None => encode_unsealed_error_version(code, version, &mut out),
    };
    if let Ok(n) = n {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = stream.write_all(&out[..n]).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }
}

/// Answers a batch with an Error. SeqGap, SchemaMismatch, NotLeader and Overloaded keep the
/// connection (SPEC §7.6); any other code closes it. Returns whether the connection goes on.
async fn refuse(
    m: &Metrics,
    stream: &mut TcpStream,
    session: &mut Session,
    code: ErrorCode,
) -> bool {
    let keep = matches!(
        code,
        ErrorCode::SeqGap
            | ErrorCode::SchemaMismatch
            | ErrorCode::NotLeader
            | ErrorCode::Overloaded
    );
    if !keep {
        reject(m, stream, Some(session), code).await;
        return false;
    }
    m.rejects.count(code);
    send(m, stream, session, &Message::Error(Error { code })).await
}

/// Seals and writes one reply; false if the connection is over (broken, or the device did
/// not take the bytes within [`WRITE_TIMEOUT`]).
async fn send(
    m: &Metrics,
    stream: &mut TcpStream,
    session: &mut Session,
    msg: &Message<'_>,
) -> bool {
    let mut out = [0u8; 128];
    let Ok(n) = session.encode(msg, &mut out) else {
        return false;
    };
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out[..n])).await {
        Ok(r) => r.is_ok(),
        Err(_) => {
            m.slow_closed.fetch_add(1, Relaxed);
            false
        }
    }
}

/// The seq a decided batch is stored through (applied now or before), or the code to answer.
fn stored_through(outcome: &Outcomes) -> Result<u64, ErrorCode> {
    match outcome {
        Ok(v) if v.len() == 1 => match v[0] {
            BatchOutcome::Applied { through_seq } | BatchOutcome::Duplicate { through_seq } => {
                Ok(through_seq)
            }
            BatchOutcome::Gap { .. } => Err(ErrorCode::SeqGap),
            BatchOutcome::SchemaMismatch => Err(ErrorCode::SchemaMismatch),
            BatchOutcome::Malformed => Err(ErrorCode::Malformed),
            BatchOutcome::Revoked => Err(ErrorCode::UnknownDevice),
            // A newer connection of the device took over: this one ends.
            BatchOutcome::Stale => Err(ErrorCode::Internal),
        },
        Ok(_) => Err(ErrorCode::Internal),
        Err(e) => Err(code_of(e)),
    }
}

/// The oldest pending batch's outcome if it is already decided, taken off the queue.
fn decided(
    pending: &mut VecDeque<(oneshot::Receiver<Outcomes>, Instant)>,
) -> Option<(Outcomes, Instant)> {
    let outcome = match pending.front_mut()?.0.try_recv() {
        Ok(o) => o,
        Err(oneshot::error::TryRecvError::Empty) => return None,
        Err(oneshot::error::TryRecvError::Closed) => Err(closed()),
    };
    let (_, read_at) = pending.pop_front()?;
    Some((outcome, read_at))
}

/// Serves one device connection to the end; `slot` counts it against the caps until then.
pub async fn serve(ingress: Arc<Ingress>, mut stream: TcpStream, slot: Slot) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let end = run(&ingress, &mut stream).await;
    if let Err(code) = end {
        tracing::debug!(?peer, %code, "device connection closed");
    }
    drop(slot);
}

/// The key a session was opened under, rechecked whenever the registry changes.
struct SessionKey {
    key: DeviceKey,
    /// The device's previous key, accepted until this time (Unix ms, this gateway's clock).
    grace_until_ms: Option<i64>,
    from_replica: bool,
}

/// Hello to an accepted session: the device id, the session and its key, or the code already
/// sent.
async fn handshake(
    ingress: &Arc<Ingress>,
    stream: &mut TcpStream,
    frame: &[u8],
) -> Result<(u64, Session, SessionKey), ErrorCode> {
    let m = ingress.metrics();
    let version = Frame::new_unchecked(frame).version();
    // The device id, read unauthenticated to find the key (and the protocol 1 Hello).
    let (device_id, v1_hello) = match version {
        PROTOCOL_VERSION => match GatewaySession::peek_hello(frame) {
            Ok(h) => (h.device_id, None),
            Err(e) => {
                reject(m, stream, None, e.code()).await;
                return Err(e.code());
            }
        },
        v1::VERSION if ingress.config.accept_protocol_1 => {
            match v1::GatewaySession::peek_hello(frame) {
                Ok(h) => (h.device_id, Some(h)),
                Err(e) => {
                    reject_in(m, stream, None, e.code(), version).await;
                    return Err(e.code());
                }
            }
        }
        _ => {
            // No downgrade: an older device is answered in its framing, and refused.
            let code = ErrorCode::UnsupportedVersion;
            reject_in(m, stream, None, code, version).await;
            return Err(code);
        }
    };
    let HelloKeys { keys, from_replica } = match ingress.hello_keys(device_id).await {
        Ok(Some(keys)) => keys,
        Ok(None) => {
            reject_in(m, stream, None, ErrorCode::UnknownDevice, version).await;
            return Err(ErrorCode::UnknownDevice);
        }
        Err(e) => {
            reject_in(m, stream, None, code_of(&e), version).await;
            return Err(code_of(&e));
        }
    };
    if keys.state.revoked_at_ms.is_some() {
        // Its key may be in other hands: nothing is sealed under it any more.
        m.hellos_revoked.fetch_add(1, Relaxed);
        reject_in(m, stream, None, ErrorCode::UnknownDevice, version).await;
        return Err(ErrorCode::UnknownDevice);
    }
    if v1_hello.is_some() && keys.state.protocol != v1::VERSION {
        // No downgrade per device: only devices registered for protocol 1 may speak it.
        m.hellos_v1_refused.fetch_add(1, Relaxed);
        let code = ErrorCode::UnsupportedVersion;
        reject_in(m, stream, None, code, version).await;
        return Err(code);
    }
    let accept = |key: &DeviceKey| match v1_hello {
        None => GatewaySession::accept(key, frame, rand::random()).map(Session::V2),
        Some(_) => v1::GatewaySession::accept_salted(key, frame, rand::random()).map(Session::V1),
    };
    let now = now_ms();
    let previous = keys.state.previous_at(now);
    let (accepted, used) = match (accept(&keys.key), previous) {
        (Err(FrameError::BadAuth), Some(old)) => {
            let r = accept(&old);
            if r.is_ok() {
                m.hellos_previous_key.fetch_add(1, Relaxed);
            }
            (r, old)
        }
        (r, _) => (r, keys.key),
    };
    let mut session = match accepted {
        Ok(s) => s,
        Err(e) => {
            reject_in(m, stream, None, e.code(), version).await;
            return Err(e.code());
        }
    };
    if let (Some(h), Session::V1(s)) = (v1_hello, &session) {
        if !ingress.fresh_hello(device_id, h.boot, s.hello_counter()) {
            reject(m, stream, Some(&mut session), ErrorCode::Replay).await;
            return Err(ErrorCode::Replay);
        }
        m.hellos_v1.fetch_add(1, Relaxed);
    }
    if let (true, Some(rekeyed_at_ms), None) = (
        used == keys.key,
        keys.state.rekeyed_at_ms,
        keys.state.new_key_seen_ms,
    ) {
        ingress.note(
            device_id,
            Note::KeySeen {
                rekeyed_at_ms,
                at_ms: now,
            },
        );
    }
    if v1_hello.is_none() && keys.state.protocol == v1::VERSION {
        ingress.note(device_id, Note::SpokeV2);
    }
    let key = SessionKey {
        grace_until_ms: (used != keys.key)
            .then_some(keys.state.grace_until_ms)
            .flatten(),
        key: used,
        from_replica,
    };
    Ok((device_id, session, key))
}

/// Resolves when the previous key's grace window is over (never for the current key).
async fn grace_over(until_ms: Option<i64>) {
    match until_ms {
        Some(until) => {
            let left = until.saturating_sub(now_ms()).max(0) as u64;
            tokio::time::sleep(Duration::from_millis(left)).await
        }
        None => std::future::pending().await,
    }
}

/// Runs the connection; `Err(code)` when it ended on a rejection (already sent).
async fn run(ingress: &Arc<Ingress>, stream: &mut TcpStream) -> Result<(), ErrorCode> {
    let m = ingress.metrics();
    let mut reader = FrameReader::new();
    // Before the key is read: a revocation applied from here on is seen below.
    let mut registry = ingress.cluster.registry_changes();

    // Hello, within the handshake deadline.
    let frame =
        match tokio::time::timeout(ingress.config.handshake_timeout, reader.next(stream)).await {
            Err(_) => {
                m.handshake_timeouts.fetch_add(1, Relaxed);
                return Ok(());
            }
            Ok(Err(ReadEnd::Closed | ReadEnd::Io)) => return Ok(()),
            Ok(Err(ReadEnd::Frame(e))) => {
                reject(m, stream, None, e.code()).await;
                return Err(e.code());
            }
            Ok(Ok(f)) => f,
        };
    m.frames_in.fetch_add(1, Relaxed);
    let (device_id, mut session, mut key) = handshake(ingress, stream, frame).await?;
    let (high_water, device_session) = match ingress.open_session(device_id).await {
        Ok(opened) => opened,
        Err(e) => {
            reject(m, stream, Some(&mut session), code_of(&e)).await;
            return Err(code_of(&e));
        }
    };
    let welcome = Welcome {
        high_water,
        leader: ingress.leader_hint(),
        credit: ingress.credit(),
    };
    if !send(m, stream, &mut session, &Message::Welcome(welcome)).await {
        return Ok(());
    }
    tracing::debug!(device_id, high_water, "device connected");

    // Batches, in order; outcomes come back in the same order.
    let mut pending: VecDeque<(oneshot::Receiver<Outcomes>, Instant)> = VecDeque::new();
    let mut acked = high_water;
    let idle = ingress.config.idle_timeout;
    loop {
        let can_read = pending.len() < MAX_PENDING;
        let next_outcome = async {
            match pending.front_mut() {
                Some((rx, _)) => rx.await.unwrap_or_else(|_| Err(closed())),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = registry.recv() => {
                match changed {
                    Ok(Some(id)) if id != device_id => continue,
                    // Its own keys, anyone's, or more changes than were kept: recheck.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    // The node is stopping.
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
                match ingress.session_valid_until(device_id, &key.key, key.from_replica, now_ms()) {
                    Some(until) => key.grace_until_ms = until,
                    None => {
                        m.sessions_closed_key.fetch_add(1, Relaxed);
                        tracing::info!(device_id, "device session closed: its key is no longer accepted");
                        return Ok(());
                    }
                }
            }
            () = grace_over(key.grace_until_ms) => {
                m.sessions_closed_key.fetch_add(1, Relaxed);
                tracing::info!(device_id, "device session closed: the previous key's grace window is over");
                return Ok(());
            }
            outcome = next_outcome => {
                let read_at = pending.pop_front().expect("a pending batch").1;
                // Acks are cumulative: batches decided together get one Ack (fewer bytes
                // and writes under load); an error is answered in its turn.
                let mut next = Some((outcome, read_at));
                let mut through = None;
                let mut code = None;
                while let Some((outcome, read_at)) = next {
                    match stored_through(&outcome) {
                        Ok(seq) => {
                            through = Some(seq);
                            m.ack_latency.record(read_at.elapsed());
                            next = decided(&mut pending);
                        }
                        Err(c) => {
                            code = Some(c);
                            break;
                        }
                    }
                }
                if let Some(seq) = through {
                    acked = acked.max(seq);
                    let ack = Ack {
                        through_seq: acked,
                        credit: ingress.credit(),
                        leader: ingress.leader_hint(),
                    };
                    if !send(m, stream, &mut session, &Message::Ack(ack)).await {
                        return Ok(());
                    }
                    m.acks_sent.fetch_add(1, Relaxed);
                }
                if let Some(code) = code
                    && !refuse(m, stream, &mut session, code).await
                {
                    return Err(code);
                }
            }
            frame = tokio::time::timeout(idle, reader.next(stream)), if can_read => {
                let frame = match frame {
                    Err(_) => {
                        m.idle_closed.fetch_add(1, Relaxed);
                        return Ok(());
                    }
                    Ok(Err(ReadEnd::Closed | ReadEnd::Io)) => return Ok(()),
                    Ok(Err(ReadEnd::Frame(e))) => {
                        reject(m, stream, Some(&mut session), e.code()).await;
                        return Err(e.code());
                    }
                    Ok(Ok(f)) => f,
                };
                m.frames_in.fetch_add(1, Relaxed);
                let received_at_ms = now_ms();
                let read_at = Instant::now();
                match session.decode(frame) {
                    Ok(Message::Batch(view)) => {
                        m.batches_in.fetch_add(1, Relaxed);
                        m.records_in.fetch_add(u64::from(view.header().count), Relaxed);
                        let batch = DeviceBatch {
                            device_id,
                            received_at_ms,
                            body: view.as_bytes().to_vec(),
                            session: device_session,
                        };
                        match ingress.submit(batch) {
                            Ok(rx) => pending.push_back((rx, read_at)),
                            Err(e) => {
                                if !refuse(m, stream, &mut session, code_of(&e)).await {
                                    return Err(code_of(&e));
                                }
                            }
                        }
                    }
                    Ok(Message::Ping(p)) => {
                        if !send(m, stream, &mut session, &Message::Pong(Pong { nonce: p.nonce })).await {
                            return Ok(());
                        }
                    }
                    Ok(Message::Pong(_)) => {}
                    Ok(_) => {
                        reject(m, stream, Some(&mut session), ErrorCode::Malformed).await;
                        return Err(ErrorCode::Malformed);
                    }
                    Err(e) => {
                        reject(m, stream, Some(&mut session), e.code()).await;
                        return Err(e.code());
                    }
                }
            }
        }
    }
}
