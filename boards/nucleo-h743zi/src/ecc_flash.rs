//! The STM32H7's internal flash with reads that survive a torn word.
//!
//! Every 256-bit flash word of the H7 carries ECC. A word whose programming was cut by a power
//! loss usually fails its ECC check, and the CPU's read of it ends in a bus error: with
//! embassy-stm32 0.6 (its `read` is a memory copy) that is a BusFault, escalated to a
//! HardFault, and the board reboots into the same read for ever. The flash outbox
//! (`cairn_firmware::flash`) counts a failed read as a torn word and skips it, so all this
//! driver has to do is turn the bus error into `Err`.
//!
//! How: the copy runs with FAULTMASK set and `SCB.CCR.BFHFNMIGN` on, the Cortex-M7's documented
//! way to probe memory: a precise data bus error at that priority is ignored instead of taken
//! (the load returns an unknown value). The flash controller still latches the double-error
//! flag (`FLASH_SRx.DBECCERR`) of the bank read; if it is set after the copy, the flag is
//! cleared and the read returns [`Error::Prog`]. A single-bit error (`SNECCERR`) was corrected
//! by the hardware: its flag is cleared and the data is good. Interrupts wait for the length of
//! one copy (the outbox reads at most one record, a few hundred bytes, at a time).
//!
//! Writes and erases go to embassy-stm32's driver unchanged. The driver never dereferences a
//! flash address outside this module's copy.

use core::sync::atomic::{Ordering, compiler_fence};

use embassy_stm32::flash::{Async, Error, FLASH_BASE, FLASH_SIZE, Flash};
use embassy_stm32::pac;
use embedded_storage_async::nor_flash::{ErrorType, NorFlash, ReadNorFlash};

/// Bytes per bank of the STM32H743ZI (two banks of 1 MiB).
const BANK_SIZE: u32 = 0x10_0000;

/// `SCB.CCR` bit 8: handlers at priority -1 or -2 (and code running with FAULTMASK set)
/// ignore precise data bus faults of loads and stores.
const CCR_BFHFNMIGN: u32 = 1 << 8;

/// [`Flash`] whose [`read`](ReadNorFlash::read) reports an uncorrectable ECC error as
/// `Err(Error::Prog)` instead of faulting.
pub struct EccSafeFlash<'d> {
    inner: Flash<'d, Async>,
}

impl<'d> EccSafeFlash<'d> {
    pub fn new(inner: Flash<'d, Async>) -> Self {
        // SAFETY: setting BFHFNMIGN only changes what happens to a data bus fault while
        // FAULTMASK is set or a priority -1/-2 handler runs; this module is the only code
        // that sets FAULTMASK, and HardFault/NMI handlers here never touch memory that faults.
        unsafe {
            (*cortex_m::peripheral::SCB::PTR)
                .ccr
                .modify(|ccr| ccr | CCR_BFHFNMIGN);
        }
        EccSafeFlash { inner }
    }
}

/// Clears the ECC flags of flash bank `bank` (0 or 1); `true` if a double error was latched.
fn take_double_error(bank: usize) -> bool {
    let regs = pac::FLASH.bank(bank);
    let sr = regs.sr().read();
    let double = sr.dbeccerr();
    if double || sr.sneccerr1() {
        regs.ccr().write(|w| {
            w.set_clr_dbeccerr(double);
            w.set_clr_sneccerr(sr.sneccerr1());
        });
    }
    double
}

/// Copies `dst.len()` bytes from flash offset `offset` with bus errors ignored; `false` if a
/// bank read reported an uncorrectable ECC error.
fn probe_copy(offset: u32, dst: &mut [u8]) -> bool {
    let first = (offset / BANK_SIZE) as usize;
    let last = ((offset + dst.len().saturating_sub(1) as u32) / BANK_SIZE) as usize;
    // Flags left from an earlier access are not this read's.
    for bank in first..=last {
        take_double_error(bank);
    }
    let src = (FLASH_BASE as u32 + offset) as *const u8;
    // SAFETY: FAULTMASK is set around the copy and restored after it (the copy cannot fault
    // with BFHFNMIGN on: a bus error is ignored); `src..src + len` is inside the flash (the
    // caller checked the bounds) and `dst` is a valid buffer of `len` bytes.
    unsafe {
        core::arch::asm!("cpsid f", options(nomem, nostack, preserves_flags));
        compiler_fence(Ordering::SeqCst);
        for (i, b) in dst.iter_mut().enumerate() {
            *b = core::ptr::read_volatile(src.add(i));
        }
        cortex_m::asm::dsb();
        compiler_fence(Ordering::SeqCst);
        core::arch::asm!("cpsie f", options(nomem, nostack, preserves_flags));
    }
    let mut clean = true;
    for bank in first..=last {
        clean &= !take_double_error(bank);
    }
    clean
}

impl ErrorType for EccSafeFlash<'_> {
    type Error = Error;
}

impl ReadNorFlash for EccSafeFlash<'_> {
    const READ_SIZE: usize = <Flash<'static, Async> as ReadNorFlash>::READ_SIZE;

    async fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Error> {
        let end = offset as usize + bytes.len();
        if end > FLASH_SIZE {
            return Err(Error::Size);
        }
        if probe_copy(offset, bytes) {
            Ok(())
        } else {
            Err(Error::Prog)
        }
    }

    fn capacity(&self) -> usize {
        FLASH_SIZE
    }
}

impl NorFlash for EccSafeFlash<'_> {
    const WRITE_SIZE: usize = <Flash<'static, Async> as NorFlash>::WRITE_SIZE;
    const ERASE_SIZE: usize = <Flash<'static, Async> as NorFlash>::ERASE_SIZE;

    async fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Error> {
        NorFlash::write(&mut self.inner, offset, bytes).await
    }

    async fn erase(&mut self, from: u32, to: u32) -> Result<(), Error> {
        NorFlash::erase(&mut self.inner, from, to).await
    }
}
