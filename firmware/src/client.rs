//! The device client: [`Client::push`] from any task, [`Client::run`] owns the connection.

use core::cell::RefCell;

use cairn_protocol::{
    Ack, BatchEncoder, DeviceSession, EncodeError, ErrorCode, FrameError, FrameReassembler,
    GatewayAddr, KEY_LEN, MAX_FRAME, Message, Ping, Record, Welcome, unsealed_error_code,
};
use embassy_futures::select::{Either, Either3, select, select3};
use embassy_sync::blocking_mutex::Mutex;
use embassy_sync::blocking_mutex::raw::RawMutex;
use embassy_sync::signal::Signal;
use embassy_time::{Duration, Instant, Timer, with_timeout};

use crate::Seq;
use crate::backoff::{Backoff, Prng};
use crate::nonce::BootNonce;
use crate::outbox::{Outbox, OutboxFull, OverflowPolicy};
use crate::record::{self, StoredRecord, ValuesError};
use crate::store::{RamOnly, Store};
use crate::transport::{Connection, Transport, TransportError, write_all};

pub use cairn_protocol::Value;

/// Why [`Client::push`] refused a record. Nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PushError {
    /// The outbox is full and the policy is [`OverflowPolicy::RejectNewest`].
    Full,
    /// The record is larger than the whole outbox.
    TooLarge,
    /// More than `MAX_VALUES` values.
    TooManyValues,
    /// A Bytes/Str value longer than `MAX_BLOB`.
    BlobTooLarge,
}

impl core::fmt::Display for PushError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            PushError::Full => "outbox full",
            PushError::TooLarge => "record larger than the outbox",
            PushError::TooManyValues => "too many values in one record",
            PushError::BlobTooLarge => "bytes/str value too long",
        })
    }
}

impl core::error::Error for PushError {}

impl From<ValuesError> for PushError {
    fn from(e: ValuesError) -> Self {
        match e {
            ValuesError::TooManyValues => PushError::TooManyValues,
            ValuesError::BlobTooLarge => PushError::BlobTooLarge,
        }
    }
}

/// What [`Client::push_with`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Pushed {
    /// The record's seq (provisional until sent, see [`Client::push`]).
    pub seq: Seq,
    /// Older records dropped to make room (only under `DropOldest`; also counted in
    /// [`Status::dropped`]).
    pub dropped: u32,
}

/// Where the connection is. `Connected` means a Welcome was received on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ConnectionState {
    /// `run` has not started.
    #[default]
    Idle,
    /// Opening a stream to a gateway.
    Connecting,
    /// Hello sent, waiting for Welcome.
    Handshaking,
    /// Welcome received; records flow.
    Connected,
    /// Waiting before the next attempt.
    Backoff,
}

/// A snapshot of the client for the application ([`Client::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Status {
    /// Connection state.
    pub state: ConnectionState,
    /// Records accepted by `push`.
    pub pushed: u64,
    /// Records acknowledged (committed on a quorum) and removed from the outbox.
    pub acked: u64,
    /// Records dropped by the `DropOldest` policy (never acknowledged).
    pub dropped: u64,
    /// Pushes refused by the `RejectNewest` policy.
    pub rejected: u64,
    /// Failed attempts: connect failures, timeouts, broken connections, gateway errors.
    pub retries: u64,
    /// Sessions established (Welcome received) after the first one.
    pub reconnects: u64,
    /// Highest seq known committed (from Welcome or Ack); 0 before the first.
    pub acked_through: Seq,
    /// Records waiting in the outbox.
    pub queued: u32,
    /// Bytes of the outbox in use (records, their headers, wrap-around waste).
    pub outbox_bytes: u32,
    /// Size of the outbox in bytes (`N` of `Client<M, N>`).
    pub outbox_capacity: u32,
    /// The gateway of the current or last session.
    pub gateway: Option<GatewayAddr>,
    /// The last error code a gateway sent.
    pub last_error: Option<ErrorCode>,
}

