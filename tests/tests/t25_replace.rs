//! A gateway that lost its disk cannot vote, and is put back with `--replace` (issue 31 item
//! 4), on three real nodes while 20 devices stream (`cairn sim`, the real firmware client):
//!
//! - a follower is killed, its data dir wiped and it is started again under its old id with
//!   its old `--join`: its join is refused, it answers no Raft RPC of the leader (`409`, which
//!   expects the incarnation its lost log had), stays blank (it never votes) and its log names
//!   `--replace`;
//! - `--replace` refused while it would leave the cluster without a working quorum (another
//!   follower down), and `/cluster/leave` refused for a node other than the caller;
//! - `cairn node --join URL --replace ID` (the same id, a new incarnation): the old node is
//!   removed, the new one joins as a learner, catches up and becomes a voter: three healthy
//!   voters, every acknowledged record stored exactly once on every replica, replicas
//!   identical.

use cairn_tests::device::{READINGS_CONFIG, fleet_command, read_report, sim_summary};
use cairn_tests::{Cluster, Options, SLOW_ELECTIONS, TIMEOUT, poll, post};
use serde_json::Value as Json;

fn voters(c: &Cluster, i: usize) -> Option<Vec<u64>> {
    serde_json::from_value(c.nodes[i].status()?["raft"]["voters"].clone()).ok()
}

