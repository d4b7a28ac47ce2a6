//! Data leaves the site exactly once (issue 28): three nodes export the device records of
//! stream `climate` to a real PostgreSQL, a real NATS JetStream stream, a real mosquitto and
//! an rqlite-CDC webhook, while devices stream, the leader is killed with `kill -9`, and
//! PostgreSQL, NATS and the webhook are away for 30 s (the stopped leader stays down until
//! export has caught up on the new one). Afterwards:
//!
//! - PostgreSQL holds count = distinct keys = the records stored (≥ acknowledged);
//! - the JetStream stream holds one message per record (`Nats-Msg-Id` de-duplication);
//! - the webhook and the MQTT subscriber saw every record at least once (repeats counted);
//! - after `cairn device reset` (the device's seqs restart) the new records arrive under a
//!   new epoch, beside the old ones, still exactly once;
//! - `/status` and `/metrics` show each destination's delivered count, lag and retries.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use cairn_tests::servers::{Mosquitto, NatsServer, Postgres, WebhookReceiver};
use cairn_tests::{Cluster, Options, cairn_bin, device, fleet, get, poll, stmts};

const SITE: &str = "alpha";
/// How long export may take to catch up once everything is back.
const CATCH_UP: Duration = Duration::from_secs(120);

fn config(pg: &str, nats: &str, mqtt: &str, webhook: &str) -> String {
    format!(
        r#"
site = "{SITE}"

{streams}

[[export]]
name = "warehouse"
kind = "postgres"
url = "{pg}"
batch_records = 1000

[[export]]
name = "bus"
kind = "nats"
url = "{nats}"
stream = "CAIRN"

[[export]]
name = "broker"
kind = "mqtt"
url = "{mqtt}"

[[export]]
name = "hook"
kind = "webhook"
url = "{webhook}"
priority = -1
"#,
        streams = fleet::stream_toml()
    )
}

fn device_addrs(c: &Cluster, first: usize) -> Vec<SocketAddr> {
    let mut order: Vec<usize> = vec![first];
    order.extend((0..c.nodes.len()).filter(|&i| i != first));
    order
        .into_iter()
        .map(|i| c.nodes[i].device.parse().expect("device address"))
        .collect()
}

/// Stored records of `climate` on the leader (read linearizably).
fn stored(c: &Cluster, filter: &str) -> u64 {
    let rows = c.nodes[c.leader()].rows(
        &format!("SELECT count(*) FROM climate {filter}"),
        "linearizable",
    );
    rows[0][0].as_u64().expect("count")
}