/// Connection settings for [`Client::run`]. [`Config::new`] fills in the defaults listed on
/// each field.
#[derive(Debug, Clone)]
pub struct Config<'a> {
    /// The device id registered on the cluster.
    pub device_id: u64,
    /// The device's pre-shared key.
    pub key: [u8; KEY_LEN],
    /// Boot number, sent in the Hello: the time base of this boot's uptimes. Uniqueness is
    /// not needed for security (protocol 2); with `flash-outbox` use
    /// `flash::FlashOutbox::boot`.
    pub boot: u32,
    /// This boot's nonce (SPEC.md §5.2): never repeats under `key`.
    pub boot_nonce: BootNonce,
    /// Sent in Hello.
    pub firmware_version: u32,
    /// Gateways to try, in order; the list is rotated on failure. At least one.
    pub gateways: &'a [GatewayAddr],
    /// Most records per batch (also sent as `Hello::max_batch`). Default 64.
    pub max_batch: u16,
    /// Bound on opening a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Bound on Welcome after Hello, on Pong after Ping, and on progress (an Ack) while records
    /// are in flight; also on each write. Default 10 s (acks wait for a quorum fsync).
    pub response_timeout: Duration,
    /// Ping after this long without traffic. Default 30 s.
    pub ping_interval: Duration,
    /// Shortest back-off delay. Default 100 ms.
    pub backoff_floor: Duration,
    /// First back-off ceiling, doubled per consecutive failure. Default 500 ms.
    pub backoff_base: Duration,
    /// Largest back-off ceiling. Default 60 s.
    pub backoff_max: Duration,
    /// Least delay after an `Overloaded` error. Default 5 s.
    pub overloaded_delay: Duration,
}

impl<'a> Config<'a> {
    /// Settings with the documented defaults.
    pub const fn new(
        device_id: u64,
        key: [u8; KEY_LEN],
        boot: u32,
        boot_nonce: BootNonce,
        gateways: &'a [GatewayAddr],
    ) -> Self {
        Self {
            device_id,
            key,
            boot,
            boot_nonce,
            firmware_version: 0,
            gateways,
            max_batch: 64,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            backoff_floor: Duration::from_millis(100),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            overloaded_delay: Duration::from_secs(5),
        }
    }
}

/// The counters behind [`Status`]. Everything the client keeps in its `static` is zero at
/// start (no `Option<ErrorCode>`, whose `None` is not zero bytes), so the client lands in
/// `.bss` and costs no flash for an initialiser.
pub(crate) struct Stats {
    pub(crate) state: ConnectionState,
    pub(crate) pushed: u64,
    pub(crate) acked: u64,
    pub(crate) dropped: u64,
    pub(crate) rejected: u64,
    pub(crate) retries: u64,
    pub(crate) reconnects: u64,
    pub(crate) acked_through: Seq,
    pub(crate) gateway: Option<GatewayAddr>,
}

/// State shared between `push` callers and the run loop, behind a blocking mutex.
pub(crate) struct Shared<const N: usize> {
    pub(crate) outbox: Outbox<N>,
    pub(crate) stats: Stats,
    /// Last gateway error code (`ErrorCode::to_u8`), 0 for none.
    last_error: u8,
    /// Seq of the last record put on the wire (`wire_next() - 1`; zero-initialised, see
    /// `Outbox::before_first`). Records after it have never been sent (on any connection of
    /// this boot), so their seqs may still be renumbered.
    pub(crate) wire_last: Seq,
    /// Sum of renumberings (`rebase` deltas) the store has not applied yet.
    pub(crate) shift: i64,
}

impl<const N: usize> Shared<N> {
    /// Seq of the next record to put on the wire.
    fn wire_next(&self) -> Seq {
        self.wire_last.saturating_add(1)
    }

    /// `seq` ≥ 1 (seqs start at 1; callers check their additions).
    pub(crate) fn set_wire_next(&mut self, seq: Seq) {
        self.wire_last = seq.saturating_sub(1);
    }

    /// Renumber all held records so the oldest gets `first`; remembered for the store.
    pub(crate) fn rebase(&mut self, first: Seq) {
        let old = self.outbox.first_seq();
        if old != first {
            self.shift += first as i64 - old as i64;
            self.outbox.rebase(first);
        }
    }

    /// Put back a record read from flash at boot (see `FlashOutbox::restore`). Restored
    /// records count as possibly sent: the first Welcome acknowledges those it has committed.
    #[cfg(feature = "flash-outbox")]
    pub(crate) fn restore_record(&mut self, seq: Seq, len: usize, write: impl FnOnce(&mut [u8])) {
        if self.outbox.is_empty() {
            self.outbox.rebase(seq);
        } else if seq != self.outbox.next_seq() {
            warn!(
                "cairn: flash record {} out of sequence, numbered {}",
                seq,
                self.outbox.next_seq()
            );
        }
        match self.outbox.push(len, write) {
            Ok(p) => self.stats.dropped += u64::from(p.dropped),
            Err(_) => error!("cairn: flash record {} does not fit the outbox", seq),
        }
        self.set_wire_next(self.outbox.next_seq());
    }

