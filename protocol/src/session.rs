//! Connection-level helpers: frame counters, sealing and decoding on each side.
//!
//! Counter rules (SPEC.md §4):
//! - Device frames carry the device's frame counter, monotonic across all connections of
//!   one boot. On a connection, the first frame is a Hello and every later device frame has
//!   counter = previous + 1. A counter not greater than the last is [`FrameError::Replay`],
//!   one that skips is [`FrameError::Reordered`].
//! - Gateway frames carry a reply index 0, 1, 2, ... (< 2^24) in the header counter; their
//!   nonce counter is `(hello_counter << 24) | index`, so they are bound to the connection's
//!   Hello.
//!
//! Frames are authenticated before counters are checked, so a forged frame is always
//! [`FrameError::BadAuth`] and only an authentic old frame is `Replay`.

use core::fmt;

use crate::error::{EncodeError, FrameError};
use crate::frame::{FLAG_UNSEALED, Frame, FrameHeader, Kind};
use crate::message::{Error, ErrorCode, Hello, Message};
use crate::security::{Direction, KEY_LEN, open, seal, verify_hello};
use crate::{HEADER_LEN, MAX_BODY, PROTOCOL_VERSION, TAG_LEN};

/// Gateway reply indexes stay below this (24 bits).
pub const MAX_REPLIES: u32 = 1 << 24;

fn reply_nonce(hello_counter: u32, index: u32) -> u64 {
    (u64::from(hello_counter) << 24) | u64::from(index)
}

/// Writes header and body into `out` and seals them; returns the frame length.
fn seal_message(
    key: &[u8; KEY_LEN],
    boot: u32,
    direction: Direction,
    header_counter: u32,
    nonce_counter: u64,
    msg: &Message<'_>,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let body_len = write_body(msg, out)?;
    FrameHeader {
        kind: msg.kind(),
        length: (body_len + TAG_LEN) as u16,
        flags: 0,
        counter: header_counter,
    }
    .emit(&mut Frame::new_unchecked(&mut out[..]));
    seal(key, boot, direction, nonce_counter, out)
}

/// Encodes the body at `out[HEADER_LEN..]`, leaving room for the tag.
fn write_body(msg: &Message<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    let room = out
        .len()
        .checked_sub(HEADER_LEN + TAG_LEN)
        .ok_or(EncodeError::Full)?;
    let cap = room.min(MAX_BODY);
    msg.encode_body(&mut out[HEADER_LEN..HEADER_LEN + cap])
        .map_err(|e| match e {
            EncodeError::Full if cap == MAX_BODY => EncodeError::TooLarge,
            e => e,
        })
}

/// Returns the checked header and the body of a frame, without authenticating it.
fn parse(frame: &[u8]) -> Result<(FrameHeader, &[u8]), FrameError> {
    let view = Frame::new_checked(frame)?;
    let header = FrameHeader::parse(&view)?;
    Ok((header, &frame[HEADER_LEN..HEADER_LEN + header.body_len()]))
}

/// Encodes an Error frame in the clear (flag [`FLAG_UNSEALED`], zero tag): what a gateway
/// sends when it has no session to seal with (unknown device, a Hello that does not
/// authenticate or parse). Devices act on it only by closing the connection and backing off.
pub fn encode_unsealed_error(code: ErrorCode, out: &mut [u8]) -> Result<usize, EncodeError> {
    let msg = Message::Error(Error { code });
    let body_len = write_body(&msg, out)?;
    let len = HEADER_LEN + body_len + TAG_LEN;
    FrameHeader {
        kind: Kind::Error,
        length: (body_len + TAG_LEN) as u16,
        flags: FLAG_UNSEALED,
        counter: 0,
    }
    .emit(&mut Frame::new_unchecked(&mut out[..]));
    out[HEADER_LEN + body_len..len].fill(0);
    Ok(len)
}

/// The device side of the protocol for one boot: seals device frames and opens gateway frames.
///
/// Keep one `DeviceSession` for the whole boot (the counter must never repeat under one boot
/// number) and start every connection by encoding a [`Hello`]; gateway frames are then
/// accepted in order for that connection.
#[derive(Clone)]
pub struct DeviceSession {
    key: [u8; KEY_LEN],
    boot: u32,
    next_counter: u64,
    hello_counter: Option<u32>,
    next_reply: u32,
}

