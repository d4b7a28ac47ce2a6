//! How a record is kept in the outbox (RAM ring and flash): compact, self-delimiting, and
//! independent of the wire format, so the uptime can be re-based per batch at send time.
//!
//! ```text
//! stream u16 LE | uptime_ms varint | n u8 | n x value
//! value: tag u8 | Bool: 1 byte | I64: zigzag varint | U64: varint | F32: 4 bytes LE
//!        | F64: 8 bytes LE | Bytes/Str: len u8, bytes
//! ```
//!
//! A reading of three `f32` values takes 2 + 3 + 1 + 15 = 21 bytes (plus the ring's 2-byte
//! length prefix). This layout is also the flash format of `flash-outbox` (version 1): change it
//! only together with [`FORMAT_VERSION`].

use cairn_protocol::{MAX_BLOB, MAX_VALUES, Value};

/// Version of this layout, stored in flash next to the records.
pub const FORMAT_VERSION: u8 = 1;

/// The longest encoded record: header (2 + 10 + 1) and eight 66-byte blobs.
pub const MAX_RECORD_LEN: usize = 13 + MAX_VALUES * (2 + MAX_BLOB);

const TAG_BOOL: u8 = 0;
const TAG_I64: u8 = 1;
const TAG_U64: u8 = 2;
const TAG_F32: u8 = 3;
const TAG_F64: u8 = 4;
const TAG_BYTES: u8 = 5;
const TAG_STR: u8 = 6;

/// Why values were refused by [`crate::Client::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ValuesError {
    /// More than [`MAX_VALUES`] values.
    TooManyValues,
    /// A Bytes/Str value longer than [`MAX_BLOB`].
    BlobTooLarge,
}

impl core::fmt::Display for ValuesError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ValuesError::TooManyValues => "too many values in one record",
            ValuesError::BlobTooLarge => "bytes/str value too long",
        })
    }
}

impl core::error::Error for ValuesError {}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut [u8], mut v: u64) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        out[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v as u8;
    i + 1
}

fn get_varint(input: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, b) in input.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn value_len(v: &Value<'_>) -> usize {
    1 + match v {
        Value::Bool(_) => 1,
        Value::I64(x) => varint_len(zigzag(*x)),
        Value::U64(x) => varint_len(*x),
        Value::F32(_) => 4,
        Value::F64(_) => 8,
        Value::Bytes(b) => 1 + b.len(),
        Value::Str(s) => 1 + s.len(),
    }
}

