//! The device settings region: a device's identity (id and pre-shared key) and its gateways,
//! kept in a small block of the device's flash so that one firmware image serves a fleet.
//!
//! `cairn device add --generate --provision-out FILE` and `cairn device provision` write the
//! block; boards read it at boot with [`DeviceSettings::decode`] (re-exported as
//! `cairn_firmware::settings`). Both sides use this one codec.
//!
//! # Format (version 1, [`SETTINGS_LEN`] = 96 bytes, integers little-endian)
//!
//! | offset | bytes | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `CRNS` |
//! | 4 | 1 | format version, `1` |
//! | 5 | 1 | number of gateways, 1 ..= [`MAX_GATEWAYS`] |
//! | 6 | 2 | length of the whole block, `96` (so a later version can grow it) |
//! | 8 | 8 | device id (`u64`) |
//! | 16 | 32 | pre-shared key |
//! | 48 | 24 | 4 gateways, 6 bytes each: IPv4 address, port (`u16`); unused slots zero |
//! | 72 | 20 | reserved, zero |
//! | 92 | 4 | CRC-32 (IEEE 802.3, as zlib's `crc32`) of bytes 0..92 |
//!
//! Erased NOR flash reads all `0xFF`: such a region (or an all-zero one) is
//! [`SettingsError::Blank`]. The block is 96 bytes so that it is a whole number of write words
//! for every flash this project meets (1, 4, 8, 16 and 32 bytes).

use crate::message::GatewayAddr;
use crate::security::KEY_LEN;

/// Length of an encoded settings block (version 1).
pub const SETTINGS_LEN: usize = 96;
/// The most gateways a settings block names.
pub const MAX_GATEWAYS: usize = 4;
/// The first four bytes of a settings block.
pub const SETTINGS_MAGIC: [u8; 4] = *b"CRNS";
/// The format version this crate writes and reads.
pub const SETTINGS_VERSION: u8 = 1;

const CRC_AT: usize = SETTINGS_LEN - 4;

/// A device's identity and gateways, as stored in its settings region.
///
/// `Debug` and `defmt::Format` never show the key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DeviceSettings {
    /// The id registered with `cairn device add --id N`.
    pub device_id: u64,
    /// The device's pre-shared key.
    pub key: [u8; KEY_LEN],
    gateways: [GatewayAddr; MAX_GATEWAYS],
    gateway_count: u8,
}

/// Why a settings block was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SettingsError {
    /// The region is erased (all `0xFF`) or all zeros: the device was never provisioned.
    Blank,
    /// Shorter than [`SETTINGS_LEN`], or it does not start with [`SETTINGS_MAGIC`].
    NotSettings,
    /// Written by a newer format version than this firmware reads.
    UnsupportedVersion(u8),
    /// The length field does not match the version.
    BadLength,
    /// The CRC does not match: a torn or corrupted write.
    BadCrc,
    /// No gateway, more than [`MAX_GATEWAYS`], or a gateway with port 0.
    BadGateways,
}

impl core::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Blank => f.write_str("settings region is blank (device not provisioned)"),
            Self::NotSettings => f.write_str("settings region holds no Cairn settings block"),
            Self::UnsupportedVersion(v) => {
                write!(f, "settings format version {v} is not supported")
            }
            Self::BadLength => f.write_str("settings block has a wrong length field"),
            Self::BadCrc => f.write_str("settings block CRC mismatch (torn or corrupted)"),
            Self::BadGateways => f.write_str("settings need 1 to 4 gateways, none with port 0"),
        }
    }
}

impl core::error::Error for SettingsError {}

impl core::fmt::Debug for DeviceSettings {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceSettings")
            .field("device_id", &self.device_id)
            .field("key", &"<redacted>")
            .field("gateways", &self.gateways())
            .finish()
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for DeviceSettings {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "DeviceSettings {{ device_id: {}, gateways: {} }}",
            self.device_id,
            self.gateways()
        )
    }
}

