#![doc = include_str!("../README.md")]

use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use cairn_firmware::tokio::{TcpTransport, TokioConnection};
use cairn_firmware::{
    BootNonce, Client, Config, Connection, GatewayAddr, OverflowPolicy, Transport, TransportError,
    Value,
};
use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use serde_json::json;

/// Outbox bytes per simulated device.
pub const OUTBOX: usize = 65_000;

type SimClient = Client<NoopRawMutex, OUTBOX>;

/// `cairn sim` options.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    pub devices: u64,
    /// Records per second per device.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Device ports of the gateways, comma-separated (`host:port`).
    #[arg(long, default_value = "127.0.0.1:4003")]
    pub gateways: String,
    /// Seconds to push for (default: until Ctrl-C).
    #[arg(long)]
    pub duration: Option<f64>,
    /// End with one JSON summary line.
    #[arg(long)]
    pub json: bool,
    /// HTTP API used to register the devices' keys (`http://user:pass@host` also works).
    #[arg(long, default_value = "http://127.0.0.1:4001")]
    pub host: String,
    /// User with the `devices` permission (password from CAIRN_PASSWORD); or CAIRN_USER.
    #[arg(long)]
    pub user: Option<String>,
    /// CA certificate (PEM) of the API's HTTPS certificate.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Id of the first device; the others follow.
    #[arg(long, default_value_t = 1)]
    pub first_id: u64,
    /// Stream the records are pushed on.
    #[arg(long, default_value_t = 1)]
    pub stream: u16,
    /// Seconds to wait after pushing stops for outstanding records to be acknowledged.
    #[arg(long, default_value_t = 30.0)]
    pub drain: f64,
    /// OS threads running devices (default: the number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write one JSON line per device to this file at the end.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print nothing while running.
    #[arg(long)]
    pub quiet: bool,
}

/// Latencies in 100 µs buckets up to 60 s.
struct Latencies {
    buckets: Vec<AtomicU64>,
}

impl Latencies {
    fn new() -> Self {
        Latencies {
            buckets: (0..600_000).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn record(&self, d: Duration) {
        let i = ((d.as_micros() / 100) as usize).min(self.buckets.len() - 1);
        self.buckets[i].fetch_add(1, Relaxed);
    }

    /// Quantile `q` in ms (upper edge of its bucket).
    fn quantile_ms(&self, q: f64) -> f64 {
        let total: u64 = self.buckets.iter().map(|b| b.load(Relaxed)).sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= rank {
                return (i + 1) as f64 / 10.0;
            }
        }
        self.buckets.len() as f64 / 10.0
    }
}

/// One simulated device as the threads share it.
struct Device {
    id: u64,
    key: [u8; 32],
    boot: u32,
}

/// Per-device results.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct DeviceReport {
    device_id: u64,
    pushed: u64,
    acked: u64,
    acked_through: u64,
    queued: u32,
    dropped: u64,
    reconnects: u64,
    last_error: Option<String>,
}

/// Shared state of the whole fleet.
struct Fleet {
    start: Instant,
    stop_pushing: AtomicBool,
    stop: AtomicBool,
    pushed: AtomicU64,
    acked: AtomicU64,
    latencies: Latencies,
    /// Per connection: TCP connect, and the protocol handshake (Hello written to the first
    /// bytes of the gateway's answer, the Welcome: one round trip plus the gateway's key
    /// lookup, key derivation and linearizable high-water read).
    connects: Latencies,
    handshakes: Latencies,
}

/// The TCP transport, timing every connection's connect and handshake into the fleet.
struct TimedTransport {
    fleet: Arc<Fleet>,
}

struct TimedConnection {
    inner: TokioConnection,
    fleet: Arc<Fleet>,
    /// When the first frame (the Hello) was written, until the first answer arrives.
    hello_at: Option<Instant>,
    answered: bool,
}

impl Transport for TimedTransport {
    type Connection<'a> = TimedConnection;

    async fn connect(&mut self, addr: GatewayAddr) -> Result<TimedConnection, TransportError> {
        let start = Instant::now();
        let inner = TcpTransport::new().connect(addr).await?;
        self.fleet.connects.record(start.elapsed());
        Ok(TimedConnection {
            inner,
            fleet: self.fleet.clone(),
            hello_at: None,
            answered: false,
        })
    }
}

impl Connection for TimedConnection {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let n = self.inner.read(buf).await?;
        if n > 0 && !self.answered {
            self.answered = true;
            if let Some(at) = self.hello_at {
                self.fleet.handshakes.record(at.elapsed());
            }
        }
        Ok(n)
    }

    async fn write(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
        self.hello_at.get_or_insert_with(Instant::now);
        self.inner.write(buf).await
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        self.inner.flush().await
    }

    async fn close(&mut self) {
        self.inner.close().await
    }
}

