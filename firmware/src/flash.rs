//! The outbox in NOR flash (feature `flash-outbox`): one append-only log of records and state
//! in at least two erase units, written once per word, read only through [`NorFlash::read`].
//!
//! [`FlashOutbox`] mirrors the RAM outbox into the log and keeps the device's persistent state
//! in the same log: the boot counter, the seq floor, the seq offset and how far the queue has
//! been popped. The run loop drives it through [`Store::sync`]:
//!
//! - every record is written to flash **before** it is sent, and counts as popped only after
//!   the outbox dropped it (cumulative Ack, or the `DropOldest` policy). So after a reboot or a
//!   power cut, flash holds every record the gateway may not have committed, and
//!   [`FlashOutbox::restore`] puts them back into the RAM outbox to be resent with the same seqs.
//!   The gateway skips the ones it had committed (Welcome's high-water), so nothing is stored
//!   twice and nothing acknowledged is needed again.
//! - Each data record carries its seq as `stored = seq + offset`. Renumbering the outbox (to
//!   close a gap, see the crate docs) changes only the persisted offset, written together with
//!   the pop position in one state record before any renumbered record is sent. Stored seqs
//!   increase along the log, so "popped" is one number: every data record with a stored seq at
//!   or below it is gone.
//! - A *seq floor* is reserved ahead in steps of [`SEQ_RESERVE_STEP`]: no record is written
//!   with a seq above the persisted floor. When a boot finds no live record, its records are
//!   numbered from `floor + 1`, provisionally, so they can never be mistaken for records a
//!   gateway already committed (which all have seqs at or below the floor); the first Welcome
//!   renumbers them to follow the gateway's high-water (no gap, since the gateway refuses gaps).
//! - The boot counter increments on every [`FlashOutbox::open`] (a state record is written
//!   before `open` returns); pass [`FlashOutbox::boot`] to [`crate::Config::boot`] (the
//!   protocol's nonces need a boot number that never repeats).
//! - The run loop syncs in every state, not only in session: at the start of each connection
//!   attempt, after every push while it backs off between attempts, and before every batch in
//!   session. A device that reaches no gateway therefore keeps its records on flash within one
//!   sync of `push`. Syncing cannot happen *in* `push`: `push` is synchronous, callable from any
//!   task or interrupt, and flash writes are async and slow. A seq is never on the wire before
//!   it is on flash, so a renumbering never hands out a seq already sent for other content.
//!
//! # Flash it works on
//!
//! Any [`NorFlash`]: no `MultiwriteNorFlash` bound, because no word is ever written twice
//! between erases (STM32 internal flash with ECC forbids it, and embassy-stm32 implements only
//! `NorFlash`). Supported: write words (`WRITE_SIZE`) of 1 to 64 bytes (1 on STM32F4 and
//! RP2040, 32 on STM32H7), erase units (`ERASE_SIZE`) of 4 KiB to 128 KiB or more (128 KiB on
//! STM32H7 and the F429's upper sectors), `READ_SIZE` up to 64 bytes (RP2040 async: 4).
//!
//! ```
//! # use embedded_storage_async::nor_flash::*;
//! // A flash that implements `NorFlash` and not `MultiwriteNorFlash` opens the outbox.
//! struct OnlyNor;
//! impl ErrorType for OnlyNor { type Error = NorFlashErrorKind; }
//! impl ReadNorFlash for OnlyNor {
//!     const READ_SIZE: usize = 1;
//!     async fn read(&mut self, _: u32, _: &mut [u8]) -> Result<(), Self::Error> { Ok(()) }
//!     fn capacity(&self) -> usize { 256 * 1024 }
//! }
//! impl NorFlash for OnlyNor {
//!     const WRITE_SIZE: usize = 32;
//!     const ERASE_SIZE: usize = 128 * 1024;
//!     async fn erase(&mut self, _: u32, _: u32) -> Result<(), Self::Error> { Ok(()) }
//!     async fn write(&mut self, _: u32, _: &[u8]) -> Result<(), Self::Error> { Ok(()) }
//! }
//! let _open = cairn_firmware::flash::FlashOutbox::open(OnlyNor, 0..256 * 1024);
//! ```
//!
//! # Format (layout version [`LAYOUT_VERSION`])
//!
//! `A` = the largest of `WRITE_SIZE`, `READ_SIZE` and 4. Every record starts `A`-aligned:
//!
//! ```text
//! body:   0xCA | kind u8 | len u16 LE | payload (len bytes) | zeros up to a multiple of A
//! commit: crc32(0xCA .. payload) & 0x7FFF_FFFF, u32 LE | zeros up to A bytes
//! kinds:  1 unit header: state (28 bytes) | generation u32 LE | layout version u8
//!         2 state:       boot u32 | offset i64 | floor u64 | popped u64 (all LE)
//!         3 data:        stored seq u64 LE | the record (crate::record layout)
//! ```
//!
//! The body is one `write`, the commit word a second one after it: a record counts only when
//! its commit word matches, so a record torn anywhere is never taken for a real one. Each erase
//! unit starts with a unit header, written only after the unit was erased **and read back as
//! erased through the driver**; its generation orders the units (the log runs from the unit
//! after the newest, cyclically, to the newest). The header carries a copy of the state, so
//! erasing the oldest unit never loses the boot counter or the floor. The newest state record
//! in log order is the state.
//!
//! Reading back after a power cut, the scan never trusts a word it cannot check: a record needs
//! its commit word; an unparsable word is skipped one `A` at a time; a record whose header
//! parses but whose commit does not match is skipped whole (if its header word is intact the
//! length is right, and if the header word itself was torn nothing after it was written); the
//! log of a unit ends at the first word followed by a whole maximal record's length of words
//! that read as erased. A read that fails (the driver reports an ECC error) counts as a torn
//! word. Writing resumes where the scan ended, and after any failed write a whole record's
//! length further on, where the scan finds it again.
//!
//! **Assumptions** (the same any NOR log makes, stated): an erase that completed leaves every
//! word reading `0xFF` (checked: a unit is read back before its header is written); a write
//! call programs its words in ascending address order; a word whose programming was cut either
//! reads back as erased and can still be programmed, or reads back as something other than the
//! erased pattern (stably), or its read returns an error. All reads go through
//! [`NorFlash::read`] and no flash address is ever dereferenced by this crate. On STM32H7 a word
//! torn mid-program has a broken ECC, and a memory-mapped read of it raises a bus fault:
//! embassy-stm32 0.6's `read` is such a memory copy, so on H7 the driver passed here must turn
//! a double-ECC error into an `Err` for a torn word to be skipped rather than fault.
//! `boards/nucleo-h743zi/src/ecc_flash.rs` is such a driver (the copy runs with FAULTMASK set
//! and `CCR.BFHFNMIGN` on, then reads and clears `DBECCERR`): use it, or the same idea, on any
//! STM32H7 board.
//!
//! # Capacity and wear
//!
//! - A data record takes `align(4 + 8 + encoded, A) + A` bytes: 40 bytes for a three-`f32`
//!   reading with 1- or 4-byte words, 96 with 32-byte words. Popping writes no record; the pop
//!   position is persisted by the next state record (36 bytes with `A` = 4, 64 with 32), at
//!   most one per sync, and in every unit header.
//! - The log always keeps one unit to move into: the queue holds up to `units - 1` units of
//!   records. Give the region at least 2 units, and enough that the flash copy of a full RAM
//!   outbox (`N` bytes of RAM hold `N / (encoded + 2)` records) fits in `units - 1` units. When
//!   it does not, the outbox's policy applies (`DropOldest` drops the oldest record from both;
//!   `RejectNewest` holds new records in RAM, unsent, until acks free the oldest unit).
//! - Wear: every unit is erased once per pass of the log. At `R` records/s of `b` bytes each
//!   (plus one state record per ack) on a region of `U` units of `E` bytes, each unit is
//!   erased every `U * E / (R * b)` seconds. STM32F4/H7 internal flash is rated for 10,000
//!   cycles: 2 units of 128 KiB at one 3-value reading per second with an ack each
//!   (40 + 36 bytes with F4 words, 96 + 64 with H7 words) last 2 * 128 KiB / 76 B = 57 min
//!   (F4) or 27 min (H7) per pass, i.e. 10,000 passes = 1.1 years (F4) or 0.5 years (H7);
//!   4 units (512 KiB) double that. A QSPI NOR (RP2040 boards, 100,000 cycles) with 16 units
//!   of 4 KiB at the same rate: 14 min per pass, 2.7 years.
//! - Every boot writes one state record (boot counter); a renumbering one more.
//! - Open scans the whole region (reads only, in 64-byte pieces); that is fine for a few
//!   hundred KiB. Time spent is on the run loop's task, not on `push`.
//!
//! A flash error is logged and counted ([`FlashOutbox::errors`]); the run loop then sends only
//! what is already in flash and retries on every sync. A device whose flash keeps failing stops
//! sending new records (they wait in RAM) rather than risk the exactly-once promise.

