//! An embassy-net driver for the SMSC LAN9118 Ethernet controller as QEMU emulates it on
//! the mps2 boards: programmed I/O through the FIFO data ports, one interrupt for
//! "a received frame is waiting". No crate drives this chip; see
//! /work/shared/HARDWARE-NOTES.md for the register facts it relies on.
//!
//! Receive waits on the RX-status-FIFO-level interrupt (NVIC line 13): the interrupt
//! handler masks it and wakes the stack; `receive` clears the status, looks at the FIFO
//! and unmasks it again only when the FIFO is empty, so no frame is ever missed.
//! Transmit never waits: QEMU sends a frame as soon as its last word is written.

use core::ptr::{read_volatile, write_volatile};
use core::task::Context;
use cortex_m::interrupt::InterruptNumber;
use embassy_net_driver::{Capabilities, HardwareAddress, LinkState};
use embassy_sync::waitqueue::AtomicWaker;

/// Where the mps2 boards map the LAN9118.
pub const BASE: usize = 0x4020_0000;

/// The LAN9118's line on the NVIC of the mps2 boards.
#[derive(Clone, Copy)]
pub struct Lan9118Irq;

// SAFETY: 13 is the LAN9118's interrupt line on mps2-an385/an386.
unsafe impl InterruptNumber for Lan9118Irq {
    fn number(self) -> u16 {
        13
    }
}

mod reg {
    pub const RX_DATA: usize = 0x00;
    pub const TX_DATA: usize = 0x20;
    pub const RX_STATUS: usize = 0x40;
    pub const TX_STATUS: usize = 0x48;
    pub const ID_REV: usize = 0x50;
    pub const IRQ_CFG: usize = 0x54;
    pub const INT_STS: usize = 0x58;
    pub const INT_EN: usize = 0x5C;
    pub const BYTE_TEST: usize = 0x64;
    pub const TX_CFG: usize = 0x70;
    pub const HW_CFG: usize = 0x74;
    pub const RX_FIFO_INF: usize = 0x7C;
    pub const TX_FIFO_INF: usize = 0x80;
    pub const MAC_CSR_CMD: usize = 0xA4;
    pub const MAC_CSR_DATA: usize = 0xA8;
}

mod mac {
    pub const CR: u32 = 1;
    pub const ADDRH: u32 = 2;
    pub const ADDRL: u32 = 3;
    pub const CR_TXEN: u32 = 1 << 3;
    pub const CR_RXEN: u32 = 1 << 2;
}

const BYTE_TEST_MAGIC: u32 = 0x8765_4321;
const HW_CFG_SRST: u32 = 1 << 0;
const TX_CFG_TX_ON: u32 = 1 << 1;
/// IRQ enable (bit 8), push-pull (bit 4), active high (bit 0). Anything else and QEMU
/// holds the line asserted from reset.
const IRQ_CFG_VALUE: u32 = 0x111;
/// RX status FIFO level interrupt.
const INT_RSFL: u32 = 1 << 3;
const MAC_CSR_BUSY: u32 = 1 << 31;
const MAC_CSR_READ: u32 = 1 << 30;
const RX_STATUS_ERROR: u32 = 1 << 15;
const TX_CMD_A_FIRST: u32 = 1 << 13;
const TX_CMD_A_LAST: u32 = 1 << 12;

/// Largest Ethernet frame without its FCS.
const MTU: usize = 1514;
/// Room a frame needs in the TX data FIFO: the frame, padding and the two command words.
const TX_NEEDS: u32 = (MTU + 3 + 8) as u32;

static RX_WAKER: AtomicWaker = AtomicWaker::new();

/// Why bring-up failed.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum InitError {
    /// BYTE_TEST did not read 0x87654321: no LAN9118 (or wrong endianness) at [`BASE`].
    NoDevice(u32),
    /// The soft reset did not complete.
    ResetTimeout,
}

pub struct Lan9118 {
    mac: [u8; 6],
    rx_buf: [u8; 1536],
    tx_buf: [u8; 1536],
}

fn read(offset: usize) -> u32 {
    // SAFETY: BASE..BASE+0x100 is the LAN9118's register block; reads have no side
    // effects beyond popping the FIFO a caller asked for.
    unsafe { read_volatile((BASE + offset) as *const u32) }
}

fn write(offset: usize, value: u32) {
    // SAFETY: as for `read`.
    unsafe { write_volatile((BASE + offset) as *mut u32, value) }
}

fn mac_wait() {
    while read(reg::MAC_CSR_CMD) & MAC_CSR_BUSY != 0 {}
}

fn mac_read(index: u32) -> u32 {
    mac_wait();
    write(reg::MAC_CSR_CMD, MAC_CSR_BUSY | MAC_CSR_READ | index);
    mac_wait();
    read(reg::MAC_CSR_DATA)
}

fn mac_write(index: u32, value: u32) {
    mac_wait();
    write(reg::MAC_CSR_DATA, value);
    write(reg::MAC_CSR_CMD, MAC_CSR_BUSY | index);
    mac_wait();
}

