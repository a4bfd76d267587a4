//! `parley demo`: one in-process provider hosting two domains; four users chat 1:1 and in a group
//! (with a member added and one removed), and each device prints what it decrypted. It checks
//! what it shows: the demo fails if any device misses a message or reads one it must not.

use anyhow::{bail, Context};
use parley_client::{Device, Event};
use parley_proto::{RoomId, UserId};
use parley_server::config::ServerConfig;
use parley_server::Server;
use std::time::Instant;

struct Person {
    name: &'static str,
    device: Device,
}

impl Person {
    fn id(&self) -> UserId {
        self.device.user().clone()
    }

    /// Syncs and prints each message as this device decrypted it; returns the texts.
    async fn read(&mut self, room: &RoomId) -> anyhow::Result<Vec<String>> {
        let mut texts = Vec::new();
        for event in self.device.sync(None).await? {
            match &event {
                Event::Message {
                    room: r,
                    sender,
                    text,
                    ..
                } if r == room => {
                    println!("    {:<7} sees  {sender}: {text}", self.name);
                    texts.push(text.clone());
                }
                Event::Joined { room: r, .. } if r == room => {
                    println!("    {:<7} joined the room (MLS Welcome)", self.name)
                }
                Event::Removed { room: r } if r == room => {
                    println!("    {:<7} was removed from the room", self.name)
                }
                Event::Error { detail, .. } => {
                    bail!("{} could not process an entry: {detail}", self.name)
                }
                _ => {}
            }
        }
        Ok(texts)
    }

    async fn say(&mut self, room: &RoomId, text: &str) -> anyhow::Result<()> {
        self.device.send_text(room, text).await?;
        println!("  {} says: {text}", self.name);
        Ok(())
    }
}

fn expect(who: &str, got: &[String], want: &[&str]) -> anyhow::Result<()> {
    if got != want {
        bail!("{who} decrypted {got:?}, expected {want:?}");
    }
    Ok(())
}

pub async fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        data: dir.path().join("server"),
        ..Default::default()
    };
    config.add_domain("chirp.test");
    config.add_domain("wave.test");
    let server = Server::start(config).await?;
    let url = server.url();
    println!(
        "Parley demo: one provider at {url} hosting chirp.test and wave.test (data: SQLite, WAL)"
    );

    let mut people = Vec::new();
    for (name, user) in [
        ("alice", "alice@chirp.test"),
        ("bob", "bob@wave.test"),
        ("carol", "carol@chirp.test"),
        ("dave", "dave@wave.test"),
    ] {
        let user = UserId::parse(user)?;
        let device = Device::register(
            &dir.path().join(name),
            &url,
            &user,
            Some("demo-password"),
            None,
            None,
        )
        .await?;
        println!(
            "registered {user} (device {}, own MLS signature key)",
            device.device_id()
        );
        people.push(Person { name, device });
    }
    let [mut alice, mut bob, mut carol, mut dave]: [Person; 4] = people
        .try_into()
        .map_err(|_| anyhow::anyhow!("four people"))?;

    println!("\n1:1 across domains: alice@chirp.test <-> bob@wave.test");
    let direct = alice.device.direct_room(&bob.id()).await?;
    alice
        .say(&direct, "Hi Bob! This is end-to-end encrypted with MLS.")
        .await?;
    expect(
        "bob",
        &bob.read(&direct).await?,
        &["Hi Bob! This is end-to-end encrypted with MLS."],
    )?;
    bob.say(&direct, "Hi Alice, the server only ever saw ciphertext.")
        .await?;
    expect(
        "alice",
        &alice.read(&direct).await?,
        &["Hi Alice, the server only ever saw ciphertext."],
    )?;

    println!("\nGroup \"team\": alice creates it with bob and carol");
    let team = alice
        .device
        .create_room(Some("team"), &[bob.id(), carol.id()])
        .await?;
    alice.say(&team, "Welcome to the team room.").await?;
    for p in [&mut bob, &mut carol] {
        expect(
            p.name,
            &p.read(&team).await?,
            &["Welcome to the team room."],
        )?;
    }
    println!("  carol adds dave");
    carol.device.add_member(&team, &dave.id()).await?;
    dave.read(&team).await?;
    dave.say(&team, "Thanks for adding me!").await?;
    for p in [&mut alice, &mut bob, &mut carol] {
        expect(p.name, &p.read(&team).await?, &["Thanks for adding me!"])?;
    }
    println!("  alice removes bob");
    alice.device.remove_member(&team, &bob.id()).await?;
    bob.read(&team).await?;
    alice
        .say(&team, "Bob has left; he cannot read this.")
        .await?;
    for p in [&mut carol, &mut dave] {
        expect(
            p.name,
            &p.read(&team).await?,
            &["Bob has left; he cannot read this."],
        )?;
    }
    let bob_after = bob.read(&team).await?;
    expect("bob (removed)", &bob_after, &[])?;
    println!("    bob     sees  nothing: he is no longer in the group");

    println!("\nWhat each device holds (decrypted locally, stored in its own profile):");
    for p in [&alice, &bob, &carol, &dave] {
        for (label, room) in [("1:1 ", &direct), ("team", &team)] {
            let history = p.device.history(room, 100)?;
            if history.is_empty() {
                continue;
            }
            println!("  {} / {label}:", p.name);
            for h in history {
                println!("      {}: {}", h.sender, h.text);
            }
        }
    }
    server.shutdown().await;
    println!(
        "\ndemo finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
