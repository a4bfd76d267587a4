//! `parley`: one binary for the provider server, the client, the demo and the load tool.

mod bench;
mod client;
mod demo;
mod dev_ca;
mod serve;

use clap::{Parser, Subcommand};
use client::{AccountCommand, Client, ClientOpts, RoomCommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "parley",
    version,
    about = "Parley: end-to-end encrypted messaging that interconnects (MLS + MIMI)",
    after_help = "Start with `parley demo`, or `parley serve` and `parley account register`."
)]
struct Cli {
    /// Client profile directory (device keys, MLS state). Default: $PARLEY_PROFILE, else the platform data dir.
    #[arg(long, global = true, env = "PARLEY_PROFILE")]
    profile: Option<PathBuf>,
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a provider server.
    Serve(serve::ServeArgs),
    /// Register or log in this device, list devices.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Create rooms, add and remove members, leave and list rooms.
    #[command(subcommand)]
    Room(RoomCommand),
    /// Send a text message to a room, or to a user's 1:1 room (USER@DOMAIN).
    Send {
        /// A room id or name, or USER@DOMAIN for the 1:1 room with that user.
        target: String,
        text: String,
    },
    /// Fetch, decrypt and print what arrived, then acknowledge it.
    Sync {
        /// Wait up to this many seconds for something to arrive if nothing is queued.
        #[arg(long)]
        wait: Option<u64>,
        /// One JSON object per line per event.
        #[arg(long)]
        json: bool,
    },
    /// Interactive chat in a room: live messages in, lines you type out.
    Chat { room: String },
    /// In-process demo: two domains, four users, 1:1 and group chat.
    Demo,
    /// Load tool: messages/s and send→deliver latency through one server.
    Bench(bench::BenchArgs),
    /// A development certificate authority for provider certificates (mutual TLS).
    #[command(subcommand)]
    DevCa(dev_ca::DevCaCommand),
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let client = || Client::new(cli.profile.clone(), &cli.client);
    match cli.command {
        Command::Serve(args) => {
            init_logs("info");
            serve::run(args).await
        }
        Command::Demo => {
            init_logs("warn");
            demo::run().await
        }
        Command::Bench(args) => {
            init_logs("warn");
            bench::run(args).await
        }
        Command::DevCa(cmd) => dev_ca::run(cmd),
        Command::Account(cmd) => {
            init_logs("warn");
            client()?.account(cmd).await
        }
        Command::Room(cmd) => {
            init_logs("warn");
            client()?.room(cmd).await
        }
        Command::Send {
            ref target,
            ref text,
        } => {
            init_logs("warn");
            client()?.send(target, text).await
        }
        Command::Sync { wait, json } => {
            init_logs("warn");
            client()?.sync(wait, json).await
        }
        Command::Chat { ref room } => {
            init_logs("warn");
            client()?.chat(room).await
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match dispatch(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
