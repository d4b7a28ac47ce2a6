//! Frames out of a byte stream, without I/O: bytes go in as they arrive (in chunks of any
//! size), whole frames come out.
//!
//! TCP delivers frames back to back with no boundaries (SPEC §4), so every reader has to keep
//! the bytes of a partial frame until the rest arrives and keep the bytes that follow a frame
//! for the next one. [`FrameReassembler`] does that once for every caller (the firmware
//! client, the gateway's device port, test gateways and bench devices); the caller only moves
//! bytes from its socket into it.
//!
//! ```text
//!  socket ──read──▶ read_buf() ─┐
//!                               ├─▶ [ frame 1 | frame 2 | part of frame 3 ] ──▶ next_frame()
//!  chunk ─────────▶ feed()  ────┘                 buffer of N bytes
//! ```
//!
//! # Errors
//! The header is checked as soon as its 12 bytes are in, with [`read_frame_len`]: bad magic
//! ([`FrameError::BadMagic`]), another version ([`FrameError::UnsupportedVersion`]), a length
//! above `MAX_FRAME - HEADER_LEN` ([`FrameError::TooLarge`]) or below the tag length
//! ([`FrameError::Malformed`]). A frame that is valid but longer than this reassembler's `N`
//! bytes is [`FrameError::TooLarge`] too. After a bad header the stream cannot be
//! resynchronised (SPEC §4), so the error is sticky: every later call returns it until
//! [`reset`](FrameReassembler::reset). The kind, flags and tag are checked later, by the
//! session that decodes the frame.
//!
//! # Panics
//! None of these methods panics, whatever bytes are fed and in whatever order the methods are
//! called (the module denies indexing and unchecked arithmetic so clippy keeps it that way).
//! Misuse only loses data: [`commit`](FrameReassembler::commit) of more bytes than
//! [`read_buf`](FrameReassembler::read_buf) offered is clamped to the buffer.
#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use core::fmt;

use crate::error::FrameError;
use crate::frame::read_frame_len;
use crate::{HEADER_LEN, MAX_FRAME};

/// Reassembles frames from a byte stream in a buffer of `N` bytes (default [`MAX_FRAME`]).
///
/// Bytes enter through [`feed`](Self::feed) (copied from a chunk) or through
/// [`read_buf`](Self::read_buf) + [`commit`](Self::commit) (read straight into the buffer);
/// whole frames leave through [`next_frame`](Self::next_frame). A frame returned by
/// `next_frame` stays in the buffer, mutable so a session can decrypt it in place, until the
/// next call on the reassembler drops it.
///
/// `N` must be at least [`HEADER_LEN`] (checked at compile time). A buffer that holds one
/// largest frame can always make progress; a larger one lets a reader take several frames per
/// read. Nothing is lost when a read is cancelled between `read_buf` and `commit`, so a
/// reader over a cancel-safe socket read is cancel-safe too.
///
/// ```
/// use cairn_protocol::*;
///
/// // Two frames as a socket might deliver them: cut in the middle of the second.
/// let mut wire = [0u8; 64];
/// let n = encode_unsealed_error(ErrorCode::Overloaded, &mut wire)?;
/// wire.copy_within(..n, n);
/// let chunks = [&wire[..n + 5], &wire[n + 5..2 * n]];
///
/// let mut frames = FrameReassembler::<MAX_FRAME>::new();
/// let mut errors = 0;
/// for chunk in chunks {
///     let mut rest = chunk;
///     while !rest.is_empty() {
///         let taken = frames.feed(rest);
///         rest = &rest[taken..];
///         while let Some(frame) = frames.next_frame()? {
///             assert_eq!(unsealed_error_code(frame), Some(ErrorCode::Overloaded));
///             errors += 1;
///         }
///     }
/// }
/// frames.finish()?; // the stream ended between frames
/// assert_eq!(errors, 2);
/// # Ok::<(), Box<dyn core::error::Error>>(())
/// ```
pub struct FrameReassembler<const N: usize = MAX_FRAME> {
    buf: [u8; N],
    /// `buf[..filled]` holds received bytes.
    filled: usize,
    /// Length of the frame `next_frame` returned last, still at the front of `buf`.
    taken: usize,
    /// The header error that ended the stream.
    error: Option<FrameError>,
}