fn parse_gateways(s: &str) -> anyhow::Result<Vec<GatewayAddr>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let addr = part
            .to_socket_addrs()
            .map_err(|e| anyhow::anyhow!("gateway {part}: {e}"))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| anyhow::anyhow!("gateway {part}: no IPv4 address"))?;
        let SocketAddr::V4(v4) = addr else {
            unreachable!("filtered to IPv4")
        };
        out.push(GatewayAddr::from(v4));
    }
    anyhow::ensure!(!out.is_empty(), "--gateways names no gateway");
    Ok(out)
}

/// The API host without user-info, and the `Authorization` header to send: user-info in
/// the URL, else `user` (or `CAIRN_USER`) with `CAIRN_PASSWORD`.
fn credentials(host: &str, user: Option<&str>) -> (String, Option<String>) {
    use base64::Engine;
    let basic = |u: &str, p: &str| {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        Some(format!("Basic {token}"))
    };
    let (scheme, rest) = host.split_once("://").unwrap_or(("http", host));
    let end = rest.find('/').unwrap_or(rest.len());
    if let Some((userinfo, after)) = rest[..end].rsplit_once('@') {
        let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        return (format!("{scheme}://{after}{}", &rest[end..]), basic(u, p));
    }
    let user = user
        .map(str::to_string)
        .or_else(|| std::env::var("CAIRN_USER").ok());
    let password = std::env::var("CAIRN_PASSWORD").unwrap_or_default();
    (host.to_string(), user.and_then(|u| basic(&u, &password)))
}

/// An agent for the API: HTTPS (rustls with ring) trusting `ca_cert` when given.
fn api_agent(ca_cert: Option<&std::path::Path>) -> anyhow::Result<ureq::Agent> {
    let mut b = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)));
    if let Some(ca) = ca_cert {
        let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
        let root = ureq::tls::Certificate::from_pem(&pem)?;
        b = b.tls_config(
            ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::Rustls)
                .unversioned_rustls_crypto_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .root_certs(ureq::tls::RootCerts::new_with_certs(&[root]))
                .build(),
        );
    }
    Ok(b.build().into())
}

