//! The frame header: a checked view over bytes ([`Frame`]) and its meaning ([`FrameHeader`]).
//!
//! ```text
//!  0      2         3      4        6       7          8          12
//!  +------+---------+------+--------+-------+----------+----------+------------+-----+
//!  | "CR" | version | kind | length | flags | reserved | counter  | body ...   | tag |
//!  +------+---------+------+--------+-------+----------+----------+------------+-----+
//!                            u16 LE                      u32 LE    length bytes
//! ```
//!
//! `length` counts everything after the header: the body (ciphertext, or clear text for Hello
//! and unsealed Error) and the 16-byte tag.

use core::fmt;

use crate::error::FrameError;
use crate::{HEADER_LEN, MAGIC, MAX_FRAME, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, TAG_LEN};

mod field {
    use core::ops::{Range, RangeFrom};

    pub const MAGIC: Range<usize> = 0..2;
    pub const VERSION: usize = 2;
    pub const KIND: usize = 3;
    pub const LENGTH: Range<usize> = 4..6;
    pub const FLAGS: usize = 6;
    pub const RESERVED: usize = 7;
    pub const COUNTER: Range<usize> = 8..12;
    pub const PAYLOAD: RangeFrom<usize> = 12..;
}

/// Flag bit: the body is in the clear and the tag is all zeros. Only an Error frame sent by a
/// gateway before a session exists (unknown device, bad Hello) may carry it.
pub const FLAG_UNSEALED: u8 = 0x01;

/// Flag bit: a gateway's first sealed frame on a connection (reply index 0) whose body starts
/// with the connection's 8-byte salt in the clear; this and every later gateway frame on the
/// connection is sealed with XChaCha20-Poly1305 (see [`salted_nonce`](crate::salted_nonce)).
pub const FLAG_SALTED: u8 = 0x02;

/// The largest value of the header's `length` field.
pub const MAX_LENGTH: usize = MAX_FRAME - HEADER_LEN;

/// Message kind, header byte 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Batch = 3,
    Ack = 4,
    Redirect = 5,
    Error = 6,
    Ping = 7,
    Pong = 8,
}

impl Kind {
    /// The kind for a header byte, `None` for bytes no kind uses.
    pub const fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Batch,
            4 => Kind::Ack,
            5 => Kind::Redirect,
            6 => Kind::Error,
            7 => Kind::Ping,
            8 => Kind::Pong,
            _ => return None,
        })
    }
}

impl TryFrom<u8> for Kind {
    type Error = FrameError;
    fn try_from(b: u8) -> Result<Self, FrameError> {
        Kind::from_u8(b).ok_or(FrameError::UnknownKind)
    }
}

impl From<Kind> for u8 {
    fn from(k: Kind) -> u8 {
        k as u8
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A read/write view of a frame in a byte buffer.
///
/// Accessors on a view made with [`Frame::new_unchecked`] panic if the buffer is shorter than
/// the header (or, for the payload accessors, than the declared length); a view made with
/// [`Frame::new_checked`] never panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Frame<T> {
        Frame { buffer }
    }

    /// Wraps a buffer and checks it with [`Frame::check`].
    pub fn new_checked(buffer: T) -> Result<Frame<T>, FrameError> {
        let frame = Frame::new_unchecked(buffer);
        frame.check()?;
        Ok(frame)
    }

    /// Checks that the header is complete, the magic and version are right, the declared
    /// length lies in `TAG_LEN..=MAX_FRAME - HEADER_LEN` and the buffer holds that many bytes.
    /// The kind and flags are checked by [`FrameHeader::parse`].
    pub fn check(&self) -> Result<(), FrameError> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN {
            return Err(FrameError::Truncated);
        }
        check_header_prefix(data)?;
        if data.len() < self.frame_len() {
            return Err(FrameError::Truncated);
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn magic(&self) -> [u8; 2] {
        let d = self.buffer.as_ref();
        [d[field::MAGIC.start], d[field::MAGIC.start + 1]]
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    /// The raw kind byte; see [`Frame::kind`].
    pub fn kind_raw(&self) -> u8 {
        self.buffer.as_ref()[field::KIND]
    }

    pub fn kind(&self) -> Result<Kind, FrameError> {
        Kind::try_from(self.kind_raw())
    }

    /// Bytes after the header: body plus tag.
    pub fn length(&self) -> u16 {
        let d = &self.buffer.as_ref()[field::LENGTH];
        u16::from_le_bytes([d[0], d[1]])
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    pub fn reserved(&self) -> u8 {
        self.buffer.as_ref()[field::RESERVED]
    }

    pub fn counter(&self) -> u32 {
        let d = &self.buffer.as_ref()[field::COUNTER];
        u32::from_le_bytes([d[0], d[1], d[2], d[3]])
    }

    /// Header plus `length`.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + usize::from(self.length())
    }

    /// The body length: `length - TAG_LEN` (0 if `length` is shorter than a tag).
    pub fn body_len(&self) -> usize {
        usize::from(self.length()).saturating_sub(TAG_LEN)
    }

    /// The 12 header bytes (the AEAD associated data).
    pub fn header_bytes(&self) -> &[u8] {
        &self.buffer.as_ref()[..HEADER_LEN]
    }

    /// The body (without the tag).
    pub fn body(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..HEADER_LEN + self.body_len()]
    }

    /// The tag after the body.
    pub fn tag(&self) -> &[u8] {
        let start = HEADER_LEN + self.body_len();
        &self.buffer.as_ref()[start..start + TAG_LEN]
    }

    /// The whole frame: header, body, tag (the buffer may be longer).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.frame_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    pub fn set_magic(&mut self, magic: [u8; 2]) {
        self.buffer.as_mut()[field::MAGIC].copy_from_slice(&magic);
    }