use cairn_protocol::settings::crc32;
use core::ops::Range;

use embassy_sync::blocking_mutex::raw::RawMutex;
use embedded_storage_async::nor_flash::NorFlash;

use crate::outbox::OverflowPolicy;
use crate::record::{self, MAX_RECORD_LEN, StoredRecord};
use crate::{Client, Seq, Store};

/// Seqs reserved per write of the seq floor: one small state write per this many records.
pub const SEQ_RESERVE_STEP: u64 = 256;

/// Version of the log layout, kept in every unit header (the record encoding inside data
/// records is `crate::record`'s, version 1).
pub const LAYOUT_VERSION: u8 = 2;

const MAGIC: u8 = 0xCA;
const KIND_UNIT: u8 = 1;
const KIND_STATE: u8 = 2;
const KIND_DATA: u8 = 3;
const HEAD: usize = 4;
const STATE_LEN: usize = 28;
const UNIT_LEN: usize = STATE_LEN + 5;
const SEQ_LEN: usize = 8;
const MAX_PAYLOAD: usize = SEQ_LEN + MAX_RECORD_LEN;
/// Largest supported `A`, and the piece size of reads.
const CHUNK: usize = 64;
const BUF: usize = (HEAD + MAX_PAYLOAD).div_ceil(CHUNK) * CHUNK;