    /// Number this boot's records from `floor + 1` on (fresh outbox, flash empty).
    #[cfg(feature = "flash-outbox")]
    pub(crate) fn start_after(&mut self, floor: Seq) {
        if self.outbox.is_empty() {
            self.outbox.rebase(floor.saturating_add(1));
            self.set_wire_next(floor.saturating_add(1));
        }
    }

    pub(crate) fn note_dropped(&mut self, n: u32) {
        if n == 0 {
            return;
        }
        self.stats.dropped += u64::from(n);
        // Dropping records that were never sent would leave a seq gap the gateway refuses
        // (`SeqGap`): close it by renumbering the unsent rest, which nobody has seen yet.
        if self.outbox.first_seq() > self.wire_next() {
            let to = self.wire_next();
            self.rebase(to);
        }
    }
}

/// The Cairn device client. See the crate documentation for an example.
///
/// `M` is the mutex kind guarding the shared state (`CriticalSectionRawMutex` to push from
/// interrupts or other executors, `NoopRawMutex` for one executor on one core, a `std` one on
/// the host); `N` is the outbox size in bytes. Create it in a `static` (all constructors are
/// `const`) and share `&'static Client` between the task that runs [`Client::run`] and the
/// tasks that push.
pub struct Client<M: RawMutex, const N: usize> {
    pub(crate) shared: Mutex<M, RefCell<Shared<N>>>,
    pushed: Signal<M, ()>,
    /// Raised whenever records leave the outbox (acked or dropped).
    drained: Signal<M, ()>,
}

impl<M: RawMutex, const N: usize> Client<M, N> {
    /// An empty client with the given overflow policy.
    ///
    /// A `static` client made with `DropOldest` is all zero bytes and lands in `.bss`; with
    /// `RejectNewest` its initialiser (about `N` bytes) goes to flash as `.data`. To avoid
    /// that, create it with `DropOldest` and call [`Client::set_policy`] at start-up.
    pub const fn new(policy: OverflowPolicy) -> Self {
        Self {
            shared: Mutex::new(RefCell::new(Shared {
                outbox: Outbox::new(policy, 1),
                stats: Stats {
                    state: ConnectionState::Idle,
                    pushed: 0,
                    acked: 0,
                    dropped: 0,
                    rejected: 0,
                    retries: 0,
                    reconnects: 0,
                    acked_through: 0,
                    gateway: None,
                },
                wire_last: 0,
                last_error: 0,
                shift: 0,
            })),
            pushed: Signal::new(),
            drained: Signal::new(),
        }
    }