    pub fn set_version(&mut self, version: u8) {
        self.buffer.as_mut()[field::VERSION] = version;
    }

    pub fn set_kind(&mut self, kind: Kind) {
        self.buffer.as_mut()[field::KIND] = kind as u8;
    }

    pub fn set_length(&mut self, length: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&length.to_le_bytes());
    }

    pub fn set_flags(&mut self, flags: u8) {
        self.buffer.as_mut()[field::FLAGS] = flags;
    }

    pub fn set_reserved(&mut self, reserved: u8) {
        self.buffer.as_mut()[field::RESERVED] = reserved;
    }

    pub fn set_counter(&mut self, counter: u32) {
        self.buffer.as_mut()[field::COUNTER].copy_from_slice(&counter.to_le_bytes());
    }

    /// Everything after the header, to the end of the buffer.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD]
    }
}

impl<T: AsRef<[u8]>> fmt::Display for Frame<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match FrameHeader::parse(self) {
            Ok(h) => write!(f, "{h}"),
            Err(e) => write!(f, "frame ({e})"),
        }
    }
}

/// Checks magic, version and length of a header; `data.len() >= HEADER_LEN`.
fn check_header_prefix(data: &[u8]) -> Result<(), FrameError> {
    if data[field::MAGIC] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&data[field::VERSION]) {
        return Err(FrameError::UnsupportedVersion);
    }
    let length = usize::from(u16::from_le_bytes([data[4], data[5]]));
    if length > MAX_LENGTH {
        return Err(FrameError::TooLarge);
    }
    if length < TAG_LEN {
        return Err(FrameError::Malformed);
    }
    Ok(())
}

/// The total length of the frame (header included) that starts with these header bytes, so a
/// stream reader knows how much to read: `read_frame_len(&hdr)? - HEADER_LEN` more bytes.
///
/// Checks magic, version and length like [`Frame::check`]; the kind is checked when the whole
/// frame is parsed, so an unknown kind can be read off the stream and answered.
pub fn read_frame_len(header: &[u8; HEADER_LEN]) -> Result<usize, FrameError> {
    check_header_prefix(header)?;
    Ok(Frame::new_unchecked(&header[..]).frame_len())
}

/// The meaning of a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FrameHeader {
    pub kind: Kind,
    /// Bytes after the header: body plus tag.
    pub length: u16,
    /// Flag bits; only [`FLAG_UNSEALED`] is defined.
    pub flags: u8,
    /// The frame counter (device frames) or reply index (gateway frames).
    pub counter: u32,
}

impl FrameHeader {
    /// Parses a checked frame's header. Unknown kinds, unknown flag bits, both flags at once,
    /// [`FLAG_SALTED`] on a frame with a non-zero counter or a body shorter than the salt,
    /// and a non-zero reserved byte are [`FrameError::Malformed`].
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<FrameHeader, FrameError> {
        frame.check()?;
        let kind = frame.kind()?;
        let flags = frame.flags();
        let salted = flags & FLAG_SALTED != 0;
        if flags & !(FLAG_UNSEALED | FLAG_SALTED) != 0
            || flags == FLAG_UNSEALED | FLAG_SALTED
            || (salted && (frame.counter() != 0 || frame.body_len() < crate::v1::SALT_LEN))
            || frame.reserved() != 0
        {
            return Err(FrameError::Malformed);
        }
        Ok(FrameHeader {
            kind,
            length: frame.length(),
            flags: frame.flags(),
            counter: frame.counter(),
        })
    }

    /// Length of the body (without the tag).
    pub fn body_len(&self) -> usize {
        usize::from(self.length).saturating_sub(TAG_LEN)
    }

    pub fn is_unsealed(&self) -> bool {
        self.flags & FLAG_UNSEALED != 0
    }

    pub fn is_salted(&self) -> bool {
        self.flags & FLAG_SALTED != 0
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of the frame.
    ///
    /// # Panics
    /// If the buffer is shorter than [`HEADER_LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut Frame<T>) {
        frame.set_magic(MAGIC);
        frame.set_version(PROTOCOL_VERSION);
        frame.set_kind(self.kind);
        frame.set_length(self.length);
        frame.set_flags(self.flags);
        frame.set_reserved(0);
        frame.set_counter(self.counter);
    }
}

