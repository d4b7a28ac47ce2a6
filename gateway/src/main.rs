//! `cairn`: the gateway daemon and its tools. See `cairn --help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use cairn_gateway::cli;
use cairn_gateway::cli::device as admin;
use cairn_gateway::config::{LogFormat, NodeArgs, NodeConfig};

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Raft quorum of SQLite replicas with an rqlite-compatible HTTP API"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one gateway.
    Node(Box<NodeArgs>),
    /// Run a local three-node cluster on loopback, data under ./cairn-data.
    Dev {
        #[arg(long, default_value = "cairn-data")]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// A `cairn node` config file whose `[[stream]]` tables and `undeclared_streams` the
        /// three nodes use (default: built-in tables, printed at start).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Interactive SQL shell, like the rqlite shell.
    Shell {
        #[command(flatten)]
        conn: cli::ConnArgs,
    },
    /// Download the database (a SQLite file) to FILE; `backup list --from URL` shows a
    /// continuous backup.
    #[command(args_conflicts_with_subcommands = true)]
    Backup {
        #[command(subcommand)]
        command: Option<BackupCmd>,
        #[arg(required = true)]
        file: Option<PathBuf>,
        #[command(flatten)]
        conn: cli::ConnArgs,
    },
    /// After a lost majority: force a new membership on a stopped surviving node's log (the
    /// command form of rqlite's peers.json). Prints the last log index it keeps.
    Recover {
        /// The stopped node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The new membership's voters: ID=RAFTADDR,... (this node among them).
        #[arg(long)]
        members: String,
        /// This node's id (default: found from the data dir's addrs.json).
        #[arg(long)]
        node_id: Option<u64>,
    },
    /// Replace the database with FILE (a SQLite file or SQL text), or rebuild a data dir from
    /// a continuous backup (`--from URL --data-dir DIR [--to-time T | --to-index N]`).
    Restore {
        #[arg(required_unless_present = "from", conflicts_with = "from")]
        file: Option<PathBuf>,
        #[command(flatten)]
        conn: cli::ConnArgs,
        #[command(flatten)]
        source: Option<cli::backup::BackupSource>,
        /// The new data directory (must be empty or absent).
        #[arg(long, requires = "from")]
        data_dir: Option<PathBuf>,
        /// Stop after the last entry stamped at or before this time (RFC 3339).
        #[arg(long, requires = "from", conflicts_with = "to_index")]
        to_time: Option<String>,
        /// Stop after this log index.
        #[arg(long, requires = "from")]
        to_index: Option<u64>,
    },
    /// Run simulated devices (the real firmware client) against gateways' device ports.
    #[cfg(feature = "sim")]
    Sim(cairn_sim::SimArgs),
    /// Manage the devices allowed on the device port.
    Device {
        #[command(subcommand)]
        command: DeviceCmd,
        #[command(flatten)]
        conn: cli::ConnArgs,
    },
    /// Stream definitions and records that did not fit them (`dead_letter`).
    Streams {
        #[command(subcommand)]
        command: StreamsCmd,
        #[command(flatten)]
        conn: cli::ConnArgs,
    },
    /// Export destinations (`[[export]]`).
    Export {
        #[command(subcommand)]
        command: ExportCmd,
        #[command(flatten)]
        conn: cli::ConnArgs,
    },
    /// Cluster CA and node/client certificates for TLS.
    Certs {
        #[command(subcommand)]
        command: cairn_gateway::security::certs::CertsCmd,
    },
}

#[derive(Subcommand)]
enum BackupCmd {
    /// What a continuous backup holds: snapshots, covered index and time ranges, sizes.
    List(cli::backup::BackupSource),
}

#[derive(Subcommand)]
enum ExportCmd {
    /// Forget a destination removed from every gateway's config: its cursor stops holding
    /// the export journal (and, with `keep_unexported`, stream rows) back. Needs `all`.
    Forget {
        /// The destination's `name`.
        name: String,
    },
}

