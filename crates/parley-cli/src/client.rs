//! The client commands: `account`, `room`, `contact`, `send`, `sync`, `chat`.

use crate::console::{Console, Input};
use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use parley_client::{
    ClientError, Device, Event, HistoryEntry, Push, ReceiptStatus, RoomSummary, SendOptions,
    SentMessage, TYPING_SHOWN_FOR,
};
use parley_proto::api::{ContactDirection, ContactInfo, ContactState};
use parley_proto::{DeviceId, MessageId, RoomId, UserId};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

/// Options every client command shares.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// Extra CA certificate (PEM) to trust for the server's TLS certificate.
    #[arg(long, global = true, env = "PARLEY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Register a new user and this device.
    Register {
        /// The new user, `handle@domain`.
        user: String,
        /// The provider's client API URL, e.g. http://127.0.0.1:8420.
        #[arg(long)]
        server: String,
        /// Password for the account (8+ characters).
        #[arg(long, required_unless_present = "invite", conflicts_with = "invite")]
        password: Option<String>,
        /// Invite code, for invite-only domains.
        #[arg(long)]
        invite: Option<String>,
    },
    /// Log in a further device of an existing user (use a new profile for it).
    ///
    /// The new device joins all of the user's rooms as soon as another device of the user syncs
    /// (`parley sync`, or a running `parley chat`): that device adds it to each room.
    Login {
        user: String,
        #[arg(long)]
        server: String,
        #[arg(long)]
        password: String,
    },
    /// List this user's devices.
    Devices,
    /// Remove another device of this user: from every room, then from the account.
    ///
    /// The removed device can no longer read or send anything; its profile is useless from
    /// then on. Run this on another device than the one being removed.
    RemoveDevice {
        /// The device's id, as `parley account devices` lists it.
        device: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoomCommand {
    /// Create a group room with the given members; prints the room URI on the last line.
    ///
    /// The room is hubbed by your provider and named mimi://YOUR-DOMAIN/r/<32 hex digits>; you
    /// are its first admin.
    Create {
        #[arg(long)]
        name: Option<String>,
        /// Members to add, `handle@domain`.
        members: Vec<String>,
    },
    /// Add a user (all their devices) to a room (admins only, in group rooms).
    Add {
        /// The room: its URI (mimi://HUB/r/NAME) or its name.
        room: String,
        user: String,
    },
    /// Remove a user (all their devices) from a room (admins only, in group rooms).
    Remove {
        /// The room: its URI (mimi://HUB/r/NAME) or its name.
        room: String,
        user: String,
    },
    /// Make a member an admin (admins add, remove and promote; a room's creator is its first admin).
    Promote {
        /// The room: its URI (mimi://HUB/r/NAME) or its name.
        room: String,
        /// The member to make an admin (user@domain).
        user: String,
    },
    /// Leave a group room, with all your devices (another member completes the removal).
    Leave {
        /// The room: its URI (mimi://HUB/r/NAME) or its name.
        room: String,
    },
    /// List the rooms this device is in, as its own MLS groups show them: URI, kind, name,
    /// members (admins marked `*`).
    List,
}

#[derive(Debug, Subcommand)]
pub enum ContactCommand {
    /// Ask a user for consent to contact them.
    ///
    /// A user of another provider must accept your contact request before you can add them to a
    /// room or message them (`parley send USER@DOMAIN` sends this request by itself when needed).
    /// Asking again while the request is pending changes nothing. Users of your own provider
    /// need no consent: the answer is `granted` at once.
    Request {
        /// The user to ask, `handle@domain`.
        user: String,
    },
    /// List the contact requests waiting for your answer.
    ///
    /// One line per request, e.g. `alice@chirp.test wants to contact you`; answer each with
    /// `parley contact accept` or `parley contact block`.
    Requests {
        /// One JSON object per line: `{"user":…,"direction":"incoming","state":"pending"}`.
        #[arg(long)]
        json: bool,
    },
    /// Accept a user's contact request: they may then add you to rooms and message you.
    Accept {
        /// The user whose request to accept, `handle@domain`.
        user: String,
    },
    /// Block a user: refuse their contact request, or revoke a consent you gave.
    ///
    /// A blocked user can no longer add you to rooms or start a conversation with you.
    Block {
        /// The user to block, `handle@domain`.
        user: String,
    },
}

/// A message to send: its Markdown text, the message it replies to (an id or the start of
/// one, found in the target room), and how long it lives.
#[derive(Debug, Clone, Copy)]
pub struct Compose<'a> {
    pub text: &'a str,
    pub reply: Option<&'a str>,
    pub expires_in: Option<Duration>,
}

impl Compose<'_> {
    /// Sends it into `room`, where the message it replies to must be.
    async fn send_in(
        &self,
        device: &mut Device,
        room: &RoomId,
    ) -> Result<SentMessage, ClientError> {
        let reply_to = match self.reply {
            Some(id) => Some(find_message(device, room, id).await?),
            None => None,
        };
        let options = SendOptions {
            reply_to,
            expires_in: self.expires_in,
        };
        device.send(room, self.text, &options).await
    }
}

