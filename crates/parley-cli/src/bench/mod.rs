//! `parley bench`: the load tool. Drives N sender/receiver device pairs through one server (or,
//! with `--federated`, from one provider to another over MIMI) and reports durable messages/s and
//! send→deliver latency percentiles.
//!
//! With `--ramp R1,R2,…` it runs open-loop steps of fixed rates against a `parley serve` child
//! process and, with `--xmpp`, against an XMPP server side by side (`ramp`, `xmpp`).
//!
//! With `--room-members N1,N2,…` it times commits, joins and fan-out in rooms of those sizes
//! (`rooms`).
//!
//! With `--asset-mb N` it instead uploads one N MiB attachment to a `parley serve` child
//! process and downloads it back, reporting throughput each way and the server's memory.
//!
//! Setup uses the real client (registration, MLS rooms, Welcome) and pre-encrypts every message
//! of the run (each a distinct MLS PrivateMessage, as real senders make them: a follower drops a
//! repeated one as a retry), so the timed phase measures the server (validation, ordering,
//! durable fan-out, push) rather than client-side encryption; receivers take entries from the
//! WebSocket push channel and ack them, as real clients do. A delivery is matched to its send
//! by the message's bytes (a follower's entries carry no hub event number).

mod ramp;
mod rooms;
mod xmpp;

use anyhow::{bail, Context};
use clap::Args;
use parley_client::{ApiClient, Device};
use parley_proto::api::SendRequest;
use parley_proto::{RoomId, UserId};
use parley_server::config::ServerConfig;
use parley_server::Server;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Server to load; default: start one in-process with its data in a temporary directory.
    #[arg(long)]
    pub server: Option<String>,
    /// Sender/receiver pairs, each with its own 1:1 room.
    #[arg(long, default_value_t = 50)]
    pub pairs: usize,
    /// Messages to send in the timed phase.
    #[arg(long, default_value_t = 20_000)]
    pub messages: u64,
    /// Target send rate in messages/s across all senders; 0 sends as fast as the server answers.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Data directory for the in-process server (default: a temporary directory).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Payload text size in bytes before encryption.
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    /// Instead of relaying messages, hold this many idle push connections open against a
    /// `parley serve` child process and report the server's memory per connection.
    #[arg(long)]
    pub idle_connections: Option<usize>,
    /// Senders on one in-process provider, receivers on another: every message crosses
    /// providers (hub → durable outbox → MIMI notify over mutual TLS → follower queue → push).
    #[arg(long, conflicts_with = "server")]
    pub federated: bool,
    /// Instead of relaying messages, upload one attachment of this many MiB (generated on the
    /// fly, streamed) to a `parley serve` child process and download it back: MiB/s each way
    /// and the server's peak memory during each transfer.
    #[arg(long, value_name = "MIB", conflicts_with_all = ["server", "federated", "idle_connections"])]
    pub asset_mb: Option<u64>,
    /// Open-loop steps at these offered rates (messages/s, comma-separated), each held for
    /// --step-secs, against a `parley serve` child process (and, with --xmpp, an XMPP server
    /// driven the same way); one table of latency from each message's due time, server CPU and
    /// memory, and the highest sustained rate.
    #[arg(long, value_name = "RATES", value_delimiter = ',', conflicts_with_all = ["server", "federated", "idle_connections", "asset_mb"])]
    pub ramp: Option<Vec<u64>>,
    /// Seconds each --ramp step is held.
    #[arg(long, default_value_t = 10)]
    pub step_secs: u64,
    /// A --ramp step is sustained only if its p99 latency is at most this.
    #[arg(long, default_value_t = 100.0)]
    pub p99_limit_ms: f64,
    /// With --ramp: also drive this XMPP server (plain c2s, in-band registration, SASL PLAIN)
    /// with the same pairs, rates and steps, alternating with Parley step by step.
    #[arg(long, value_name = "HOST:PORT", requires = "ramp")]
    pub xmpp: Option<std::net::SocketAddr>,
    /// The XMPP server's domain.
    #[arg(long, default_value = "xmpp.bench", requires = "xmpp")]
    pub xmpp_domain: String,
    /// The XMPP server's process id, for its CPU and memory in the table.
    #[arg(long, requires = "xmpp")]
    pub xmpp_pid: Option<u32>,
    /// How --ramp's Parley senders send: over their push WebSocket (binary frames) or one
    /// HTTP request per message.
    #[arg(long, value_enum, default_value = "ws")]
    pub send_over: ramp::SendOver,
    /// Instead of relaying 1:1 messages, make one room of each of these sizes (member devices,
    /// comma-separated) and time adding a member, its join, one message fanned out to all and
    /// the removal.
    #[arg(long, value_name = "SIZES", value_delimiter = ',', conflicts_with_all = ["server", "federated", "idle_connections", "asset_mb", "ramp"])]
    pub room_members: Option<Vec<usize>>,
    /// With --xmpp: load only the XMPP server.
    #[arg(long, requires = "xmpp")]
    pub xmpp_only: bool,
}