fn pg_counts(pg: &Postgres, filter: &str) -> Option<(u64, u64)> {
    let out = pg
        .query(&format!(
            "SELECT count(*), count(DISTINCT (site, device_id, epoch, seq)) FROM climate {filter}"
        ))
        .ok()?;
    let (a, b) = out.split_once('|')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Waits until every destination holds `expected` records (progress printed every 5 s).
fn wait_delivered(
    c: &Cluster,
    expected: u64,
    pg: &Postgres,
    nats: &NatsServer,
    hook: &WebhookReceiver,
    sub: &cairn_tests::servers::MqttSubscriber,
) {
    let mut last = std::time::Instant::now();
    poll(CATCH_UP, "every destination to hold every record", || {
        let p = pg_counts(pg, "")?;
        let n = nats.messages("CAIRN");
        let (h, _) = hook.counts();
        let (m, _) = sub.counts();
        if last.elapsed() > Duration::from_secs(5) {
            last = std::time::Instant::now();
            let status = c.find_leader(&[]).and_then(|l| c.nodes[l].status());
            println!(
                "  expected {expected}: postgres {p:?}, nats {n}, webhook {h}, mqtt {m}; {}",
                status.map(|s| s["export"].to_string()).unwrap_or_default()
            );
        }
        (p.1 >= expected && n >= expected && h >= expected && m >= expected).then_some(())
    });
}

#[test]
fn test_export_exactly_once_through_failover_outage_and_reset() {
    let mut pg = Postgres::start().expect("postgres (cargo xtask setup installs it)");
    let mut nats = NatsServer::start().expect("nats-server");
    let mqtt = Mosquitto::start().expect("mosquitto");
    let sub = mqtt.subscribe("cairn/#").expect("mosquitto_sub");
    let hook = WebhookReceiver::start().expect("webhook receiver");
    let mut c = Cluster::start_with(
        3,
        Options {
            config: Some(config(&pg.url(), &nats.url(), &mqtt.url(), &hook.url)),
            ..Options::default()
        },
    );
    let leader = c.leader();
    // Records are journaled for export once a destination is registered (the leader does it
    // when it takes office).
    poll(Duration::from_secs(30), "destinations registered", || {
        let s = c.nodes[c.leader()].status()?;
        (s["export"]["warehouse"]["running"] == true && s["export"]["hook"]["running"] == true)
            .then_some(())
    });
    device::register(&c.nodes[leader].url(""), 1..4).expect("registering devices");

    // Phase 1: three devices stream for 12 s; the leader dies at 3 s, the destinations are
    // away from 5 s to 35 s.
    let plan = fleet::Plan {
        gateways: device_addrs(&c, leader),
        ids: 1..4,
        mode: fleet::Mode::Saturate,
        duration: Duration::from_secs(12),
        probe: None,
    };
    let report = std::thread::scope(|s| {
        let devices = s.spawn(|| fleet::run(&plan));
        std::thread::sleep(Duration::from_secs(3));
        c.kill9(leader);
        std::thread::sleep(Duration::from_secs(2));
        pg.stop();
        nats.stop();
        hook.set_down(true);
        let report = devices.join().expect("fleet thread").expect("fleet");
        std::thread::sleep(Duration::from_secs(23));
        pg.restart().expect("postgres back");
        nats.restart().expect("nats back");
        hook.set_down(false);
        report
    });
    let back = std::time::Instant::now();
    let n1 = stored(&c, "");
    println!(
        "phase 1: {} acknowledged, {n1} stored, {} reconnects",
        report.acked, report.reconnects
    );
    assert!(n1 >= report.acked && report.acked > 0);
    wait_delivered(&c, n1, &pg, &nats, &hook, &sub);
    println!(
        "caught up {n1} records on 4 destinations in {:.1?} after the outage",
        back.elapsed()
    );
    c.restart(leader);
    assert_eq!(pg_counts(&pg, ""), Some((n1, n1)), "postgres: exactly once");
    assert_eq!(nats.messages("CAIRN"), n1, "nats: one message per record");
    let (distinct, events) = hook.counts();
    println!(
        "webhook: {distinct} records, {events} events, {} posts",
        hook.posts()
    );
    assert_eq!(distinct, n1);
    assert!(hook.malformed().is_empty(), "{:?}", hook.malformed());

    let s = c.nodes[c.leader()].status().expect("status");
    println!("export status: {}", s["export"]);
    assert!(
        s["export"]["warehouse"]["retries"].as_u64() > Some(0),
        "the outage was retried"
    );
    assert_eq!(s["export"]["warehouse"]["lag_records"], 0);
    let m = get(&c.nodes[c.leader()].url("/metrics"));
    let text = m.body.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains("cairn_export_delivered_total{") && text.contains("destination=\"bus\""),
        "{text}"
    );

    // Phase 2: device 3's records are deleted and its high-water reset: its seqs restart,
    // under a new epoch.
    let gone = stored(&c, "WHERE device_id = 3");
    let r = c.execute(&stmts(&["DELETE FROM climate WHERE device_id = 3"]));
    assert!(r["results"][0]["error"].is_null(), "{r}");
    let out = Command::new(cairn_bin())
        .args(["device", "reset", "--id", "3", "--seq", "0", "--host"])
        .arg(c.nodes[c.leader()].url(""))
        .output()
        .expect("cairn device reset");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = fleet::Plan {
        gateways: device_addrs(&c, c.leader()),
        ids: 1..4,
        mode: fleet::Mode::Saturate,
        duration: Duration::from_secs(4),
        probe: None,
    };
    let report = fleet::run(&plan).expect("fleet after reset");
    let n2 = stored(&c, "");
    let expected = n2 + gone;
    println!(
        "phase 2: {} acknowledged, {n2} stored, {gone} deleted",
        report.acked
    );
    wait_delivered(&c, expected, &pg, &nats, &hook, &sub);
    assert_eq!(pg_counts(&pg, ""), Some((expected, expected)));
    assert_eq!(
        pg_counts(&pg, "WHERE device_id = 3 AND epoch = 1"),
        Some((
            stored(&c, "WHERE device_id = 3"),
            stored(&c, "WHERE device_id = 3")
        )),
        "device 3's new records under epoch 1"
    );
    assert_eq!(
        pg.query(&format!(
            "SELECT count(*) FROM climate WHERE site <> '{SITE}'"
        ))
        .unwrap(),
        "0"
    );
    assert_eq!(nats.messages("CAIRN"), expected);
    let (m_distinct, m_messages) = sub.counts();
    println!("mqtt: {m_distinct} records, {m_messages} messages");
    assert_eq!(m_distinct, expected);
    assert_eq!(hook.counts().0, expected);
}
