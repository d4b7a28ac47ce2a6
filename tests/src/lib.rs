//! The test harness: everything that starts, drives and checks real `cairn` processes. The
//! end-to-end tests (`tests/tests`), the fault suite (`cairn-faults`) and xtask's bench and
//! QEMU end-to-end all use it; there is no second launcher, client or leader lookup.
//!
//! - [`cluster`]: [`Cluster`] starts real `cairn node` processes on ports the OS picks
//!   (`127.0.0.1:0`; each node writes the addresses it bound to `DATA_DIR/addrs.json`), in a
//!   temp dir removed on drop (or a kept one), where every process is killed too. Restarts
//!   reuse the node's ports and data. Faults are real signals: [`Cluster::kill9`] sends
//!   `SIGKILL`, [`Cluster::terminate`] `SIGTERM`. [`leader_of`] is the one definition of
//!   "the leader". [`cairn_bin`] builds the daemon once per process or takes `CAIRN_BIN`.
//! - [`http`]: the one HTTP client ([`Client`], [`get`], [`post`], [`delete`], [`agent`]).
//! - [`device`] and [`fleet`]: the protocol-level test device (frames, keys, registration,
//!   `cairn sim`) and a fleet of them, one thread each, for load.
//! - [`faults`] with [`nemesis`], [`netns`], [`tmpfs`], [`history`] and [`linearizability`]:
//!   seeded fault schedules and their checkers; [`real_device`] puts the QEMU firmware image
//!   and the host board on TAP among their devices.
//! - [`qemu`]: the one way of booting the QEMU firmware image, provisioning its flash file,
//!   reading its defmt log and recomputing its sensor's records (xtask's `qemu` uses it too).
//! - [`release`]: the previous release (v0.1.0) checked out by commit and built once under
//!   `target/prev/`, for the rolling-upgrade test.
//! - [`servers`]: real export destinations (PostgreSQL, NATS JetStream, mosquitto) and a
//!   webhook receiver, started per test.
//! - Nothing sleeps for a fixed time: [`poll`] retries until a condition holds or a timeout
//!   names what never happened.

pub mod cluster;
pub mod device;
pub mod faults;
pub mod fleet;
pub mod history;
pub mod http;
pub mod linearizability;
pub mod nemesis;
pub mod netns;
pub mod qemu;
pub mod real_device;
pub mod release;
pub mod servers;
pub mod tmpfs;

use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

pub use cluster::{
    ADMIN, Cluster, JOINER, Launcher, Node, Options, Place, Security, View, cairn_bin, leader_of,
};
pub use http::{Auth, Client, Reply, agent, delete, get, post};

/// How long start-up, elections and catch-up may take before a test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Raft timing (a config fragment) for tests that assert who leads or that the term stays:
/// with the defaults (elections after 150–300 ms of silence) a load spike on a 2-core machine
/// alone can elect a new leader.
pub const SLOW_ELECTIONS: &str =
    "heartbeat_ms = 100\nelection_timeout_min_ms = 1500\nelection_timeout_max_ms = 3000\n";

/// Retries `f` every 20 ms until it returns `Some`, panicking after `timeout` with `what`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `["CREATE TABLE ...", ...]` as rqlite JSON.
pub fn stmts(sqls: &[&str]) -> Json {
    json!(sqls)
}
