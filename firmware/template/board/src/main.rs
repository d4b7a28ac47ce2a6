//! A Cairn device on a NUCLEO-F429ZI: the STM32F429ZI's Ethernet MAC with the board's
//! LAN8742A PHY over RMII, embassy-stm32's time driver, the hardware RNG for the boot number,
//! defmt over RTT. The device's identity (id, key, gateways) comes from the settings region
//! in flash, so one image serves a fleet. Porting to another board: see ../README.md, whose
//! checklist numbers the steps marked `// [n]` below.

#![no_std]
#![no_main]

#[macro_use]
mod fmt;

use cairn_firmware::embassy_net::TcpTransport;
use cairn_firmware::settings::{DeviceSettings, SETTINGS_LEN};
use cairn_firmware::{BootNonce, Client, Config, OverflowPolicy, Value};
use defmt_rtt as _;
use embassy_executor::Spawner;
use embassy_net::{Stack, StackResources};
use embassy_stm32::bind_interrupts;
use embassy_stm32::eth::{self, Ethernet, GenericPhy, PacketQueue, Sma};
use embassy_stm32::flash::Flash;
use embassy_stm32::peripherals::{ETH, ETH_SMA, RNG};
use embassy_stm32::rng::{self, Rng};
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_time::{Duration, Ticker};
use panic_probe as _;
use static_cell::StaticCell;

bind_interrupts!(struct Irqs {
    ETH => eth::InterruptHandler;
    HASH_RNG => rng::InterruptHandler<RNG>;
});

/// [2] The settings region, as an offset into the flash (not an address): the last 128 KiB
/// sector of the 2 MiB flash, 0x081E_0000. Write it with
/// `probe-rs download --binary-format bin --base-address 0x081E0000 dev.bin --chip STM32F429ZITx`
/// (`dev.bin` from `cairn device add --generate --provision-out dev.bin --gateway IP:PORT`).
const SETTINGS_OFFSET: u32 = 0x1E_0000;

/// [6] The client: 4 KiB of RAM outbox (about 170 three-value readings), shared by the task
/// that runs it and the code that pushes. A `static` with `CriticalSectionRawMutex` (the
/// critical section comes from cortex-m's `critical-section-single-core`, [1]).
static CLIENT: Client<CriticalSectionRawMutex, 4096> = Client::new(OverflowPolicy::DropOldest);

/// TCP buffers of the client's socket: gateway frames are small; one whole batch frame
/// (1024 bytes) and a half on the send side.
type Transport = TcpTransport<'static, 512, 1536>;
type Device = Ethernet<'static, ETH, GenericPhy<Sma<'static, ETH_SMA>>>;

