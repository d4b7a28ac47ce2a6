//! The fault runner: a real cluster, client load, a seeded schedule of faults, then checks.
//!
//! One [`run`] call:
//! 1. starts `nodes` real `cairn node` processes through the [`Cluster`] harness, each in its
//!    own network namespace on a tmpfs data dir when `isolation` is on (root), else on loopback.
//!    When the schedule holds a power cut, each data dir is a faultfs mount over that tmpfs
//!    (file data kept in memory until fsync, dropped by a cut); when it holds a clock fault,
//!    each node runs under libfaketime with its own control file;
//! 2. starts `clients` HTTP client threads, each bound to one node as Jepsen binds clients,
//!    doing register writes and `level=linearizable` reads on a few long-lived keys, reads,
//!    writes and compare-and-sets on short-lived keys (fresh ones every [`CAS_KEY_SECS`]: a
//!    failed compare-and-set keeps every indeterminate write in the search, so each of those
//!    keys' histories is kept short, as Jepsen's independent keys are) ([`Recorder`]), and
//!    appends of unique tokens to a table without a unique constraint ([`Ledger`]); and,
//!    when the `cairn` binary has `sim`, a fleet of simulated devices (the real firmware
//!    client) pushing records `[U64(k), F32(t)]`, `k = 1, 2, 3, ...`, to the nodes' device
//!    ports (stream 3 declared as table `readings`); and, with `qemu_elf` or `host_board`,
//!    real devices: the firmware image under QEMU and the host board on TAP
//!    ([`crate::real_device`]: their sensors' records on streams 1 and 2, tables `climate` and
//!    `power`), whose schedule gains a device power cut;
//! 3. executes the [`schedule`] drawn from the seed: each step injects one fault or two or
//!    three at once (targets resolved against the leader at the start of the step, one fault
//!    per node), holds them, heals them (network first, restarts last);
//! 4. heals everything, stops the load, waits for every member to apply the leader's commit
//!    index, reads every key once more linearizably, and checks:
//!    - every acknowledged token and every record acknowledged to a device (`k <= acked`
//!      in the fleet's report) stored exactly once on every replica, and no stored token or
//!      record that was never pushed (`lost`, `duplicated`; never-pushed counts as duplicated
//!      in the summary line),
//!    - every replica's user tables identical through `level=none` reads (`diverged`),
//!    - the register history linearizable ([`crate::linearizability`]; `nonlinearizable`),
//!    - every device's record times never below its previous record's and within the run
//!      (plus the schedule's largest forward clock jump) (`misordered`).
//!
//! A node that cannot start again after a kill or a power cut is a crash (recorded with its
//! log tail), not a harness panic, so a build that loses data still ends with the checks.
//! A failure message carries the seed, the schedule and the offending key's history; the whole
//! [`Run`] is written as JSON to `out_dir` for `cairn-faults --check FILE`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

use crate::device::{READINGS_CONFIG, authenticate, sim_command};
use crate::history::{Fate, Ledger, Recorder, Run};
use crate::http::Auth;
use crate::http::Client;
use crate::linearizability::{self, Call, Ret, Verdict};
use crate::nemesis::{
    Capabilities, CutScope, Fault, Focus, Skew, SplitMix64, Step, Target, schedule,
};
use crate::netns::{self, Net, NsGuard};
use crate::qemu::Row;
use crate::real_device::{self, RealDevice};
use crate::tmpfs::Tmpfs;
use crate::{Cluster, Options, Place, Security, cairn_bin, poll, stmts};

/// What one schedule runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub steps: usize,
    pub nodes: usize,
    pub clients: usize,
    pub keys: usize,
    /// Network namespaces per node and tmpfs data dirs (needs root): enables partitions,
    /// packet loss and disk-full faults.
    pub isolation: bool,
    /// Where a failing run's JSON goes.
    pub out_dir: PathBuf,
    /// Print each step as it happens.
    pub verbose: bool,
    /// Simulated devices (`cairn sim`, the real firmware client) pushing during the run;
    /// 0, or a `cairn` without `sim`, runs the HTTP load alone.
    pub devices: u64,
    /// Records per second per device.
    pub device_rate: u64,
    /// What the schedule concentrates on (overlaps, power cuts, clock faults, or a mix).
    pub focus: Focus,
    /// The nodes run a `cairn` built with `unsafe-no-fsync` (only changes the replay line).
    pub unsafe_no_fsync: bool,
    /// Consistency level of the register reads: `linearizable` (the claim under test).
    /// `none` or `weak` exist to show the checker saying no: stale reads from a cut-off
    /// node must be caught (`cairn-faults --read-level none`).
    pub read_level: String,
    /// `--auth`, HTTPS and node mutual TLS on every node (`cairn-faults --secure`); the load,
    /// the nemesis and the devices' registration then authenticate.
    pub secure: bool,
    /// The QEMU firmware image (release, flash outbox) to run as a real device alongside the
    /// simulated ones, with a device power cut in the schedule ([`crate::real_device`]).
    pub qemu_elf: Option<PathBuf>,
    /// The host board's binary (`boards/host`) to run as a real device on TAP, the same way
    /// (needs `isolation`: its TAP device sits on the private network's bridge).
    pub host_board: Option<PathBuf>,
}

impl Config {
    /// The command that runs this schedule again.
    pub fn replay(&self) -> String {
        let mut cmd = format!(
            "cargo xtask faults --schedules 1 --seed {} --steps {}",
            self.seed, self.steps
        );
        if self.focus != Focus::Mixed {
            cmd += &format!(" --focus {}", self.focus);
        }
        if self.nodes != 3 {
            cmd += &format!(" --nodes {}", self.nodes);
        }
        if self.secure {
            cmd += " --secure";
        }
        if self.unsafe_no_fsync {
            cmd += " --unsafe-no-fsync";
        }
        if self.qemu_elf.is_some() {
            cmd += " --qemu";
        }
        if self.host_board.is_some() {
            cmd += " --host-board";
        }
        cmd
    }

    pub fn new(seed: u64) -> Config {
        Config {
            seed,
            steps: 4,
            nodes: 3,
            clients: 5,
            keys: 6,
            isolation: netns::available(),
            out_dir: std::env::temp_dir(),
            verbose: true,
            devices: 8,
            device_rate: 10,
            read_level: "linearizable".into(),
            focus: Focus::Mixed,
            unsafe_no_fsync: false,
            secure: false,
            qemu_elf: None,
            host_board: None,
        }
    }
}

/// The result of one schedule.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub seed: u64,
    pub faults: usize,
    /// Acknowledged writes of any kind (tokens, register writes and CASes).
    pub acked: u64,
    /// Records checked per replica (tokens and device records acknowledged, times replicas).
    pub verified: u64,
    /// Device records acknowledged to the simulated devices (part of `acked`).
    pub device_acked: u64,
    pub ops: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub phantom: usize,
    pub diverged: usize,
    pub nonlinearizable: usize,
    pub undecided: usize,
    /// Nodes that stopped on their own (not through a kill, and not after a full disk).
    pub crashed: usize,
    /// Device records whose time goes back or leaves the run's span.
    pub misordered: usize,
    /// Faults injected by kind ([`crate::nemesis::KINDS`]).
    pub kinds: BTreeMap<&'static str, usize>,
    /// Steps that held two or three faults at once.
    pub overlaps: usize,
    /// Real devices (the QEMU image, the host board) that took part.
    pub real_devices: usize,
    /// Observations worth a line in the report that are not failures.
    pub notes: Vec<String>,
    /// `Some` with a full explanation when a check failed.
    pub failure: Option<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// The real devices' ids (the simulated devices count from 1).