/// `parley send USER@DOMAIN` could not send because the user has not consented yet; a contact
/// request went out instead. `main` prints it (without `error:`) and exits with code 3.
#[derive(Debug)]
pub struct AwaitingConsent {
    pub user: UserId,
}

impl std::fmt::Display for AwaitingConsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "waiting for {} to accept your contact request; the message was not sent",
            self.user
        )
    }
}

impl std::error::Error for AwaitingConsent {}

/// The platform's data directory for the default profile.
fn default_profile() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("parley"));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow!("no --profile, $PARLEY_PROFILE or $HOME"))?;
    let base = if cfg!(target_os = "macos") {
        PathBuf::from(home).join("Library/Application Support")
    } else {
        PathBuf::from(home).join(".local/share")
    };
    Ok(base.join("parley"))
}

pub struct Client {
    profile: PathBuf,
    ca: Option<Vec<u8>>,
}

fn parse_user(s: &str) -> anyhow::Result<UserId> {
    UserId::parse(s).map_err(|e| anyhow!("{e}"))
}

impl Client {
    pub fn new(profile: Option<PathBuf>, opts: &ClientOpts) -> anyhow::Result<Self> {
        let profile = match profile {
            Some(p) => p,
            None => default_profile()?,
        };
        let ca = match &opts.ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("cannot read CA certificate {}", path.display()))?,
            ),
            None => None,
        };
        Ok(Self { profile, ca })
    }

    fn open(&self) -> anyhow::Result<Device> {
        Device::open(&self.profile, self.ca.as_deref())
            .with_context(|| format!("cannot open profile {}", self.profile.display()))
    }

    pub async fn account(&self, cmd: AccountCommand) -> anyhow::Result<()> {
        match cmd {
            AccountCommand::Register {
                user,
                server,
                password,
                invite,
            } => {
                let user = parse_user(&user)?;
                let device = Device::register(
                    &self.profile,
                    &server,
                    &user,
                    password.as_deref(),
                    invite.as_deref(),
                    self.ca.as_deref(),
                )
                .await?;
                println!(
                    "registered {} (device {})",
                    device.user(),
                    device.device_id()
                );
            }
            AccountCommand::Login {
                user,
                server,
                password,
            } => {
                let user = parse_user(&user)?;
                let device =
                    Device::login(&self.profile, &server, &user, &password, self.ca.as_deref())
                        .await?;
                println!(
                    "logged in {} (new device {})",
                    device.user(),
                    device.device_id()
                );
            }
            AccountCommand::Devices => {
                let device = self.open()?;
                for d in device.devices().await? {
                    let me = if d.device_id == device.device_id().as_str() {
                        " (this device)"
                    } else {
                        ""
                    };
                    println!("{}  {}{me}", d.device_id, d.name);
                }
            }
            AccountCommand::RemoveDevice { device: id } => {
                let device_id =
                    DeviceId::parse(&id).map_err(|e| anyhow!("{id:?} is not a device id: {e}"))?;
                let mut device = self.open()?;
                device.remove_device(&device_id).await?;
                println!("removed device {device_id}");
            }
        }
        Ok(())
    }

    pub async fn room(&self, cmd: RoomCommand) -> anyhow::Result<()> {
        let mut device = self.open()?;
        match cmd {
            RoomCommand::Create { name, members } => {
                let members = members
                    .iter()
                    .map(|m| parse_user(m))
                    .collect::<Result<Vec<_>, _>>()?;
                let room = device
                    .create_room(name.as_deref(), &members)
                    .await
                    .map_err(|e| consent_hint(e, "USER@DOMAIN"))?;
                println!("{room}");
            }
            RoomCommand::Add { room, user } => {
                let room = resolve_room(&mut device, &room).await?;
                let user = parse_user(&user)?;
                device
                    .add_member(&room, &user)
                    .await
                    .map_err(|e| consent_hint(e, &user.to_string()))?;
                println!("added {user} to {room}");
            }
            RoomCommand::Promote { room, user } => {
                let room = resolve_room(&mut device, &room).await?;
                device.promote(&room, &parse_user(&user)?).await?;
                println!("{user} is now an admin of {room}");
            }
            RoomCommand::Remove { room, user } => {
                let room = resolve_room(&mut device, &room).await?;
                device.remove_member(&room, &parse_user(&user)?).await?;
                println!("removed {user} from {room}");
            }
            RoomCommand::Leave { room } => {
                let room = resolve_room(&mut device, &room).await?;
                device.leave(&room).await?;
                println!("left {room}");
            }
            RoomCommand::List => {
                for r in device.rooms()? {
                    println!("{}", room_line(&r));
                }
            }
        }
        Ok(())
    }

    pub async fn contact(&self, cmd: ContactCommand) -> anyhow::Result<()> {
        let mut device = self.open()?;
        match cmd {
            ContactCommand::Request { user } => {
                let user = parse_user(&user)?;
                let answer = device.contact_request(&user).await?;
                println!("{}", describe_request(&user, &answer));
            }
            ContactCommand::Requests { json } => {
                let requests = device.contact_requests().await?;
                let mut out = std::io::stdout().lock();
                for request in &requests {
                    if json {
                        writeln!(out, "{}", serde_json::to_string(request)?)?;
                    } else {
                        writeln!(out, "{}", describe_contact(request))?;
                    }
                }
                if requests.is_empty() && !json {
                    eprintln!("no pending contact requests");
                }
            }
            ContactCommand::Accept { user } => {
                let user = parse_user(&user)?;
                let answer = device.contact_accept(&user).await?;
                if answer.state == ContactState::Granted {
                    println!("accepted {user}: they can now add you to rooms and message you");
                } else {
                    println!("{}", describe_contact(&answer));
                }
            }
            ContactCommand::Block { user } => {
                let user = parse_user(&user)?;
                let answer = device.contact_block(&user).await?;
                if answer.state == ContactState::Blocked {
                    println!("blocked {user}: they can no longer add you to rooms or message you");
                } else {
                    println!("{}", describe_contact(&answer));
                }
            }
        }
        Ok(())
    }

    pub async fn send(&self, target: &str, message: &Compose<'_>) -> anyhow::Result<()> {
        let mut device = self.open()?;
        if target.contains('@') {
            return send_direct_or_ask(&mut device, &parse_user(target)?, message).await;
        }
        let room = resolve_room(&mut device, target).await?;
        let sent = message.send_in(&mut device, &room).await?;
        println!("sent {} to {room}", sent.id);
        Ok(())
    }

    pub async fn react(&self, room: &str, msg_id: &str, emoji: &str) -> anyhow::Result<()> {
        let mut device = self.open()?;
        let (room, target) = locate(&mut device, room, msg_id).await?;
        let sent = device.react(&room, &target, emoji).await?;
        println!("sent {} to {room}", sent.id);
        Ok(())
    }

    pub async fn edit(&self, room: &str, msg_id: &str, text: &str) -> anyhow::Result<()> {
        let mut device = self.open()?;
        let (room, target) = locate(&mut device, room, msg_id).await?;
        let sent = device.edit(&room, &target, text).await?;
        println!("sent {} to {room}", sent.id);
        Ok(())
    }

    pub async fn delete(&self, room: &str, msg_id: &str) -> anyhow::Result<()> {
        let mut device = self.open()?;
        let (room, target) = locate(&mut device, room, msg_id).await?;
        let sent = device.delete(&room, &target).await?;
        println!("sent {} to {room}", sent.id);
        Ok(())
    }

    pub async fn send_file(&self, room: &str, path: &std::path::Path) -> anyhow::Result<()> {
        let mut device = self.open()?;
        let room = resolve_target(&mut device, room).await?;
        let sent = device.send_file(&room, path).await?;
        println!(
            "sent {} to {room} ({}, {} bytes encrypted)",
            sent.message.id, sent.name, sent.size
        );
        Ok(())
    }

    pub async fn read(&self, room: &str) -> anyhow::Result<()> {
        let mut device = self.open()?;
        let room = resolve_target(&mut device, room).await?;
        match device.mark_read(&room).await? {
            0 => println!("nothing new to mark read in {room}"),
            1 => println!("marked 1 message read in {room}"),
            n => println!("marked {n} messages read in {room}"),
        }
        Ok(())
    }

    pub async fn sync(&self, wait: Option<u64>, json: bool) -> anyhow::Result<()> {
        let mut device = self.open()?;
        let events = device.sync(wait.map(Duration::from_secs)).await?;
        let mut out = std::io::stdout().lock();
        let now = now_ms();
        for event in &events {
            if json {
                writeln!(out, "{}", serde_json::to_string(event)?)?;
            } else {
                writeln!(out, "{}", describe(event, now))?;
            }
        }
        Ok(())
    }

    pub async fn chat(&self, room: &str) -> anyhow::Result<()> {
        let mut device = self.open()?;
        let room = resolve_room(&mut device, room).await?;
        println!(
            "chatting in {room} as {} — type a message and Enter; /quit or Ctrl-D to leave",
            device.user()
        );
        println!("{CHAT_HELP}");
        for h in device.history(&room, 20)? {
            println!("{}", history_line(&h));
        }
        let mut live = device.live().await?;
        let mut console = Console::new();
        let events = device.apply(&mut live, Vec::new()).await?;
        show_in_chat(&mut device, &mut console, &room, &events).await?;
        // What the chat showed on opening has been read.
        mark_read_quietly(&mut device, &room).await?;
        let mut typers = Typers::default();
        let mut typing_sent: Option<Instant> = None;
        // Wakes the loop so a typing notice goes away when its time is up.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                push = live.next() => match push? {
                    Push::Entries(batch) => {
                        let events = device.apply(&mut live, batch).await?;
                        typers.stop_for(&events);
                        console.set_notice(typers.notice(Instant::now()));
                        show_in_chat(&mut device, &mut console, &room, &events).await?;
                    }
                    Push::Ephemeral { room: r, data } => {
                        if let Some(Event::Typing { room: r, sender }) = device.open_ephemeral(&r, &data) {
                            if r == room {
                                typers.start(sender);
                            }
                        }
                    }
                    // The chat sends over HTTP; no answers come on this connection.
                    Push::Sent { .. } | Push::Refused { .. } => {}
                },
                input = console.next() => match input? {
                    Input::Started => announce_typing(&mut device, &room, &mut typing_sent).await,
                    Input::Line(line) => match ChatInput::parse(&line) {
                        ChatInput::Quit => break,
                        ChatInput::Nothing => {}
                        ChatInput::Usage => eprintln!("{CHAT_HELP}"),
                        input => {
                            chat_send(&mut device, &room, input).await?;
                            // The next line starts a new bout of typing.
                            typing_sent = None;
                        }
                    },
                    Input::Eof => break,
                },
                _ = tick.tick() => {}
            }
            console.set_notice(typers.notice(Instant::now()));
        }
        drop(console);
        live.close().await;
        Ok(())
    }
}