impl DeviceSettings {
    /// Settings for `device_id` with `key`, trying `gateways` in order (1 to
    /// [`MAX_GATEWAYS`], none with port 0).
    pub fn new(
        device_id: u64,
        key: [u8; KEY_LEN],
        gateways: &[GatewayAddr],
    ) -> Result<Self, SettingsError> {
        if gateways.is_empty()
            || gateways.len() > MAX_GATEWAYS
            || gateways.iter().any(|g| g.port == 0)
        {
            return Err(SettingsError::BadGateways);
        }
        let mut slots = [GatewayAddr::new([0; 4], 0); MAX_GATEWAYS];
        slots[..gateways.len()].copy_from_slice(gateways);
        Ok(Self {
            device_id,
            key,
            gateways: slots,
            gateway_count: gateways.len() as u8,
        })
    }

    /// The gateways, in the order the device tries them.
    pub fn gateways(&self) -> &[GatewayAddr] {
        &self.gateways[..usize::from(self.gateway_count)]
    }

    /// The settings block to write at the start of the region.
    pub fn encode(&self) -> [u8; SETTINGS_LEN] {
        let mut b = [0u8; SETTINGS_LEN];
        b[..4].copy_from_slice(&SETTINGS_MAGIC);
        b[4] = SETTINGS_VERSION;
        b[5] = self.gateway_count;
        b[6..8].copy_from_slice(&(SETTINGS_LEN as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.device_id.to_le_bytes());
        b[16..48].copy_from_slice(&self.key);
        for (slot, g) in b[48..72].chunks_exact_mut(6).zip(self.gateways()) {
            slot[..4].copy_from_slice(&g.ip);
            slot[4..].copy_from_slice(&g.port.to_le_bytes());
        }
        let crc = crc32(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads a settings block from the start of `region` (bytes after [`SETTINGS_LEN`] are
    /// ignored). Never panics, whatever the bytes.
    pub fn decode(region: &[u8]) -> Result<Self, SettingsError> {
        let Some(b) = region.get(..SETTINGS_LEN) else {
            return Err(SettingsError::NotSettings);
        };
        if b.iter().all(|&x| x == 0xFF) || b.iter().all(|&x| x == 0) {
            return Err(SettingsError::Blank);
        }
        if b[..4] != SETTINGS_MAGIC {
            return Err(SettingsError::NotSettings);
        }
        if b[4] != SETTINGS_VERSION {
            return Err(SettingsError::UnsupportedVersion(b[4]));
        }
        if u16::from_le_bytes([b[6], b[7]]) as usize != SETTINGS_LEN {
            return Err(SettingsError::BadLength);
        }
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&b[CRC_AT..]);
        if crc32(&b[..CRC_AT]) != u32::from_le_bytes(crc) {
            return Err(SettingsError::BadCrc);
        }
        let count = usize::from(b[5]);
        if count == 0 || count > MAX_GATEWAYS {
            return Err(SettingsError::BadGateways);
        }
        let mut gateways = [GatewayAddr::new([0; 4], 0); MAX_GATEWAYS];
        for (g, slot) in gateways.iter_mut().zip(b[48..72].chunks_exact(6)) {
            g.ip.copy_from_slice(&slot[..4]);
            g.port = u16::from_le_bytes([slot[4], slot[5]]);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[8..16]);
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&b[16..48]);
        Self::new(u64::from_le_bytes(id), key, &gateways[..count])
    }
}

/// Why a key did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BadKey;

impl core::fmt::Display for BadKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "a device key is {} hex digits ({KEY_LEN} bytes)",
            2 * KEY_LEN
        )
    }
}

impl core::error::Error for BadKey {}

