//! Cairn on the NUCLEO-H743ZI(2): the STM32H743ZI's Ethernet MAC with the board's
//! LAN8742A PHY over RMII, embassy-stm32's time driver, the hardware RNG for the boot
//! number and the network stack's seed, defmt over RTT. See README.md for wiring and
//! flashing.

#![no_std]
#![no_main]

use defmt_rtt as _;
use embassy_executor::Spawner;
use embassy_net::StackResources;
use embassy_stm32::bind_interrupts;
use embassy_stm32::eth::{self, Ethernet, GenericPhy, PacketQueue, Sma};
use embassy_stm32::peripherals::{ETH, ETH_SMA, RNG};
use embassy_stm32::rng::{self, Rng};
use panic_probe as _;
use static_cell::StaticCell;

#[cfg(feature = "flash-outbox")]
mod ecc_flash;

bind_interrupts!(struct Irqs {
    ETH => eth::InterruptHandler;
    RNG => rng::InterruptHandler<RNG>;
    FLASH => embassy_stm32::flash::InterruptHandler;
});

/// The flash outbox's log: the last two 128 KiB sectors of the 2 MiB flash, as offsets into
/// the flash (0x081C_0000..0x0820_0000). The program starts at offset 0 (the vector table)
/// and is far smaller; the log is 2 erase units of 128 KiB with 32-byte write words.
#[cfg(feature = "flash-outbox")]
const OUTBOX_REGION: core::ops::Range<u32> = 0x1C_0000..0x20_0000;

type Device = Ethernet<'static, ETH, GenericPhy<Sma<'static, ETH_SMA>>>;

defmt::timestamp!("{=u64:ms}", embassy_time::Instant::now().as_millis());

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_stm32::init(clocks());
    let settings = cairn_board_app::BUILD;

    // A fresh boot number on every boot: the hardware RNG (the board has no counter in
    // flash set aside for it).
    let mut rng = Rng::new(p.RNG, Irqs);
    let boot = rng.next_u32();
    let seed = rng.next_u64();

    // A locally administered unicast MAC derived from the device id.
    let id = settings.device_id.to_le_bytes();
    let mac = [0x02, 0xca, id[0], id[1], id[2], id[3]];

    static PACKETS: StaticCell<PacketQueue<4, 4>> = StaticCell::new();
    // NUCLEO RMII: REF_CLK PA1, CRS_DV PA7, RXD0 PC4, RXD1 PC5, TXD0 PG13, TXD1 PB13,
    // TX_EN PG11; MDIO PA2, MDC PC1.
    let device = Ethernet::new(
        PACKETS.init(PacketQueue::new()),
        p.ETH,
        Irqs,
        p.PA1,
        p.PA7,
        p.PC4,
        p.PC5,
        p.PG13,
        p.PB13,
        p.PG11,
        mac,
        p.ETH_SMA,
        p.PA2,
        p.PC1,
    );

    static RESOURCES: StaticCell<StackResources<3>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        device,
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        seed,
    );
    spawner.spawn(net_task(runner).unwrap());

    // With a flash outbox the boot number comes from its counter in flash instead, and the
    // boot nonce from that counter mixed with 8 bytes of the RNG (SPEC.md §5.2).
    #[cfg(feature = "flash-outbox")]
    let result = {
        let _ = boot;
        let mut entropy = [0u8; 8];
        rng.fill_bytes(&mut entropy);
        // Reads that turn a torn (double-ECC-error) flash word into an error, which the
        // outbox skips, instead of a bus fault (ecc_flash.rs).
        let flash = ecc_flash::EccSafeFlash::new(embassy_stm32::flash::Flash::new(p.FLASH, Irqs));
        cairn_board_app::run_with_flash(stack, &settings, flash, OUTBOX_REGION, entropy).await
    };
    // The boot nonce: 12 bytes of the RNG peripheral, a true RNG (SPEC.md §5.2).
    #[cfg(all(feature = "client", not(feature = "flash-outbox")))]
    let result = {
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let nonce = cairn_board_app::BootNonce::from_rng(nonce);
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
async fn net_task(mut runner: embassy_net::Runner<'static, Device>) -> ! {
    runner.run().await
}

/// 400 MHz from the 64 MHz HSI through PLL1; HSI48 clocks the RNG.
fn clocks() -> embassy_stm32::Config {
    use embassy_stm32::rcc::*;
    let mut config = embassy_stm32::Config::default();
    config.rcc.hsi = Some(HSIPrescaler::DIV1);
    config.rcc.csi = true;
    config.rcc.hsi48 = Some(Default::default());
    config.rcc.pll1 = Some(Pll {
        source: PllSource::HSI,
        prediv: PllPreDiv::DIV4,
        mul: PllMul::MUL50,
        fracn: None,
        divp: Some(PllDiv::DIV2),
        divq: None,
        divr: None,
    });
    config.rcc.sys = Sysclk::PLL1_P;
    config.rcc.ahb_pre = AHBPrescaler::DIV2;
    config.rcc.apb1_pre = APBPrescaler::DIV2;
    config.rcc.apb2_pre = APBPrescaler::DIV2;
    config.rcc.apb3_pre = APBPrescaler::DIV2;
    config.rcc.apb4_pre = APBPrescaler::DIV2;
    config.rcc.voltage_scale = VoltageScale::Scale1;
    config
}
