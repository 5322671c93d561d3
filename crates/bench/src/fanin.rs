//! Fan-in: N publishers -> 1 subscriber over MQTT 3.1.1 (or, with `--subscribers`,
//! N publishers -> M subscribers: fan-out).
//!
//! Every publisher sends `messages / publishers` messages to its own topic under a
//! per-run prefix; every subscriber holds `<prefix>/+`, so each message is delivered M
//! times; with `--shared GROUP` they hold `$share/GROUP/<prefix>/+` instead, one shared
//! subscription, so each message is delivered once, to one of them. `--pub-ports` and
//! `--sub-ports` spread the clients over several brokers (the
//! nodes of a cluster), round robin. The first 8 payload bytes are the
//! send time (nanoseconds since the run started, little endian), stamped just before
//! the message is handed to rumqttc, so latency covers client queueing, both hops
//! through the broker and the subscriber's decoding.
//!
//! Throughput is messages delivered divided by the time from the start signal to the
//! last delivery. Connection setup is not timed. `--window` bounds how many messages may
//! be published but not yet delivered (over all publishers): with it, QoS 0 measures the
//! rate a broker sustains without dropping instead of how deep its queues are; 0 turns
//! it off. A broker that drops messages shows them as `lost`.

use crate::stats::percentile;
use anyhow::{bail, Context};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// Length of the timestamp at the start of every payload.
const STAMP_LEN: usize = 8;
/// How long connecting and subscribing may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Once every publisher is done, a subscriber that hears nothing for this long stops:
/// the rest was dropped by the broker.
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a subscriber waits for its connection before it looks at the others'
/// progress again.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// No delivery at all for this long while the window is full means messages were lost;
/// publishers then go on regardless (and the report shows them as lost).
const WINDOW_STALL: Duration = Duration::from_secs(1);

#[derive(clap::Args, Debug)]
pub struct FaninArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port (plain TCP, MQTT 3.1.1).
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Ports the publishers connect to, round robin (comma separated); default `--port`.
    #[arg(long, value_delimiter = ',')]
    pub_ports: Vec<u16>,
    /// Ports the subscribers connect to, round robin (comma separated); default `--port`.
    #[arg(long, value_delimiter = ',')]
    sub_ports: Vec<u16>,
    /// Subscribers keep a persistent session (clean session 0): with a durable session
    /// store, every message forwarded to them is in the store until acknowledged.
    #[arg(long)]
    persistent_subscribers: bool,
    /// The subscribers are the members of this shared subscription group (each message
    /// delivered once in all).
    #[arg(long)]
    shared: Option<String>,
    /// Number of subscribing clients, each holding every publisher's topic.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    subscribers: u64,
    /// Number of publishing clients.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    publishers: u64,
    /// QoS of publishes and of the subscription.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Payload size in bytes (at least 8: the send timestamp).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(8..=262_144))]
    payload: u64,
    /// Messages in total, spread evenly over the publishers (rounded up).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,
    /// Most messages published but not yet delivered to every subscriber, over all
    /// publishers; 0 = no limit.
    #[arg(long, default_value_t = 2000)]
    window: u64,
    /// Give up after this many seconds of measuring and report what arrived.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Username (and --password) for every client; anonymous without.
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password: Option<String>,
    /// Topics are `<prefix>/<run id>/<publisher>`; the subscriber holds `<prefix>/<run id>/+`.
    #[arg(long, default_value = "moatmq-bench")]
    prefix: String,
    /// Free text copied into the report (e.g. the broker's name).
    #[arg(long, default_value = "-")]
    label: String,
}

impl FaninArgs {
    /// How many times each message is delivered.
    fn copies(&self) -> u64 {
        if self.shared.is_some() {
            1
        } else {
            self.subscribers
        }
    }
}

/// One run's result.
pub struct Report {
    args: FaninArgs,
    sent: u64,
    received: u64,
    /// `--timeout` passed before every message was sent and delivered.
    timed_out: bool,
    elapsed: Duration,
    p50: Option<Duration>,
    p99: Option<Duration>,
    max: Option<Duration>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.args;
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.received as f64 / secs
        } else {
            0.0
        };
        let us = |d: Option<Duration>| d.map_or("-".to_string(), |d| d.as_micros().to_string());
        write!(
            f,
            "fanin label={} target={}:{} qos={} payload={} publishers={} subscribers={}{} window={} \
             complete={} sent={} received={} lost={} secs={:.3} msgs_per_s={:.0} p50_us={} p99_us={} \
             max_us={}",
            a.label,
            a.host,
            a.port,
            a.qos,
            a.payload,
            a.publishers,
            a.subscribers,
            if a.shared.is_some() { "(shared)" } else { "" },
            a.window,
            if self.timed_out { "no(timeout)" } else { "yes" },
            self.sent,
            self.received,
            // At a timeout, what is still in flight is not lost.
            if self.timed_out {
                "-".to_string()
            } else {
                (self.sent * a.copies())
                    .saturating_sub(self.received)
                    .to_string()
            },
            secs,
            rate,
            us(self.p50),
            us(self.p99),
            us(self.max),
        )
    }
}

