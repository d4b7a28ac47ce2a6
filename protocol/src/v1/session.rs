//! Protocol 1 connections (kept for gateways in a migration period): frame counters,
//! sealing and decoding on each side.
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

use serde::{Deserialize, Serialize};

use super::security::{
    Direction, FrameAead, SALT_LEN, nonce, open_with, salted_nonce, seal_with, verify_hello,
};
use crate::error::{DecodeError, EncodeError, FrameError};
use crate::frame::{FLAG_SALTED, Frame, FrameHeader, Kind};
use crate::message::{Message, decode_struct, encode_struct};
use crate::security::KEY_LEN;
use crate::session::parse;
use crate::{HEADER_LEN, TAG_LEN};

/// The version byte of protocol 1 frames and Hellos.
pub const VERSION: u8 = 1;

/// The protocol 1 Hello: as protocol 2's, without the device nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Hello {
    pub device_id: u64,
    /// Differs on every boot of the device; part of every nonce.
    pub boot: u32,
    pub firmware_version: u32,
    pub protocol_version: u8,
    pub max_batch: u16,
}

/// A message body, or a protocol 1 Hello.
enum Body<'m, 'a> {
    Hello(&'m Hello),
    Message(&'m Message<'a>),
}

impl Body<'_, '_> {
    fn kind(&self) -> Kind {
        match self {
            Body::Hello(_) => Kind::Hello,
            Body::Message(m) => m.kind(),
        }
    }
}

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
    msg: Body<'_, '_>,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let prefix = if salt_prefix.is_some() { SALT_LEN } else { 0 };
    let body_len = prefix + write_body(&msg, prefix, out)?;
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
    Frame::new_unchecked(&mut out[..]).set_version(VERSION);
    let aad_len = if msg.kind() == Kind::Hello {
        HEADER_LEN + body_len
    } else {
        HEADER_LEN + prefix
    };
    seal_with(key, aead, aad_len, out)
}

/// Encodes the body at `out[HEADER_LEN + prefix..]`, leaving room for the tag; returns
/// its length.
fn write_body(msg: &Body<'_, '_>, prefix: usize, out: &mut [u8]) -> Result<usize, EncodeError> {
    match msg {
        Body::Message(m) => crate::session::write_body(m, prefix, out),
        Body::Hello(h) => {
            let start = HEADER_LEN + prefix;
            let end = out.len().checked_sub(TAG_LEN).ok_or(EncodeError::Full)?;
            encode_struct(*h, out.get_mut(start..end).ok_or(EncodeError::Full)?)
        }
    }
}

/// A protocol 1 frame's header.
fn parse_v1(frame: &[u8]) -> Result<FrameHeader, FrameError> {
    let (header, _) = parse(frame)?;
    if Frame::new_unchecked(frame).version() != VERSION {
        return Err(FrameError::UnsupportedVersion);
    }
    Ok(header)
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
            protocol_version: VERSION,
            max_batch,
        }
    }

    /// Encodes and seals a Hello, which starts a new connection.
    pub fn encode_hello(&mut self, hello: &Hello, out: &mut [u8]) -> Result<usize, EncodeError> {
        if hello.boot != self.boot || hello.protocol_version != VERSION {
            return Err(EncodeError::Invalid);
        }
        self.seal(Body::Hello(hello), out)
    }

    /// Encodes and seals `msg` (not a Hello) into `out`, returning the frame length; before
    /// the first Hello it is [`EncodeError::Invalid`].
    pub fn encode(&mut self, msg: &Message<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
        if msg.kind() == Kind::Hello || self.hello_counter.is_none() {
            return Err(EncodeError::Invalid);
        }
        self.seal(Body::Message(msg), out)
    }

    fn seal(&mut self, body: Body<'_, '_>, out: &mut [u8]) -> Result<usize, EncodeError> {
        let counter =
            u32::try_from(self.next_counter).map_err(|_| EncodeError::CounterExhausted)?;
        let is_hello = body.kind() == Kind::Hello;
        let aead = FrameAead::ChaCha(nonce(
            self.boot,
            Direction::DeviceToGateway,
            u64::from(counter),
        ));
        let len = seal_message(&self.key, &aead, counter, None, body, out)?;
        if is_hello {
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
    /// An unsealed Error frame is returned as `Message::Error` without authentication (the
    /// protocol 1 rule that protocol 2 removed).
    pub fn decode<'b>(&mut self, frame: &'b mut [u8]) -> Result<Message<'b>, FrameError> {
        let header = parse_v1(frame)?;
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
        let header = parse_v1(frame)?;
        if header.flags != 0 {
            return Err(FrameError::Malformed);
        }
        if header.kind != Kind::Hello {
            return Err(FrameError::Unexpected);
        }
        let (_, body) = parse(frame)?;
        decode_struct::<Hello>(body).map_err(|e: DecodeError| FrameError::from(e))
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
        if hello.protocol_version != VERSION {
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
        let header = parse_v1(frame)?;
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
        let len = seal_message(
            &self.key,
            &aead,
            index,
            salt_prefix,
            Body::Message(msg),
            out,
        )?;
        self.next_reply += 1;
        Ok(len)
    }
}
