//! The outbox in NOR flash (feature `flash-outbox`), on sequential-storage 8.
//!
//! [`FlashOutbox`] mirrors the RAM outbox into a sequential-storage *queue* and keeps three
//! small values in a sequential-storage *map*: the layout version, the boot counter and the seq
//! offset. The run loop drives it through [`Store::sync`]:
//!
//! - every record is written to flash **before** it is sent, and popped from flash only after
//!   the outbox dropped it (cumulative Ack, or the `DropOldest` policy). So after a reboot or a
//!   power cut, flash holds every record the gateway may not have committed, and
//!   [`FlashOutbox::restore`] puts them back into the RAM outbox to be resent with the same seqs.
//!   The gateway skips the ones it had committed (Welcome's high-water), so nothing is stored
//!   twice and nothing acknowledged is needed again.
//! - Each flash item carries its seq as `stored = seq + offset`. Renumbering the outbox (to
//!   close a gap, see the crate docs) changes only the persisted offset: one small map write,
//!   made after the dropped items are popped and before any renumbered record is sent.
//! - A *seq floor* is reserved ahead in flash in steps of [`SEQ_RESERVE_STEP`]: no item is
//!   written with a seq above the persisted floor. When a boot finds the flash queue empty,
//!   its records are numbered from `floor + 1`, provisionally, so they can never be mistaken
//!   for records a gateway already committed (which all have seqs at or below the floor); the
//!   first Welcome renumbers them to follow the gateway's high-water (no gap, since the gateway
//!   refuses gaps).
//! - The boot counter increments on every [`FlashOutbox::open`]; pass [`FlashOutbox::boot`] to
//!   [`crate::Config::boot`] (the protocol's nonces need a boot number that never repeats).
//!
//! - The run loop syncs in every state, not only in session: at the start of each connection
//!   attempt, after every push while it backs off between attempts, and before every batch in
//!   session. A device that reaches no gateway therefore keeps its records on flash within one
//!   sync of `push` (records pushed during a connect or handshake wait are written when that
//!   wait ends, so at most `connect_timeout` + `response_timeout` later). Syncing cannot happen
//!   *in* `push`: `push` is synchronous, callable from any task or interrupt, and flash writes
//!   are async and slow. Nor does the run loop cancel a sync to start connecting: a sync dropped
//!   between a flash write and its bookkeeping would break the RAM/flash mirror.
//!   The seq rules hold unchanged offline: a record written before any Welcome carries its
//!   provisional seq (above the floor found at boot, so above anything a gateway committed)
//!   and the floor is reserved past it first; if power is cut, the next boot restores it with
//!   that seq, and the next Welcome renumbers it to follow high-water, the new offset persisted
//!   before any renumbered record is sent. A seq is never on the wire before it is on flash,
//!   so a renumbering never hands out a seq already sent for other content.
//!
//! Together: a seq that went on the wire is never used again for other content, across any
//! number of power cuts (`tests/flash.rs` cuts power at random bytes of flash writes and
//! erases and checks exactly this, plus exactly-once, in-order delivery).
//!
//! # Capacity and wear
//! - A record takes `8` (seq) + its encoded length (21 bytes for three `f32`s) + sequential-
//!   storage's item header (8 bytes, rounded up to the flash word), so about 40 bytes for a
//!   typical reading: a 16 KiB queue region holds about 400 records.
//! - Flash is only a mirror of the RAM outbox, so it never holds more than the RAM outbox:
//!   give the queue region at least `2 * N` bytes plus two pages, so a full RAM outbox always
//!   fits even when the queue's pages are partly filled by popped items. With less, a full
//!   flash queue applies the outbox's policy (`DropOldest` drops the oldest record from both;
//!   `RejectNewest` holds new records in RAM, unsent, until acks free flash).
//! - Every record is written once and marked popped once (one extra word write); a page is
//!   erased each time the queue wraps past it. At R records/s of ~40 bytes on a region of P
//!   pages of S bytes, each page is erased about every `P * S / (40 * R)` seconds: 16 pages of
//!   4 KiB at 1 record/s is one erase per page every 27 minutes, 100k cycles in about 5 years.
//!   Size the region for the rate.
//! - The map region takes one item per boot (boot counter), one per renumbering (about one per
//!   boot) and one per [`SEQ_RESERVE_STEP`] records (seq floor); sequential-storage's map
//!   appends and compacts, so 2 pages of 4 KiB last for hundreds of thousands of boots.
//! - Flash pages must be at least ~600 bytes (the largest record plus headers), the queue region
//!   at least 1 page, the map region at least 2 pages. The flash must support writing a word
//!   twice (`MultiwriteNorFlash`: popping marks items), as most NOR flash does.
//! - Operations run without a cache (`Cache::new_uncached`): each one scans the queue pages.
//!   That is fine for tens of pages; time spent is on the run loop's task, not on `push`.
//!
//! A flash error is logged and counted ([`FlashOutbox::errors`]); the run loop then sends only
//! what is already in flash and retries on every sync. A device whose flash keeps failing stops
//! sending new records (they wait in RAM) rather than risk the exactly-once promise.