    /// Queue one record of `values` for `stream`, stamped with the current uptime. Never
    /// blocks on the network; callable from any task (and from interrupts with a
    /// critical-section mutex).
    ///
    /// Returns the record's seq. A seq is final once the record has been sent; until then it
    /// may be renumbered downwards when older unsent records are dropped or when the first
    /// Welcome of a boot gives the gateway's high-water (the gateway refuses seq gaps), so use
    /// it for logging and ordering, not as a durable id before [`Status::acked_through`]
    /// passes it.
    pub fn push(&self, stream: u16, values: &[Value<'_>]) -> Result<Seq, PushError> {
        self.push_inner(stream, values, None).map(|p| p.seq)
    }

    /// [`Client::push`] with `policy` deciding, for this record only, what happens when the
    /// outbox is full (the client's own policy is untouched, so no other push sees the
    /// change), and reporting how many older records were dropped to make room. For example
    /// `RejectNewest` for an alarm that must not push readings out, in a `DropOldest` client.
    pub fn push_with(
        &self,
        stream: u16,
        values: &[Value<'_>],
        policy: OverflowPolicy,
    ) -> Result<Pushed, PushError> {
        self.push_inner(stream, values, Some(policy))
    }

    fn push_inner(
        &self,
        stream: u16,
        values: &[Value<'_>],
        policy: Option<OverflowPolicy>,
    ) -> Result<Pushed, PushError> {
        let uptime_ms = Instant::now().as_millis();
        let len = record::encoded_len(uptime_ms, values)?;
        let pushed = self.lock(|s| {
            let own = s.outbox.policy();
            s.outbox.set_policy(policy.unwrap_or(own));
            let result = s
                .outbox
                .push(len, |dst| record::encode(dst, stream, uptime_ms, values));
            s.outbox.set_policy(own);
            match result {
                Ok(p) => {
                    s.stats.pushed += 1;
                    s.note_dropped(p.dropped);
                    Ok(Pushed {
                        seq: s.outbox.next_seq().saturating_sub(1),
                        dropped: p.dropped,
                    })
                }
                Err(OutboxFull::Full) => {
                    s.stats.rejected += 1;
                    Err(PushError::Full)
                }
                Err(OutboxFull::TooLarge) => Err(PushError::TooLarge),
            }
        })?;
        self.pushed.signal(());
        Ok(pushed)
    }

    /// Wait until the outbox is empty: every record pushed so far has been acknowledged (or
    /// dropped by `DropOldest`). For example before powering the radio down. Meant for one
    /// waiting task at a time.
    pub async fn wait_empty(&self) {
        while self.lock(|s| !s.outbox.is_empty()) {
            self.drained.wait().await;
        }
    }

    /// A snapshot of counters and connection state.
    pub fn status(&self) -> Status {
        self.lock(|s| {
            let t = &s.stats;
            Status {
                state: t.state,
                pushed: t.pushed,
                acked: t.acked,
                dropped: t.dropped,
                rejected: t.rejected,
                retries: t.retries,
                reconnects: t.reconnects,
                acked_through: t.acked_through,
                queued: s.outbox.len() as u32,
                outbox_bytes: s.outbox.bytes_used() as u32,
                outbox_capacity: N as u32,
                gateway: t.gateway,
                last_error: (s.last_error != 0).then(|| ErrorCode::from_u8(s.last_error)),
            }
        })
    }

    /// Change the overflow policy at run time.
    pub fn set_policy(&self, policy: OverflowPolicy) {
        self.lock(|s| s.outbox.set_policy(policy));
    }

    /// Bytes of the outbox in use (records, headers, wrap waste).
    pub fn outbox_bytes_used(&self) -> usize {
        self.lock(|s| s.outbox.bytes_used())
    }

    pub(crate) fn lock<R>(&self, f: impl FnOnce(&mut Shared<N>) -> R) -> R {
        self.shared.lock(|c| f(&mut c.borrow_mut()))
    }

    /// Own the connection forever with a RAM-only outbox: connect, hand-shake, send, retry,
    /// fail over. Run it in its own task; it only returns if dropped.
    ///
    /// On the host: see the crate documentation's *Run it on the host* (features `std` for the
    /// time driver and `tokio` for the transport, a `current_thread` runtime with a
    /// `LocalSet`).
    pub async fn run<T: Transport>(&self, transport: &mut T, config: &Config<'_>) -> ! {
        self.run_with_store(transport, config, &mut RamOnly).await
    }

    /// [`Client::run`] with a persistent outbox (see `flash::FlashOutbox`, feature `flash-outbox`).
    pub async fn run_with_store<T: Transport, S: Store>(
        &self,
        transport: &mut T,
        config: &Config<'_>,
        store: &mut S,
    ) -> ! {
        assert!(!config.gateways.is_empty(), "Config::gateways is empty");
        let mut link = Link {
            session: DeviceSession::new(&config.key, config.boot, config.boot_nonce.bytes()),
            backoff: Backoff::new(
                config.backoff_floor,
                config.backoff_base,
                config.backoff_max,
                Prng::from_device(config.device_id, config.boot),
            ),
            next_gateway: 0,
            hint: None,
            redirects: 0,
            sessions: 0,
            ping_nonce: 0,
            tx: [0; MAX_FRAME],
            rx: FrameReassembler::new(),
            batch: [0; MAX_FRAME],
        };
        loop {
            let addr = link.pick_gateway(config.gateways);
            let end = self
                .connection(transport, config, store, &mut link, addr)
                .await;
            let delay = match end {
                End::Redirect(to) => {
                    link.redirects += 1;
                    if link.redirects <= MAX_REDIRECTS {
                        link.hint = Some(to);
                        None
                    } else {
                        // A redirect loop: go back to the list, with back-off.
                        link.redirects = 0;
                        Some(link.backoff.next_delay())
                    }
                }
                End::Failed(why) => {
                    info!("cairn: connection to {} ended: {}", addr, why);
                    self.lock(|s| {
                        s.stats.retries += 1;
                        if let Why::Gateway(code) = why {
                            s.last_error = code.to_u8();
                        }
                    });
                    link.next_gateway = link.next_gateway.wrapping_add(1);
                    Some(match why {
                        // Anyone on the path can forge an unsealed frame: it is a dropped
                        // connection, nothing more (SPEC.md §5.6).
                        Why::Unsealed(_) => link.backoff.next_delay(),
                        Why::Gateway(ErrorCode::Overloaded) => {
                            link.backoff.next_delay_at_least(config.overloaded_delay)
                        }
                        Why::Gateway(
                            ErrorCode::UnknownDevice
                            | ErrorCode::BadAuth
                            | ErrorCode::UnsupportedVersion
                            | ErrorCode::SchemaMismatch,
                        ) => link.backoff.next_delay_at_least(config.backoff_max),
                        _ => link.backoff.next_delay(),
                    })
                }
            };
            if let Some(delay) = delay {
                self.lock(|s| s.stats.state = ConnectionState::Backoff);
                debug!("cairn: retry in {} ms", delay.as_millis());
                // Keep persisting while no gateway is reachable: a record pushed now reaches
                // the store within one sync, not only once a session is up.
                let until = Instant::now() + delay;
                loop {
                    store.sync(self).await;
                    if let Either::First(()) = select(Timer::at(until), self.pushed.wait()).await {
                        break;
                    }
                }
            }
        }
    }

    /// One connection from connect to close.
    async fn connection<T: Transport, S: Store>(
        &self,
        transport: &mut T,
        config: &Config<'_>,
        store: &mut S,
        link: &mut Link,
        addr: GatewayAddr,
    ) -> End {
        self.lock(|s| {
            s.stats.state = ConnectionState::Connecting;
            s.stats.gateway = Some(addr);
        });
        // Persist what was pushed since the last sync before (possibly long) connect and
        // handshake waits; records pushed during them are persisted when they end.
        store.sync(self).await;
        debug!("cairn: connecting to {}", addr);
        let mut conn = match with_timeout(config.connect_timeout, transport.connect(addr)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!("cairn: connect to {} failed: {}", addr, e);
                return End::Failed(Why::Transport(e));
            }
            Err(_) => {
                warn!("cairn: connect to {} timed out", addr);
                return End::Failed(Why::Timeout);
            }
        };
        let end = self.converse(&mut conn, config, store, link, addr).await;
        let _ = with_timeout(Duration::from_millis(500), async {
            let _ = conn.flush().await;
            conn.close().await;
        })
        .await;
        end
    }

    async fn converse<C: Connection, S: Store>(
        &self,
        conn: &mut C,
        config: &Config<'_>,
        store: &mut S,
        link: &mut Link,
        addr: GatewayAddr,
    ) -> End {
        link.rx.reset();
        self.lock(|s| s.stats.state = ConnectionState::Handshaking);
        let hello = link
            .session
            .hello(config.device_id, config.firmware_version, config.max_batch);
        if let Err(end) = link.send(conn, config, &Message::Hello(hello)).await {
            return end;
        }

        // Handshake: the first answer decides.
        let deadline = Instant::now() + config.response_timeout;
        let welcome: Welcome = loop {
            let msg = match embassy_time::with_deadline(deadline, fill(conn, &mut link.rx)).await {
                Ok(Ok(())) => link.receive(),
                Ok(Err(why)) => Err(why),
                Err(_) => Err(Why::Timeout),
            };
            match msg {
                Err(why) => return End::Failed(why),
                Ok(Owned::Welcome(w)) => break w,
                Ok(Owned::Redirect(to)) => return End::Redirect(to.resolve(addr.ip)),
                Ok(Owned::Error(code)) => return gateway_error(code),
                Ok(Owned::Ping(nonce)) => {
                    if let Err(end) = link.pong(conn, config, nonce).await {
                        return end;
                    }
                }
                Ok(_) => return End::Failed(Why::Frame(FrameError::Unexpected)),
            }
        };

        // Welcome: of the records ever sent, those at or below high-water are committed. The
        // rest are renumbered to follow high-water without a gap (a no-op unless records were
        // dropped, or were pushed before this boot's first Welcome) and resent from there.
        // A high-water at the end of the seq space cannot be followed (a broken gateway).
        let Some(resume) = welcome.high_water.checked_add(1) else {
            return End::Failed(Why::Frame(FrameError::Malformed));
        };
        let first_session = link.sessions == 0;
        link.sessions += 1;
        link.redirects = 0;
        link.backoff.reset();
        if let Some(leader) = welcome.leader {
            link.hint = Some(leader.resolve(addr.ip));
        }
        self.lock(|s| {
            let sent_through = s.wire_last;
            let n = s.outbox.ack_through(welcome.high_water.min(sent_through));
            s.stats.acked += n as u64;
            s.rebase(resume);
            s.set_wire_next(resume);
            s.stats.acked_through = welcome.high_water;
            s.stats.state = ConnectionState::Connected;
            s.last_error = 0;
            if !first_session {
                s.stats.reconnects += 1;
            }
        });
        self.drained.signal(());
        info!(
            "cairn: connected to {}, high-water {}, credit {}",
            addr, welcome.high_water, welcome.credit
        );
        let mut window_end = welcome.high_water.saturating_add(u64::from(welcome.credit));
        let mut acked = welcome.high_water;
        let mut last_rx = Instant::now();
        let mut last_progress = Instant::now();
        let mut ping_sent: Option<Instant> = None;

        loop {
            let durable = store.sync(self).await;
            // Send as many batches as credit and durability allow.
            loop {
                match self
                    .send_batch(conn, config, link, durable, window_end)
                    .await
                {
                    Ok(Some(first)) => {
                        if acked.checked_add(1) == Some(first) {
                            // Nothing was in flight: the ack clock starts now.
                            last_progress = Instant::now();
                        }
                    }
                    Ok(None) => break,
                    Err(end) => return end,
                }
            }

            let in_flight = self.lock(|s| s.wire_last) > acked;
            let deadline = if in_flight {
                last_progress + config.response_timeout
            } else if let Some(at) = ping_sent {
                at + config.response_timeout
            } else {
                last_rx + config.ping_interval
            };
            match select3(
                fill(conn, &mut link.rx),
                self.pushed.wait(),
                Timer::at(deadline),
            )
            .await
            {
                Either3::First(Ok(())) => {
                    last_rx = Instant::now();
                    let msg = match link.receive() {
                        Ok(m) => m,
                        Err(why) => return End::Failed(why),
                    };
                    match msg {
                        Owned::Ack(ack) => {
                            // An Ack covers only records that were sent: a gateway that claims
                            // more is broken, and nothing unsent is dropped on its word.
                            let through = self.lock(|s| ack.through_seq.min(s.wire_last));
                            if through > acked {
                                acked = through;
                                last_progress = Instant::now();
                            }
                            window_end = acked.saturating_add(u64::from(ack.credit));
                            if let Some(leader) = ack.leader {
                                link.hint = Some(leader.resolve(addr.ip));
                            }
                            self.lock(|s| {
                                let n = s.outbox.ack_through(through);
                                s.stats.acked += n as u64;
                                s.stats.acked_through = s.stats.acked_through.max(through);
                            });
                            self.drained.signal(());
                            trace!("cairn: ack through {}", ack.through_seq);
                        }
                        Owned::Pong(nonce) if nonce == link.ping_nonce => ping_sent = None,
                        Owned::Pong(_) => {}
                        Owned::Ping(nonce) => {
                            if let Err(end) = link.pong(conn, config, nonce).await {
                                return end;
                            }
                        }
                        Owned::Redirect(to) => return End::Redirect(to.resolve(addr.ip)),
                        Owned::Error(code) => return gateway_error(code),
                        Owned::Welcome(_) | Owned::Other => {
                            return End::Failed(Why::Frame(FrameError::Unexpected));
                        }
                    }
                }
                Either3::First(Err(why)) => return End::Failed(why),
                Either3::Second(()) => {}
                Either3::Third(()) => {
                    if in_flight || ping_sent.is_some() {
                        warn!("cairn: no answer from {} in time", addr);
                        return End::Failed(Why::Timeout);
                    }
                    link.ping_nonce = link.ping_nonce.wrapping_add(1);
                    let ping = Message::Ping(Ping {
                        nonce: link.ping_nonce,
                    });
                    if let Err(end) = link.send(conn, config, &ping).await {
                        return end;
                    }
                    ping_sent = Some(Instant::now());
                }
            }
        }
    }

    /// Encode the next batch (records from `wire_next`, below `durable`, within the credit
    /// window) and send it. Returns the batch's first seq, or `None` when there is nothing to
    /// send. Building the frame and advancing `wire_next` happen under one lock, so a record is
    /// never renumbered once it is in a frame.
    async fn send_batch<C: Connection>(
        &self,
        conn: &mut C,
        config: &Config<'_>,
        link: &mut Link,
        durable: Seq,
        window_end: Seq,
    ) -> Result<Option<Seq>, End> {
        let sent_uptime_ms = Instant::now().as_millis();
        let Link {
            batch, tx, session, ..
        } = link;
        let built = self.lock(|s| {
            let first = s.wire_next();
            let limit = s
                .outbox
                .next_seq()
                .min(durable)
                .min(window_end.saturating_add(1));
            if first >= limit {
                return Ok(None);
            }
            let count = (limit - first).min(u64::from(config.max_batch)) as usize;
            let mut enc = BatchEncoder::new(&mut batch[..], first, sent_uptime_ms);
            for (_, bytes) in s.outbox.iter_from(first).take(count) {
                let Some(r) = StoredRecord::decode(bytes) else {
                    // Cannot happen for records this crate wrote; never send garbage.
                    error!("cairn: undecodable record in the outbox");
                    break;
                };
                let rec = Record {
                    stream: r.stream,
                    // Records restored from flash carry an uptime of an earlier boot.
                    uptime_ms: r.uptime_ms.min(sent_uptime_ms),
                    values: r.values(),
                };
                match enc.push(&rec) {
                    Ok(()) => {}
                    Err(EncodeError::Full) => break,
                    Err(e) => {
                        error!("cairn: record cannot be encoded: {}", e);
                        break;
                    }
                }
            }
            if enc.is_empty() {
                return Err(End::Failed(Why::Encode));
            }
            let n = u64::from(enc.count());
            let view = enc.finish().map_err(|_| End::Failed(Why::Encode))?;
            let len = session
                .encode(&Message::Batch(view), &mut tx[..])
                .map_err(|_| End::Failed(Why::Encode))?;
            // `finish` checked that `first + n - 1` fits a seq.
            s.set_wire_next(first.saturating_add(n));
            Ok(Some((len, first, n)))
        })?;
        let Some((len, first, n)) = built else {
            return Ok(None);
        };
        match with_timeout(config.response_timeout, write_all(conn, &tx[..len])).await {
            Ok(Ok(())) => {
                trace!(
                    "cairn: sent batch {}..={}",
                    first,
                    first.saturating_add(n - 1)
                );
                Ok(Some(first))
            }
            Ok(Err(e)) => Err(End::Failed(Why::Transport(e))),
            Err(_) => Err(End::Failed(Why::Timeout)),
        }
    }
}

/// Consecutive redirects followed without a Welcome before falling back to the list.
const MAX_REDIRECTS: u32 = 3;

/// Receive buffer: gateway frames are small (the largest in protocol 2, a Welcome with a
/// leader hint and the challenge, is under 60 bytes), so the client does not reserve a full `MAX_FRAME` for
/// them. A larger gateway frame ends the connection as `TooLarge`.
const RX_MAX: usize = 256;

/// Run-loop state that lives across connections.
struct Link {
    session: DeviceSession,
    backoff: Backoff,
    next_gateway: usize,
    /// Leader hint or redirect target, tried once before the list.
    hint: Option<GatewayAddr>,
    redirects: u32,
    sessions: u64,
    ping_nonce: u32,
    tx: [u8; MAX_FRAME],
    rx: FrameReassembler<RX_MAX>,
    batch: [u8; MAX_FRAME],
}

impl Link {
    fn pick_gateway(&mut self, list: &[GatewayAddr]) -> GatewayAddr {
        self.hint
            .take()
            .unwrap_or(list[self.next_gateway % list.len()])
    }

    async fn send<C: Connection>(
        &mut self,
        conn: &mut C,
        config: &Config<'_>,
        msg: &Message<'_>,
    ) -> Result<(), End> {
        let len = self
            .session
            .encode(msg, &mut self.tx)
            .map_err(|_| End::Failed(Why::Encode))?;
        match with_timeout(config.response_timeout, write_all(conn, &self.tx[..len])).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Failed(Why::Transport(e))),
            Err(_) => Err(End::Failed(Why::Timeout)),
        }
    }