impl fmt::Debug for DeviceSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSession")
            .field("boot", &self.boot)
            .field("next_counter", &self.next_counter)
            .field("hello_counter", &self.hello_counter)
            .field("next_reply", &self.next_reply)
            .finish_non_exhaustive()
    }
}

impl DeviceSession {
    /// A session for boot number `boot` whose first frame gets counter `first_counter`.
    pub fn new(key: &[u8; KEY_LEN], boot: u32, first_counter: u32) -> DeviceSession {
        DeviceSession {
            key: *key,
            boot,
            next_counter: u64::from(first_counter),
            hello_counter: None,
            next_reply: 0,
        }
    }

    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// The counter the next frame gets (2^32 once exhausted).
    pub fn next_counter(&self) -> u64 {
        self.next_counter
    }

    /// A Hello for this session's boot and protocol version.
    pub fn hello(&self, device_id: u64, firmware_version: u32, max_batch: u16) -> Hello {
        Hello {
            device_id,
            boot: self.boot,
            firmware_version,
            protocol_version: PROTOCOL_VERSION,
            max_batch,
        }
    }

    /// Encodes and seals `msg` into `out`, returning the frame length. A Hello starts a new
    /// connection; any other message before the first Hello is [`EncodeError::Invalid`].
    pub fn encode(&mut self, msg: &Message<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
        let counter =
            u32::try_from(self.next_counter).map_err(|_| EncodeError::CounterExhausted)?;
        match msg {
            Message::Hello(h) if h.boot != self.boot || h.protocol_version != PROTOCOL_VERSION => {
                return Err(EncodeError::Invalid);
            }
            Message::Hello(_) => {}
            _ if self.hello_counter.is_none() => return Err(EncodeError::Invalid),
            _ => {}
        }
        let len = seal_message(
            &self.key,
            self.boot,
            Direction::DeviceToGateway,
            counter,
            u64::from(counter),
            msg,
            out,
        )?;
        if let Message::Hello(_) = msg {
            self.hello_counter = Some(counter);
            self.next_reply = 0;
        }
        self.next_counter += 1;
        Ok(len)
    }

    /// Opens a gateway frame in place and decodes it, borrowing from `frame`.
    ///
    /// An unsealed Error frame (see [`encode_unsealed_error`]) is returned as
    /// `Message::Error` without authentication.
    pub fn decode<'b>(&mut self, frame: &'b mut [u8]) -> Result<Message<'b>, FrameError> {
        let (header, _) = parse(frame)?;
        if header.is_unsealed() {
            if header.kind != Kind::Error {
                return Err(FrameError::Malformed);
            }
            let (_, body) = parse(frame)?;
            return Ok(Message::decode_body(Kind::Error, body)?);
        }
        let hello_counter = self.hello_counter.ok_or(FrameError::Unexpected)?;
        if header.counter >= MAX_REPLIES {
            return Err(FrameError::Malformed);
        }
        open(
            &self.key,
            self.boot,
            Direction::GatewayToDevice,
            reply_nonce(hello_counter, header.counter),
            frame,
        )?;
        if header.counter < self.next_reply {
            return Err(FrameError::Replay);
        }
        if header.counter > self.next_reply {
            return Err(FrameError::Reordered);
        }
        self.next_reply += 1;
        if header.kind == Kind::Hello {
            return Err(FrameError::Unexpected);
        }
        let frame: &'b [u8] = frame;
        let (_, body) = parse(frame)?;
        Ok(Message::decode_body(header.kind, body)?)
    }
}

/// The gateway side of one device connection, created from the connection's Hello.
///
/// ```text
/// let hello = GatewaySession::peek_hello(&frame)?;      // unauthenticated: find the key
/// let key = registry.key(hello.device_id)?;             // else send UnknownDevice unsealed
/// let mut session = GatewaySession::accept(&key, &frame)?;
/// ```
#[derive(Clone)]
pub struct GatewaySession {
    key: [u8; KEY_LEN],
    hello: Hello,
    hello_counter: u32,
    last_counter: u32,
    next_reply: u32,
}

