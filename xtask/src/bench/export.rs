//! `cargo xtask bench --only export`: how fast records leave the site (issue 28). A 3-node
//! cluster of release `cairn` processes on loopback exports to the real servers the export
//! tests use (`cairn_tests::servers`: postgresql-15, nats-server with JetStream, mosquitto,
//! and the in-process rqlite-CDC webhook receiver; `cargo xtask setup` installs them).
//!
//! - **Throughput per kind**: the four destinations are configured with priorities (webhook >
//!   postgres > nats > mqtt) and the webhook answers 503 while 100 protocol-level devices
//!   saturate the leader, so nothing is exported during ingest (a destination waits while one
//!   ranked above is more than a batch behind). Then the webhook comes back: each destination
//!   catches up on the whole backlog alone, one after the other, and its rate is the records
//!   it delivered from its first delivery to its last, over that time (sampled every 25 ms from
//!   the leader's `delivered` counter).
//! - **Lag**: a second cluster with the four destinations at equal priority, all up, while
//!   `cairn sim` (the firmware client) pushes at half the ingest rate measured above; every
//!   500 ms after a warm-up the leader's `lag_records` and `lag_seconds` per destination, mean
//!   and maximum.

use super::Profile;
use super::report::{Measurement, Results};
use anyhow::{Context, Result, ensure};
use cairn_tests::device::{self, sim_command, sim_summary};
use cairn_tests::servers::{Mosquitto, NatsServer, Postgres, WebhookReceiver};
use cairn_tests::{Cluster, Options, fleet};
use serde_json::Value as Json;
use std::path::Path;
use std::time::{Duration, Instant};

pub const SYSTEM: &str = "Cairn export";

/// The destinations, in the order they catch up in the throughput run.
const KINDS: [&str; 4] = ["webhook", "postgres", "nats", "mqtt"];

/// Records per delivery for every kind (so the kinds compare like with like).
const BATCH: u32 = 1000;

/// What each figure is, for BENCHMARKS.md.
pub const METHOD: &str = "\
- **Cairn export**: the same 3-node release cluster exporting the stream table to real \
servers on loopback (postgresql-15 with `ON CONFLICT DO NOTHING` on the key, nats-server \
JetStream with `Nats-Msg-Id`, mosquitto QoS 1, and the test harness's in-process HTTP receiver \
of rqlite CDC envelopes), 1,000 records per delivery. Throughput per kind: 100 devices fill \
a backlog while the webhook (ranked first) is away and the others wait behind it; then each \
destination catches up alone in rank order, rate = records delivered between its first and \
last delivery over that time (the leader's counters, sampled every 25 ms). Lag: all four at \
equal priority while `cairn sim` pushes at half the ingest rate of the fill, the leader's \
`lag_records` and `lag_seconds` per destination every 500 ms (mean and maximum).\n";

/// The real servers, up for the whole part.
struct Servers {
    pg: Postgres,
    nats: NatsServer,
    mqtt: Mosquitto,
    hook: WebhookReceiver,
}

impl Servers {
    fn start() -> Result<Servers> {
        Ok(Servers {
            pg: Postgres::start().context("postgresql-15 (cargo xtask setup installs it)")?,
            nats: NatsServer::start().context("nats-server (cargo xtask setup installs it)")?,
            mqtt: Mosquitto::start().context("mosquitto (cargo xtask setup installs it)")?,
            hook: WebhookReceiver::start()?,
        })
    }