/// Why opening or restoring the flash outbox failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FlashError {
    /// The region is not aligned to erase units, has fewer than 2, or the units are too small.
    BadRegion,
    /// The flash holds a log of another layout version.
    Format(u8),
    /// The flash driver failed, or no unit could be erased and read back as erased.
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

/// Why a log write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The unit to move into still holds records that are not popped.
    Full,
    Storage,
}

/// What the log persists besides records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct State {
    boot: u32,
    /// `stored seq = seq + offset` for every data record.
    offset: i64,
    /// Persisted bound: every seq ever written to flash is at or below it.
    floor: Seq,
    /// Every data record with a stored seq at or below it is popped.
    popped: u64,
}

impl State {
    fn encode(&self, to: &mut [u8]) {
        to[..4].copy_from_slice(&self.boot.to_le_bytes());
        to[4..12].copy_from_slice(&self.offset.to_le_bytes());
        to[12..20].copy_from_slice(&self.floor.to_le_bytes());
        to[20..28].copy_from_slice(&self.popped.to_le_bytes());
    }

    fn decode(from: &[u8]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(from[i..i + 8].try_into().expect("8 bytes"));
        State {
            boot: u32::from_le_bytes(from[..4].try_into().expect("4 bytes")),
            offset: u64_at(4) as i64,
            floor: u64_at(12),
            popped: u64_at(20),
        }
    }
}

