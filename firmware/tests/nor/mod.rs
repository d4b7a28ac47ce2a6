//! A NOR flash model for the flash-outbox tests, stricter than real parts:
//! - write words of `W` bytes and erase units of `E` bytes; misaligned calls panic;
//! - a word programmed twice between erases panics (ECC flash such as STM32H7 forbids it, and
//!   the outbox must never need it);
//! - a power cut after a chosen number of operations (each `write` and each `erase` call is
//!   one) tears the operation it interrupts and makes every later call fail until the next
//!   power-on. A torn write programs the words before a random one, leaves the ones after it
//!   erased, and leaves that word erased-and-unprogrammed, fully programmed, or partly
//!   programmed (some of its zero bits set): a partly programmed word reads back as garbage,
//!   or its read fails as an uncorrectable ECC error does. A torn erase erases a random subset
//!   of the unit's words and leaves the others as they were.
#![allow(dead_code)]

// Also compiled into the crate's own (no_std) unit tests.
extern crate std;

use std::cell::RefCell;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use embedded_storage_async::nor_flash::{ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash};

pub struct Cells {
    bytes: Vec<u8>,
    /// Per word: programmed since the last erase.
    written: Vec<bool>,
    /// Per word: reads fail (a torn word whose ECC does not match).
    broken: Vec<bool>,
    /// Operations (write and erase calls) so far.
    pub ops: u64,
    /// The operation with this number is cut.
    cut_at: Option<u64>,
    pub dead: bool,
    erases: u64,
    rng: u64,
}

impl Cells {
    fn rand(&mut self, n: u64) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }

    /// Counts an operation; true when power fails during it.
    fn cut_now(&mut self) -> bool {
        let cut = self.cut_at == Some(self.ops);
        self.ops += 1;
        if cut {
            self.dead = true;
        }
        cut
    }
}

/// The flash, shared across "boots" (clones share the cells).
#[derive(Clone)]
pub struct Nor<const W: usize, const E: usize> {
    pub cells: Rc<RefCell<Cells>>,
}

impl<const W: usize, const E: usize> Nor<W, E> {
    /// `units` erase units, all erased.
    pub fn new(units: usize, seed: u64) -> Self {
        let size = units * E;
        Nor {
            cells: Rc::new(RefCell::new(Cells {
                bytes: vec![0xFF; size],
                written: vec![false; size / W],
                broken: vec![false; size / W],
                ops: 0,
                cut_at: None,
                dead: false,
                erases: 0,
                rng: seed,
            })),
        }
    }

    /// Power comes (back) on; the `cut_after`-th operation from now (0: the next one) is cut.
    pub fn power_on(&self, cut_after: Option<u64>) {
        let mut c = self.cells.borrow_mut();
        c.dead = false;
        c.cut_at = cut_after.map(|k| c.ops + k);
    }

    /// Power fails now, between operations.
    pub fn power_off(&self) {
        self.cells.borrow_mut().dead = true;
    }

    /// Erase calls so far.
    pub fn erases(&self) -> u64 {
        self.cells.borrow().erases
    }

    pub fn dead(&self) -> bool {
        self.cells.borrow().dead
    }

    pub fn ops(&self) -> u64 {
        self.cells.borrow().ops
    }

    /// Fill `range` with `byte` as if programmed (for tests of foreign contents).
    pub fn scribble(&self, range: std::ops::Range<usize>, byte: u8) {
        let mut c = self.cells.borrow_mut();
        for i in range {
            c.bytes[i] = byte;
            c.written[i / W] = true;
        }
    }
}

impl<const W: usize, const E: usize> ErrorType for Nor<W, E> {
    type Error = NorFlashErrorKind;
}

impl<const W: usize, const E: usize> ReadNorFlash for Nor<W, E> {
    const READ_SIZE: usize = 1;

    async fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        let c = self.cells.borrow();
        let from = offset as usize;
        let to = from + bytes.len();
        assert!(to <= c.bytes.len(), "read past the end: {from}..{to}");
        if c.dead {
            return Err(NorFlashErrorKind::Other);
        }
        if !bytes.is_empty() && c.broken[from / W..to.div_ceil(W)].iter().any(|b| *b) {
            return Err(NorFlashErrorKind::Other);
        }
        bytes.copy_from_slice(&c.bytes[from..to]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.cells.borrow().bytes.len()
    }
}

impl<const W: usize, const E: usize> NorFlash for Nor<W, E> {
    const WRITE_SIZE: usize = W;
    const ERASE_SIZE: usize = E;

    async fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        let mut c = self.cells.borrow_mut();
        let (from, to) = (from as usize, to as usize);
        assert!(
            from.is_multiple_of(E) && to.is_multiple_of(E) && from <= to && to <= c.bytes.len(),
            "erase {from}..{to} not aligned to {E}"
        );
        if c.dead {
            return Err(NorFlashErrorKind::Other);
        }
        let torn = c.cut_now();
        c.erases += 1;
        for w in from / W..to / W {
            if torn && c.rand(2) == 0 {
                continue;
            }
            c.bytes[w * W..(w + 1) * W].fill(0xFF);
            c.written[w] = false;
            c.broken[w] = false;
        }
        if torn {
            Err(NorFlashErrorKind::Other)
        } else {
            Ok(())
        }
    }

    async fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error> {
        let mut c = self.cells.borrow_mut();
        let from = offset as usize;
        assert!(
            from.is_multiple_of(W) && data.len().is_multiple_of(W),
            "write {from}+{} not aligned to {W}",
            data.len()
        );
        assert!(from + data.len() <= c.bytes.len(), "write past the end");
        if c.dead {
            return Err(NorFlashErrorKind::Other);
        }
        let words = data.len() / W;
        let torn = c.cut_now().then(|| c.rand(words as u64) as usize);
        for (i, word) in data.chunks(W).enumerate() {
            let w = from / W + i;
            if torn.is_some_and(|t| i > t) {
                break;
            }
            assert!(
                !c.written[w],
                "word at {} programmed twice without an erase",
                w * W
            );
            let at = w * W;
            if torn == Some(i) {
                match c.rand(4) {
                    0 => continue,
                    1 => {}
                    mode => {
                        // Part of the bits that should go to zero did.
                        let mut any = false;
                        for (j, b) in word.iter().enumerate() {
                            let keep = c.rand(256) as u8;
                            let v = c.bytes[at + j] & (b | keep);
                            any |= v != 0xFF;
                            c.bytes[at + j] = v;
                        }
                        c.written[w] = any;
                        c.broken[w] = any && mode == 3;
                        continue;
                    }
                }
            }
            for (j, b) in word.iter().enumerate() {
                c.bytes[at + j] &= b;
            }
            c.written[w] = true;
        }
        if torn.is_some() {
            Err(NorFlashErrorKind::Other)
        } else {
            Ok(())
        }
    }
}