use core::ops::Range;

use embassy_sync::blocking_mutex::raw::RawMutex;
use embedded_storage_async::nor_flash::MultiwriteNorFlash;
use sequential_storage::cache::Cache;
use sequential_storage::map::{MapConfig, MapStorage};
use sequential_storage::queue::{QueueConfig, QueueStorage};

use crate::outbox::OverflowPolicy;
use crate::record::{self, FORMAT_VERSION, MAX_RECORD_LEN, StoredRecord};
use crate::{Client, Seq, Store};

const KEY_FORMAT: u8 = 1;
const KEY_BOOT: u8 = 2;
const KEY_OFFSET: u8 = 3;
const KEY_SEQ_FLOOR: u8 = 4;

/// Seqs reserved per write of the seq floor: one small map write per this many records.
pub const SEQ_RESERVE_STEP: u64 = 256;

const SEQ_LEN: usize = 8;
/// Largest flash item, rounded up to the largest flash word sequential-storage supports.
const ITEM_BUF: usize = (SEQ_LEN + MAX_RECORD_LEN).div_ceil(32) * 32;

/// Why opening or restoring the flash outbox failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FlashError {
    /// A region is not page-aligned, too small, or the pages are too small.
    BadRegion,
    /// The flash holds an outbox of another layout version.
    Format(u8),
    /// The flash driver failed, or sequential-storage found corruption it could not repair.
    Storage,
}

impl core::fmt::Display for FlashError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FlashError::BadRegion => f.write_str("flash region not usable for the outbox"),
            FlashError::Format(v) => write!(f, "flash outbox has layout version {v}"),
            FlashError::Storage => f.write_str("flash storage error"),
        }
    }
}

impl core::error::Error for FlashError {}

impl<E> From<sequential_storage::Error<E>> for FlashError {
    fn from(_: sequential_storage::Error<E>) -> Self {
        FlashError::Storage
    }
}

#[repr(C, align(32))]
struct ItemBuf([u8; ITEM_BUF]);

/// The persistent outbox. See the module documentation.
pub struct FlashOutbox<S: MultiwriteNorFlash> {
    flash: S,
    queue: Range<u32>,
    meta: Range<u32>,
    boot: u32,
    /// `stored seq = seq + offset` for every item in the queue.
    offset: i64,
    /// Persisted bound: every seq ever written to flash is at or below it (reserved ahead in
    /// steps of [`SEQ_RESERVE_STEP`]).
    floor: Seq,
    /// Items in the flash queue; they mirror the first `in_flash` records of the RAM outbox.
    in_flash: usize,
    /// The RAM outbox's `removed()` count already mirrored.
    seen_removed: u64,
    errors: u32,
    buf: ItemBuf,
}

impl<S: MultiwriteNorFlash> FlashOutbox<S> {
    /// Open the outbox in `queue` and `meta` (disjoint, page-aligned byte ranges of `flash`) and
    /// count this boot. Call once per boot, then [`Self::restore`], then start the client.
    pub async fn open(flash: S, queue: Range<u32>, meta: Range<u32>) -> Result<Self, FlashError> {
        if QueueConfig::<S>::try_new(queue.clone()).is_err()
            || MapConfig::<S>::try_new(meta.clone()).is_err()
            || meta.end - meta.start < 2 * S::ERASE_SIZE as u32
            || S::ERASE_SIZE < ITEM_BUF + 64
            || (queue.start < meta.end && meta.start < queue.end)
        {
            return Err(FlashError::BadRegion);
        }
        let mut this = Self {
            flash,
            queue,
            meta,
            boot: 0,
            offset: 0,
            floor: 0,
            in_flash: 0,
            seen_removed: 0,
            errors: 0,
            buf: ItemBuf([0; ITEM_BUF]),
        };
        match this.fetch::<u8>(KEY_FORMAT).await? {
            Some(FORMAT_VERSION) => {}
            Some(other) => return Err(FlashError::Format(other)),
            None => this.store_meta(KEY_FORMAT, FORMAT_VERSION).await?,
        }
        let last = this.fetch::<u32>(KEY_BOOT).await?.unwrap_or(0);
        this.boot = last.wrapping_add(1);
        this.store_meta(KEY_BOOT, this.boot).await?;
        this.offset = this.fetch::<i64>(KEY_OFFSET).await?.unwrap_or(0);
        this.floor = this.fetch::<u64>(KEY_SEQ_FLOOR).await?.unwrap_or(0);
        info!("cairn: flash outbox open, boot {}", this.boot);
        Ok(this)
    }