/// Lifts the per-device and per-peer rate limits: the load tool sends far faster than people.
fn unlimited(config: &mut ServerConfig) {
    let l = &mut config.limits;
    l.messages_per_second = 1e9;
    l.message_burst = 1e9;
    l.requests_per_second = 1e9;
    l.request_burst = 1e9;
    l.peer_requests_per_second = 1e9;
    l.peer_request_burst = 1e9;
}

/// A load-tool device of `user` at `server`, its profile in `profile`.
async fn register(
    profile: &std::path::Path,
    server: &str,
    user: &UserId,
) -> anyhow::Result<Device> {
    Ok(Device::register(profile, server, user, Some("bench-password"), None, None).await?)
}

/// One room under load: the sender's authenticated API client and its pre-encrypted messages.
struct Lane {
    api: ApiClient,
    room: RoomId,
    requests: Vec<SendRequest>,
}

/// Send start and delivery times, keyed by [`message_key`].
#[derive(Default)]
struct Timings {
    sent: Mutex<HashMap<u64, Instant>>,
    delivered: Mutex<HashMap<u64, Instant>>,
}

/// Names a message by its bytes, the same at the sender and at the receiving device.
fn message_key(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(n) = args.idle_connections {
        return idle_memory(n).await;
    }
    if let Some(mb) = args.asset_mb {
        return asset_transfer(mb).await;
    }
    if let Some(sizes) = &args.room_members {
        return rooms::run(sizes).await;
    }
    if let Some(rates) = &args.ramp {
        let xmpp = args.xmpp.map(|addr| ramp::XmppServer {
            addr,
            domain: args.xmpp_domain.clone(),
            pid: args.xmpp_pid,
        });
        return ramp::run(&args, rates, xmpp).await;
    }
    if args.pairs == 0 || args.messages == 0 || args.concurrency == 0 {
        bail!("--pairs, --messages and --concurrency must be at least 1");
    }
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    if args.federated {
        return federated(&args, tmp.path()).await;
    }
    let (server, url) = match &args.server {
        Some(url) => (None, url.clone()),
        None => {
            let mut config = ServerConfig {
                listen: "127.0.0.1:0".parse()?,
                data: args
                    .data
                    .clone()
                    .unwrap_or_else(|| tmp.path().join("server")),
                ..Default::default()
            };
            config.add_domain("bench.test");
            unlimited(&mut config);
            let server = Server::start(config).await?;
            let url = server.url();
            (Some(server), url)
        }
    };
    let domain = if args.server.is_some() {
        "localhost"
    } else {
        "bench.test"
    };
    eprintln!("setting up {} pairs on {url} ...", args.pairs);
    let (lanes, receivers) = setup(&args, (&url, domain), (&url, domain), tmp.path()).await?;
    measure(&args, lanes, receivers).await?;
    if let Some(server) = server {
        server.shutdown().await;
    }
    Ok(())
}

/// Two providers in-process: senders on the first (the rooms' hub), receivers on the second.
async fn federated(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let domains = ["hub.test", "follower.test"];
    let servers = crate::local_net::start(dir, &domains, unlimited).await?;
    eprintln!(
        "setting up {} pairs: senders on {} ({}), receivers on {} ({}) ...",
        args.pairs,
        domains[0],
        servers[0].url(),
        domains[1],
        servers[1].url()
    );
    let (lanes, receivers) = setup(
        args,
        (&servers[0].url(), domains[0]),
        (&servers[1].url(), domains[1]),
        dir,
    )
    .await?;
    measure(args, lanes, receivers).await?;
    for server in servers {
        server.shutdown().await;
    }
    Ok(())
}

