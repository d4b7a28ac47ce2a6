//! Error types, one per operation: reading a frame, encoding, decoding a body.

use core::fmt;

use crate::message::ErrorCode;

/// Why a received frame was rejected.
///
/// Every variant closes the connection; [`FrameError::code`] gives the [`ErrorCode`] to send
/// back before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameError {
    /// Fewer bytes than the header or the declared length.
    Truncated,
    /// The first two bytes are not [`MAGIC`](crate::MAGIC).
    BadMagic,
    /// The header version (or the Hello's protocol version) is not one this crate speaks.
    UnsupportedVersion,
    /// The declared length exceeds [`MAX_FRAME`](crate::MAX_FRAME).
    TooLarge,
    /// The kind byte names no known message.
    UnknownKind,
    /// The header or the (authenticated) body does not follow the spec.
    Malformed,
    /// The authentication tag does not verify: wrong key, tampered bytes or a foreign nonce.
    BadAuth,
    /// An authentic frame whose counter is not greater than the last one accepted.
    Replay,
    /// An authentic frame whose counter skips ahead: a frame was lost or reordered.
    Reordered,
    /// A well-formed frame that is not allowed here (a second Hello, a reply before Hello,
    /// a Hello sent to a device).
    Unexpected,
    /// An unsealed Error frame (protocol 2 devices): anyone can forge one, so it only closes
    /// the connection.
    Unsealed,
}

impl FrameError {
    /// The error code a gateway sends before closing the connection over this error.
    pub fn code(self) -> ErrorCode {
        match self {
            FrameError::Truncated
            | FrameError::BadMagic
            | FrameError::UnknownKind
            | FrameError::Malformed
            | FrameError::Unexpected
            | FrameError::Unsealed => ErrorCode::Malformed,
            FrameError::UnsupportedVersion => ErrorCode::UnsupportedVersion,
            FrameError::TooLarge => ErrorCode::TooLarge,
            FrameError::BadAuth => ErrorCode::BadAuth,
            FrameError::Replay | FrameError::Reordered => ErrorCode::Replay,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameError::Truncated => "frame truncated",
            FrameError::BadMagic => "bad frame magic",
            FrameError::UnsupportedVersion => "unsupported protocol version",
            FrameError::TooLarge => "frame larger than MAX_FRAME",
            FrameError::UnknownKind => "unknown message kind",
            FrameError::Malformed => "malformed frame",
            FrameError::BadAuth => "frame authentication failed",
            FrameError::Replay => "replayed frame (counter not increasing)",
            FrameError::Reordered => "reordered frame (counter skipped)",
            FrameError::Unexpected => "message not allowed at this point",
            FrameError::Unsealed => "unsealed error frame (not authenticated)",
        })
    }
}

impl core::error::Error for FrameError {}

impl From<DecodeError> for FrameError {
    fn from(_: DecodeError) -> Self {
        FrameError::Malformed
    }
}

/// Why a message or frame could not be encoded. Nothing is sent; the caller's state is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EncodeError {
    /// The output buffer is too small, or a batch would exceed [`MAX_BODY`](crate::MAX_BODY).
    Full,
    /// A value longer than [`MAX_BLOB`](crate::MAX_BLOB), or a body longer than
    /// [`MAX_BODY`](crate::MAX_BODY).
    TooLarge,
    /// A record with more than [`MAX_VALUES`](crate::MAX_VALUES) values.
    TooManyValues,
    /// A record whose uptime is later than the batch's `sent_uptime_ms`.
    UptimeAfterSend,
    /// A batch with no records.
    Empty,
    /// A field breaks a protocol rule (seq 0, a Hello whose boot differs from the session's,
    /// a message other than Hello before the Hello).
    Invalid,
    /// The session's frame counter is used up: the device must start a new boot
    /// (device) or the connection must be closed (gateway).
    CounterExhausted,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EncodeError::Full => "buffer full",
            EncodeError::TooLarge => "value or body too large",
            EncodeError::TooManyValues => "too many values in a record",
            EncodeError::UptimeAfterSend => "record uptime later than send uptime",
            EncodeError::Empty => "batch has no records",
            EncodeError::Invalid => "field breaks a protocol rule",
            EncodeError::CounterExhausted => "frame counter exhausted",
        })
    }
}

impl core::error::Error for EncodeError {}

/// Why a message body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DecodeError {
    /// The body ends in the middle of a field.
    Truncated,
    /// A field holds a value the spec does not allow (bad varint, unknown value tag,
    /// invalid UTF-8, seq 0, a record count that does not match, ...).
    Malformed,
    /// A record with more than [`MAX_VALUES`](crate::MAX_VALUES) values.
    TooManyValues,
    /// A Bytes/Str value longer than [`MAX_BLOB`](crate::MAX_BLOB).
    BlobTooLarge,
    /// Bytes left over after the message.
    TrailingBytes,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecodeError::Truncated => "body truncated",
            DecodeError::Malformed => "malformed body",
            DecodeError::TooManyValues => "too many values in a record",
            DecodeError::BlobTooLarge => "bytes/str value longer than MAX_BLOB",
            DecodeError::TrailingBytes => "trailing bytes after the body",
        })
    }
}

impl core::error::Error for DecodeError {}

impl From<postcard::Error> for DecodeError {
    fn from(e: postcard::Error) -> Self {
        match e {
            postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated,
            _ => DecodeError::Malformed,
        }
    }
}
