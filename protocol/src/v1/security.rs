//! Protocol 1's per-frame security layer: ChaCha20-Poly1305 keyed by the device's pre-shared
//! key (kept for gateways in a migration period; see SPEC.md appendix A).
//!
//! - Nonce (12 bytes): `boot` u32 LE ‖ direction u8 ‖ counter, 7 bytes LE (56 bits).
//! - Associated data: the 12 header bytes. The 16-byte tag follows the body.
//! - Hello is authenticated but not encrypted: the gateway needs `device_id` and `boot` to find
//!   the key. Its tag is the AEAD tag of an empty plaintext with `header ‖ body` as associated
//!   data.
//!
//! - Salted gateway frames (SPEC.md §5.4) use XChaCha20-Poly1305 with the same key and the
//!   24-byte nonce of [`salted_nonce`]; the sessions choose the mode.
//!
//! [`seal`] and [`open`] do the unsalted cryptography only; the counter rules live in the
//! session types.

use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, XChaCha20Poly1305};

use crate::HEADER_LEN;
use crate::error::{EncodeError, FrameError};
use crate::frame::{Frame, Kind};
use crate::security::{self, KEY_LEN, NONCE_LEN};

/// The largest nonce counter (56 bits).
pub const MAX_NONCE_COUNTER: u64 = (1 << 56) - 1;

/// Length of the gateway's per-connection salt (see [`salted_nonce`]).
pub const SALT_LEN: usize = 8;

/// Length of the XChaCha20-Poly1305 nonce used for salted gateway frames.
pub const XNONCE_LEN: usize = 24;

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

/// The XChaCha20-Poly1305 nonce of a salted gateway frame:
/// `salt` ‖ `boot` LE ‖ `hello_counter` LE ‖ 0x01 ‖ `index` as 7 bytes LE.
///
/// The gateway picks `salt` at random for each connection, so two gateways answering the
/// same (possibly replayed) Hello never seal under the same nonce.
pub fn salted_nonce(
    salt: &[u8; SALT_LEN],
    boot: u32,
    hello_counter: u32,
    index: u32,
) -> [u8; XNONCE_LEN] {
    let mut n = [0u8; XNONCE_LEN];
    n[..8].copy_from_slice(salt);
    n[8..12].copy_from_slice(&boot.to_le_bytes());
    n[12..16].copy_from_slice(&hello_counter.to_le_bytes());
    n[16] = Direction::GatewayToDevice as u8;
    n[17..].copy_from_slice(&u64::from(index).to_le_bytes()[..7]);
    n
}

fn cipher(key: &[u8; KEY_LEN]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(Key::from_slice(key))
}

/// The cipher and nonce for one frame.
pub(crate) enum FrameAead {
    ChaCha([u8; NONCE_LEN]),
    XChaCha([u8; XNONCE_LEN]),
}

/// Seals `frame[aad_len..HEADER_LEN + body_len]` in place with `frame[..aad_len]` as associated
/// data and writes the tag after the body; returns the frame length.
pub(crate) fn seal_with(
    key: &[u8; KEY_LEN],
    aead: &FrameAead,
    aad_len: usize,
    frame: &mut [u8],
) -> Result<usize, EncodeError> {
    match aead {
        FrameAead::ChaCha(n) => {
            security::seal_with(&cipher(key), Nonce::from_slice(n), aad_len, frame)
        }
        FrameAead::XChaCha(n) => security::seal_with(
            &XChaCha20Poly1305::new(Key::from_slice(key)),
            GenericArray::from_slice(n),
            aad_len,
            frame,
        ),
    }
}

/// Verifies and decrypts `frame[aad_len..HEADER_LEN + body_len]` in place; the inverse of
/// [`seal_with`].
pub(crate) fn open_with(
    key: &[u8; KEY_LEN],
    aead: &FrameAead,
    aad_len: usize,
    frame: &mut [u8],
) -> Result<(), FrameError> {
    match aead {
        FrameAead::ChaCha(n) => {
            security::open_with(&cipher(key), Nonce::from_slice(n), aad_len, frame)
        }
        FrameAead::XChaCha(n) => security::open_with(
            &XChaCha20Poly1305::new(Key::from_slice(key)),
            GenericArray::from_slice(n),
            aad_len,
            frame,
        ),
    }
}

/// The associated-data length of a plan-mode frame: the header, or header and body for Hello.
fn plain_aad_len(frame: &[u8]) -> Result<usize, FrameError> {
    let view = Frame::new_checked(frame)?;
    Ok(if view.kind_raw() == Kind::Hello as u8 {
        HEADER_LEN + view.body_len()
    } else {
        HEADER_LEN
    })
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
    let aad_len = plain_aad_len(frame).map_err(|_| EncodeError::Full)?;
    let aead = FrameAead::ChaCha(nonce(boot, direction, counter));
    seal_with(key, &aead, aad_len, frame)
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
    let aad_len = plain_aad_len(frame)?;
    let aead = FrameAead::ChaCha(nonce(boot, direction, counter));
    open_with(key, &aead, aad_len, frame)
}

/// Verifies a Hello frame's tag (device→gateway, nonce counter = the header counter) without
/// needing a mutable buffer: the plaintext is empty.
pub(crate) fn verify_hello(
    key: &[u8; KEY_LEN],
    boot: u32,
    counter: u64,
    frame: &[u8],
) -> Result<(), FrameError> {
    security::verify_with(
        key,
        &nonce(boot, Direction::DeviceToGateway, counter),
        frame,
    )
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn test_salted_nonce() {
        assert_eq!(
            salted_nonce(
                &[0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7],
                7,
                5,
                0x0003_0201
            ),
            [
                0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 7, 0, 0, 0, 5, 0, 0, 0, 1, 1, 2, 3,
                0, 0, 0, 0
            ]
        );
    }

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