    /// This boot's number (1 on the first boot, then +1 on every open).
    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// Flash errors seen by the run loop since open.
    pub fn errors(&self) -> u32 {
        self.errors
    }

    /// Items currently in the flash queue.
    pub fn len(&self) -> usize {
        self.in_flash
    }

    /// True when the flash queue is empty.
    pub fn is_empty(&self) -> bool {
        self.in_flash == 0
    }

    /// Give the flash back.
    pub fn into_inner(self) -> S {
        self.flash
    }

    /// Load the records kept in flash into `client`'s outbox (which must be fresh: call before
    /// pushing and before running it). They keep their seqs and count as possibly sent, so the
    /// first Welcome acknowledges the ones the gateway had committed. Their uptime belonged to
    /// an earlier boot and is reset to 0 (the gateway then stamps them with this boot's start,
    /// the closest time it can know). Returns how many records were restored.
    ///
    /// If the RAM outbox is smaller than what flash holds, the oldest records are dropped (and
    /// counted) whatever the policy, so RAM and flash stay mirrors.
    pub async fn restore<M: RawMutex, const N: usize>(
        &mut self,
        client: &Client<M, N>,
    ) -> Result<usize, FlashError> {
        let policy = client.lock(|s| {
            let p = s.outbox.policy();
            s.outbox.set_policy(OverflowPolicy::DropOldest);
            self.seen_removed = s.outbox.removed();
            p
        });
        let offset = self.offset;
        let mut count = 0;
        let result: Result<(), FlashError> = async {
            let mut queue = QueueStorage::new(
                &mut self.flash,
                QueueConfig::new(self.queue.clone()),
                Cache::new_uncached(),
            );
            let mut iter = queue.iter().await?;
            while let Some(entry) = iter.next(&mut self.buf.0).await? {
                let decoded = (entry.len() > SEQ_LEN)
                    .then(|| {
                        let (seq_bytes, bytes) = entry.split_at(SEQ_LEN);
                        let stored = u64::from_le_bytes(seq_bytes.try_into().expect("8 bytes"));
                        StoredRecord::decode(bytes).map(|r| ((stored as i64 - offset) as Seq, r))
                    })
                    .flatten();
                let Some((seq, r)) = decoded else {
                    // Items are CRC-checked by sequential-storage, so only a layout bug gets
                    // here. Remove it, so flash keeps mirroring the RAM outbox.
                    error!("cairn: unreadable record in flash, removed");
                    entry.pop().await?;
                    continue;
                };
                let len = record::encoded_len(0, r.values()).expect("was encoded before");
                trace!("cairn: restoring record {} from flash", seq);
                client.lock(|s| {
                    s.restore_record(seq, len, |dst| record::encode(dst, r.stream, 0, r.values()))
                });
                count += 1;
            }
            Ok(())
        }
        .await;
        client.lock(|s| s.outbox.set_policy(policy));
        result?;
        if count == 0 {
            // Nothing in flash: this boot's first records get provisional seqs above everything
            // ever written (and so ever sent), so no Welcome can mistake them for committed ones;
            // the first Welcome renumbers them to follow its high-water.
            let floor = self.floor;
            client.lock(|s| s.start_after(floor));
        }
        self.in_flash = count;
        info!("cairn: restored {} records from flash", count);
        Ok(count)
    }

    async fn fetch<V: for<'a> sequential_storage::map::Value<'a>>(
        &mut self,
        key: u8,
    ) -> Result<Option<V>, FlashError> {
        let mut buf = [0u8; 64];
        let mut map = MapStorage::<u8, _, _>::new(
            &mut self.flash,
            MapConfig::new(self.meta.clone()),
            Cache::new_uncached(),
        );
        Ok(map.fetch_item::<V>(&mut buf, &key).await?)
    }

    async fn store_meta<V: for<'a> sequential_storage::map::Value<'a>>(
        &mut self,
        key: u8,
        value: V,
    ) -> Result<(), FlashError> {
        let mut buf = [0u8; 64];
        let mut map = MapStorage::<u8, _, _>::new(
            &mut self.flash,
            MapConfig::new(self.meta.clone()),
            Cache::new_uncached(),
        );
        Ok(map.store_item(&mut buf, &key, &value).await?)
    }

    /// Make sure the persisted floor covers `seq` before anything with that seq is written.
    async fn reserve(&mut self, seq: Seq) -> Result<(), FlashError> {
        if seq > self.floor {
            let floor = seq + SEQ_RESERVE_STEP;
            self.store_meta(KEY_SEQ_FLOOR, floor).await?;
            self.floor = floor;
        }
        Ok(())
    }