    /// The four `[[export]]` entries; `ranked`: webhook 4, postgres 3, nats 2, mqtt 1.
    /// `tag` keeps the runs apart at the servers (PostgreSQL tables `{tag}_*`, JetStream
    /// stream `{TAG}` on subjects `{tag}.>`).
    fn config(&self, ranked: bool, tag: &str) -> String {
        let mut c = format!("site = \"bench\"\n{}", fleet::stream_toml());
        for (i, kind) in KINDS.iter().enumerate() {
            let (url, extra) = match *kind {
                "webhook" => (self.hook.url.clone(), String::new()),
                "postgres" => (self.pg.url(), format!("table_prefix = \"{tag}_\"\n")),
                "nats" => (
                    self.nats.url(),
                    format!(
                        "stream = \"{}\"\nsubject = \"{tag}.{{site}}.{{table}}.{{device_id}}\"\n",
                        tag.to_uppercase()
                    ),
                ),
                _ => (self.mqtt.url(), String::new()),
            };
            let priority = if ranked { 4 - i as i32 } else { 0 };
            c.push_str(&format!(
                "\n[[export]]\nname = \"{kind}\"\nkind = \"{kind}\"\nurl = \"{url}\"\n\
                 batch_records = {BATCH}\npriority = {priority}\n{extra}"
            ));
        }
        c
    }
}

pub fn run(profile: &Profile, results: &mut Results, bin: &Path) -> Result<()> {
    let servers = Servers::start()?;
    let ingest = throughput(profile, results, bin, &servers)?;
    lag(profile, results, bin, &servers, ingest / 2.0)
}

fn start_cluster(bin: &Path, config: String) -> Cluster {
    let dir = crate::util::root().join("target/bench/work/export");
    Cluster::start_with(
        3,
        Options {
            config: Some(config),
            log: Some(std::env::var("CAIRN_BENCH_LOG").unwrap_or_else(|_| "warn".into())),
            dir: Some(dir),
            ..Options::binary(bin)
        },
    )
}

/// The leader's `"export"` object of `/status`.
fn export_status(c: &Cluster, leader: usize) -> Option<Json> {
    c.nodes[leader].status().map(|s| s["export"].clone())
}

fn wait_running(c: &Cluster, leader: usize) {
    cairn_tests::poll(
        Duration::from_secs(60),
        "export destinations running",
        || {
            let s = export_status(c, leader)?;
            KINDS.iter().all(|k| s[*k]["running"] == true).then_some(())
        },
    );
}

