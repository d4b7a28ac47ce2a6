//! Protocol 2 connections: the handshake that derives the keys, frame counters, sealing and
//! decoding on each side (SPEC.md §5 and §6).
//!
//! ```text
//! device                                              gateway
//! Hello {.., nonce}  counter 0, tag under hello key  ──▶ peek_hello → key → accept(psk, frame, challenge)
//!                    ◀── reply 0: challenge ‖ sealed(Welcome | Redirect | Error) under g2d
//! Batch, Ping, ...   counter 1, 2, ... under d2g      ──▶
//!                    ◀── replies 1, 2, ... under g2d
//! ```
//!
//! Frames are authenticated before counters are checked, so a forged frame is always
//! [`FrameError::BadAuth`] and only an authentic old frame is `Replay`. Keys are new on every
//! connection, so a frame recorded on one connection never opens on another.

use core::fmt;

use crate::error::{EncodeError, FrameError};
use crate::frame::{FLAG_UNSEALED, Frame, FrameHeader, Kind};
use crate::message::{Error, ErrorCode, Hello, Message};
use crate::security::{
    BOOT_NONCE_LEN, CHALLENGE_LEN, DEVICE_NONCE_LEN, KEY_LEN, TrafficKeys, connection_key,
    hello_key, open, root_key, seal, traffic_keys, verify,
};
use crate::{HEADER_LEN, MAX_BODY, PROTOCOL_VERSION, TAG_LEN};

/// The most connections one [`DeviceSession`] opens (its device nonces end in a u32).
pub const MAX_CONNECTIONS: u64 = 1 << 32;

/// Writes header, optional clear prefix and body into `out` and seals them with `key` under
/// the nonce of `counter`; returns the frame length. The prefix is associated data; a Hello's
/// whole body is.
fn seal_message(
    key: &[u8; KEY_LEN],
    counter: u32,
    prefix: Option<&[u8; CHALLENGE_LEN]>,
    msg: &Message<'_>,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let plen = if prefix.is_some() { CHALLENGE_LEN } else { 0 };
    let body_len = plen + write_body(msg, plen, out)?;
    if let Some(p) = prefix {
        out[HEADER_LEN..HEADER_LEN + CHALLENGE_LEN].copy_from_slice(p);
    }
    FrameHeader {
        kind: msg.kind(),
        length: (body_len + TAG_LEN) as u16,
        flags: 0,
        counter,
    }
    .emit(&mut Frame::new_unchecked(&mut out[..]));
    let aad_len = if msg.kind() == Kind::Hello {
        HEADER_LEN + body_len
    } else {
        HEADER_LEN + plen
    };
    seal(key, counter, aad_len, out)
}

/// Encodes the message at `out[HEADER_LEN + prefix..]`, leaving room for the tag; returns
/// its length.
pub(crate) fn write_body(
    msg: &Message<'_>,
    prefix: usize,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
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
pub(crate) fn parse(frame: &[u8]) -> Result<(FrameHeader, &[u8]), FrameError> {
    let view = Frame::new_checked(frame)?;
    let header = FrameHeader::parse(&view)?;
    Ok((header, &frame[HEADER_LEN..HEADER_LEN + header.body_len()]))
}

/// A protocol 2 frame's header: version 2 and no flag (an unsealed Error is
/// [`FrameError::Unsealed`]).
fn parse_v2(frame: &[u8]) -> Result<FrameHeader, FrameError> {
    let (header, _) = parse(frame)?;
    if Frame::new_unchecked(frame).version() != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion);
    }
    if header.is_unsealed() && header.kind == Kind::Error {
        return Err(FrameError::Unsealed);
    }
    if header.flags != 0 {
        return Err(FrameError::Malformed);
    }
    Ok(header)
}

/// Encodes an Error frame in the clear (flag [`FLAG_UNSEALED`], zero tag): what a gateway
/// sends when it has no session to seal with (unknown device, a Hello that does not
/// authenticate or parse). A device never acts on its code: it closes the connection and
/// backs off briefly, as after a dropped connection.
pub fn encode_unsealed_error(code: ErrorCode, out: &mut [u8]) -> Result<usize, EncodeError> {
    encode_unsealed_error_version(code, PROTOCOL_VERSION, out)
}

