//! Retention and the disk guard (issue 28, items 5 and 6):
//!
//! - `retention = "2s"` with `keep_unexported = true`: stream rows older than that stay while
//!   the export destination (rqlite's `--cdc-config URL`) is away, and go once it has them
//!   all; user tables are untouched;
//! - a node whose data dir (a 96 MiB tmpfs; needs root) has less free space than
//!   `disk_guard_free_mib` answers device batches with Overloaded and SQL writes with 503,
//!   loses nothing, and takes data again by itself once space returns.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_tests::servers::WebhookReceiver;
use cairn_tests::tmpfs::Tmpfs;
use cairn_tests::{Cluster, Options, Place, device, fleet, poll, post, stmts};

#[test]
fn test_retention_keeps_unexported_rows_then_deletes_them() {
    let hook = WebhookReceiver::start().expect("webhook receiver");
    hook.set_down(true);
    // The destination comes from rqlite's flag: a webhook named `cdc`.
    let config = format!(
        "retention = \"2s\"\nkeep_unexported = true\n{}",
        fleet::stream_toml()
    );
    let c = Cluster::start_with(
        1,
        Options {
            config: Some(config),
            extra: vec!["--cdc-config".into(), hook.url.clone()],
            ..Options::default()
        },
    );
    poll(
        Duration::from_secs(30),
        "the destination registered",
        || (c.nodes[0].status()?["export"]["cdc"]["running"] == true).then_some(()),
    );
    c.execute(&stmts(&[
        "CREATE TABLE notes (t TEXT)",
        "INSERT INTO notes VALUES ('kept')",
    ]));
    device::register(&c.nodes[0].url(""), 1..3).expect("registering");
    let r = fleet::saturate_leader(&c, 1..3, 2);
    let n = c.count("SELECT count(*) FROM climate");
    assert!(n >= r.acked && r.acked > 0);
    // Several retention rounds (every second for a 2 s retention) pass over rows older than
    // 2 s: none is deleted while the destination has not received it.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        c.count("SELECT count(*) FROM climate"),
        n,
        "unexported rows kept"
    );
    hook.set_down(false);
    poll(
        Duration::from_secs(60),
        "rows delivered, then deleted",
        || (hook.counts().0 == n && c.count("SELECT count(*) FROM climate") == 0).then_some(()),
    );
    assert_eq!(
        c.count("SELECT count(*) FROM notes"),
        1,
        "user tables untouched"
    );
}

#[test]
fn test_disk_guard_refuses_ingest_and_recovers_by_itself() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let disk: Arc<Mutex<Option<Tmpfs>>> = Arc::default();
    let d = disk.clone();
    let place: Place = Arc::new(move |_id, dir, _cmd| {
        let mut d = d.lock().expect("disk lock");
        if d.is_none() {
            *d = Some(Tmpfs::mount(dir, 96).expect("mounting a tmpfs"));
        }
        "127.0.0.1".into()
    });
    let config = format!("disk_guard_free_mib = 40\n{}", fleet::stream_toml());
    let c = Cluster::start_placed(
        1,
        Options {
            config: Some(config),
            ..Options::default()
        },
        Some(place),
    );
    device::register(&c.nodes[0].url(""), 1..3).expect("registering");
    let before = fleet::saturate_leader(&c, 1..3, 2);
    assert!(before.acked > 0);

    // Ballast leaves about 24 MiB free: under the 40 MiB mark, far from full.
    let ballast = c.nodes[0].dir.join("ballast");
    let free = disk
        .lock()
        .expect("disk lock")
        .as_ref()
        .expect("mounted")
        .available()
        .expect("statvfs");
    std::fs::write(
        &ballast,
        vec![0x5a; (free.saturating_sub(24 << 20)) as usize],
    )
    .expect("writing ballast");
    poll(Duration::from_secs(10), "the disk guard to hold", || {
        (!c.nodes[0].status()?["disk_guard"].is_null()).then_some(())
    });
    let r = post(
        &c.nodes[0].url("/db/execute"),
        &stmts(&["CREATE TABLE t (a)"]),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.to_string().contains("disk guard"), "{}", r.body);
    let refused = fleet::saturate_leader(&c, 1..3, 3);
    println!(
        "while held: {} acked, {} reconnects, first because {:?}",
        refused.acked, refused.reconnects, refused.first_reconnect_reason
    );
    assert_eq!(refused.acked, 0);
    assert!(
        refused
            .first_reconnect_reason
            .as_deref()
            .is_some_and(|r| r.contains("Overloaded")),
        "{:?}",
        refused.first_reconnect_reason
    );
    assert!(
        c.nodes[0].is_ready() || c.nodes[0].status().is_some(),
        "the node stays up"
    );

    // Space returns: ingest resumes by itself.
    std::fs::remove_file(&ballast).expect("removing ballast");
    poll(Duration::from_secs(10), "the disk guard to lift", || {
        c.nodes[0].status()?["disk_guard"].is_null().then_some(())
    });
    let after = fleet::saturate_leader(&c, 1..3, 2);
    assert!(after.acked > 0);
    let r = post(
        &c.nodes[0].url("/db/execute"),
        &stmts(&["CREATE TABLE t (a)"]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Nothing lost: every device's seqs are stored without a gap.
    let stored = c.count("SELECT count(*) FROM climate");
    let seqs = c.count("SELECT sum(m) FROM (SELECT max(seq) AS m FROM climate GROUP BY device_id)");
    assert_eq!(stored, seqs);
    assert!(stored >= before.acked + after.acked);
}
