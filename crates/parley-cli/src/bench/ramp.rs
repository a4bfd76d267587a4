//! `parley bench --ramp R1,R2,…`: open-loop steps of fixed offered rates, each held for
//! `--step-secs`, against a `parley serve` child process and, with `--xmpp ADDR`, against an
//! XMPP server driven by the same generator with the same pairs, rates and steps.
//!
//! Open loop: message `i` of a step is due at `start + i / rate`, whatever the server does, and
//! its latency runs from that due time to the moment the receiving client has it, so a server
//! that falls behind is charged for the wait (no coordinated omission). A step is *sustained*
//! when every message is delivered and the p99 latency is within `--p99-limit-ms`; a target
//! that fails a step is not loaded further. Server CPU and memory come from `/proc/PID`.

use super::xmpp;
use super::{message_key, percentile, receive, BenchArgs, ChildServer, Pair, Timings};
use anyhow::{bail, Context};
use parley_client::{ApiClient, Push, PushConnection, PushOptions};
use parley_proto::api::SendRequest;
use parley_proto::RoomId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};

/// Parley sends (HTTP requests) in flight at once across all senders. Far above what a
/// healthy step needs (rate × latency), so a stalled server shows as latency, not as a
/// generator limit.
const IN_FLIGHT: usize = 1024;
/// How long after a step's last due time its messages may still arrive.
const DRAIN: Duration = Duration::from_secs(10);
/// Password of the load tool's XMPP accounts.
const XMPP_PASSWORD: &str = "bench-password";

/// What one step against one target measured.
struct Step {
    target: &'static str,
    rate: u64,
    sent: u64,
    delivered: u64,
    failed: u64,
    /// From the step's start to its last delivery.
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// Due time to durable answer (sorted), where the protocol has one (Parley).
    acks: Vec<Duration>,
    /// From the step's start to the end of its drain: the span `cpu` was taken over.
    wall: Duration,
    cpu: Option<Duration>,
    rss_kib: Option<u64>,
}

impl Step {
    fn sustained(&self, p99_limit: Duration) -> bool {
        self.failed == 0
            && self.delivered == self.sent
            && percentile(&self.latencies, 0.99) <= p99_limit
    }
}

/// CPU time (user + system) of a process so far, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (Linux only)"))?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .context("unexpected /proc stat format")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// One Parley sender: its API client, room, and the step's pre-encrypted messages.
struct ParleyLane {
    api: ApiClient,
    room: RoomId,
    messages: Vec<(u64, Arc<SendRequest>)>,
}

/// How the Parley senders send (`--send-over`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SendOver {
    /// One `send` frame per message on the sender's push WebSocket, binary (CBOR) framing;
    /// receivers use binary push too.
    Ws,
    /// One `POST /v1/rooms/{room}/messages` per message; JSON push.
    Http,
}

/// Durable-answer latencies of a step: from each message's due time to the server's answer.
type Acked = Arc<std::sync::Mutex<Vec<Duration>>>;

/// One message for a sender's WebSocket task.
struct WsSend {
    due: Instant,
    lane: Arc<ParleyLane>,
    idx: usize,
    acked: Acked,
    failed: Arc<AtomicU64>,
}

/// The generator's handle on one target for one step.
enum Load {
    Parley {
        lanes: Vec<Arc<ParleyLane>>,
        /// Per lane, its WebSocket sender task (`--send-over ws`); empty for HTTP.
        ws: Vec<mpsc::UnboundedSender<WsSend>>,
        in_flight: Arc<Semaphore>,
        acked: Acked,
    },
    Xmpp {
        lanes: Vec<mpsc::UnboundedSender<u64>>,
        /// Ids are unique over the whole ramp.
        first_id: u64,
    },
}