impl<const N: usize> FrameReassembler<N> {
    /// An empty reassembler.
    pub const fn new() -> Self {
        const {
            assert!(
                N >= HEADER_LEN,
                "a FrameReassembler must hold at least a frame header"
            )
        };
        FrameReassembler {
            buf: [0; N],
            filled: 0,
            taken: 0,
            error: None,
        }
    }

    /// Forgets all bytes and any error, for a new connection.
    pub fn reset(&mut self) {
        self.filled = 0;
        self.taken = 0;
        self.error = None;
    }

    /// Copies as much of `bytes` as fits; returns how many bytes were taken. Call
    /// [`next_frame`](Self::next_frame) until it returns `Ok(None)`, then feed the rest: there
    /// is room again unless a frame does not fit at all, which `next_frame` reports.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let space = self.read_buf();
        let n = bytes.len().min(space.len());
        if let (Some(to), Some(from)) = (space.get_mut(..n), bytes.get(..n)) {
            to.copy_from_slice(from);
        }
        self.commit(n);
        n
    }

    /// The free part of the buffer, to read bytes into; then [`commit`](Self::commit) how many
    /// were written at its start. Empty only while a whole frame (or a bad header) waits in
    /// the buffer, so call [`next_frame`](Self::next_frame) first.
    pub fn read_buf(&mut self) -> &mut [u8] {
        self.release();
        self.buf.get_mut(self.filled..).unwrap_or_default()
    }

    /// Marks `n` bytes written into [`read_buf`](Self::read_buf) as received.
    pub fn commit(&mut self, n: usize) {
        self.filled = self.filled.saturating_add(n).min(N);
    }

    /// Whether a whole frame is buffered: [`next_frame`](Self::next_frame) will return it.
    /// `Err` if the buffered header is bad.
    pub fn frame_ready(&mut self) -> Result<bool, FrameError> {
        Ok(self.complete_len()?.is_some())
    }

    /// The next whole frame (header, body and tag), or `Ok(None)` if more bytes are needed.
    /// The frame before it, if any, is dropped from the buffer first.
    pub fn next_frame(&mut self) -> Result<Option<&mut [u8]>, FrameError> {
        let Some(len) = self.complete_len()? else {
            return Ok(None);
        };
        self.taken = len;
        Ok(self.buf.get_mut(..len))
    }

    /// How many more bytes complete the frame at the front: the rest of its header while
    /// fewer than [`HEADER_LEN`] bytes are buffered, then the rest of the frame; `0` when
    /// [`next_frame`](Self::next_frame) will return it. A blocking reader that must not read
    /// past a frame (the next bytes belong to someone else) reads exactly this many into
    /// [`read_buf`](Self::read_buf) until it is `0`. `Err` if the buffered header is bad.
    pub fn missing(&mut self) -> Result<usize, FrameError> {
        if self.complete_len()?.is_some() {
            return Ok(0);
        }
        if self.filled < HEADER_LEN {
            return Ok(HEADER_LEN.saturating_sub(self.filled));
        }
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(0);
        };
        // `complete_len` accepted this header (it fits in `N`) and found it incomplete.
        Ok(read_frame_len(header).map_or(0, |len| len.saturating_sub(self.filled)))
    }

    /// Bytes received and not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.filled.saturating_sub(self.taken)
    }

    /// Call when the stream ended: `Ok` if it ended between frames, [`FrameError::Truncated`]
    /// if part of a frame is still buffered, or the header error that stopped the stream.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.error {
            Some(e) => Err(e),
            None if self.buffered() > 0 => Err(FrameError::Truncated),
            None => Ok(()),
        }
    }

    /// Drops the frame returned last, moving the bytes after it to the front.
    fn release(&mut self) {
        if self.taken > 0 {
            let filled = self.filled.min(N);
            let taken = self.taken.min(filled);
            self.buf.copy_within(taken..filled, 0);
            self.filled = filled.saturating_sub(taken);
            self.taken = 0;
        }
    }

    /// The length of the frame at the front once all of it is buffered.
    fn complete_len(&mut self) -> Result<Option<usize>, FrameError> {
        self.release();
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.filled < HEADER_LEN {
            return Ok(None);
        }
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = match read_frame_len(header) {
            Ok(len) if len <= N => len,
            Ok(_) => return Err(self.fail(FrameError::TooLarge)),
            Err(e) => return Err(self.fail(e)),
        };
        Ok((self.filled >= len).then_some(len))
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.error = Some(e);
        e
    }
}