    /// Count and log a flash failure; returns the limit for the run loop: only records already
    /// in flash may be sent (and none at all while a renumbering is not persisted).
    fn failed<M: RawMutex, const N: usize>(&mut self, client: &Client<M, N>, what: &str) -> Seq {
        self.errors += 1;
        error!("cairn: flash {} failed", what);
        client.lock(|s| {
            // Items for records the outbox already removed are still at the front of the flash
            // queue: they do not make any record in RAM durable.
            let stale = s.outbox.removed() - self.seen_removed;
            if s.shift != 0 {
                0
            } else {
                s.outbox.first_seq() + (self.in_flash as u64).saturating_sub(stale)
            }
        })
    }
}

enum Step {
    Pop(u64),
    /// Renumbering delta, and the newest seq in flash after it.
    Shift(i64, Seq),
    /// Item length in `buf`, and its seq.
    Persist(usize, Seq),
    Done(Seq),
}

impl<S: MultiwriteNorFlash> Store for FlashOutbox<S> {
    async fn sync<M: RawMutex, const N: usize>(&mut self, client: &Client<M, N>) -> Seq {
        loop {
            let step = client.lock(|s| {
                let removed = s.outbox.removed() - self.seen_removed;
                if removed > 0 {
                    return Step::Pop(removed);
                }
                if s.shift != 0 {
                    let newest = s.outbox.first_seq() + self.in_flash as Seq;
                    return Step::Shift(s.shift, newest.saturating_sub(1));
                }
                if self.in_flash < s.outbox.len() {
                    let (seq, bytes) = s.outbox.iter().nth(self.in_flash).expect("in range");
                    let stored = (seq as i64 + self.offset) as u64;
                    self.buf.0[..SEQ_LEN].copy_from_slice(&stored.to_le_bytes());
                    self.buf.0[SEQ_LEN..SEQ_LEN + bytes.len()].copy_from_slice(bytes);
                    return Step::Persist(SEQ_LEN + bytes.len(), seq);
                }
                Step::Done(s.outbox.first_seq() + self.in_flash as Seq)
            });
            match step {
                Step::Pop(removed) => {
                    // The outbox removed records from its front; the first of them are the
                    // ones in flash (records beyond `in_flash` were never written).
                    let from_flash = (removed as usize).min(self.in_flash);
                    let mut queue = QueueStorage::new(
                        &mut self.flash,
                        QueueConfig::new(self.queue.clone()),
                        Cache::new_uncached(),
                    );
                    let mut popped = 0;
                    let mut failed = false;
                    while popped < from_flash {
                        match queue.pop(&mut self.buf.0).await {
                            Ok(Some(_)) => popped += 1,
                            Ok(None) => {
                                error!("cairn: flash queue shorter than expected");
                                self.in_flash = popped;
                                break;
                            }
                            Err(_) => {
                                failed = true;
                                break;
                            }
                        }
                    }
                    self.in_flash -= popped;
                    if failed {
                        self.seen_removed += popped as u64;
                        return self.failed(client, "pop");
                    }
                    self.seen_removed += removed;
                }
                Step::Shift(delta, newest) => {
                    // Popped first (above), so no item that was renumbered away is left to be
                    // read back with the new offset.
                    if self.reserve(newest).await.is_err() {
                        return self.failed(client, "seq floor write");
                    }
                    let offset = self.offset - delta;
                    if self.store_meta(KEY_OFFSET, offset).await.is_err() {
                        return self.failed(client, "offset write");
                    }
                    self.offset = offset;
                    client.lock(|s| s.shift -= delta);
                }
                Step::Persist(len, seq) => {
                    if self.reserve(seq).await.is_err() {
                        return self.failed(client, "seq floor write");
                    }
                    let mut queue = QueueStorage::new(
                        &mut self.flash,
                        QueueConfig::new(self.queue.clone()),
                        Cache::new_uncached(),
                    );
                    match queue.push(&self.buf.0[..len], false).await {
                        Ok(()) => self.in_flash += 1,
                        Err(sequential_storage::Error::FullStorage) => {
                            if let Some(limit) = self.full(client) {
                                return limit;
                            }
                        }
                        Err(_) => return self.failed(client, "write"),
                    }
                }
                Step::Done(limit) => return limit,
            }
        }
    }
}

impl<S: MultiwriteNorFlash> FlashOutbox<S> {
    /// The flash queue is full: apply the outbox's policy. `Some(limit)` stops the sync.
    fn full<M: RawMutex, const N: usize>(&mut self, client: &Client<M, N>) -> Option<Seq> {
        client.lock(|s| match s.outbox.policy() {
            OverflowPolicy::DropOldest if self.in_flash > 0 => {
                s.outbox.pop_front();
                s.note_dropped(1);
                warn!("cairn: flash outbox full, dropped the oldest record");
                None
            }
            _ => Some(s.outbox.first_seq() + self.in_flash as Seq),
        })
    }
}
