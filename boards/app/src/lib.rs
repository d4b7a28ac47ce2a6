#![no_std]
#![doc = include_str!("../README.md")]

#[macro_use]
mod fmt;

#[cfg(feature = "client")]
mod client;
#[cfg(not(feature = "client"))]
mod echo;
pub mod sensor;
mod settings;

#[cfg(feature = "client")]
pub use cairn_firmware::BootNonce;
pub use settings::{DEV_KEY, Gateway, MAX_GATEWAYS, SettingError, Settings};

include!(concat!(env!("OUT_DIR"), "/build_settings.rs"));

pub use cairn_protocol::settings::{DeviceSettings, SETTINGS_LEN, SettingsError as RegionError};

/// True in a development build (feature `dev-settings`): an unprovisioned device falls back
/// to [`BUILD`] and its identity may be overridden (QEMU's command line).
pub const DEV_SETTINGS: bool = cfg!(feature = "dev-settings");

impl Settings {
    /// These settings with the identity (device id, key, gateways) of a settings region.
    pub fn with_identity(mut self, identity: &DeviceSettings) -> Self {
        self.device_id = identity.device_id;
        self.key = identity.key;
        let none = Gateway {
            ip: [0; 4],
            port: 0,
        };
        self.gateways = [none; MAX_GATEWAYS];
        for (to, from) in self.gateways.iter_mut().zip(identity.gateways()) {
            *to = Gateway {
                ip: from.ip,
                port: from.port,
            };
        }
        self.gateway_count = identity.gateways().len();
        self
    }
}

/// The settings a board boots with, given the first [`SETTINGS_LEN`] (or more) bytes of its
/// settings region (written by `cairn device add --provision-out` or `cairn device
/// provision`): the region's identity over [`BUILD`]'s sampling settings. A blank or invalid
/// region is an error, which the board must treat as "refuse to start", unless this is a
/// development build (`dev-settings`), which then runs as [`BUILD`] says (by default device 1
/// with the development key).
pub fn boot_settings(region: &[u8]) -> Result<Settings, RegionError> {
    match DeviceSettings::decode(region) {
        Ok(identity) => {
            info!(
                "cairn: provisioned as device {}, {} gateway(s)",
                identity.device_id,
                identity.gateways().len()
            );
            Ok(BUILD.with_identity(&identity))
        }
        Err(e) if DEV_SETTINGS => {
            warn!(
                "cairn: settings region: {}; development build: device {} with the build's key",
                e, BUILD.device_id
            );
            Ok(BUILD)
        }
        Err(e) => {
            error!("cairn: settings region: {}; refusing to start", e);
            Err(e)
        }
    }
}

use embassy_net::Stack;

/// TCP socket buffers, the same with and without the client so that `cargo xtask size`
/// shows Cairn's own cost: the receive side holds only small gateway frames; the send side
/// at least one whole batch frame (1024 bytes) and a half, for throughput.
pub const TCP_RX_BYTES: usize = 512;
pub const TCP_TX_BYTES: usize = 1536;

/// What a finished run did. Boards log it as `cairn: done samples=N pushed=N acked=N`
/// (the line `cargo xtask qemu` reads) before they exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Report {
    /// Sensor samples taken.
    pub samples: u32,
    /// Records handed to the client (one per stream reading).
    pub pushed: u32,
    /// Records acknowledged: committed on a quorum of gateways (skeleton: echoed back intact).
    pub acked: u32,
}

/// Why a run stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AppError {
    /// No gateway accepted a TCP connection.
    Unreachable,
    /// The connection failed mid-run.
    ConnectionLost,
    /// The peer sent back something other than what was sent (skeleton only).
    EchoMismatch,
    /// A finite run ended with records still unacknowledged.
    NotAcknowledged,
    /// The flash outbox could not be opened or read.
    Flash,
}

impl AppError {
    /// The process exit code boards report for this error (semihosting, host process).
    pub const fn exit_code(self) -> i32 {
        match self {
            Self::Unreachable => 2,
            Self::ConnectionLost => 3,
            Self::EchoMismatch => 4,
            Self::NotAcknowledged => 7,
            Self::Flash => 8,
        }
    }
}

/// Runs the application on a network stack whose runner is already being polled:
/// waits for DHCP, then samples the fake sensor every `settings.period_ms` and sends the
/// readings to the gateways. Returns after `settings.samples` samples (never when 0).
///
/// `boot` is the boot number sent in the Hello (the time base of the records' uptimes);
/// `boot_nonce` must never repeat under the device's key (protocol/SPEC.md §5.2 says where
/// each board takes it from).
#[cfg(feature = "client")]
pub async fn run(
    stack: Stack<'_>,
    settings: &Settings,
    boot: u32,
    boot_nonce: BootNonce,
) -> Result<Report, AppError> {
    wait_for_address(stack, settings).await;
    finish(client::run(stack, settings, boot, boot_nonce).await)
}

/// The network skeleton (no client): DHCP and a TCP echo exchange.
#[cfg(not(feature = "client"))]
pub async fn run(stack: Stack<'_>, settings: &Settings) -> Result<Report, AppError> {
    wait_for_address(stack, settings).await;
    finish(echo::run(stack, settings).await)
}

/// [`run`] with the client's outbox mirrored in NOR flash (feature `flash-outbox`), so
/// unacknowledged records survive resets; the boot number comes from the flash's boot
/// counter, and so does the boot nonce, mixed with the board's `entropy` (SPEC.md §5.2).
/// `region` is a byte range of `flash` aligned to its erase units, at least two of them (see
/// `cairn_firmware::flash` for sizing and wear).
#[cfg(feature = "flash-outbox")]
pub async fn run_with_flash<F: embedded_storage_async::nor_flash::NorFlash>(
    stack: Stack<'_>,
    settings: &Settings,
    flash: F,
    region: core::ops::Range<u32>,
    entropy: [u8; 8],
) -> Result<Report, AppError> {
    wait_for_address(stack, settings).await;
    finish(client::run_with_flash(stack, settings, flash, region, entropy).await)
}

async fn wait_for_address(stack: Stack<'_>, settings: &Settings) {
    info!(
        "cairn: device {} waiting for an address",
        settings.device_id
    );
    stack.wait_config_up().await;
    if let Some(config) = stack.config_v4() {
        info!("cairn: address {}", config.address);
    }
}

fn finish(report: Result<Report, AppError>) -> Result<Report, AppError> {
    if let Ok(report) = &report {
        info!(
            "cairn: done samples={} pushed={} acked={}",
            report.samples, report.pushed, report.acked
        );
    }
    report
}
