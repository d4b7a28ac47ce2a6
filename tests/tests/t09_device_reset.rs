//! A device's high-water seq moves only through its own batches or `cairn device reset`
//! (issue 26, item 7): SQL cannot write it, the reset is a Raft entry applied on every
//! replica, and it is refused while stored records of the device lie above the new value.

use std::process::Command;

use cairn_tests::device::register;
use cairn_tests::{Cluster, cairn_bin, stmts};
use serde_json::json;

const DEVICE: u64 = 7;

/// `cairn device ARGS --host URL`: (success, stdout + stderr).
fn cairn_device(host: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cairn_bin())
        .arg("device")
        .args(args)
        .args(["--host", host])
        .output()
        .expect("running cairn device");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The high-water of [`DEVICE`] in every node's database file (read directly: SQL may not).
fn high_waters(c: &Cluster) -> Vec<i64> {
    c.nodes
        .iter()
        .map(|n| {
            let db = rusqlite::Connection::open_with_flags(
                n.dir.join("sm").join("db.sqlite"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("opening a replica");
            db.query_row(
                "SELECT seq FROM _cairn_high_water WHERE device_id = ?1",
                [DEVICE as i64],
                |r| r.get(0),
            )
            .unwrap_or(0)
        })
        .collect()
}

#[test]
fn test_reset_is_the_only_admin_way_to_move_a_high_water() {
    let c = Cluster::start(3);
    let leader = c.leader();
    let follower = c.followers()[0];
    register(&c.nodes[leader].url(""), DEVICE..DEVICE + 1).expect("registering");

    // SQL cannot move it.
    let r = c.nodes[leader].execute(
        &stmts(&["INSERT INTO _cairn_high_water VALUES(7, 1000)"]),
        "",
    );
    assert!(
        r.body["results"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not writable")),
        "{}",
        r.body
    );

    // The admin action, sent to a follower (forwarded to the leader): applied on every replica.
    let (ok, out) = cairn_device(
        &c.nodes[follower].url(""),
        &["reset", "--id", "7", "--seq", "50"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("0 -> 50"), "{out}");
    c.wait_converged();
    assert_eq!(high_waters(&c), [50, 50, 50]);
    let (ok, out) = cairn_device(&c.nodes[leader].url(""), &["list"]);
    assert!(ok && out.contains("50"), "{out}");

    // Stored records above the requested value: refused, nothing changes.
    c.execute(&json!([[
        "INSERT INTO telemetry(device_id, seq, stream, time_ms, age_ms, \"values\") \
         VALUES(7, 41, 1, 0, 0, '[]'), (7, 42, 1, 0, 0, '[]')"
    ]]));
    let (ok, out) = cairn_device(
        &c.nodes[leader].url(""),
        &["reset", "--id", "7", "--seq", "10"],
    );
    assert!(!ok, "a reset below stored records went through: {out}");
    assert!(out.contains("2 in telemetry"), "{out}");
    c.wait_converged();
    assert_eq!(high_waters(&c), [50, 50, 50]);

    // Once they are gone it goes through; the highest seq arithmetic is checked (u64::MAX).
    c.execute(&stmts(&["DELETE FROM telemetry WHERE device_id = 7"]));
    let (ok, out) = cairn_device(
        &c.nodes[leader].url(""),
        &["reset", "--id", "7", "--seq", "10"],
    );
    assert!(ok, "{out}");
    let (ok, out) = cairn_device(
        &c.nodes[leader].url(""),
        &["reset", "--id", "7", "--seq", &u64::MAX.to_string()],
    );
    assert!(ok, "{out}");
    c.wait_converged();
    assert_eq!(
        high_waters(&c),
        [-1, -1, -1],
        "u64::MAX is stored as its bits"
    );
    c.assert_identical();
}