/// The timed phase: receivers on push, senders posting their pre-encrypted messages.
async fn measure(
    args: &BenchArgs,
    lanes: Vec<Lane>,
    receivers: Vec<parley_client::PushConnection>,
) -> anyhow::Result<()> {
    let timings = Arc::new(Timings::default());
    let received = Arc::new(AtomicU64::new(0));
    let mut listeners = Vec::new();
    for push in receivers {
        listeners.push(tokio::spawn(receive(
            push,
            timings.clone(),
            received.clone(),
        )));
    }
    eprintln!(
        "sending {} messages ({}) ...",
        args.messages,
        rate_label(args.rate)
    );
    let started = Instant::now();
    send_all(args, Arc::new(lanes), timings.clone()).await?;
    let sent_done = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < args.messages && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_done = started.elapsed();
    for l in listeners {
        l.abort();
    }
    report(args, &timings, sent_done, all_done)
}

fn rate_label(rate: u64) -> String {
    if rate == 0 {
        "as fast as possible".into()
    } else {
        format!("at {rate}/s")
    }
}

/// Registers the pairs (senders at `senders`, receivers at `receivers`: URL and domain), gives
/// consent where providers differ, opens each pair's direct room, and pre-encrypts
/// `args.messages` across the lanes.
async fn setup(
    args: &BenchArgs,
    senders: (&str, &str),
    receivers_at: (&str, &str),
    dir: &std::path::Path,
) -> anyhow::Result<(Vec<Lane>, Vec<parley_client::PushConnection>)> {
    let push = parley_client::PushOptions::default();
    let (pairs, receivers) = setup_pairs(args.pairs, senders, receivers_at, dir, push).await?;
    let payload = "x".repeat(args.payload);
    let per_lane = usize::try_from(args.messages.div_ceil(args.pairs as u64))?;
    let mut lanes = Vec::with_capacity(pairs.len());
    for mut pair in pairs {
        let requests = pair
            .sender
            .encrypt_texts(&pair.room, &payload, per_lane)?
            .into_iter()
            .map(|message| SendRequest { message })
            .collect();
        lanes.push(Lane {
            api: pair.sender.api().clone(),
            room: pair.room,
            requests,
        });
    }
    Ok((lanes, receivers))
}

/// A sender device and the direct room it shares with its receiver.
struct Pair {
    sender: Device,
    room: RoomId,
}

/// Registers `count` pairs and opens their rooms; returns them with the receivers' push
/// connections (opened with `push`), in the same order.
async fn setup_pairs(
    count: usize,
    senders: (&str, &str),
    receivers_at: (&str, &str),
    dir: &std::path::Path,
    push: parley_client::PushOptions,
) -> anyhow::Result<(Vec<Pair>, Vec<parley_client::PushConnection>)> {
    let run_id = std::process::id();
    let mut pairs = Vec::with_capacity(count);
    let mut receivers = Vec::with_capacity(count);
    for i in 0..count {
        let sender_id = UserId::parse(&format!("s{run_id}-{i}@{}", senders.1))?;
        let receiver_id = UserId::parse(&format!("r{run_id}-{i}@{}", receivers_at.1))?;
        let mut sender = register(&dir.join(format!("s{i}")), senders.0, &sender_id).await?;
        let mut receiver =
            register(&dir.join(format!("r{i}")), receivers_at.0, &receiver_id).await?;
        if senders.1 != receivers_at.1 {
            // Consent first: the receiver accepts the sender (the answer is the receiver's
            // provider's to give, so no waiting for the request to travel).
            receiver.api().contact_accept(&sender_id).await?;
        }
        let room = sender.direct_room(&receiver_id).await?;
        join(&mut receiver, &room).await?;
        receivers.push(receiver.api().connect_push_opts(push).await?);
        pairs.push(Pair { sender, room });
    }
    Ok((pairs, receivers))
}

