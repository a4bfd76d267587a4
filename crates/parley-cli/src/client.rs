//! The client commands: `account`, `room`, `contact`, `send`, `sync`, `chat`.

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use parley_client::{ClientError, Device, Event};
use parley_proto::api::{ContactDirection, ContactInfo, ContactState};
use parley_proto::{RoomId, UserId};
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

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
    /// Log in a further device of an existing user.
    Login {
        user: String,
        #[arg(long)]
        server: String,
        #[arg(long)]
        password: String,
    },
    /// List this user's devices.
    Devices,
}

#[derive(Debug, Subcommand)]
pub enum RoomCommand {
    /// Create a group room with the given members; prints the room id on the last line.
    Create {
        #[arg(long)]
        name: Option<String>,
        /// Members to add, `handle@domain`.
        members: Vec<String>,
    },
    /// Add a user (all their devices) to a room.
    Add { room: String, user: String },
    /// Remove a user (all their devices) from a room.
    Remove { room: String, user: String },
    /// Leave a group room with this device (another member completes the removal).
    Leave { room: String },
    /// List the rooms this device is in.
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
                for d in device.api().devices().await? {
                    let me = if d.device_id == device.device_id().as_str() {
                        " (this device)"
                    } else {
                        ""
                    };
                    println!("{}  {}{me}", d.device_id, d.name);
                }
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
                for r in device.rooms().await? {
                    let members: Vec<String> = r.members.iter().map(ToString::to_string).collect();
                    println!(
                        "{}  {:<6}  {:<16}  {}",
                        r.room,
                        r.kind.as_str(),
                        r.name.as_deref().unwrap_or("-"),
                        members.join(", ")
                    );
                }
            }
        }
        Ok(())
    }

    pub async fn contact(&self, cmd: ContactCommand) -> anyhow::Result<()> {
        let device = self.open()?;
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

    pub async fn send(&self, target: &str, text: &str) -> anyhow::Result<()> {
        let mut device = self.open()?;
        if target.contains('@') {
            return send_direct_or_ask(&mut device, &parse_user(target)?, text).await;
        }
        let room = resolve_room(&mut device, target).await?;
        let sent = device.send_text(&room, text).await?;
        println!("sent {} to {room}", sent.id);
        Ok(())
    }

    pub async fn sync(&self, wait: Option<u64>, json: bool) -> anyhow::Result<()> {
        let mut device = self.open()?;
        let events = device.sync(wait.map(Duration::from_secs)).await?;
        let mut out = std::io::stdout().lock();
        for event in &events {
            if json {
                writeln!(out, "{}", serde_json::to_string(event)?)?;
            } else {
                writeln!(out, "{}", describe(event))?;
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
        for h in device.history(&room, 20)? {
            println!("{}: {}", h.sender, h.text);
        }
        let mut live = device.live().await?;
        for event in device.apply(&mut live, Vec::new()).await? {
            show_in_chat(&room, &event);
        }
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            tokio::select! {
                batch = live.recv() => {
                    for event in device.apply(&mut live, batch?).await? {
                        show_in_chat(&room, &event);
                    }
                }
                line = lines.next_line() => {
                    let Some(line) = line? else { break };
                    let line = line.trim();
                    if line == "/quit" {
                        break;
                    }
                    if !line.is_empty() {
                        device.send_text(&room, line).await?;
                    }
                }
            }
        }
        live.close().await;
        Ok(())
    }
}

/// Sends `text` in the direct room with `peer`, finding or creating it. Without `peer`'s consent
/// (no room can be created, or they blocked us in the existing one), asks for it (the request is
/// idempotent) and fails with [`AwaitingConsent`]; should consent turn out to be there by now,
/// tries once more.
async fn send_direct_or_ask(device: &mut Device, peer: &UserId, text: &str) -> anyhow::Result<()> {
    match send_direct(device, peer, text).await {
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
        ContactState::Granted => send_direct(device, peer, text)
            .await
            .map_err(|e| consent_hint(e, &peer.to_string())),
        ContactState::Blocked => {
            bail!("{peer} does not accept contact requests from you; the message was not sent")
        }
    }
}

async fn send_direct(device: &mut Device, peer: &UserId, text: &str) -> Result<(), ClientError> {
    let room = device.direct_room(peer).await?;
    let sent = device.send_text(&room, text).await?;
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

/// Accepts a room id, or a unique room name.
async fn resolve_room(device: &mut Device, room: &str) -> anyhow::Result<RoomId> {
    if let Ok(id) = RoomId::parse(room) {
        return Ok(id);
    }
    let matches: Vec<RoomId> = device
        .rooms()
        .await?
        .into_iter()
        .filter(|r| r.name.as_deref() == Some(room))
        .map(|r| r.room)
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no room with id or name {room:?}"),
        _ => bail!("several rooms are named {room:?}: use the room id"),
    }
}

fn describe(event: &Event) -> String {
    match event {
        Event::Message {
            room, sender, text, ..
        } => format!("[{}] {sender}: {text}", short(room)),
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

fn show_in_chat(room: &RoomId, event: &Event) {
    match event {
        Event::Message {
            room: r,
            sender,
            text,
            ..
        } if r == room => println!("{sender}: {text}"),
        other => println!("{}", describe(other)),
    }
}

fn short(room: &RoomId) -> &str {
    &room.as_str()[..8]
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
