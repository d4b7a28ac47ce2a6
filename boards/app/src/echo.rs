//! The network skeleton: the same sampling loop without the Cairn client. Each sample
//! goes to the first reachable gateway as a fixed 24-byte packet (device id u64,
//! sample number u32, three f32, all little-endian) and must come back unchanged.
//! `cargo xtask qemu --smoke` answers it; `cargo xtask size` builds it to show what the
//! client adds.

use crate::sensor::FakeSensor;
use crate::{AppError, Report, Settings, TCP_RX_BYTES, TCP_TX_BYTES};
use embassy_net::tcp::TcpSocket;
use embassy_net::{IpAddress, Stack};
use embassy_time::{Duration, Ticker, Timer};

const PACKET: usize = 24;
const CONNECT_ATTEMPTS: u32 = 10;

pub async fn run(stack: Stack<'_>, settings: &Settings) -> Result<Report, AppError> {
    let mut rx = [0u8; TCP_RX_BYTES];
    let mut tx = [0u8; TCP_TX_BYTES];
    let mut socket = TcpSocket::new(stack, &mut rx, &mut tx);
    socket.set_timeout(Some(Duration::from_secs(10)));
    connect(&mut socket, settings).await?;

    let mut sensor = FakeSensor::new(settings.device_id);
    let mut ticker = Ticker::every(Duration::from_millis(settings.period_ms.into()));
    let mut report = Report::default();
    while settings.samples == 0 || report.samples < settings.samples {
        let sample = sensor.sample();
        report.samples += 1;
        let mut packet = [0u8; PACKET];
        packet[0..8].copy_from_slice(&settings.device_id.to_le_bytes());
        packet[8..12].copy_from_slice(&sample.n.to_le_bytes());
        let env = sample.environment;
        packet[12..16].copy_from_slice(&env.temperature_c.to_le_bytes());
        packet[16..20].copy_from_slice(&env.humidity_pct.to_le_bytes());
        packet[20..24].copy_from_slice(&env.pressure_hpa.to_le_bytes());
        write_all(&mut socket, &packet).await?;
        report.pushed += 1;
        let mut echoed = [0u8; PACKET];
        read_exact(&mut socket, &mut echoed).await?;
        if echoed != packet {
            return Err(AppError::EchoMismatch);
        }
        report.acked += 1;
        ticker.next().await;
    }
    socket.close();
    // Let the FIN go out before the caller stops the stack.
    let _ = socket.flush().await;
    Ok(report)
}

async fn connect(socket: &mut TcpSocket<'_>, settings: &Settings) -> Result<(), AppError> {
    for attempt in 0..CONNECT_ATTEMPTS {
        for gateway in settings.gateways() {
            let [a, b, c, d] = gateway.ip;
            let addr = IpAddress::v4(a, b, c, d);
            match socket.connect((addr, gateway.port)).await {
                Ok(()) => {
                    info!("cairn: connected to {}:{}", addr, gateway.port);
                    return Ok(());
                }
                Err(e) => {
                    warn!(
                        "cairn: connect to {}:{} failed: {:?}",
                        addr, gateway.port, e
                    );
                    socket.abort();
                    let _ = socket.flush().await;
                }
            }
        }
        Timer::after(Duration::from_millis(200 << attempt.min(4))).await;
    }
    Err(AppError::Unreachable)
}

async fn write_all(socket: &mut TcpSocket<'_>, mut buf: &[u8]) -> Result<(), AppError> {
    while !buf.is_empty() {
        match socket.write(buf).await {
            Ok(0) | Err(_) => return Err(AppError::ConnectionLost),
            Ok(n) => buf = &buf[n..],
        }
    }
    Ok(())
}

async fn read_exact(socket: &mut TcpSocket<'_>, mut buf: &mut [u8]) -> Result<(), AppError> {
    while !buf.is_empty() {
        match socket.read(buf).await {
            Ok(0) | Err(_) => return Err(AppError::ConnectionLost),
            Ok(n) => buf = &mut buf[n..],
        }
    }
    Ok(())
}