#[derive(Subcommand)]
enum StreamsCmd {
    /// This node's configured and the replicated stream definitions, and dead-letter rows.
    Show,
    /// Have the node read its config file's `[[stream]]` tables again and propose them (like
    /// SIGHUP).
    Reload,
    /// Move dead-letter rows that fit the replicated definitions into their stream's table.
    Replay {
        #[arg(long)]
        stream: u16,
        /// Only this device's rows (default: every device's).
        #[arg(long)]
        device: Option<u64>,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Register a device and its pre-shared key (or replace its key).
    Add {
        #[arg(long)]
        id: u64,
        /// 32-byte key as 64 hex digits.
        #[arg(long, required_unless_present = "generate")]
        key: Option<String>,
        /// Generate the key here from the operating system's randomness; it is printed once
        /// and written to --provision-out, and no command reads it back.
        #[arg(long, conflicts_with = "key")]
        generate: bool,
        /// Also write the device's settings region (id, key, gateways) to FILE, a new file:
        /// flash it at the board's settings offset (QEMU board: `flash=FILE`).
        #[arg(long, value_name = "FILE", requires = "gateways")]
        provision_out: Option<PathBuf>,
        /// A gateway's device address as the device reaches it, in the order it tries them
        /// (1 to 4; with --provision-out).
        #[arg(long = "gateway", value_name = "IP:PORT", requires = "provision_out")]
        gateways: Vec<std::net::SocketAddrV4>,
        /// 1: a protocol 1 device, accepted only by gateways started with
        /// --accept-protocol-1 (default 2).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        protocol: Option<u8>,
    },
    /// Revoke a device: every gateway closes its open connection and refuses its Hellos
    /// (records it already had acknowledged stay). A new key (`rekey`, `add`) lifts it.
    Revoke {
        #[arg(long)]
        id: u64,
    },
    /// Install a new key for a device; its current key stays accepted for the grace window.
    /// With --status, show when it was rekeyed and when it was first seen with the new key.
    Rekey {
        #[arg(long)]
        id: u64,
        /// The new 32-byte key as 64 hex digits.
        #[arg(long, required_unless_present_any = ["generate", "status"], conflicts_with = "status")]
        key: Option<String>,
        /// Generate the new key here; it is printed once and written to --provision-out.
        #[arg(long, conflicts_with_all = ["key", "status"])]
        generate: bool,
        /// How long the current key stays accepted, in seconds.
        #[arg(long, default_value_t = 86_400, value_name = "SECONDS")]
        grace_secs: u64,
        /// Also write the device's settings region with the new key to FILE, a new file.
        #[arg(long, value_name = "FILE", requires = "gateways")]
        provision_out: Option<PathBuf>,
        #[arg(long = "gateway", value_name = "IP:PORT", requires = "provision_out")]
        gateways: Vec<std::net::SocketAddrV4>,
        /// Show the device's key rotation instead of changing it.
        #[arg(long)]
        status: bool,
    },
    /// Write a device's settings region (id, key, gateways) to a new FILE without contacting
    /// any gateway (register the same key with `cairn device add`).
    Provision {
        #[arg(long)]
        id: u64,
        /// 32-byte key as 64 hex digits.
        #[arg(long)]
        key: String,
        /// A gateway's device address as the device reaches it, in the order it tries them
        /// (1 to 4).
        #[arg(long = "gateway", value_name = "IP:PORT", required = true)]
        gateways: Vec<std::net::SocketAddrV4>,
        /// The settings file to create.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// List registered devices with their committed high-water seq.
    List,
    /// Forget a device's key (its records stay).
    Remove {
        #[arg(long)]
        id: u64,
    },
    /// Set a device's committed high-water seq (a logged admin action): the device resumes at
    /// SEQ + 1. Refused while stored records of the device lie above SEQ.
    Reset {
        #[arg(long)]
        id: u64,
        #[arg(long, default_value_t = 0)]
        seq: u64,
    },
}

fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    let result = match args.command {
        Cmd::Node(a) => NodeConfig::resolve(&a).and_then(|c| {
            cli::init_logging(c.log_format, &c.log_level);
            cli::runtime()?.block_on(cairn_gateway::daemon::run(c, cli::shutdown_signal()))
        }),
        Cmd::Dev {
            data_dir,
            log_format,
            config,
        } => {
            cli::init_logging(log_format, "info");
            cli::runtime().and_then(|rt| rt.block_on(cli::dev(data_dir, config, dev_fleet)))
        }
        Cmd::Shell { conn } => cli::shell(&conn),
        Cmd::Recover {
            data_dir,
            members,
            node_id,
        } => cli::recover::run(&data_dir, &members, node_id),
        Cmd::Backup {
            command: Some(BackupCmd::List(src)),
            ..
        } => cli::backup::list(&src),
        Cmd::Backup { file, conn, .. } => cli::Api::connect(&conn)
            .and_then(|a| cli::backup(&a, &file.expect("clap requires FILE without a subcommand"))),
        Cmd::Restore {
            source: Some(src),
            data_dir,
            to_time,
            to_index,
            ..
        } => match data_dir {
            Some(dir) => cli::backup::restore_from(&src, &dir, to_time.as_deref(), to_index),
            None => Err(anyhow::anyhow!("restore --from needs --data-dir DIR")),
        },
        Cmd::Restore { file, conn, .. } => {
            let file = file.expect("clap requires FILE without --from");
            cli::Api::connect(&conn).and_then(|a| cli::restore(&a, &file))
        }
        #[cfg(feature = "sim")]
        Cmd::Sim(a) => cairn_sim::run(a, cli::shutdown_signal()),
        Cmd::Device { command, conn } => cli::Api::connect(&conn).and_then(|api| match command {
            DeviceCmd::Add {
                id,
                key,
                generate,
                provision_out,
                gateways,
                protocol,
            } => {
                let (key, provision) = admin::key_flags(key, generate, provision_out, gateways);
                admin::add(&api, id, key, provision, protocol)
            }
            DeviceCmd::Revoke { id } => admin::revoke(&api, id),
            DeviceCmd::Rekey {
                id, status: true, ..
            } => admin::rekey_status(&api, id),
            DeviceCmd::Rekey {
                id,
                key,
                generate,
                grace_secs,
                provision_out,
                gateways,
                status: false,
            } => {
                let (key, provision) = admin::key_flags(key, generate, provision_out, gateways);
                admin::rekey(&api, id, key, provision, grace_secs)
            }
            DeviceCmd::Provision {
                id,
                key,
                gateways,
                out,
            } => admin::provision(id, &key, &gateways, &out),
            DeviceCmd::List => admin::list(&api),
            DeviceCmd::Remove { id } => admin::remove(&api, id),
            DeviceCmd::Reset { id, seq } => admin::reset(&api, id, seq),
        }),
        Cmd::Streams { command, conn } => cli::Api::connect(&conn).and_then(|api| match command {
            StreamsCmd::Show => cli::streams::show(&api),
            StreamsCmd::Reload => cli::streams::reload(&api),
            StreamsCmd::Replay { stream, device } => cli::streams::replay(&api, stream, device),
        }),
        Cmd::Export { command, conn } => cli::Api::connect(&conn).and_then(|api| match command {
            ExportCmd::Forget { name } => cli::export::forget(&api, &name),
        }),
        Cmd::Certs { command } => cairn_gateway::security::certs::run(command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `cairn dev`'s fleet: five simulated devices at two records a second against the three
/// local nodes, on a thread of their own (they stop with the process).
#[cfg(feature = "sim")]
fn dev_fleet(host: &str, device_addrs: &[String]) {
    let args = cairn_sim::SimArgs {
        devices: 5,
        rate: 2.0,
        gateways: device_addrs.join(","),
        duration: None,
        json: false,
        host: host.to_string(),
        first_id: 1,
        stream: cli::DEV_FLEET_STREAM,
        drain: 0.0,
        threads: Some(1),
        report: None,
        quiet: true,
        user: None,
        ca_cert: None,
    };
    println!(
        "  5 simulated devices (ids 1-5) push 2 records/s each on stream {}:\n  \
         curl -G '{host}/db/query?pretty' --data-urlencode \\\n    \
         'q=SELECT device_id, count(*), max(time) FROM readings GROUP BY device_id'",
        cli::DEV_FLEET_STREAM
    );
    std::thread::spawn(move || {
        if let Err(e) = cairn_sim::run(args, std::future::pending()) {
            eprintln!("cairn dev: simulated devices stopped: {e:#}");
        }
    });
}

/// Without the `sim` feature `cairn dev` runs its three nodes only.
#[cfg(not(feature = "sim"))]
fn dev_fleet(_host: &str, _device_addrs: &[String]) {}
