//! The per-frame security layer: ChaCha20-Poly1305 keyed by the device's pre-shared key.
//!
//! - Nonce (12 bytes): `boot` u32 LE ‖ direction u8 ‖ counter, 7 bytes LE (56 bits).
//! - Associated data: the 12 header bytes. The 16-byte tag follows the body.
//! - Hello is authenticated but not encrypted: the gateway needs `device_id` and `boot` to find
//!   the key. Its tag is the AEAD tag of an empty plaintext with `header ‖ body` as associated
//!   data.
//!
//! [`seal`] and [`open`] do the cryptography only; the counter rules live in
//! [`crate::session`].

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};

use crate::error::{EncodeError, FrameError};
use crate::frame::{Frame, Kind};
use crate::{HEADER_LEN, TAG_LEN};

/// Length of a device's pre-shared key.
pub const KEY_LEN: usize = 32;

/// Length of the AEAD nonce.
pub const NONCE_LEN: usize = 12;

/// The largest nonce counter (56 bits).
pub const MAX_NONCE_COUNTER: u64 = (1 << 56) - 1;

/// Who sealed a frame; part of the nonce so the two directions never share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Direction {
    DeviceToGateway = 0,
    GatewayToDevice = 1,
}

impl core::fmt::Display for Direction {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Direction::DeviceToGateway => "device->gateway",
            Direction::GatewayToDevice => "gateway->device",
        })
    }
}

/// Builds the nonce: `boot` LE ‖ `direction` ‖ the low 56 bits of `counter` LE.
pub fn nonce(boot: u32, direction: Direction, counter: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&boot.to_le_bytes());
    n[4] = direction as u8;
    n[5..].copy_from_slice(&counter.to_le_bytes()[..7]);
    n
}

fn cipher(key: &[u8; KEY_LEN]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(Key::from_slice(key))
}

/// Seals a frame in place. `frame` starts with an emitted header whose length field is
/// `body_len + TAG_LEN`, followed by the clear-text body and room for the tag. Encrypts the
/// body (except for Hello), writes the tag and returns the frame length.
pub fn seal(
    key: &[u8; KEY_LEN],
    boot: u32,
    direction: Direction,
    counter: u64,
    frame: &mut [u8],
) -> Result<usize, EncodeError> {
    let view = Frame::new_checked(&frame[..]).map_err(|_| EncodeError::Full)?;
    let body_len = view.body_len();
    let frame_len = view.frame_len();
    let is_hello = view.kind_raw() == Kind::Hello as u8;
    let n = nonce(boot, direction, counter);
    let cipher = cipher(key);
    let tag = if is_hello {
        cipher.encrypt_in_place_detached(
            Nonce::from_slice(&n),
            &frame[..HEADER_LEN + body_len],
            &mut [],
        )
    } else {
        let (head, rest) = frame.split_at_mut(HEADER_LEN);
        cipher.encrypt_in_place_detached(Nonce::from_slice(&n), head, &mut rest[..body_len])
    }
    .map_err(|_| EncodeError::TooLarge)?;
    frame[HEADER_LEN + body_len..frame_len].copy_from_slice(&tag);
    Ok(frame_len)
}

/// Verifies a frame and decrypts its body in place (a Hello body is only verified).
/// The frame must pass [`Frame::check`]; a tag that does not verify is [`FrameError::BadAuth`]
/// and leaves the body as it was.
pub fn open(
    key: &[u8; KEY_LEN],
    boot: u32,
    direction: Direction,
    counter: u64,
    frame: &mut [u8],
) -> Result<(), FrameError> {
    let view = Frame::new_checked(&frame[..])?;
    let body_len = view.body_len();
    if view.kind_raw() == Kind::Hello as u8 {
        return verify_hello(key, boot, counter, frame);
    }
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(view.tag());
    let n = nonce(boot, direction, counter);
    let (head, rest) = frame.split_at_mut(HEADER_LEN);
    cipher(key)
        .decrypt_in_place_detached(
            Nonce::from_slice(&n),
            head,
            &mut rest[..body_len],
            Tag::from_slice(&tag),
        )
        .map_err(|_| FrameError::BadAuth)
}

/// Verifies a Hello frame's tag (device→gateway, nonce counter = the header counter).
pub(crate) fn verify_hello(
    key: &[u8; KEY_LEN],
    boot: u32,
    counter: u64,
    frame: &[u8],
) -> Result<(), FrameError> {
    let view = Frame::new_checked(frame)?;
    let body_len = view.body_len();
    let n = nonce(boot, Direction::DeviceToGateway, counter);
    cipher(key)
        .decrypt_in_place_detached(
            Nonce::from_slice(&n),
            &frame[..HEADER_LEN + body_len],
            &mut [],
            Tag::from_slice(view.tag()),
        )
        .map_err(|_| FrameError::BadAuth)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn test_nonce() {
        assert_eq!(
            nonce(
                0x0403_0201,
                Direction::GatewayToDevice,
                0x0d0c_0b0a_0908_0706
            ),
            [1, 2, 3, 4, 1, 6, 7, 8, 9, 10, 11, 12]
        );
        assert_eq!(
            nonce(7, Direction::DeviceToGateway, 5),
            [7, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0]
        );
    }
}