/// Typing indicators go out at most this often while someone types (one per line, usually).
const TYPING_EVERY: Duration = Duration::from_secs(3);

/// Tells the room we started typing, unless we did so a moment ago. Best effort: a failure
/// (the room just moved to a new epoch, the network) only costs the indicator.
async fn announce_typing(device: &mut Device, room: &RoomId, sent: &mut Option<Instant>) {
    if sent.is_some_and(|at| at.elapsed() < TYPING_EVERY) {
        return;
    }
    *sent = Some(Instant::now());
    if let Err(e) = device.send_typing(room).await {
        tracing::debug!(%room, "typing indicator not sent: {e}");
    }
}

/// Who is typing in the chat's room, and until when.
#[derive(Debug, Default)]
struct Typers(BTreeMap<UserId, Instant>);

impl Typers {
    fn start(&mut self, user: UserId) {
        self.0.insert(user, Instant::now() + TYPING_SHOWN_FOR);
    }

    /// A message from someone ends their typing.
    fn stop_for(&mut self, events: &[Event]) {
        for event in events {
            if let Event::Message { sender, .. } = event {
                self.0.remove(sender);
            }
        }
    }

    /// "bob@wave.test is typing…", while anyone is.
    fn notice(&mut self, now: Instant) -> Option<String> {
        self.0.retain(|_, until| *until > now);
        let names: Vec<String> = self.0.keys().map(ToString::to_string).collect();
        match names.as_slice() {
            [] => None,
            [one] => Some(format!("{one} is typing\u{2026}")),
            many => Some(format!("{} are typing\u{2026}", many.join(", "))),
        }
    }
}

