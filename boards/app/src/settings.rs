//! Device settings: identity, key, gateways, sampling rate.
//!
//! Boards get their settings at build time from environment variables (see the crate
//! README); `build.rs` parses them with this very module, so a bad value fails the build
//! with a clear message, and the result is compiled in as [`BUILD`](crate::BUILD). The QEMU
//! board can also override them at run time from the semihosting command line
//! (`-append "records=50 gateways=10.0.2.2:4003"`), through [`Settings::apply`].
//!
//! This file has no dependencies so that `build.rs` can include it by path.

/// How many gateway addresses a device knows.
pub const MAX_GATEWAYS: usize = 4;

/// An IPv4 gateway address (`device-addr` of a `cairn node`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub ip: [u8; 4],
    pub port: u16,
}

/// Everything the application needs to know about itself and where to send records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The device id registered with `cairn device add --id N`.
    pub device_id: u64,
    /// The pre-shared key registered with `cairn device add --key HEX`.
    pub key: [u8; 32],
    /// Gateways to try, in order; the first is the preferred one.
    pub gateways: [Gateway; MAX_GATEWAYS],
    pub gateway_count: usize,
    /// Sampling period of the fake sensor.
    pub period_ms: u32,
    /// Stop after this many samples (0: run forever). Tests use it; real boards leave it 0.
    pub samples: u32,
}

/// Why a `key=value` setting was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingError {
    /// Not of the form `key=value`, or an unknown key.
    UnknownKey,
    /// Not a decimal number in range.
    BadNumber,
    /// Not 64 hex digits.
    BadKey,
    /// Not `a.b.c.d:port`.
    BadAddress,
    /// No gateway, or more than [`MAX_GATEWAYS`].
    GatewayCount,
}

impl core::fmt::Display for SettingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::UnknownKey => {
                "unknown setting (expected device-id, key, gateways, period-ms or samples)"
            }
            Self::BadNumber => "not a decimal number in range",
            Self::BadKey => "key must be 64 hex digits (32 bytes)",
            Self::BadAddress => "gateway must be IPV4:PORT",
            Self::GatewayCount => "between 1 and 4 gateways",
        })
    }
}

/// The development key used when none is configured: bytes 0, 1, ..., 31.
/// `cairn dev` and the tests register it; never ship it.
pub const DEV_KEY: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = i as u8;
        i += 1;
    }
    k
};

impl Settings {
    /// Defaults: device 1, the development key, the gateway QEMU's user network reaches
    /// (10.0.2.2:4003, the host's 127.0.0.1:4003), one sample per second, forever.
    pub const fn defaults() -> Self {
        let none = Gateway {
            ip: [0; 4],
            port: 0,
        };
        let mut gateways = [none; MAX_GATEWAYS];
        gateways[0] = Gateway {
            ip: [10, 0, 2, 2],
            port: 4003,
        };
        Self {
            device_id: 1,
            key: DEV_KEY,
            gateways,
            gateway_count: 1,
            period_ms: 1000,
            samples: 0,
        }
    }

    /// The configured gateways.
    pub fn gateways(&self) -> &[Gateway] {
        &self.gateways[..self.gateway_count]
    }

    /// Applies one `key=value` setting.
    pub fn apply(&mut self, setting: &str) -> Result<(), SettingError> {
        let (key, value) = setting.split_once('=').ok_or(SettingError::UnknownKey)?;
        match key {
            "device-id" => self.device_id = value.parse().map_err(|_| SettingError::BadNumber)?,
            "key" => self.key = parse_key(value)?,
            "gateways" => {
                let mut count = 0;
                for addr in value.split(',') {
                    let slot = self
                        .gateways
                        .get_mut(count)
                        .ok_or(SettingError::GatewayCount)?;
                    *slot = parse_gateway(addr)?;
                    count += 1;
                }
                self.gateway_count = count;
            }
            "period-ms" => {
                self.period_ms = value.parse().map_err(|_| SettingError::BadNumber)?;
                if self.period_ms == 0 {
                    return Err(SettingError::BadNumber);
                }
            }
            "samples" => self.samples = value.parse().map_err(|_| SettingError::BadNumber)?,
            _ => return Err(SettingError::UnknownKey),
        }
        Ok(())
    }
}

fn parse_key(hex: &str) -> Result<[u8; 32], SettingError> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return Err(SettingError::BadKey);
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(hex.chunks(2)) {
        let digit = |c: u8| (c as char).to_digit(16).ok_or(SettingError::BadKey);
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok(key)
}

fn parse_gateway(addr: &str) -> Result<Gateway, SettingError> {
    let (ip, port) = addr.rsplit_once(':').ok_or(SettingError::BadAddress)?;
    let port = port.parse().map_err(|_| SettingError::BadAddress)?;
    let mut octets = [0u8; 4];
    let mut parts = ip.split('.');
    for octet in octets.iter_mut() {
        let part = parts.next().ok_or(SettingError::BadAddress)?;
        *octet = part.parse().map_err(|_| SettingError::BadAddress)?;
    }
    if parts.next().is_some() || port == 0 {
        return Err(SettingError::BadAddress);
    }
    Ok(Gateway { ip: octets, port })
}