/// The first 4 bytes of a commit word; the top bit is clear so it never reads as erased.
fn commit_of(body: &[u8]) -> [u8; 4] {
    (crc32(body) & 0x7FFF_FFFF).to_le_bytes()
}

/// Reads `dst` at `at`; a failed read is a torn word to the caller.
async fn read<S: NorFlash>(flash: &mut S, at: u32, dst: &mut [u8]) -> bool {
    flash.read(at, dst).await.is_ok()
}

/// The first `a`-aligned position in `from..to` that does not read as erased.
async fn not_erased<S: NorFlash>(flash: &mut S, a: u32, from: u32, to: u32) -> Option<u32> {
    let mut piece = [0u8; CHUNK];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(CHUNK);
        if !read(flash, at, &mut piece[..n]).await {
            return Some(at);
        }
        if let Some(i) = piece[..n].iter().position(|b| *b != 0xFF) {
            return Some(at + i as u32 / a * a);
        }
        at += n as u32;
    }
    None
}

/// Whether `expect` is what flash holds at `at`.
async fn holds<S: NorFlash>(flash: &mut S, at: u32, expect: &[u8]) -> bool {
    let mut piece = [0u8; CHUNK];
    for (i, want) in expect.chunks(CHUNK).enumerate() {
        let got = &mut piece[..want.len()];
        if !read(flash, at + (i * CHUNK) as u32, got).await || got != want {
            return false;
        }
    }
    true
}

/// The persistent outbox. See the module documentation.
pub struct FlashOutbox<S: NorFlash> {
    flash: S,
    base: u32,
    units: u32,
    /// The unit being written, its generation and the next write position in it.
    head: u32,
    generation: u32,
    pos: u32,
    state: State,
    /// `state` is ahead of flash (pops not persisted yet).
    dirty: bool,
    /// Highest stored seq in the unit after the head, once scanned (reset when the head moves).
    next_max: Option<u64>,
    /// Records in flash not popped; they mirror the first `in_flash` records of the RAM outbox.
    in_flash: usize,
    /// The RAM outbox's `removed()` count already mirrored.
    seen_removed: u64,
    errors: u32,
    buf: [u8; BUF],
}

enum Step {
    /// Renumbering delta, and the newest seq in flash after it.
    Shift(i64, Seq),
    /// Raise the floor to cover this seq before writing it.
    Reserve(Seq),
    /// The next record (footprint) does not fit the head unit.
    NoRoom,
    /// A data record of this payload length is in `buf`.
    Persist(usize),
    Done(Seq),
}

impl<S: NorFlash> FlashOutbox<S> {
    /// Alignment of every record and read.
    const A: u32 = {
        let a = if S::WRITE_SIZE > S::READ_SIZE {
            S::WRITE_SIZE
        } else {
            S::READ_SIZE
        };
        let a = if a > 4 { a } else { 4 };
        assert!(
            a <= CHUNK && a.is_power_of_two(),
            "flash words must be powers of two up to 64 bytes"
        );
        a as u32
    };
    const E: u32 = S::ERASE_SIZE as u32;
    /// Footprint of the largest record: the scan's end-of-log distance.
    const GAP: u32 = Self::foot(MAX_PAYLOAD);
    const STATE_FOOT: u32 = Self::foot(STATE_LEN);

    const fn foot(len: usize) -> u32 {
        (HEAD + len).div_ceil(Self::A as usize) as u32 * Self::A + Self::A
    }

