//! An embassy-time driver for host processes that run many clients (feature `std`):
//! `cairn sim`, tests.
//!
//! embassy-time's own `std` driver needs its `generic-queue-N` feature to work with executors
//! other than embassy's, and that queue holds at most 128 timers: with more clients than that,
//! every new timer evicts (wakes) another one, which re-arms and evicts the next, and the
//! process spins. This driver keeps one entry per waker (re-arming replaces it) in a binary
//! heap, so thousands of clients cost `O(log n)` per timer, and a single thread sleeps until
//! the earliest deadline.
//!
//! Linking this crate with `std` defines the `_embassy_time_now` / `_embassy_time_schedule_wake`
//! symbols: do not also enable embassy-time's `std` or `mock-driver` features, nor define
//! another driver. Ticks are microseconds (embassy-time's default 1 MHz tick rate). The
//! symbols are only linked into binaries that use something from this crate (any client
//! does); a test or tool that uses embassy-time alone needs `use cairn_firmware as _;`.
#![allow(unsafe_code)] // `time_driver_impl!` exports two `#[no_mangle]` functions.

extern crate std;

use core::cmp::Reverse;
use core::task::Waker;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A waker's identity: its data pointer and vtable (one task, one key).
type Key = (usize, usize);

fn key(waker: &Waker) -> Key {
    (waker.data() as usize, waker.vtable() as *const _ as usize)
}

struct Queue {
    /// The one pending deadline per waker.
    armed: BTreeMap<Key, (u64, Waker)>,
    /// Deadlines in order; an entry whose deadline no longer matches `armed` is stale.
    order: BinaryHeap<Reverse<(u64, Key)>>,
}

impl Queue {
    /// Wakes everything due at `now`; returns the next deadline.
    fn expire(&mut self, now: u64) -> Option<u64> {
        while let Some(Reverse((at, key))) = self.order.peek().copied() {
            match self.armed.get(&key) {
                Some((armed_at, _)) if *armed_at == at => {
                    if at > now {
                        return Some(at);
                    }
                    let (_, waker) = self.armed.remove(&key).expect("present");
                    self.order.pop();
                    waker.wake();
                }
                _ => {
                    self.order.pop();
                }
            }
        }
        None
    }
}

struct HostClock {
    queue: Mutex<Queue>,
    changed: Condvar,
}

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(|| {
        std::thread::Builder::new()
            .name("cairn-time".into())
            .spawn(alarm_thread)
            .expect("spawn the timer thread");
        Instant::now()
    })
}

fn now_us() -> u64 {
    start().elapsed().as_micros() as u64
}

fn alarm_thread() {
    let mut queue = CLOCK.queue.lock().expect("timer queue");
    loop {
        let next = queue.expire(now_us());
        queue = match next {
            None => CLOCK.changed.wait(queue).expect("timer queue"),
            Some(at) => {
                let wait = Duration::from_micros(at.saturating_sub(now_us()));
                CLOCK
                    .changed
                    .wait_timeout(queue, wait)
                    .expect("timer queue")
                    .0
            }
        };
    }
}

impl embassy_time_driver::Driver for HostClock {
    fn now(&self) -> u64 {
        now_us()
    }

    fn schedule_wake(&self, at: u64, waker: &Waker) {
        start();
        let key = key(waker);
        let mut queue = self.queue.lock().expect("timer queue");
        // Keep the earlier deadline if this waker is already armed for one (a wake before the
        // requested time is allowed: the timer re-checks and re-arms).
        if let Some((armed_at, _)) = queue.armed.get(&key)
            && *armed_at <= at
        {
            return;
        }
        queue.armed.insert(key, (at, waker.clone()));
        queue.order.push(Reverse((at, key)));
        drop(queue);
        self.changed.notify_one();
    }
}

embassy_time_driver::time_driver_impl!(static CLOCK: HostClock = HostClock {
    queue: Mutex::new(Queue { armed: BTreeMap::new(), order: BinaryHeap::new() }),
    changed: Condvar::new(),
});
