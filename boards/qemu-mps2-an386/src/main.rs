//! Cairn on QEMU's mps2-an386 (Cortex-M4F): SysTick time driver, LAN9118 Ethernet,
//! DHCP from QEMU's user network, defmt over semihosting, exit codes through semihosting,
//! the device's identity from the settings region of its host-file flash. See README.md for
//! how to run it and what the exit codes mean.

#![no_std]
#![no_main]

mod hostflash;
mod lan9118;
mod systick;

use cairn_board_app::{SETTINGS_LEN, Settings};
use core::panic::PanicInfo;
use defmt_semihosting as _;
use embassy_executor::Spawner;
use embassy_net::{Runner, StackResources};
use embedded_storage_async::nor_flash::ReadNorFlash;
use lan9118::{Lan9118, Lan9118Irq};
use static_cell::StaticCell;

/// Exit codes besides the application's own (`AppError::exit_code`, 2..=4).
const EXIT_NO_NIC: i32 = 5;
const EXIT_BAD_SETTING: i32 = 6;
const EXIT_NOT_PROVISIONED: i32 = 9;
const EXIT_PANIC: i32 = 101;

/// The flash file when the command line names none (`flash=PATH`), relative to QEMU's
/// working directory.
const DEFAULT_FLASH: &str = "cairn-flash.bin";

defmt::timestamp!("{=u64:ms}", embassy_time::Instant::now().as_millis());

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let core = cortex_m::Peripherals::take().unwrap();
    systick::init(core.SYST);

    // Every build reads its identity from the settings region of the flash file
    // (`flash=PATH`), so one image serves every device.
    let Some(flash_path) = flash_path() else {
        semihosting::process::exit(EXIT_BAD_SETTING);
    };
    let path = core::ffi::CStr::from_bytes_until_nul(&flash_path).unwrap_or(c"cairn-flash.bin");
    let mut flash = match hostflash::HostFlash::open(path) {
        Ok(flash) => flash,
        Err(_) => {
            defmt::error!(
                "flash file {=str}: cannot open",
                path.to_str().unwrap_or("?")
            );
            semihosting::process::exit(EXIT_BAD_SETTING);
        }
    };
    let mut region = [0u8; SETTINGS_LEN];
    if flash
        .read(hostflash::SETTINGS.start, &mut region)
        .await
        .is_err()
    {
        defmt::error!("flash file: cannot read the settings region");
        semihosting::process::exit(EXIT_BAD_SETTING);
    }
    let Ok(settings) = cairn_board_app::boot_settings(&region) else {
        semihosting::process::exit(EXIT_NOT_PROVISIONED);
    };
    let Some(settings) = overrides(settings) else {
        semihosting::process::exit(EXIT_BAD_SETTING);
    };
    // The boot number: the host's clock, through semihosting (the board has no RNG).
    let boot = host_seconds() as u32;

    let nic = match Lan9118::new() {
        Ok(nic) => nic,
        Err(e) => {
            defmt::error!("lan9118: {}", e);
            semihosting::process::exit(EXIT_NO_NIC);
        }
    };
    // SAFETY: the handler (DefaultHandler below) is ready and shares no state unsafely.
    unsafe { cortex_m::peripheral::NVIC::unmask(Lan9118Irq) };

    static RESOURCES: StaticCell<StackResources<3>> = StaticCell::new();
    let seed = u64::from(boot) << 32 ^ settings.device_id;
    let (stack, runner) = embassy_net::new(
        nic,
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        seed,
    );
    spawner.spawn(net_task(runner).unwrap());

    #[cfg(feature = "flash-outbox")]
    let result = {
        // The boot number comes from the counter in flash instead of the host clock.
        let _ = boot;
        // The boot nonce: the flash boot counter mixed with the host clock (SPEC.md §5.2).
        let entropy = host_entropy();
        cairn_board_app::run_with_flash(stack, &settings, flash, hostflash::OUTBOX, entropy).await
    };
    // Without a flash file there is no counter: the host clock alone is not unique, so this
    // build opts in with `insecure-nonce` (see Cargo.toml).
    #[cfg(all(feature = "client", not(feature = "flash-outbox")))]
    let result = {
        drop(flash);
        let e = host_entropy();
        let nonce = [e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7], 0, 0, 0, 0];
        let nonce = cairn_board_app::BootNonce::insecure(nonce);
        cairn_board_app::run(stack, &settings, boot, nonce).await
    };
    #[cfg(not(feature = "client"))]
    let result = {
        drop(flash);
        let _ = boot;
        cairn_board_app::run(stack, &settings).await
    };
    let code = match result {
        Ok(_) => 0,
        Err(e) => {
            defmt::error!("cairn: stopped: {}", e);
            e.exit_code()
        }
    };
    semihosting::process::exit(code);
}

