#![no_std]
#![deny(unsafe_code)]
#![doc = include_str!("../README.md")]
//!
//! # Panic contract
//!
//! Nothing in this crate panics on input received from the network. Untrusted bytes enter
//! through [`Frame::new_checked`], [`read_frame_len`], [`DeviceSession::decode`],
//! [`GatewaySession::peek_hello`], [`GatewaySession::accept`], [`GatewaySession::decode`],
//! [`Message::decode_body`], [`BatchView::parse`] and [`FrameReassembler`] (which takes any
//! bytes in any chunks and calls in any order); each checks lengths before reading and
//! reports a problem as an error value. Once [`Frame::new_checked`] (or [`Frame::check`]) has
//! succeeded, no accessor of that frame panics. Accessors of a frame made with
//! [`Frame::new_unchecked`], and [`FrameHeader::emit`] on a buffer shorter than
//! [`HEADER_LEN`], may panic: they are for buffers the caller built. Encoding never panics
//! either; a buffer that is too small is [`EncodeError::Full`].

mod batch;
mod error;
mod frame;
mod message;
mod reassembler;
mod security;
mod session;
pub mod settings;
pub mod v1;

pub use batch::{
    BATCH_HEADER_MAX, BatchEncoder, BatchHeader, BatchView, Record, RecordView, Records, Value,
    Values,
};
pub use error::{DecodeError, EncodeError, FrameError};
pub use frame::{FLAG_SALTED, FLAG_UNSEALED, Frame, FrameHeader, Kind, MAX_LENGTH, read_frame_len};
pub use message::{
    Ack, Error, ErrorCode, GatewayAddr, Hello, Message, Ping, Pong, Redirect, Welcome,
};
pub use reassembler::FrameReassembler;
pub use security::{
    BOOT_NONCE_LEN, CHALLENGE_LEN, DEVICE_NONCE_LEN, KEY_LEN, LABEL_DEVICE_TO_GATEWAY,
    LABEL_GATEWAY_TO_DEVICE, LABEL_HELLO, NONCE_LEN, ROOT_LABEL, TrafficKeys, connection_key,
    hchacha20, hello_key, nonce, root_key, traffic_keys,
};
pub use session::{
    DeviceSession, GatewaySession, MAX_CONNECTIONS, encode_unsealed_error,
    encode_unsealed_error_version, unsealed_error_code,
};

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"CR";

/// The protocol version this crate speaks (header byte 2 and `Hello::protocol_version`).
pub const PROTOCOL_VERSION: u8 = 2;

/// The oldest version whose frames [`read_frame_len`] and [`Frame::check`] accept (so a
/// gateway can read, and answer, a protocol 1 device); the sessions check their own version.
pub const MIN_PROTOCOL_VERSION: u8 = 1;

/// Length of the frame header.
pub const HEADER_LEN: usize = 12;

/// Length of the authentication tag after the body.
pub const TAG_LEN: usize = 16;

/// The largest frame: header, body and tag.
pub const MAX_FRAME: usize = 1024;

/// The largest body.
pub const MAX_BODY: usize = MAX_FRAME - HEADER_LEN - TAG_LEN;

/// The most values in one record.
pub const MAX_VALUES: usize = 8;

/// The longest `Value::Bytes` / `Value::Str`, in bytes.
pub const MAX_BLOB: usize = 64;
