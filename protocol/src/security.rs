//! The protocol 2 security layer (SPEC.md §5): per-connection keys derived from the device's
//! pre-shared key (PSK) with HChaCha20, frames sealed with ChaCha20-Poly1305.
//!
//! ```text
//! root    = HChaCha20(PSK,  "cairn protocol 2")            once per device
//! conn    = HChaCha20(root, device_nonce)                  16 bytes from the Hello, never repeated
//! hello   = HChaCha20(conn, 0^12 ‖ "hllo")                 seals the Hello's tag
//! d2g     = HChaCha20(conn, challenge ‖ "d2gw")            device → gateway frames
//! g2d     = HChaCha20(conn, challenge ‖ "gw2d")            gateway → device frames
//! nonce   = counter u32 LE ‖ 0^8                           per direction and connection
//! ```
//!
//! `challenge` is 12 random bytes the gateway picks per connection and sends in the clear at
//! the start of its first frame. Every ChaCha20-Poly1305 key is fresh for each connection and
//! direction, so nonces are simply the frame counter.

use chacha20::cipher::consts::U10;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};

use crate::error::{EncodeError, FrameError};
use crate::frame::Frame;
use crate::{HEADER_LEN, TAG_LEN};

/// Length of a device's pre-shared key and of every derived key.
pub const KEY_LEN: usize = 32;

/// Length of the AEAD nonce.
pub const NONCE_LEN: usize = 12;

/// Length of the device's per-connection nonce, sent in the Hello.
pub const DEVICE_NONCE_LEN: usize = 16;

/// Length of the per-boot part of the device nonce ([`DeviceSession::new`]); the rest is the
/// connection number.
///
/// [`DeviceSession::new`]: crate::DeviceSession::new
pub const BOOT_NONCE_LEN: usize = 12;

/// Length of the gateway's per-connection challenge, sent in its first frame.
pub const CHALLENGE_LEN: usize = 12;

/// The HChaCha20 input that turns a PSK into the device's protocol 2 root key.
pub const ROOT_LABEL: [u8; 16] = *b"cairn protocol 2";

/// The last four bytes of the HChaCha20 inputs under a connection key.
pub const LABEL_HELLO: [u8; 4] = *b"hllo";
pub const LABEL_DEVICE_TO_GATEWAY: [u8; 4] = *b"d2gw";
pub const LABEL_GATEWAY_TO_DEVICE: [u8; 4] = *b"gw2d";

/// HChaCha20 (the XChaCha20 subkey function): a 32-byte key and a 16-byte input to 32
/// pseudo-random bytes.
pub fn hchacha20(key: &[u8; KEY_LEN], input: &[u8; 16]) -> [u8; KEY_LEN] {
    chacha20::hchacha::<U10>(
        GenericArray::from_slice(key),
        GenericArray::from_slice(input),
    )
    .into()
}

/// The device's root key: `HChaCha20(psk, ROOT_LABEL)`. Protocol 2 never uses the PSK itself
/// as a cipher key, so its use in protocol 1 cannot collide with anything here.
pub fn root_key(psk: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    hchacha20(psk, &ROOT_LABEL)
}

/// The connection key for a Hello's device nonce.
pub fn connection_key(
    root: &[u8; KEY_LEN],
    device_nonce: &[u8; DEVICE_NONCE_LEN],
) -> [u8; KEY_LEN] {
    hchacha20(root, device_nonce)
}

fn labelled(conn: &[u8; KEY_LEN], prefix: &[u8; CHALLENGE_LEN], label: [u8; 4]) -> [u8; KEY_LEN] {
    let mut input = [0u8; 16];
    input[..CHALLENGE_LEN].copy_from_slice(prefix);
    input[CHALLENGE_LEN..].copy_from_slice(&label);
    hchacha20(conn, &input)
}

/// The key that authenticates the Hello of a connection.
pub fn hello_key(conn: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    labelled(conn, &[0; CHALLENGE_LEN], LABEL_HELLO)
}

/// The two traffic keys of a connection.
#[derive(Clone, PartialEq, Eq)]
pub struct TrafficKeys {
    /// Seals device → gateway frames.
    pub device_to_gateway: [u8; KEY_LEN],
    /// Seals gateway → device frames.
    pub gateway_to_device: [u8; KEY_LEN],
}

impl core::fmt::Debug for TrafficKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("TrafficKeys(..)")
    }
}

/// The traffic keys of a connection once the gateway's challenge is known.
pub fn traffic_keys(conn: &[u8; KEY_LEN], challenge: &[u8; CHALLENGE_LEN]) -> TrafficKeys {
    TrafficKeys {
        device_to_gateway: labelled(conn, challenge, LABEL_DEVICE_TO_GATEWAY),
        gateway_to_device: labelled(conn, challenge, LABEL_GATEWAY_TO_DEVICE),
    }
}