/// Parses a device key given as 64 hex digits (either case; surrounding whitespace ignored),
/// the form `cairn device add --key` and `cairn device provision --key` take.
pub fn parse_key(hex: &str) -> Result<[u8; KEY_LEN], BadKey> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 2 * KEY_LEN {
        return Err(BadKey);
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8).ok_or(BadKey);
    let mut key = [0u8; KEY_LEN];
    for (byte, pair) in key.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Ok(key)
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`), four bits at a time from a 64-byte
/// table. Used by the settings block and by the firmware's flash log.
pub fn crc32(data: &[u8]) -> u32 {
    const T: [u32; 16] = {
        let mut t = [0u32; 16];
        let mut i = 0;
        while i < 16 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 4 {
                c = (c >> 1) ^ (0xEDB8_8320 & (c & 1).wrapping_neg());
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for b in data {
        crc ^= u32::from(*b);
        crc = (crc >> 4) ^ T[(crc & 15) as usize];
        crc = (crc >> 4) ^ T[(crc & 15) as usize];
    }
    !crc
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::format;

    fn sample() -> DeviceSettings {
        let mut key = [0u8; KEY_LEN];
        for (i, k) in key.iter_mut().enumerate() {
            *k = 0xA0 ^ i as u8;
        }
        DeviceSettings::new(
            0x1234_5678_9abc,
            key,
            &[
                GatewayAddr::new([10, 0, 2, 2], 4003),
                GatewayAddr::new([192, 168, 1, 7], 65535),
            ],
        )
        .unwrap()
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn encode_decode_round_trip() {
        let s = sample();
        let block = s.encode();
        assert_eq!(&block[..4], b"CRNS");
        assert_eq!(block[4], 1);
        assert_eq!(block[5], 2);
        let mut region = [0xFFu8; 4096];
        region[..SETTINGS_LEN].copy_from_slice(&block);
        let back = DeviceSettings::decode(&region).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.gateways().len(), 2);
        assert_eq!(
            back.gateways()[1],
            GatewayAddr::new([192, 168, 1, 7], 65535)
        );
    }

    #[test]
    fn blank_and_foreign_regions_are_refused() {
        assert_eq!(
            DeviceSettings::decode(&[0xFF; 4096]),
            Err(SettingsError::Blank)
        );
        assert_eq!(
            DeviceSettings::decode(&[0; SETTINGS_LEN]),
            Err(SettingsError::Blank)
        );
        assert_eq!(
            DeviceSettings::decode(&[0xFF; 95]),
            Err(SettingsError::NotSettings)
        );
        let mut other = [0x11u8; SETTINGS_LEN];
        other[..4].copy_from_slice(b"ELF\0");
        assert_eq!(
            DeviceSettings::decode(&other),
            Err(SettingsError::NotSettings)
        );
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let block = sample().encode();
        for byte in 0..SETTINGS_LEN {
            for bit in 0..8 {
                let mut b = block;
                b[byte] ^= 1 << bit;
                assert!(
                    DeviceSettings::decode(&b).is_err(),
                    "flip {byte}:{bit} accepted"
                );
            }
        }
    }

    #[test]
    fn torn_write_is_refused() {
        // Programming stopped part-way: the tail is still erased.
        let block = sample().encode();
        for cut in 1..SETTINGS_LEN {
            let mut b = [0xFFu8; SETTINGS_LEN];
            b[..cut].copy_from_slice(&block[..cut]);
            assert!(DeviceSettings::decode(&b).is_err(), "cut at {cut} accepted");
        }
    }

    #[test]
    fn newer_version_and_bad_fields_are_refused() {
        let mut b = sample().encode();
        b[4] = 2;
        assert_eq!(
            DeviceSettings::decode(&b),
            Err(SettingsError::UnsupportedVersion(2))
        );
        // A consistent block (good CRC) with zero gateways.
        let mut b = sample().encode();
        b[5] = 0;
        let crc = crc32(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(DeviceSettings::decode(&b), Err(SettingsError::BadGateways));
        assert_eq!(
            DeviceSettings::new(1, [0; KEY_LEN], &[]),
            Err(SettingsError::BadGateways)
        );
        assert_eq!(
            DeviceSettings::new(1, [0; KEY_LEN], &[GatewayAddr::new([1, 2, 3, 4], 0)]),
            Err(SettingsError::BadGateways)
        );
    }

    #[test]
    fn parse_key_accepts_64_hex_digits_only() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let key = parse_key(hex).unwrap();
        assert_eq!(key[1], 0x11);
        assert_eq!(key[31], 0xFF);
        let lower: std::string::String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_key(&lower), Ok(key));
        assert_eq!(
            parse_key(" 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n"),
            Ok(key)
        );
        assert_eq!(parse_key("0011"), Err(BadKey));
        assert_eq!(parse_key(&"zz".repeat(32)[..]), Err(BadKey));
        assert_eq!(
            parse_key("+0112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"),
            Err(BadKey)
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let s = sample();
        let text = format!("{s:?}");
        assert!(text.contains("redacted") && !text.contains("160"), "{text}");
    }
}
