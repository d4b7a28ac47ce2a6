//! Connection-level helpers: frame counters, sealing and decoding on each side.
//!
//! Counter rules (SPEC.md §6):
//! - Device frames carry the device's frame counter, monotonic across all connections of
//!   one boot. On a connection, the first frame is a Hello and every later device frame has
//!   counter = previous + 1. A counter not greater than the last is [`FrameError::Replay`],
//!   one that skips is [`FrameError::Reordered`].
//! - Gateway frames carry a reply index 0, 1, 2, ... (< 2^24) in the header counter and are
//!   bound to the connection's Hello through their nonce: `(hello_counter << 24) | index`
//!   (ChaCha20-Poly1305), or, on a salted connection, [`salted_nonce`] (XChaCha20-Poly1305).
//!
//! Frames are authenticated before counters are checked, so a forged frame is always
//! [`FrameError::BadAuth`] and only an authentic old frame is `Replay`.

use core::fmt;

use crate::error::{EncodeError, FrameError};
use crate::frame::{FLAG_SALTED, FLAG_UNSEALED, Frame, FrameHeader, Kind};
use crate::message::{Error, ErrorCode, Hello, Message};
use crate::security::{
    Direction, FrameAead, KEY_LEN, SALT_LEN, nonce, open_with, salted_nonce, seal_with,
    verify_hello,
};
use crate::{HEADER_LEN, MAX_BODY, PROTOCOL_VERSION, TAG_LEN};

/// Gateway reply indexes stay below this (24 bits).
pub const MAX_REPLIES: u32 = 1 << 24;

/// The cipher and nonce of gateway frame `index` on the connection opened by `hello_counter`.
fn reply_aead(
    boot: u32,
    hello_counter: u32,
    salt: Option<&[u8; SALT_LEN]>,
    index: u32,
) -> FrameAead {
    match salt {
        Some(salt) => FrameAead::XChaCha(salted_nonce(salt, boot, hello_counter, index)),
        None => FrameAead::ChaCha(nonce(
            boot,
            Direction::GatewayToDevice,
            (u64::from(hello_counter) << 24) | u64::from(index),
        )),
    }
}

/// Writes header, optional clear salt and body into `out` and seals them; returns the frame
/// length.
fn seal_message(
    key: &[u8; KEY_LEN],
    aead: &FrameAead,
    header_counter: u32,
    salt_prefix: Option<&[u8; SALT_LEN]>,
    msg: &Message<'_>,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let prefix = if salt_prefix.is_some() { SALT_LEN } else { 0 };
    let body_len = prefix + write_body(msg, prefix, out)?;
    let mut flags = 0;
    if let Some(salt) = salt_prefix {
        out[HEADER_LEN..HEADER_LEN + SALT_LEN].copy_from_slice(salt);
        flags = FLAG_SALTED;
    }
    FrameHeader {
        kind: msg.kind(),
        length: (body_len + TAG_LEN) as u16,
        flags,
        counter: header_counter,
    }
    .emit(&mut Frame::new_unchecked(&mut out[..]));
    let aad_len = if msg.kind() == Kind::Hello {
        HEADER_LEN + body_len
    } else {
        HEADER_LEN + prefix
    };
    seal_with(key, aead, aad_len, out)
}

