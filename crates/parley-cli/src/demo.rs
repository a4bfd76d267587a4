//! `parley demo`: three independent providers in one process (chirp.test, wave.test, ping.test),
//! each with its own embedded database, client API and MIMI federation listener, authenticated to
//! each other with mutual TLS from a throwaway `dev-ca`. Users on each ask for consent, chat 1:1
//! across providers and in a group spanning all three (a member added by a follower-side user,
//! one removed), and every device prints what it decrypted. It checks what it shows: the demo
//! fails if any device misses a message or reads one it must not.

use crate::local_net;
use anyhow::{bail, Context};
use parley_client::{ClientError, Device, Event};
use parley_proto::{RoomId, UserId};
use std::time::{Duration, Instant};

const PROVIDERS: [&str; 3] = ["chirp.test", "wave.test", "ping.test"];
/// How long a device waits for a message to cross providers before the demo fails.
const CROSSING: Duration = Duration::from_secs(10);

struct Person {
    name: &'static str,
    device: Device,
}

impl Person {
    fn id(&self) -> UserId {
        self.device.user().clone()
    }

    /// Syncs (waiting for pushes) until `want` messages of `room` arrived, printing each as
    /// this device decrypted it. With `want == 0`, checks for a moment that nothing arrives.
    async fn read(&mut self, room: &RoomId, want: usize) -> anyhow::Result<Vec<String>> {
        let started = Instant::now();
        let patience = if want == 0 {
            Duration::from_millis(400)
        } else {
            CROSSING
        };
        let mut texts = Vec::new();
        while texts.len() < want || (want == 0 && started.elapsed() < patience) {
            if started.elapsed() > patience {
                bail!(
                    "{} received {} of {want} messages in time",
                    self.name,
                    texts.len()
                );
            }
            for event in self.device.sync(Some(Duration::from_millis(200))).await? {
                self.show(room, &event, &mut texts)?;
            }
        }
        Ok(texts)
    }