/// How to use `parley chat`, shown when it starts and after a mistyped command.
const CHAT_HELP: &str = concat!(
    "commands: /reply ID TEXT, /react ID EMOJI, /edit ID TEXT, /delete ID, /quit ",
    "(ID: the #id shown after a message, or its first 8+ hex digits)"
);

/// A line typed in `parley chat`.
#[derive(Debug, PartialEq, Eq)]
enum ChatInput<'a> {
    Nothing,
    Quit,
    /// A `/command` that is not one, or lacks its arguments.
    Usage,
    Text(&'a str),
    Reply {
        id: &'a str,
        text: &'a str,
    },
    React {
        id: &'a str,
        emoji: &'a str,
    },
    Edit {
        id: &'a str,
        text: &'a str,
    },
    Delete {
        id: &'a str,
    },
}

impl<'a> ChatInput<'a> {
    fn parse(line: &'a str) -> Self {
        let line = line.trim();
        let Some(command) = line.strip_prefix('/') else {
            return if line.is_empty() {
                Self::Nothing
            } else {
                Self::Text(line)
            };
        };
        let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
        let (id, arg) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
        let (id, arg) = (id.trim_start_matches('#'), arg.trim());
        match (name, id.is_empty(), arg.is_empty()) {
            ("quit", _, _) => Self::Quit,
            ("reply", false, false) => Self::Reply { id, text: arg },
            ("react", false, false) => Self::React { id, emoji: arg },
            ("edit", false, false) => Self::Edit { id, text: arg },
            ("delete", false, true) => Self::Delete { id },
            _ => Self::Usage,
        }
    }
}