/// POSTs an empty body to node `i`'s Raft port at `path` with incarnation headers: the status
/// and the body's text.
fn raft_post(c: &Cluster, i: usize, path: &str, headers: &[(&str, String)]) -> (u16, String) {
    let mut req = cairn_tests::http::agent().post(format!("http://{}{path}", c.nodes[i].raft));
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    match req.send(&[][..]) {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

#[test]
fn test_wiped_follower_cannot_vote_and_is_replaced_while_devices_stream() {
    let mut c = Cluster::start_with(
        3,
        Options {
            // Slow elections: the test keeps the leader and the other follower it found
            // at the start (killing that follower must leave the leader without quorum).
            config: Some(format!("{SLOW_ELECTIONS}{READINGS_CONFIG}")),
            ..Options::default()
        },
    );
    let leader = c.leader();
    let lid = c.nodes[leader].id;
    let followers = c.followers();
    let (f, other) = (followers[0], followers[1]);
    let fid = c.nodes[f].id;
    // Every member recorded its incarnation (the bootstrap node too).
    poll(TIMEOUT, "every incarnation recorded", || {
        let s = c.nodes[leader].status()?;
        let m = s["raft"]["incarnation"]["members"].as_object()?.clone();
        (m.len() == 3).then_some(m)
    });
    let old_inc = c.nodes[leader].status().unwrap()["raft"]["incarnation"]["members"]
        [fid.to_string()]
    .as_u64()
    .unwrap();

    // Devices stream through every gateway for the whole procedure.
    let report = c.dir().join("devices.jsonl");
    let sim = fleet_command(&c, leader, &report)
        .args(["--devices", "20", "--rate", "20", "--duration", "30"])
        .args(["--drain", "90", "--first-id", "500"])
        .spawn()
        .expect("spawning cairn sim");
    poll(TIMEOUT, "device records to be applied", || {
        (c.nodes[leader].records_applied() >= 500).then_some(())
    });

    // The follower's disk is lost; it comes back blank under its old id and old flags.
    c.kill9(f);
    c.wipe(f);
    let log_before = c.nodes[f].log().len();
    c.relaunch(f);
    let new_log = |c: &Cluster| c.nodes[f].log()[log_before..].to_string();
    poll(
        TIMEOUT,
        "the blank node to refuse the leader's RPCs",
        || {
            let log = new_log(&c);
            (log.contains("refusing Raft RPCs") && log.contains(&format!("--replace {fid}")))
                .then_some(())
        },
    );
    let log = new_log(&c);
    assert!(
        log.contains(&format!("expects incarnation {old_inc} of node {fid}")),
        "{log}"
    );
    poll(TIMEOUT, "its join to be refused, naming --replace", || {
        new_log(&c)
            .contains("member under another incarnation")
            .then_some(())
    });
    // It answers no Raft RPC meant for its old life, and it never voted. (A request naming
    // no incarnation for it, `ID:none`, is served: founders of a --bootstrap-expect cluster
    // start that way; the leader here has its old incarnation recorded and names it.)
    let (status, body) = raft_post(
        &c,
        f,
        "/raft/vote",
        &[
            ("cairn-incarnation-from", format!("{lid}:1")),
            ("cairn-incarnation-to", format!("{fid}:{old_inc}")),
        ],
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains(&format!("--replace {fid}")), "{body}");
    let s = c.nodes[f].status().expect("status of the blank node");
    assert_eq!(s["raft"]["incarnation"]["blank"], true, "{s}");
    assert_ne!(s["raft"]["incarnation"]["own"].as_u64(), Some(old_inc));
    assert_eq!(s["raft"]["voters"], Json::Array(vec![]), "{s}");
    // The others still count it as a voter and keep committing: records keep flowing.
    let before = c.nodes[leader].records_applied();
    poll(TIMEOUT, "records applied without it", || {
        (c.nodes[leader].records_applied() > before + 200).then_some(())
    });

    // A member may remove only itself through /cluster/leave: postcard (id, incarnation).
    let (status, _) = {
        let url = format!("http://{}/cluster/leave", c.nodes[leader].raft);
        match cairn_tests::http::agent()
            .post(url)
            .header("content-type", "application/octet-stream")
            .send(&[fid as u8, 0x7b][..])
        {
            Ok(r) => (r.status().as_u16(), ()),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(status, 200);
    assert_eq!(
        voters(&c, leader).unwrap().len(),
        3,
        "removed by a stranger"
    );

    // --replace that would leave no working quorum: the other follower down too.
    c.kill9(other);
    // Long enough for the leader to see it gone (it counts voters that answered within 2 s).
    std::thread::sleep(std::time::Duration::from_secs(4));
    let refused = post(
        &c.nodes[leader].url("/join"),
        &serde_json::json!({"id": fid, "addr": c.nodes[f].raft, "http_addr": c.nodes[f].http,
                            "incarnation": 5, "replace": fid}),
    );
    assert_eq!(refused.status, 400, "{:?}", refused.body);
    assert!(
        refused.body.to_string().contains("quorum"),
        "{:?}",
        refused.body
    );
    assert_eq!(voters(&c, leader).unwrap().len(), 3);
    c.restart(other);

    // The replacement: same id, new incarnation, started with --replace.
    c.kill9(f);
    c.wipe(f);
    let via = c.nodes[leader].url("");
    let fid_s = fid.to_string();
    c.set_flags(f, &["--join", &via, "--replace", &fid_s]);
    c.relaunch(f);
    c.wait_ready(f);
    let ids: Vec<u64> = c.nodes.iter().map(|n| n.id).collect();
    poll(TIMEOUT, "three voters again", || {
        let l = c.find_leader(&[])?;
        (voters(&c, l)? == ids).then_some(())
    });
    let s = c.nodes[f].status().unwrap();
    let new_inc = s["raft"]["incarnation"]["own"].as_u64().unwrap();
    assert_eq!(s["raft"]["incarnation"]["blank"], false, "{s}");
    assert_ne!(new_inc, old_inc);
    poll(TIMEOUT, "the new incarnation recorded everywhere", || {
        (0..3)
            .all(|i| {
                c.nodes[i].status().is_some_and(|s| {
                    s["raft"]["incarnation"]["members"][fid.to_string()].as_u64() == Some(new_inc)
                })
            })
            .then_some(())
    });
    println!("node {fid} replaced: incarnation {old_inc} -> {new_inc}");

    let out = sim.wait_with_output().expect("cairn sim");
    assert!(out.status.success(), "cairn sim failed");
    let summary = sim_summary(&out.stdout).expect("JSON summary");
    println!("cairn sim: {summary}");
    let devices = read_report(&report);
    assert_eq!(devices.len(), 20);
    let sum = c.assert_identical();
    println!("replicas identical (checksum {sum:x})");
    for i in 0..3 {
        let rows = c.nodes[i].rows(
            "SELECT device_id, count(*), count(DISTINCT k), min(k), max(k) FROM readings \
             GROUP BY device_id",
            "none",
        );
        for d in &devices {
            let id = d["device_id"].as_u64().unwrap();
            let acked = d["acked_through"].as_u64().unwrap();
            assert_eq!(d["dropped"], 0, "{d}");
            let r = rows
                .iter()
                .find(|r| r[0].as_u64() == Some(id))
                .unwrap_or_else(|| panic!("device {id} has no rows on node {i}"));
            let v: Vec<u64> = r.iter().map(|x| x.as_u64().unwrap()).collect();
            assert_eq!(v[1], v[2], "device {id}: a record stored twice on node {i}");
            assert_eq!((v[3], v[4]), (1, v[1]), "device {id}: holes on node {i}");
            assert!(
                v[1] >= acked,
                "device {id}: acked {acked}, node {i} holds {}",
                v[1]
            );
        }
    }
}