/// Syncs until the receiver has joined `room` (its Welcome may have to cross providers).
async fn join(device: &mut Device, room: &RoomId) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        for event in device.sync(Some(Duration::from_millis(200))).await? {
            if matches!(&event, parley_client::Event::Joined { room: r, .. } if r == room) {
                return Ok(());
            }
        }
    }
    bail!("{} never joined its room", device.user())
}

async fn receive(
    mut push: parley_client::PushConnection,
    timings: Arc<Timings>,
    received: Arc<AtomicU64>,
) {
    while let Ok(Some(entries)) = push.next_entries().await {
        let now = Instant::now();
        let Some(last) = entries.last().map(|e| e.seq) else {
            continue;
        };
        if let Ok(mut map) = timings.delivered.lock() {
            for e in &entries {
                if map.insert(message_key(&e.data), now).is_none() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if push.ack(last).await.is_err() {
            return;
        }
    }
}

async fn send_all(
    args: &BenchArgs,
    lanes: Arc<Vec<Lane>>,
    timings: Arc<Timings>,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (lanes, timings, next) = (lanes.clone(), timings.clone(), next.clone());
        let (total, rate) = (args.messages, args.rate);
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), anyhow::Error>(());
                }
                if rate > 0 {
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let n = lanes.len() as u64;
                let lane = &lanes[(i % n) as usize];
                let request = &lane.requests[(i / n) as usize];
                if let Ok(mut map) = timings.sent.lock() {
                    map.insert(message_key(&request.message), Instant::now());
                }
                lane.api.send_message(&lane.room, request).await?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(
    args: &BenchArgs,
    timings: &Timings,
    sent_done: Duration,
    all_done: Duration,
) -> anyhow::Result<()> {
    let sent = timings
        .sent
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let delivered = timings
        .delivered
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut latencies: Vec<Duration> = sent
        .iter()
        .filter_map(|(k, t0)| delivered.get(k).map(|t1| t1.saturating_duration_since(*t0)))
        .collect();
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("pairs            {}", args.pairs);
    println!("offered rate     {}", rate_label(args.rate));
    println!(
        "messages sent    {} (acked durable by the server)",
        sent.len()
    );
    println!("messages deliv.  {}", delivered.len());
    println!("send phase       {:.2} s", sent_done.as_secs_f64());
    println!(
        "throughput       {:.0} messages/s (sent and delivered, over {:.2} s)",
        delivered.len() as f64 / all_done.as_secs_f64(),
        all_done.as_secs_f64()
    );
    println!(
        "latency ms       p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.90)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0)),
    );
    if delivered.len() as u64 != args.messages {
        bail!(
            "only {} of {} messages were delivered",
            delivered.len(),
            args.messages
        );
    }
    Ok(())
}

/// A `parley serve` child process of the load tool, killed on drop.
struct ChildServer {
    child: std::process::Child,
    url: String,
}

impl ChildServer {
    fn spawn(data: &std::path::Path) -> anyhow::Result<Self> {
        Self::spawn_with(data, 20_000, "")
    }

    /// A child server taking up to `max_connections`, whose config file also holds `extra`
    /// (TOML, e.g. a `[[domain]]` table).
    fn spawn_with(
        data: &std::path::Path,
        max_connections: usize,
        extra: &str,
    ) -> anyhow::Result<Self> {
        use std::io::BufRead as _;
        // The load tool connects far faster than a person: lift the per-device limits.
        std::fs::create_dir_all(data)?;
        let config = data.join("bench.toml");
        std::fs::write(
            &config,
            format!(
                "[limits]\nrequests_per_second = 1e9\nrequest_burst = 1e9\n\
                 messages_per_second = 1e9\nmessage_burst = 1e9\nmax_connections = {max_connections}\n{extra}"
            ),
        )?;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args([
                "serve",
                "--domain",
                "bench.test",
                "--listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(data)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot start a parley serve child process")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("parley serving on ")
            .with_context(|| format!("unexpected server output {line:?}"))?
            .to_owned();
        Ok(Self { child, url })
    }

    /// Resident memory of the server process, in KiB.
    fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.child.id())
    }
}

/// Resident memory of process `pid`, in KiB (Linux `/proc`).
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("cannot read the server's /proc status (Linux only)")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc status")
}