    /// Decodes the frame [`fill`] found in `rx`, copying out what the run loop needs.
    fn receive(&mut self) -> Result<Owned, Why> {
        let frame = self
            .rx
            .next_frame()
            .map_err(Why::Frame)?
            .ok_or(Why::Frame(FrameError::Truncated))?;
        let unsealed = unsealed_error_code(frame);
        match self.session.decode(frame) {
            Ok(msg) => Ok(Owned::from(msg)),
            Err(FrameError::Unsealed) => Err(Why::Unsealed(unsealed)),
            Err(e) => Err(Why::Frame(e)),
        }
    }

    async fn pong<C: Connection>(
        &mut self,
        conn: &mut C,
        config: &Config<'_>,
        nonce: u32,
    ) -> Result<(), End> {
        let pong = Message::Pong(cairn_protocol::Pong { nonce });
        self.send(conn, config, &pong).await
    }
}

/// How a connection ended.
enum End {
    /// The gateway sent us elsewhere (address already resolved).
    Redirect(GatewayAddr),
    /// Anything else: count a retry, rotate, back off.
    Failed(Why),
}

#[derive(Debug, Clone, Copy)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
enum Why {
    Transport(TransportError),
    Timeout,
    Closed,
    Frame(FrameError),
    Encode,
    Gateway(ErrorCode),
    /// An unsealed Error frame (its code, for the log only).
    Unsealed(Option<ErrorCode>),
}