const QEMU_DEVICE: u64 = 0xfa17;
const HOST_DEVICE: u64 = 0xfa18;

/// How long a real device may take to get every record acknowledged after the heal (its
/// reconnect back-off may have grown during a long outage).
const REAL_DRAIN: Duration = Duration::from_secs(90);

/// Per-request timeout of the client load: long enough for an election, short enough that
/// a paused node does not stall its client for the whole step.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the load's and the nemesis's connects may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);

/// How long the nemesis waits for one `/status` answer.
const STATUS_TIMEOUT: Duration = Duration::from_millis(1500);

fn client(timeout: Duration, auth: &Auth) -> Client {
    Client::with_auth(timeout, Some(CONNECT_TIMEOUT), auth)
}

/// `path` on the API at `node` (`https://` when the harness trusts a CA).
fn api_url(auth: &Auth, node: &str, path: &str) -> String {
    let scheme = if auth.ca_cert.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{node}{path}")
}

/// The answer to a request, classified for the checkers.
enum Answer {
    /// HTTP 200 and the first result has no error.
    Ok(Json),
    /// The request certainly had no effect (never connected, or a SQL error result).
    Failed(String),
    /// Anything else: timeouts, resets, 5xx (a forwarded write may have committed).
    Unknown(String),
}

fn send(client: &Client, url: &str, body: &Json) -> Answer {
    // The transport error decides between Failed and Unknown, so this reads ureq's answer.
    match client.authorize(client.agent().post(url)).send_json(body) {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            let v: Json = serde_json::from_str(&text).unwrap_or(Json::String(text.clone()));
            if status != 200 {
                return Answer::Unknown(format!("HTTP {status}: {text}"));
            }
            match v["results"][0].get("error") {
                Some(e) => Answer::Failed(format!("SQL error: {e}")),
                None => Answer::Ok(v["results"][0].clone()),
            }
        }
        Err(e) => {
            let never_sent = match &e {
                ureq::Error::ConnectionFailed => true,
                ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => true,
                ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
                _ => false,
            };
            if never_sent {
                Answer::Failed(e.to_string())
            } else {
                Answer::Unknown(e.to_string())
            }
        }
    }
}

/// The HTTP addresses of current members, indexed like `Cluster::nodes` (`None`: removed).
type Members = Arc<RwLock<Vec<Option<String>>>>;