    /// Open the outbox in `region` (a byte range of `flash` aligned to its erase units, at
    /// least 2 of them; see the module documentation for sizing) and count this boot. Call
    /// once per boot, then [`Self::restore`], then start the client.
    pub async fn open(flash: S, region: Range<u32>) -> Result<Self, FlashError> {
        let e = Self::E;
        if !region.start.is_multiple_of(e)
            || !region.end.is_multiple_of(e)
            || region.end < region.start + 2 * e
            || e < 4 * Self::GAP
            || region.end as usize > flash.capacity()
        {
            return Err(FlashError::BadRegion);
        }
        let mut this = Self {
            flash,
            base: region.start,
            units: (region.end - region.start) / e,
            head: 0,
            generation: 0,
            pos: 0,
            state: State::default(),
            dirty: false,
            next_max: None,
            in_flash: 0,
            seen_removed: 0,
            errors: 0,
            buf: [0; BUF],
        };
        let mut newest = None;
        for unit in 0..this.units {
            if let Some(generation) = this.unit_gen(unit).await?
                && newest.is_none_or(|(_, g)| generation > g)
            {
                newest = Some((unit, generation));
            }
        }
        match newest {
            None => this.format(0, 1).await.map_err(|_| FlashError::Storage)?,
            Some((unit, generation)) => {
                this.head = unit;
                this.generation = generation;
                for k in 1..=this.units {
                    let unit = (this.head + k) % this.units;
                    if this.unit_gen(unit).await?.is_none() {
                        continue;
                    }
                    let mut pos = 0;
                    while let Some((kind, _)) = this.next_record(unit, &mut pos).await {
                        if kind != KIND_DATA {
                            this.state = State::decode(&this.buf[HEAD..]);
                        }
                    }
                    this.pos = pos;
                }
            }
        }
        let mut next = this.state;
        next.boot = next.boot.wrapping_add(1);
        if this.persist(next, true).await == Err(Fault::Full) {
            // Every unit holds queued records and the head has no room left even for a state
            // record. A boot must be counted (nonces depend on it), so the oldest unit's
            // records are given up.
            let lost = this.next_max.unwrap_or(0);
            error!(
                "cairn: flash outbox full at boot, records up to {} dropped",
                lost
            );
            next.popped = next.popped.max(lost);
            this.persist(next, true)
                .await
                .map_err(|_| FlashError::Storage)?;
        }
        if this.state.boot != next.boot {
            return Err(FlashError::Storage);
        }
        info!("cairn: flash outbox open, boot {}", this.state.boot);
        Ok(this)
    }

    /// This boot's number (1 on the first boot, then +1 on every open).
    pub fn boot(&self) -> u32 {
        self.state.boot
    }

    /// The persisted seq floor: no seq above it was ever written to flash.
    pub fn seq_floor(&self) -> Seq {
        self.state.floor
    }

    /// Flash errors seen by the run loop since open.
    pub fn errors(&self) -> u32 {
        self.errors
    }

    /// Records currently in flash and not popped.
    pub fn len(&self) -> usize {
        self.in_flash
    }

