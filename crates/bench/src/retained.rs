//! Retained messages over MQTT.
//!
//! `retained-pub`: N publishers send retained (or, with `--retain false`, plain) QoS 1
//! (or 0) messages, each to its own share of `--topics` topics
//! (`<prefix>/<i / 1000>/<i % 1000>`, as `store` writes them), for `--duration` seconds
//! or `--messages` in total. Reported: acknowledged messages per second and the
//! PUBLISH-written to PUBACK latency p50/p99/max.
//!
//! `startup`: starts a broker (the command after `--`), then measures the time from the
//! spawn to `/readyz` answering 200 (if `--readyz`), to the first accepted CONNECT, to
//! the first and the last retained message delivered on a `--filter` subscription
//! (counted until `--expect` distinct topics arrived, `--idle` seconds pass without one
//! or `--timeout` seconds after the SUBSCRIBE; reported with the delivery rate from the
//! SUBSCRIBE to the last one), and to the last of `--sample` exact topics spread over the
//! `--expect` stored ones, subscribed at the same time on a second connection: those show
//! whether the whole store was replayed even where a broker sends only part of a
//! wildcard's retained messages. The broker is killed (SIGKILL) at the end.

use crate::stats::percentile;
use crate::storebench::topic;
use crate::wire::{self, Target};
use anyhow::{bail, Context};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Debug)]
pub struct PubArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    #[arg(long, default_value_t = 8)]
    publishers: u64,
    /// Distinct topics, split between the publishers.
    #[arg(long, default_value_t = 10_000)]
    topics: u64,
    #[arg(long, default_value = "bench")]
    prefix: String,
    #[arg(long, default_value_t = 100)]
    payload: usize,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Set the retain flag (`--retain false`: plain messages, e.g. for offline sessions).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    retain: bool,
    /// Unacknowledged QoS 1 publishes per publisher.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Seconds to publish for (ignored with --messages).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Messages in total (each publisher its share once through its topics); 0 = use
    /// --duration.
    #[arg(long, default_value_t = 0)]
    messages: u64,
    #[arg(long, default_value = "-")]
    label: String,
}

pub async fn publish(args: PubArgs) -> anyhow::Result<String> {
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let per_pub = args.messages.div_ceil(args.publishers);
    let acked = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    let mut lats = Vec::new();
    let mut producers = Vec::new();
    let (start_tx, start_rx) = tokio::sync::watch::channel(false);
    for p in 0..args.publishers {
        let mut opts = MqttOptions::new(
            format!("bench-retained-{}-{p}", std::process::id()),
            args.host.clone(),
            args.port,
        );
        opts.set_keep_alive(Duration::from_secs(60));
        opts.set_inflight(args.inflight);
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
                .await
                .context("connect timed out")??
            {
                Event::Incoming(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => {
                    break
                }
                Event::Incoming(Packet::ConnAck(a)) => bail!("refused: {:?}", a.code),
                _ => {}
            }
        }
        let acked = acked.clone();
        let lat = Arc::new(std::sync::Mutex::new(Vec::new()));
        lats.push(lat.clone());
        loops.push(tokio::spawn(async move {
            let mut sent_at = vec![None::<Instant>; 65_536];
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if qos == QoS::AtMostOnce {
                            acked.fetch_add(1, Ordering::Relaxed);
                        } else {
                            sent_at[usize::from(pkid)] = Some(Instant::now());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(t) = sent_at[usize::from(ack.pkid)].take() {
                            if let Ok(mut lat) = lat.lock() {
                                lat.push(t.elapsed().as_nanos() as u64);
                            }
                        }
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }));
        let (prefix, topics, publishers) = (args.prefix.clone(), args.topics, args.publishers);
        let (payload_len, count, retain) = (args.payload, per_pub, args.retain);
        let mut start = start_rx.clone();
        producers.push(tokio::spawn(async move {
            start.wait_for(|s| *s).await?;
            let mut k = 0u64;
            loop {
                if count > 0 && k >= count {
                    return anyhow::Ok(());
                }
                let i = (p + k * publishers) % topics;
                let mut payload = vec![(k % 251) as u8; payload_len];
                payload[0] = p as u8;
                client
                    .publish(topic(&prefix, i), qos, retain, payload)
                    .await?;
                k += 1;
            }
        }));
    }
    let total = per_pub * args.publishers;
    let started = Instant::now();
    start_tx.send(true)?;
    let end = if args.messages > 0 {
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if acked.load(Ordering::Relaxed) >= total {
                break Instant::now();
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("timed out after 600 s");
            }
        }
    } else {
        tokio::time::sleep(Duration::from_secs(args.duration)).await;
        Instant::now()
    };
    let done = acked.load(Ordering::Relaxed);
    let secs = end.duration_since(started).as_secs_f64();
    for p in &producers {
        p.abort();
    }
    // Give the event loops a moment to see late acks, then stop them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for l in &loops {
        l.abort();
    }
    let mut lat = Vec::new();
    for l in lats {
        if let Ok(l) = l.lock() {
            lat.extend_from_slice(&l);
        }
    }
    let ms = |d: Option<Duration>| {
        d.map_or("-".to_string(), |d| format!("{:.2}", d.as_secs_f64() * 1e3))
    };
    Ok(format!(
        "retained-pub label={} target={}:{} qos={} retain={} publishers={} topics={} payload={} secs={:.2} \
         acked={} msgs_per_s={:.0} ack_p50_ms={} ack_p99_ms={} ack_max_ms={}",
        args.label,
        args.host,
        args.port,
        args.qos,
        args.retain,
        args.publishers,
        args.topics,
        args.payload,
        secs,
        done,
        done as f64 / secs,
        ms(percentile(&mut lat, 50.0)),
        ms(percentile(&mut lat, 99.0)),
        ms(percentile(&mut lat, 100.0)),
    ))
}

