//! `login`: a login storm (connect, CONNACK, DISCONNECT, close, as fast as `--concurrency`
//! workers can) while a probe, two clients connected beforehand, measures the latency of
//! ordinary QoS 0 publishes.
//!
//! Timeline: the probe publishes `--probe-rate` messages/s from the start; the first
//! `--baseline` seconds are without the storm, the next `--duration` seconds with it. A
//! probe message counts for the phase it was sent in. Logins are over plain TCP with a
//! username/password, or over TLS with a client certificate (`--cert/--key`); every TLS
//! connection does a full handshake (no session resumption). Connection setup of the
//! probe is not timed.

use crate::stats::percentile;
use crate::wire::{self, Target};
use anyhow::{bail, Context};
use rustls::pki_types::ServerName;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STAMP_LEN: usize = 8;
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    /// Broker address, host:port.
    #[arg(long)]
    addr: String,
    /// CA bundle that signed the server certificate: connect over TLS.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TLS server name to verify.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Client certificate (PEM) of the storm clients (with --key).
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    /// Username of the storm clients.
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password: Option<String>,
    /// Client certificate of the two probe clients (with --probe-key).
    #[arg(long)]
    probe_cert: Option<PathBuf>,
    #[arg(long)]
    probe_key: Option<PathBuf>,
    #[arg(long)]
    probe_username: Option<String>,
    #[arg(long)]
    probe_password: Option<String>,
    /// Topic of the probe messages (the probe identity must be allowed to use it).
    #[arg(long, default_value = "probe/latency")]
    probe_topic: String,
    /// Probe messages per second.
    #[arg(long, default_value_t = 200)]
    probe_rate: u64,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds of probe alone before the storm.
    #[arg(long, default_value_t = 3)]
    baseline: u64,
    /// Seconds of storm.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Free text copied into the report.
    #[arg(long, default_value = "-")]
    label: String,
}

