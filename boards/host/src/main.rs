//! The Cairn board application as a Linux process, on embassy-net over a TAP device: the
//! same code path as the firmware boards (embassy-net, smoltcp, the Cairn client), so the
//! fault tests can cut, delay and restore its network with iptables inside a network
//! namespace. See README.md.

use cairn_board_app::Settings;
use embassy_executor::Spawner;
use embassy_net::{Ipv4Address, Ipv4Cidr, StackResources, StaticConfigV4};
use embassy_net_tuntap::TunTapDevice;
use static_cell::StaticCell;
use std::process::exit;
use std::time::{SystemTime, UNIX_EPOCH};

const USAGE: &str = "\
usage: cairn-board-host [--tap NAME] [--address IP/LEN [--router IP]] [SETTING=VALUE ...]

  --tap NAME        TAP device to attach to (created if missing; needs CAP_NET_ADMIN). Default cairn0.
  --address IP/LEN  static address; without it the address comes from DHCP.
  --router IP       default route for --address.
  SETTING=VALUE     device-id, key, gateways, period-ms, samples (see boards/app/README.md);
                    they override the CAIRN_* values the binary was built with.

exit status: 0 done, 2 no gateway reachable, 3 connection lost, 4 echo mismatch (skeleton),
             5 cannot open the TAP device, 6 bad arguments
";
const EXIT_NO_TAP: i32 = 5;
const EXIT_USAGE: i32 = 6;

struct Args {
    tap: String,
    address: Option<StaticConfigV4>,
    settings: Settings,
}

fn parse_args() -> Result<Args, String> {
    let mut tap = "cairn0".to_string();
    let mut cidr = None;
    let mut router = None;
    let mut settings = cairn_board_app::BUILD;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--tap" => tap = value("--tap")?,
            "--address" => {
                let v = value("--address")?;
                cidr = Some(
                    v.parse::<Ipv4Cidr>()
                        .map_err(|_| format!("bad --address {v}"))?,
                );
            }
            "--router" => {
                let v = value("--router")?;
                router = Some(
                    v.parse::<Ipv4Address>()
                        .map_err(|_| format!("bad --router {v}"))?,
                );
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                exit(0);
            }
            setting => settings
                .apply(setting)
                .map_err(|e| format!("{setting}: {e}"))?,
        }
    }
    let address = cidr.map(|address| StaticConfigV4 {
        address,
        gateway: router,
        dns_servers: Default::default(),
    });
    Ok(Args {
        tap,
        address,
        settings,
    })
}

/// Log lines to stderr as `LEVEL target: message`; `CAIRN_LOG=debug` for more.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "{:<5} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    static LOGGER: StderrLog = StderrLog;
    let level = match std::env::var("CAIRN_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        Ok("warn") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Info,
    };
    let _ = log::set_logger(&LOGGER).map(|()| log::set_max_level(level));

    let args = parse_args().unwrap_or_else(|e| {
        eprint!("cairn-board-host: {e}\n\n{USAGE}");
        exit(EXIT_USAGE);
    });
    let device = TunTapDevice::new(&args.tap).unwrap_or_else(|e| {
        eprintln!("cairn-board-host: cannot open TAP device {}: {e}", args.tap);
        exit(EXIT_NO_TAP);
    });
    // A fresh boot number per run, as a board's RNG would give.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let boot = now.as_secs() as u32 ^ now.subsec_nanos() ^ std::process::id();
    let seed = u64::from(boot) << 32 ^ args.settings.device_id;

    let config = match args.address {
        Some(address) => embassy_net::Config::ipv4_static(address),
        None => embassy_net::Config::dhcpv4(Default::default()),
    };
    static RESOURCES: StaticCell<StackResources<3>> = StaticCell::new();
    let (stack, runner) =
        embassy_net::new(device, config, RESOURCES.init(StackResources::new()), seed);
    spawner.spawn(net_task(runner).unwrap());

    static SETTINGS: StaticCell<Settings> = StaticCell::new();
    let settings = SETTINGS.init(args.settings);
    #[cfg(feature = "client")]
    let run = {
        // The boot nonce: 12 bytes of the operating system's RNG (SPEC.md §5.2).
        let mut nonce = [0u8; 12];
        if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| {
            use std::io::Read;
            f.read_exact(&mut nonce)
        }) {
            eprintln!("cairn-board-host: reading /dev/urandom: {e}");
            exit(EXIT_USAGE);
        }
        let nonce = cairn_board_app::BootNonce::from_rng(nonce);
        cairn_board_app::run(stack, settings, boot, nonce)
    };
    // Without the client: the network skeleton only (`cargo xtask host-smoke`).
    #[cfg(not(feature = "client"))]
    let run = cairn_board_app::run(stack, settings);
    let code = match run.await {
        Ok(_) => 0,
        Err(e) => {
            log::error!("cairn: stopped: {e:?}");
            e.exit_code()
        }
    };
    exit(code);
}

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, TunTapDevice>) -> ! {
    runner.run().await
}