/// Counters shared by the publishers and the subscriber.
struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
    /// Woken as deliveries arrive, for publishers waiting on the window.
    delivered: Notify,
}

pub async fn run(args: FaninArgs) -> anyhow::Result<Report> {
    let qos = match args.qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    };
    let per_publisher = args.messages.div_ceil(args.publishers);
    let total = per_publisher * args.publishers;
    let run_id = run_id();
    let prefix = format!("{}/{run_id}", args.prefix);
    let t0 = Instant::now();
    let progress = Arc::new(Progress {
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        delivered: Notify::new(),
    });

    // Subscribers first, and wait for their SUBACKs: nothing published is missed.
    let mut subs = Vec::new();
    for j in 0..args.subscribers {
        let port = round_robin(&args.sub_ports, args.port, j);
        let mut opts = options(&args, format!("bench-{run_id}-sub-{j}"), port);
        opts.set_clean_session(!args.persistent_subscribers);
        let (sub, mut sub_loop) = AsyncClient::new(opts, 64);
        connect(&mut sub_loop)
            .await
            .with_context(|| format!("subscriber {j}"))?;
        let filter = match &args.shared {
            Some(group) => format!("$share/{group}/{prefix}/+"),
            None => format!("{prefix}/+"),
        };
        sub.subscribe(filter, qos).await?;
        wait_for(&mut sub_loop, |e| {
            matches!(e, Event::Incoming(Packet::SubAck(_)))
        })
        .await
        .with_context(|| format!("subscriber {j}: waiting for SUBACK"))?;
        subs.push((sub, sub_loop));
    }

    // Publishers: connect them all before the clock starts.
    let (start_tx, start_rx) = watch::channel(false);
    let (publishers_done_tx, publishers_done_rx) = watch::channel(0u64);
    let publishers_done_tx = Arc::new(publishers_done_tx);
    let mut tasks: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
    let mut loops: Vec<JoinHandle<()>> = Vec::new();
    for i in 0..args.publishers {
        let port = round_robin(&args.pub_ports, args.port, i);
        let (client, mut eventloop) =
            AsyncClient::new(options(&args, format!("bench-{run_id}-pub-{i}"), port), 64);
        connect(&mut eventloop)
            .await
            .with_context(|| format!("publisher {i}"))?;
        // The event loop runs until the end of the run; it counts messages written (QoS 0)
        // or acknowledged (QoS 1) to tell when this publisher is done.
        let done_tx = publishers_done_tx.clone();
        loops.push(tokio::spawn(drive_publisher(
            eventloop,
            args.qos,
            per_publisher,
            done_tx,
        )));
        let topic = format!("{prefix}/{i}");
        let mut start = start_rx.clone();
        let progress = progress.clone();
        let (payload_len, window, subscribers) =
            (args.payload as usize, args.window, args.copies());
        tasks.push(tokio::spawn(async move {
            start.wait_for(|s| *s).await?;
            for _ in 0..per_publisher {
                if window > 0 {
                    wait_window(&progress, window, subscribers).await;
                }
                let mut payload = vec![0u8; payload_len];
                payload[..STAMP_LEN].copy_from_slice(&stamp(t0).to_le_bytes());
                client.publish(topic.as_str(), qos, false, payload).await?;
                progress.sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    let mut receivers = Vec::new();
    let mut clients = Vec::new();
    for (sub, sub_loop) in subs {
        clients.push(sub);
        receivers.push(tokio::spawn(receive(
            sub_loop,
            Expect {
                own: total,
                all: total * args.copies(),
            },
            args.publishers,
            t0,
            deadline,
            progress.clone(),
            publishers_done_rx.clone(),
        )));
    }
    start_tx.send(true)?;
    let (mut latencies, mut last, mut received) = (Vec::new(), None, 0);
    for r in receivers {
        let (l, at, n) = r.await??;
        latencies.extend(l);
        last = last.max(at);
        received += n;
    }
    let timed_out = Instant::now() >= deadline;

    for t in &tasks {
        t.abort();
    }
    for t in &loops {
        t.abort();
    }
    for t in tasks {
        // Aborted publishers are fine (the deadline passed); failed ones are not.
        if let Ok(Err(e)) = t.await {
            bail!("publisher failed: {e:#}");
        }
    }
    for sub in clients {
        let _ = sub.try_disconnect();
    }
    let elapsed = last.map_or(Duration::ZERO, |l| l.saturating_duration_since(started));
    Ok(Report {
        sent: progress.sent.load(Ordering::Relaxed),
        received,
        timed_out,
        elapsed,
        p50: percentile(&mut latencies, 50.0),
        p99: percentile(&mut latencies, 99.0),
        max: percentile(&mut latencies, 100.0),
        args,
    })
}

/// How many messages a subscriber may get at most, and all subscribers together.
struct Expect {
    own: u64,
    all: u64,
}

/// The subscriber's loop: latencies, time of the last delivery, deliveries.
async fn receive(
    mut eventloop: EventLoop,
    expect: Expect,
    publishers: u64,
    t0: Instant,
    deadline: Instant,
    progress: Arc<Progress>,
    publishers_done: watch::Receiver<u64>,
) -> anyhow::Result<(Vec<u64>, Option<Instant>, u64)> {
    let mut latencies = Vec::with_capacity(expect.own as usize);
    let mut received = 0u64;
    let mut last = None;
    let mut heard = Instant::now();
    // Its own share (every message, or with a shared group some), until all subscribers
    // together have every copy.
    while received < expect.own && progress.received.load(Ordering::Relaxed) < expect.all {
        let all_sent = *publishers_done.borrow() >= publishers;
        // In slices, so a subscriber that has its share sees the others finish.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(POLL_SLICE);
        let event = match tokio::time::timeout(wait, eventloop.poll()).await {
            Ok(event) => {
                heard = Instant::now();
                event.context("subscriber connection")?
            }
            Err(_) if Instant::now() >= deadline => break,
            Err(_) if all_sent && heard.elapsed() >= IDLE_TIMEOUT => break,
            Err(_) => continue,
        };
        if let Event::Incoming(Packet::Publish(p)) = event {
            if p.payload.len() >= STAMP_LEN {
                let mut sent_at = [0u8; STAMP_LEN];
                sent_at.copy_from_slice(&p.payload[..STAMP_LEN]);
                latencies.push(stamp(t0).saturating_sub(u64::from_le_bytes(sent_at)));
            }
            received += 1;
            last = Some(Instant::now());
            progress.received.fetch_add(1, Ordering::Relaxed);
            if received % 16 == 0 {
                progress.delivered.notify_waiters();
            }
        }
    }
    Ok((latencies, last, received))
}

/// Runs a publisher's event loop; counts it done after `count` publishes went out (QoS 0)
/// or were acknowledged (QoS 1: PUBACK; QoS 2: PUBCOMP), then keeps it open so nothing
/// in flight is cut off.
async fn drive_publisher(
    mut eventloop: EventLoop,
    qos: u8,
    count: u64,
    done: Arc<watch::Sender<u64>>,
) {
    let mut finished = 0u64;
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == 0 => finished += 1,
            Ok(Event::Incoming(Packet::PubAck(_))) if qos == 1 => finished += 1,
            Ok(Event::Incoming(Packet::PubComp(_))) if qos == 2 => finished += 1,
            Ok(_) => continue,
            Err(e) => {
                eprintln!("publisher connection: {e}");
                // Count it done so the subscriber does not wait for messages never sent.
                done.send_modify(|d| *d += 1);
                return;
            }
        }
        if finished == count {
            done.send_modify(|d| *d += 1);
        }
    }
}

/// Waits until fewer than `window` messages are on their way. If nothing at all is
/// delivered for a while, the broker dropped what is missing: go on, or the run would
/// stall until its timeout.
async fn wait_window(progress: &Progress, window: u64, subscribers: u64) {
    let mut seen = progress.received.load(Ordering::Relaxed);
    loop {
        // Created before the check, so a wake-up between check and await is not lost.
        let delivered = progress.delivered.notified();
        let sent = progress.sent.load(Ordering::Relaxed);
        // Delivered to every subscriber (the slowest lags at most a little behind).
        let received = progress.received.load(Ordering::Relaxed) / subscribers;
        if sent.saturating_sub(received) < window {
            return;
        }
        if tokio::time::timeout(WINDOW_STALL, delivered).await.is_err() {
            let now = progress.received.load(Ordering::Relaxed);
            if now == seen {
                return;
            }
            seen = now;
        }
    }
}

/// The `i`th client's port: `ports` round robin, `default` without any.
fn round_robin(ports: &[u16], default: u16, i: u64) -> u16 {
    match ports.len() {
        0 => default,
        n => ports[(i % n as u64) as usize],
    }
}

fn options(args: &FaninArgs, client_id: String, port: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, args.host.clone(), port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_clean_session(true);
    if let Some(user) = &args.username {
        opts.set_credentials(user.clone(), args.password.clone().unwrap_or_default());
    }
    let max = args.payload as usize + 1024;
    opts.set_max_packet_size(max, max);
    opts
}

/// Polls until the CONNACK; refused or failed connections are errors.
async fn connect(eventloop: &mut EventLoop) -> anyhow::Result<()> {
    wait_for(eventloop, |e| match e {
        Event::Incoming(Packet::ConnAck(ack)) => ack.code == ConnectReturnCode::Success,
        _ => false,
    })
    .await
}

async fn wait_for(eventloop: &mut EventLoop, done: impl Fn(&Event) -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .context("timed out")??;
        if let Event::Incoming(Packet::ConnAck(ack)) = &event {
            if ack.code != ConnectReturnCode::Success {
                bail!("connection refused: {:?}", ack.code);
            }
        }
        if done(&event) {
            return Ok(());
        }
    }
}

/// Nanoseconds since the run started: the timestamp carried in payloads.
fn stamp(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Distinct per run, so runs against the same broker never see each other's messages.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}{:08x}", std::process::id(), nanos)
}
