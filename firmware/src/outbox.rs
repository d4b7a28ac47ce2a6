//! The RAM outbox: a byte ring of encoded records waiting for a cumulative Ack.
//!
//! Records are stored back to back as `[len: u16 LE][len bytes]`, so a three-value record
//! costs its encoded size plus two bytes, not a worst-case slot. An entry never wraps around
//! the end of the buffer: when the tail has too little room, the writer leaves a wrap marker
//! (`len = 0xFFFF`, or nothing when fewer than two bytes remain) and continues at offset 0.
//! So every record is one contiguous slice and the batcher borrows it without copying.
//!
//! Seqs are not stored per entry: the records in the ring always carry consecutive seqs
//! `first_seq .. first_seq + len`, because records leave only from the front (Ack or
//! drop-oldest) and enter only at the back.

use crate::Seq;

const LEN_BYTES: usize = 2;
const WRAP: u16 = u16::MAX;

/// What [`Outbox::push`] does when the new record does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum OverflowPolicy {
    /// Drop the oldest records (acknowledged or not) until the new one fits. Telemetry
    /// default: the newest readings matter most. Dropped records leave a gap in the seqs the
    /// gateway sees.
    DropOldest,
    /// Refuse the new record ([`crate::PushError::Full`]); nothing already queued is lost.
    RejectNewest,
}

/// Returned by [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Pushed {
    /// Seq given to the new record.
    pub seq: Seq,
    /// How many old records were dropped to make room (only with `DropOldest`).
    pub dropped: u32,
}

/// Why [`Outbox::push`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum OutboxFull {
    /// The record can never fit (larger than the ring).
    TooLarge,
    /// No room now, and the policy is `RejectNewest`.
    Full,
}

impl core::fmt::Display for OutboxFull {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OutboxFull::TooLarge => "record larger than the outbox",
            OutboxFull::Full => "outbox full",
        })
    }
}

impl core::error::Error for OutboxFull {}

/// A ring of `N` bytes of encoded records with consecutive seqs.
pub struct Outbox<const N: usize> {
    buf: [u8; N],
    /// Offset of the oldest entry.
    head: usize,
    /// Offset where the next entry is written.
    tail: usize,
    /// True when the live data is `[head, end) ++ [0, tail)`; false when it is `[head, tail)`.
    wrapped: bool,
    count: usize,
    /// Seq of the record before the oldest (`first_seq - 1`): stored this way so a new outbox
    /// is all zero bytes and a `static` client lands in `.bss`, not in flash-backed `.data`.
    before_first: Seq,
    /// Records ever removed from the front (acked or dropped); the flash store mirrors it.
    removed: u64,
    policy: OverflowPolicy,
}

impl<const N: usize> Outbox<N> {
    /// An empty outbox whose first record will get `first_seq`.
    pub const fn new(policy: OverflowPolicy, first_seq: Seq) -> Self {
        assert!(
            N >= 16 && N < WRAP as usize,
            "outbox size must be 16..65535 bytes"
        );
        Self {
            buf: [0; N],
            head: 0,
            tail: 0,
            wrapped: false,
            count: 0,
            before_first: first_seq - 1,
            removed: 0,
            policy,
        }
    }