/// Sends what a chat line asks for. A mistake about a message (unknown id, someone else's
/// message) is reported and the chat goes on; anything else ends it.
async fn chat_send(device: &mut Device, room: &RoomId, input: ChatInput<'_>) -> anyhow::Result<()> {
    let outcome = match input {
        ChatInput::Text(text) => device.send_text(room, text).await.map(drop),
        ChatInput::Reply { id, text } => {
            let message = Compose {
                text,
                reply: Some(id),
                expires_in: None,
            };
            message.send_in(device, room).await.map(drop)
        }
        ChatInput::React { id, emoji } => match find_message(device, room, id).await {
            Ok(target) => device.react(room, &target, emoji).await.map(drop),
            Err(e) => Err(e),
        },
        ChatInput::Edit { id, text } => match find_message(device, room, id).await {
            Ok(target) => device.edit(room, &target, text).await.map(drop),
            Err(e) => Err(e),
        },
        ChatInput::Delete { id } => match find_message(device, room, id).await {
            Ok(target) => device.delete(room, &target).await.map(drop),
            Err(e) => Err(e),
        },
        ChatInput::Nothing | ChatInput::Quit | ChatInput::Usage => Ok(()),
    };
    match outcome {
        Err(
            e @ (ClientError::UnknownMessage { .. }
            | ClientError::AmbiguousMessage { .. }
            | ClientError::NotAuthor { .. }
            | ClientError::InvalidInput(_)),
        ) => {
            eprintln!("error: {e}");
            Ok(())
        }
        other => Ok(other?),
    }
}

/// The room (id, name, or USER@DOMAIN for the existing 1:1 room) and the message in it that a
/// command names.
async fn locate(
    device: &mut Device,
    room: &str,
    msg_id: &str,
) -> anyhow::Result<(RoomId, MessageId)> {
    let room = resolve_target(device, room).await?;
    let target = find_message(device, &room, msg_id).await?;
    Ok((room, target))
}

/// A message of `room` by id or id prefix; if this device has not seen it, it first processes
/// what is queued (the events wait for the next `sync`).
async fn find_message(
    device: &mut Device,
    room: &RoomId,
    id: &str,
) -> Result<MessageId, ClientError> {
    match device.find_message(room, id) {
        Err(ClientError::UnknownMessage { .. }) => {
            device.catch_up().await?;
            device.find_message(room, id)
        }
        found => found,
    }
}

/// A room id or name, or USER@DOMAIN for the 1:1 room with that user (which must exist).
async fn resolve_target(device: &mut Device, target: &str) -> anyhow::Result<RoomId> {
    if !target.contains('@') {
        return resolve_room(device, target).await;
    }
    let peer = parse_user(target)?;
    device
        .existing_direct_room(&peer)
        .await?
        .ok_or_else(|| anyhow!("you have no 1:1 room with {peer}"))
}

/// Sends `text` in the direct room with `peer`, finding or creating it. Without `peer`'s consent
/// (no room can be created, or they blocked us in the existing one), asks for it (the request is
/// idempotent) and fails with [`AwaitingConsent`]; should consent turn out to be there by now,
/// tries once more.
async fn send_direct_or_ask(
    device: &mut Device,
    peer: &UserId,
    message: &Compose<'_>,
) -> anyhow::Result<()> {
    match send_direct(device, peer, message).await {
        Ok(()) => return Ok(()),
        Err(ClientError::NoConsent(detail)) => {
            tracing::debug!(%peer, "no consent: {detail}");
        }
        Err(e) => return Err(e.into()),
    }
    let answer = device
        .contact_request(peer)
        .await
        .with_context(|| format!("{peer} has not consented, and asking them failed"))?;
    match answer.state {
        ContactState::Pending => Err(AwaitingConsent { user: peer.clone() }.into()),
        ContactState::Granted => send_direct(device, peer, message)
            .await
            .map_err(|e| consent_hint(e, &peer.to_string())),
        ContactState::Blocked => {
            bail!("{peer} does not accept contact requests from you; the message was not sent")
        }
    }
}

async fn send_direct(
    device: &mut Device,
    peer: &UserId,
    message: &Compose<'_>,
) -> Result<(), ClientError> {
    // A reply needs a message to reply to, so only an existing room will do.
    let room = match message.reply {
        None => device.direct_room(peer).await?,
        Some(_) => device.existing_direct_room(peer).await?.ok_or_else(|| {
            ClientError::InvalidInput(format!(
                "you have no 1:1 room with {peer}, so no message there to reply to"
            ))
        })?,
    };
    let sent = message.send_in(device, &room).await?;
    println!("sent {} to {room}", sent.id);
    Ok(())
}

/// Explains a missing consent in the one error line, with the command that asks for it.
fn consent_hint(e: ClientError, user: &str) -> anyhow::Error {
    match e {
        ClientError::NoConsent(_) => anyhow!(
            "{e}; ask for consent with `parley contact request {user}` and try again once accepted"
        ),
        other => other.into(),
    }
}

