//! Message bodies. Every body is the postcard encoding of its struct, field by field in the
//! order declared here; the Batch body is described in [`crate::batch`].

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::batch::BatchView;
use crate::error::{DecodeError, EncodeError};
use crate::frame::Kind;

/// An IPv4 gateway address, as sent in leader hints and redirects.
///
/// A gateway that listens on a loopback or unspecified address sends that address;
/// devices resolve it with [`GatewayAddr::resolve`] against the address they are connected to
/// (under QEMU's user network the host's 127.0.0.1 is 10.0.2.2 to the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GatewayAddr {
    pub ip: [u8; 4],
    pub port: u16,
}

impl GatewayAddr {
    pub const fn new(ip: [u8; 4], port: u16) -> GatewayAddr {
        GatewayAddr { ip, port }
    }

    /// True for 127.0.0.0/8 and 0.0.0.0: addresses that only make sense relative to the
    /// connection they came over.
    pub fn is_local(&self) -> bool {
        self.ip[0] == 127 || self.ip == [0; 4]
    }

    /// This address, with a loopback/unspecified ip replaced by `connected_ip`, the ip of the
    /// gateway that sent it.
    pub fn resolve(self, connected_ip: [u8; 4]) -> GatewayAddr {
        if self.is_local() {
            GatewayAddr {
                ip: connected_ip,
                port: self.port,
            }
        } else {
            self
        }
    }
}

impl From<core::net::SocketAddrV4> for GatewayAddr {
    fn from(a: core::net::SocketAddrV4) -> Self {
        GatewayAddr {
            ip: a.ip().octets(),
            port: a.port(),
        }
    }
}

impl From<GatewayAddr> for core::net::SocketAddrV4 {
    fn from(a: GatewayAddr) -> Self {
        core::net::SocketAddrV4::new(a.ip.into(), a.port)
    }
}

impl fmt::Display for GatewayAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.ip;
        write!(f, "{a}.{b}.{c}.{d}:{}", self.port)
    }
}

/// Error codes carried by [`Error`]. One byte on the wire; codes this crate does not know
/// decode to [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ErrorCode {
    /// The device id is not registered on the cluster.
    UnknownDevice,
    /// A frame did not authenticate.
    BadAuth,
    /// A frame counter went backwards or skipped.
    Replay,
    /// A frame exceeded MAX_FRAME.
    TooLarge,
    /// A frame or body broke the spec.
    Malformed,
    /// The gateway does not speak the device's protocol version.
    UnsupportedVersion,
    /// This gateway cannot accept writes now and knows no leader; retry later or elsewhere.
    NotLeader,
    /// The gateway is overloaded; back off and retry.
    Overloaded,
    /// A record does not fit the stream's table.
    SchemaMismatch,
    /// A batch's first seq is above high_water + 1: records are missing before it.
    SeqGap,
    /// The gateway failed; retry later.
    Internal,
    /// A code this version does not know.
    Unknown(u8),
}

impl ErrorCode {
    pub const fn from_u8(b: u8) -> ErrorCode {
        match b {
            1 => ErrorCode::UnknownDevice,
            2 => ErrorCode::BadAuth,
            3 => ErrorCode::Replay,
            4 => ErrorCode::TooLarge,
            5 => ErrorCode::Malformed,
            6 => ErrorCode::UnsupportedVersion,
            7 => ErrorCode::NotLeader,
            8 => ErrorCode::Overloaded,
            9 => ErrorCode::SchemaMismatch,
            10 => ErrorCode::SeqGap,
            11 => ErrorCode::Internal,
            other => ErrorCode::Unknown(other),
        }
    }

    pub const fn to_u8(self) -> u8 {
        match self {
            ErrorCode::UnknownDevice => 1,
            ErrorCode::BadAuth => 2,
            ErrorCode::Replay => 3,
            ErrorCode::TooLarge => 4,
            ErrorCode::Malformed => 5,
            ErrorCode::UnsupportedVersion => 6,
            ErrorCode::NotLeader => 7,
            ErrorCode::Overloaded => 8,
            ErrorCode::SchemaMismatch => 9,
            ErrorCode::SeqGap => 10,
            ErrorCode::Internal => 11,
            ErrorCode::Unknown(b) => b,
        }
    }
}

impl From<u8> for ErrorCode {
    fn from(b: u8) -> Self {
        ErrorCode::from_u8(b)
    }
}

