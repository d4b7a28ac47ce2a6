//! Two sites, one engine (issue 28, item 7): two independent 3-node clusters with different
//! site ids and the same device ids export into one PostgreSQL database and one JetStream
//! stream. Every stored record of both sites arrives exactly once: the keys
//! (site, device_id, epoch, seq) never collide, and a leader killed mid-export on one site
//! only makes its records arrive again under the same keys.

use std::net::SocketAddr;
use std::time::Duration;

use cairn_tests::servers::{NatsServer, Postgres};
use cairn_tests::{Cluster, Options, device, fleet, poll};

fn config(site: &str, pg: &str, nats: &str) -> String {
    format!(
        r#"
site = "{site}"

{streams}

[[export]]
name = "warehouse"
kind = "postgres"
url = "{pg}"

[[export]]
name = "bus"
kind = "nats"
url = "{nats}"
stream = "SITES"
"#,
        streams = fleet::stream_toml()
    )
}

fn start_site(site: &str, pg: &Postgres, nats: &NatsServer) -> Cluster {
    let c = Cluster::start_with(
        3,
        Options {
            config: Some(config(site, &pg.url(), &nats.url())),
            ..Options::default()
        },
    );
    poll(Duration::from_secs(30), "destinations registered", || {
        let s = c.nodes[c.leader()].status()?;
        (s["export"]["warehouse"]["running"] == true && s["export"]["bus"]["running"] == true)
            .then_some(())
    });
    device::register(&c.nodes[c.leader()].url(""), 1..4).expect("registering devices");
    c
}

fn gateways(c: &Cluster) -> Vec<SocketAddr> {
    let l = c.leader();
    let mut order = vec![l];
    order.extend((0..c.nodes.len()).filter(|&i| i != l));
    order
        .iter()
        .map(|&i| c.nodes[i].device.parse().expect("device address"))
        .collect()
}

fn stored(c: &Cluster) -> u64 {
    c.nodes[c.leader()].rows("SELECT count(*) FROM climate", "linearizable")[0][0]
        .as_u64()
        .expect("count")
}

#[test]
fn test_two_sites_export_into_one_postgres_and_one_stream_exactly_once() {
    let pg = Postgres::start().expect("postgres (cargo xtask setup installs it)");
    let nats = NatsServer::start().expect("nats-server");
    let mut north = start_site("north", &pg, &nats);
    let south = start_site("south", &pg, &nats);
    let plan = |c: &Cluster| fleet::Plan {
        gateways: gateways(c),
        ids: 1..4,
        mode: fleet::Mode::Saturate,
        duration: Duration::from_secs(8),
        probe: None,
    };
    let (plan_n, plan_s) = (plan(&north), plan(&south));
    let north_leader = north.leader();
    let (rn, rs) = std::thread::scope(|s| {
        let a = s.spawn(|| fleet::run(&plan_n));
        let b = s.spawn(|| fleet::run(&plan_s));
        std::thread::sleep(Duration::from_secs(4));
        north.kill9(north_leader);
        (
            a.join().expect("north fleet").expect("north"),
            b.join().expect("south fleet").expect("south"),
        )
    });
    let (n, s) = (stored(&north), stored(&south));
    println!(
        "north: {} acked, {n} stored, {} reconnects ({:?}); south: {} acked, {s} stored, {} \
         reconnects ({:?})",
        rn.acked,
        rn.reconnects,
        rn.first_reconnect_reason,
        rs.acked,
        rs.reconnects,
        rs.first_reconnect_reason
    );
    assert!(n >= rn.acked && s >= rs.acked && rn.acked > 0 && rs.acked > 0);
    let count = |site: &str| -> Option<(u64, u64)> {
        let q = format!(
            "SELECT count(*), count(DISTINCT (device_id, epoch, seq)) FROM climate WHERE site = '{site}'"
        );
        let out = pg.query(&q).ok()?;
        let (a, b) = out.split_once('|')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    poll(Duration::from_secs(120), "both sites exported", || {
        (count("north")? == (n, n) && count("south")? == (s, s) && nats.messages("SITES") >= n + s)
            .then_some(())
    });
    assert_eq!(
        nats.messages("SITES"),
        n + s,
        "one message per record of both sites"
    );
    assert_eq!(
        pg.query("SELECT count(*) FROM climate").unwrap(),
        (n + s).to_string()
    );
    north.restart(north_leader);
}