/// Encodes the message at `out[HEADER_LEN + prefix..]`, leaving room for the tag; returns
/// its length.
fn write_body(msg: &Message<'_>, prefix: usize, out: &mut [u8]) -> Result<usize, EncodeError> {
    let start = HEADER_LEN + prefix;
    let room = out
        .len()
        .checked_sub(start + TAG_LEN)
        .ok_or(EncodeError::Full)?;
    let max = MAX_BODY - prefix;
    let cap = room.min(max);
    msg.encode_body(&mut out[start..start + cap])
        .map_err(|e| match e {
            EncodeError::Full if cap == max => EncodeError::TooLarge,
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
    let body_len = write_body(&msg, 0, out)?;
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
/// accepted in order for that connection. Salted and unsalted gateways are both understood.
#[derive(Clone)]
pub struct DeviceSession {
    key: [u8; KEY_LEN],
    boot: u32,
    next_counter: u64,
    hello_counter: Option<u32>,
    next_reply: u32,
    salt: Option<[u8; SALT_LEN]>,
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
            salt: None,
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
        let aead = FrameAead::ChaCha(nonce(
            self.boot,
            Direction::DeviceToGateway,
            u64::from(counter),
        ));
        let len = seal_message(&self.key, &aead, counter, None, msg, out)?;
        if let Message::Hello(_) = msg {
            self.hello_counter = Some(counter);
            self.next_reply = 0;
            self.salt = None;
        }
        self.next_counter += 1;
        Ok(len)
    }

    /// Opens a gateway frame in place and decodes it, borrowing from `frame`. After an error
    /// the contents of `frame` are unspecified (it may be decrypted already).
    ///
    /// An unsealed Error frame (see [`encode_unsealed_error`]) is returned as
    /// `Message::Error` without authentication.
    pub fn decode<'b>(&mut self, frame: &'b mut [u8]) -> Result<Message<'b>, FrameError> {
        let (header, _) = parse(frame)?;
        if header.is_unsealed() {
            if header.kind != Kind::Error {
                return Err(FrameError::Malformed);
            }
            let frame: &'b [u8] = frame;
            let (_, body) = parse(frame)?;
            return Ok(Message::decode_body(Kind::Error, body)?);
        }
        let hello_counter = self.hello_counter.ok_or(FrameError::Unexpected)?;
        if header.counter >= MAX_REPLIES {
            return Err(FrameError::Malformed);
        }
        // Reply 0 says whether this connection is salted; later replies follow it.
        let salt = if header.counter == 0 {
            header.is_salted().then(|| {
                let mut s = [0u8; SALT_LEN];
                s.copy_from_slice(&frame[HEADER_LEN..HEADER_LEN + SALT_LEN]);
                s
            })
        } else {
            self.salt
        };
        let prefix = if header.is_salted() { SALT_LEN } else { 0 };
        let aead = reply_aead(self.boot, hello_counter, salt.as_ref(), header.counter);
        open_with(&self.key, &aead, HEADER_LEN + prefix, frame)?;
        if header.counter < self.next_reply {
            return Err(FrameError::Replay);
        }
        if header.counter > self.next_reply {
            return Err(FrameError::Reordered);
        }
        self.next_reply += 1;
        self.salt = salt;
        if header.kind == Kind::Hello {
            return Err(FrameError::Unexpected);
        }
        let frame: &'b [u8] = frame;
        let (_, body) = parse(frame)?;
        Ok(Message::decode_body(header.kind, &body[prefix..])?)
    }
}

/// The gateway side of one device connection, created from the connection's Hello.
///
/// ```text
/// let hello = GatewaySession::peek_hello(&frame)?;      // unauthenticated: find the key
/// let key = registry.key(hello.device_id)?;             // else send UnknownDevice unsealed
/// let mut session = GatewaySession::accept_salted(&key, &frame, rand::random())?;
/// ```
#[derive(Clone)]
pub struct GatewaySession {
    key: [u8; KEY_LEN],
    hello: Hello,
    hello_counter: u32,
    last_counter: u32,
    next_reply: u32,
    salt: Option<[u8; SALT_LEN]>,
}