    /// The largest record payload this ring can ever hold.
    pub const fn max_record_len() -> usize {
        N - LEN_BYTES
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Seq of the oldest record held (or of the next record when empty).
    pub fn first_seq(&self) -> Seq {
        self.before_first + 1
    }

    /// Seq the next pushed record will get.
    pub fn next_seq(&self) -> Seq {
        self.first_seq() + self.count as Seq
    }

    /// Bytes in use, entry headers and wrap waste included.
    pub fn bytes_used(&self) -> usize {
        if self.count == 0 {
            0
        } else if self.wrapped {
            N - self.head + self.tail
        } else {
            self.tail - self.head
        }
    }

    /// Records ever removed from the front, by Ack or by the overflow policy.
    pub fn removed(&self) -> u64 {
        self.removed
    }

    /// The overflow policy in force.
    pub fn policy(&self) -> OverflowPolicy {
        self.policy
    }

    /// Change the overflow policy; applies to the next push.
    pub fn set_policy(&mut self, policy: OverflowPolicy) {
        self.policy = policy;
    }

    /// Append a record of `len` bytes written by `write`, applying the overflow policy.
    pub fn push(
        &mut self,
        len: usize,
        write: impl FnOnce(&mut [u8]),
    ) -> Result<Pushed, OutboxFull> {
        if len > Self::max_record_len() {
            return Err(OutboxFull::TooLarge);
        }
        let mut dropped = 0;
        let at = loop {
            if let Some(at) = self.reserve(LEN_BYTES + len) {
                break at;
            }
            match self.policy {
                OverflowPolicy::RejectNewest => return Err(OutboxFull::Full),
                OverflowPolicy::DropOldest => {
                    // `reserve` always succeeds on an empty ring since len fits.
                    self.pop_front();
                    dropped += 1;
                }
            }
        };
        self.buf[at..at + LEN_BYTES].copy_from_slice(&(len as u16).to_le_bytes());
        write(&mut self.buf[at + LEN_BYTES..at + LEN_BYTES + len]);
        self.tail = at + LEN_BYTES + len;
        let seq = self.next_seq();
        self.count += 1;
        Ok(Pushed { seq, dropped })
    }

    /// Find room for `need` contiguous bytes; on success the returned offset is where the
    /// entry goes (a wrap marker has been written and `wrapped` set if needed).
    fn reserve(&mut self, need: usize) -> Option<usize> {
        if self.count == 0 {
            self.head = 0;
            self.tail = 0;
            self.wrapped = false;
            return Some(0);
        }
        if self.wrapped {
            return (self.head - self.tail >= need).then_some(self.tail);
        }
        if N - self.tail >= need {
            return Some(self.tail);
        }
        if self.head >= need {
            if N - self.tail >= LEN_BYTES {
                self.buf[self.tail..self.tail + LEN_BYTES].copy_from_slice(&WRAP.to_le_bytes());
            }
            self.wrapped = true;
            return Some(0);
        }
        None
    }

    /// Offset of the entry at `pos`, following a wrap marker if there is one.
    fn resolve(&self, pos: usize) -> usize {
        if N - pos < LEN_BYTES || self.entry_len_raw(pos) == WRAP {
            0
        } else {
            pos
        }
    }

    fn entry_len_raw(&self, pos: usize) -> u16 {
        u16::from_le_bytes([self.buf[pos], self.buf[pos + 1]])
    }

    /// Remove the oldest record. Returns false when empty.
    pub fn pop_front(&mut self) -> bool {
        if self.count == 0 {
            return false;
        }
        // `head` always points at a real entry: it is normalised past a wrap after each pop.
        let len = self.entry_len_raw(self.head) as usize;
        self.head += LEN_BYTES + len;
        self.count -= 1;
        self.before_first += 1;
        self.removed += 1;
        if self.count == 0 {
            self.head = 0;
            self.tail = 0;
            self.wrapped = false;
        } else if self.wrapped && self.resolve(self.head) == 0 {
            // The upper segment is exhausted: the rest lives at [0, tail).
            self.head = 0;
            self.wrapped = false;
        }
        true
    }

    /// Drop every record with seq `<= through` (a cumulative Ack). Returns how many.
    pub fn ack_through(&mut self, through: Seq) -> usize {
        let mut n = 0;
        while self.count > 0 && self.before_first < through {
            self.pop_front();
            n += 1;
        }
        n
    }

    /// Renumber the held records so the oldest gets `first_seq`. Used once per boot for a
    /// RAM outbox, when the first Welcome tells where the gateway's high-water is.
    pub fn rebase(&mut self, first_seq: Seq) {
        self.before_first = first_seq - 1;
    }

    /// Records from `seq` on (oldest first), as `(seq, bytes)`.
    pub fn iter_from(&self, seq: Seq) -> Iter<'_, N> {
        let mut it = self.iter();
        let skip = seq.saturating_sub(self.first_seq()).min(self.count as Seq);
        for _ in 0..skip {
            it.next();
        }
        it
    }

    /// All records, oldest first.
    pub fn iter(&self) -> Iter<'_, N> {
        Iter {
            outbox: self,
            pos: self.head,
            upper: self.wrapped,
            left: self.count,
            seq: self.first_seq(),
        }
    }
}

/// Iterator over `(seq, record bytes)`; see [`Outbox::iter_from`].
pub struct Iter<'a, const N: usize> {
    outbox: &'a Outbox<N>,
    pos: usize,
    /// Still in the upper segment of a wrapped ring (a wrap marker may come).
    upper: bool,
    left: usize,
    seq: Seq,
}

