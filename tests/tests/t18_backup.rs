//! Continuous backup and point-in-time restore (`gateway/src/backup/`): devices and SQL
//! writers while the leader ships the log, a leader change, `kill -9` of the whole cluster,
//! then restores into fresh directories, to a `file://` target and to a real S3-compatible
//! server (moto's standalone server, installed by `cargo xtask setup`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_tests::device::{READINGS_CONFIG, sim_command};
use cairn_tests::servers::Moto;
use cairn_tests::{Cluster, Options, TIMEOUT, cairn_bin, poll, stmts};
use serde_json::json;

/// The backup interval of these tests.
const INTERVAL: Duration = Duration::from_millis(250);

/// A SQL write the cluster acknowledged: writer, seq, and when the answer came.
type Acked = (u64, u64, Instant);

/// Two writers inserting `(w, seq)` rows through every node in turn until stopped; each
/// row's `ts` is the stamp of the entry that wrote it (the column default reads the entry's
/// "now").
struct Writers {
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(c: &Cluster) -> Writers {
        let urls: Vec<String> = c.nodes.iter().map(|n| n.url("/db/execute")).collect();
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..2u64)
            .map(|w| {
                let (urls, acked, stop) = (urls.clone(), acked.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seq = 0;
                    let client = cairn_tests::Client::new(Duration::from_secs(5), None);
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let url = &urls[(seq as usize + w as usize) % urls.len()];
                        let r = client.post(
                            url,
                            &json!([["INSERT INTO acked(w, seq) VALUES(?, ?)", w, seq]]),
                        );
                        if r.status == 200 && r.body["results"][0].get("error").is_none() {
                            acked.lock().unwrap().push((w, seq, Instant::now()));
                        } else {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                })
            })
            .collect();
        Writers {
            acked,
            stop,
            threads,
        }
    }

    /// Waits for `n` more acknowledged writes.
    fn wait_more(&self, n: usize) {
        let target = self.acked.lock().unwrap().len() + n;
        // Generous: a leader change on a loaded 2-core machine can stall writes for a while.
        poll(4 * TIMEOUT, "acknowledged writes", || {
            (self.acked.lock().unwrap().len() >= target).then_some(())
        })
    }

    /// Stops the writers; every write they saw acknowledged.
    fn stop(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

const TABLE: &str = "CREATE TABLE acked (w INTEGER, seq INTEGER, \
                     ts INTEGER DEFAULT (CAST(round(unixepoch('subsec') * 1000) AS INTEGER)))";

/// `cairn restore --from URL --data-dir DIR` plus `extra`; the output.
fn restore(url: &str, dir: &Path, extra: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut cmd = Command::new(cairn_bin());
    cmd.args(["restore", "--from", url, "--data-dir"])
        .arg(dir)
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running cairn restore")
}

fn restore_ok(url: &str, dir: &Path, extra: &[&str], env: &[(&str, String)]) -> String {
    let out = restore(url, dir, extra, env);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "restore failed: {text}");
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    text
}