    /// True when no record is in flash.
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
        let mut last = self.state.popped;
        let mut count = 0;
        for k in 1..=self.units {
            let unit = (self.head + k) % self.units;
            if self.unit_gen(unit).await?.is_none() {
                continue;
            }
            let mut pos = 0;
            while let Some((kind, len)) = self.next_record(unit, &mut pos).await {
                let stored = u64::from_le_bytes(self.buf[HEAD..HEAD + 8].try_into().expect("8"));
                if kind != KIND_DATA || stored <= last {
                    continue;
                }
                last = stored;
                let seq = (stored as i64 - self.state.offset) as Seq;
                let Some(r) = StoredRecord::decode(&self.buf[HEAD + SEQ_LEN..HEAD + len]) else {
                    // Committed records are CRC-checked, so only a layout bug gets here.
                    error!("cairn: unreadable record {} in flash, skipped", seq);
                    continue;
                };
                let len = record::encoded_len(0, r.values()).expect("was encoded before");
                trace!("cairn: restoring record {} from flash", seq);
                client.lock(|s| {
                    s.restore_record(seq, len, |dst| record::encode(dst, r.stream, 0, r.values()))
                });
                count += 1;
            }
        }
        client.lock(|s| s.outbox.set_policy(policy));
        if count == 0 {
            // Nothing in flash: this boot's first records get provisional seqs above everything
            // ever written (and so ever sent), so no Welcome can mistake them for committed ones;
            // the first Welcome renumbers them to follow its high-water.
            let floor = self.state.floor;
            client.lock(|s| s.start_after(floor));
        }
        self.in_flash = count;
        info!("cairn: restored {} records from flash", count);
        Ok(count)
    }

    /// The generation of `unit` if it starts with a valid unit header.
    async fn unit_gen(&mut self, unit: u32) -> Result<Option<u32>, FlashError> {
        let mut pos = 0;
        match self.next_record(unit, &mut pos).await {
            Some((KIND_UNIT, UNIT_LEN)) if pos == Self::foot(UNIT_LEN) => {
                let h = &self.buf[HEAD + STATE_LEN..];
                if h[4] != LAYOUT_VERSION {
                    return Err(FlashError::Format(h[4]));
                }
                Ok(Some(u32::from_le_bytes(h[..4].try_into().expect("4"))))
            }
            _ => Ok(None),
        }
    }

    /// The next committed record of `unit` at or after `pos` (kind, payload length; body in
    /// `buf`), with `pos` moved past it; `None` at the end of the unit's log, with `pos` where
    /// writing continues.
    async fn next_record(&mut self, unit: u32, pos: &mut u32) -> Option<(u8, usize)> {
        let (a, e) = (Self::A, Self::E);
        let base = self.base + unit * e;
        while *pos + a <= e {
            let at = base + *pos;
            let first = &mut self.buf[..a as usize];
            if !read(&mut self.flash, at, first).await {
                *pos += a;
                continue;
            }
            if first.iter().all(|b| *b == 0xFF) {
                let to = base + (*pos + a + Self::GAP).min(e);
                match not_erased(&mut self.flash, a, at + a, to).await {
                    None => return None,
                    Some(next) => {
                        *pos = next - base;
                        continue;
                    }
                }
            }
            let (kind, len) = (first[1], u16::from_le_bytes([first[2], first[3]]) as usize);
            if first[0] != MAGIC
                || !(KIND_UNIT..=KIND_DATA).contains(&kind)
                || len > MAX_PAYLOAD
                || *pos + Self::foot(len) > e
            {
                *pos += a;
                continue;
            }
            let foot = Self::foot(len);
            let body = (foot - a) as usize;
            *pos += foot;
            let mut commit = [0u8; CHUNK];
            if (body > a as usize
                && !read(&mut self.flash, at + a, &mut self.buf[a as usize..body]).await)
                || !read(&mut self.flash, at + body as u32, &mut commit[..a as usize]).await
            {
                continue;
            }
            if commit[..4] == commit_of(&self.buf[..HEAD + len])
                && commit[4..a as usize].iter().all(|b| *b == 0)
            {
                return Some((kind, len));
            }
        }
        *pos = e;
        None
    }

    /// Write the record in `buf` (`HEAD + len` bytes, header included) at the head's write
    /// position: body, then commit word, each read back. The position moves past it either way.
    async fn append(&mut self, len: usize) -> Result<(), Fault> {
        let a = Self::A as usize;
        let foot = Self::foot(len);
        let body = foot as usize - a;
        let at = self.base + self.head * Self::E + self.pos;
        self.pos += foot;
        self.buf[HEAD + len..body].fill(0);
        let mut commit = [0u8; CHUNK];
        commit[..4].copy_from_slice(&commit_of(&self.buf[..HEAD + len]));
        let commit = &commit[..a];
        let ok = self.flash.write(at, &self.buf[..body]).await.is_ok()
            && holds(&mut self.flash, at, &self.buf[..body]).await
            && self.flash.write(at + body as u32, commit).await.is_ok()
            && holds(&mut self.flash, at + body as u32, commit).await;
        if ok { Ok(()) } else { Err(Fault::Storage) }
    }

    fn header(&mut self, kind: u8, len: usize) {
        self.buf[..HEAD].copy_from_slice(&[MAGIC, kind, len as u8, (len >> 8) as u8]);
    }

    /// Bytes left in the head unit for a record; all but the room of two state records
    /// unless `reserve` (state that must be written).
    fn room(&self, reserve: bool) -> u32 {
        let keep = if reserve { 0 } else { 2 * Self::STATE_FOOT };
        (Self::E - self.pos).saturating_sub(keep)
    }

    /// Erase `unit` unless it reads as erased, read it back, and start it with a header
    /// carrying the state: it becomes the head.
    async fn format(&mut self, unit: u32, generation: u32) -> Result<(), Fault> {
        let (a, e) = (Self::A, Self::E);
        let at = self.base + unit * e;
        if not_erased(&mut self.flash, a, at, at + e).await.is_some() {
            debug!("cairn: erasing flash unit {}", unit);
            if self.flash.erase(at, at + e).await.is_err()
                || not_erased(&mut self.flash, a, at, at + e).await.is_some()
            {
                return Err(Fault::Storage);
            }
        }
        self.header(KIND_UNIT, UNIT_LEN);
        self.state.encode(&mut self.buf[HEAD..]);
        let h = &mut self.buf[HEAD + STATE_LEN..HEAD + UNIT_LEN];
        h[..4].copy_from_slice(&generation.to_le_bytes());
        h[4] = LAYOUT_VERSION;
        let (head, pos) = (self.head, self.pos);
        self.head = unit;
        self.pos = 0;
        if let Err(f) = self.append(UNIT_LEN).await {
            (self.head, self.pos) = (head, pos);
            return Err(f);
        }
        self.generation = generation;
        self.next_max = None;
        self.dirty = false;
        Ok(())
    }

    /// Move the head into the next unit, if nothing there is still queued.
    async fn advance(&mut self) -> Result<(), Fault> {
        let next = (self.head + 1) % self.units;
        let max = match self.next_max {
            Some(max) => max,
            None => {
                let mut max = 0;
                if self.unit_gen(next).await.is_ok_and(|g| g.is_some()) {
                    let mut pos = 0;
                    while let Some((kind, _)) = self.next_record(next, &mut pos).await {
                        if kind == KIND_DATA {
                            let s = &self.buf[HEAD..HEAD + 8];
                            max = max.max(u64::from_le_bytes(s.try_into().expect("8")));
                        }
                    }
                }
                self.next_max = Some(max);
                max
            }
        };
        if max > self.state.popped {
            return Err(Fault::Full);
        }
        self.format(next, self.generation.wrapping_add(1)).await
    }

    /// Make `next` the state, written to flash (a state record, or the header of the next
    /// unit). Unless `must`, a full log leaves it pending in RAM. On failure the state is
    /// unchanged.
    async fn persist(&mut self, next: State, must: bool) -> Result<(), Fault> {
        let old = self.state;
        self.state = next;
        let result = if self.room(must) < Self::STATE_FOOT {
            self.advance().await
        } else {
            self.header(KIND_STATE, STATE_LEN);
            self.state.encode(&mut self.buf[HEAD..]);
            self.append(STATE_LEN).await
        };
        match result {
            Ok(()) => self.dirty = false,
            Err(Fault::Full) if !must => self.dirty = true,
            Err(f) => {
                self.state = old;
                return Err(f);
            }
        }
        Ok(())
    }

    /// Count and log a flash failure; returns the limit for the run loop: only records already
    /// in flash may be sent (and none at all while a renumbering is not persisted).
    fn failed<M: RawMutex, const N: usize>(&mut self, client: &Client<M, N>, what: &str) -> Seq {
        self.errors += 1;
        error!("cairn: flash {} failed", what);
        client.lock(|s| {
            // Records the outbox removed since the last look no longer make anything durable.
            let stale = s.outbox.removed() - self.seen_removed;
            if s.shift != 0 {
                0
            } else {
                s.outbox.first_seq() + (self.in_flash as u64).saturating_sub(stale)
            }
        })
    }

    /// The log is full: apply the outbox's policy. `Some(limit)` stops the sync.
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

