//! Size probe: the smallest image that keeps all of the client alive, so `size` of it minus
//! `size` of the same image without the `client` feature is what the client costs.
//!
//! Everything the optimiser could otherwise predict (the network, flash, the clock) reads
//! from volatile memory, so no code path is dropped. Nothing here is meant to run.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::task::Waker;

/// Stands in for hardware registers.
static mut INPUT: [u8; 64] = [0; 64];
static mut OUTPUT: u32 = 0;

fn input(i: usize) -> u8 {
    unsafe { read_volatile(addr_of!(INPUT).cast::<u8>().add(i % 64)) }
}

fn output(v: u32) {
    unsafe { write_volatile(addr_of_mut!(OUTPUT), v) }
}

struct Clock;

impl embassy_time_driver::Driver for Clock {
    fn now(&self) -> u64 {
        u64::from(input(0)) << 8 | u64::from(input(1))
    }
    fn schedule_wake(&self, at: u64, waker: &Waker) {
        output(at as u32);
        if input(2) == 1 {
            waker.wake_by_ref();
        }
    }
}

embassy_time_driver::time_driver_impl!(static CLOCK: Clock = Clock);

#[cfg(feature = "client")]
mod probe {
    use super::*;
    use cairn_firmware::{
        Client, Config, Connection, GatewayAddr, OverflowPolicy, Transport, TransportError, Value,
    };
    use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;

    pub static CLIENT: Client<CriticalSectionRawMutex, 4096> =
        Client::new(OverflowPolicy::DropOldest);
    static GATEWAYS: [GatewayAddr; 2] = [
        GatewayAddr::new([10, 0, 0, 2], 4003),
        GatewayAddr::new([10, 0, 0, 3], 4003),
    ];

    /// A "network" whose bytes come from volatile memory.
    pub struct Wire;
    pub struct WireConnection;

    impl Transport for Wire {
        type Connection<'a> = WireConnection;
        async fn connect(&mut self, _: GatewayAddr) -> Result<WireConnection, TransportError> {
            if input(3) == 0 {
                Err(TransportError::ConnectFailed)
            } else {
                Ok(WireConnection)
            }
        }
    }

    impl Connection for WireConnection {
        async fn read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
            let n = usize::from(input(4)).min(buf.len());
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = input(i);
            }
            Ok(n)
        }
        async fn write(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
            for b in buf {
                output(u32::from(*b));
            }
            Ok(buf.len())
        }
        async fn flush(&mut self) -> Result<(), TransportError> {
            Ok(())
        }
        async fn close(&mut self) {}
    }

    pub fn config() -> Config<'static> {
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = input(i);
        }
        let nonce = cairn_firmware::BootNonce::from_rng([input(8); 12]);
        Config::new(u64::from(input(5)), key, u32::from(input(6)), nonce, &GATEWAYS)
    }

    pub fn push() {
        let v = f32::from(input(7));
        let _ = CLIENT.push(
            1,
            &[Value::F32(v), Value::F32(v * 2.0), Value::F32(v * 3.0)],
        );
        output(CLIENT.status().acked as u32);
    }

    #[cfg(feature = "flash")]
    pub mod flash {
        use super::*;
        use embedded_storage_async::nor_flash::{
            ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash,
        };

        /// A NOR flash whose contents come from volatile memory.
        pub struct Nor;
        impl ErrorType for Nor {
            type Error = NorFlashErrorKind;
        }
        impl ReadNorFlash for Nor {
            const READ_SIZE: usize = 1;
            async fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = input(offset as usize + i);
                }
                Ok(())
            }
            fn capacity(&self) -> usize {
                64 * 1024
            }
        }
        impl NorFlash for Nor {
            const WRITE_SIZE: usize = 4;
            const ERASE_SIZE: usize = 4096;
            async fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
                output(from ^ to);
                Ok(())
            }
            async fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
                for b in bytes {
                    output(offset ^ u32::from(*b));
                }
                Ok(())
            }
        }
    }
}

// The same executor every board runs; its task pools live in static memory, so `size`
// counts the client's run future as RAM, as it would on a board.
#[embassy_executor::main]
async fn main(spawner: embassy_executor::Spawner) {
    #[cfg(not(feature = "client"))]
    spawner.spawn(idle().unwrap());

    #[cfg(all(feature = "client", not(feature = "flash")))]
    {
        probe::push();
        spawner.spawn(uplink().unwrap());
    }

    // Opened in the task that runs the client, as boards/app does, so the outbox and the
    // futures of open and restore are counted once, in that task's static storage.
    #[cfg(feature = "flash")]
    spawner.spawn(uplink().unwrap());
}

#[cfg(not(feature = "client"))]
#[embassy_executor::task]
async fn idle() {
    loop {
        output(u32::from(input(0)));
    }
}

#[cfg(all(feature = "client", not(feature = "flash")))]
#[embassy_executor::task]
async fn uplink() -> ! {
    let config = probe::config();
    probe::CLIENT.run(&mut probe::Wire, &config).await
}

#[cfg(feature = "flash")]
#[embassy_executor::task]
async fn uplink() -> ! {
    use cairn_firmware::flash::FlashOutbox;
    let mut store = loop {
        if let Ok(store) = FlashOutbox::open(probe::flash::Nor, 0..64 * 1024).await {
            break store;
        }
    };
    let _ = store.restore(&probe::CLIENT).await;
    probe::push();
    let mut config = probe::config();
    config.boot = store.boot();
    config.boot_nonce = cairn_firmware::BootNonce::from_counter(store.boot(), [input(9); 8]);
    probe::CLIENT
        .run_with_store(&mut probe::Wire, &config, &mut store)
        .await
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        cortex_m::asm::udf();
    }
}