impl From<ErrorCode> for u8 {
    fn from(c: ErrorCode) -> u8 {
        c.to_u8()
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.to_u8())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u8::deserialize(d).map(ErrorCode::from_u8)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::UnknownDevice => f.write_str("unknown device"),
            ErrorCode::BadAuth => f.write_str("bad auth"),
            ErrorCode::Replay => f.write_str("replay"),
            ErrorCode::TooLarge => f.write_str("too large"),
            ErrorCode::Malformed => f.write_str("malformed"),
            ErrorCode::UnsupportedVersion => f.write_str("unsupported version"),
            ErrorCode::NotLeader => f.write_str("not leader"),
            ErrorCode::Overloaded => f.write_str("overloaded"),
            ErrorCode::SchemaMismatch => f.write_str("schema mismatch"),
            ErrorCode::SeqGap => f.write_str("seq gap"),
            ErrorCode::Internal => f.write_str("internal error"),
            ErrorCode::Unknown(b) => write!(f, "unknown error code {b}"),
        }
    }
}

/// Device → gateway, first frame of every connection. Authenticated, not encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Hello {
    pub device_id: u64,
    /// The device's boot number: the time base of its records' uptimes (SPEC.md §9).
    pub boot: u32,
    pub firmware_version: u32,
    pub protocol_version: u8,
    /// The most records the device puts in one batch.
    pub max_batch: u16,
    /// The device's nonce for this connection: never repeats under the device's key
    /// (SPEC.md §5.2); the connection's keys are derived from it.
    pub nonce: [u8; 16],
}

/// Gateway → device, the answer to Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Welcome {
    /// The highest seq committed for this device (0: none yet; seqs start at 1).
    pub high_water: u64,
    /// The leader, when the gateway knows it and is not it.
    pub leader: Option<GatewayAddr>,
    /// How many records past `high_water` the device may send before the next Ack.
    pub credit: u16,
}

/// Gateway → device: every record up to `through_seq` is committed (cumulative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ack {
    pub through_seq: u64,
    /// How many records past `through_seq` the device may send before the next Ack.
    pub credit: u16,
    pub leader: Option<GatewayAddr>,
}

/// Gateway → device: reconnect to `addr` (the leader, or a less loaded gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Redirect {
    pub addr: GatewayAddr,
}

/// Either side: the connection is about to be closed, or a batch was refused, because of `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Error {
    pub code: ErrorCode,
}

/// Either side: please answer with a Pong carrying the same nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ping {
    pub nonce: u32,
}

/// The answer to a Ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Pong {
    pub nonce: u32,
}

/// Any message, borrowing from the frame it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Message<'a> {
    Hello(Hello),
    Welcome(Welcome),
    Batch(BatchView<'a>),
    Ack(Ack),
    Redirect(Redirect),
    Error(Error),
    Ping(Ping),
    Pong(Pong),
}

pub(crate) fn encode_struct<T: Serialize>(value: &T, out: &mut [u8]) -> Result<usize, EncodeError> {
    postcard::to_slice(value, out)
        .map(|used| used.len())
        .map_err(|_| EncodeError::Full)
}

pub(crate) fn decode_struct<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(value)
}

impl<'a> Message<'a> {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Batch(_) => Kind::Batch,
            Message::Ack(_) => Kind::Ack,
            Message::Redirect(_) => Kind::Redirect,
            Message::Error(_) => Kind::Error,
            Message::Ping(_) => Kind::Ping,
            Message::Pong(_) => Kind::Pong,
        }
    }

    /// Writes the body (clear text) into `out`, returning its length.
    pub fn encode_body(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        match self {
            Message::Hello(m) => encode_struct(m, out),
            Message::Welcome(m) => encode_struct(m, out),
            Message::Ack(m) => encode_struct(m, out),
            Message::Redirect(m) => encode_struct(m, out),
            Message::Error(m) => encode_struct(m, out),
            Message::Ping(m) => encode_struct(m, out),
            Message::Pong(m) => encode_struct(m, out),
            Message::Batch(b) => {
                let bytes = b.as_bytes();
                out.get_mut(..bytes.len())
                    .ok_or(EncodeError::Full)?
                    .copy_from_slice(bytes);
                Ok(bytes.len())
            }
        }
    }

    /// Decodes a clear-text body of the given kind. Trailing bytes are an error.
    pub fn decode_body(kind: Kind, body: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        Ok(match kind {
            Kind::Hello => Message::Hello(decode_struct(body)?),
            Kind::Welcome => Message::Welcome(decode_struct(body)?),
            Kind::Batch => Message::Batch(BatchView::parse(body)?),
            Kind::Ack => Message::Ack(decode_struct(body)?),
            Kind::Redirect => Message::Redirect(decode_struct(body)?),
            Kind::Error => Message::Error(decode_struct(body)?),
            Kind::Ping => Message::Ping(decode_struct(body)?),
            Kind::Pong => Message::Pong(decode_struct(body)?),
        })
    }
}