/// [`encode_unsealed_error`] with another header version (a gateway answers a protocol 1
/// device in protocol 1).
pub fn encode_unsealed_error_version(
    code: ErrorCode,
    version: u8,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let msg = Message::Error(Error { code });
    let body_len = write_body(&msg, 0, out)?;
    let len = HEADER_LEN + body_len + TAG_LEN;
    let mut frame = Frame::new_unchecked(&mut out[..]);
    FrameHeader {
        kind: Kind::Error,
        length: (body_len + TAG_LEN) as u16,
        flags: FLAG_UNSEALED,
        counter: 0,
    }
    .emit(&mut frame);
    frame.set_version(version);
    out[HEADER_LEN + body_len..len].fill(0);
    Ok(len)
}

/// The code of an unsealed Error frame, for logging only (anyone on the path can forge it).
pub fn unsealed_error_code(frame: &[u8]) -> Option<ErrorCode> {
    let (header, body) = parse(frame).ok()?;
    if !header.is_unsealed() {
        return None;
    }
    match Message::decode_body(Kind::Error, body) {
        Ok(Message::Error(e)) => Some(e.code),
        _ => None,
    }
}

/// What a device session holds for the current connection.
#[derive(Clone)]
enum Link {
    /// No Hello sent yet.
    None,
    /// Hello sent; the connection key waits for the gateway's challenge.
    Hello([u8; KEY_LEN]),
    /// Reply 0 authenticated: traffic keys.
    Open(TrafficKeys),
}

/// The device side of protocol 2 for one boot: starts connections with a Hello, seals device
/// frames and opens gateway frames.
///
/// Keep one `DeviceSession` for the whole boot. Every connection's Hello carries a fresh
/// device nonce: the session's `boot_nonce` followed by the connection number (0, 1, 2, ...),
/// so `boot_nonce` must never repeat under one key (SPEC.md §5.5 says where boards take it
/// from). The session keeps the root key derived from the PSK, not the PSK.
#[derive(Clone)]
pub struct DeviceSession {
    root: [u8; KEY_LEN],
    boot: u32,
    boot_nonce: [u8; BOOT_NONCE_LEN],
    /// Hellos encoded so far (≤ [`MAX_CONNECTIONS`]).
    connections: u64,
    link: Link,
    /// Counter of the next device frame on this connection (the Hello is 0).
    next_counter: u64,
    /// Counter of the next gateway frame expected on this connection.
    next_reply: u64,
}

impl fmt::Debug for DeviceSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSession")
            .field("boot", &self.boot)
            .field("connections", &self.connections)
            .field("next_counter", &self.next_counter)
            .field("next_reply", &self.next_reply)
            .finish_non_exhaustive()
    }
}

impl DeviceSession {
    /// A session for one boot: `psk` is the device's key, `boot` its boot number (carried in
    /// the Hello for the records' time base; it need not be unique), `boot_nonce` 12 bytes
    /// that never repeat under this key (the security of the device's side rests on it).
    pub fn new(psk: &[u8; KEY_LEN], boot: u32, boot_nonce: [u8; BOOT_NONCE_LEN]) -> DeviceSession {
        DeviceSession {
            root: root_key(psk),
            boot,
            boot_nonce,
            connections: 0,
            link: Link::None,
            next_counter: 0,
            next_reply: 0,
        }
    }

    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// Connections started (Hellos encoded) in this session.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// The device nonce the next Hello carries: `boot_nonce` ‖ connection number u32 LE.
    pub fn next_device_nonce(&self) -> [u8; DEVICE_NONCE_LEN] {
        let mut n = [0u8; DEVICE_NONCE_LEN];
        n[..BOOT_NONCE_LEN].copy_from_slice(&self.boot_nonce);
        n[BOOT_NONCE_LEN..].copy_from_slice(&(self.connections as u32).to_le_bytes());
        n
    }