fn restore_err(url: &str, dir: &Path, extra: &[&str]) -> String {
    let out = restore(url, dir, extra, &[]);
    assert!(!out.status.success(), "restore should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn u(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<u64> {
    r.get::<_, i64>(i).map(|v| v as u64)
}

/// The `acked` rows of a restored data dir: (w, seq) -> ts, failing on a duplicate.
fn restored_rows(dir: &Path) -> BTreeMap<(u64, u64), i64> {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("sm/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open restored db");
    let mut st = conn.prepare("SELECT w, seq, ts FROM acked").unwrap();
    let mut out = BTreeMap::new();
    let rows = st
        .query_map([], |r| Ok(((u(r, 0)?, u(r, 1)?), r.get(2)?)))
        .unwrap();
    for row in rows {
        let (k, ts) = row.unwrap();
        assert!(out.insert(k, ts).is_none(), "row {k:?} restored twice");
    }
    out
}

/// Per device: (records, distinct k, min k, max k) and the high-water of a restored dir.
/// Per device: (records, distinct k, min k, max k).
type DeviceRows = BTreeMap<u64, (u64, u64, u64, u64)>;

fn restored_devices(dir: &Path) -> (DeviceRows, BTreeMap<u64, u64>) {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("sm/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut st = conn
        .prepare(
            "SELECT device_id, count(*), count(DISTINCT k), min(k), max(k) FROM readings \
             GROUP BY device_id",
        )
        .unwrap();
    let rows = st
        .query_map([], |r| {
            Ok((u(r, 0)?, (u(r, 1)?, u(r, 2)?, u(r, 3)?, u(r, 4)?)))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut st = conn
        .prepare("SELECT device_id, seq FROM _cairn_high_water")
        .unwrap();
    let hw = st
        .query_map([], |r| Ok((u(r, 0)?, u(r, 1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (rows, hw)
}

/// Unix ms as RFC 3339 (`--to-time`), formatted by SQLite.
fn rfc3339(ms: i64) -> String {
    rusqlite::Connection::open_in_memory()
        .unwrap()
        .query_row(
            "SELECT strftime('%Y-%m-%dT%H:%M:%S', ?1 / 1000, 'unixepoch') \
             || printf('.%03dZ', ?1 % 1000)",
            [ms],
            |r| r.get(0),
        )
        .unwrap()
}

/// Starts `cairn node --data-dir DIR --bootstrap` (plus `extra`) on ports the OS picks and
/// returns it with its HTTP address once it leads.
fn start_node(dir: &Path, extra: &[&str], env: &[(&str, String)]) -> (Child, String) {
    let mut cmd = Command::new(cairn_bin());
    cmd.args(["node", "--node-id", "9", "--data-dir"])
        .arg(dir)
        .args(["--http-addr", "127.0.0.1:0", "--raft-addr", "127.0.0.1:0"])
        .args(["--device-addr", "127.0.0.1:0", "--bootstrap"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension("log")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawning cairn node");
    let http = poll(TIMEOUT, "the restored node's addresses", || {
        let a: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("addrs.json")).ok()?).ok()?;
        Some(a["http_addr"].as_str()?.to_string())
    });
    poll(TIMEOUT, "the restored node to lead", || {
        let s = cairn_tests::get(&format!("http://{http}/status")).body;
        (s["raft"]["state"] == "Leader").then_some(())
    });
    (child, http)
}

/// Asserts that the node at `http` serves `n` rows of `acked`.
fn assert_served_rows(http: &str, n: usize) {
    let got = cairn_tests::get(&format!(
        "http://{http}/db/query?level=linearizable&q=SELECT%20count(*)%20FROM%20acked"
    ))
    .body;
    assert_eq!(got["results"][0]["values"][0][0], json!(n), "{got}");
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// The keys under `dir` (a file:// target), `/`-separated.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for f in files(from) {
        let dest = to.join(f.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}

/// Waits until the backup has stored every write acknowledged so far, and returns when "so
/// far" was: the node that acknowledged a write had applied it, so each such write's index is
/// at most the highest applied index of the nodes read after that instant (a leader elected a
/// moment ago may not have applied everything yet); the leader's shipped index must reach
/// it. (How soon after its commit a write is stored is a speed figure, printed by
/// `check_acked`, not asserted: a loaded machine may be late by any amount.)
fn shipped_cut(c: &Cluster) -> Instant {
    let cut = Instant::now();
    let applied = c
        .nodes
        .iter()
        .filter_map(|n| n.status()?["raft"]["applied_index"].as_u64())
        .max()
        .expect("a node answers /status");
    poll(
        2 * TIMEOUT,
        "the backup to store the writes acknowledged",
        || {
            let b = c.nodes[c.find_leader(&[])?].status()?["backup"].clone();
            (b["shipped_index"].as_u64()? >= applied).then_some(())
        },
    );
    cut
}

/// Asserts that every write acknowledged before `cut` is in `rows`; prints how close to the
/// kill the restore reaches.
fn check_acked(acked: &[Acked], rows: &BTreeMap<(u64, u64), i64>, cut: Instant, killed: Instant) {
    let must: Vec<_> = acked.iter().filter(|(_, _, at)| *at < cut).collect();
    let missing: Vec<_> = must
        .iter()
        .filter(|(w, s, _)| !rows.contains_key(&(*w, *s)))
        .map(|(w, s, at)| (w, s, killed.duration_since(*at)))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} writes acknowledged before the backup reported them stored are not in the \
         restore (write, seq, acked before the kill): {:?}",
        missing.len(),
        must.len(),
        &missing[..missing.len().min(10)]
    );
    let newest = acked
        .iter()
        .filter(|(w, s, _)| rows.contains_key(&(*w, *s)))
        .map(|(_, _, at)| killed.saturating_duration_since(*at))
        .min();
    println!(
        "restore holds all {} writes acknowledged before the backup reported them stored ({} \
         acked in all, {} rows restored; the newest restored was acked {newest:?} before the \
         kill, with a {INTERVAL:?} backup interval)",
        must.len(),
        acked.len(),
        rows.len()
    );
}

#[test]
fn test_file_backup_survives_kill9_of_the_cluster_and_restores_to_a_point_in_time() {
    let work = tempfile::tempdir().unwrap();
    let bk = work.path().join("bk");
    let key = work.path().join("backup.key");
    std::fs::write(&key, "42".repeat(32)).unwrap();
    let url = format!("file://{}", bk.display());
    let interval = format!("{}ms", INTERVAL.as_millis());
    let mut c = Cluster::start_with(
        3,
        Options {
            config: Some(READINGS_CONFIG.into()),
            extra: vec![
                "--backup-url".into(),
                url.clone(),
                "--backup-interval".into(),
                interval,
                "--backup-snapshot-interval".into(),
                "3s".into(),
                "--backup-key-file".into(),
                key.display().to_string(),
            ],
            ..Options::default()
        },
    );
    c.execute(&stmts(&[TABLE]));
    let leader = c.leader();
    let gateways: Vec<String> = c.nodes.iter().map(|n| n.device.clone()).collect();
    let gateways: Vec<&str> = gateways.iter().map(String::as_str).collect();
    let mut sim = sim_command(&cairn_bin(), &gateways, &c.nodes[leader].url(""))
        .args(["--devices", "8", "--rate", "20", "--duration", "30"])
        .args(["--json", "--quiet", "--first-id", "300"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning cairn sim");

    let writers = Writers::start(&c);
    writers.wait_more(80);
    // A leader change while the backup runs.
    let old = c.leader();
    let old_id = c.nodes[old].id;
    c.kill9(old);
    let new = c.wait_for_new_leader(old_id);
    println!(
        "leader change: node {old_id} killed, node {} leads",
        c.nodes[new].id
    );
    writers.wait_more(80);
    // Whoever leads now (leadership may move again on a loaded machine) runs the backup.
    let (now, status) = poll(2 * TIMEOUT, "the leader to ship", || {
        let l = c.find_leader(&[])?;
        let b = c.nodes[l].status()?["backup"].clone();
        (b["active"] == true && b["objects_written"].as_u64()? >= 3).then_some((l, b))
    });
    println!("backup status on the leader: {status}");
    let metrics = cairn_tests::agent()
        .get(c.nodes[now].url("/metrics"))
        .call()
        .expect("GET /metrics")
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains("cairn_backup_objects_written_total"),
        "{metrics}"
    );

    // The whole cluster dies at once, with writes in flight.
    let cut = shipped_cut(&c);
    let killed = Instant::now();
    for i in 0..c.nodes.len() {
        c.kill9(i);
    }
    let acked = writers.stop();
    let _ = sim.kill();
    let _ = sim.wait();

    // What the backup holds.
    let list = Command::new(cairn_bin())
        .args(["backup", "list", "--from", &url])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    println!("{list}");
    assert!(
        list.contains("snapshot") && list.contains("restorable through index"),
        "{list}"
    );

    // Encrypted: nothing opens without the key, or with another one.
    let e = restore_err(&url, &work.path().join("nokey"), &[]);
    assert!(
        e.contains("is encrypted") && e.contains("000000/snapshots/"),
        "{e}"
    );
    let other = work.path().join("other.key");
    std::fs::write(&other, "17".repeat(32)).unwrap();
    let e = restore_err(
        &url,
        &work.path().join("wrongkey"),
        &["--key-file", other.to_str().unwrap()],
    );
    assert!(e.contains("does not open with this key"), "{e}");
    let raw: Vec<u8> = files(&bk)
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap())
        .collect();
    assert!(
        !raw.windows(6).any(|w| w == b"acked "),
        "plaintext SQL in the backup"
    );

    // Full restore: every write acknowledged before the backup reported it stored, once.
    let k = ["--key-file", key.to_str().unwrap()];
    let full = work.path().join("full");
    restore_ok(&url, &full, &k, &[]);
    let rows = restored_rows(&full);
    check_acked(&acked, &rows, cut, killed);
    // Devices: each device's records without holes or repeats, matching its high-water.
    let (devices, hw) = restored_devices(&full);
    assert!(!devices.is_empty(), "no device records restored");
    for (id, (n, distinct, min, max)) in &devices {
        assert_eq!(n, distinct, "device {id}: a record restored twice");
        assert_eq!((*min, *max), (1, *n), "device {id}: holes");
        assert_eq!(
            hw.get(id),
            Some(n),
            "device {id}: high-water and records disagree"
        );
    }
    println!(
        "devices: {} records of {} devices restored, high-water consistent",
        devices.values().map(|d| d.0).sum::<u64>(),
        devices.len()
    );

    // Point in time: exactly the entries stamped at or before T.
    let mut stamps: Vec<i64> = rows.values().copied().collect();
    stamps.sort();
    let t = stamps[stamps.len() * 2 / 5];
    let pit = work.path().join("pit");
    restore_ok(&url, &pit, &[k[0], k[1], "--to-time", &rfc3339(t)], &[]);
    let at_t = restored_rows(&pit);
    let expected: BTreeMap<_, _> = rows
        .iter()
        .filter(|(_, ts)| **ts <= t)
        .map(|(k, v)| (*k, *v))
        .collect();
    assert_eq!(
        at_t.keys().collect::<BTreeSet<_>>(),
        expected.keys().collect::<BTreeSet<_>>(),
        "--to-time {} restored other rows than those stamped up to it",
        rfc3339(t)
    );
    assert!(at_t.len() < rows.len());
    println!(
        "--to-time {}: {} of {} rows, exactly those stamped up to it",
        rfc3339(t),
        at_t.len(),
        rows.len()
    );

    // A damaged object is detected and named.
    let bad = work.path().join("bad");
    copy_dir(&bk, &bad);
    let snap = files(&bad)
        .into_iter()
        .rfind(|f| f.extension().is_some_and(|e| e == "snap"))
        .expect("a snapshot");
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&snap, bytes).unwrap();
    let name = snap
        .strip_prefix(&bad)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let e = restore_err(
        &format!("file://{}", bad.display()),
        &work.path().join("r-bad"),
        &k,
    );
    assert!(e.contains(&name) && e.contains("corrupt"), "{e}");
    println!("damaged object named: {}", e.trim());

    // The restored directory starts as a one-node cluster holding exactly that data.
    let (node, http) = start_node(&full, &[], &[]);
    assert_served_rows(&http, rows.len());
    let r = cairn_tests::post(
        &format!("http://{http}/db/execute"),
        &json!([["INSERT INTO acked(w, seq) VALUES(99, 1)"]]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    kill(node);
}

/// moto's S3 server on a free loopback port with the bucket `cairn-backups`.
fn moto() -> Moto {
    Moto::start("cairn-backups", None).expect("moto")
}

#[test]
fn test_s3_backup_with_leader_change_restores_everything_once() {
    let s3 = moto();
    let env = vec![
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
    ];
    let url = "s3://cairn-backups/site-a".to_string();
    let config = format!(
        "backup_url = [\"{url}\"]\nbackup_interval = \"{}ms\"\nbackup_snapshot_interval = \"2s\"\n\
         backup_retention = \"1s\"\nbackup_retention_snapshots = 2\nbackup_s3_endpoint = \"{}\"\n\
         backup_s3_access_key_id = \"testing\"\nbackup_s3_secret_access_key = \"testing\"\n",
        INTERVAL.as_millis(),
        s3.endpoint
    );
    let mut c = Cluster::start_with(
        3,
        Options {
            config: Some(config.clone()),
            ..Options::default()
        },
    );
    c.execute(&stmts(&[TABLE]));
    let writers = Writers::start(&c);
    writers.wait_more(100);
    // A graceful leader change (SIGTERM hands leadership over) while shipping.
    let old = c.leader();
    let old_id = c.nodes[old].id;
    assert!(c.terminate(old));
    c.wait_for_new_leader(old_id);
    writers.wait_more(100);
    let acked = writers.stop();
    // Everything shipped: the backup catches up with the commit index.
    let status = poll(2 * TIMEOUT, "the backup to catch up", || {
        let s = c.nodes[c.find_leader(&[])?].status()?;
        let b = &s["backup"];
        (b["active"] == true
            && b["lag_index"] == 0
            && b["shipped_index"].as_u64()? > 0
            && b["objects_deleted"].as_u64()? > 0)
            .then(|| b.clone())
    });
    println!("backup status: {status}");
    assert_eq!(status["errors"], 0, "{status}");
    let killed = Instant::now();
    for i in 0..c.nodes.len() {
        c.kill9(i);
    }

    let work = tempfile::tempdir().unwrap();
    let s3_flags = ["--s3-endpoint", s3.endpoint.as_str()];
    let list = Command::new(cairn_bin())
        .args(["backup", "list", "--from", &url])
        .args(s3_flags)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    println!("{list}");
    let snapshots = list.matches("snapshot ").count();
    assert!(
        (1..=3).contains(&snapshots),
        "retention keeps 2 snapshots (+1 in flight): {list}"
    );

    let full = work.path().join("full");
    restore_ok(&url, &full, &s3_flags, &env);
    let rows = restored_rows(&full);
    check_acked(&acked, &rows, killed, killed);
    for (w, s, _) in &acked {
        assert!(
            rows.contains_key(&(*w, *s)),
            "write ({w}, {s}) lost: the backup caught up before the kill"
        );
    }

    // --to-index: the restore stops exactly there.
    // --to-index: the restore stops exactly there (halfway between the oldest snapshot kept
    // and the end).
    let number_after = |line: &str, word: &str| -> u64 {
        let rest = &line[line.find(word).unwrap() + word.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())
            .unwrap()
            .parse()
            .unwrap()
    };
    let oldest = list.lines().find(|l| l.contains("snapshot ")).unwrap();
    let end = list
        .lines()
        .find(|l| l.contains("restorable through"))
        .unwrap();
    let to = (number_after(oldest, "index") + number_after(end, "index")) / 2;
    let idx = work.path().join("idx");
    let to_flag = to.to_string();
    let out = restore_ok(
        &url,
        &idx,
        &[s3_flags[0], s3_flags[1], "--to-index", &to_flag],
        &env,
    );
    assert!(out.contains(&format!("through index {to} ")), "{out}");

    // --restore-if-empty: a node with an empty data dir starts from the latest backup.
    let fresh = work.path().join("fresh");
    let (node, http) = start_node(
        &fresh,
        &[
            "--config",
            c.dir().join("cairn.toml").to_str().unwrap(),
            "--restore-if-empty",
        ],
        &env,
    );
    assert_served_rows(&http, rows.len());
    kill(node);
}