impl<const N: usize> Default for FrameReassembler<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Debug for FrameReassembler<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameReassembler")
            .field("capacity", &N)
            .field("buffered", &self.buffered())
            .field("error", &self.error)
            .finish()
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::panic
)]
mod test {
    use super::*;

    // Three frames as they follow each other on a stream. The reassembler reads only magic,
    // version and length; kind, flags, counter and the (zero) tag are opaque to it.
    // A: Ping, length 17 (1 body byte + tag), counter 1.
    static FRAME_A: [u8; 29] = [
        0x43, 0x52, 0x01, 0x07, 0x11, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, //
        0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    // B: Ack, length 20 (4 body bytes + tag), counter 2.
    static FRAME_B: [u8; 32] = [
        0x43, 0x52, 0x01, 0x04, 0x14, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, //
        0xb1, 0xb2, 0xb3, 0xb4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    // C: unsealed Error, length 17, counter 0.
    static FRAME_C: [u8; 29] = [
        0x43, 0x52, 0x01, 0x06, 0x11, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    // A header declaring length 1013: one byte over MAX_FRAME.
    static HEADER_OVERSIZE: [u8; 12] = [
        0x43, 0x52, 0x01, 0x03, 0xf5, 0x03, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00,
    ];
    // A header declaring length 15: shorter than the tag.
    static HEADER_UNDERSIZE: [u8; 12] = [
        0x43, 0x52, 0x01, 0x07, 0x0f, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00,
    ];

    fn stream() -> std::vec::Vec<u8> {
        [&FRAME_A[..], &FRAME_B[..], &FRAME_C[..]].concat()
    }

    extern crate std;

    /// Feeds `chunks` in order and collects every frame that comes out.
    fn reassemble<const N: usize>(
        r: &mut FrameReassembler<N>,
        chunks: &[&[u8]],
    ) -> Result<std::vec::Vec<std::vec::Vec<u8>>, FrameError> {
        let mut frames = std::vec::Vec::new();
        for chunk in chunks {
            let mut rest = *chunk;
            loop {
                let n = r.feed(rest);
                rest = &rest[n..];
                while let Some(f) = r.next_frame()? {
                    frames.push(f.to_vec());
                }
                if rest.is_empty() {
                    break;
                }
                assert!(n > 0 || r.buffered() < N, "no progress");
            }
        }
        Ok(frames)
    }

    fn expected() -> std::vec::Vec<std::vec::Vec<u8>> {
        std::vec![FRAME_A.to_vec(), FRAME_B.to_vec(), FRAME_C.to_vec()]
    }

    #[test]
    fn test_one_frame() {
        let mut r = FrameReassembler::<MAX_FRAME>::new();
        assert_eq!(r.feed(&FRAME_A), FRAME_A.len());
        assert_eq!(r.frame_ready(), Ok(true));
        assert_eq!(r.next_frame().unwrap().unwrap(), &FRAME_A[..]);
        assert_eq!(r.next_frame(), Ok(None));
        assert_eq!(r.buffered(), 0);
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn test_several_frames_in_one_chunk() {
        let mut r = FrameReassembler::<MAX_FRAME>::new();
        assert_eq!(reassemble(&mut r, &[&stream()]), Ok(expected()));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn test_split_at_every_position() {
        let s = stream();
        for i in 0..=s.len() {
            let mut r = FrameReassembler::<MAX_FRAME>::new();
            assert_eq!(
                reassemble(&mut r, &[&s[..i], &s[i..]]),
                Ok(expected()),
                "{i}"
            );
            assert_eq!(r.finish(), Ok(()), "{i}");
        }
        // And at every pair of positions (three chunks).
        for i in 0..=s.len() {
            for j in i..=s.len() {
                let mut r = FrameReassembler::<MAX_FRAME>::new();
                let got = reassemble(&mut r, &[&s[..i], &s[i..j], &s[j..]]);
                assert_eq!(got, Ok(expected()), "{i} {j}");
            }
        }
    }

    #[test]
    fn test_byte_by_byte() {
        let s = stream();
        let chunks: std::vec::Vec<&[u8]> = s.chunks(1).collect();
        let mut r = FrameReassembler::<MAX_FRAME>::new();
        assert_eq!(reassemble(&mut r, &chunks), Ok(expected()));
    }

    #[test]
    fn test_missing_reads_exactly_one_frame() {
        // Read exactly what `missing` asks for: A comes out and B's bytes stay unread.
        let mut wire = [0u8; FRAME_A.len() + FRAME_B.len()];
        wire[..FRAME_A.len()].copy_from_slice(&FRAME_A);
        wire[FRAME_A.len()..].copy_from_slice(&FRAME_B);
        let mut f = FrameReassembler::<MAX_FRAME>::new();
        let mut at = 0;
        let mut asked = [0usize; 4];
        let mut reads = 0;
        loop {
            let want = f.missing().unwrap();
            if want == 0 {
                break;
            }
            asked[reads] = want;
            reads += 1;
            f.read_buf()[..want].copy_from_slice(&wire[at..at + want]);
            f.commit(want);
            at += want;
        }
        assert_eq!(asked[..reads], [HEADER_LEN, FRAME_A.len() - HEADER_LEN]);
        assert_eq!(at, FRAME_A.len(), "nothing of the next frame was asked for");
        assert_eq!(f.next_frame().unwrap().unwrap(), &FRAME_A[..]);
        // Part of a header, then the oversize header's error.
        f.reset();
        f.feed(&HEADER_OVERSIZE[..5]);
        assert_eq!(f.missing(), Ok(HEADER_LEN - 5));
        f.feed(&HEADER_OVERSIZE[5..]);
        assert_eq!(f.missing(), Err(FrameError::TooLarge));
    }

    #[test]
    fn test_buffer_of_one_frame() {
        // A buffer exactly as long as the longest frame still passes every frame through.
        let s = stream();
        let mut r = FrameReassembler::<32>::new();
        assert_eq!(reassemble(&mut r, &[&s]), Ok(expected()));
        // Frame B (32 bytes) does not fit a 31-byte buffer.
        let mut r = FrameReassembler::<31>::new();
        assert_eq!(reassemble(&mut r, &[&s]), Err(FrameError::TooLarge));
    }

    #[test]
    fn test_read_buf_commit() {
        // The zero-copy path, with reads of 7 bytes as a socket might return them.
        let s = stream();
        let mut r = FrameReassembler::<64>::new();
        let mut frames = std::vec::Vec::new();
        let mut input = &s[..];
        while !input.is_empty() {
            while let Some(f) = r.next_frame().unwrap() {
                frames.push(f.to_vec());
            }
            let space = r.read_buf();
            let n = input.len().min(space.len()).min(7);
            space[..n].copy_from_slice(&input[..n]);
            r.commit(n);
            input = &input[n..];
        }
        while let Some(f) = r.next_frame().unwrap() {
            frames.push(f.to_vec());
        }
        assert_eq!(frames, expected());
    }

    #[test]
    fn test_frame_is_mutable_in_place() {
        let mut r = FrameReassembler::<MAX_FRAME>::new();
        r.feed(&[&FRAME_A[..], &FRAME_B[..]].concat());
        r.next_frame().unwrap().unwrap()[12] = 0x55;
        // The next call drops frame A; B comes out intact.
        assert_eq!(r.next_frame().unwrap().unwrap(), &FRAME_B[..]);
    }

    #[test]
    fn test_oversize() {
        // Reported as soon as the header is in, before any body byte.
        let mut r = FrameReassembler::<MAX_FRAME>::new();
        r.feed(&HEADER_OVERSIZE);
        assert_eq!(r.next_frame(), Err(FrameError::TooLarge));
        // Nothing is reported before the whole header is in.
        let mut r = FrameReassembler::<MAX_FRAME>::new();
        r.feed(&HEADER_OVERSIZE[..HEADER_LEN - 1]);
        assert_eq!(r.next_frame(), Ok(None));
        // A legal frame longer than the buffer: too large for this reader.
        let mut r = FrameReassembler::<28>::new();
        r.feed(&FRAME_A);
        assert_eq!(r.next_frame(), Err(FrameError::TooLarge));
    }

    #[test]
    fn test_undersized() {
        let mut r = FrameReassembler::<MAX_FRAME>::new();
        r.feed(&HEADER_UNDERSIZE);
        assert_eq!(r.next_frame(), Err(FrameError::Malformed));
    }

    #[test]
    fn test_bad_magic_and_version() {
        let mut bad = FRAME_A;
        bad[1] = b'X';
        let mut r = FrameReassembler::<MAX_FRAME>::new();
        r.feed(&bad);
        assert_eq!(r.next_frame(), Err(FrameError::BadMagic));
        let mut bad = FRAME_A;
        bad[2] = 3;
        let mut r = FrameReassembler::<MAX_FRAME>::new();
        r.feed(&bad);
        assert_eq!(r.frame_ready(), Err(FrameError::UnsupportedVersion));
    }

    #[test]
    fn test_error_is_sticky_until_reset() {
        let mut r = FrameReassembler::<MAX_FRAME>::new();
        r.feed(&[&FRAME_A[..], &HEADER_OVERSIZE[..], &FRAME_B[..]].concat());
        assert_eq!(r.next_frame().unwrap().unwrap(), &FRAME_A[..]);
        assert_eq!(r.next_frame(), Err(FrameError::TooLarge));
        r.feed(&FRAME_C);
        assert_eq!(r.next_frame(), Err(FrameError::TooLarge));
        assert_eq!(r.finish(), Err(FrameError::TooLarge));
        r.reset();
        r.feed(&FRAME_C);
        assert_eq!(r.next_frame().unwrap().unwrap(), &FRAME_C[..]);
    }

    #[test]
    fn test_finish() {
        let s = stream();
        for i in 0..=s.len() {
            let mut r = FrameReassembler::<MAX_FRAME>::new();
            let frames = reassemble(&mut r, &[&s[..i]]).unwrap();
            let at_boundary = [0, 29, 61, 90].contains(&i);
            let expected = if at_boundary {
                Ok(())
            } else {
                Err(FrameError::Truncated)
            };
            assert_eq!(r.finish(), expected, "{i}");
            assert_eq!(
                frames.len(),
                [29, 61, 90].iter().filter(|&&b| b <= i).count()
            );
        }
    }

    #[test]
    fn test_no_panic_on_random_bytes() {
        // xorshift64*: random chunks of random bytes, with random calls in between.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for _ in 0..2000 {
            let mut r = FrameReassembler::<64>::new();
            for _ in 0..16 {
                let mut chunk = [0u8; 40];
                let n = (next() % 40) as usize;
                for b in &mut chunk[..n] {
                    // Mostly valid header bytes, so frames also come out.
                    *b = match next() % 4 {
                        0 => 0x43,
                        1 => 0x52,
                        2 => 0x11,
                        _ => next() as u8,
                    };
                }
                match next() % 4 {
                    0 => {
                        r.feed(&chunk[..n]);
                    }
                    1 => {
                        let space = r.read_buf();
                        let m = n.min(space.len());
                        space[..m].copy_from_slice(&chunk[..m]);
                        r.commit((next() % 80) as usize);
                    }
                    2 => {
                        let _ = r.next_frame();
                    }
                    _ => {
                        let _ = (r.frame_ready(), r.finish());
                    }
                }
                assert!(r.buffered() <= 64);
            }
        }
    }
}