/// Checks the limits and returns the encoded length.
pub fn encoded_len(uptime_ms: u64, values: &[Value<'_>]) -> Result<usize, ValuesError> {
    if values.len() > MAX_VALUES {
        return Err(ValuesError::TooManyValues);
    }
    let mut len = 2 + varint_len(uptime_ms) + 1;
    for v in values {
        if matches!(v, Value::Bytes(b) if b.len() > MAX_BLOB)
            || matches!(v, Value::Str(s) if s.len() > MAX_BLOB)
        {
            return Err(ValuesError::BlobTooLarge);
        }
        len += value_len(v);
    }
    Ok(len)
}

/// Writes the record into `out`, which is exactly [`encoded_len`] bytes.
pub fn encode(out: &mut [u8], stream: u16, uptime_ms: u64, values: &[Value<'_>]) {
    out[..2].copy_from_slice(&stream.to_le_bytes());
    let mut at = 2 + put_varint(&mut out[2..], uptime_ms);
    out[at] = values.len() as u8;
    at += 1;
    for v in values {
        let (tag, rest) = out[at..].split_first_mut().expect("sized by encoded_len");
        at += 1 + match v {
            Value::Bool(b) => {
                *tag = TAG_BOOL;
                rest[0] = u8::from(*b);
                1
            }
            Value::I64(x) => {
                *tag = TAG_I64;
                put_varint(rest, zigzag(*x))
            }
            Value::U64(x) => {
                *tag = TAG_U64;
                put_varint(rest, *x)
            }
            Value::F32(x) => {
                *tag = TAG_F32;
                rest[..4].copy_from_slice(&x.to_le_bytes());
                4
            }
            Value::F64(x) => {
                *tag = TAG_F64;
                rest[..8].copy_from_slice(&x.to_le_bytes());
                8
            }
            Value::Bytes(b) => {
                *tag = TAG_BYTES;
                rest[0] = b.len() as u8;
                rest[1..1 + b.len()].copy_from_slice(b);
                1 + b.len()
            }
            Value::Str(s) => {
                *tag = TAG_STR;
                rest[0] = s.len() as u8;
                rest[1..1 + s.len()].copy_from_slice(s.as_bytes());
                1 + s.len()
            }
        };
    }
}

/// A record read back from the outbox, values decoded into a fixed array.
#[derive(Debug, Clone, Copy)]
pub struct StoredRecord<'a> {
    /// Application stream id.
    pub stream: u16,
    /// Device uptime when the record was pushed.
    pub uptime_ms: u64,
    values: [Value<'a>; MAX_VALUES],
    count: usize,
}

impl<'a> StoredRecord<'a> {
    /// The values, in push order.
    pub fn values(&self) -> &[Value<'a>] {
        &self.values[..self.count]
    }

    /// Decodes a record; `None` means the bytes are not a record of this format (corrupt).
    pub fn decode(bytes: &'a [u8]) -> Option<StoredRecord<'a>> {
        let stream = u16::from_le_bytes([*bytes.first()?, *bytes.get(1)?]);
        let (uptime_ms, n) = get_varint(bytes.get(2..)?)?;
        let mut at = 2 + n;
        let count = usize::from(*bytes.get(at)?);
        at += 1;
        if count > MAX_VALUES {
            return None;
        }
        let mut values = [Value::Bool(false); MAX_VALUES];
        for slot in values.iter_mut().take(count) {
            let tag = *bytes.get(at)?;
            at += 1;
            let rest = bytes.get(at..)?;
            let (v, used) = match tag {
                TAG_BOOL => (Value::Bool(*rest.first()? != 0), 1),
                TAG_I64 => {
                    let (x, n) = get_varint(rest)?;
                    (Value::I64(unzigzag(x)), n)
                }
                TAG_U64 => {
                    let (x, n) = get_varint(rest)?;
                    (Value::U64(x), n)
                }
                TAG_F32 => (
                    Value::F32(f32::from_le_bytes(rest.get(..4)?.try_into().ok()?)),
                    4,
                ),
                TAG_F64 => (
                    Value::F64(f64::from_le_bytes(rest.get(..8)?.try_into().ok()?)),
                    8,
                ),
                TAG_BYTES | TAG_STR => {
                    let len = usize::from(*rest.first()?);
                    let blob = rest.get(1..1 + len)?;
                    let v = if tag == TAG_BYTES {
                        Value::Bytes(blob)
                    } else {
                        Value::Str(core::str::from_utf8(blob).ok()?)
                    };
                    (v, 1 + len)
                }
                _ => return None,
            };
            *slot = v;
            at += used;
        }
        (at == bytes.len()).then_some(StoredRecord {
            stream,
            uptime_ms,
            values,
            count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_round_trip_every_value_kind() {
        let values = [
            Value::Bool(true),
            Value::I64(-123_456_789_000),
            Value::U64(u64::MAX),
            Value::F32(21.5),
            Value::F64(-0.125),
            Value::Bytes(&[1, 2, 3]),
            Value::Str("hall"),
            Value::I64(i64::MIN),
        ];
        let len = encoded_len(987_654_321, &values).unwrap();
        let mut buf = [0u8; MAX_RECORD_LEN];
        encode(&mut buf[..len], 513, 987_654_321, &values);
        let r = StoredRecord::decode(&buf[..len]).unwrap();
        assert_eq!((r.stream, r.uptime_ms), (513, 987_654_321));
        assert_eq!(r.values(), &values);
        assert!(StoredRecord::decode(&buf[..len - 1]).is_none(), "truncated");
    }

    #[test]
    fn test_three_f32_reading_is_compact() {
        let values = [Value::F32(1.0), Value::F32(2.0), Value::F32(3.0)];
        assert_eq!(encoded_len(60_000, &values), Ok(21));
    }

    #[test]
    fn test_limits() {
        let nine = [Value::Bool(true); 9];
        assert_eq!(encoded_len(0, &nine), Err(ValuesError::TooManyValues));
        let big = [0u8; MAX_BLOB + 1];
        assert_eq!(
            encoded_len(0, &[Value::Bytes(&big)]),
            Err(ValuesError::BlobTooLarge)
        );
        let max = [Value::Bytes(&big[..MAX_BLOB]); MAX_VALUES];
        assert!(encoded_len(u64::MAX, &max).unwrap() <= MAX_RECORD_LEN);
    }
}