impl core::fmt::Display for Why {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Why::Transport(e) => write!(f, "{e}"),
            Why::Timeout => f.write_str("timed out"),
            Why::Closed => f.write_str("closed by the gateway"),
            Why::Frame(e) => write!(f, "bad frame: {e}"),
            Why::Encode => f.write_str("could not encode a frame"),
            Why::Gateway(code) => write!(f, "gateway error {code}"),
            Why::Unsealed(Some(code)) => write!(f, "unsealed error {code} (not authenticated)"),
            Why::Unsealed(None) => f.write_str("unsealed error (not authenticated)"),
        }
    }
}

/// What each sealed gateway error code means for the device (all of them end the connection;
/// the next Welcome re-synchronises seqs, so resending is always safe; an unsealed Error is
/// only a dropped connection, SPEC.md §5.6):
/// - `NotLeader`, `Internal`, `SeqGap`, `Replay`, `Malformed`, `TooLarge`, unknown codes:
///   back off normally and try the next gateway.
/// - `Overloaded`: back off at least `Config::overloaded_delay`, then try the next gateway.
/// - `BadAuth`, `UnsupportedVersion`, `SchemaMismatch` (and `UnknownDevice`): configuration
///   problems that retrying soon will not fix; wait the maximum back-off and keep the records
///   (the code shows in [`Status::last_error`] until a session succeeds).
fn gateway_error(code: ErrorCode) -> End {
    warn!("cairn: gateway error {}", code);
    End::Failed(Why::Gateway(code))
}

