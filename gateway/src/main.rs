//! `cairn`: the gateway daemon and its tools. See `cairn --help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use cairn_gateway::cli;
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
        #[arg(long, default_value = "http://127.0.0.1:4001")]
        host: String,
    },
    /// Download the database (a SQLite file) to FILE.
    Backup {
        file: PathBuf,
        #[arg(long, default_value = "http://127.0.0.1:4001")]
        host: String,
    },
    /// Replace the database with FILE (a SQLite file or SQL text).
    Restore {
        file: PathBuf,
        #[arg(long, default_value = "http://127.0.0.1:4001")]
        host: String,
    },
}

fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    let result = match args.command {
        Cmd::Node(a) => NodeConfig::resolve(&a).and_then(|c| {
            cli::init_logging(c.log_format, &c.log_level);
            cli::runtime()?.block_on(cairn_gateway::node::run(c, cli::shutdown_signal()))
        }),
        Cmd::Dev {
            data_dir,
            log_format,
        } => {
            cli::init_logging(log_format, "info");
            cli::runtime().and_then(|rt| rt.block_on(cli::dev(data_dir)))
        }
        Cmd::Shell { host } => cli::shell(&host),
        Cmd::Backup { file, host } => cli::backup(&host, &file),
        Cmd::Restore { file, host } => cli::restore(&host, &file),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