fn target(
    args: &LoginArgs,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> anyhow::Result<Target> {
    let Some(ca) = &args.ca else {
        return Ok(Target::plain(&args.addr));
    };
    let client = match (cert, key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => bail!("a client certificate needs both --cert and --key"),
    };
    let connector = wire::tls_connector(ca, client)?;
    let name = ServerName::try_from(args.server_name.clone())?;
    Ok(Target {
        addr: args.addr.clone(),
        tls: Some((connector, name)),
    })
}

struct Storm {
    ok: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

pub async fn run(args: LoginArgs) -> anyhow::Result<String> {
    let storm_target = target(&args, &args.cert, &args.key)?;
    let probe_target = target(&args, &args.probe_cert, &args.probe_key)?;
    let t0 = Instant::now();
    let stamp = move || u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);

    // The probe: subscriber first, then the publisher.
    let (pu, pp) = (
        args.probe_username.as_deref(),
        args.probe_password.as_deref(),
    );
    let mut sub = wire::open(&probe_target)
        .await
        .context("probe subscriber")?;
    let rc = wire::login(&mut sub, "bench-probe-sub", pu, pp).await?;
    if rc != 0 {
        bail!("probe subscriber refused: CONNACK {rc}");
    }
    wire::subscribe(&mut sub, &args.probe_topic, 0).await?;
    let mut publ = wire::open(&probe_target).await.context("probe publisher")?;
    let rc = wire::login(&mut publ, "bench-probe-pub", pu, pp).await?;
    if rc != 0 {
        bail!("probe publisher refused: CONNACK {rc}");
    }

    let storm_start = Duration::from_secs(args.baseline);
    let storm_end = storm_start + Duration::from_secs(args.duration);
    let probe_stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = probe_stop.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(u64, u64)> = Vec::new();
            loop {
                let read = tokio::time::timeout(Duration::from_millis(500), sub.read()).await;
                let packet = match read {
                    Ok(r) => r?,
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => continue,
                };
                if let Some((_, payload)) = wire::publish_parts(packet.first, &packet.body) {
                    if payload.len() >= STAMP_LEN {
                        let mut sent = [0u8; STAMP_LEN];
                        sent.copy_from_slice(&payload[..STAMP_LEN]);
                        let sent = u64::from_le_bytes(sent);
                        samples.push((sent, stamp().saturating_sub(sent)));
                    }
                }
            }
            anyhow::Ok(samples)
        })
    };
    let sender = {
        let topic = args.probe_topic.clone();
        let period = Duration::from_nanos(1_000_000_000 / args.probe_rate.max(1));
        let end = storm_end + Duration::from_millis(200);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sent = 0u64;
            while t0.elapsed() < end {
                tick.tick().await;
                let mut payload = [0u8; 16];
                payload[..STAMP_LEN].copy_from_slice(&stamp().to_le_bytes());
                publ.write(&wire::publish_packet(&topic, &payload, false))
                    .await?;
                sent += 1;
            }
            anyhow::Ok((sent, publ))
        })
    };

    tokio::time::sleep_until((t0 + storm_start).into()).await;
    let storm = Arc::new(Storm {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let first_error: Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let target = storm_target.clone();
        let storm = storm.clone();
        let (user, pass) = (args.username.clone(), args.password.clone());
        let first_error = first_error.clone();
        workers.push(tokio::spawn(async move {
            let mut times = Vec::new();
            let mut n = 0u64;
            while !storm.stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let id = format!("bench-storm-{w}-{n}");
                n += 1;
                let attempt = tokio::time::timeout(LOGIN_TIMEOUT, async {
                    let mut conn = wire::open(&target).await?;
                    let rc = wire::login(&mut conn, &id, user.as_deref(), pass.as_deref()).await?;
                    if rc == 0 {
                        conn.write(&wire::DISCONNECT).await?;
                    }
                    let _ = conn.shutdown().await;
                    anyhow::Ok(rc)
                })
                .await;
                let outcome = match attempt {
                    Ok(Ok(0)) => Ok(()),
                    Ok(Ok(rc)) => Err(format!("CONNACK return code {rc}")),
                    Ok(Err(e)) => Err(format!("{e:#}")),
                    Err(_) => Err("timed out".to_string()),
                };
                if storm.stop.load(Ordering::Relaxed) {
                    break;
                }
                match outcome {
                    Ok(()) => {
                        storm.ok.fetch_add(1, Ordering::Relaxed);
                        times.push(started.elapsed().as_nanos() as u64);
                    }
                    Err(e) => {
                        storm.failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            times
        }));
    }
    let storm_began = Instant::now();
    tokio::time::sleep_until((t0 + storm_end).into()).await;
    storm.stop.store(true, Ordering::Relaxed);
    let storm_secs = storm_began.elapsed().as_secs_f64();
    let (ok, failed) = (
        storm.ok.load(Ordering::Relaxed),
        storm.failed.load(Ordering::Relaxed),
    );
    let mut login_times = Vec::new();
    for w in workers {
        login_times.extend(w.await?);
    }
    let (probe_sent, mut publ) = sender.await??;
    tokio::time::sleep(Duration::from_secs(1)).await;
    probe_stop.store(true, Ordering::Relaxed);
    let samples = receiver.await??;
    let _ = publ.write(&wire::DISCONNECT).await;

    let (s0, s1) = (storm_start.as_nanos() as u64, storm_end.as_nanos() as u64);
    let mut base: Vec<u64> = samples.iter().filter(|s| s.0 < s0).map(|s| s.1).collect();
    let mut during: Vec<u64> = samples
        .iter()
        .filter(|s| s.0 >= s0 && s.0 < s1)
        .map(|s| s.1)
        .collect();
    let us = |d: Option<Duration>| d.map_or("-".to_string(), |d| d.as_micros().to_string());
    let ms = |d: Option<Duration>| {
        d.map_or("-".to_string(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
    };
    let mode = match (&args.ca, &args.cert) {
        (Some(_), Some(_)) => "mtls",
        (Some(_), None) => "tls",
        _ => "tcp",
    };
    let mut report = format!(
        "login label={} target={} mode={} concurrency={} secs={:.2} logins={} failed={} \
         logins_per_s={:.1} login_p50_ms={} login_p99_ms={} probe_sent={} probe_received={} \
         probe_base_p50_us={} probe_base_p99_us={} probe_storm_p50_us={} probe_storm_p99_us={} \
         probe_storm_max_us={}",
        args.label,
        args.addr,
        mode,
        args.concurrency,
        storm_secs,
        ok,
        failed,
        ok as f64 / storm_secs,
        ms(percentile(&mut login_times, 50.0)),
        ms(percentile(&mut login_times, 99.0)),
        probe_sent,
        samples.len(),
        us(percentile(&mut base, 50.0)),
        us(percentile(&mut base, 99.0)),
        us(percentile(&mut during, 50.0)),
        us(percentile(&mut during, 99.0)),
        us(percentile(&mut during, 100.0)),
    );
    if let Some(e) = first_error.lock().unwrap().take() {
        report.push_str(&format!(" first_error={:?}", e));
    }
    Ok(report)
}