impl<S: NorFlash> Store for FlashOutbox<S> {
    async fn sync<M: RawMutex, const N: usize>(&mut self, client: &Client<M, N>) -> Seq {
        loop {
            let room = self.room(false);
            let step = client.lock(|s| {
                // Records the outbox removed from its front (acked or dropped): the first of
                // them are the ones in flash. Popping is a number in RAM, persisted later.
                let removed = s.outbox.removed() - self.seen_removed;
                if removed > 0 {
                    let through = (s.outbox.first_seq() - 1) as i64 - s.shift + self.state.offset;
                    if through as u64 > self.state.popped {
                        self.state.popped = through as u64;
                        self.dirty = true;
                    }
                    self.in_flash -= (removed as usize).min(self.in_flash);
                    self.seen_removed += removed;
                }
                if s.shift != 0 {
                    let newest = s.outbox.first_seq() + self.in_flash as Seq;
                    return Step::Shift(s.shift, newest.saturating_sub(1));
                }
                let Some((seq, bytes)) = s.outbox.iter().nth(self.in_flash) else {
                    return Step::Done(s.outbox.first_seq() + self.in_flash as Seq);
                };
                if seq > self.state.floor {
                    return Step::Reserve(seq);
                }
                let len = SEQ_LEN + bytes.len();
                if Self::foot(len) > room {
                    return Step::NoRoom;
                }
                let stored = (seq as i64 + self.state.offset) as u64;
                self.buf[HEAD..HEAD + SEQ_LEN].copy_from_slice(&stored.to_le_bytes());
                self.buf[HEAD + SEQ_LEN..HEAD + len].copy_from_slice(bytes);
                Step::Persist(len)
            });
            match step {
                Step::Shift(delta, newest) => {
                    // One state record: the new offset with the pops made before it, so no
                    // popped record is ever read back with the new offset.
                    let mut next = self.state;
                    next.offset -= delta;
                    if newest > next.floor {
                        next.floor = newest + SEQ_RESERVE_STEP;
                    }
                    match self.persist(next, true).await {
                        Ok(()) => client.lock(|s| s.shift -= delta),
                        Err(f) => {
                            if f == Fault::Storage || self.full(client).is_some() {
                                return self.failed(client, "offset write");
                            }
                        }
                    }
                }
                Step::Reserve(seq) => {
                    let mut next = self.state;
                    next.floor = seq + SEQ_RESERVE_STEP;
                    if let Err(f) = self.persist(next, true).await
                        && (f == Fault::Storage || self.full(client).is_some())
                    {
                        return self.failed(client, "seq floor write");
                    }
                }
                Step::NoRoom => match self.advance().await {
                    Ok(()) => {}
                    Err(Fault::Full) => {
                        if let Some(limit) = self.full(client) {
                            return limit;
                        }
                    }
                    Err(Fault::Storage) => return self.failed(client, "erase"),
                },
                Step::Persist(len) => {
                    self.header(KIND_DATA, len);
                    if self.append(len).await.is_err() {
                        return self.failed(client, "write");
                    }
                    self.in_flash += 1;
                }
                Step::Done(limit) => {
                    if self.dirty && self.persist(self.state, false).await.is_err() {
                        self.errors += 1;
                    }
                    return limit;
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "flash_tests.rs"]
mod tests;