/// Samples a process's resident memory every [`RSS_SAMPLE`] until stopped; keeps the peak.
struct RssPeak {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

/// How often [`RssPeak`] samples: short enough to catch a buffer held during a transfer.
const RSS_SAMPLE: Duration = Duration::from_millis(20);

impl RssPeak {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                tokio::time::sleep(RSS_SAMPLE).await;
            }
            peak.max(rss_kib(pid).unwrap_or(0))
        });
        Self { stop, task }
    }

    /// Stops sampling; the highest resident memory seen, in KiB.
    async fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// Pieces the generated upload is produced in.
const ASSET_CHUNK: usize = 256 * 1024;

/// A stream of `len` pseudo-random bytes (xorshift: incompressible), made as it is sent.
fn generated(len: u64) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = len;
    futures_util::stream::iter(std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(ASSET_CHUNK as u64) as usize;
        left -= n as u64;
        let mut chunk = Vec::with_capacity(n + 8);
        while chunk.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.extend_from_slice(&x.to_le_bytes());
        }
        chunk.truncate(n);
        Some(Ok(chunk))
    }))
}

/// Uploads `mb` MiB to a `parley serve` child process and downloads it back, timing each way
/// and sampling the server's memory: a streaming server's memory does not grow with the file.
async fn asset_transfer(mb: u64) -> anyhow::Result<()> {
    if mb == 0 {
        bail!("--asset-mb must be at least 1");
    }
    let len = mb * 1024 * 1024;
    let tmp = tempfile::tempdir()?;
    let domain = format!(
        "[[domain]]\nname = \"bench.test\"\nmax_upload_bytes = {}\n",
        len + 1024 * 1024
    );
    let server = ChildServer::spawn_with(&tmp.path().join("server"), 100, &domain)?;
    let pid = server.child.id();
    let user = UserId::parse("media@bench.test")?;
    let device = register(&tmp.path().join("media"), &server.url, &user).await?;
    let api = device.api().clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib()?;

    eprintln!("uploading {mb} MiB ...");
    let sampler = RssPeak::start(pid);
    let started = Instant::now();
    let uploaded = api.upload_stream(generated(len)).await?;
    let up = started.elapsed();
    let up_peak = sampler.stop().await?;
    if uploaded.size != len {
        bail!("the server stored {} of {len} bytes", uploaded.size);
    }

    eprintln!("downloading it back ...");
    let room = RoomId::parse("00000000000000000000000000000000")?;
    let sampler = RssPeak::start(pid);
    let started = Instant::now();
    let mut hash = sha2::Sha256::default();
    let got = api
        .download_with(&uploaded.url, &room, len, |_, chunk| {
            sha2::Digest::update(&mut hash, chunk)
        })
        .await?;
    let down = started.elapsed();
    let down_peak = sampler.stop().await?;
    let digest = hex_of(&sha2::Digest::finalize(hash));
    if got != len || digest != uploaded.sha256 {
        bail!("the download differs from the upload ({got} bytes, sha256 {digest})");
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let rate = |d: Duration| mb as f64 / d.as_secs_f64();
    println!("asset            {mb} MiB, streamed (generated on the fly, discarded on arrival)");
    println!(
        "upload           {:.0} MiB/s ({:.2} s)",
        rate(up),
        up.as_secs_f64()
    );
    println!(
        "download         {:.0} MiB/s ({:.2} s)",
        rate(down),
        down.as_secs_f64()
    );
    println!(
        "server RSS       {:.1} MiB before; peak {:.1} MiB during the upload (+{:.1}), {:.1} MiB during the download (+{:.1})",
        mib(before),
        mib(up_peak),
        mib(up_peak.saturating_sub(before)),
        mib(down_peak),
        mib(down_peak.saturating_sub(before)),
    );
    Ok(())
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Loopback connections per source address: well under the 28,232 ephemeral ports Linux has
/// by default, since the kernel's search for a free port slows down as an address fills up.
const CONNECTIONS_PER_SOURCE: usize = 5_000;
/// Connections opened at once while filling up.
const CONNECTING: usize = 16;

/// Raises this process's open-file limit (soft and hard) to at least `needed`; a child server
/// started afterwards inherits it. Raising the hard limit needs root (CAP_SYS_RESOURCE).
fn raise_file_limit(needed: u64) -> anyhow::Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current.is_none_or(|c| c >= needed) {
        return Ok(());
    }
    let maximum = now.maximum.map(|m| m.max(needed));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(needed),
            maximum,
        },
    )
    .with_context(|| {
        format!(
            "cannot raise the open-file limit to {needed} (now {:?}/{:?}); run as root or raise `ulimit -Hn`",
            now.current, now.maximum
        )
    })
}