/// Frames waiting in the RX FIFO.
fn rx_frames() -> u32 {
    (read(reg::RX_FIFO_INF) >> 16) & 0xff
}

/// Drains TX status words so the status FIFO never fills and stalls transmission.
fn drain_tx_status() {
    while (read(reg::TX_FIFO_INF) >> 16) & 0xff != 0 {
        let _ = read(reg::TX_STATUS);
    }
}

impl Lan9118 {
    /// Resets the chip, reads its MAC address and turns on transmit, receive and the
    /// receive interrupt. The caller unmasks [`Lan9118Irq`] on the NVIC and calls
    /// [`on_interrupt`] from its handler.
    pub fn new() -> Result<Self, InitError> {
        let test = read(reg::BYTE_TEST);
        if test != BYTE_TEST_MAGIC {
            return Err(InitError::NoDevice(test));
        }
        write(reg::HW_CFG, HW_CFG_SRST);
        let mut spins = 0u32;
        while read(reg::HW_CFG) & HW_CFG_SRST != 0 {
            spins += 1;
            if spins > 1_000_000 {
                return Err(InitError::ResetTimeout);
            }
        }
        let low = mac_read(mac::ADDRL).to_le_bytes();
        let high = mac_read(mac::ADDRH).to_le_bytes();
        let mac = [low[0], low[1], low[2], low[3], high[0], high[1]];
        defmt::info!(
            "lan9118: id {=u32:#x}, mac {=[u8]:02x}",
            read(reg::ID_REV) >> 16,
            mac
        );
        mac_write(mac::CR, mac_read(mac::CR) | mac::CR_TXEN | mac::CR_RXEN);
        write(reg::TX_CFG, TX_CFG_TX_ON);
        write(reg::IRQ_CFG, IRQ_CFG_VALUE);
        write(reg::INT_STS, u32::MAX);
        write(reg::INT_EN, INT_RSFL);
        Ok(Self {
            mac,
            rx_buf: [0; 1536],
            tx_buf: [0; 1536],
        })
    }

    /// Pops the next good frame into `rx_buf`; returns its length without the FCS.
    fn pop_frame(&mut self) -> Option<usize> {
        while rx_frames() > 0 {
            let status = read(reg::RX_STATUS);
            let len = ((status >> 16) & 0x3fff) as usize;
            let words = len.div_ceil(4);
            let keep = status & RX_STATUS_ERROR == 0 && (14..=self.rx_buf.len()).contains(&len);
            for i in 0..words {
                let word = read(reg::RX_DATA);
                if keep {
                    self.rx_buf[4 * i..4 * i + 4].copy_from_slice(&word.to_le_bytes());
                }
            }
            if keep {
                return Some(len - 4);
            }
        }
        None
    }
}

/// Call from the interrupt handler of [`Lan9118Irq`]: masks the interrupt until the
/// driver has drained the FIFO, and wakes the network stack.
pub fn on_interrupt() {
    write(reg::INT_EN, 0);
    RX_WAKER.wake();
}

fn tx_room() -> bool {
    drain_tx_status();
    read(reg::TX_FIFO_INF) & 0xffff >= TX_NEEDS
}

impl embassy_net_driver::Driver for Lan9118 {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, cx: &mut Context) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if !tx_room() {
            cx.waker().wake_by_ref();
            return None;
        }
        RX_WAKER.register(cx.waker());
        // Clear first: a frame arriving after this point sets RSFL again and, once
        // unmasked below, raises the interrupt.
        write(reg::INT_STS, INT_RSFL);
        match self.pop_frame() {
            Some(len) => Some((
                RxToken {
                    frame: &mut self.rx_buf[..len],
                },
                TxToken {
                    buf: &mut self.tx_buf,
                },
            )),
            None => {
                write(reg::INT_EN, INT_RSFL);
                None
            }
        }
    }

    fn transmit(&mut self, cx: &mut Context) -> Option<Self::TxToken<'_>> {
        if tx_room() {
            Some(TxToken {
                buf: &mut self.tx_buf,
            })
        } else {
            // Cannot happen with QEMU (it transmits synchronously); poll again soon.
            cx.waker().wake_by_ref();
            None
        }
    }

    fn link_state(&mut self, _cx: &mut Context) -> LinkState {
        LinkState::Up
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(1);
        caps
    }

    fn hardware_address(&self) -> HardwareAddress {
        HardwareAddress::Ethernet(self.mac)
    }
}

pub struct RxToken<'a> {
    frame: &'a mut [u8],
}

impl embassy_net_driver::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

pub struct TxToken<'a> {
    buf: &'a mut [u8; 1536],
}

impl embassy_net_driver::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(MTU);
        let result = f(&mut self.buf[..len]);
        write(reg::TX_DATA, TX_CMD_A_FIRST | TX_CMD_A_LAST | len as u32);
        // Command B: a tag (the length, for debugging) and the packet length.
        write(reg::TX_DATA, (len as u32) << 16 | len as u32);
        for chunk in self.buf[..len].chunks(4) {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            write(reg::TX_DATA, u32::from_le_bytes(word));
        }
        drain_tx_status();
        result
    }
}
