//! The application with the Cairn client: every sample becomes records on two streams,
//! pushed into the client's outbox; the client (run alongside in the same task) sends them
//! to the gateways and drops them once a quorum has committed them.

use crate::sensor::{FakeSensor, STREAM_ENVIRONMENT, STREAM_POWER};
use crate::{AppError, Report, Settings, TCP_RX_BYTES, TCP_TX_BYTES};
use cairn_firmware::embassy_net::TcpTransport;
#[cfg(feature = "flash-outbox")]
use cairn_firmware::flash::FlashOutbox;
use cairn_firmware::{
    BootNonce, Client, Config, GatewayAddr, OverflowPolicy, RamOnly, Store, Value,
};
#[cfg(feature = "flash-outbox")]
use core::ops::Range;
use embassy_futures::select::{Either, select};
use embassy_net::Stack;
use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use embassy_time::{Duration, Instant, Ticker, Timer};
#[cfg(feature = "flash-outbox")]
use embedded_storage_async::nor_flash::NorFlash;

/// Bytes of RAM outbox: about 200 environment records (a record costs about 20 bytes on
/// the wire and a few more in the outbox), i.e. minutes of samples while no gateway answers.
pub const OUTBOX_BYTES: usize = 4096;
/// How long a finite run waits for its last records to be acknowledged.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// A status line every this many samples.
const STATUS_EVERY: u32 = 10;

type AppClient = Client<NoopRawMutex, OUTBOX_BYTES>;

/// Runs with the outbox in RAM only: records not yet acknowledged are lost on reset.
pub async fn run(
    stack: Stack<'_>,
    settings: &Settings,
    boot: u32,
    boot_nonce: BootNonce,
) -> Result<Report, AppError> {
    // Telemetry keeps the newest readings when the outbox overflows during an outage.
    let client = AppClient::new(OverflowPolicy::DropOldest);
    drive(stack, settings, boot, boot_nonce, &client, &mut RamOnly).await
}

/// Runs with the outbox mirrored in NOR flash (`region`: a byte range of `flash` aligned to
/// its erase units, at least two of them): records survive resets and power cuts and are
/// resent, never duplicated. The boot number comes from the flash's boot counter.
#[cfg(feature = "flash-outbox")]
pub async fn run_with_flash<F: NorFlash>(
    stack: Stack<'_>,
    settings: &Settings,
    flash: F,
    region: Range<u32>,
    entropy: [u8; 8],
) -> Result<Report, AppError> {
    let mut store = FlashOutbox::open(flash, region).await.map_err(|e| {
        error!("cairn: flash outbox: {}", e);
        AppError::Flash
    })?;
    let client = AppClient::new(OverflowPolicy::DropOldest);
    let restored = store.restore(&client).await.map_err(|e| {
        error!("cairn: flash outbox restore: {}", e);
        AppError::Flash
    })?;
    info!(
        "cairn: boot {}, {} records restored from flash",
        store.boot(),
        restored
    );
    let boot = store.boot();
    // The boot counter is persisted before the first Hello: unique per boot (SPEC.md §5.2).
    let boot_nonce = BootNonce::from_counter(boot, entropy);
    drive(stack, settings, boot, boot_nonce, &client, &mut store).await
}

async fn drive<S: Store>(
    stack: Stack<'_>,
    settings: &Settings,
    boot: u32,
    boot_nonce: BootNonce,
    client: &AppClient,
    store: &mut S,
) -> Result<Report, AppError> {
    let mut gateways = [GatewayAddr {
        ip: [0; 4],
        port: 0,
    }; crate::MAX_GATEWAYS];
    for (to, from) in gateways.iter_mut().zip(settings.gateways()) {
        *to = GatewayAddr {
            ip: from.ip,
            port: from.port,
        };
    }
    let config = Config::new(
        settings.device_id,
        settings.key,
        boot,
        boot_nonce,
        &gateways[..settings.gateway_count],
    );
    let mut transport = TcpTransport::<TCP_RX_BYTES, TCP_TX_BYTES>::new(stack);
    let running = client.run_with_store(&mut transport, &config, store);
    match select(running, sample(client, settings)).await {
        Either::First(never) => never,
        Either::Second(report) => report,
    }
}

async fn sample(client: &AppClient, settings: &Settings) -> Result<Report, AppError> {
    let mut sensor = FakeSensor::new(settings.device_id);
    let mut ticker = Ticker::every(Duration::from_millis(settings.period_ms.into()));
    let mut samples = 0u32;
    while settings.samples == 0 || samples < settings.samples {
        let sample = sensor.sample();
        samples += 1;
        let env = sample.environment;
        let values = [
            Value::F32(env.temperature_c),
            Value::F32(env.humidity_pct),
            Value::F32(env.pressure_hpa),
        ];
        if let Err(e) = client.push(STREAM_ENVIRONMENT, &values) {
            warn!("cairn: push refused: {}", e);
        }
        if let Some(power) = sample.power {
            let values = [Value::I64(power.battery_mv), Value::Bool(power.charging)];
            if let Err(e) = client.push(STREAM_POWER, &values) {
                warn!("cairn: push refused: {}", e);
            }
        }
        if samples.is_multiple_of(STATUS_EVERY) {
            let status = client.status();
            info!(
                "cairn: status samples={} pushed={} acked={} queued={} retries={}",
                samples, status.pushed, status.acked, status.queued, status.retries
            );
        }
        ticker.next().await;
    }

    // A finite run (tests) ends once everything pushed is acknowledged.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let status = loop {
        let status = client.status();
        if status.queued == 0 {
            break status;
        }
        if Instant::now() > deadline {
            error!(
                "cairn: {} records still unacknowledged after {} s",
                status.queued,
                DRAIN_TIMEOUT.as_secs()
            );
            return Err(AppError::NotAcknowledged);
        }
        Timer::after(Duration::from_millis(50)).await;
    };
    Ok(Report {
        samples,
        pushed: status.pushed as u32,
        acked: status.acked as u32,
    })
}
