//! The Batch body: a [`BatchHeader`] followed by `count` records.
//!
//! ```text
//! BatchHeader { first_seq: varint u64, count: varint u16, sent_uptime_ms: varint u64 }
//! count x Record {
//!     stream:       varint u16,
//!     uptime_delta: varint u64,   // sent_uptime_ms - record uptime_ms
//!     values:       varint length (<= MAX_VALUES), then each Value (postcard enum)
//! }
//! ```
//!
//! Record `i` (from 0) has seq `first_seq + i`. Sending the uptime as a delta from the send
//! time keeps it at one to three bytes, so a record of three `f32` values costs at most
//! 1 + 3 + 1 + 3 * 5 = 20 bytes for streams below 128 and records younger than 35 minutes.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, EncodeError};
use crate::{MAX_BLOB, MAX_BODY, MAX_VALUES};

/// The longest encoded [`BatchHeader`]: two 10-byte u64 varints and a 3-byte u16 varint.
pub const BATCH_HEADER_MAX: usize = 10 + 3 + 10;

/// One typed value of a record. `Bytes` and `Str` hold at most [`MAX_BLOB`] bytes.
///
/// On the wire: a one-byte tag (the variant index below, as a postcard varint) followed by the
/// postcard encoding of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Value<'a> {
    /// Tag 0, one byte 0/1.
    Bool(bool),
    /// Tag 1, zigzag varint.
    I64(i64),
    /// Tag 2, varint.
    U64(u64),
    /// Tag 3, 4 bytes little-endian IEEE 754.
    F32(f32),
    /// Tag 4, 8 bytes little-endian IEEE 754.
    F64(f64),
    /// Tag 5, varint length then the bytes.
    Bytes(&'a [u8]),
    /// Tag 6, varint length then UTF-8.
    Str(&'a str),
}

impl Value<'_> {
    /// The byte length of a Bytes/Str value, 0 for the others.
    fn blob_len(&self) -> usize {
        match self {
            Value::Bytes(b) => b.len(),
            Value::Str(s) => s.len(),
            _ => 0,
        }
    }
}

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bytes(b) => {
                f.write_str("0x")?;
                b.iter().try_for_each(|x| write!(f, "{x:02x}"))
            }
            Value::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A record to encode: `values` of one `stream`, taken at device uptime `uptime_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Record<'a> {
    pub stream: u16,
    pub uptime_ms: u64,
    pub values: &'a [Value<'a>],
}

fn fmt_values<'v>(
    f: &mut fmt::Formatter<'_>,
    values: impl Iterator<Item = Value<'v>>,
) -> fmt::Result {
    f.write_str("[")?;
    for (i, v) in values.enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{v}")?;
    }
    f.write_str("]")
}

impl fmt::Display for Record<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream={} uptime={}ms ", self.stream, self.uptime_ms)?;
        fmt_values(f, self.values.iter().copied())
    }
}

/// The fixed part of a Batch body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BatchHeader {
    /// Seq of the first record; seqs start at 1.
    pub first_seq: u64,
    /// Number of records, at least 1.
    pub count: u16,
    /// Device uptime when the batch was sealed; the gateway stamps record `r` with
    /// `now_utc - (sent_uptime_ms - r.uptime_ms)`.
    pub sent_uptime_ms: u64,
}

impl BatchHeader {
    /// Seq of the last record: `first_seq + count - 1`, in wrapping arithmetic so that it
    /// never panics (parsed headers never wrap).
    pub fn last_seq(&self) -> u64 {
        self.first_seq
            .wrapping_add(u64::from(self.count))
            .wrapping_sub(1)
    }

    fn validate(&self) -> Result<(), DecodeError> {
        if self.first_seq == 0 || self.count == 0 {
            return Err(DecodeError::Malformed);
        }
        self.first_seq
            .checked_add(u64::from(self.count) - 1)
            .ok_or(DecodeError::Malformed)?;
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        varint_len(self.first_seq)
            + varint_len(u64::from(self.count))
            + varint_len(self.sent_uptime_ms)
    }
}

impl fmt::Display for BatchHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Batch seq={}..={} sent_uptime={}ms",
            self.first_seq,
            self.first_seq
                .saturating_add(u64::from(self.count).saturating_sub(1)),
            self.sent_uptime_ms
        )
    }
}

fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Builds a Batch body record by record in a caller's buffer, without allocating.
///
/// Records are written after room for the longest header; [`BatchEncoder::finish`] writes the
/// header and moves the records up behind it. A buffer of [`MAX_FRAME`](crate::MAX_FRAME)
/// bytes always holds a full batch ([`MAX_BODY`] + [`BATCH_HEADER_MAX`]).
#[derive(Debug)]
pub struct BatchEncoder<'a> {
    buf: &'a mut [u8],
    header: BatchHeader,
    /// End of the records written so far; they start at `BATCH_HEADER_MAX`.
    end: usize,
}

impl<'a> BatchEncoder<'a> {
    /// Starts a batch whose first record gets seq `first_seq`, sent at device uptime
    /// `sent_uptime_ms`.
    pub fn new(buf: &'a mut [u8], first_seq: u64, sent_uptime_ms: u64) -> BatchEncoder<'a> {
        BatchEncoder {
            buf,
            header: BatchHeader {
                first_seq,
                count: 0,
                sent_uptime_ms,
            },
            end: BATCH_HEADER_MAX,
        }
    }

    /// Appends a record (seq `first_seq + count()`). On error nothing is written: `Full` means
    /// send this batch and put the record in the next one.
    pub fn push(&mut self, record: &Record<'_>) -> Result<(), EncodeError> {
        if record.values.len() > MAX_VALUES {
            return Err(EncodeError::TooManyValues);
        }
        if record.values.iter().any(|v| v.blob_len() > MAX_BLOB) {
            return Err(EncodeError::TooLarge);
        }
        let delta = self
            .header
            .sent_uptime_ms
            .checked_sub(record.uptime_ms)
            .ok_or(EncodeError::UptimeAfterSend)?;
        if self.header.first_seq == 0 {
            return Err(EncodeError::Invalid);
        }
        let next = BatchHeader {
            count: self.header.count.checked_add(1).ok_or(EncodeError::Full)?,
            ..self.header
        };
        next.first_seq
            .checked_add(u64::from(next.count) - 1)
            .ok_or(EncodeError::Invalid)?;
        let free = self.buf.get_mut(self.end..).ok_or(EncodeError::Full)?;
        let n = postcard::to_slice(&(record.stream, delta, record.values), free)
            .map_err(|_| EncodeError::Full)?
            .len();
        let records_len = self.end + n - BATCH_HEADER_MAX;
        if next.encoded_len() + records_len > MAX_BODY {
            return Err(EncodeError::Full);
        }
        self.end += n;
        self.header = next;
        Ok(())
    }

    /// Records pushed so far.
    pub fn count(&self) -> u16 {
        self.header.count
    }

    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }

    /// The body length if the batch were finished now.
    pub fn len(&self) -> usize {
        self.header.encoded_len() + self.end - BATCH_HEADER_MAX
    }

    /// The seq the next pushed record gets (saturating at u64::MAX).
    pub fn next_seq(&self) -> u64 {
        self.header
            .first_seq
            .saturating_add(u64::from(self.header.count))
    }

    /// Writes the header and returns the finished body as a view (send it as
    /// `Message::Batch(view)`).
    pub fn finish(self) -> Result<BatchView<'a>, EncodeError> {
        if self.header.count == 0 {
            return Err(EncodeError::Empty);
        }
        let mut head = [0u8; BATCH_HEADER_MAX];
        let hl = postcard::to_slice(&self.header, &mut head)
            .map_err(|_| EncodeError::Full)?
            .len();
        let records_len = self.end - BATCH_HEADER_MAX;
        self.buf.copy_within(BATCH_HEADER_MAX..self.end, hl);
        self.buf[..hl].copy_from_slice(&head[..hl]);
        let buf: &'a [u8] = self.buf;
        Ok(BatchView {
            header: self.header,
            body: &buf[..hl + records_len],
            records_at: hl,
        })
    }
}

/// A validated Batch body, borrowed from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BatchView<'a> {
    header: BatchHeader,
    body: &'a [u8],
    records_at: usize,
}

impl<'a> BatchView<'a> {
    /// Parses and validates a whole Batch body: the header (first_seq >= 1, count >= 1, no seq
    /// overflow), every record (at most MAX_VALUES values, blobs at most MAX_BLOB, valid UTF-8,
    /// uptime delta not above sent_uptime_ms), and no trailing bytes.
    pub fn parse(body: &'a [u8]) -> Result<BatchView<'a>, DecodeError> {
        let (header, rest) = postcard::take_from_bytes::<BatchHeader>(body)?;
        header.validate()?;
        let view = BatchView {
            header,
            body,
            records_at: body.len() - rest.len(),
        };
        let mut records = view.records();
        for r in &mut records {
            r?;
        }
        if !records.rest.is_empty() {
            return Err(DecodeError::TrailingBytes);
        }
        Ok(view)
    }

    pub fn header(&self) -> BatchHeader {
        self.header
    }

    /// The encoded body.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.body
    }

    /// The records in seq order.
    pub fn records(&self) -> Records<'a> {
        Records {
            rest: &self.body[self.records_at..],
            next_seq: self.header.first_seq,
            remaining: self.header.count,
            sent_uptime_ms: self.header.sent_uptime_ms,
        }
    }
}

impl fmt::Display for BatchView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", self.header, self.body.len())
    }
}

/// Iterator over a batch's records; see [`BatchView::records`].
#[derive(Debug, Clone)]
pub struct Records<'a> {
    rest: &'a [u8],
    next_seq: u64,
    remaining: u16,
    sent_uptime_ms: u64,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<RecordView<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        match take_record(self.rest, self.next_seq, self.sent_uptime_ms) {
            Ok((record, rest)) => {
                self.rest = rest;
                self.remaining -= 1;
                // Wraps only past the last record of a batch ending at u64::MAX.
                self.next_seq = self.next_seq.wrapping_add(1);
                Some(Ok(record))
            }
            Err(e) => {
                self.remaining = 0;
                Some(Err(e))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(usize::from(self.remaining)))
    }
}

fn take_record(
    bytes: &[u8],
    seq: u64,
    sent_uptime_ms: u64,
) -> Result<(RecordView<'_>, &[u8]), DecodeError> {
    let ((stream, delta, n), values_at) = postcard::take_from_bytes::<(u16, u64, u32)>(bytes)?;
    if n as usize > MAX_VALUES {
        return Err(DecodeError::TooManyValues);
    }
    let uptime_ms = sent_uptime_ms
        .checked_sub(delta)
        .ok_or(DecodeError::Malformed)?;
    let mut rest = values_at;
    for _ in 0..n {
        let (value, r) = postcard::take_from_bytes::<Value<'_>>(rest)?;
        if value.blob_len() > MAX_BLOB {
            return Err(DecodeError::BlobTooLarge);
        }
        rest = r;
    }
    let record = RecordView {
        seq,
        stream,
        uptime_ms,
        value_count: n as u8,
        values: &values_at[..values_at.len() - rest.len()],
    };
    Ok((record, rest))
}

/// A record decoded from a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RecordView<'a> {
    pub seq: u64,
    pub stream: u16,
    /// Device uptime when the record was taken (`sent_uptime_ms - delta`).
    pub uptime_ms: u64,
    value_count: u8,
    values: &'a [u8],
}

impl<'a> RecordView<'a> {
    pub fn value_count(&self) -> usize {
        usize::from(self.value_count)
    }

    /// The values, borrowing Bytes/Str from the frame.
    pub fn values(&self) -> Values<'a> {
        Values {
            rest: self.values,
            remaining: self.value_count,
        }
    }
}

impl fmt::Display for RecordView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seq={} stream={} uptime={}ms ",
            self.seq, self.stream, self.uptime_ms
        )?;
        fmt_values(f, self.values())
    }
}

/// Iterator over a record's values; see [`RecordView::values`].
#[derive(Debug, Clone)]
pub struct Values<'a> {
    rest: &'a [u8],
    remaining: u8,
}

impl<'a> Iterator for Values<'a> {
    type Item = Value<'a>;

    fn next(&mut self) -> Option<Value<'a>> {
        if self.remaining == 0 {
            return None;
        }
        // The record was validated when the batch was parsed, so this does not fail.
        let (value, rest) = postcard::take_from_bytes::<Value<'a>>(self.rest).ok()?;
        self.rest = rest;
        self.remaining -= 1;
        Some(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::from(self.remaining);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Values<'_> {}

#[cfg(test)]
mod test {
    use super::*;

    // first_seq 5, count 1, sent 300; stream 2, delta 100, [U64(7), Str("hi")]
    static BATCH_BYTES: [u8; 13] = [
        0x05, 0x01, 0xac, 0x02, 0x02, 0x64, 0x02, 0x02, 0x07, 0x06, 0x02, b'h', b'i',
    ];

    #[test]
    fn test_parse() {
        let view = BatchView::parse(&BATCH_BYTES).unwrap();
        assert_eq!(
            view.header(),
            BatchHeader {
                first_seq: 5,
                count: 1,
                sent_uptime_ms: 300
            }
        );
        let r = view.records().next().unwrap().unwrap();
        assert_eq!((r.seq, r.stream, r.uptime_ms), (5, 2, 200));
        assert!(r.values().eq([Value::U64(7), Value::Str("hi")]));
        assert_eq!(r.values().len(), 2);
    }

    #[test]
    fn test_emit() {
        let mut buf = [0u8; 64];
        let mut enc = BatchEncoder::new(&mut buf, 5, 300);
        enc.push(&Record {
            stream: 2,
            uptime_ms: 200,
            values: &[Value::U64(7), Value::Str("hi")],
        })
        .unwrap();
        assert_eq!(enc.len(), BATCH_BYTES.len());
        assert_eq!(enc.finish().unwrap().as_bytes(), &BATCH_BYTES);
    }

    #[test]
    fn test_seq_at_u64_max() {
        // Found by fuzzing: a batch whose last record has seq u64::MAX.
        // first_seq u64::MAX, count 1, sent 0; stream 0, delta 0, no values
        let mut body = [0xffu8; 15];
        body[9..].copy_from_slice(&[0x01, 0x01, 0x00, 0x00, 0x00, 0x00]);
        let view = BatchView::parse(&body).unwrap();
        assert_eq!(view.header().last_seq(), u64::MAX);
        let mut records = view.records();
        assert_eq!(records.next().unwrap().unwrap().seq, u64::MAX);
        assert!(records.next().is_none());

        let mut buf = [0u8; 64];
        let mut enc = BatchEncoder::new(&mut buf, u64::MAX, 0);
        let record = Record {
            stream: 0,
            uptime_ms: 0,
            values: &[],
        };
        enc.push(&record).unwrap();
        assert_eq!(enc.next_seq(), u64::MAX);
        assert_eq!(enc.push(&record), Err(EncodeError::Invalid));
        let h = BatchHeader {
            first_seq: 0,
            count: 0,
            sent_uptime_ms: 0,
        };
        assert_eq!(h.last_seq(), u64::MAX);
    }

    #[test]
    fn test_header_max() {
        let h = BatchHeader {
            first_seq: u64::MAX,
            count: u16::MAX,
            sent_uptime_ms: u64::MAX,
        };
        let mut buf = [0u8; 64];
        let n = postcard::to_slice(&h, &mut buf).unwrap().len();
        assert_eq!(n, BATCH_HEADER_MAX);
        assert_eq!(h.encoded_len(), n);
        for v in [0, 1, 127, 128, 16_383, 16_384, u64::MAX >> 1, u64::MAX] {
            let n = postcard::to_slice(&v, &mut buf).unwrap().len();
            assert_eq!(varint_len(v), n, "{v}");
        }
    }

    #[test]
    fn test_body_limit() {
        // Records are accepted up to exactly MAX_BODY bytes, never beyond.
        let mut buf = [0u8; crate::MAX_FRAME];
        let mut enc = BatchEncoder::new(&mut buf, 1, 0);
        let blob = [0u8; MAX_BLOB];
        let values = [Value::Bytes(&blob)];
        loop {
            let record = Record {
                stream: 0,
                uptime_ms: 0,
                values: &values,
            };
            if enc.push(&record).is_err() {
                break;
            }
        }
        let tiny = [Value::Bool(true)];
        while enc
            .push(&Record {
                stream: 0,
                uptime_ms: 0,
                values: &tiny,
            })
            .is_ok()
        {}
        let len = enc.len();
        assert!(len <= MAX_BODY && len > MAX_BODY - 5, "{len}");
        assert_eq!(enc.finish().unwrap().as_bytes().len(), len);
    }
}