/// What the client threads share.
#[derive(Clone)]
struct Load {
    seed: u64,
    keys: usize,
    members: Members,
    rec: Recorder,
    ledger: Ledger,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<u64>>,
    read_level: String,
    /// When the load started: compare-and-set keys move on every [`CAS_KEY_SECS`].
    epoch: Instant,
    auth: Auth,
    /// Why requests did not succeed: error text (shortened) and how often.
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Load {
    /// Counts a request's failure reason and passes the answer on, after a short back-off
    /// on failure so a dead node's client does not spin on refused connections.
    fn tally(&self, a: Answer) -> Answer {
        if let Answer::Failed(e) | Answer::Unknown(e) = &a {
            let short: String = e.chars().take(70).collect();
            *self
                .errors
                .lock()
                .expect("errors")
                .entry(short)
                .or_default() += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }
}

/// One client thread's load: Jepsen-style, bound to one node, one request at a time.
fn client_loop(process: u32, load: Load) {
    let Load {
        seed,
        keys,
        ref members,
        ref rec,
        ref ledger,
        ref stop,
        ref acked,
        ..
    } = load;
    let auth = &load.auth;
    let agent = client(CLIENT_TIMEOUT, auth);
    let mut rng = SplitMix64::new(seed ^ (u64::from(process) << 40));
    let mut counter: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let node = {
            let m = members.read().expect("members lock");
            let live: Vec<&String> = m.iter().flatten().collect();
            if live.is_empty() {
                return;
            }
            live[process as usize % live.len()].clone()
        };
        let key = format!("k{}", rng.below(keys as u64));
        counter += 1;
        let fresh = (i64::from(process) << 32) | counter;
        let choice = rng.below(100);

        if choice < 20 {
            let token = format!("p{process}-{counter}");
            let body = json!([["INSERT INTO ledger(token) VALUES(?)", token]]);
            ledger.record(&token, Fate::Indeterminate);
            let fate = match load.tally(send(&agent, &api_url(auth, &node, "/db/execute"), &body)) {
                Answer::Ok(_) => Fate::Acked,
                Answer::Failed(_) => Fate::Failed,
                Answer::Unknown(_) => Fate::Indeterminate,
            };
            if fate == Fate::Acked {
                *acked.lock().expect("acked lock") += 1;
            }
            ledger.record(&token, fate);
        } else if choice >= 75 {
            cas_key_op(&load, process, &agent, &node, &mut rng);
        } else if choice < 45 {
            write_register(&load, process, &agent, &node, &key, fresh);
        } else {
            let p = rec.invoke(process, &key, Call::Read);
            let ret = read_register(&agent, auth, &node, &key, &load.read_level, Some(&load));
            rec.complete(p, ret);
        }
    }
}

/// A recorded blind write of `value` to register `key` (an upsert).
fn write_register(load: &Load, process: u32, agent: &Client, node: &str, key: &str, value: i64) {
    let p = load.rec.invoke(process, key, Call::Write(value));
    let body = json!([[
        "INSERT INTO reg(k, v) VALUES(?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
        key,
        value
    ]]);
    let url = api_url(&load.auth, node, "/db/execute");
    let ret = match load.tally(send(agent, &url, &body)) {
        Answer::Ok(_) => {
            *load.acked.lock().expect("acked lock") += 1;
            Ret::Written
        }
        Answer::Failed(_) => Ret::Failed,
        Answer::Unknown(_) => Ret::Indeterminate,
    };
    load.rec.complete(p, ret);
}

/// How long the compare-and-set keys live: all clients move to fresh keys together, so each
/// key's history stays short enough to check exhaustively (Jepsen's independent keys), even
/// with failed compare-and-sets, which keep every indeterminate write in the search.
const CAS_KEY_SECS: u64 = 2;

/// One operation on this moment's compare-and-set keys: a read, a write or a compare-and-set
/// (`UPDATE ... WHERE v = from`, applied when one row changed) over the values 0..5, so that
/// compare-and-sets often succeed and often fail.
fn cas_key_op(load: &Load, process: u32, agent: &Client, node: &str, rng: &mut SplitMix64) {
    let key = format!(
        "c{}.{}",
        load.epoch.elapsed().as_secs() / CAS_KEY_SECS,
        rng.below(2)
    );
    let (from, to) = (rng.below(5) as i64, rng.below(5) as i64);
    let url = api_url(&load.auth, node, "/db/execute");
    match rng.below(3) {
        0 => {
            let p = load.rec.invoke(process, &key, Call::Read);
            let ret = read_register(agent, &load.auth, node, &key, &load.read_level, Some(load));
            load.rec.complete(p, ret);
        }
        1 => write_register(load, process, agent, node, &key, to),
        _ => {
            let p = load.rec.invoke(process, &key, Call::Cas { from, to });
            let body = json!([["UPDATE reg SET v = ? WHERE k = ? AND v = ?", to, key, from]]);
            let ret = match load.tally(send(agent, &url, &body)) {
                Answer::Ok(r) => match r["rows_affected"].as_u64() {
                    Some(n) => {
                        *load.acked.lock().expect("acked lock") += 1;
                        Ret::Cas(n == 1)
                    }
                    None => Ret::Indeterminate,
                },
                Answer::Failed(_) => Ret::Failed,
                Answer::Unknown(_) => Ret::Indeterminate,
            };
            load.rec.complete(p, ret);
        }
    }
}

/// A read of one key at `level` (`Ret::Indeterminate` on any failure).
fn read_register(
    agent: &Client,
    auth: &Auth,
    node: &str,
    key: &str,
    level: &str,
    load: Option<&Load>,
) -> Ret {
    let body = json!([["SELECT v FROM reg WHERE k = ?", key]]);
    let url = api_url(auth, node, &format!("/db/query?level={level}"));
    let answer = match load {
        Some(l) => l.tally(send(agent, &url, &body)),
        None => send(agent, &url, &body),
    };
    match answer {
        Answer::Ok(r) => match r.get("values").and_then(|v| v.as_array()) {
            None => Ret::Read(None),
            Some(rows) => match rows.first().and_then(|row| row[0].as_i64()) {
                Some(v) if rows.len() == 1 => Ret::Read(Some(v)),
                _ => Ret::Indeterminate,
            },
        },
        _ => Ret::Indeterminate,
    }
}

/// True when this `cairn` has the `sim` command (device ingress landed).
fn sim_available() -> bool {
    std::process::Command::new(cairn_bin())
        .args(["sim", "--help"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The stream `cairn sim` pushes on here: streams 1 and 2 are the QEMU image's sensor's.
const SIM_STREAM: u16 = 3;

/// The nodes' `[[stream]]` tables: [`READINGS_CONFIG`]'s `readings` on [`SIM_STREAM`] for the
/// simulated devices, and the real device's `climate` and `power`
/// ([`crate::real_device::STREAMS_CONFIG`]).
fn streams_config() -> String {
    let readings = READINGS_CONFIG.replacen("id = 1\n", &format!("id = {SIM_STREAM}\n"), 1);
    assert_ne!(
        readings, READINGS_CONFIG,
        "READINGS_CONFIG declares stream 1"
    );
    format!("{readings}{}", real_device::STREAMS_CONFIG)
}

/// A running `cairn sim`: every device pushes `[U64(k), F32(t)]` with `k = 1, 2, 3, ...`, so
/// the database can be checked by content.
struct Fleet {
    child: Option<std::process::Child>,
    report: PathBuf,
}

impl Drop for Fleet {
    /// A run that ends in a harness panic must not leave the fleet pushing.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One device's line of `cairn sim --report`.
#[derive(Debug, Clone, Copy)]
struct DeviceReport {
    id: u64,
    pushed: u64,
    acked: u64,
}

impl Fleet {
    fn start(env: &Env, devices: u64, rate: u64) -> Fleet {
        let leader = env
            .find_leader()
            .expect("a leader to register devices with");
        let gateways: Vec<&str> = env
            .cluster
            .nodes
            .iter()
            .map(|n| n.device.as_str())
            .collect();
        let report = env.scratch.path().join("devices.jsonl");
        // Started from the hub thread, so the fleet lives in the hub namespace too.
        let mut cmd = sim_command(&cairn_bin(), &gateways, &env.cluster.nodes[leader].url(""));
        authenticate(&mut cmd, &env.cluster.auth());
        let child = cmd
            .args(["--devices", &devices.to_string()])
            .args(["--stream", &SIM_STREAM.to_string()])
            .args(["--rate", &rate.to_string(), "--threads", "1"])
            .args(["--drain", "60", "--json", "--quiet"])
            .arg("--report")
            .arg(&report)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning cairn sim");
        Fleet {
            child: Some(child),
            report,
        }
    }

    /// SIGINT (stop pushing, drain), then the per-device report and the fleet's JSON summary
    /// line (with how long the drain took: every pushed record acknowledged after the heal).
    fn stop(mut self) -> Result<(Vec<DeviceReport>, String), String> {
        let start = Instant::now();
        let child = self.child.take().expect("the fleet runs");
        // SAFETY: kill(2) on a child we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child
            .wait_with_output()
            .map_err(|e| format!("cairn sim: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cairn sim exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let summary = format!(
            "device fleet drained in {:.1} s; {}",
            start.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or_default()
        );
        let text = std::fs::read_to_string(&self.report)
            .map_err(|e| format!("reading the sim report: {e}"))?;
        let reports = text
            .lines()
            .map(|l| {
                let v: Json = serde_json::from_str(l).map_err(|e| format!("{l}: {e}"))?;
                let f = |k: &str| v[k].as_u64().ok_or(format!("{k} missing in {l}"));
                Ok(DeviceReport {
                    id: f("device_id")?,
                    pushed: f("pushed")?,
                    acked: f("acked")?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok((reports, summary))
    }
}

/// Checks one replica's device rows (`device_id`, `k`) against what the devices pushed and
/// were told: each acknowledged record (`k <= acked`) exactly once, no `k` twice, nothing
/// beyond what was pushed, no unknown device. Returns (lost, duplicated, phantom) samples.
fn audit_devices(
    reports: &[DeviceReport],
    rows: &[(u64, u64)],
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut counts: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for &r in rows {
        *counts.entry(r).or_default() += 1;
    }
    let (mut lost, mut dup, mut phantom) = (Vec::new(), Vec::new(), Vec::new());
    let known: BTreeMap<u64, DeviceReport> = reports.iter().map(|r| (r.id, *r)).collect();
    for r in reports {
        for k in 1..=r.acked {
            if !counts.contains_key(&(r.id, k)) {
                lost.push(format!("device {} k={k}", r.id));
            }
        }
    }
    for (&(d, k), &n) in &counts {
        if n > 1 {
            dup.push(format!("device {d} k={k} x{n}"));
        }
        if known.get(&d).is_none_or(|r| k == 0 || k > r.pushed) {
            phantom.push(format!("device {d} k={k}"));
        }
    }
    (lost, dup, phantom)
}

/// The rows of a local (`level=none`) read on `node`, or none when the table does not
/// exist: a table whose creation was acknowledged and then lost (a missing fsync under a
/// power cut) must show up as lost rows, not as a harness failure.
fn rows_or_none(node: &crate::Node, sql: &str) -> Vec<Vec<Json>> {
    node.try_rows(sql, "none").unwrap_or_else(|res| {
        let missing = res["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("no such table"));
        assert!(missing, "query error on node {}: {res}", node.id);
        Vec::new()
    })
}

/// A real device's records on one replica (a local read), as [`Row`]s in seq order.
fn real_rows(node: &crate::Node, device: u64) -> Vec<Row> {
    let mut rows: Vec<Row> = real_device::row_queries(device)
        .into_iter()
        .flat_map(|(stream, sql)| {
            rows_or_none(node, &sql).into_iter().map(move |r| Row {
                seq: r[0].as_u64().unwrap_or(0),
                stream,
                values: r[1..].to_vec(),
            })
        })
        .collect();
    rows.sort_by_key(|r| r.seq);
    rows
}

/// Stops the client threads when a run unwinds (a harness panic), so none outlives it.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Wall-clock milliseconds since the Unix epoch (the harness's clock, never faked).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Checks stored record times `(device_id, seq, time ms)`, sorted by device then seq: each
/// at or after the device's previous record, all within `lo..=hi`. Returns what is wrong.
fn audit_times(rows: &[(u64, u64, i64)], lo: i64, hi: i64) -> Vec<String> {
    let mut bad = Vec::new();
    for (k, &(dev, seq, t)) in rows.iter().enumerate() {
        if !(lo..=hi).contains(&t) {
            bad.push(format!("device {dev} seq {seq} at {t} ms: outside the run"));
        }
        if let Some(&(pdev, pseq, pt)) = k.checked_sub(1).map(|p| &rows[p])
            && pdev == dev
            && t < pt
        {
            bad.push(format!(
                "device {dev} seq {seq} at {t} ms, {} ms before seq {pseq}",
                pt - t
            ));
        }
    }
    bad
}

/// Everything one schedule owns. Dropped in an order that kills nodes before unmounting
/// their disks and deleting their namespaces.
struct Env {
    cluster: Cluster,
    net: Option<Arc<Mutex<Net>>>,
    disks: Arc<Mutex<BTreeMap<u64, Tmpfs>>>,
    /// faultfs over each node's tmpfs (schedules with power cuts), by node id.
    mounts: Arc<Mutex<BTreeMap<u64, faultfs::Mount>>>,
    /// libfaketime control files (schedules with clock faults), by node id.
    clocks: BTreeMap<u64, PathBuf>,
    _hub: Option<NsGuard>,
    members: Members,
    paused: Vec<usize>,
    agent: Client,
    log: Vec<String>,
    started: Instant,
    verbose: bool,
    seed: u64,
    /// The fleet's report, the clock files.
    scratch: tempfile::TempDir,
    /// Nodes that stopped without a fault that stops them, with their log tails.
    crashes: Vec<String>,
    /// Faults injected, by kind ([`crate::nemesis::KINDS`]), and steps that overlapped.
    kinds: BTreeMap<&'static str, usize>,
    overlaps: usize,
    /// The largest forward clock jump of the schedule (seconds), for the time checks.
    max_forward_s: u64,
    /// The real devices, if the schedule has any.
    real: Vec<RealDevice>,
    /// The running step's hold, and how long its device power cut waited for records to
    /// wait (taken off the hold).
    hold: Duration,
    devcut_wait: Duration,
}

impl Drop for Env {
    fn drop(&mut self) {
        for &i in &self.paused {
            signal(&self.cluster, i, libc::SIGCONT);
        }
        for i in 0..self.cluster.nodes.len() {
            self.cluster.kill9(i);
        }
        if std::thread::panicking() {
            // The logs live on the tmpfs data dirs: print them before unmounting.
            self.cluster.print_log_tails();
        }
        self.mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.disks.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

fn signal(c: &Cluster, i: usize, sig: i32) {
    if let Some(pid) = c.nodes[i].pid() {
        // SAFETY: kill(2) on a child process we own.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

/// Where Debian's libfaketime lives (multi-threaded variant), if installed.
pub fn faketime_lib() -> Option<PathBuf> {
    [
        "x86_64-linux-gnu",
        "aarch64-linux-gnu",
        "arm-linux-gnueabihf",
    ]
    .iter()
    .map(|t| PathBuf::from(format!("/usr/lib/{t}/faketime/libfaketimeMT.so.1")))
    .find(|p| p.exists())
}

/// Whether power cuts can run here: root (for the tmpfs under it) and `/dev/fuse`.
pub fn faultfs_available() -> bool {
    netns::available() && Path::new("/dev/fuse").exists()
}

/// A fault in place, and what heals it ([`Env::heal`]).
enum Active {
    /// Start these nodes again (after a kill or a power cut).
    Restart(Vec<usize>),
    /// `SIGCONT`.
    Resume(usize),
    Partition,
    Loss,
    /// Delete the ballast, restart the node if the full disk stopped it.
    Disk(usize),
    /// Set the node's clock right again.
    Clock(usize),
    /// Boot the real device again on its flash file.
    DeviceBoot,
}

impl Active {
    /// Heal order: the network first (so restarted nodes can find a leader), processes last.
    fn rank(&self) -> u8 {
        match self {
            Active::Partition | Active::Loss => 0,
            Active::Resume(_) => 1,
            Active::Disk(_) => 2,
            Active::Clock(_) | Active::DeviceBoot => 3,
            Active::Restart(_) => 4,
        }
    }
}

impl Env {
    fn start(cfg: &Config, steps: &[Step]) -> Env {
        // Build before entering the hub: cargo must see the host's network namespace.
        cairn_bin();
        let all = || steps.iter().flat_map(|s| s.faults.iter());
        let use_faultfs = all().any(|f| f.needs_faultfs());
        let faketime = all()
            .any(|f| f.needs_faketime())
            .then(faketime_lib)
            .flatten();
        let max_forward_s = all()
            .filter_map(|f| match f {
                Fault::Clock {
                    skew: Skew::Forward(s),
                    ..
                } => Some(u64::from(*s)),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let scratch = tempfile::tempdir().expect("scratch dir");
        let disks: Arc<Mutex<BTreeMap<u64, Tmpfs>>> = Arc::default();
        let mounts: Arc<Mutex<BTreeMap<u64, faultfs::Mount>>> = Arc::default();
        let clock_dir = scratch.path().to_path_buf();
        let (net, hub, place) = if cfg.isolation {
            let net = Arc::new(Mutex::new(
                Net::new().expect("creating the private network"),
            ));
            let hub = net
                .lock()
                .expect("net")
                .enter_hub()
                .expect("entering the hub");
            let (n2, d2, m2) = (net.clone(), disks.clone(), mounts.clone());
            let place: Place = Arc::new(move |id, dir: &Path, cmd| {
                let mut net = n2.lock().expect("net lock");
                if net.host(id).is_none() {
                    net.add_host(id).expect("adding a namespace for the node");
                }
                net.enter(id, cmd).expect("entering the node's namespace");
                let mut disks = d2.lock().expect("disks lock");
                // With power cuts the tmpfs is faultfs's disk, next to the data dir.
                let disk = if use_faultfs {
                    dir.with_extension("disk")
                } else {
                    dir.to_path_buf()
                };
                if let std::collections::btree_map::Entry::Vacant(e) = disks.entry(id) {
                    e.insert(Tmpfs::mount(&disk, 64).expect("mounting the node's tmpfs"));
                }
                let mut mounts = m2.lock().expect("mounts lock");
                if use_faultfs
                    && let std::collections::btree_map::Entry::Vacant(e) = mounts.entry(id)
                {
                    let opts = faultfs::Options {
                        durable_names: vec!["node.log".into()],
                        scratch_suffixes: vec!["-shm".into()],
                    };
                    e.insert(faultfs::Mount::new(&disk, dir, opts).expect("mounting faultfs"));
                }
                if let Some(lib) = &faketime {
                    let file = clock_dir.join(format!("clock-{id}"));
                    if !file.exists() {
                        std::fs::write(&file, "+0").expect("writing the clock file");
                    }
                    // Wall clock only: timers and Instant stay real, as on a real machine.
                    cmd.env("LD_PRELOAD", lib)
                        .env("FAKETIME_TIMESTAMP_FILE", &file)
                        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                        .env("FAKETIME_CACHE_DURATION", "1")
                        .env("FAKETIME_XRESET", "1");
                }
                Net::ip_of(id).to_string()
            });
            (Some(net), Some(hub), Some(place))
        } else {
            (None, None, None)
        };
        let opts = Options {
            config: Some(streams_config()),
            // Nodes in their own namespaces listen beyond loopback: without auth and node TLS
            // they need --insecure.
            extra: if place.is_some() && !cfg.secure {
                vec!["--insecure".into()]
            } else {
                Vec::new()
            },
            security: cfg.secure.then(Security::full),
            ..Options::default()
        };
        let cluster = Cluster::start_placed(cfg.nodes, opts, place);
        let agent = client(STATUS_TIMEOUT, &cluster.auth());
        cluster.execute(&stmts(&[
            "CREATE TABLE reg (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
            "CREATE TABLE ledger (token TEXT NOT NULL)",
        ]));
        let members = cluster.nodes.iter().map(|n| Some(n.http.clone())).collect();
        let clocks = cluster
            .nodes
            .iter()
            .map(|n| (n.id, scratch.path().join(format!("clock-{}", n.id))))
            .filter(|(_, p)| p.exists())
            .collect();
        // From this (the hub's) thread: the real devices live in the hub namespace with the
        // load.
        let mut real = Vec::new();
        if let Some(elf) = &cfg.qemu_elf {
            real.push(
                RealDevice::qemu(elf, scratch.path(), QEMU_DEVICE, &cluster, cfg.verbose)
                    .unwrap_or_else(|e| panic!("starting the QEMU device: {e:#}")),
            );
        }
        if let Some(bin) = cfg.host_board.as_ref().filter(|_| cfg.isolation) {
            real.push(
                RealDevice::host(bin, HOST_DEVICE, &cluster, cfg.verbose)
                    .unwrap_or_else(|e| panic!("starting the host board: {e:#}")),
            );
        }
        Env {
            cluster,
            net,
            disks,
            mounts,
            clocks,
            _hub: hub,
            members: Arc::new(RwLock::new(members)),
            paused: Vec::new(),
            agent,
            log: Vec::new(),
            started: Instant::now(),
            verbose: cfg.verbose,
            seed: cfg.seed,
            scratch,
            crashes: Vec::new(),
            kinds: BTreeMap::new(),
            overlaps: 0,
            max_forward_s,
            real,
            hold: Duration::ZERO,
            devcut_wait: Duration::ZERO,
        }
    }

    fn note(&mut self, msg: String) {
        let line = format!("[{:7.2}s] {msg}", self.started.elapsed().as_secs_f64());
        if self.verbose {
            println!("  {line}");
        }
        self.log.push(line);
    }

    fn member_indexes(&self) -> Vec<usize> {
        let m = self.members.read().expect("members lock");
        (0..m.len()).filter(|&i| m[i].is_some()).collect()
    }

    /// The leader ([`crate::leader_of`]) among the members that are not paused (removed
    /// members are stopped), polling for up to 20 s.
    fn find_leader(&self) -> Option<usize> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(i) = self.cluster.find_leader(&self.paused) {
                return Some(i);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The node `t` names, given the step's `leader`, skipping nodes another fault of the
    /// same step already holds (`taken`).
    fn resolve(&self, t: Target, leader: Option<usize>, taken: &[usize]) -> Option<usize> {
        match t {
            Target::Leader => leader.filter(|l| !taken.contains(l)),
            Target::Follower(n) => {
                let f: Vec<usize> = self
                    .member_indexes()
                    .into_iter()
                    .filter(|&i| Some(i) != leader && !self.paused.contains(&i))
                    .filter(|i| !taken.contains(i))
                    .collect();
                (!f.is_empty()).then(|| f[n as usize % f.len()])
            }
        }
    }

    fn id(&self, i: usize) -> u64 {
        self.cluster.nodes[i].id
    }

    /// Runs one step: injects its faults (targets resolved against the leader at the start of
    /// the step, one fault per node), holds them together, heals them. Returns how many faults
    /// were injected (a fault whose target is gone is skipped and not counted).
    fn run_step(&mut self, step: &Step) -> usize {
        let leader = self.find_leader();
        self.hold = Duration::from_millis(step.hold_ms);
        let mut taken = Vec::new();
        let mut active = Vec::new();
        let mut injected = 0;
        for fault in &step.faults {
            match self.begin(fault, leader, &mut taken) {
                Some(a) => {
                    *self.kinds.entry(fault.kind()).or_default() += 1;
                    injected += 1;
                    active.extend(a);
                }
                None => self.note(format!("skipped: {fault} (no target)")),
            }
        }
        if injected > 1 {
            self.overlaps += 1;
        }
        std::thread::sleep(
            self.hold
                .saturating_sub(std::mem::take(&mut self.devcut_wait)),
        );
        active.sort_by_key(Active::rank);
        let mut restart = Vec::new();
        for a in active {
            match a {
                Active::Restart(v) => restart.extend(v),
                a => self.heal(a),
            }
        }
        self.start_again(&restart);
        injected
    }

    /// Injects `fault`; `None` when it has no target.
    fn begin(
        &mut self,
        fault: &Fault,
        leader: Option<usize>,
        taken: &mut Vec<usize>,
    ) -> Option<Vec<Active>> {
        let mut target = |env: &Env, t: Target| {
            let i = env.resolve(t, leader, taken)?;
            taken.push(i);
            Some(i)
        };
        match *fault {
            Fault::Kill(t) => {
                let i = target(self, t)?;
                self.note(format!("kill -9 {t} (node {})", self.id(i)));
                self.cluster.kill9(i);
                Some(vec![Active::Restart(vec![i])])
            }
            Fault::Pause(t) => {
                let i = target(self, t)?;
                self.note(format!("SIGSTOP {t} (node {})", self.id(i)));
                signal(&self.cluster, i, libc::SIGSTOP);
                self.paused.push(i);
                Some(vec![Active::Resume(i)])
            }
            Fault::Isolate(t) => {
                let i = target(self, t)?;
                let id = self.id(i);
                let others: Vec<u64> = self
                    .member_indexes()
                    .into_iter()
                    .map(|j| self.id(j))
                    .filter(|&j| j != id)
                    .collect();
                self.note(format!("isolate {t} (node {id}) from {others:?}"));
                self.partition(&[vec![id], others])?;
                Some(vec![Active::Partition])
            }
            Fault::Split { leader_in_minority } => {
                let mut ids: Vec<u64> = self
                    .member_indexes()
                    .into_iter()
                    .map(|j| self.id(j))
                    .collect();
                let lid = leader.map(|l| self.id(l));
                // Leader first when it belongs in the minority, last otherwise.
                ids.sort_by_key(|&id| (Some(id) == lid) != leader_in_minority);
                let minority = ids.len().saturating_sub(1) / 2;
                let (a, b) = ids.split_at(minority.max(1));
                self.note(format!(
                    "partition {a:?} | {b:?} (leader {lid:?} in {})",
                    if leader_in_minority {
                        "minority"
                    } else {
                        "majority"
                    }
                ));
                self.partition(&[a.to_vec(), b.to_vec()])?;
                Some(vec![Active::Partition])
            }
            Fault::Loss { percent } => {
                let net = self.net.clone()?;
                self.note(format!("{percent}% packet loss between nodes"));
                net.lock()
                    .expect("net")
                    .set_loss(percent)
                    .expect("iptables loss");
                Some(vec![Active::Loss])
            }
            Fault::DiskFull(t) => {
                let i = target(self, t)?;
                let id = self.id(i);
                let filled = {
                    let disks = self.disks.lock().expect("disks");
                    disks.get(&id)?.fill().expect("filling the tmpfs")
                };
                self.note(format!(
                    "disk full on {t} (node {id}, {} KiB ballast)",
                    filled >> 10
                ));
                Some(vec![Active::Disk(i)])
            }
            Fault::ReplaceMember(t) => {
                let i = target(self, t)?;
                self.replace_member(t, i).then(Vec::new)
            }
            Fault::PowerCut { scope, tear } => {
                let nodes: Vec<usize> = match scope {
                    CutScope::One(t) => vec![target(self, t)?],
                    CutScope::Minority | CutScope::All => {
                        let members = self.member_indexes();
                        let n = match scope {
                            CutScope::All => members.len(),
                            _ => (members.len().saturating_sub(1) / 2).max(1),
                        };
                        // The leader first, then followers in order.
                        let mut order: Vec<usize> = leader.into_iter().collect();
                        order.extend(members.into_iter().filter(|&m| Some(m) != leader));
                        order.retain(|i| !taken.contains(i) && !self.paused.contains(i));
                        order.truncate(n);
                        taken.extend(&order);
                        order
                    }
                };
                if nodes.is_empty() {
                    return None;
                }
                // Every process dies before any disk loses its cache, as when the power goes.
                for &i in &nodes {
                    self.cluster.kill9(i);
                }
                for &i in &nodes {
                    let id = self.id(i);
                    let tear = tear.then_some(self.seed ^ (id << 32) ^ self.log.len() as u64);
                    let cut = self
                        .mounts
                        .lock()
                        .expect("mounts")
                        .get_mut(&id)
                        .map(|m| m.power_cut(tear).expect("remounting faultfs"));
                    let what = match cut {
                        None => "no faultfs: plain kill -9".to_string(),
                        Some(c) => format!(
                            "{} unsynced bytes in {} files lost{}",
                            c.bytes,
                            c.files,
                            c.torn.map_or(String::new(), |(p, off, kept, of)| format!(
                                ", torn write {}@{off}: {kept} of {of} bytes landed",
                                p.file_name().unwrap_or_default().to_string_lossy()
                            ))
                        ),
                    };
                    self.note(format!("power cut on node {id} ({scope}): {what}"));
                }
                Some(vec![Active::Restart(nodes)])
            }
            Fault::Clock { target: t, skew } => {
                let i = target(self, t)?;
                let id = self.id(i);
                let file = self.clocks.get(&id)?.clone();
                std::fs::write(&file, skew.faketime()).expect("writing the clock file");
                self.note(format!("clock of {t} (node {id}) {skew}"));
                Some(vec![Active::Clock(i)])
            }
            Fault::DeviceCut => {
                if self.real.is_empty() {
                    return None;
                }
                let started = Instant::now();
                for i in 0..self.real.len() {
                    let hold = self.hold.saturating_sub(started.elapsed());
                    let what = self.real[i].power_cut(hold);
                    self.note(what);
                }
                self.devcut_wait = started.elapsed();
                Some(vec![Active::DeviceBoot])
            }
        }
    }

    /// Removes a fault begun by [`Env::begin`] (restarts are [`Env::start_again`]'s).
    fn heal(&mut self, a: Active) {
        match a {
            Active::Restart(v) => self.start_again(&v),
            Active::Resume(i) => {
                signal(&self.cluster, i, libc::SIGCONT);
                self.paused.retain(|&p| p != i);
                self.note(format!("SIGCONT node {}", self.id(i)));
            }
            Active::Partition => {
                if let Some(net) = &self.net {
                    net.lock().expect("net").heal_partition().expect("iptables");
                }
                self.note("partition healed".into());
            }
            Active::Loss => {
                if let Some(net) = &self.net {
                    net.lock().expect("net").clear_loss().expect("iptables");
                }
                self.note("loss cleared".into());
            }
            Active::Disk(i) => {
                let id = self.id(i);
                if let Some(d) = self.disks.lock().expect("disks").get(&id) {
                    d.free().expect("freeing the tmpfs");
                }
                self.note(format!("disk freed on node {id}"));
                self.revive(i);
            }
            Active::Clock(i) => {
                let id = self.id(i);
                if let Some(f) = self.clocks.get(&id) {
                    std::fs::write(f, "+0").expect("writing the clock file");
                }
                self.note(format!("clock of node {id} set right"));
            }
            Active::DeviceBoot => {
                for i in 0..self.real.len() {
                    let d = &mut self.real[i];
                    d.boot()
                        .unwrap_or_else(|e| panic!("booting the {} device again: {e:#}", d.kind));
                    let what = format!("{} device {} boots again", d.kind, d.id);
                    self.note(what);
                }
            }
        }
    }

    /// Starts killed or power-cut nodes again and waits until they are ready. A node that
    /// cannot start (or dies starting) is a crash: recorded with its log tail and left out of
    /// the rest of the run, so the run still ends with checks instead of a harness panic.
    fn start_again(&mut self, nodes: &[usize]) {
        for &i in nodes {
            let id = self.id(i);
            self.note(format!("restart node {id}"));
            let launched =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.cluster.relaunch(i)));
            if launched.is_err() {
                self.lost_node(i, "did not start again");
            }
        }
        for &i in nodes {
            if !self.cluster.nodes[i].is_started() {
                continue;
            }
            let deadline = Instant::now() + crate::TIMEOUT;
            loop {
                if !self.cluster.nodes[i].is_running() {
                    self.lost_node(i, "exited while starting again");
                    break;
                }
                if self.cluster.nodes[i].is_ready() {
                    break;
                }
                if Instant::now() > deadline {
                    self.note(format!(
                        "node {} not ready {} s after its restart",
                        self.id(i),
                        crate::TIMEOUT.as_secs()
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Records node `i` as crashed and takes it out of the membership the run checks.
    fn lost_node(&mut self, i: usize, why: &str) {
        let id = self.id(i);
        let log = self.cluster.nodes[i].log();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        self.note(format!("node {id} CRASHED: {why}"));
        self.crashes
            .push(format!("node {id} {why}:\n{}", tail.join("\n")));
        self.cluster.kill9(i);
        self.members.write().expect("members")[i] = None;
    }

    fn replace_member(&mut self, t: Target, i: usize) -> bool {
        if self.member_indexes().len() < 3 {
            return false;
        }
        let id = self.id(i);
        let Some(l) = self.find_leader() else {
            return false;
        };
        self.note(format!("remove {t} (node {id}) from the membership"));
        let url = self.cluster.nodes[l].url("/remove");
        let removed = poll(Duration::from_secs(30), "DELETE /remove to succeed", || {
            let r = self.agent.delete(&url, &json!({ "id": id }));
            (r.status != 0).then_some(r.status == 200)
        });
        if !removed {
            return false;
        }
        self.members.write().expect("members")[i] = None;
        self.cluster.kill9(i);
        let j = self.cluster.add_node(&[]);
        let http = self.cluster.nodes[j].http.clone();
        let mut m = self.members.write().expect("members");
        m.resize(j + 1, None);
        m[j] = Some(http);
        drop(m);
        let new_id = self.id(j);
        let clock = self.scratch.path().join(format!("clock-{new_id}"));
        if clock.exists() {
            self.clocks.insert(new_id, clock);
        }
        self.note(format!("node {new_id} joined"));
        true
    }

    /// Installs a partition; `None` without a private network.
    fn partition(&mut self, groups: &[Vec<u64>]) -> Option<()> {
        let net = self.net.clone()?;
        net.lock()
            .expect("net")
            .partition(groups)
            .expect("iptables partition");
        Some(())
    }

    /// Whether node `i`'s process runs and its Raft has not stopped (waits up to 10 s for an
    /// answer, so a busy node is not mistaken for a dead one).
    fn healthy(&mut self, i: usize) -> bool {
        if !self.cluster.nodes[i].is_running() {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(s) = self.cluster.nodes[i].status_within(STATUS_TIMEOUT) {
                return s["raft"]["running"] != false;
            }
            if !self.cluster.nodes[i].is_running() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// A node that stopped during a fault that may stop it (a full disk) is started again.
    fn revive(&mut self, i: usize) {
        if !self.healthy(i) {
            let id = self.id(i);
            self.note(format!(
                "node {id} stopped after its disk filled (expected); restarting it"
            ));
            self.cluster.kill9(i);
            self.start_again(&[i]);
        }
    }

    /// Members that stopped although no fault should have stopped them: a crash. Each is
    /// recorded with its log tail and restarted so the run can finish and check the data.
    fn check_crashes(&mut self) {
        for i in self.member_indexes() {
            if self.paused.contains(&i) || self.healthy(i) {
                continue;
            }
            let id = self.id(i);
            let log = self.cluster.nodes[i].log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            self.note(format!("node {id} CRASHED (no fault stops it now)"));
            self.crashes.push(format!(
                "node {id} stopped on its own:\n{}",
                tail.join("\n")
            ));
            self.cluster.kill9(i);
            self.start_again(&[i]);
        }
    }

    /// Removes every fault still in place and restarts whatever is down.
    fn heal_all(&mut self) {
        if let Some(net) = &self.net {
            net.lock().expect("net").heal().expect("iptables heal");
        }
        for i in std::mem::take(&mut self.paused) {
            signal(&self.cluster, i, libc::SIGCONT);
        }
        for d in self.disks.lock().expect("disks").values() {
            d.free().expect("freeing a tmpfs");
        }
        for f in self.clocks.values() {
            std::fs::write(f, "+0").expect("writing a clock file");
        }
        self.check_crashes();
    }
}

/// Runs one schedule; never panics on a check failure (the outcome says), but does on a
/// harness failure (a node that cannot start), with the nodes' logs.
pub fn run(cfg: &Config) -> Outcome {
    let caps = Capabilities {
        netns: cfg.isolation,
        tmpfs: cfg.isolation,
        faultfs: cfg.isolation && faultfs_available(),
        faketime: faketime_lib().is_some(),
    };
    let mut steps = schedule(cfg.seed, cfg.steps, caps, cfg.focus);
    if cfg.qemu_elf.is_some() || cfg.host_board.is_some() && cfg.isolation {
        crate::nemesis::add_device_cuts(&mut steps, cfg.seed, 1);
    }
    let mut out = Outcome {
        seed: cfg.seed,
        ..Outcome::default()
    };
    if cfg.verbose {
        println!(
            "schedule seed={} ({} nodes, {}):",
            cfg.seed,
            cfg.nodes,
            if cfg.isolation {
                "namespaces + tmpfs"
            } else {
                "loopback"
            }
        );
        for s in &steps {
            println!("  - {s}");
        }
    }
    let mut env = Env::start(cfg, &steps);
    let wall_start = now_ms();
    let load = Load {
        seed: cfg.seed,
        keys: cfg.keys,
        members: env.members.clone(),
        rec: Recorder::new(),
        ledger: Ledger::default(),
        stop: Arc::new(AtomicBool::new(false)),
        acked: Arc::default(),
        read_level: cfg.read_level.clone(),
        epoch: Instant::now(),
        auth: env.cluster.auth(),
        errors: Arc::default(),
    };
    let (rec, ledger, stop, acked) = (
        load.rec.clone(),
        load.ledger.clone(),
        load.stop.clone(),
        load.acked.clone(),
    );
    let fleet = (cfg.devices > 0 && sim_available())
        .then(|| Fleet::start(&env, cfg.devices, cfg.device_rate));
    if fleet.is_none() {
        out.notes
            .push("no device load (devices=0 or this cairn has no `sim`)".into());
    }
    let clients: Vec<_> = (0..cfg.clients as u32)
        .map(|p| {
            let load = load.clone();
            std::thread::spawn(move || client_loop(p, load))
        })
        .collect();

    let _stop_on_panic = StopOnDrop(stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    for step in &steps {
        env.check_crashes();
        out.faults += env.run_step(step);
        std::thread::sleep(Duration::from_millis(step.gap_ms));
    }
    out.kinds = env.kinds.clone();
    out.overlaps = env.overlaps;
    env.heal_all();
    // Let the load run on the healed cluster for a moment so it commits again.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let devices = fleet.map(Fleet::stop);
    let drained: Vec<_> = env.real.iter_mut().map(|d| d.drain(REAL_DRAIN)).collect();
    env.note("load stopped, everything healed".into());

    env.cluster.wait_converged();
    let leader = env.cluster.leader();
    let final_auth = env.cluster.auth();
    let final_agent = client(Duration::from_secs(30), &final_auth);
    for k in 0..cfg.keys {
        let key = format!("k{k}");
        let p = rec.invoke(u32::MAX, &key, Call::Read);
        let ret = read_register(
            &final_agent,
            &final_auth,
            &env.cluster.nodes[leader].http,
            &key,
            "linearizable",
            None,
        );
        rec.complete(p, ret);
    }
    env.cluster.wait_converged();

    // Replicas identical.
    let members = env.member_indexes();
    let sums: Vec<(u64, u64)> = members
        .iter()
        .map(|&i| (env.id(i), env.cluster.nodes[i].checksum()))
        .collect();
    let reference = sums
        .iter()
        .find(|(id, _)| *id == env.id(leader))
        .map(|s| s.1);
    out.diverged = sums.iter().filter(|s| Some(s.1) != reference).count();

    // Every acknowledged token exactly once on every replica, nothing never pushed.
    let mut stored = BTreeMap::new();
    let mut failures = Vec::new();
    for &i in &members {
        let tokens: Vec<String> = rows_or_none(&env.cluster.nodes[i], "SELECT token FROM ledger")
            .into_iter()
            .map(|r| r[0].as_str().unwrap_or_default().to_string())
            .collect();
        let audit = ledger.audit(&tokens);
        out.verified += audit.acked;
        out.lost = out.lost.max(audit.lost.len());
        out.duplicated = out.duplicated.max(audit.duplicated.len());
        out.phantom = out.phantom.max(audit.phantom.len());
        if !audit.is_clean() {
            failures.push(format!(
                "node {}: lost {:?} duplicated {:?} never pushed {:?}",
                env.id(i),
                audit.lost,
                audit.duplicated,
                audit.phantom
            ));
        }
        stored.insert(env.id(i), tokens);
    }
    match &devices {
        None => {}
        Some(Err(e)) => failures.push(format!("device fleet: {e}")),
        Some(Ok((reports, summary))) => {
            out.notes.push(summary.clone());
            out.device_acked = reports.iter().map(|r| r.acked).sum();
            for &i in &members {
                let rows: Vec<(u64, u64)> =
                    rows_or_none(&env.cluster.nodes[i], "SELECT device_id, k FROM readings")
                        .into_iter()
                        .map(|r| (r[0].as_u64().unwrap_or(0), r[1].as_u64().unwrap_or(0)))
                        .collect();
                let (lost, dup, phantom) = audit_devices(reports, &rows);
                out.verified += out.device_acked;
                out.lost = out.lost.max(lost.len());
                out.duplicated = out.duplicated.max(dup.len());
                out.phantom = out.phantom.max(phantom.len());
                if !(lost.is_empty() && dup.is_empty() && phantom.is_empty()) {
                    let sample = |v: &[String]| v.iter().take(10).cloned().collect::<Vec<_>>();
                    failures.push(format!(
                        "node {} device records: {} lost {:?}, {} duplicated {:?}, {} never \
                         pushed {:?}",
                        env.id(i),
                        lost.len(),
                        sample(&lost),
                        dup.len(),
                        sample(&dup),
                        phantom.len(),
                        sample(&phantom)
                    ));
                }
            }
        }
    }
    out.real_devices = env.real.len();
    for (d, drained) in env.real.iter().zip(&drained) {
        let boots = d.boots();
        if let Err(e) = drained {
            failures.push(e.clone());
        }
        let mut acked = 0;
        for &i in &members {
            let rows = real_rows(&env.cluster.nodes[i], d.id);
            let a = real_device::audit(d.id, &boots, &rows);
            acked = a.acked;
            out.verified += a.acked;
            out.lost = out.lost.max(a.lost.len());
            out.duplicated = out.duplicated.max(a.duplicated.len());
            out.phantom = out.phantom.max(a.phantom.len());
            if !(a.lost.is_empty() && a.duplicated.is_empty() && a.phantom.is_empty()) {
                failures.push(format!(
                    "node {} {} device records: lost {:?}, duplicated {:?}, not from its \
                     sensor {:?}",
                    env.id(i),
                    d.kind,
                    a.lost,
                    a.duplicated,
                    a.phantom.iter().take(10).collect::<Vec<_>>()
                ));
            }
            if i == leader {
                out.notes.push(format!(
                    "{} device {}: {} boots (restored from flash: {:?}), {} of its records \
                     acknowledged, {} stored{}",
                    d.kind,
                    d.id,
                    boots.len(),
                    boots.iter().map(|b| b.restored).collect::<Vec<_>>(),
                    a.acked,
                    a.stored,
                    drained.as_ref().map_or(String::new(), |t| format!(
                        ", drained in {:.1} s",
                        t.as_secs_f64()
                    ))
                ));
            }
        }
        out.device_acked += acked;
    }
    // Record times: never below the device's previous record, never outside the run (plus
    // the schedule's largest forward clock jump).
    if devices.as_ref().is_some_and(|d| d.is_ok()) {
        let rows: Vec<(u64, u64, i64)> = rows_or_none(
            &env.cluster.nodes[leader],
            "SELECT device_id, seq, time_ms FROM readings ORDER BY device_id, seq",
        )
        .into_iter()
        .map(|r| {
            let n = |j: usize| r[j].as_i64().unwrap_or(i64::MIN);
            (n(0) as u64, n(1) as u64, n(2))
        })
        .collect();
        let lo = wall_start - 60_000;
        let hi = now_ms() + 60_000 + env.max_forward_s as i64 * 1000;
        let bad = audit_times(&rows, lo, hi);
        out.misordered = bad.len();
        if !bad.is_empty() {
            failures.push(format!(
                "{} record times out of order or out of range (run {lo}..{hi} ms): {:?}",
                bad.len(),
                bad.iter().take(10).collect::<Vec<_>>()
            ));
        }
    }
    out.crashed = env.crashes.len();
    failures.extend(env.crashes.iter().cloned());
    if out.diverged > 0 {
        failures.push(format!("replicas differ (node id, checksum): {sums:?}"));
    }

    let ops = rec.ops();
    out.ops = ops.len();
    out.acked = *acked.lock().expect("acked") + out.device_acked;
    match linearizability::check(&ops) {
        Verdict::Linearizable => {}
        v @ Verdict::NotLinearizable { .. } => {
            out.nonlinearizable = 1;
            failures.push(v.to_string());
        }
        v @ Verdict::Unknown { .. } => {
            out.undecided = 1;
            failures.push(v.to_string());
        }
    }
    out.notes.extend(
        env.log
            .iter()
            .filter(|l| l.contains("stopped after its disk filled"))
            .cloned(),
    );
    for (e, n) in load.errors.lock().expect("errors").iter() {
        out.notes.push(format!("{n} x {e}"));
    }

    if !failures.is_empty() {
        let run = Run {
            seed: cfg.seed,
            schedule: env.log.clone(),
            ops,
            pushed: ledger.entries(),
            stored,
        };
        let path = cfg
            .out_dir
            .join(format!("cairn-faults-seed-{}.json", cfg.seed));
        let saved = std::fs::create_dir_all(&cfg.out_dir)
            .and_then(|_| std::fs::write(&path, serde_json::to_vec(&run).unwrap_or_default()));
        out.failure = Some(format!(
            "FAILED seed={} (replay: {}; recheck: cairn-faults --check {}{})\nwhat happened:\n  \
             {}\n{}",
            cfg.seed,
            cfg.replay(),
            path.display(),
            if saved.is_err() { " (not saved)" } else { "" },
            env.log.join("\n  "),
            failures.join("\n")
        ));
    }
    out
}

/// Re-runs the checkers on a saved [`Run`].
pub fn recheck(run: &Run) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, tokens) in &run.stored {
        let a = crate::history::audit(&run.pushed, tokens);
        if !a.is_clean() {
            problems.push(format!("node {id}: {a:?}"));
        }
    }
    let v = linearizability::check(&run.ops);
    if !v.is_linearizable() {
        problems.push(v.to_string());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_audit_times_finds_records_going_back_and_out_of_range() {
        let ok = [(1, 1, 100), (1, 2, 100), (1, 3, 150), (2, 1, 90)];
        assert!(audit_times(&ok, 50, 200).is_empty());
        let bad = [(1, 1, 100), (1, 2, 80), (2, 1, 300)];
        assert_eq!(
            audit_times(&bad, 50, 200),
            [
                "device 1 seq 2 at 80 ms, 20 ms before seq 1",
                "device 2 seq 1 at 300 ms: outside the run"
            ]
        );
    }

    #[test]
    fn test_audit_devices_finds_lost_duplicated_and_never_pushed() {
        let reports = [
            DeviceReport {
                id: 1,
                pushed: 5,
                acked: 3,
            },
            DeviceReport {
                id: 2,
                pushed: 2,
                acked: 2,
            },
        ];
        // Device 1: k=1..4 stored (4 pushed but not acked yet is fine), device 2 complete.
        let ok = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)];
        let (l, d, p) = audit_devices(&reports, &ok);
        assert!(l.is_empty() && d.is_empty() && p.is_empty());
        // k=2 of device 1 missing, k=1 of device 2 twice, k=9 never pushed, device 7 unknown.
        let bad = [(1, 1), (1, 3), (1, 9), (2, 1), (2, 1), (2, 2), (7, 1)];
        let (l, d, p) = audit_devices(&reports, &bad);
        assert_eq!(l, ["device 1 k=2"]);
        assert_eq!(d, ["device 2 k=1 x2"]);
        assert_eq!(p, ["device 1 k=9", "device 7 k=1"]);
    }
}