    /// Syncs until this device has joined `room` (its Welcome crossed providers).
    async fn join(&mut self, room: &RoomId) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < CROSSING {
            let mut joined = false;
            for event in self.device.sync(Some(Duration::from_millis(200))).await? {
                joined |= matches!(&event, Event::Joined { room: r, .. } if r == room);
                self.show(room, &event, &mut Vec::new())?;
            }
            if joined {
                return Ok(());
            }
        }
        bail!("{} never joined the room", self.name)
    }

    fn show(&self, room: &RoomId, event: &Event, texts: &mut Vec<String>) -> anyhow::Result<()> {
        match event {
            Event::Message {
                room: r,
                sender,
                text,
                ..
            } if r == room => {
                println!("    {:<6} sees  {sender}: {text}", self.name);
                texts.push(text.clone());
            }
            Event::Joined { room: r, .. } if r == room => {
                println!("    {:<6} joined the room (MLS Welcome)", self.name)
            }
            Event::Removed { room: r } if r == room => {
                println!("    {:<6} was removed from the room", self.name)
            }
            Event::Error { detail, .. } => {
                bail!("{} could not process an entry: {detail}", self.name)
            }
            _ => {}
        }
        Ok(())
    }

    async fn say(&mut self, room: &RoomId, text: &str) -> anyhow::Result<()> {
        self.device.send_text(room, text).await?;
        println!("  {} says: {text}", self.name);
        Ok(())
    }

    /// `from` asks this person for consent; this person accepts once the request arrived.
    async fn consent_to(&self, from: &Person) -> anyhow::Result<()> {
        from.device.api().contact_request(&self.id()).await?;
        let started = Instant::now();
        loop {
            let pending = self.device.api().contact_requests().await?;
            if pending.iter().any(|c| c.user == from.id().to_string()) {
                break;
            }
            if started.elapsed() > CROSSING {
                bail!(
                    "{}'s contact request never reached {}",
                    from.name,
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.device.api().contact_accept(&from.id()).await?;
        println!(
            "  {} asked {} for consent; {} accepted",
            from.id(),
            self.id(),
            self.name
        );
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
    println!("Parley demo: three independent providers talking MIMI (each: SQLite in WAL mode)");
    let servers = local_net::start(dir.path(), &PROVIDERS, |_| {}).await?;
    for (domain, server) in PROVIDERS.iter().zip(&servers) {
        println!(
            "provider {domain:<10} clients: {}  federation (mutual TLS): https://{}",
            server.url(),
            server
                .federation_addr()
                .map_or_else(String::new, |a| a.to_string())
        );
    }

    let mut people = Vec::new();
    for (name, user, provider) in [
        ("alice", "alice@chirp.test", 0),
        ("bob", "bob@wave.test", 1),
        ("carol", "carol@ping.test", 2),
        ("dave", "dave@ping.test", 2),
    ] {
        let user = UserId::parse(user)?;
        let device = Device::register(
            &dir.path().join(name),
            &servers[provider].url(),
            &user,
            Some("demo-password"),
            None,
            None,
        )
        .await?;
        println!(
            "registered {user} on its provider (device {}, own MLS signature key)",
            device.device_id()
        );
        people.push(Person { name, device });
    }
    let [mut alice, mut bob, mut carol, mut dave]: [Person; 4] = people
        .try_into()
        .map_err(|_| anyhow::anyhow!("four people"))?;

    println!("\nConsent first: alice@chirp.test tries to message bob@wave.test");
    match alice.device.direct_room(&bob.id()).await {
        Err(ClientError::NoConsent(_)) => {
            println!("  refused by wave.test: bob has not consented (MIMI noConsent)")
        }
        Ok(_) => bail!("a room with bob was created without his consent"),
        Err(e) => return Err(e.into()),
    }
    bob.consent_to(&alice).await?;

    println!("\n1:1 across providers: alice@chirp.test <-> bob@wave.test (hub: chirp.test)");
    let direct = alice.device.direct_room(&bob.id()).await?;
    alice
        .say(
            &direct,
            "Hi Bob! End-to-end encrypted with MLS, across providers.",
        )
        .await?;
    expect(
        "bob",
        &bob.read(&direct, 1).await?,
        &["Hi Bob! End-to-end encrypted with MLS, across providers."],
    )?;
    bob.say(&direct, "Hi Alice, neither provider saw plaintext.")
        .await?;
    expect(
        "alice",
        &alice.read(&direct, 1).await?,
        &["Hi Alice, neither provider saw plaintext."],
    )?;

    println!("\nGroup \"trio\" spanning chirp.test, wave.test and ping.test (hub: chirp.test)");
    carol.consent_to(&alice).await?;
    let trio = alice
        .device
        .create_room(Some("trio"), &[bob.id(), carol.id()])
        .await?;
    bob.join(&trio).await?;
    carol.join(&trio).await?;
    alice.say(&trio, "Welcome, wave and ping!").await?;
    for p in [&mut bob, &mut carol] {
        expect(
            p.name,
            &p.read(&trio, 1).await?,
            &["Welcome, wave and ping!"],
        )?;
    }
    carol
        .say(&trio, "Hello from ping.test (relayed through the hub).")
        .await?;
    for p in [&mut alice, &mut bob] {
        expect(
            p.name,
            &p.read(&trio, 1).await?,
            &["Hello from ping.test (relayed through the hub)."],
        )?;
    }
    println!("  alice (the room's creator, its admin) makes bob an admin; only admins add users");
    alice.device.promote(&trio, &bob.id()).await?;
    println!("  bob (wave.test) adds dave (ping.test); the commit goes to the hub at chirp.test");
    dave.consent_to(&bob).await?;
    bob.device.add_member(&trio, &dave.id()).await?;
    dave.join(&trio).await?;
    dave.say(&trio, "Thanks for adding me, Bob!").await?;
    for p in [&mut alice, &mut bob, &mut carol] {
        expect(
            p.name,
            &p.read(&trio, 1).await?,
            &["Thanks for adding me, Bob!"],
        )?;
    }
    println!("  alice removes carol");
    alice.device.remove_member(&trio, &carol.id()).await?;
    alice
        .say(&trio, "Carol has left; she cannot read this.")
        .await?;
    for p in [&mut bob, &mut dave] {
        expect(
            p.name,
            &p.read(&trio, 1).await?,
            &["Carol has left; she cannot read this."],
        )?;
    }
    expect("carol (removed)", &carol.read(&trio, 0).await?, &[])?;
    println!("    carol  sees  nothing: she is no longer in the group");

    println!("\nWhat each device holds (decrypted locally, stored in its own profile):");
    for p in [&alice, &bob, &carol, &dave] {
        for (label, room) in [("1:1 ", &direct), ("trio", &trio)] {
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

    println!("\nDelivery summary (from each provider's /metrics):");
    for (domain, server) in PROVIDERS.iter().zip(&servers) {
        println!("  {domain}: {}", delivery_summary(&server.url()).await?);
    }
    for server in servers {
        server.shutdown().await;
    }
    println!(
        "\ndemo finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One line from a provider's metrics: what its hub accepted, and per peer what it delivered
/// and what is still queued.
async fn delivery_summary(url: &str) -> anyhow::Result<String> {
    let api = parley_client::ApiClient::new(url, None)?;
    let text = api.metrics().await?;
    let value = |line: &str| line.rsplit(' ').next().unwrap_or("0").to_owned();
    let mut parts = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("parley_messages_accepted_total ") {
            parts.push(format!("{rest} messages accepted as hub"));
        } else if let Some(rest) = line.strip_prefix("parley_peer_delivered_total{peer=\"") {
            let peer = rest.split('"').next().unwrap_or("?");
            parts.push(format!("{} delivered to {peer}", value(line)));
        } else if let Some(rest) = line.strip_prefix("parley_peer_queue_depth{peer=\"") {
            let peer = rest.split('"').next().unwrap_or("?");
            parts.push(format!("{} queued for {peer}", value(line)));
        }
    }
    Ok(parts.join(", "))
}