#[embassy_executor::task]
async fn net_task(mut runner: Runner<'static, Lan9118>) -> ! {
    runner.run().await
}

/// A NUL-terminated path for the flash file.
type FlashPath = [u8; 128];

/// The words of the semihosting command line (`qemu-system-arm ... -append "samples=20"`),
/// after the image's file name.
fn for_each_arg(mut f: impl FnMut(&str) -> Option<()>) -> Option<()> {
    if let Ok(args) = semihosting::experimental::env::args::<512>() {
        for arg in args.into_iter().skip(1).flatten() {
            f(arg)?;
        }
    }
    Some(())
}

/// The flash file: `flash=PATH` on the command line, or [`DEFAULT_FLASH`].
fn flash_path() -> Option<FlashPath> {
    let mut flash_path = [0u8; 128];
    flash_path[..DEFAULT_FLASH.len()].copy_from_slice(DEFAULT_FLASH.as_bytes());
    for_each_arg(|arg| {
        if let Some(path) = arg.strip_prefix("flash=") {
            if path.len() >= flash_path.len() {
                defmt::error!("flash path too long");
                return None;
            }
            flash_path = [0; 128];
            flash_path[..path.len()].copy_from_slice(path.as_bytes());
        }
        Some(())
    })?;
    Some(flash_path)
}

/// `settings` with the `key=value` words of the command line applied (see
/// ../app/README.md). Only a development build (`dev-settings`) takes the identity (device-id,
/// key, gateways) from there; a release image's comes from its settings region alone.
fn overrides(mut settings: Settings) -> Option<Settings> {
    for_each_arg(|arg| {
        if arg.starts_with("flash=") {
            return Some(());
        }
        let name = arg.split_once('=').map_or(arg, |(name, _)| name);
        if !cairn_board_app::DEV_SETTINGS && matches!(name, "device-id" | "key" | "gateways") {
            defmt::error!(
                "setting {=str}: the identity comes from the settings region (build with dev-settings to override it)",
                name
            );
            return None;
        }
        if let Err(e) = settings.apply(arg) {
            defmt::error!("setting {=str}: {}", arg, defmt::Display2Format(&e));
            return None;
        }
        Some(())
    })?;
    Some(settings)
}

/// What entropy the board has: the host's clock in seconds and the ticks since the image
/// started (semihosting), and the cycle counter.
fn host_entropy() -> [u8; 8] {
    let secs = host_seconds() as u32;
    let ticks = embassy_time::Instant::now().as_ticks() as u32;
    let mixed = (u64::from(secs) << 32 | u64::from(ticks))
        ^ u64::from(cortex_m::peripheral::DWT::cycle_count());
    mixed.to_le_bytes()
}

fn host_seconds() -> u64 {
    use semihosting::experimental::time::SystemTime;
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cortex_m_rt::exception]
unsafe fn DefaultHandler(irqn: i16) {
    if irqn == 13 {
        lan9118::on_interrupt();
    } else {
        panic!("unexpected interrupt {}", irqn);
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    match info.location() {
        Some(at) => defmt::error!("panic at {=str}:{=u32}", at.file(), at.line()),
        None => defmt::error!("panic"),
    }
    semihosting::process::exit(EXIT_PANIC)
}