/// One line for a relation seen from our side.
fn describe_contact(contact: &ContactInfo) -> String {
    let user = &contact.user;
    match (contact.direction, contact.state) {
        (ContactDirection::Incoming, ContactState::Pending) => {
            format!("{user} wants to contact you")
        }
        (ContactDirection::Incoming, ContactState::Granted) => {
            format!("{user} may add you to rooms and message you")
        }
        (ContactDirection::Incoming, ContactState::Blocked) => format!("{user} is blocked"),
        (ContactDirection::Outgoing, ContactState::Pending) => {
            format!("waiting for {user} to accept your contact request")
        }
        (ContactDirection::Outgoing, ContactState::Granted) => {
            format!("{user} accepted your contact request: you can message them")
        }
        (ContactDirection::Outgoing, ContactState::Blocked) => {
            format!("{user} does not accept contact requests from you")
        }
    }
}

/// The confirmation of `parley contact request`.
fn describe_request(user: &UserId, answer: &ContactInfo) -> String {
    match answer.state {
        ContactState::Pending => {
            format!("asked {user} for consent; waiting for them to accept your contact request")
        }
        ContactState::Granted => format!("{user} has consented: you can message them"),
        ContactState::Blocked => format!("{user} does not accept contact requests from you"),
    }
}

/// Accepts a room URI (or `HUB/r/NAME`), or a unique room name.
async fn resolve_room(device: &mut Device, room: &str) -> anyhow::Result<RoomId> {
    if let Ok(id) = RoomId::parse(room) {
        return Ok(id);
    }
    let matches: Vec<RoomId> = device
        .rooms()?
        .into_iter()
        .filter(|r| r.name.as_deref() == Some(room))
        .map(|r| r.room)
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no room with id or name {room:?}"),
        _ => bail!("several rooms are named {room:?}: use the room URI"),
    }
}

