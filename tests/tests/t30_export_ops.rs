//! Export operations (issue 28): HTTPS webhooks and forgetting a destination.
//!
//! - A webhook on `https://` (a real TLS server in the test process, certificate from a test
//!   CA): with a `ca_file` of another CA every delivery fails, `/status` names the cause in
//!   the destination's `last_error` and counts the retries, nothing is delivered and nothing
//!   is lost; once the file holds the right CA the destination delivers every record. The
//!   same over rqlite's `--cdc-config` JSON file with its `tls.ca_cert_file`.
//! - A destination removed from the config keeps its cursor: `/status` lists it as not
//!   configured and, with `retention` and `keep_unexported`, the rows it never received stay.
//!   `cairn export forget` is refused while it is configured; once it is removed from the
//!   config and forgotten, retention deletes the rows and `/status` no longer lists it.

use std::process::Command;
use std::time::Duration;

use cairn_tests::servers::{TestCa, WebhookReceiver};
use cairn_tests::{Cluster, Options, cairn_bin, device, fleet, poll};

#[test]
fn test_https_webhook_wrong_ca_then_fixed() {
    let right = TestCa::new("cairn test webhook CA").expect("CA");
    let wrong = TestCa::new("some other CA").expect("CA");
    let hook = WebhookReceiver::start_https(&right).expect("https receiver");
    let cdc_hook = WebhookReceiver::start_https(&right).expect("https receiver");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("webhook-ca.pem");
    std::fs::write(&ca_file, &wrong.ca_pem).expect("CA file");
    let right_file = dir.path().join("right-ca.pem");
    std::fs::write(&right_file, &right.ca_pem).expect("CA file");
    // rqlite's CDC config file, TLS in its documented `tls` object.
    let cdc = dir.path().join("cdc.json");
    std::fs::write(
        &cdc,
        serde_json::json!({
            "endpoint": cdc_hook.url,
            "max_batch_size": 200,
            "tls": {"ca_cert_file": right_file, "insecure_skip_verify": false},
        })
        .to_string(),
    )
    .expect("cdc config");
    let config = format!(
        "{}\n[[export]]\nname = \"secure\"\nkind = \"webhook\"\nurl = \"{}\"\nca_file = \"{}\"\n",
        fleet::stream_toml(),
        hook.url,
        ca_file.display()
    );
    let c = Cluster::start_with(
        1,
        Options {
            config: Some(config),
            extra: vec!["--cdc-config".into(), cdc.display().to_string()],
            ..Options::default()
        },
    );
    poll(Duration::from_secs(30), "destinations registered", || {
        let s = c.nodes[0].status()?;
        (s["export"]["secure"]["running"] == true && s["export"]["cdc"]["running"] == true)
            .then_some(())
    });
    device::register(&c.nodes[0].url(""), 1..3).expect("registering");
    let r = fleet::saturate_leader(&c, 1..3, 2);
    let n = c.count("SELECT count(*) FROM climate");
    assert!(n >= r.acked && r.acked > 0);

    // The CDC destination trusts the right CA: everything arrives over HTTPS.
    poll(
        Duration::from_secs(60),
        "the cdc webhook to get every record",
        || (cdc_hook.counts().0 == n).then_some(()),
    );
    assert!(
        cdc_hook.malformed().is_empty(),
        "{:?}",
        cdc_hook.malformed()
    );

    // The other one does not: handshakes fail, the error says why, nothing is delivered.
    let status = poll(
        Duration::from_secs(30),
        "the TLS failure in /status",
        || {
            let s = c.nodes[0].status()?;
            let d = &s["export"]["secure"];
            (d["last_error"].as_str()?.contains("certificate") && d["retries"].as_u64()? >= 2)
                .then(|| d.clone())
        },
    );
    println!("wrong CA: {status}");
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("UnknownIssuer") || error.contains("unknown issuer"),
        "a clear error: {error}"
    );
    assert!(hook.tls_failures() > 0, "the server saw refused handshakes");
    assert_eq!(hook.counts(), (0, 0), "nothing delivered with the wrong CA");
    assert!(status["lag_records"].as_u64() > Some(0), "{status}");
    assert_eq!(c.count("SELECT count(*) FROM climate"), n, "nothing lost");

    // The operator fixes the file: the next retry reads it again and delivers everything.
    std::fs::write(&ca_file, &right.ca_pem).expect("CA file");
    poll(Duration::from_secs(60), "every record over HTTPS", || {
        (hook.counts().0 == n).then_some(())
    });
    assert!(hook.malformed().is_empty(), "{:?}", hook.malformed());
    let s = poll(Duration::from_secs(30), "the error cleared", || {
        let s = c.nodes[0].status()?;
        s["export"]["secure"]["last_error"].is_null().then_some(s)
    });
    println!("after the fix: {}", s["export"]);
}

/// `cairn export forget NAME` against node 0: (success, stdout + stderr).
fn forget(c: &Cluster, name: &str) -> (bool, String) {
    let out = Command::new(cairn_bin())
        .args(["export", "forget", name, "--host"])
        .arg(c.nodes[0].url(""))
        .output()
        .expect("cairn export forget");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn test_forget_removed_destination_releases_retention() {
    let hook = WebhookReceiver::start().expect("webhook receiver");
    hook.set_down(true);
    let base = format!(
        "retention = \"2s\"\nkeep_unexported = true\n{}",
        fleet::stream_toml()
    );
    let with_export = format!(
        "{base}\n[[export]]\nname = \"gone\"\nkind = \"webhook\"\nurl = \"{}\"\n",
        hook.url
    );
    let mut c = Cluster::start_with(
        1,
        Options {
            config: Some(with_export),
            ..Options::default()
        },
    );
    poll(
        Duration::from_secs(30),
        "the destination registered",
        || (c.nodes[0].status()?["export"]["gone"]["running"] == true).then_some(()),
    );
    device::register(&c.nodes[0].url(""), 1..3).expect("registering");
    let r = fleet::saturate_leader(&c, 1..3, 2);
    let n = c.count("SELECT count(*) FROM climate");
    assert!(n >= r.acked && r.acked > 0);

    let (ok, text) = forget(&c, "gone");
    assert!(!ok, "refused while configured: {text}");
    assert!(text.contains("still configured"), "{text}");

    // Removed from the config: the cursor stays, and so do the rows it never received.
    assert!(c.terminate(0), "clean exit");
    std::fs::write(c.dir().join("cairn.toml"), &base).expect("cairn.toml");
    c.restart(0);
    let listed = poll(
        Duration::from_secs(30),
        "the cursor listed as unconfigured",
        || {
            let s = c.nodes[0].status()?;
            let d = s["export"]["gone"].clone();
            (d["configured"] == false && d["lag_records"].as_u64()? > 0).then_some(d)
        },
    );
    println!("not configured: {listed}");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        c.count("SELECT count(*) FROM climate"),
        n,
        "rows held back for the registered destination"
    );

    let (ok, text) = forget(&c, "gone");
    assert!(ok, "forget: {text}");
    poll(
        Duration::from_secs(60),
        "retention to delete the rows",
        || (c.count("SELECT count(*) FROM climate") == 0).then_some(()),
    );
    poll(
        Duration::from_secs(30),
        "/status to drop the destination",
        || {
            c.nodes[0].status()?["export"]
                .get("gone")
                .is_none()
                .then_some(())
        },
    );
    let (ok, text) = forget(&c, "gone");
    assert!(!ok && text.contains("no export destination"), "{text}");
    assert_eq!(hook.counts(), (0, 0), "the destination never got anything");
}
