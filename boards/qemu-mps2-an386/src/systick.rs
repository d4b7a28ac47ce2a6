//! An embassy-time driver on the Cortex-M SysTick timer: one interrupt per millisecond
//! (`tick-hz-1_000`), a 64-bit tick count, and embassy's timer queue. embassy has no
//! generic Cortex-M time driver; this one works on QEMU and on silicon alike.

use core::cell::{Cell, RefCell};
use core::task::Waker;
use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::exception;
use critical_section::{CriticalSection, Mutex};
use embassy_time_driver::Driver;
use embassy_time_queue_utils::Queue;

/// The CPU clock of QEMU's mps2 boards (and of the real MPS2 FPGA images).
pub const CPU_HZ: u32 = 25_000_000;

struct SysTickDriver {
    state: Mutex<State>,
}

struct State {
    ticks: Cell<u64>,
    /// The earliest time a queued timer expires (u64::MAX: none).
    alarm: Cell<u64>,
    queue: RefCell<Queue>,
}

embassy_time_driver::time_driver_impl!(static DRIVER: SysTickDriver = SysTickDriver {
    state: Mutex::new(State {
        ticks: Cell::new(0),
        alarm: Cell::new(u64::MAX),
        queue: RefCell::new(Queue::new()),
    }),
});

impl SysTickDriver {
    /// Wakes expired timers and re-arms the alarm for the next one.
    fn run_queue(&self, cs: CriticalSection<'_>) {
        let state = self.state.borrow(cs);
        let now = state.ticks.get();
        let next = state.queue.borrow_mut().next_expiration(now);
        state.alarm.set(next);
    }
}

impl Driver for SysTickDriver {
    fn now(&self) -> u64 {
        critical_section::with(|cs| self.state.borrow(cs).ticks.get())
    }

    fn schedule_wake(&self, at: u64, waker: &Waker) {
        critical_section::with(|cs| {
            let state = self.state.borrow(cs);
            if state.queue.borrow_mut().schedule_wake(at, waker) {
                // Wakes right away when `at` has already passed.
                self.run_queue(cs);
            }
        });
    }
}

/// Starts the 1 kHz tick. Call once, before the executor runs.
pub fn init(mut syst: SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(CPU_HZ / embassy_time_driver::TICK_HZ as u32 - 1);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
}

#[exception]
fn SysTick() {
    critical_section::with(|cs| {
        let state = DRIVER.state.borrow(cs);
        let now = state.ticks.get() + 1;
        state.ticks.set(now);
        if now >= state.alarm.get() {
            DRIVER.run_queue(cs);
        }
    });
}
