//! `parley`: one binary for the provider server, the client, the demo and the load tool.

mod bench;
mod client;
mod conformance;
mod console;
mod demo;
mod dev_ca;
mod local_net;
mod serve;

use clap::{Parser, Subcommand};
use client::{AccountCommand, AwaitingConsent, Client, ClientOpts, ContactCommand, RoomCommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code of a command stopped because another user has yet to consent (the contact request
/// was sent; nothing else was done). 1 is any other error, 2 a bad command line (clap).
const EXIT_AWAITING_CONSENT: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "parley",
    version,
    about = "Parley: end-to-end encrypted messaging that interconnects (MLS + MIMI)",
    after_help = "Start with `parley demo`, or `parley serve` and `parley account register`.\n\n\
                  Exit codes: 0 done; 1 error (one line on stderr); 2 bad command line; \
                  3 waiting for another user's consent (`parley send USER@DOMAIN` sent them a \
                  contact request instead of the message)."
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
    /// Ask other users for consent, list and answer their contact requests.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Send a text message (Markdown) to a room, or to a user's 1:1 room (USER@DOMAIN).
    ///
    /// Messaging a user of another provider needs their consent. Without it nothing is sent:
    /// parley sends them a contact request (see `parley contact`), says on stderr that it is
    /// waiting for them, and exits with code 3. Send again once they have accepted.
    #[command(after_help = "Exit codes: 0 sent; 1 error; 2 bad command line; \
                            3 waiting for USER@DOMAIN to accept your contact request \
                            (the message was not sent).")]
    Send {
        /// A room URI (mimi://HUB/r/NAME) or name, or USER@DOMAIN for the 1:1 room with that user.
        target: String,
        /// The message, in Markdown (GitHub Flavored Markdown for MIMI; HTML tags are escaped).
        text: String,
        /// Reply to this message: its id as `sync --json` shows it, or the first 8+ hex digits.
        #[arg(long, value_name = "MSG_ID")]
        reply: Option<String>,
        /// Receivers stop showing the message, and the providers drop it, after this many seconds.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        expires: Option<u64>,
    },
    /// React to a message with an emoji (`delete` the reaction's id to take it back).
    React {
        /// A room URI (mimi://HUB/r/NAME) or name, or USER@DOMAIN for the 1:1 room with that user.
        room: String,
        /// The message: its id as `sync --json` shows it, or the first 8+ hex digits.
        msg_id: String,
        /// The reaction: one emoji (or a short text, at most 64 bytes).
        emoji: String,
    },
    /// Replace the text of a message you sent.
    Edit {
        /// A room URI (mimi://HUB/r/NAME) or name, or USER@DOMAIN for the 1:1 room with that user.
        room: String,
        /// Your message: its id, or the first 8+ hex digits.
        msg_id: String,
        /// The new text, in Markdown.
        text: String,
    },
    /// Delete a message you sent, or take back a reaction of yours.
    Delete {
        /// A room URI (mimi://HUB/r/NAME) or name, or USER@DOMAIN for the 1:1 room with that user.
        room: String,
        /// Your message or reaction: its id, or the first 8+ hex digits.
        msg_id: String,
    },
    /// Send a file (image, voice message, video, anything), end-to-end encrypted.
    ///
    /// The file is encrypted with a fresh key, uploaded to your provider (which refuses files
    /// over its per-domain limit), and announced in the room; receivers' `parley sync` fetches,
    /// checks and decrypts it into their profile's downloads/ folder.
    SendFile {
        /// A room URI (mimi://HUB/r/NAME) or name, or USER@DOMAIN for the existing 1:1 room with that
        /// user.
        room: String,
        /// The file to send.
        path: PathBuf,
    },
    /// Tell the room's members you have read everything this device has of it (read receipts).
    ///
    /// Receiving devices already report messages as delivered by themselves, at every sync.
    Read {
        /// A room URI (mimi://HUB/r/NAME) or name, or USER@DOMAIN for the 1:1 room with that user.
        room: String,
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
    ///
    /// The room's members connected right now see "… is typing" when you start a line (never
    /// stored: offline devices never see it); you see theirs for a few seconds. On a terminal
    /// the chat reads key by key to notice that, with simple line editing (Backspace, Ctrl-U);
    /// Ctrl-C, Ctrl-D on an empty line, or /quit leave. Messages shown are reported read.
    Chat {
        /// A room URI (mimi://HUB/r/NAME) or name.
        room: String,
    },
    /// Three providers in one process (chirp.test, wave.test, ping.test) talking MIMI over mutual
    /// TLS: consent, a 1:1 and a group across all three, each device's decrypted view.
    Demo,
    /// Load tool: messages/s and send→deliver latency through one server.
    Bench(bench::BenchArgs),
    /// A development certificate authority for provider certificates (mutual TLS).
    #[command(subcommand)]
    DevCa(dev_ca::DevCaCommand),
    /// Check a MIMI provider from the outside (draft-ietf-mimi-protocol-06): one PASS/FAIL/SKIP
    /// line per check, a summary, and exit code 1 if any check failed.
    ///
    /// The kit acts as a small provider for --as DOMAIN, with its own federation listener at
    /// --listen (configure the provider under test to reach DOMAIN there and to trust --ca's CA).
    /// It checks the endpoint directory, each endpoint's answers, and a forge suite a correct
    /// provider must refuse; with --peer-user it also runs the full flow in both directions,
    /// printing WAIT lines for what that user must do.
    Conformance(conformance::ConformanceArgs),
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
        Command::Conformance(args) => {
            init_logs("warn");
            conformance::run(args).await
        }
        Command::Account(cmd) => {
            init_logs("warn");
            client()?.account(cmd).await
        }
        Command::Room(cmd) => {
            init_logs("warn");
            client()?.room(cmd).await
        }
        Command::Contact(cmd) => {
            init_logs("warn");
            client()?.contact(cmd).await
        }
        Command::Send {
            ref target,
            ref text,
            ref reply,
            expires,
        } => {
            init_logs("warn");
            let message = client::Compose {
                text,
                reply: reply.as_deref(),
                expires_in: expires.map(std::time::Duration::from_secs),
            };
            client()?.send(target, &message).await
        }
        Command::React {
            ref room,
            ref msg_id,
            ref emoji,
        } => {
            init_logs("warn");
            client()?.react(room, msg_id, emoji).await
        }
        Command::Edit {
            ref room,
            ref msg_id,
            ref text,
        } => {
            init_logs("warn");
            client()?.edit(room, msg_id, text).await
        }
        Command::Delete {
            ref room,
            ref msg_id,
        } => {
            init_logs("warn");
            client()?.delete(room, msg_id).await
        }
        Command::SendFile { ref room, ref path } => {
            init_logs("warn");
            client()?.send_file(room, path).await
        }
        Command::Read { ref room } => {
            init_logs("warn");
            client()?.read(room).await
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
            if let Some(waiting) = e.downcast_ref::<AwaitingConsent>() {
                eprintln!("{waiting}");
                return ExitCode::from(EXIT_AWAITING_CONSENT);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