fn fmt_leader(f: &mut fmt::Formatter<'_>, leader: &Option<GatewayAddr>) -> fmt::Result {
    match leader {
        Some(a) => write!(f, " leader={a}"),
        None => Ok(()),
    }
}

impl fmt::Display for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Hello device={} boot={} fw={} proto={} max_batch={}",
            self.device_id, self.boot, self.firmware_version, self.protocol_version, self.max_batch
        )
    }
}

impl fmt::Display for Welcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Welcome high_water={} credit={}",
            self.high_water, self.credit
        )?;
        fmt_leader(f, &self.leader)
    }
}

impl fmt::Display for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ack through={} credit={}", self.through_seq, self.credit)?;
        fmt_leader(f, &self.leader)
    }
}

impl fmt::Display for Redirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redirect {}", self.addr)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error {}", self.code)
    }
}

impl fmt::Display for Ping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ping {}", self.nonce)
    }
}

impl fmt::Display for Pong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pong {}", self.nonce)
    }
}

impl fmt::Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Hello(m) => m.fmt(f),
            Message::Welcome(m) => m.fmt(f),
            Message::Batch(m) => m.fmt(f),
            Message::Ack(m) => m.fmt(f),
            Message::Redirect(m) => m.fmt(f),
            Message::Error(m) => m.fmt(f),
            Message::Ping(m) => m.fmt(f),
            Message::Pong(m) => m.fmt(f),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    static HELLO_BYTES: [u8; 24] = [
        0x82, 0x02, 0x07, 0x82, 0x80, 0x04, 0x02, 0x32, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
        14, 15, 16,
    ];

    fn hello() -> Hello {
        Hello {
            device_id: 258,
            boot: 7,
            firmware_version: 0x0001_0002,
            protocol_version: 2,
            max_batch: 50,
            nonce: core::array::from_fn(|i| i as u8 + 1),
        }
    }

    #[test]
    fn test_parse() {
        assert_eq!(
            Message::decode_body(Kind::Hello, &HELLO_BYTES),
            Ok(Message::Hello(hello()))
        );
        assert_eq!(
            Message::decode_body(Kind::Hello, &HELLO_BYTES[..23]),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn test_emit() {
        let mut buf = [0u8; 32];
        let n = Message::Hello(hello()).encode_body(&mut buf).unwrap();
        assert_eq!(&buf[..n], &HELLO_BYTES);
        assert_eq!(
            Message::Hello(hello()).encode_body(&mut buf[..23]),
            Err(EncodeError::Full)
        );
    }

    #[test]
    fn test_error_code_every_byte() {
        for b in 0..=u8::MAX {
            let code = ErrorCode::from_u8(b);
            assert_eq!(code.to_u8(), b);
            assert_eq!(
                matches!(code, ErrorCode::Unknown(_)),
                !(1..=11).contains(&b)
            );
        }
    }

    #[test]
    fn test_gateway_addr_resolve() {
        let peer = [10, 0, 2, 2];
        assert_eq!(
            GatewayAddr::new([127, 0, 0, 1], 4013).resolve(peer),
            GatewayAddr::new(peer, 4013)
        );
        assert_eq!(
            GatewayAddr::new([0, 0, 0, 0], 4013).resolve(peer),
            GatewayAddr::new(peer, 4013)
        );
        let lan = GatewayAddr::new([192, 168, 1, 5], 4003);
        assert_eq!(lan.resolve(peer), lan);
        let sock: core::net::SocketAddrV4 = lan.into();
        assert_eq!(GatewayAddr::from(sock), lan);
    }

    #[test]
    fn test_display() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(
            Message::Hello(hello()).to_string(),
            "Hello device=258 boot=7 fw=65538 proto=2 max_batch=50"
        );
        let w = Welcome {
            high_water: 3,
            leader: Some(GatewayAddr::new([10, 0, 0, 1], 4003)),
            credit: 8,
        };
        assert_eq!(
            w.to_string(),
            "Welcome high_water=3 credit=8 leader=10.0.0.1:4003"
        );
        assert_eq!(
            Error {
                code: ErrorCode::Unknown(99)
            }
            .to_string(),
            "Error unknown error code 99"
        );
    }
}