impl Load {
    /// Hands message `i` of the step to its sender without waiting for the server, and
    /// records when it was due.
    fn dispatch(&self, i: u64, due: Instant, timings: &Timings, failed: &Arc<AtomicU64>) {
        match self {
            Load::Parley {
                lanes,
                ws,
                in_flight,
                acked,
            } => {
                let n = lanes.len() as u64;
                let lane = lanes[(i % n) as usize].clone();
                let idx = (i / n) as usize;
                let Some((key, _)) = lane.messages.get(idx) else {
                    return;
                };
                if let Ok(mut sent) = timings.sent.lock() {
                    sent.insert(*key, due);
                }
                if let Some(sender) = ws.get((i % n) as usize) {
                    let (acked, failed) = (acked.clone(), failed.clone());
                    let item = WsSend {
                        due,
                        lane,
                        idx,
                        acked,
                        failed: failed.clone(),
                    };
                    if sender.send(item).is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                let (in_flight, failed, acked) = (in_flight.clone(), failed.clone(), acked.clone());
                tokio::spawn(async move {
                    let Ok(_permit) = in_flight.acquire_owned().await else {
                        return;
                    };
                    let request = &lane.messages[idx].1;
                    match lane.api.send_message(&lane.room, request).await {
                        Ok(_) => {
                            if let Ok(mut acked) = acked.lock() {
                                acked.push(due.elapsed());
                            }
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("a send failed: {e}");
                            }
                        }
                    }
                });
            }
            Load::Xmpp { lanes, first_id } => {
                let n = lanes.len() as u64;
                let id = first_id + i;
                if let Ok(mut sent) = timings.sent.lock() {
                    sent.insert(id, due);
                }
                if lanes[(i % n) as usize].send(id).is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Dispatches `total` messages at `rate`/s, open loop: each at its due time, never waiting
/// for an answer.
async fn paced(load: &Load, rate: u64, total: u64, timings: &Timings, failed: &Arc<AtomicU64>) {
    let start = Instant::now();
    let mut i = 0;
    while i < total {
        let now = Instant::now();
        // Everything due by now goes out in this pass; then sleep to the next due time.
        while i < total {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            if due > now {
                tokio::time::sleep_until(due.into()).await;
                break;
            }
            load.dispatch(i, due, timings, failed);
            i += 1;
        }
    }
}

/// Parley's side: a `parley serve` child process and its pairs.
struct ParleyTarget {
    server: ChildServer,
    pairs: Vec<Pair>,
    payload: String,
    in_flight: Arc<Semaphore>,
    ws: Vec<mpsc::UnboundedSender<WsSend>>,
}

impl ParleyTarget {
    /// Starts the server and sets up the pairs; the receivers' push connections are returned
    /// apart, for the caller to listen on.
    async fn start(
        args: &BenchArgs,
        dir: &std::path::Path,
    ) -> anyhow::Result<(Self, Vec<parley_client::PushConnection>)> {
        let server = ChildServer::spawn(&dir.join("server"))?;
        eprintln!(
            "parley: setting up {} pairs on {} ...",
            args.pairs, server.url
        );
        let at = (server.url.as_str(), "bench.test");
        let push = PushOptions {
            ephemeral: false,
            binary: args.send_over == SendOver::Ws,
        };
        let (pairs, pushes) = super::setup_pairs(args.pairs, at, at, dir, push).await?;
        let mut ws = Vec::new();
        if args.send_over == SendOver::Ws {
            for pair in &pairs {
                let conn = pair.sender.api().connect_push_opts(push).await?;
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(ws_sender(conn, rx));
                ws.push(tx);
            }
        }
        let target = Self {
            server,
            pairs,
            payload: "x".repeat(args.payload),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            ws,
        };
        Ok((target, pushes))
    }

    /// Pre-encrypts the step's messages (distinct MLS PrivateMessages), outside the timing.
    fn prepare(&mut self, total: u64) -> anyhow::Result<Load> {
        let per_lane = usize::try_from(total.div_ceil(self.pairs.len() as u64))?;
        let mut lanes = Vec::with_capacity(self.pairs.len());
        for pair in &mut self.pairs {
            let messages = pair
                .sender
                .encrypt_texts(&pair.room, &self.payload, per_lane)?
                .into_iter()
                .map(|message| (message_key(&message), Arc::new(SendRequest { message })))
                .collect();
            lanes.push(Arc::new(ParleyLane {
                api: pair.sender.api().clone(),
                room: pair.room.clone(),
                messages,
            }));
        }
        Ok(Load::Parley {
            lanes,
            ws: self.ws.clone(),
            in_flight: self.in_flight.clone(),
            acked: Default::default(),
        })
    }
}

/// A sender's WebSocket: writes its messages as they are dispatched (what is queued goes out in
/// one flush, up to the server's window of sends in flight) and matches the answers.
async fn ws_sender(mut conn: PushConnection, mut queue: mpsc::UnboundedReceiver<WsSend>) {
    /// Sends in flight on one connection: the server's window (it reads no further frames).
    const WINDOW: usize = 256;
    let mut pending: HashMap<u64, WsSend> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            item = queue.recv(), if pending.len() < WINDOW => {
                let Some(first) = item else { return };
                let mut batch = vec![first];
                while batch.len() + pending.len() < WINDOW {
                    match queue.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                let mut ids = Vec::with_capacity(batch.len());
                for item in batch {
                    next_id += 1;
                    ids.push(next_id);
                    pending.insert(next_id, item);
                }
                let mut frames: Vec<(u64, &RoomId, &[u8])> = Vec::with_capacity(ids.len());
                for id in &ids {
                    if let Some(item) = pending.get(id) {
                        let request = &item.lane.messages[item.idx].1;
                        frames.push((*id, &item.lane.room, request.message.as_slice()));
                    }
                }
                if let Err(e) = conn.send_messages(frames).await {
                    eprintln!("a sender's WebSocket failed: {e}");
                    for (_, item) in pending.drain() {
                        item.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
            push = conn.next_push() => match push {
                Ok(Some(Push::Sent { id, .. })) => {
                    if let Some(item) = pending.remove(&id) {
                        if let Ok(mut acked) = item.acked.lock() {
                            acked.push(item.due.elapsed());
                        }
                    }
                }
                Ok(Some(Push::Refused { id, status, error })) => {
                    if let Some(item) = pending.remove(&id) {
                        if item.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("a send was refused: {status} {}", error.message);
                        }
                    }
                }
                Ok(Some(_)) => {}
                end @ (Ok(None) | Err(_)) => {
                    if !pending.is_empty() {
                        eprintln!("a sender's WebSocket closed with sends unanswered: {:?}", end.err());
                    }
                    for (_, item) in pending.drain() {
                        item.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
        }
    }
}

/// Where the XMPP server listens, its domain and (for CPU and memory) its process.
#[derive(Clone, Debug)]
pub struct XmppServer {
    pub addr: SocketAddr,
    pub domain: String,
    pub pid: Option<u32>,
}

/// The XMPP side: one logged-in session per sender and per receiver.
struct XmppTarget {
    server: XmppServer,
    lanes: Vec<mpsc::UnboundedSender<u64>>,
    next_id: u64,
}

impl XmppTarget {
    async fn start(
        server: XmppServer,
        pairs: usize,
        payload: usize,
        timings: Arc<Timings>,
        received: Arc<AtomicU64>,
    ) -> anyhow::Result<Self> {
        let run_id = std::process::id();
        let (addr, domain) = (server.addr, server.domain.clone());
        eprintln!("xmpp: setting up {pairs} pairs on {addr} ({domain}) ...");
        let body = "x".repeat(payload);
        let mut lanes = Vec::with_capacity(pairs);
        for i in 0..pairs {
            let (sender, receiver) = (format!("s{run_id}-{i}"), format!("r{run_id}-{i}"));
            xmpp::register(addr, &domain, &sender, XMPP_PASSWORD).await?;
            xmpp::register(addr, &domain, &receiver, XMPP_PASSWORD).await?;
            let mut inbox = xmpp::login(addr, &domain, &receiver, XMPP_PASSWORD, "bench").await?;
            inbox.available().await?;
            let outbox = xmpp::login(addr, &domain, &sender, XMPP_PASSWORD, "bench").await?;
            let (tx, rx) = mpsc::unbounded_channel();
            // The session's write half stays open with its reader: dropping it would end the stream.
            tokio::spawn(xmpp_receive(inbox, timings.clone(), received.clone()));
            tokio::spawn(xmpp_drain(outbox.reader));
            let to = format!("{receiver}@{domain}");
            tokio::spawn(xmpp_send(outbox.writer, rx, to, body.clone()));
            lanes.push(tx);
        }
        // Presence takes a moment to register; a message before it would go offline.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Self {
            server,
            lanes,
            next_id: 1,
        })
    }

    fn prepare(&mut self, total: u64) -> Load {
        let first_id = self.next_id;
        self.next_id += total;
        Load::Xmpp {
            lanes: self.lanes.clone(),
            first_id,
        }
    }
}

/// Writes a sender's messages as they are dispatched, coalescing what is queued into one write.
async fn xmpp_send(
    mut writer: tokio::io::BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut ids: mpsc::UnboundedReceiver<u64>,
    to: String,
    body: String,
) {
    while let Some(id) = ids.recv().await {
        let mut next = Some(id);
        while let Some(id) = next {
            if writer
                .write_all(xmpp::chat_message(&to, id, &body).as_bytes())
                .await
                .is_err()
            {
                return;
            }
            next = ids.try_recv().ok();
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}

/// Records each chat message a receiver gets, by its id.
async fn xmpp_receive(mut session: xmpp::Session, timings: Arc<Timings>, received: Arc<AtomicU64>) {
    loop {
        let stanza = match session.reader.next().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("an XMPP receiver stopped: {e:#}");
                return;
            }
        };
        let now = Instant::now();
        if stanza.name != "message" {
            continue;
        }
        let Some(id) = stanza.attr("id").and_then(|id| id.parse::<u64>().ok()) else {
            continue;
        };
        if let Ok(mut delivered) = timings.delivered.lock() {
            if delivered.insert(id, now).is_none() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Reads and drops whatever the server sends a sender, so its socket never fills.
async fn xmpp_drain(mut reader: xmpp::StanzaReader) {
    while reader.next().await.is_ok() {}
}

/// Runs one step against one target and collects what it measured.
async fn run_step(
    target: &'static str,
    load: Load,
    rate: u64,
    secs: u64,
    probes: (&Timings, &AtomicU64),
    pid: Option<u32>,
) -> Step {
    let (timings, received) = probes;
    let total = rate * secs;
    let failed = Arc::new(AtomicU64::new(0));
    let received_before = received.load(Ordering::Relaxed);
    let cpu_before = pid.and_then(|p| cpu_time(p).ok());
    let started = Instant::now();
    paced(&load, rate, total, timings, &failed).await;
    let deadline = Instant::now() + DRAIN;
    while received.load(Ordering::Relaxed) - received_before < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = started.elapsed();
    let cpu = pid
        .and_then(|p| cpu_time(p).ok())
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let rss_kib = pid.and_then(|p| super::rss_kib(p).ok());
    let mut acks = match &load {
        Load::Parley { acked, .. } => acked.lock().map(|a| a.clone()).unwrap_or_default(),
        Load::Xmpp { .. } => Vec::new(),
    };
    acks.sort();
    drop(load);
    let (latencies, last) = step_latencies(timings, started);
    Step {
        target,
        rate,
        sent: total,
        delivered: latencies.len() as u64,
        failed: failed.load(Ordering::Relaxed),
        elapsed: last.saturating_duration_since(started),
        latencies,
        acks,
        wall,
        cpu,
        rss_kib,
    }
}

/// Latencies of the messages due since `started` (sorted), and the time of the last delivery.
/// Takes them out of `timings`, so the next step starts empty.
fn step_latencies(timings: &Timings, started: Instant) -> (Vec<Duration>, Instant) {
    let (Ok(mut sent), Ok(mut delivered)) = (timings.sent.lock(), timings.delivered.lock()) else {
        return (Vec::new(), started);
    };
    let mut last = started;
    let mut latencies: Vec<Duration> = sent
        .drain()
        .filter_map(|(key, due)| {
            let at = delivered.remove(&key)?;
            last = last.max(at);
            Some(at.saturating_duration_since(due))
        })
        .collect();
    delivered.clear();
    latencies.sort();
    (latencies, last)
}

pub async fn run(
    args: &BenchArgs,
    rates: &[u64],
    xmpp_server: Option<XmppServer>,
) -> anyhow::Result<()> {
    if rates.contains(&0) || args.step_secs == 0 || args.pairs == 0 {
        bail!("--ramp rates, --step-secs and --pairs must be at least 1");
    }
    let p99_limit = Duration::from_secs_f64(args.p99_limit_ms / 1000.0);
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let parley_probes = (Arc::new(Timings::default()), Arc::new(AtomicU64::new(0)));
    let mut parley = None;
    if !args.xmpp_only {
        let (target, pushes) = ParleyTarget::start(args, tmp.path()).await?;
        for push in pushes {
            let (timings, received) = (parley_probes.0.clone(), parley_probes.1.clone());
            tokio::spawn(receive(push, timings, received));
        }
        parley = Some(target);
    }
    let xmpp_probes = (Arc::new(Timings::default()), Arc::new(AtomicU64::new(0)));
    let mut xmpp = match xmpp_server {
        Some(server) => Some(
            XmppTarget::start(
                server,
                args.pairs,
                args.payload,
                xmpp_probes.0.clone(),
                xmpp_probes.1.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let mut steps = Vec::new();
    let (mut parley_done, mut xmpp_done) = (parley.is_none(), xmpp.is_none());
    for &rate in rates {
        let total = rate * args.step_secs;
        if let (false, Some(p)) = (parley_done, parley.as_mut()) {
            eprintln!("parley: encrypting {total} messages for the {rate}/s step ...");
            let load = p.prepare(total)?;
            eprintln!("parley: {rate} messages/s for {} s ...", args.step_secs);
            let pid = Some(p.server.child.id());
            let probes = (&*parley_probes.0, &*parley_probes.1);
            let step = run_step("parley", load, rate, args.step_secs, probes, pid).await;
            parley_done = !step.sustained(p99_limit);
            print_step(&step, p99_limit);
            steps.push(step);
        }
        if let (false, Some(x)) = (xmpp_done, xmpp.as_mut()) {
            let load = x.prepare(total);
            eprintln!("xmpp: {rate} messages/s for {} s ...", args.step_secs);
            let probes = (&*xmpp_probes.0, &*xmpp_probes.1);
            let step = run_step("xmpp", load, rate, args.step_secs, probes, x.server.pid).await;
            xmpp_done = !step.sustained(p99_limit);
            print_step(&step, p99_limit);
            steps.push(step);
        }
        if parley_done && xmpp_done {
            break;
        }
    }
    print_table(&steps, p99_limit, args.step_secs);
    Ok(())
}

fn print_step(s: &Step, p99_limit: Duration) {
    eprintln!(
        "  {} at {}/s: {} of {} delivered, p99 {:.2} ms: {}",
        s.target,
        s.rate,
        s.delivered,
        s.sent,
        ms(percentile(&s.latencies, 0.99)),
        if s.sustained(p99_limit) {
            "sustained"
        } else {
            "NOT sustained"
        }
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One table of every step of every target, then each target's best sustained rate and,
/// with both targets, their ratio.
fn print_table(steps: &[Step], p99_limit: Duration, secs: u64) {
    println!(
        "open loop, {secs} s per step; sustained = all delivered and p99 <= {:.0} ms",
        ms(p99_limit)
    );
    println!(
        "{:<8} {:>9} {:>9} {:>9} {:>6} {:>10} {:>8} {:>8} {:>9} {:>11} {:>10} {:>8} {:>8}  sustained",
        "target",
        "offered/s",
        "sent",
        "delivered",
        "failed",
        "achieved/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "ack p99 ms",
        "srv cores",
        "µs/msg",
        "RSS MiB"
    );
    for s in steps {
        let achieved = s.delivered as f64 / s.elapsed.as_secs_f64().max(1e-9);
        let wall = s.wall.as_secs_f64().max(1e-9);
        let cores = s
            .cpu
            .map_or("-".into(), |c| format!("{:.2}", c.as_secs_f64() / wall));
        let per_msg = s.cpu.map_or("-".into(), |c| {
            format!("{:.0}", c.as_secs_f64() * 1e6 / s.delivered.max(1) as f64)
        });
        let ack_p99 = if s.acks.is_empty() {
            "-".into()
        } else {
            format!("{:.2}", ms(percentile(&s.acks, 0.99)))
        };
        let rss = s
            .rss_kib
            .map_or("-".into(), |k| format!("{:.0}", k as f64 / 1024.0));
        println!(
            "{:<8} {:>9} {:>9} {:>9} {:>6} {:>10.0} {:>8.2} {:>8.2} {:>9.2} {:>11} {:>10} {:>8} {:>8}  {}",
            s.target,
            s.rate,
            s.sent,
            s.delivered,
            s.failed,
            achieved,
            ms(percentile(&s.latencies, 0.50)),
            ms(percentile(&s.latencies, 0.99)),
            ms(percentile(&s.latencies, 1.0)),
            ack_p99,
            cores,
            per_msg,
            rss,
            if s.sustained(p99_limit) { "yes" } else { "no" }
        );
    }
    let best = |target: &str| {
        steps
            .iter()
            .filter(|s| s.target == target && s.sustained(p99_limit))
            .map(|s| s.rate)
            .max()
    };
    let (parley, xmpp) = (best("parley"), best("xmpp"));
    let show = |b: Option<u64>| b.map_or("none".into(), |r| format!("{r} messages/s"));
    if steps.iter().any(|s| s.target == "parley") {
        println!("max sustained    parley {}", show(parley));
    }
    if steps.iter().any(|s| s.target == "xmpp") {
        println!("max sustained    xmpp   {}", show(xmpp));
    }
    if let (Some(p), Some(x)) = (parley, xmpp) {
        println!(
            "ratio            parley / xmpp = {:.2}",
            p as f64 / x as f64
        );
    }
}