/// Fills a backlog while the destinations wait, then times each one's catch-up; returns the
/// ingest rate of the fill (records/s).
fn throughput(
    profile: &Profile,
    results: &mut Results,
    bin: &Path,
    servers: &Servers,
) -> Result<f64> {
    servers.hook.set_down(true);
    let c = start_cluster(bin, servers.config(true, "tput"));
    let leader = c.leader();
    wait_running(&c, leader);
    let http = c.nodes[leader].url("");
    device::register(&http, 1..101)?;
    let fill = Duration::from_secs_f64(if profile.quick { 3.0 } else { 8.0 });
    let r = fleet::run(&fleet::Plan {
        gateways: vec![c.nodes[leader].device.parse()?],
        ids: 1..101,
        mode: fleet::Mode::Saturate,
        duration: fill,
        probe: None,
    })?;
    let ingest = r.acked as f64 / r.elapsed.as_secs_f64();
    println!(
        "    fill: {} records acknowledged at {ingest:.0}/s ({} reconnects)",
        r.acked, r.reconnects
    );
    results.push(Measurement::new(
        "device ingest while export waits, 100 devices",
        SYSTEM,
        ingest,
        "records/s",
    ));
    let total = c.nodes[leader].rows("SELECT count(*) FROM climate", "linearizable")[0][0]
        .as_u64()
        .context("count")?;
    let delivered = |s: &Json, k: &str| s[k]["delivered"].as_u64().unwrap_or(0);
    let before = export_status(&c, leader).context("status")?;
    let mut first: [Option<(Instant, u64)>; 4] = [None; 4];
    let mut done: [Option<Instant>; 4] = [None; 4];
    servers.hook.set_down(false);
    let released = Instant::now();
    let limit = Duration::from_secs(600);
    while done.iter().any(Option::is_none) {
        ensure!(
            released.elapsed() < limit,
            "export did not catch up on {total} records within {limit:?}"
        );
        if let Some(s) = export_status(&c, leader) {
            let now = Instant::now();
            for (i, k) in KINDS.iter().enumerate() {
                let d = delivered(&s, k);
                if first[i].is_none() && d > delivered(&before, k) {
                    first[i] = Some((now, d));
                }
                if done[i].is_none() && d >= total {
                    done[i] = Some(now);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    for (i, k) in KINDS.iter().enumerate() {
        let (t0, d0) = first[i].context("no first delivery seen")?;
        let t1 = done[i].context("not done")?;
        let secs = (t1 - t0).as_secs_f64();
        let rate = if secs > 0.0 {
            (total - d0) as f64 / secs
        } else {
            f64::NAN
        };
        println!(
            "    {k}: {} records in {secs:.2} s after its first delivery: {rate:.0} records/s",
            total - d0
        );
        results.push(Measurement::new(
            &format!("export throughput, {k}"),
            SYSTEM,
            rate,
            "records/s",
        ));
    }
    // What arrived (a bench, not a test: printed, not asserted).
    println!(
        "    arrived: postgres {}, nats {}, webhook {} distinct of {total}",
        servers
            .pg
            .query("SELECT count(*) FROM tput_climate")
            .unwrap_or_default(),
        servers.nats.messages("TPUT"),
        servers.hook.counts().0
    );
    Ok(ingest)
}

/// Lag per destination under sustained ingest at `rate` records/s (the firmware client).
fn lag(
    profile: &Profile,
    results: &mut Results,
    bin: &Path,
    servers: &Servers,
    rate: f64,
) -> Result<()> {
    let c = start_cluster(bin, servers.config(false, "lag"));
    let leader = c.leader();
    wait_running(&c, leader);
    let node = &c.nodes[leader];
    let devices = 100u64;
    let secs = if profile.quick { 10.0 } else { 30.0 };
    let warm_up = Duration::from_secs(2);
    let mut cmd = sim_command(bin, &[&node.device], &node.url(""));
    cmd.args(["--devices", &devices.to_string()])
        .args(["--rate", &format!("{:.2}", rate / devices as f64)])
        .args(["--duration", &secs.to_string()])
        .args(["--drain", "5", "--json", "--quiet", "--stream", "9"]);
    let sim = std::thread::spawn(move || crate::util::output(&mut cmd));
    let started = Instant::now();
    let mut samples: Vec<Json> = Vec::new();
    while !sim.is_finished() && started.elapsed() < Duration::from_secs_f64(secs) {
        std::thread::sleep(Duration::from_millis(500));
        if started.elapsed() >= warm_up
            && let Some(s) = export_status(&c, leader)
        {
            samples.push(s);
        }
    }
    let out = sim
        .join()
        .map_err(|_| anyhow::anyhow!("cairn sim thread panicked"))??;
    let summary = sim_summary(out.as_bytes()).context("cairn sim printed no JSON summary")?;
    let achieved = summary["records_per_s"].as_f64().unwrap_or(0.0);
    println!(
        "    sustained ingest: asked {rate:.0}/s, {achieved:.0}/s acknowledged ({} samples)",
        samples.len()
    );
    results.push(Measurement::new(
        "device ingest during the lag run (cairn sim, half the fill's rate)",
        SYSTEM,
        achieved,
        "records/s",
    ));
    ensure!(!samples.is_empty(), "no /status sample during the lag run");
    for k in KINDS {
        let values = |field: &str| -> Vec<f64> {
            samples
                .iter()
                .map(|s| s[k][field].as_f64().unwrap_or(0.0))
                .collect()
        };
        for (field, unit) in [("lag_records", "records"), ("lag_seconds", "s")] {
            let v = values(field);
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let max = v.iter().copied().fold(0.0, f64::max);
            println!("    {k}: {field} mean {mean:.1}, max {max:.1}");
            for (what, value) in [("mean", mean), ("max", max)] {
                results.push(Measurement::new(
                    &format!("export lag at half the ingest rate, {k}, {what}"),
                    SYSTEM,
                    value,
                    unit,
                ));
            }
        }
    }
    Ok(())
}
