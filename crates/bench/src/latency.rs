//! End-to-end latency at a fixed rate: one publisher sends `--rate` QoS 1 messages per
//! second (each stamped with its send time) for `--secs` seconds to one QoS 1
//! subscriber, which acknowledges each; the latency is from the publisher's write to the
//! subscriber's read of the PUBLISH. Prints p50/p99/max and how many arrived.

use crate::stats::percentile;
use crate::wire::{self, Target};
use anyhow::{bail, Context};
use clap::Args;
use moatmq_testkit::wire::{ack, first, Publish, Version};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct LatencyArgs {
    /// Broker address, host:port.
    #[arg(long)]
    pub mqtt: String,
    /// The subscriber's broker address, host:port, if not `--mqtt` (e.g. another node of
    /// a cluster).
    #[arg(long)]
    pub sub_mqtt: Option<String>,
    /// Messages per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of sending (the first second is a warm-up and not counted).
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Payload bytes (at least 8: the send time).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Topic of the messages.
    #[arg(long, default_value = "bench/latency")]
    pub topic: String,
    /// Printed with the result.
    #[arg(long, default_value = "broker")]
    pub label: String,
}

pub async fn run(args: LatencyArgs) -> anyhow::Result<String> {
    let target = Target::plain(&args.mqtt);
    let sub_target = Target::plain(args.sub_mqtt.as_deref().unwrap_or(&args.mqtt));
    let mut sub = wire::open(&sub_target).await.context("subscriber")?;
    if wire::login(&mut sub, "bench-latency-sub", None, None).await? != 0 {
        bail!("subscriber refused");
    }
    wire::subscribe(&mut sub, &args.topic, 1).await?;
    let mut publ = wire::open(&target).await.context("publisher")?;
    if wire::login(&mut publ, "bench-latency-pub", None, None).await? != 0 {
        bail!("publisher refused");
    }
    let t0 = Instant::now();
    let stamp = move || u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let warm_up = 1_000_000_000u64;
    let total = args.rate * args.secs;

    let receiver = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(total as usize);
        let mut received = 0u64;
        while received < total {
            let frame = match tokio::time::timeout(Duration::from_secs(5), sub.read()).await {
                Ok(f) => f?,
                Err(_) => break,
            };
            let Some((_, payload)) = wire::publish_parts(frame.first, &frame.body) else {
                continue;
            };
            let now = stamp();
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&payload[..8]);
            let sent = u64::from_le_bytes(sent);
            if (frame.first >> 1) & 3 == 1 {
                let at = 2 + usize::from(u16::from_be_bytes([frame.body[0], frame.body[1]]));
                let pkid = u16::from_be_bytes([frame.body[at], frame.body[at + 1]]);
                sub.write(&ack(first::PUBACK, pkid)).await?;
            }
            received += 1;
            if sent >= warm_up {
                samples.push(now.saturating_sub(sent));
            }
        }
        anyhow::Ok((samples, received))
    });

    let period = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut payload = vec![0u8; args.payload.max(8)];
    let (mut sent, mut acked) = (0u64, 0u64);
    while sent < total {
        tokio::select! {
            _ = tick.tick() => {
                payload[..8].copy_from_slice(&stamp().to_le_bytes());
                let pkid = (sent % 65_535) as u16 + 1;
                let packet = Publish::new(Version::V4, args.topic.as_bytes(), &payload)
                    .qos(1, pkid)
                    .encode();
                publ.write(&packet).await?;
                sent += 1;
            }
            frame = publ.read() => {
                if frame?.first == first::PUBACK {
                    acked += 1;
                }
            }
        }
    }
    while acked < sent {
        match tokio::time::timeout(Duration::from_secs(5), publ.read()).await {
            Ok(Ok(f)) if f.first == first::PUBACK => acked += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let (mut samples, received) = receiver.await??;
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
    let max = samples.iter().max().copied().unwrap_or(0) as f64 / 1e3;
    Ok(format!(
        "latency label={} rate={} qos=1 payload={} sent={} acked={} received={} p50_us={:.0} p99_us={:.0} max_us={:.0}",
        args.label,
        args.rate,
        args.payload,
        sent,
        acked,
        received,
        ms(percentile(&mut samples, 50.0)),
        ms(percentile(&mut samples, 99.0)),
        max
    ))
}