/// The parts of a decoded message the run loop needs, copied out of the receive buffer.
enum Owned {
    Welcome(Welcome),
    Ack(Ack),
    Redirect(GatewayAddr),
    Error(ErrorCode),
    Ping(u32),
    Pong(u32),
    Other,
}

impl From<Message<'_>> for Owned {
    fn from(m: Message<'_>) -> Self {
        match m {
            Message::Welcome(w) => Owned::Welcome(w),
            Message::Ack(a) => Owned::Ack(a),
            Message::Redirect(r) => Owned::Redirect(r.addr),
            Message::Error(e) => Owned::Error(e.code),
            Message::Ping(p) => Owned::Ping(p.nonce),
            Message::Pong(p) => Owned::Pong(p.nonce),
            Message::Hello(_) | Message::Batch(_) => Owned::Other,
        }
    }
}

/// Reads until `rx` holds a whole frame (take it with [`Link::receive`]). Cancel-safe: bytes
/// read stay in `rx` when a timer or a push wins the race against this read.
async fn fill<C: Connection>(conn: &mut C, rx: &mut FrameReassembler<RX_MAX>) -> Result<(), Why> {
    while !rx.frame_ready().map_err(Why::Frame)? {
        match conn.read(rx.read_buf()).await {
            Ok(0) => return Err(Why::Closed),
            Ok(n) => rx.commit(n),
            Err(e) => return Err(Why::Transport(e)),
        }
    }
    Ok(())
}