defmt::timestamp!("{=u64:ms}", embassy_time::Instant::now().as_millis());

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    // [1] Clocks, and with them embassy-stm32's time driver (`time-driver-any`).
    let p = embassy_stm32::init(clocks());

    // [2] Who am I: the settings region. A release image refuses to start without one.
    let mut region = [0u8; SETTINGS_LEN];
    let mut flash = Flash::new_blocking(p.FLASH);
    if flash.blocking_read(SETTINGS_OFFSET, &mut region).is_err() {
        region = [0xFF; SETTINGS_LEN];
    }
    static IDENTITY: StaticCell<DeviceSettings> = StaticCell::new();
    let Some(identity) = identity(&region) else {
        // Not provisioned: stay off the network (no shared fallback identity).
        return;
    };
    let identity: &'static DeviceSettings = IDENTITY.init(identity);

    // [3] A boot number that differs on every boot (it is part of every nonce) and the
    // network stack's seed: the hardware RNG.
    let mut rng = Rng::new(p.RNG, Irqs);
    let boot = rng.next_u32();
    let seed = rng.next_u64();
    // The boot nonce: 12 bytes of the hardware RNG, never repeated under the device's key
    // (protocol/SPEC.md §5.2).
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);

    // [4] The network stack: the on-chip MAC, a locally administered MAC address derived
    // from the device id, DHCP. NUCLEO-144 RMII pins: REF_CLK PA1, CRS_DV PA7, RXD0 PC4,
    // RXD1 PC5, TXD0 PG13, TXD1 PB13, TX_EN PG11; MDIO PA2, MDC PC1.
    let id = identity.device_id.to_le_bytes();
    let mac = [0x02, 0xca, id[0], id[1], id[2], id[3]];
    static PACKETS: StaticCell<PacketQueue<4, 4>> = StaticCell::new();
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

    // [5] Wait for an address before the client's first connect.
    info!(
        "cairn: device {} waiting for an address",
        identity.device_id
    );
    stack.wait_config_up().await;

    // [6] The client owns the connection in its own task.
    static CONFIG: StaticCell<Config<'static>> = StaticCell::new();
    let config = CONFIG.init(Config::new(
        identity.device_id,
        identity.key,
        boot,
        BootNonce::from_rng(nonce),
        identity.gateways(),
    ));
    spawner.spawn(uplink(stack, config).unwrap());

    // [7] The application: push a reading every second (replace with your sensors). Stream 1
    // carries three f32 values; declare it on the gateways with a matching `[[stream]]`.
    let mut ticker = Ticker::every(Duration::from_secs(1));
    let mut n = 0u32;
    loop {
        let reading = [
            Value::F32(21.0 + (n % 10) as f32 * 0.1),
            Value::F32(45.0),
            Value::F32(1013.25),
        ];
        if let Err(e) = CLIENT.push(1, &reading) {
            warn!("cairn: push refused: {}", e);
        }
        n += 1;
        if n.is_multiple_of(10) {
            let s = CLIENT.status();
            info!(
                "cairn: pushed={} acked={} queued={} outbox={}/{} B",
                s.pushed, s.acked, s.queued, s.outbox_bytes, s.outbox_capacity
            );
        }
        ticker.next().await;
    }
}

/// The identity in the settings region; without one, a development build (`dev-settings`)
/// runs as device 1 with the development key, a release build refuses.
fn identity(region: &[u8]) -> Option<DeviceSettings> {
    match DeviceSettings::decode(region) {
        Ok(identity) => {
            info!("cairn: provisioned as device {}", identity.device_id);
            Some(identity)
        }
        Err(e) if cfg!(feature = "dev-settings") => {
            warn!("cairn: settings region: {}; development identity", e);
            let mut key = [0u8; 32];
            for (i, k) in key.iter_mut().enumerate() {
                *k = i as u8;
            }
            let gateway = cairn_firmware::GatewayAddr::new([192, 168, 1, 10], 4003);
            DeviceSettings::new(1, key, &[gateway]).ok()
        }
        Err(e) => {
            error!("cairn: settings region: {}; refusing to start", e);
            None
        }
    }
}

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, Device>) -> ! {
    runner.run().await
}

#[embassy_executor::task]
async fn uplink(stack: Stack<'static>, config: &'static Config<'static>) -> ! {
    let mut transport = Transport::new(stack);
    CLIENT.run(&mut transport, config).await
}

/// 168 MHz from the ST-LINK's 8 MHz clock (HSE bypass) through the PLL; its Q output gives
/// the RNG its 48 MHz. The Ethernet MAC needs HCLK of at least 25 MHz.
fn clocks() -> embassy_stm32::Config {
    use embassy_stm32::rcc::*;
    use embassy_stm32::time::Hertz;
    let mut config = embassy_stm32::Config::default();
    config.rcc.hse = Some(Hse {
        freq: Hertz(8_000_000),
        mode: HseMode::Bypass,
    });
    config.rcc.pll_src = PllSource::HSE;
    config.rcc.pll = Some(Pll {
        prediv: PllPreDiv::DIV4,
        mul: PllMul::MUL168,
        divp: Some(PllPDiv::DIV2),
        divq: Some(PllQDiv::DIV7),
        divr: None,
    });
    config.rcc.sys = Sysclk::PLL1_P;
    config.rcc.ahb_pre = AHBPrescaler::DIV1;
    config.rcc.apb1_pre = APBPrescaler::DIV4;
    config.rcc.apb2_pre = APBPrescaler::DIV2;
    config
}