/// The AEAD nonce of frame `counter`: the counter, 4 bytes LE, then 8 zero bytes.
pub fn nonce(counter: u32) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Seals `frame[aad_len..HEADER_LEN + body_len]` in place with `frame[..aad_len]` as
/// associated data and writes the tag after the body; returns the frame length. The header
/// must be emitted.
pub(crate) fn seal_with<A: AeadInPlace>(
    aead: &A,
    nonce: &GenericArray<u8, A::NonceSize>,
    aad_len: usize,
    frame: &mut [u8],
) -> Result<usize, EncodeError> {
    let view = Frame::new_checked(&frame[..]).map_err(|_| EncodeError::Full)?;
    let body_end = HEADER_LEN + view.body_len();
    let frame_len = view.frame_len();
    if aad_len > body_end {
        return Err(EncodeError::Invalid);
    }
    let (aad, rest) = frame.split_at_mut(aad_len);
    let tag = aead
        .encrypt_in_place_detached(nonce, aad, &mut rest[..body_end - aad_len])
        .map_err(|_| EncodeError::TooLarge)?;
    frame[body_end..frame_len].copy_from_slice(&tag);
    Ok(frame_len)
}

/// Verifies and decrypts `frame[aad_len..HEADER_LEN + body_len]` in place; the inverse of
/// [`seal_with`]. A tag that does not verify is [`FrameError::BadAuth`] and leaves the body
/// as it was.
pub(crate) fn open_with<A: AeadInPlace>(
    aead: &A,
    nonce: &GenericArray<u8, A::NonceSize>,
    aad_len: usize,
    frame: &mut [u8],
) -> Result<(), FrameError> {
    let view = Frame::new_checked(&frame[..])?;
    let body_end = HEADER_LEN + view.body_len();
    if aad_len > body_end {
        return Err(FrameError::Malformed);
    }
    let mut tag = GenericArray::<u8, A::TagSize>::default();
    if tag.len() != TAG_LEN {
        return Err(FrameError::Malformed);
    }
    tag.copy_from_slice(view.tag());
    let (aad, rest) = frame.split_at_mut(aad_len);
    aead.decrypt_in_place_detached(nonce, aad, &mut rest[..body_end - aad_len], &tag)
        .map_err(|_| FrameError::BadAuth)
}

/// Seals a protocol 2 frame with `key` under [`nonce`]`(counter)`; see [`seal_with`].
pub(crate) fn seal(
    key: &[u8; KEY_LEN],
    counter: u32,
    aad_len: usize,
    frame: &mut [u8],
) -> Result<usize, EncodeError> {
    let aead = ChaCha20Poly1305::new(GenericArray::from_slice(key));
    seal_with(&aead, Nonce::from_slice(&nonce(counter)), aad_len, frame)
}

/// Opens a protocol 2 frame with `key` under [`nonce`]`(counter)`; see [`open_with`].
pub(crate) fn open(
    key: &[u8; KEY_LEN],
    counter: u32,
    aad_len: usize,
    frame: &mut [u8],
) -> Result<(), FrameError> {
    let aead = ChaCha20Poly1305::new(GenericArray::from_slice(key));
    open_with(&aead, Nonce::from_slice(&nonce(counter)), aad_len, frame)
}

/// Verifies a frame whose header and whole body are associated data (a Hello: nothing is
/// encrypted), without needing a mutable buffer.
pub(crate) fn verify(key: &[u8; KEY_LEN], counter: u32, frame: &[u8]) -> Result<(), FrameError> {
    verify_with(key, &nonce(counter), frame)
}

/// [`verify`] under any ChaCha20-Poly1305 nonce (protocol 1 builds its own).
pub(crate) fn verify_with(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    frame: &[u8],
) -> Result<(), FrameError> {
    let view = Frame::new_checked(frame)?;
    ChaCha20Poly1305::new(GenericArray::from_slice(key))
        .decrypt_in_place_detached(
            Nonce::from_slice(nonce),
            &frame[..HEADER_LEN + view.body_len()],
            &mut [],
            Tag::from_slice(view.tag()),
        )
        .map_err(|_| FrameError::BadAuth)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn test_hchacha20_draft_vector() {
        // draft-irtf-cfrg-xchacha-03 §2.2.1
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let input = [
            0x00, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x4a, 0x00, 0x00, 0x00, 0x00, 0x31, 0x41,
            0x59, 0x27,
        ];
        let want = [
            0x82, 0x41, 0x3b, 0x42, 0x27, 0xb2, 0x7b, 0xfe, 0xd3, 0x0e, 0x42, 0x50, 0x8a, 0x87,
            0x7d, 0x73, 0xa0, 0xf9, 0xe4, 0xd5, 0x8a, 0x74, 0xa8, 0x53, 0xc1, 0x2e, 0xc4, 0x13,
            0x26, 0xd3, 0xec, 0xdc,
        ];
        assert_eq!(hchacha20(&key, &input), want);
    }

    #[test]
    fn test_keys_differ() {
        let root = root_key(&[1; 32]);
        let a = connection_key(&root, &[2; 16]);
        let b = connection_key(&root, &[3; 16]);
        assert_ne!(a, b);
        let t = traffic_keys(&a, &[0; 12]);
        assert_ne!(t.device_to_gateway, t.gateway_to_device);
        assert_ne!(hello_key(&a), t.device_to_gateway);
        assert_ne!(traffic_keys(&a, &[1; 12]), t);
    }

    #[test]
    fn test_nonce() {
        assert_eq!(nonce(0x0403_0201), [1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