impl fmt::Display for FrameHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} frame len={} counter={}",
            self.kind, self.length, self.counter
        )?;
        if self.is_unsealed() {
            f.write_str(" unsealed")?;
        }
        if self.is_salted() {
            f.write_str(" salted")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod test {
    use super::*;

    // A Ping frame header: kind 7, length 17 (1 body byte + tag), counter 0x0403_0201.
    static HEADER: [u8; 12] = [
        0x43, 0x52, 0x02, 0x07, 0x11, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04,
    ];

    fn frame_bytes() -> [u8; 29] {
        let mut b = [0u8; 29];
        b[..12].copy_from_slice(&HEADER);
        b
    }

    #[test]
    fn test_parse() {
        let bytes = frame_bytes();
        let frame = Frame::new_checked(&bytes[..]).unwrap();
        let h = FrameHeader::parse(&frame).unwrap();
        assert_eq!(
            h,
            FrameHeader {
                kind: Kind::Ping,
                length: 17,
                flags: 0,
                counter: 0x0403_0201
            }
        );
        assert_eq!(frame.body_len(), 1);
        assert_eq!(frame.frame_len(), 29);
        assert_eq!(read_frame_len(&HEADER), Ok(29));
    }

    #[test]
    fn test_emit() {
        let mut bytes = [0xffu8; 12];
        let mut frame = Frame::new_unchecked(&mut bytes[..]);
        FrameHeader {
            kind: Kind::Ping,
            length: 17,
            flags: 0,
            counter: 0x0403_0201,
        }
        .emit(&mut frame);
        assert_eq!(bytes, HEADER);
    }

    #[test]
    fn test_truncated() {
        let bytes = frame_bytes();
        for n in 0..bytes.len() {
            assert_eq!(
                Frame::new_checked(&bytes[..n]).unwrap_err(),
                FrameError::Truncated,
                "{n}"
            );
        }
    }

    #[test]
    fn test_bad_header_fields() {
        let mut b = frame_bytes();
        b[0] = b'X';
        assert_eq!(
            Frame::new_checked(&b[..]).unwrap_err(),
            FrameError::BadMagic
        );
        let mut b = frame_bytes();
        b[2] = 3;
        assert_eq!(
            Frame::new_checked(&b[..]).unwrap_err(),
            FrameError::UnsupportedVersion
        );
        let mut b = frame_bytes();
        b[4..6].copy_from_slice(&1013u16.to_le_bytes());
        assert_eq!(
            Frame::new_checked(&b[..]).unwrap_err(),
            FrameError::TooLarge
        );
        let mut hdr = HEADER;
        hdr[4..6].copy_from_slice(&1012u16.to_le_bytes());
        assert_eq!(read_frame_len(&hdr), Ok(MAX_FRAME));
        hdr[4..6].copy_from_slice(&15u16.to_le_bytes());
        assert_eq!(read_frame_len(&hdr), Err(FrameError::Malformed));
        let mut b = frame_bytes();
        b[3] = 9;
        let frame = Frame::new_checked(&b[..]).unwrap();
        assert_eq!(FrameHeader::parse(&frame), Err(FrameError::UnknownKind));
        b[3] = 0;
        assert_eq!(
            FrameHeader::parse(&Frame::new_unchecked(&b[..])),
            Err(FrameError::UnknownKind)
        );
        let mut b = frame_bytes();
        b[6] = 0x02;
        assert_eq!(
            FrameHeader::parse(&Frame::new_unchecked(&b[..])),
            Err(FrameError::Malformed)
        );
        let mut b = frame_bytes();
        b[6] = FLAG_UNSEALED | FLAG_SALTED;
        assert_eq!(
            FrameHeader::parse(&Frame::new_unchecked(&b[..])),
            Err(FrameError::Malformed)
        );
        // Salted needs counter 0 and room for the salt.
        let mut b = frame_bytes();
        b[6] = FLAG_SALTED;
        assert_eq!(
            FrameHeader::parse(&Frame::new_unchecked(&b[..])),
            Err(FrameError::Malformed)
        );
        b[8..12].fill(0);
        assert_eq!(
            FrameHeader::parse(&Frame::new_unchecked(&b[..])),
            Err(FrameError::Malformed)
        );
        let mut long = [0u8; 36];
        long[..12].copy_from_slice(&b[..12]);
        long[4] = 24;
        assert!(
            FrameHeader::parse(&Frame::new_unchecked(&long[..]))
                .unwrap()
                .is_salted()
        );
        let mut b = frame_bytes();
        b[7] = 1;
        assert_eq!(
            FrameHeader::parse(&Frame::new_unchecked(&b[..])),
            Err(FrameError::Malformed)
        );
    }
}