impl<'a, const N: usize> Iterator for Iter<'a, N> {
    type Item = (Seq, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        if self.upper {
            let at = self.outbox.resolve(self.pos);
            if at != self.pos {
                self.upper = false;
            }
            self.pos = at;
        }
        let len = self.outbox.entry_len_raw(self.pos) as usize;
        let start = self.pos + LEN_BYTES;
        self.pos = start + len;
        self.left -= 1;
        let seq = self.seq;
        self.seq += 1;
        Some((seq, &self.outbox.buf[start..start + len]))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::VecDeque;
    use std::vec::Vec;

    fn record(seq: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
    }

    fn push<const N: usize>(o: &mut Outbox<N>, bytes: &[u8]) -> Result<Pushed, OutboxFull> {
        o.push(bytes.len(), |dst| dst.copy_from_slice(bytes))
    }

    /// The ring against a VecDeque model, with lengths that force every wrap case.
    #[test]
    fn test_ring_matches_model() {
        for policy in [OverflowPolicy::DropOldest, OverflowPolicy::RejectNewest] {
            let mut o: Outbox<97> = Outbox::new(policy, 1);
            let mut model: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
            let mut first = 1u64;
            let mut next = 1u64;
            let mut rng = crate::backoff::Prng::new(policy as u64);
            for step in 0..20_000 {
                if rng.between(0, 2) > 0 {
                    let len = rng.between(0, 40) as usize;
                    let bytes = record(next, len);
                    match push(&mut o, &bytes) {
                        Ok(p) => {
                            assert_eq!(p.seq, next, "step {step}");
                            for _ in 0..p.dropped {
                                model.pop_front();
                                first += 1;
                            }
                            model.push_back((next, bytes));
                            next += 1;
                        }
                        Err(OutboxFull::Full) => {
                            assert_eq!(policy, OverflowPolicy::RejectNewest);
                            // An empty ring always accepts; otherwise only a nearly full
                            // one refuses (wrap waste is at most one entry of 2 + 40 bytes).
                            assert!(!model.is_empty());
                            assert!(o.bytes_used() + 2 + len > 97 - 42, "step {step}");
                        }
                        Err(OutboxFull::TooLarge) => unreachable!(),
                    }
                } else {
                    let through = first + rng.between(0, 3) - 1;
                    let n = o.ack_through(through);
                    let mut m = 0;
                    while model.front().is_some_and(|(s, _)| *s <= through) {
                        model.pop_front();
                        m += 1;
                    }
                    assert_eq!(n, m);
                    first = model.front().map_or(next, |(s, _)| *s);
                }
                assert_eq!(o.len(), model.len());
                assert_eq!(o.next_seq(), next);
                assert!(o.bytes_used() <= 97);
                let got: Vec<(u64, Vec<u8>)> = o.iter().map(|(s, b)| (s, b.to_vec())).collect();
                let want: Vec<(u64, Vec<u8>)> = model.iter().cloned().collect();
                assert_eq!(got, want, "step {step}");
                if let Some((s, _)) = model.get(model.len() / 2) {
                    assert_eq!(o.iter_from(*s).next().map(|(s, _)| s), Some(*s));
                }
            }
        }
    }

    #[test]
    fn test_reject_newest_keeps_old_records() {
        let mut o: Outbox<32> = Outbox::new(OverflowPolicy::RejectNewest, 10);
        assert_eq!(push(&mut o, &[1; 10]).unwrap().seq, 10);
        assert_eq!(push(&mut o, &[2; 10]).unwrap().seq, 11);
        assert_eq!(push(&mut o, &[3; 10]), Err(OutboxFull::Full));
        assert_eq!(o.iter().map(|(s, _)| s).collect::<Vec<_>>(), [10, 11]);
        assert_eq!(push(&mut o, &[0; 31]), Err(OutboxFull::TooLarge));
        assert_eq!(o.ack_through(10), 1);
        assert_eq!(push(&mut o, &[3; 10]).unwrap().seq, 12);
    }

    #[test]
    fn test_drop_oldest_counts_drops() {
        let mut o: Outbox<32> = Outbox::new(OverflowPolicy::DropOldest, 1);
        for i in 0..2 {
            assert_eq!(push(&mut o, &[i; 10]).unwrap().dropped, 0);
        }
        let p = push(&mut o, &[9; 28]).unwrap();
        assert_eq!((p.seq, p.dropped), (3, 2));
        assert_eq!(o.first_seq(), 3);
        assert_eq!(o.iter().next().unwrap().1, &[9; 28]);
    }

    #[test]
    fn test_rebase_renumbers() {
        let mut o: Outbox<64> = Outbox::new(OverflowPolicy::DropOldest, 1);
        push(&mut o, b"ab").unwrap();
        push(&mut o, b"cd").unwrap();
        o.rebase(500);
        assert_eq!(o.iter().map(|(s, _)| s).collect::<Vec<_>>(), [500, 501]);
        assert_eq!(o.next_seq(), 502);
        assert_eq!(o.iter_from(501).next().unwrap().1, b"cd");
        assert!(o.iter_from(502).next().is_none());
    }
}