    /// The Hello that starts the next connection.
    pub fn hello(&self, device_id: u64, firmware_version: u32, max_batch: u16) -> Hello {
        Hello {
            device_id,
            boot: self.boot,
            firmware_version,
            protocol_version: PROTOCOL_VERSION,
            max_batch,
            nonce: self.next_device_nonce(),
        }
    }

    /// True once the gateway's first frame on this connection was authenticated: device
    /// frames other than Hello can be sealed.
    pub fn is_open(&self) -> bool {
        matches!(self.link, Link::Open(_))
    }

    /// Encodes and seals `msg` into `out`, returning the frame length. A Hello (made by
    /// [`DeviceSession::hello`]) starts a new connection; any other message before the
    /// gateway's first frame of the connection is [`EncodeError::Invalid`].
    pub fn encode(&mut self, msg: &Message<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
        if let Message::Hello(h) = msg {
            if self.connections >= MAX_CONNECTIONS {
                return Err(EncodeError::CounterExhausted);
            }
            if h.boot != self.boot
                || h.nonce != self.next_device_nonce()
                || h.protocol_version != PROTOCOL_VERSION
            {
                return Err(EncodeError::Invalid);
            }
            let conn = connection_key(&self.root, &h.nonce);
            let len = seal_message(&hello_key(&conn), 0, None, msg, out)?;
            self.connections += 1;
            self.link = Link::Hello(conn);
            self.next_counter = 1;
            self.next_reply = 0;
            return Ok(len);
        }
        let Link::Open(keys) = &self.link else {
            return Err(EncodeError::Invalid);
        };
        let counter =
            u32::try_from(self.next_counter).map_err(|_| EncodeError::CounterExhausted)?;
        let len = seal_message(&keys.device_to_gateway, counter, None, msg, out)?;
        self.next_counter += 1;
        Ok(len)
    }

    /// Opens a gateway frame in place and decodes it, borrowing from `frame`. After an error
    /// the contents of `frame` are unspecified (it may be decrypted already), and the session
    /// is unchanged: the caller closes the connection.
    ///
    /// An unsealed Error frame is [`FrameError::Unsealed`]: nothing to act on but closing.
    pub fn decode<'b>(&mut self, frame: &'b mut [u8]) -> Result<Message<'b>, FrameError> {
        let header = parse_v2(frame)?;
        let counter = header.counter;
        let mut opened = None;
        let prefix = if counter == 0 { CHALLENGE_LEN } else { 0 };
        if header.body_len() < prefix {
            return Err(FrameError::Malformed);
        }
        let key = match &self.link {
            Link::None => return Err(FrameError::Unexpected),
            Link::Hello(conn) => {
                if counter != 0 {
                    // No key for it yet: only reply 0 can open.
                    return Err(FrameError::BadAuth);
                }
                let mut challenge = [0u8; CHALLENGE_LEN];
                challenge.copy_from_slice(&frame[HEADER_LEN..HEADER_LEN + CHALLENGE_LEN]);
                let keys = traffic_keys(conn, &challenge);
                let key = keys.gateway_to_device;
                opened = Some(keys);
                key
            }
            Link::Open(keys) => keys.gateway_to_device,
        };
        open(&key, counter, HEADER_LEN + prefix, frame)?;
        let expected = self.next_reply;
        if u64::from(counter) < expected {
            return Err(FrameError::Replay);
        }
        if u64::from(counter) > expected {
            return Err(FrameError::Reordered);
        }
        if header.kind == Kind::Hello {
            return Err(FrameError::Unexpected);
        }
        let frame: &'b [u8] = frame;
        let (_, body) = parse(frame)?;
        let msg = Message::decode_body(header.kind, &body[prefix..])?;
        if let Some(keys) = opened {
            self.link = Link::Open(keys);
        }
        self.next_reply += 1;
        Ok(msg)
    }
}

