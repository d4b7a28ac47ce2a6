#![no_std]
#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]
#![warn(missing_docs)]

// First module, so its macros are visible everywhere below.
mod fmt;

pub mod backoff;
mod client;
#[cfg(feature = "embassy-net")]
pub mod embassy_net;
#[cfg(feature = "flash-outbox")]
pub mod flash;
#[cfg(feature = "std")]
pub mod host_time;
pub mod nonce;
pub mod outbox;
pub mod record;
pub mod store;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod transport;

/// The device settings region (id, key, gateways; versioned, CRC-checked): read it at boot
/// so one image serves a fleet. The codec lives in `cairn-protocol` so that the `cairn` CLI
/// writes regions with the very code devices read them with.
pub use cairn_protocol::settings;
pub use cairn_protocol::{ErrorCode, GatewayAddr, KEY_LEN, MAX_BLOB, MAX_VALUES};
pub use client::{Client, Config, ConnectionState, PushError, Pushed, Status, Value};
pub use nonce::BootNonce;
pub use outbox::OverflowPolicy;
pub use store::{RamOnly, Store};
pub use transport::{Connection, Transport, TransportError};

/// A record's per-device sequence number. Seqs start at 1 and never repeat for one device.
pub type Seq = u64;
