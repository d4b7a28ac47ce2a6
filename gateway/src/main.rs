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
    },
    /// Interactive SQL shell, like the rqlite shell.
    Shell {
        #[command(flatten)]
        conn: cli::ConnArgs,
    },
    /// Download the database (a SQLite file) to FILE.
    Backup {
        file: PathBuf,
        #[command(flatten)]
        conn: cli::ConnArgs,
    },
    /// Replace the database with FILE (a SQLite file or SQL text).
    Restore {
        file: PathBuf,
        #[command(flatten)]
        conn: cli::ConnArgs,
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
    /// Cluster CA and node/client certificates for TLS.
    Certs {
        #[command(subcommand)]
        command: cairn_gateway::security::certs::CertsCmd,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Register a device and its pre-shared key (or replace its key).
    Add {
        #[arg(long)]
        id: u64,
        /// 32-byte key as 64 hex digits.
        #[arg(long)]
        key: String,
    },
    /// List registered devices with their committed high-water seq.
    List,
    /// Forget a device's key (its records stay).
    Remove {
        #[arg(long)]
        id: u64,
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
        } => {
            cli::init_logging(log_format, "info");
            cli::runtime().and_then(|rt| rt.block_on(cli::dev(data_dir, dev_fleet)))
        }
        Cmd::Shell { conn } => cli::shell(&conn),
        Cmd::Backup { file, conn } => cli::Api::connect(&conn).and_then(|a| cli::backup(&a, &file)),
        Cmd::Restore { file, conn } => {
            cli::Api::connect(&conn).and_then(|a| cli::restore(&a, &file))
        }
        #[cfg(feature = "sim")]
        Cmd::Sim(a) => cairn_sim::run(a, cli::shutdown_signal()),
        Cmd::Device { command, conn } => cli::Api::connect(&conn).and_then(|api| match command {
            DeviceCmd::Add { id, key } => admin::add(&api, id, &key),
            DeviceCmd::List => admin::list(&api),
            DeviceCmd::Remove { id } => admin::remove(&api, id),
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
        stream: 1,
        drain: 0.0,
        threads: Some(1),
        report: None,
        quiet: true,
        user: None,
        ca_cert: None,
    };
    println!(
        "  5 simulated devices (ids 1-5) push 2 records/s each into table readings:\n  \
         curl -G '{host}/db/query?pretty' --data-urlencode \\\n    \
         'q=SELECT device_id, count(*), max(time) FROM readings GROUP BY device_id'"
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
