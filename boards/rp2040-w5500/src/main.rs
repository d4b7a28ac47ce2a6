//! Cairn on an RP2040 with a WIZnet W5500 over SPI0 (the W5500-EVB-Pico wiring, see
//! README.md): embassy-rp's time driver, the ring oscillator as the source of the boot
//! number and the stack's seed, defmt over RTT.

#![no_std]
#![no_main]

use defmt_rtt as _;
use embassy_executor::Spawner;
use embassy_net::StackResources;
use embassy_net_wiznet::chip::W5500;
use embassy_rp::bind_interrupts;
use embassy_rp::clocks::RoscRng;
use embassy_rp::dma;
use embassy_rp::gpio::{Input, Level, Output, Pull};
use embassy_rp::peripherals::{DMA_CH0, DMA_CH1, DMA_CH2, SPI0};
use embassy_rp::spi::{Async, Config as SpiConfig, Spi};
use embassy_time::Delay;
use embedded_hal_bus::spi::ExclusiveDevice;
use panic_probe as _;
use static_cell::StaticCell;

bind_interrupts!(struct Irqs {
    DMA_IRQ_0 => dma::InterruptHandler<DMA_CH0>, dma::InterruptHandler<DMA_CH1>, dma::InterruptHandler<DMA_CH2>;
});

/// The board's QSPI flash (W25Q16: 2 MiB).
#[cfg(feature = "flash-outbox")]
const FLASH_SIZE: usize = 2 * 1024 * 1024;
/// The flash outbox's log lives in the last 64 KiB (offsets into the flash, 16 erase units of
/// 4 KiB), which memory.x keeps out of the program's reach.
#[cfg(feature = "flash-outbox")]
const OUTBOX_REGION: core::ops::Range<u32> = 0x1F_0000..0x20_0000;

type SpiDevice = ExclusiveDevice<Spi<'static, SPI0, Async>, Output<'static>, Delay>;
type WiznetRunner =
    embassy_net_wiznet::Runner<'static, W5500, SpiDevice, Input<'static>, Output<'static>>;

defmt::timestamp!("{=u64:ms}", embassy_time::Instant::now().as_millis());

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_rp::init(Default::default());
    let settings = cairn_board_app::BUILD;

    // A fresh boot number on every boot: the ring oscillator's jitter (no flash counter).
    let mut rng = RoscRng;
    let boot = rng.next_u32();
    let seed = rng.next_u64();

    let mut spi_config = SpiConfig::default();
    spi_config.frequency = 50_000_000;
    // SPI0: SCK GP18, MOSI GP19, MISO GP16; CS GP17, INT GP21, RST GP20.
    let spi = Spi::new(
        p.SPI0, p.PIN_18, p.PIN_19, p.PIN_16, p.DMA_CH0, p.DMA_CH1, Irqs, spi_config,
    );
    let cs = Output::new(p.PIN_17, Level::High);
    let int = Input::new(p.PIN_21, Pull::Up);
    let reset = Output::new(p.PIN_20, Level::High);
    let Ok(spi) = ExclusiveDevice::new(spi, cs, Delay);

    // A locally administered unicast MAC derived from the device id.
    let id = settings.device_id.to_le_bytes();
    let mac = [0x02, 0xca, id[0], id[1], id[2], id[3]];
    static STATE: StaticCell<embassy_net_wiznet::State<8, 8>> = StaticCell::new();
    let state = STATE.init(embassy_net_wiznet::State::new());
    // InitError has no defmt 1.x Format: say which step failed instead.
    let (device, runner) =
        match embassy_net_wiznet::new::<8, 8, W5500, _, _, _>(mac, state, spi, int, reset).await {
            Ok(parts) => parts,
            Err(_) => {
                defmt::error!("w5500: no answer on SPI0 (check wiring and power)");
                return;
            }
        };
    spawner.spawn(wiznet_task(runner).unwrap());

    static RESOURCES: StaticCell<StackResources<3>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        device,
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        seed,
    );
    spawner.spawn(net_task(runner).unwrap());

    // With a flash outbox the boot number comes from its counter in flash instead, and the
    // boot nonce is that counter mixed with 8 bytes of the ring oscillator (SPEC.md §5.2).
    #[cfg(feature = "flash-outbox")]
    let result = {
        let _ = boot;
        let flash = embassy_rp::flash::Flash::<_, embassy_rp::flash::Async, FLASH_SIZE>::new(
            p.FLASH, p.DMA_CH2, Irqs,
        );
        let entropy = rng.next_u64().to_le_bytes();
        cairn_board_app::run_with_flash(stack, &settings, flash, OUTBOX_REGION, entropy).await
    };
    // Without it the ring oscillator is all there is, which the RP2040's datasheet calls
    // unfit for security: this build opts in with `insecure-nonce` (see Cargo.toml).
    #[cfg(all(feature = "client", not(feature = "flash-outbox")))]
    let result = {
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let nonce = cairn_board_app::BootNonce::insecure(nonce);
        cairn_board_app::run(stack, &settings, boot, nonce).await
    };
    #[cfg(not(feature = "client"))]
    let result = {
        let _ = boot;
        cairn_board_app::run(stack, &settings).await
    };
    match result {
        Ok(report) => defmt::info!("cairn: finished: {}", report),
        Err(e) => defmt::error!("cairn: stopped: {}", e),
    }
}

#[embassy_executor::task]
async fn wiznet_task(runner: WiznetRunner) -> ! {
    runner.run().await
}

#[embassy_executor::task]
async fn net_task(
    mut runner: embassy_net::Runner<'static, embassy_net_wiznet::Device<'static>>,
) -> ! {
    runner.run().await
}
