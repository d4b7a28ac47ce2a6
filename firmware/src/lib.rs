#![no_std]
#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]
#![warn(missing_docs)]

// First module, so its macros are visible everywhere below.
mod fmt;

pub mod backoff;
pub mod outbox;

/// A record's per-device sequence number. Seqs start at 1 and never repeat for one device.
pub type Seq = u64;