/// The gateway side of one protocol 2 connection, created from the connection's Hello.
///
/// ```text
/// let hello = GatewaySession::peek_hello(&frame)?;      // unauthenticated: find the key
/// let key = registry.key(hello.device_id)?;             // else send UnknownDevice unsealed
/// let mut session = GatewaySession::accept(&key, &frame, rand::random())?;
/// ```
#[derive(Clone)]
pub struct GatewaySession {
    keys: TrafficKeys,
    hello: Hello,
    challenge: [u8; CHALLENGE_LEN],
    last_counter: u32,
    next_reply: u64,
}

impl fmt::Debug for GatewaySession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewaySession")
            .field("hello", &self.hello)
            .field("last_counter", &self.last_counter)
            .field("next_reply", &self.next_reply)
            .finish_non_exhaustive()
    }
}

impl GatewaySession {
    /// Reads the Hello of a connection's first frame WITHOUT authenticating it, so the
    /// gateway can look up the device's key. Trust nothing in it until [`accept`] succeeds.
    /// A frame of another header version is [`FrameError::UnsupportedVersion`].
    ///
    /// [`accept`]: GatewaySession::accept
    pub fn peek_hello(frame: &[u8]) -> Result<Hello, FrameError> {
        let (header, body) = parse(frame)?;
        if Frame::new_unchecked(frame).version() != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion);
        }
        if header.flags != 0 {
            return Err(FrameError::Malformed);
        }
        if header.kind != Kind::Hello {
            return Err(FrameError::Unexpected);
        }
        if header.counter != 0 {
            return Err(FrameError::Malformed);
        }
        match Message::decode_body(Kind::Hello, body)? {
            Message::Hello(h) => Ok(h),
            _ => Err(FrameError::Malformed),
        }
    }

    /// Authenticates the Hello frame with the device's PSK and starts the connection with
    /// `challenge`, which must be fresh random bytes for every connection (it is what makes
    /// a recorded connection useless). A Hello with another protocol version is
    /// [`FrameError::UnsupportedVersion`].
    pub fn accept(
        psk: &[u8; KEY_LEN],
        frame: &[u8],
        challenge: [u8; CHALLENGE_LEN],
    ) -> Result<GatewaySession, FrameError> {
        let hello = Self::peek_hello(frame)?;
        let conn = connection_key(&root_key(psk), &hello.nonce);
        verify(&hello_key(&conn), 0, frame)?;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion);
        }
        Ok(GatewaySession {
            keys: traffic_keys(&conn, &challenge),
            hello,
            challenge,
            last_counter: 0,
            next_reply: 0,
        })
    }

    /// The authenticated Hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Opens a device frame in place and decodes it, borrowing from `frame`. After an error
    /// the contents of `frame` are unspecified (it may be decrypted already).
    pub fn decode<'b>(&mut self, frame: &'b mut [u8]) -> Result<Message<'b>, FrameError> {
        let header = match parse_v2(frame) {
            Err(FrameError::Unsealed) => return Err(FrameError::Malformed),
            other => other?,
        };
        let aad_len = if header.kind == Kind::Hello {
            HEADER_LEN + header.body_len()
        } else {
            HEADER_LEN
        };
        open(&self.keys.device_to_gateway, header.counter, aad_len, frame)?;
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
    /// The first frame of a connection carries the challenge. After 2^32 replies the
    /// connection must be closed ([`EncodeError::CounterExhausted`]).
    pub fn encode(&mut self, msg: &Message<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
        if msg.kind() == Kind::Hello {
            return Err(EncodeError::Invalid);
        }
        let index = u32::try_from(self.next_reply).map_err(|_| EncodeError::CounterExhausted)?;
        let prefix = (index == 0).then_some(&self.challenge);
        let len = seal_message(&self.keys.gateway_to_device, index, prefix, msg, out)?;
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

    fn connect_with(dev: &mut DeviceSession, challenge: [u8; CHALLENGE_LEN]) -> GatewaySession {
        let mut buf = [0u8; MAX_FRAME];
        let hello = dev.hello(9, 3, 50);
        let n = dev.encode(&Message::Hello(hello), &mut buf).unwrap();
        assert_eq!(GatewaySession::peek_hello(&buf[..n]), Ok(hello));
        let gw = GatewaySession::accept(&KEY, &buf[..n], challenge).unwrap();
        assert_eq!(gw.hello(), &hello);
        gw
    }

    fn connect() -> (DeviceSession, GatewaySession) {
        let mut dev = DeviceSession::new(&KEY, 42, [1; BOOT_NONCE_LEN]);
        let gw = connect_with(&mut dev, [2; CHALLENGE_LEN]);
        (dev, gw)
    }

    fn welcome(dev: &mut DeviceSession, gw: &mut GatewaySession) {
        let mut buf = [0u8; 64];
        let w = Message::Welcome(Welcome {
            high_water: 0,
            leader: None,
            credit: 1,
        });
        let n = gw.encode(&w, &mut buf).unwrap();
        assert_eq!(dev.decode(&mut buf[..n]), Ok(w));
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
        assert!(!dev.is_open());
        let ping = Message::Ping(Ping { nonce: 1 });
        assert_eq!(dev.encode(&ping, &mut buf), Err(EncodeError::Invalid));
        let n = gw.encode(&Message::Welcome(welcome), &mut buf).unwrap();
        assert_eq!(dev.decode(&mut buf[..n]), Ok(Message::Welcome(welcome)));
        assert!(dev.is_open());

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
        welcome(&mut dev, &mut gw);
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
    fn test_unsealed_error_only_closes() {
        let (mut dev, mut gw) = connect();
        let mut buf = [0u8; 64];
        let n = encode_unsealed_error(ErrorCode::UnknownDevice, &mut buf).unwrap();
        assert_eq!(dev.decode(&mut buf[..n]), Err(FrameError::Unsealed));
        assert_eq!(
            unsealed_error_code(&buf[..n]),
            Some(ErrorCode::UnknownDevice)
        );
        // The session is unchanged: the real reply 0 still opens.
        welcome(&mut dev, &mut gw);
        // A gateway never accepts an unsealed frame.
        assert_eq!(gw.decode(&mut buf[..n]), Err(FrameError::Malformed));
    }

    #[test]
    fn test_wrong_key() {
        let mut dev = DeviceSession::new(&KEY, 1, [0; BOOT_NONCE_LEN]);
        let mut buf = [0u8; 64];
        let n = dev
            .encode(&Message::Hello(dev.hello(1, 1, 1)), &mut buf)
            .unwrap();
        assert_eq!(
            GatewaySession::accept(&[8; KEY_LEN], &buf[..n], [0; CHALLENGE_LEN]).unwrap_err(),
            FrameError::BadAuth
        );
    }

    #[test]
    fn test_recorded_connection_replayed_to_gateway() {
        // The device's frames of one connection, replayed to a gateway that answers the
        // same Hello with another challenge: the Hello authenticates, nothing else does.
        let mut dev = DeviceSession::new(&KEY, 42, [5; BOOT_NONCE_LEN]);
        let mut hello = [0u8; 64];
        let hn = dev
            .encode(&Message::Hello(dev.hello(9, 3, 50)), &mut hello)
            .unwrap();
        let mut gw = GatewaySession::accept(&KEY, &hello[..hn], [1; CHALLENGE_LEN]).unwrap();
        welcome(&mut dev, &mut gw);
        let mut ping = [0u8; 64];
        let pn = dev
            .encode(&Message::Ping(Ping { nonce: 3 }), &mut ping)
            .unwrap();
        let mut replayed = GatewaySession::accept(&KEY, &hello[..hn], [9; CHALLENGE_LEN]).unwrap();
        assert_eq!(
            replayed.decode(&mut { ping }[..pn]),
            Err(FrameError::BadAuth)
        );
        assert!(gw.decode(&mut ping[..pn]).is_ok());
    }

    #[test]
    fn test_recorded_replies_replayed_to_device() {
        // Replies recorded on one connection never open on the next one, of this boot or
        // of a later boot with the same boot number.
        let mut dev = DeviceSession::new(&KEY, 42, [5; BOOT_NONCE_LEN]);
        let mut gw = connect_with(&mut dev, [1; CHALLENGE_LEN]);
        let mut rec = [[0u8; 64]; 2];
        let ack = Message::Ack(Ack {
            through_seq: 99,
            credit: 1,
            leader: None,
        });
        let n0 = gw
            .encode(
                &Message::Welcome(Welcome {
                    high_water: 99,
                    leader: None,
                    credit: 1,
                }),
                &mut rec[0],
            )
            .unwrap();
        let n1 = gw.encode(&ack, &mut rec[1]).unwrap();
        let mut hello = [0u8; 64];
        dev.encode(&Message::Hello(dev.hello(9, 3, 50)), &mut hello)
            .unwrap();
        assert_eq!(dev.decode(&mut { rec[0] }[..n0]), Err(FrameError::BadAuth));
        assert_eq!(dev.decode(&mut { rec[1] }[..n1]), Err(FrameError::BadAuth));
        let mut rebooted = DeviceSession::new(&KEY, 42, [6; BOOT_NONCE_LEN]);
        rebooted
            .encode(&Message::Hello(rebooted.hello(9, 3, 50)), &mut hello)
            .unwrap();
        assert_eq!(
            rebooted.decode(&mut { rec[0] }[..n0]),
            Err(FrameError::BadAuth)
        );
        assert!(!rebooted.is_open());
    }

    #[test]
    fn test_same_boot_number_different_keys() {
        let mut a = DeviceSession::new(&KEY, 42, [5; BOOT_NONCE_LEN]);
        let mut b = DeviceSession::new(&KEY, 42, [6; BOOT_NONCE_LEN]);
        let mut fa = [0u8; 64];
        let mut fb = [0u8; 64];
        let na = a
            .encode(&Message::Hello(a.hello(9, 3, 50)), &mut fa)
            .unwrap();
        let nb = b
            .encode(&Message::Hello(b.hello(9, 3, 50)), &mut fb)
            .unwrap();
        assert_ne!(fa[na - 16..na], fb[nb - 16..nb]);
        let ga = GatewaySession::accept(&KEY, &fa[..na], [0; CHALLENGE_LEN]).unwrap();
        let gb = GatewaySession::accept(&KEY, &fb[..nb], [0; CHALLENGE_LEN]).unwrap();
        assert_ne!(ga.keys, gb.keys);
    }

    #[test]
    fn test_encode_rules() {
        let mut dev = DeviceSession::new(&KEY, 42, [0; BOOT_NONCE_LEN]);
        let mut buf = [0u8; 64];
        let ping = Message::Ping(Ping { nonce: 1 });
        assert_eq!(dev.encode(&ping, &mut buf), Err(EncodeError::Invalid));
        let mut other_boot = dev.hello(1, 1, 1);
        other_boot.boot = 41;
        assert_eq!(
            dev.encode(&Message::Hello(other_boot), &mut buf),
            Err(EncodeError::Invalid)
        );
        let mut stale = dev.hello(1, 1, 1);
        stale.nonce[15] = 9;
        assert_eq!(
            dev.encode(&Message::Hello(stale), &mut buf),
            Err(EncodeError::Invalid)
        );
        dev.connections = MAX_CONNECTIONS;
        assert_eq!(
            dev.encode(&Message::Hello(dev.hello(1, 1, 1)), &mut buf),
            Err(EncodeError::CounterExhausted)
        );
        let (mut dev, mut gw) = connect();
        welcome(&mut dev, &mut gw);
        dev.next_counter = u64::from(u32::MAX) + 1;
        assert_eq!(
            dev.encode(&ping, &mut buf),
            Err(EncodeError::CounterExhausted)
        );
        assert_eq!(
            gw.encode(&Message::Hello(dev.hello(1, 1, 1)), &mut buf),
            Err(EncodeError::Invalid)
        );
        assert_eq!(gw.encode(&ping, &mut buf[..28]), Err(EncodeError::Full));
        assert_eq!(gw.encode(&ping, &mut buf[..29]), Ok(29));
        gw.next_reply = u64::from(u32::MAX) + 1;
        assert_eq!(
            gw.encode(&ping, &mut buf),
            Err(EncodeError::CounterExhausted)
        );
    }
}