/// One line per event for `parley sync`; `now_ms` dates expiring messages.
fn describe(event: &Event, now_ms: u64) -> String {
    match event {
        Event::Message { room, .. }
        | Event::Reaction { room, .. }
        | Event::Edit { room, .. }
        | Event::Delete { room, .. }
        | Event::Receipt { room, .. }
        | Event::Typing { room, .. }
        | Event::Undecodable { room, .. } => format!(
            "[{}] {}",
            short(room),
            member_line(event, now_ms).unwrap_or_default()
        ),
        Event::Joined { room, name, .. } => {
            format!(
                "[{}] joined room {}",
                short(room),
                name.as_deref().unwrap_or("(unnamed)")
            )
        }
        Event::Members {
            room,
            added,
            removed,
        } => {
            let list = |v: &[UserId]| {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut parts = Vec::new();
            if !added.is_empty() {
                parts.push(format!("added {}", list(added)));
            }
            if !removed.is_empty() {
                parts.push(format!("removed {}", list(removed)));
            }
            format!("[{}] {}", short(room), parts.join("; "))
        }
        Event::Removed { room } => format!("[{}] you were removed from this room", short(room)),
        Event::Error { room, detail } => match room {
            Some(room) => format!("[{}] could not process an entry: {detail}", short(room)),
            None => format!("could not process an entry: {detail}"),
        },
    }
}

/// What a member did, without the room: a message (with its `#id` for replies, reactions,
/// edits and deletes), a reaction, an edit, a delete, or content that does not decode.
fn member_line(event: &Event, now_ms: u64) -> Option<String> {
    Some(match event {
        Event::Message {
            sender,
            id,
            text,
            reply_to,
            expires_at,
            file,
            ..
        } => {
            let mut line = sender.to_string();
            if let Some(to) = reply_to {
                line.push_str(&format!(" (reply to #{})", short_id(to)));
            }
            line.push_str(&format!(": {text}"));
            if let Some(path) = file {
                line.push_str(&format!(" (saved to {path})"));
            }
            if let Some(at) = expires_at {
                let secs = at.saturating_sub(now_ms).div_ceil(1000);
                line.push_str(&format!(" (disappears in {secs}s)"));
            }
            line.push_str(&format!("  #{}", short_id(id)));
            line
        }
        Event::Reaction {
            sender,
            target,
            emoji,
            ..
        } => format!("{sender} reacted {emoji} to #{}", short_id(target)),
        Event::Edit {
            sender,
            target,
            text,
            ..
        } => format!("{sender} edited #{}: {text}", short_id(target)),
        Event::Delete { sender, target, .. } => {
            format!("{sender} deleted #{}", short_id(target))
        }
        Event::Receipt {
            sender,
            target,
            status,
            ..
        } => match status {
            ReceiptStatus::Delivered => format!("{sender} received #{}", short_id(target)),
            ReceiptStatus::Read => format!("{sender} read #{}", short_id(target)),
        },
        Event::Typing { sender, .. } => format!("{sender} is typing\u{2026}"),
        Event::Undecodable { sender, detail, .. } => {
            format!("{sender} sent a message that cannot be decoded ({detail})")
        }
        _ => return None,
    })
}

/// A message of the chat's history as it stands: edited, deleted, reactions.
fn history_line(h: &HistoryEntry) -> String {
    let mut line = h.sender.to_string();
    if let Some(to) = &h.reply_to {
        line.push_str(&format!(" (reply to #{})", short_id(to)));
    }
    if h.deleted {
        line.push_str(": [deleted]");
    } else {
        line.push_str(&format!(": {}", h.text));
    }
    if h.edited && !h.deleted {
        line.push_str(" (edited)");
    }
    if !h.reactions.is_empty() {
        let reactions: Vec<String> = h
            .reactions
            .iter()
            .map(|r| format!("{} {}", r.emoji, r.sender))
            .collect();
        line.push_str(&format!(" [{}]", reactions.join(", ")));
    }
    line.push_str(&format!("  #{}", short_id(&h.id)));
    line
}

/// Prints what happened as chat lines, and reports the room's new messages read: the chat
/// shows them, so they are. Delivered receipts would only clutter a chat, so only read
/// receipts are shown.
async fn show_in_chat(
    device: &mut Device,
    console: &mut Console,
    room: &RoomId,
    events: &[Event],
) -> anyhow::Result<()> {
    let now = now_ms();
    let mut shown_messages = false;
    let mut lines = Vec::new();
    for event in events {
        match event {
            Event::Receipt {
                status: ReceiptStatus::Delivered,
                ..
            } => continue,
            Event::Message { room: r, .. } if r == room => shown_messages = true,
            _ => {}
        }
        lines.push(match member_line(event, now) {
            Some(line) if event.room() == Some(room) => line,
            _ => describe(event, now),
        });
    }
    console.print(&lines);
    if shown_messages {
        mark_read_quietly(device, room).await?;
    }
    Ok(())
}

/// Read receipts are a courtesy: failing to send them must not end the chat.
async fn mark_read_quietly(device: &mut Device, room: &RoomId) -> anyhow::Result<()> {
    match device.mark_read(room).await {
        Ok(_) => Ok(()),
        Err(e @ ClientError::Storage(_)) => Err(e.into()),
        Err(e) => {
            tracing::warn!(%room, "cannot send read receipts: {e}");
            Ok(())
        }
    }
}

/// Enough of a MessageId to tell a room's messages apart, and to type it back in: all ids start
/// with `01` (SHA-256), so this is 40 bits of hash.
fn short_id(id: &MessageId) -> String {
    id.to_hex()[..12].to_owned()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Enough of a room to tell a device's rooms apart in event lines: the start of its name
/// (rooms Parley creates have 32 random hex digits there).
fn short(room: &RoomId) -> &str {
    room.name().get(..8).unwrap_or(room.name())
}

/// One line of `parley room list`.
fn room_line(r: &RoomSummary) -> String {
    let members: Vec<String> = r
        .members
        .iter()
        .map(|m| {
            let mark = if r.admins.contains(m) { "*" } else { "" };
            format!("{m}{mark}")
        })
        .collect();
    format!(
        "{}  {:<6}  {:<16}  {}",
        r.room,
        r.kind.as_str(),
        r.name.as_deref().unwrap_or("-"),
        members.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(direction: ContactDirection, state: ContactState) -> ContactInfo {
        ContactInfo {
            user: "alice@chirp.test".into(),
            direction,
            state,
        }
    }

    #[test]
    fn contacts_read_as_sentences() {
        let pending = contact(ContactDirection::Incoming, ContactState::Pending);
        assert_eq!(
            describe_contact(&pending),
            "alice@chirp.test wants to contact you"
        );
        let asked = contact(ContactDirection::Outgoing, ContactState::Pending);
        assert_eq!(
            describe_contact(&asked),
            "waiting for alice@chirp.test to accept your contact request"
        );
        let bob = parse_user("bob@wave.test").unwrap();
        assert_eq!(
            AwaitingConsent { user: bob }.to_string(),
            "waiting for bob@wave.test to accept your contact request; the message was not sent"
        );
    }

    #[test]
    fn chat_lines_are_text_or_commands() {
        assert_eq!(ChatInput::parse("  hello  "), ChatInput::Text("hello"));
        assert_eq!(ChatInput::parse(""), ChatInput::Nothing);
        assert_eq!(ChatInput::parse("/quit"), ChatInput::Quit);
        assert_eq!(
            ChatInput::parse("/reply #01ab23cd45ef right on"),
            ChatInput::Reply {
                id: "01ab23cd45ef",
                text: "right on"
            }
        );
        assert_eq!(
            ChatInput::parse("/react 01ab23cd \u{1f44d}"),
            ChatInput::React {
                id: "01ab23cd",
                emoji: "\u{1f44d}"
            }
        );
        assert_eq!(
            ChatInput::parse("/edit 01ab23cd  fixed  text "),
            ChatInput::Edit {
                id: "01ab23cd",
                text: "fixed  text"
            }
        );
        assert_eq!(
            ChatInput::parse("/delete 01ab23cd"),
            ChatInput::Delete { id: "01ab23cd" }
        );
        for usage in [
            "/react 01ab23cd",
            "/delete",
            "/delete a b",
            "/shrug",
            "/edit",
        ] {
            assert_eq!(ChatInput::parse(usage), ChatInput::Usage, "{usage}");
        }
    }

    #[test]
    fn rich_events_read_as_lines() {
        let room = RoomId::parse("mimi://chirp.test/r/00112233445566778899aabbccddeeff").unwrap();
        let alice = parse_user("alice@chirp.test").unwrap();
        let (id, target) = (MessageId([0x01; 32]), MessageId([0xab; 32]));
        let reply = Event::Message {
            room: room.clone(),
            sender: alice.clone(),
            id,
            text: "**yes**".into(),
            ts: 1,
            reply_to: Some(target),
            expires_at: Some(10_500),
            file: None,
            name: None,
        };
        assert_eq!(
            describe(&reply, 1_000),
            "[00112233] alice@chirp.test (reply to #abababababab): **yes** (disappears in 10s)  #010101010101"
        );
        let cases = [
            (
                Event::Reaction {
                    room: room.clone(),
                    sender: alice.clone(),
                    target,
                    emoji: "+1".into(),
                },
                "[00112233] alice@chirp.test reacted +1 to #abababababab",
            ),
            (
                Event::Edit {
                    room: room.clone(),
                    sender: alice.clone(),
                    target,
                    text: "new".into(),
                },
                "[00112233] alice@chirp.test edited #abababababab: new",
            ),
            (
                Event::Delete {
                    room: room.clone(),
                    sender: alice.clone(),
                    target,
                },
                "[00112233] alice@chirp.test deleted #abababababab",
            ),
            (
                Event::Receipt {
                    room: room.clone(),
                    sender: alice.clone(),
                    target,
                    status: ReceiptStatus::Read,
                },
                "[00112233] alice@chirp.test read #abababababab",
            ),
            (
                Event::Receipt {
                    room: room.clone(),
                    sender: alice.clone(),
                    target,
                    status: ReceiptStatus::Delivered,
                },
                "[00112233] alice@chirp.test received #abababababab",
            ),
            (
                Event::Undecodable {
                    room: room.clone(),
                    sender: alice.clone(),
                    ts: 1,
                    detail: "not CBOR".into(),
                },
                "[00112233] alice@chirp.test sent a message that cannot be decoded (not CBOR)",
            ),
        ];
        for (event, line) in cases {
            assert_eq!(describe(&event, 0), line);
        }
        let file = Event::Message {
            room: room.clone(),
            sender: alice.clone(),
            id,
            text: "[file a.png]".into(),
            ts: 1,
            reply_to: None,
            expires_at: None,
            file: Some("/p/downloads/a.png".into()),
            name: Some("a.png".into()),
        };
        assert_eq!(
            describe(&file, 0),
            "[00112233] alice@chirp.test: [file a.png] (saved to /p/downloads/a.png)  #010101010101"
        );
        let mut h = HistoryEntry::new(room, 1, alice.clone(), id, "hi".into(), 1);
        h.edited = true;
        h.reactions.push(parley_client::Reaction {
            sender: alice,
            emoji: "+1".into(),
        });
        assert_eq!(
            history_line(&h),
            "alice@chirp.test: hi (edited) [+1 alice@chirp.test]  #010101010101"
        );
        h.deleted = true;
        h.text.clear();
        h.reactions.clear();
        assert_eq!(
            history_line(&h),
            "alice@chirp.test: [deleted]  #010101010101"
        );
    }

    #[test]
    fn rooms_read_as_lines() {
        let room = RoomId::parse("mimi://chirp.test/r/00112233445566778899aabbccddeeff").unwrap();
        assert_eq!(short(&room), "00112233");
        assert_eq!(short(&RoomId::parse("indie.test/r/club").unwrap()), "club");
        let summary = RoomSummary {
            room,
            kind: parley_proto::api::RoomKind::Group,
            name: Some("team".into()),
            members: vec![
                parse_user("alice@chirp.test").unwrap(),
                parse_user("bob@wave.test").unwrap(),
            ],
            admins: vec![parse_user("alice@chirp.test").unwrap()],
            epoch: 3,
        };
        assert_eq!(
            room_line(&summary),
            "mimi://chirp.test/r/00112233445566778899aabbccddeeff  group   team              \
             alice@chirp.test*, bob@wave.test"
        );
    }

    #[test]
    fn missing_consent_errors_say_how_to_ask() {
        let e = consent_hint(
            ClientError::NoConsent("bob@wave.test has not consented".into()),
            "bob@wave.test",
        );
        let line = format!("{e:#}");
        assert!(
            line.contains("parley contact request bob@wave.test")
                && line.contains("bob@wave.test has not consented"),
            "{line}"
        );
        let other = consent_hint(ClientError::NotRegistered, "bob@wave.test");
        assert!(!format!("{other:#}").contains("contact request"));
    }
}
