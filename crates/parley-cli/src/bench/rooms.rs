//! `parley bench --room-members N1,N2,…`: what one big group costs, at each size. For every size
//! the load tool (one in-process server, real devices and MLS) makes a room of that many member
//! devices, then times, each a few times: adding one more member (the owner claims its
//! KeyPackage, builds the MLS commit; the hub verifies it, checks policy and stores it with a
//! Welcome and a queue entry per member device), that member joining (its sync takes the
//! Welcome with the whole ratchet tree), one message fanned out (the hub's durable commit of a
//! queue entry per member device, answered), and the member's removal. Each is timed end to
//! end at the client and, from the server's `/metrics` (`parley_commit_seconds_total`,
//! `parley_message_seconds_total`), inside the hub alone. Medians are printed, one row per size.

use super::register;
use anyhow::{bail, Context};
use parley_client::{Device, Event};
use parley_proto::{RoomId, UserId};
use parley_server::config::ServerConfig;
use parley_server::Server;
use std::time::{Duration, Instant};

/// Times each measurement is taken per size; the median is reported.
const REPEATS: usize = 3;
/// Registrations run at once while members are made.
const REGISTERING: usize = 4;

/// What one size measured (medians).
struct Row {
    members: usize,
    create: Duration,
    /// (end to end, in the hub)
    add: (Duration, Duration),
    join: Duration,
    fan_out: (Duration, Duration),
    remove: (Duration, Duration),
}

/// A hub time counter from the server's metrics.
async fn hub_time(api: &parley_client::ApiClient, counter: &str) -> anyhow::Result<Duration> {
    let text = api.metrics().await?;
    let seconds = text
        .lines()
        .find_map(|l| l.strip_prefix(counter)?.trim().parse::<f64>().ok())
        .with_context(|| format!("no {counter} in the server's metrics"))?;
    Ok(Duration::from_secs_f64(seconds))
}

/// Runs `work`, timing it end to end and by the hub's `counter`.
async fn timed_both<T>(
    api: &parley_client::ApiClient,
    counter: &str,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(Duration, Duration)> {
    let before = hub_time(api, counter).await?;
    let (_, total) = timed(work).await?;
    let hub = hub_time(api, counter).await?.saturating_sub(before);
    Ok((total, hub))
}

fn median_pair(samples: Vec<(Duration, Duration)>) -> (Duration, Duration) {
    let (a, b): (Vec<_>, Vec<_>) = samples.into_iter().unzip();
    (median(a), median(b))
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

async fn timed<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Duration)> {
    let started = Instant::now();
    let value = work.await?;
    Ok((value, started.elapsed()))
}

pub async fn run(sizes: &[usize]) -> anyhow::Result<()> {
    let mut sizes = sizes.to_vec();
    sizes.sort_unstable();
    let largest = *sizes
        .last()
        .context("--room-members needs at least one size")?;
    if sizes[0] < 2 {
        bail!("a room has at least 2 members");
    }
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        data: tmp.path().join("server"),
        ..Default::default()
    };
    config.add_domain("bench.test");
    super::unlimited(&mut config);
    config.limits.registrations_per_minute = 1e9;
    // A commit adding many members carries a Welcome with a secret per member.
    config.limits.max_body_bytes = 256 << 20;
    for d in &mut config.domains {
        d.max_room_devices = largest + 10;
    }
    let server = Server::start(config).await?;
    let url = server.url();
    let dir = tmp.path().to_owned();
    let mut owner = register(
        &dir.join("owner"),
        &url,
        &UserId::parse("owner@bench.test")?,
    )
    .await?;
    let mut members: Vec<UserId> = Vec::new();
    let mut rows = Vec::new();
    for &n in &sizes {
        eprintln!("registering {} member devices ...", n - 1 - members.len());
        let more = register_members(&dir, &url, members.len(), n - 1).await?;
        members.extend(more);
        eprintln!("{n} members: creating the room ...");
        let name = format!("big{n}");
        let (room, create) =
            timed(async { Ok(owner.create_room(Some(&name), &members[..n - 1]).await?) }).await?;
        let joiner_id = UserId::parse(&format!("joiner{n}@bench.test"))?;
        let mut joiner = register(&dir.join(format!("joiner{n}")), &url, &joiner_id).await?;
        let (mut add, mut join, mut fan_out, mut remove) = (vec![], vec![], vec![], vec![]);
        let api = owner.api().clone();
        const COMMITS: &str = "parley_commit_seconds_total";
        const MESSAGES: &str = "parley_message_seconds_total";
        for _ in 0..REPEATS {
            let t = timed_both(&api, COMMITS, async {
                Ok(owner.add_member(&room, &joiner_id).await?)
            })
            .await?;
            add.push(t);
            let ((), t) = timed(joined(&mut joiner, &room)).await?;
            join.push(t);
            let t = timed_both(&api, MESSAGES, async {
                Ok(owner.send_text(&room, "to everyone").await?)
            })
            .await?;
            fan_out.push(t);
            let t = timed_both(&api, COMMITS, async {
                Ok(owner.remove_member(&room, &joiner_id).await?)
            })
            .await?;
            remove.push(t);
            // The joiner takes its removal, so it can be added again.
            joiner.sync(Some(Duration::from_millis(100))).await?;
        }
        rows.push(Row {
            members: n,
            create,
            add: median_pair(add),
            join: median(join),
            fan_out: median_pair(fan_out),
            remove: median_pair(remove),
        });
        print_row(rows.last().context("no row")?);
    }
    println!();
    println!("medians of {REPEATS}, ms; 'hub' is the hub's own time (checks, MLS verification, durable commit)");
    println!("room members  create room   add member  add (hub)  member joins  fan-out 1 msg  fan-out (hub)  remove member  remove (hub)");
    for r in &rows {
        print_row(r);
    }
    server.shutdown().await;
    Ok(())
}

fn print_row(r: &Row) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{:>12}  {:>11.1}  {:>11.2}  {:>9.2}  {:>12.2}  {:>13.2}  {:>13.2}  {:>13.2}  {:>12.2}",
        r.members,
        ms(r.create),
        ms(r.add.0),
        ms(r.add.1),
        ms(r.join),
        ms(r.fan_out.0),
        ms(r.fan_out.1),
        ms(r.remove.0),
        ms(r.remove.1)
    );
}

/// Registers members number `from..to` (`m{i}@bench.test`), a few at a time; their devices
/// are not needed afterwards (their KeyPackages are on the server).
async fn register_members(
    dir: &std::path::Path,
    url: &str,
    from: usize,
    to: usize,
) -> anyhow::Result<Vec<UserId>> {
    let mut workers = Vec::new();
    for w in 0..REGISTERING {
        let (dir, url) = (dir.to_owned(), url.to_owned());
        workers.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for i in (from + w..to).step_by(REGISTERING) {
                let user = UserId::parse(&format!("m{i}@bench.test"))?;
                let device: Device = register(&dir.join(format!("m{i}")), &url, &user).await?;
                drop(device);
                made.push((i, user));
            }
            Ok::<_, anyhow::Error>(made)
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, u)| u).collect())
}

/// Syncs `device` until it has joined `room`.
async fn joined(device: &mut Device, room: &RoomId) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        for event in device.sync(Some(Duration::from_millis(50))).await? {
            if matches!(&event, Event::Joined { room: r, .. } if r == room) {
                return Ok(());
            }
        }
    }
    bail!("{} never joined {room}", device.user())
}