impl fmt::Debug for GatewaySession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewaySession")
            .field("hello", &self.hello)
            .field("hello_counter", &self.hello_counter)
            .field("last_counter", &self.last_counter)
            .field("next_reply", &self.next_reply)
            .field("salted", &self.salt.is_some())
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
        if header.flags != 0 {
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

    /// Authenticates the Hello frame with the device's key and starts an unsalted session
    /// (gateway nonces derived from the Hello counter alone, as in the original plan).
    /// Prefer [`accept_salted`](GatewaySession::accept_salted): without a salt, a Hello
    /// replayed to a second gateway makes two gateways seal under the same nonces.
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
            salt: None,
        })
    }

    /// Like [`accept`](GatewaySession::accept), but every gateway frame on this connection is
    /// sealed with XChaCha20-Poly1305 under a nonce that includes `salt`, which must be fresh
    /// random bytes for every connection. The first reply carries the salt in the clear.
    pub fn accept_salted(
        key: &[u8; KEY_LEN],
        frame: &[u8],
        salt: [u8; SALT_LEN],
    ) -> Result<GatewaySession, FrameError> {
        let mut session = Self::accept(key, frame)?;
        session.salt = Some(salt);
        Ok(session)
    }

    /// The authenticated Hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The frame counter of the Hello. A gateway that remembers the last `(boot, counter)`
    /// per device can reject a replayed Hello with `ErrorCode::Replay`.
    pub fn hello_counter(&self) -> u32 {
        self.hello_counter
    }

    /// Opens a device frame in place and decodes it, borrowing from `frame`. After an error
    /// the contents of `frame` are unspecified (it may be decrypted already).
    pub fn decode<'b>(&mut self, frame: &'b mut [u8]) -> Result<Message<'b>, FrameError> {
        let (header, _) = parse(frame)?;
        if header.flags != 0 {
            return Err(FrameError::Malformed);
        }
        let aad_len = if header.kind == Kind::Hello {
            HEADER_LEN + header.body_len()
        } else {
            HEADER_LEN
        };
        let aead = FrameAead::ChaCha(nonce(
            self.hello.boot,
            Direction::DeviceToGateway,
            u64::from(header.counter),
        ));
        open_with(&self.key, &aead, aad_len, frame)?;
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
        let aead = reply_aead(
            self.hello.boot,
            self.hello_counter,
            self.salt.as_ref(),
            index,
        );
        let salt_prefix = self.salt.as_ref().filter(|_| index == 0);
        let len = seal_message(&self.key, &aead, index, salt_prefix, msg, out)?;
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

    fn hello_frame(dev: &mut DeviceSession, buf: &mut [u8]) -> usize {
        dev.encode(&Message::Hello(dev.hello(9, 3, 50)), buf)
            .unwrap()
    }

    #[test]
    fn test_salted_round_trip() {
        let mut dev = DeviceSession::new(&KEY, 42, 0);
        let mut buf = [0u8; MAX_FRAME];
        let n = hello_frame(&mut dev, &mut buf);
        let mut gw = GatewaySession::accept_salted(&KEY, &buf[..n], [0xa5; SALT_LEN]).unwrap();
        for i in 0..3u32 {
            let ping = Message::Ping(Ping { nonce: i });
            let n = gw.encode(&ping, &mut buf).unwrap();
            let h = FrameHeader::parse(&Frame::new_checked(&buf[..n]).unwrap()).unwrap();
            assert_eq!(h.is_salted(), i == 0);
            assert_eq!(h.counter, i);
            assert_eq!(dev.decode(&mut buf[..n]), Ok(ping));
        }
    }

    #[test]
    fn test_replayed_hello_gets_distinct_nonces() {
        // One Hello accepted by two gateways (a replay): their first replies must not share
        // a nonce, and the device accepts exactly one of them on its connection.
        let mut dev = DeviceSession::new(&KEY, 42, 0);
        let mut hello = [0u8; 64];
        let n = hello_frame(&mut dev, &mut hello);
        let mut a = GatewaySession::accept_salted(&KEY, &hello[..n], [1; SALT_LEN]).unwrap();
        let mut b = GatewaySession::accept_salted(&KEY, &hello[..n], [2; SALT_LEN]).unwrap();
        let ack = Message::Ack(Ack {
            through_seq: 1,
            credit: 1,
            leader: None,
        });
        let mut fa = [0u8; 64];
        let mut fb = [0u8; 64];
        let na = a.encode(&ack, &mut fa).unwrap();
        let nb = b.encode(&ack, &mut fb).unwrap();
        // Same plaintext, different salt: different ciphertext and tag.
        assert_ne!(fa[20..na], fb[20..nb]);
        assert_eq!(dev.decode(&mut fa[..na]), Ok(ack));
        assert_eq!(dev.decode(&mut fb[..nb]), Err(FrameError::Replay));
    }

    #[test]
    fn test_reply_from_old_connection_rejected() {
        let mut dev = DeviceSession::new(&KEY, 42, 0);
        let mut buf = [0u8; 64];
        let n = hello_frame(&mut dev, &mut buf);
        let mut old = GatewaySession::accept_salted(&KEY, &buf[..n], [3; SALT_LEN]).unwrap();
        let ping = Message::Ping(Ping { nonce: 1 });
        let mut stale = [0u8; 64];
        let ns = old.encode(&ping, &mut stale).unwrap();
        // The device reconnects: new Hello, new counter; the old reply 0 no longer opens.
        let n = hello_frame(&mut dev, &mut buf);
        assert_eq!(GatewaySession::peek_hello(&buf[..n]).unwrap().boot, 42);
        assert_eq!(dev.decode(&mut stale[..ns]), Err(FrameError::BadAuth));
        let mut unsalted_old = GatewaySession::accept(&KEY, &buf[..n]).unwrap();
        let nu = unsalted_old.encode(&ping, &mut stale).unwrap();
        assert_eq!(dev.decode(&mut stale[..nu]), Ok(ping));
    }

    #[test]
    fn test_encode_rules() {
        let mut dev = DeviceSession::new(&KEY, 42, u32::MAX);
        let mut buf = [0u8; 64];
        let ping = Message::Ping(Ping { nonce: 1 });
        assert_eq!(dev.encode(&ping, &mut buf), Err(EncodeError::Invalid));
        let mut other_boot = dev.hello(1, 1, 1);
        other_boot.boot = 41;
        assert_eq!(
            dev.encode(&Message::Hello(other_boot), &mut buf),
            Err(EncodeError::Invalid)
        );
        let n = hello_frame(&mut dev, &mut buf);
        assert_eq!(
            dev.encode(&ping, &mut buf),
            Err(EncodeError::CounterExhausted)
        );
        let mut gw = GatewaySession::accept(&KEY, &buf[..n]).unwrap();
        assert_eq!(
            gw.encode(&Message::Hello(dev.hello(1, 1, 1)), &mut buf),
            Err(EncodeError::Invalid)
        );
        assert_eq!(gw.encode(&ping, &mut buf[..28]), Err(EncodeError::Full));
        assert_eq!(gw.encode(&ping, &mut buf[..29]), Ok(29));
    }
}