#[derive(clap::Args, Debug)]
pub struct StartupArgs {
    /// host:port of the broker's MQTT listener (plain TCP, anonymous).
    #[arg(long)]
    mqtt: String,
    /// host:port of moatmq's metrics listener: wait for GET /readyz = 200 first.
    #[arg(long)]
    readyz: Option<String>,
    #[arg(long, default_value = "bench/#")]
    filter: String,
    /// Retained messages the broker holds (topics `<prefix>/<i / 1000>/<i % 1000>`).
    #[arg(long)]
    expect: u64,
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Exact topics, spread over the range, subscribed to one by one as well.
    #[arg(long, default_value_t = 100)]
    sample: u64,
    /// Stop counting after this many seconds without a delivery.
    #[arg(long, default_value_t = 5)]
    idle: u64,
    /// Stop counting this many seconds after the SUBSCRIBE in any case.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    #[arg(long, default_value = "-")]
    label: String,
    /// The broker command line.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub async fn startup(args: StartupArgs) -> anyhow::Result<String> {
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", args.command[0]))?;
    let give_up = t0 + Duration::from_secs(300);
    let ms = |t: Instant| format!("{:.0}", t.duration_since(t0).as_secs_f64() * 1e3);
    let mut ready = "-".to_string();
    if let Some(addr) = &args.readyz {
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("broker exited: {status}");
            }
            if readyz(addr).await.unwrap_or(false) {
                ready = ms(Instant::now());
                break;
            }
            if Instant::now() > give_up {
                bail!("/readyz never answered 200");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let target = Target::plain(&args.mqtt);
    let mut conn = loop {
        if let Some(status) = child.try_wait()? {
            bail!("broker exited: {status}");
        }
        if let Ok(mut conn) = wire::open(&target).await {
            if let Ok(0) = wire::login(&mut conn, "bench-startup", None, None).await {
                break conn;
            }
        }
        if Instant::now() > give_up {
            bail!("no CONNACK within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let connack = ms(Instant::now());
    // The sampled exact topics (spread over the whole range) go on a second connection,
    // so the first one counts only the wildcard's deliveries: the samples show whether
    // every message was replayed, whatever the broker sends for the wildcard.
    let mut sample_conn = wire::open(&target).await?;
    if wire::login(&mut sample_conn, "bench-startup-sample", None, None).await? != 0 {
        bail!("second CONNECT refused");
    }
    let sampled: std::collections::HashSet<String> = (0..args.sample)
        .map(|k| topic(&args.prefix, k * args.expect / args.sample.max(1)))
        .collect();
    let subscribed = Instant::now();
    conn.write(&wire::subscribe_packet(1, &args.filter, 0))
        .await?;
    for (k, t) in sampled.iter().enumerate() {
        sample_conn
            .write(&wire::subscribe_packet(1 + k as u16, t, 0))
            .await?;
    }
    let idle = Duration::from_secs(args.idle);
    let deadline = tokio::time::Instant::from_std(subscribed + Duration::from_secs(args.timeout));
    // Wildcard: count until `--expect` distinct topics arrived, `--idle` s pass without
    // a delivery, or `--timeout` s after the SUBSCRIBE.
    let wildcard = async {
        let mut topics = std::collections::HashSet::new();
        let (mut received, mut first, mut last) = (0u64, None, None);
        while (topics.len() as u64) < args.expect {
            let read = tokio::time::timeout(idle, conn.read());
            match tokio::time::timeout_at(deadline, read).await {
                Ok(Ok(Ok(p))) => {
                    if let Some((t, _)) = wire::publish_parts(p.first, &p.body) {
                        received += 1;
                        let now = Instant::now();
                        first.get_or_insert(now);
                        last = Some(now);
                        topics.insert(t.to_vec());
                    }
                }
                Ok(Ok(Err(e))) => {
                    eprintln!("startup: wildcard connection ended: {e:#}");
                    break;
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        (received, topics.len() as u64, first, last)
    };
    let samples = async {
        let mut seen = std::collections::HashSet::new();
        let mut all_sampled = None;
        while seen.len() < sampled.len() {
            let read = tokio::time::timeout(idle, sample_conn.read());
            match tokio::time::timeout_at(deadline, read).await {
                Ok(Ok(Ok(p))) => {
                    if let Some((t, _)) = wire::publish_parts(p.first, &p.body) {
                        if let Ok(t) = std::str::from_utf8(t) {
                            if sampled.contains(t)
                                && seen.insert(t.to_string())
                                && seen.len() == sampled.len()
                            {
                                all_sampled = Some(Instant::now());
                            }
                        }
                    }
                }
                Ok(Ok(Err(e))) => {
                    eprintln!("startup: sample connection ended: {e:#}");
                    break;
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        (seen.len(), all_sampled)
    };
    let ((received, distinct, first, last), (sampled_found, all_sampled)) =
        tokio::join!(wildcard, samples);
    let _ = child.kill().await;
    let since_sub = |t: Instant| t.duration_since(subscribed).as_secs_f64();
    Ok(format!(
        "startup label={} ready_ms={} connack_ms={} first_retained_ms={} last_retained_ms={} \
         received={} distinct={} expected={} subscribe_to_first_ms={} subscribe_to_last_ms={} \
         wildcard_msgs_per_s={} sampled={} sampled_found={} all_sampled_ms={}",
        args.label,
        ready,
        connack,
        first.map_or("-".to_string(), ms),
        last.map_or("-".to_string(), ms),
        received,
        distinct,
        args.expect,
        first.map_or("-".to_string(), |f| format!("{:.0}", since_sub(f) * 1e3)),
        last.map_or("-".to_string(), |l| format!("{:.0}", since_sub(l) * 1e3)),
        last.map_or("-".to_string(), |l| format!(
            "{:.0}",
            received as f64 / since_sub(l).max(1e-9)
        )),
        sampled.len(),
        sampled_found,
        all_sampled.map_or("-".to_string(), ms),
    ))
}

async fn readyz(addr: &str) -> anyhow::Result<bool> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await?;
    Ok(&head[9..12] == b"200")
}