/// Server memory per idle push connection (authenticated WebSocket, subscribed, nothing queued).
/// Connections come from several loopback addresses ([`CONNECTIONS_PER_SOURCE`] each), so more
/// than one address's worth of ports can be open.
async fn idle_memory(connections: usize) -> anyhow::Result<()> {
    raise_file_limit(connections as u64 + 1_000)?;
    let tmp = tempfile::tempdir()?;
    let server = ChildServer::spawn_with(&tmp.path().join("server"), connections + 1_000, "")?;
    let addr: std::net::SocketAddr = server
        .url
        .trim_start_matches("http://")
        .parse()
        .context("the child server's address")?;
    let user = UserId::parse("idle@bench.test")?;
    let device = register(&tmp.path().join("idle"), &server.url, &user).await?;
    let api = device.api().clone();
    // Warm up allocator and runtime with a first batch, then measure from there.
    let warmup = 100.min(connections);
    let mut open = connect_idle(&api, addr, 0, warmup).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server.rss_kib()?;
    let started = Instant::now();
    open.extend(connect_idle(&api, addr, warmup, connections).await?);
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss_kib()?;
    let measured = (connections - warmup).max(1);
    let sources = connections.div_ceil(CONNECTIONS_PER_SOURCE);
    println!("idle push connections  {connections} (from {sources} loopback source addresses)");
    println!(
        "opened in              {:.1} s ({:.0} connections/s)",
        took.as_secs_f64(),
        measured as f64 / took.as_secs_f64()
    );
    println!("server RSS             {before} KiB after {warmup} connections, {after} KiB after {connections}");
    println!(
        "per idle connection    {:.1} KiB",
        after.saturating_sub(before) as f64 / measured as f64
    );
    drop(open);
    Ok(())
}

/// Opens push connections number `from..to` to `addr`, [`CONNECTIONS_PER_SOURCE`] from each
/// loopback source address, [`CONNECTING`] at a time.
async fn connect_idle(
    api: &ApiClient,
    addr: std::net::SocketAddr,
    from: usize,
    to: usize,
) -> anyhow::Result<Vec<parley_client::PushConnection>> {
    // Addresses of this run's own (from 127.0.0.2 on, offset by the process id), so ports an
    // earlier run left in TIME_WAIT are not in the way.
    let first_octet = 2 + (std::process::id() % 200) as usize;
    let mut workers = Vec::new();
    for w in 0..CONNECTING {
        let api = api.clone();
        workers.push(tokio::spawn(async move {
            let mut open = Vec::new();
            for i in (from + w..to).step_by(CONNECTING) {
                let octet = u8::try_from(first_octet + i / CONNECTIONS_PER_SOURCE)
                    .context("too many connections for the loopback addresses 127.0.0.2-255")?;
                let socket = tokio::net::TcpSocket::new_v4()?;
                // A port of an earlier run may still be in TIME_WAIT.
                socket.set_reuseaddr(true)?;
                socket.bind((std::net::Ipv4Addr::new(127, 0, 0, octet), 0).into())?;
                let tcp = socket
                    .connect(addr)
                    .await
                    .with_context(|| format!("connection {i} from 127.0.0.{octet}"))?;
                open.push(api.connect_push_over(tcp, Default::default()).await?);
            }
            Ok::<_, anyhow::Error>(open)
        }));
    }
    let mut open = Vec::with_capacity(to - from);
    for w in workers {
        open.extend(w.await??);
    }
    Ok(open)
}