/// Registers every device's key through the HTTP API (a few threads in parallel).
fn register(args: &SimArgs, devices: &[Device]) -> anyhow::Result<()> {
    let (host, authorization) = credentials(&args.host, args.user.as_deref());
    let host = host.trim_end_matches('/').to_string();
    let agent = api_agent(args.ca_cert.as_deref())?;
    let chunks: Vec<Vec<(u64, String)>> = devices
        .chunks(devices.len().div_ceil(8).max(1))
        .map(|c| {
            c.iter()
                .map(|d| (d.id, d.key.iter().map(|b| format!("{b:02x}")).collect()))
                .collect()
        })
        .collect();
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let (host, agent, authorization) = (host.clone(), agent.clone(), authorization.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                for (id, key) in chunk {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        let mut req = agent.post(&format!("{host}/devices"));
                        if let Some(a) = &authorization {
                            req = req.header("authorization", a);
                        }
                        let r = req
                            .send_json(json!({"id": id, "key": key}))
                            .map_err(anyhow::Error::from)
                            .and_then(|mut resp| {
                                let body = resp.body_mut().read_to_string()?;
                                Ok((resp.status().as_u16(), body))
                            });
                        match r {
                            Ok((200, _)) => break,
                            // A cluster still electing its leader: retry for a while.
                            Ok((status, body)) if Instant::now() > deadline => {
                                anyhow::bail!("registering device {id}: HTTP {status}: {body}")
                            }
                            Err(e) if Instant::now() > deadline => {
                                anyhow::bail!("registering device {id}: {e}")
                            }
                            _ => std::thread::sleep(Duration::from_millis(200)),
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("registration thread panicked"))??;
    }
    Ok(())
}

/// Runs one thread's share of the fleet to the end; returns its devices' reports.
fn run_thread(
    devices: Vec<Device>,
    gateways: &'static [GatewayAddr],
    args: &SimArgs,
    fleet: Arc<Fleet>,
) -> Vec<DeviceReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    let rate = args.rate;
    let stream = args.stream;
    local.block_on(&rt, async move {
        let mut clients: Vec<(&'static SimClient, u64)> = Vec::new();
        let mut runners = Vec::new();
        for d in &devices {
            let client: &'static SimClient =
                Box::leak(Box::new(Client::new(OverflowPolicy::RejectNewest)));
            // Each device starts at a different gateway of the list, so load (and the
            // follower forwarding path) is spread over all of them.
            let mut list = gateways.to_vec();
            list.rotate_left((d.id % gateways.len() as u64) as usize);
            let list: &'static [GatewayAddr] = Box::leak(list.into_boxed_slice());
            let config: &'static Config<'static> = Box::leak(Box::new(Config::new(
                d.id,
                d.key,
                d.boot,
                // The operating system's RNG (SPEC.md §5.2).
                BootNonce::from_rng(rand::random()),
                list,
            )));
            let fleet = fleet.clone();
            runners.push(tokio::task::spawn_local(async move {
                client.run(&mut TimedTransport { fleet }, config).await
            }));
            clients.push((client, d.id));
        }
        let n = clients.len();
        let mut pushed_k = vec![0u64; n];
        let mut dropped = vec![0u64; n];
        // (seq, push time) of unacknowledged records, per device.
        let mut in_flight: Vec<VecDeque<(u64, Instant)>> = vec![VecDeque::new(); n];
        let mut acked_seen = vec![0u64; n];
        let mut last_push = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let started = fleet.start;
        loop {
            tick.tick().await;
            let now = Instant::now();
            // Push what is due, every 5 ms.
            if !fleet.stop_pushing.load(Relaxed)
                && now.duration_since(last_push) >= Duration::from_millis(5)
            {
                last_push = now;
                let due = (now.duration_since(started).as_secs_f64() * rate) as u64;
                for (i, (client, _)) in clients.iter().enumerate() {
                    while pushed_k[i] < due {
                        let k = pushed_k[i] + 1;
                        let temperature = 20.0 + (k % 100) as f32 / 10.0;
                        match client.push(stream, &[Value::U64(k), Value::F32(temperature)]) {
                            Ok(seq) => {
                                in_flight[i].push_back((seq, now));
                                fleet.pushed.fetch_add(1, Relaxed);
                            }
                            Err(_) => dropped[i] += 1,
                        }
                        pushed_k[i] = k;
                    }
                }
            }
            // Acks.
            let mut all_acked = true;
            for (i, (client, _)) in clients.iter().enumerate() {
                let st = client.status();
                if st.acked > acked_seen[i] {
                    fleet.acked.fetch_add(st.acked - acked_seen[i], Relaxed);
                    acked_seen[i] = st.acked;
                }
                while let Some(&(seq, at)) = in_flight[i].front() {
                    if seq > st.acked_through {
                        break;
                    }
                    fleet.latencies.record(now.duration_since(at));
                    in_flight[i].pop_front();
                }
                all_acked &= st.queued == 0;
            }
            if fleet.stop.load(Relaxed) || (fleet.stop_pushing.load(Relaxed) && all_acked) {
                break;
            }
        }
        for r in runners {
            r.abort();
        }
        clients
            .iter()
            .enumerate()
            .map(|(i, (client, id))| {
                let st = client.status();
                DeviceReport {
                    device_id: *id,
                    pushed: st.pushed,
                    acked: st.acked,
                    acked_through: st.acked_through,
                    queued: st.queued,
                    dropped: st.dropped + dropped[i],
                    reconnects: st.reconnects,
                    last_error: st.last_error.map(|e| e.to_string()),
                }
            })
            .collect()
    })
}

/// `cairn sim`: runs the fleet until `--duration` passes or `interrupt` resolves (the binary
/// passes its Ctrl-C / SIGTERM future; a fleet that runs for the life of the process passes
/// `std::future::pending()`), then drains and prints the summary.
pub fn run(
    args: SimArgs,
    interrupt: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let gateways: &'static [GatewayAddr] =
        Box::leak(parse_gateways(&args.gateways)?.into_boxed_slice());
    let devices: Vec<Device> = (0..args.devices)
        .map(|i| Device {
            id: args.first_id + i,
            key: rand::random(),
            boot: rand::random(),
        })
        .collect();
    register(&args, &devices)?;
    if !args.quiet {
        eprintln!(
            "cairn sim: {} devices ({}..={}), {} records/s each, gateways {}",
            args.devices,
            args.first_id,
            args.first_id + args.devices - 1,
            args.rate,
            args.gateways
        );
    }
    let fleet = Arc::new(Fleet {
        start: Instant::now(),
        stop_pushing: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        pushed: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        latencies: Latencies::new(),
        connects: Latencies::new(),
        handshakes: Latencies::new(),
    });
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, devices.len());
    let mut shares: Vec<Vec<Device>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, d) in devices.into_iter().enumerate() {
        shares[i % threads].push(d);
    }
    let workers: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let (args, fleet) = (args.clone(), fleet.clone());
            std::thread::spawn(move || run_thread(share, gateways, &args, fleet))
        })
        .collect();

    // Ctrl-C / SIGTERM stops pushing (a second one stops at once).
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(interrupt);
                interrupted.store(true, Relaxed);
            }
        });
    }
    let push_end = args
        .duration
        .map(|d| fleet.start + Duration::from_secs_f64(d));
    let mut last_report = (Instant::now(), 0u64, 0u64);
    let mut drain_end: Option<Instant> = None;
    let mut acked_at_stop = 0;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        if drain_end.is_none() && (push_end.is_some_and(|e| now >= e) || interrupted.load(Relaxed))
        {
            fleet.stop_pushing.store(true, Relaxed);
            acked_at_stop = fleet.acked.load(Relaxed);
            drain_end = Some(now + Duration::from_secs_f64(args.drain));
        }
        if drain_end.is_some_and(|e| now >= e) {
            fleet.stop.store(true, Relaxed);
        }
        if workers.iter().all(|w| w.is_finished()) {
            break;
        }
        if !args.quiet && now.duration_since(last_report.0) >= Duration::from_secs(1) {
            let (pushed, acked) = (fleet.pushed.load(Relaxed), fleet.acked.load(Relaxed));
            let dt = now.duration_since(last_report.0).as_secs_f64();
            eprintln!(
                "  pushed {pushed} ({:.0}/s), acked {acked} ({:.0}/s), ack p50 {:.1} ms p99 {:.1} ms",
                (pushed - last_report.1) as f64 / dt,
                (acked - last_report.2) as f64 / dt,
                fleet.latencies.quantile_ms(0.5),
                fleet.latencies.quantile_ms(0.99),
            );
            last_report = (now, pushed, acked);
        }
    }
    let mut reports = Vec::new();
    for w in workers {
        reports.extend(
            w.join()
                .map_err(|_| anyhow::anyhow!("device thread panicked"))?,
        );
    }
    reports.sort_by_key(|r| r.device_id);
    let elapsed = push_end
        .map(|e| e.min(Instant::now()))
        .unwrap_or_else(Instant::now)
        .duration_since(fleet.start)
        .as_secs_f64();
    let sum = |f: fn(&DeviceReport) -> u64| reports.iter().map(f).sum::<u64>();
    let summary = json!({
        "devices": reports.len(),
        "pushed": sum(|r| r.pushed),
        "acked": sum(|r| r.acked),
        "dropped": sum(|r| r.dropped),
        "queued": sum(|r| u64::from(r.queued)),
        "p50_ms": fleet.latencies.quantile_ms(0.5),
        "p99_ms": fleet.latencies.quantile_ms(0.99),
        // Per connection: TCP connect, and Hello -> Welcome (SPEC.md §5: one round trip).
        "connect_p50_ms": fleet.connects.quantile_ms(0.5),
        "handshake_p50_ms": fleet.handshakes.quantile_ms(0.5),
        "handshake_p99_ms": fleet.handshakes.quantile_ms(0.99),
        // Acknowledged while pushing, per second of pushing.
        "records_per_s": (acked_at_stop as f64 / elapsed.max(1e-9)).round(),
    });
    if let Some(path) = &args.report {
        let mut text = String::new();
        for r in &reports {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        std::fs::write(path, text)?;
    }
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "cairn sim: {} devices pushed {} records, {} acknowledged, {} dropped, {} still queued; \
             ack latency p50 {} ms, p99 {} ms",
            summary["devices"],
            summary["pushed"],
            summary["acked"],
            summary["dropped"],
            summary["queued"],
            summary["p50_ms"],
            summary["p99_ms"]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_gateways() {
        let list = parse_gateways("127.0.0.1:4003, 127.0.0.1:4013,").unwrap();
        assert_eq!(
            list,
            [
                GatewayAddr::new([127, 0, 0, 1], 4003),
                GatewayAddr::new([127, 0, 0, 1], 4013)
            ]
        );
        assert!(parse_gateways("").is_err());
        assert!(parse_gateways("127.0.0.1").is_err());
    }

    #[test]
    fn test_latency_quantiles() {
        let l = Latencies::new();
        assert_eq!(l.quantile_ms(0.5), 0.0);
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        // Upper edges of 100 µs buckets: 50 ms lands in the bucket ending at 50.1 ms.
        assert_eq!(l.quantile_ms(0.5), 50.1);
        assert_eq!(l.quantile_ms(0.99), 99.1);
        l.record(Duration::from_secs(3600));
        assert_eq!(l.quantile_ms(1.0), 60_000.0);
    }
}