impl fmt::Debug for GatewaySession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewaySession")
            .field("hello", &self.hello)
            .field("hello_counter", &self.hello_counter)
            .field("last_counter", &self.last_counter)
            .field("next_reply", &self.next_reply)
            .finish_non_exhaustive()
    }
}

impl GatewaySession {
    /// Reads the Hello of a connection's first frame WITHOUT authenticating it, so the
    /// gateway can look up the device's key. Trust nothing in it until [`accept`] succeeds.
    ///
    /// [`accept`]: GatewaySession::accept
    pub fn peek_hello(frame: &[u8]) -> Result<Hello, FrameError> {
        let (header, body) = parse(frame)?;
        if header.is_unsealed() {
            return Err(FrameError::Malformed);
        }
        if header.kind != Kind::Hello {
            return Err(FrameError::Unexpected);
        }
        match Message::decode_body(Kind::Hello, body)? {
            Message::Hello(h) => Ok(h),
            _ => Err(FrameError::Malformed),
        }
    }

    /// Authenticates the Hello frame with the device's key and starts the session.
    /// A Hello with another protocol version is [`FrameError::UnsupportedVersion`].
    pub fn accept(key: &[u8; KEY_LEN], frame: &[u8]) -> Result<GatewaySession, FrameError> {
        let hello = Self::peek_hello(frame)?;
        let counter = Frame::new_unchecked(frame).counter();
        verify_hello(key, hello.boot, u64::from(counter), frame)?;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion);
        }
        Ok(GatewaySession {
            key: *key,
            hello,
            hello_counter: counter,
            last_counter: counter,
            next_reply: 0,
        })
    }

    /// The authenticated Hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The frame counter of the Hello. A gateway that remembers the last `(boot, counter)`
    /// per device rejects a replayed Hello with `ErrorCode::Replay`.
    pub fn hello_counter(&self) -> u32 {
        self.hello_counter
    }

    /// Opens a device frame in place and decodes it, borrowing from `frame`.
    pub fn decode<'b>(&mut self, frame: &'b mut [u8]) -> Result<Message<'b>, FrameError> {
        let (header, _) = parse(frame)?;
        if header.is_unsealed() {
            return Err(FrameError::Malformed);
        }
        open(
            &self.key,
            self.hello.boot,
            Direction::DeviceToGateway,
            u64::from(header.counter),
            frame,
        )?;
        if header.counter <= self.last_counter {
            return Err(FrameError::Replay);
        }
        if u64::from(header.counter) > u64::from(self.last_counter) + 1 {
            return Err(FrameError::Reordered);
        }
        self.last_counter = header.counter;
        if header.kind == Kind::Hello {
            return Err(FrameError::Unexpected);
        }
        let frame: &'b [u8] = frame;
        let (_, body) = parse(frame)?;
        Ok(Message::decode_body(header.kind, body)?)
    }

    /// Encodes and seals `msg` (anything but Hello) into `out`, returning the frame length.
    /// After 2^24 replies the connection must be closed ([`EncodeError::CounterExhausted`]).
    pub fn encode(&mut self, msg: &Message<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
        if msg.kind() == Kind::Hello {
            return Err(EncodeError::Invalid);
        }
        let index = self.next_reply;
        if index >= MAX_REPLIES {
            return Err(EncodeError::CounterExhausted);
        }
        let len = seal_message(
            &self.key,
            self.hello.boot,
            Direction::GatewayToDevice,
            index,
            reply_nonce(self.hello_counter, index),
            msg,
            out,
        )?;
        self.next_reply += 1;
        Ok(len)
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::batch::{BatchEncoder, Record, Value};
    use crate::message::{Ack, GatewayAddr, Ping, Welcome};
    use crate::{MAX_FRAME, Message};

    const KEY: [u8; KEY_LEN] = [7; KEY_LEN];

    fn connect() -> (DeviceSession, GatewaySession) {
        let mut dev = DeviceSession::new(&KEY, 42, 100);
        let mut buf = [0u8; MAX_FRAME];
        let hello = dev.hello(9, 3, 50);
        let n = dev.encode(&Message::Hello(hello), &mut buf).unwrap();
        assert_eq!(GatewaySession::peek_hello(&buf[..n]), Ok(hello));
        let gw = GatewaySession::accept(&KEY, &buf[..n]).unwrap();
        assert_eq!(gw.hello(), &hello);
        assert_eq!(gw.hello_counter(), 100);
        (dev, gw)
    }

    #[test]
    fn test_round_trip_both_ways() {
        let (mut dev, mut gw) = connect();
        let mut buf = [0u8; MAX_FRAME];
        let welcome = Welcome {
            high_water: 17,
            leader: Some(GatewayAddr::new([10, 0, 2, 2], 4003)),
            credit: 64,
        };
        let n = gw.encode(&Message::Welcome(welcome), &mut buf).unwrap();
        assert_eq!(dev.decode(&mut buf[..n]), Ok(Message::Welcome(welcome)));

        let mut batch_buf = [0u8; MAX_FRAME];
        let mut enc = BatchEncoder::new(&mut batch_buf, 18, 5000);
        let values = [Value::F32(1.5), Value::Str("ok"), Value::Bytes(&[1, 2])];
        enc.push(&Record {
            stream: 3,
            uptime_ms: 4000,
            values: &values,
        })
        .unwrap();
        let batch = enc.finish().unwrap();
        let n = dev.encode(&Message::Batch(batch), &mut buf).unwrap();
        let Ok(Message::Batch(got)) = gw.decode(&mut buf[..n]) else {
            panic!("not a batch")
        };
        assert_eq!(got.header(), batch.header());
        let r = got.records().next().unwrap().unwrap();
        assert_eq!((r.seq, r.stream, r.uptime_ms), (18, 3, 4000));
        assert!(r.values().eq(values.iter().copied()));

        let ack = Ack {
            through_seq: 18,
            credit: 64,
            leader: None,
        };
        let n = gw.encode(&Message::Ack(ack), &mut buf).unwrap();
        assert_eq!(dev.decode(&mut buf[..n]), Ok(Message::Ack(ack)));
    }

    #[test]
    fn test_replay_reorder_tamper() {
        let (mut dev, mut gw) = connect();
        let mut f1 = [0u8; 64];
        let mut f2 = [0u8; 64];
        let n1 = dev
            .encode(&Message::Ping(Ping { nonce: 1 }), &mut f1)
            .unwrap();
        let n2 = dev
            .encode(&Message::Ping(Ping { nonce: 2 }), &mut f2)
            .unwrap();
        let mut skipped = f2;
        assert_eq!(gw.decode(&mut skipped[..n2]), Err(FrameError::Reordered));
        let mut tampered = f1;
        tampered[n1 - 1] ^= 1;
        assert_eq!(gw.decode(&mut tampered[..n1]), Err(FrameError::BadAuth));
        let mut replay = f1;
        assert!(gw.decode(&mut f1[..n1]).is_ok());
        assert_eq!(gw.decode(&mut replay[..n1]), Err(FrameError::Replay));
        assert!(gw.decode(&mut f2[..n2]).is_ok());
    }

    #[test]
    fn test_unsealed_error() {
        let (mut dev, _) = connect();
        let mut buf = [0u8; 64];
        let n = encode_unsealed_error(ErrorCode::UnknownDevice, &mut buf).unwrap();
        assert_eq!(
            dev.decode(&mut buf[..n]),
            Ok(Message::Error(Error {
                code: ErrorCode::UnknownDevice
            }))
        );
    }

    #[test]
    fn test_wrong_key() {
        let mut dev = DeviceSession::new(&KEY, 1, 0);
        let mut buf = [0u8; 64];
        let n = dev
            .encode(&Message::Hello(dev.hello(1, 1, 1)), &mut buf)
            .unwrap();
        assert_eq!(
            GatewaySession::accept(&[8; KEY_LEN], &buf[..n]).unwrap_err(),
            FrameError::BadAuth
        );
    }
}
