//! Where a boot's nonce comes from (protocol 2, SPEC.md §5.2).
//!
//! Every connection's Hello carries a device nonce: this boot's [`BootNonce`] followed by the
//! connection number. The security of the device's side (a recorded Welcome or Ack must
//! never open on a later connection) rests on the boot nonce never repeating under the
//! device's key, so there is one constructor per acceptable source and none for "whatever is
//! at hand": a board without a random number generator or a persisted counter does not build
//! unless it enables the cargo feature `insecure-nonce`, which names the risk.

use cairn_protocol::BOOT_NONCE_LEN;

/// Twelve bytes that never repeat under one device key. See the module documentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BootNonce([u8; BOOT_NONCE_LEN]);

impl BootNonce {
    /// From a cryptographic random number generator: a hardware TRNG (the STM32H7's RNG
    /// peripheral) or the operating system's (host builds). Random 96-bit nonces collide with
    /// probability about n²/2^97 after n boots.
    pub const fn from_rng(bytes: [u8; BOOT_NONCE_LEN]) -> Self {
        BootNonce(bytes)
    }

    /// From a boot counter persisted in flash, incremented and written before the first
    /// Hello of the boot and never going back (`flash::FlashOutbox::boot`), mixed with
    /// whatever entropy the board has (a ring oscillator, a clock). Unique as long as the
    /// counter is; the entropy covers part of the case where the flash is erased.
    pub const fn from_counter(counter: u32, entropy: [u8; 8]) -> Self {
        let c = counter.to_le_bytes();
        let e = entropy;
        BootNonce([
            c[0], c[1], c[2], c[3], e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7],
        ])
    }

    /// From a source that is neither random nor persisted (a ring oscillator the vendor calls
    /// unfit for security, a clock in seconds). Two boots that draw the same bytes let a
    /// recorded Welcome and Acks be replayed to the device, which then drops records that were
    /// never stored. Only with the cargo feature `insecure-nonce`.
    #[cfg(feature = "insecure-nonce")]
    pub const fn insecure(bytes: [u8; BOOT_NONCE_LEN]) -> Self {
        BootNonce(bytes)
    }

    /// The twelve bytes.
    pub const fn bytes(&self) -> [u8; BOOT_NONCE_LEN] {
        self.0
    }
}

impl core::fmt::Debug for BootNonce {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("BootNonce(..)")
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for BootNonce {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "BootNonce(..)")
    }
}
