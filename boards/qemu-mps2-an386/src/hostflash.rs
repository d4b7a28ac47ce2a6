//! NOR flash on a board that has none: QEMU's mps2 boards map only RAM. This flash keeps
//! its cells in a file on the host, reached through semihosting file calls, so its contents
//! survive the image being killed and booted again (the power cut the flash outbox exists
//! for). Layout: the settings region in the first 4 KiB page ([`SETTINGS`]), then the flash
//! outbox's 64 KiB ([`OUTBOX`]). A shorter file is extended with erased cells, so the 96-byte
//! file `cairn device add --provision-out` writes is a flash file as it stands. It behaves as NOR does: erase sets a 4 KiB page to
//! 0xFF, a write can only clear bits (new = old AND data). It implements only `NorFlash`:
//! the flash outbox never writes a word twice, so it needs no `MultiwriteNorFlash`.

use core::ffi::CStr;
use embedded_storage_async::nor_flash::{ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash};
use semihosting::fs::File;
use semihosting::io::{Read, Seek, SeekFrom, Write};

/// 17 pages of 4 KiB: the settings page and 16 for the outbox.
pub const CAPACITY: usize = 68 * 1024;
const PAGE: usize = 4096;
/// The settings region (device id, key, gateways): the first page.
pub const SETTINGS: core::ops::Range<u32> = 0..PAGE as u32;
/// The flash outbox's log: the other 16 pages.
#[cfg_attr(not(feature = "flash-outbox"), allow(dead_code))]
pub const OUTBOX: core::ops::Range<u32> = PAGE as u32..CAPACITY as u32;
const WORD: usize = 4;

pub struct HostFlash {
    file: File,
}

impl HostFlash {
    /// Opens the flash file, creating it if it does not exist; a file shorter than
    /// [`CAPACITY`] (a new one, or a settings file) is extended with erased cells (0xFF). A
    /// longer file is refused rather than cut.
    pub fn open(path: &CStr) -> Result<Self, NorFlashErrorKind> {
        // Semihosting opens read-write without creating, or creates by truncating.
        let file = match File::options().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(_) => File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|_| NorFlashErrorKind::Other)?,
        };
        let len = file.metadata().map_err(|_| NorFlashErrorKind::Other)?.len() as usize;
        if len > CAPACITY {
            return Err(NorFlashErrorKind::OutOfBounds);
        }
        let mut flash = Self { file };
        flash.fill(len, CAPACITY)?;
        Ok(flash)
    }

    fn seek(&mut self, offset: usize) -> Result<(), NorFlashErrorKind> {
        self.file
            .seek(SeekFrom::Start(offset as u64))
            .map(drop)
            .map_err(|_| NorFlashErrorKind::Other)
    }

    fn fill(&mut self, from: usize, to: usize) -> Result<(), NorFlashErrorKind> {
        let erased = [0xFF; 256];
        self.seek(from)?;
        let mut at = from;
        while at < to {
            let n = (to - at).min(erased.len());
            self.file
                .write_all(&erased[..n])
                .map_err(|_| NorFlashErrorKind::Other)?;
            at += n;
        }
        Ok(())
    }
}

fn check(offset: u32, len: usize, align: usize) -> Result<(usize, usize), NorFlashErrorKind> {
    let from = offset as usize;
    let to = from
        .checked_add(len)
        .ok_or(NorFlashErrorKind::OutOfBounds)?;
    if to > CAPACITY {
        return Err(NorFlashErrorKind::OutOfBounds);
    }
    if !from.is_multiple_of(align) || !to.is_multiple_of(align) {
        return Err(NorFlashErrorKind::NotAligned);
    }
    Ok((from, to))
}

impl ErrorType for HostFlash {
    type Error = NorFlashErrorKind;
}

impl ReadNorFlash for HostFlash {
    const READ_SIZE: usize = 1;

    async fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        let (from, _) = check(offset, bytes.len(), 1)?;
        self.seek(from)?;
        self.file
            .read_exact(bytes)
            .map_err(|_| NorFlashErrorKind::Other)
    }

    fn capacity(&self) -> usize {
        CAPACITY
    }
}

impl NorFlash for HostFlash {
    const WRITE_SIZE: usize = WORD;
    const ERASE_SIZE: usize = PAGE;

    async fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        let len = to.checked_sub(from).ok_or(NorFlashErrorKind::OutOfBounds)? as usize;
        let (from, to) = check(from, len, PAGE)?;
        self.fill(from, to)
    }

    async fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        let (from, _) = check(offset, bytes.len(), WORD)?;
        let mut cells = [0u8; 256];
        for (i, chunk) in bytes.chunks(cells.len()).enumerate() {
            let at = from + i * cells.len();
            let cells = &mut cells[..chunk.len()];
            self.seek(at)?;
            self.file
                .read_exact(cells)
                .map_err(|_| NorFlashErrorKind::Other)?;
            // NOR programming only clears bits.
            for (cell, new) in cells.iter_mut().zip(chunk) {
                *cell &= new;
            }
            self.seek(at)?;
            self.file
                .write_all(cells)
                .map_err(|_| NorFlashErrorKind::Other)?;
        }
        Ok(())
    }
}
