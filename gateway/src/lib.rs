//! Cairn gateway: a Raft quorum of SQLite replicas behind an rqlite-compatible HTTP API.
//!
//! Module map (see `gateway/DESIGN.md` for the why):
//! - [`raft_types`]: the openraft type configuration (node ids, node addresses, entries).
//! - [`command`]: the log command enum and the single place that dispatches its apply code.
//! - [`sql`]: executing rqlite-shaped SQL requests on a connection; rewriting non-determinism.
//! - [`log_store`]: Raft log, vote and committed index in their own SQLite file.
//! - [`state_machine`]: the SQLite database the log is applied to, and its snapshots.
//! - [`network`]: Raft RPCs between gateways over HTTP with postcard bodies.
//! - [`group_commit`]: the bounded queue that coalesces concurrent writes.
//! - [`api`]: the rqlite-compatible HTTP API and the Raft RPC endpoints.
//! - [`node`]: wiring it all together for `cairn node`.
//! - [`config`]: command-line flags and the TOML file.
//! - [`ingress`]: the device port: connections, grouping into Raft entries, forwarding.
//! - [`registry`]: registered devices, their keys and high-water seqs.
//! - [`sandbox`]: what user SQL may do, and making it deterministic on every replica.
//! - [`schema`]: the `[[stream]]` tables device records are stored in.
//! - [`sim`]: `cairn sim`, a fleet of host devices running the real firmware client.

pub mod api;
pub mod cli;
pub mod command;
pub mod config;
pub mod group_commit;
pub mod ingress;
pub mod log_store;
pub mod network;
pub mod node;
pub mod raft_types;
pub mod registry;
pub mod sandbox;
pub mod schema;
pub mod sim;
pub mod sql;
pub mod state_machine;
