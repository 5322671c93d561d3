//! Persistent sessions (3.1.1, clean session 0) with messages queued while offline.
//!
//! `session-setup`: `--sessions` clients `<id>-<i>` connect with clean session 0,
//! subscribe at QoS 1 (to `--filter`, or each to its own topic
//! `<prefix>/<i / 1000>/<i % 1000>` as `retained-pub --retain false` publishes them) and
//! disconnect, leaving that many offline sessions. Reported: sessions per second.
//!
//! `session-resume`: the `--sessions` clients `<id>-<i>` come back at once (clean
//! session 0, `--parallel` at a time; on another cluster node, the sessions move
//! there), each disconnecting again once its CONNACK came, leaving the session offline.
//! Reported: how long until every CONNACK, how many said session present, how many
//! failed (no CONNACK within 10 s, or refused), and the answered CONNACKs' p50/p99/max.
//!
//! `session-drain`: one client reconnects with clean session 0 and takes its queue,
//! acknowledging every QoS 1 message (the PUBACKs of one read go out in one write),
//! until `--expect` messages arrived, `--idle` seconds pass without one or `--timeout`
//! seconds. With a command after `--` it first starts that broker and times from the
//! spawn (retrying the CONNECT until one is answered): the restart time. Reported: the
//! CONNACK time and its session-present flag, first and last message, the drain rate
//! from the CONNACK to the last message, and how many carried DUP. `--clean-after`
//! then connects once more with clean session 1, which removes the session (so the
//! next round starts from nothing). A broker it started is killed (SIGKILL) at the end.

use crate::storebench::topic;
use anyhow::{bail, Context};
use moatmq_testkit::wire::{self, first, Version};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which sessions, on which broker.
#[derive(clap::Args, Debug)]
pub struct Sessions {
    /// host:port of the broker's MQTT listener (plain TCP, anonymous).
    #[arg(long)]
    mqtt: String,
    #[arg(long, default_value_t = 1)]
    sessions: u64,
    /// Client ids are `<id>-<i>`.
    #[arg(long, default_value = "bench-session")]
    id: String,
}

#[derive(clap::Args, Debug)]
pub struct SetupArgs {
    #[command(flatten)]
    on: Sessions,
    /// One filter for every session; without it, session i subscribes to
    /// `<prefix>/<i / 1000>/<i % 1000>`.
    #[arg(long)]
    filter: Option<String>,
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Sessions set up at the same time.
    #[arg(long, default_value_t = 32)]
    parallel: u64,
    #[arg(long, default_value = "-")]
    label: String,
}

pub async fn setup(args: SetupArgs) -> anyhow::Result<String> {
    let started = Instant::now();
    workers(args.on.sessions, args.parallel, |mine| {
        let (mqtt, id, prefix) = (
            args.on.mqtt.clone(),
            args.on.id.clone(),
            args.prefix.clone(),
        );
        let filter = args.filter.clone();
        async move {
            for i in mine {
                let filter = filter.clone().unwrap_or_else(|| topic(&prefix, i));
                let mut conn = Conn::open(&mqtt).await?;
                let (code, _) = conn.connect(&format!("{id}-{i}"), false).await?;
                if code != 0 {
                    bail!("CONNECT of {id}-{i} refused: {code}");
                }
                conn.write(&wire::subscribe(Version::V4, 1, &[(filter.as_bytes(), 1)]))
                    .await?;
                loop {
                    let (head, body) = conn.frame().await?;
                    if head == first::SUBACK {
                        if body.get(2).is_some_and(|&rc| rc >= 0x80) {
                            bail!("subscription of {id}-{i} to {filter} refused");
                        }
                        break;
                    }
                }
                conn.write(&wire::DISCONNECT).await?;
            }
            anyhow::Ok(())
        }
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(
        "session-setup label={} target={} sessions={} secs={:.2} sessions_per_s={:.0}",
        args.label,
        args.on.mqtt,
        args.on.sessions,
        secs,
        args.on.sessions as f64 / secs
    ))
}

#[derive(clap::Args, Debug)]
pub struct ResumeArgs {
    #[command(flatten)]
    on: Sessions,
    /// Sessions coming back at the same time.
    #[arg(long, default_value_t = 256)]
    parallel: u64,
    #[arg(long, default_value = "-")]
    label: String,
}

pub async fn resume(args: ResumeArgs) -> anyhow::Result<String> {
    let started = Instant::now();
    let done = workers(args.on.sessions, args.parallel, |mine| {
        let (mqtt, id) = (args.on.mqtt.clone(), args.on.id.clone());
        async move {
            let mut times = Vec::new();
            let (mut present, mut failed) = (0u64, 0u64);
            for i in mine {
                let asked = Instant::now();
                let client_id = format!("{id}-{i}");
                let back = async {
                    let mut conn = Conn::open(&mqtt).await?;
                    let (code, was_present) = conn.connect(&client_id, false).await?;
                    if code != 0 {
                        bail!("refused: {code}");
                    }
                    conn.write(&wire::DISCONNECT).await?;
                    anyhow::Ok(was_present)
                };
                match back.await {
                    Ok(was_present) => {
                        times.push(asked.elapsed().as_nanos() as u64);
                        present += u64::from(was_present);
                    }
                    // No CONNACK in time, or refused: counted, and the others go on.
                    Err(e) => {
                        eprintln!("session-resume: {client_id}: {e:#}");
                        failed += 1;
                    }
                }
            }
            anyhow::Ok((times, present, failed))
        }
    })
    .await?;
    let (mut times, mut present, mut failed) = (Vec::new(), 0, 0);
    for (more, p, f) in done {
        times.extend(more);
        present += p;
        failed += f;
    }
    let secs = started.elapsed().as_secs_f64();
    let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let p50 = ms(crate::stats::percentile(&mut times, 50.0));
    let p99 = ms(crate::stats::percentile(&mut times, 99.0));
    let max = ms(crate::stats::percentile(&mut times, 100.0));
    Ok(format!(
        "session-resume label={} target={} sessions={} present={} failed={} secs={:.2} connack_p50_ms={:.1} connack_p99_ms={:.1} connack_max_ms={:.1}",
        args.label, args.on.mqtt, args.on.sessions, present, failed, secs, p50, p99, max
    ))
}

/// Runs `work` on at most `parallel` tasks (at least one), task `w` given sessions `w`,
/// `w + n`, `w + 2n`, ... below `sessions` (`n` tasks); their results in task order.
async fn workers<T, F>(
    sessions: u64,
    parallel: u64,
    work: impl Fn(Vec<u64>) -> F,
) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let n = parallel.min(sessions).max(1);
    let tasks: Vec<_> = (0..n)
        .map(|w| tokio::spawn(work((w..sessions).step_by(n as usize).collect())))
        .collect();
    let mut done = Vec::with_capacity(tasks.len());
    for t in tasks {
        done.push(t.await??);
    }
    Ok(done)
}

#[derive(clap::Args, Debug)]
pub struct DrainArgs {
    /// host:port of the broker's MQTT listener (plain TCP, anonymous).
    #[arg(long)]
    mqtt: String,
    #[arg(long, default_value = "bench-session-0")]
    client_id: String,
    /// Messages queued for the session.
    #[arg(long)]
    expect: u64,
    /// Stop after this many seconds without a message.
    #[arg(long, default_value_t = 5)]
    idle: u64,
    /// Stop this many seconds after the CONNACK in any case.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Afterwards connect with clean session 1 under the same id (removes the session).
    #[arg(long)]
    clean_after: bool,
    #[arg(long, default_value = "-")]
    label: String,
    /// A broker command line to start first (times are then from its spawn).
    #[arg(last = true)]
    command: Vec<String>,
}

pub async fn drain(args: DrainArgs) -> anyhow::Result<String> {
    let t0 = Instant::now();
    let mut child = match args.command.split_first() {
        Some((program, rest)) => Some(
            tokio::process::Command::new(program)
                .args(rest)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {program}"))?,
        ),
        None => None,
    };
    let give_up = t0 + Duration::from_secs(600);
    // Until a CONNECT is answered: the port may not be open yet, or the broker may
    // still be loading (a refused TCP connection or no answer: try again).
    let (mut conn, present) = loop {
        if let Some(child) = child.as_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("broker exited: {status}");
            }
        }
        if let Ok(mut conn) = Conn::open(&args.mqtt).await {
            match conn.connect(&args.client_id, false).await {
                Ok((0, present)) => break (conn, present),
                Ok((code, _)) => bail!("CONNECT refused: {code}"),
                Err(_) => {}
            }
        }
        if Instant::now() > give_up {
            bail!("no CONNACK within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let connack = Instant::now();
    let idle = Duration::from_secs(args.idle);
    let deadline = tokio::time::Instant::from_std(connack + Duration::from_secs(args.timeout));
    let (mut received, mut dup, mut first_at, mut last_at) = (0u64, 0u64, None, None);
    let mut other = 0u64;
    let mut acks = Vec::new();
    // The frames already read come first: the read that brought the CONNACK may hold a
    // whole window of PUBLISHes, and the broker sends no more before they are acknowledged.
    loop {
        while let Some((head, body)) = conn.take()? {
            if head >> 4 != 3 {
                other += 1;
                continue;
            }
            received += 1;
            let now = Instant::now();
            first_at.get_or_insert(now);
            last_at = Some(now);
            if head & 0x08 != 0 {
                dup += 1;
            }
            if (head >> 1) & 3 > 0 {
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let pkid = u16::from_be_bytes([body[2 + topic_len], body[3 + topic_len]]);
                acks.extend_from_slice(&wire::ack(first::PUBACK, pkid));
            }
        }
        if !acks.is_empty() {
            conn.write(&acks).await?;
            acks.clear();
        }
        if received >= args.expect {
            break;
        }
        let more = tokio::time::timeout(idle, conn.fill());
        match tokio::time::timeout_at(deadline, more).await {
            Ok(Ok(Ok(true))) => {}
            Ok(Ok(Ok(false))) => {
                eprintln!("session-drain: the broker closed the connection");
                break;
            }
            Ok(Ok(Err(e))) => {
                eprintln!("session-drain: {e:#}");
                break;
            }
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // Let the last PUBACKs reach the broker before going away.
    conn.write(&wire::DISCONNECT).await?;
    drop(conn);
    if args.clean_after {
        let mut conn = Conn::open(&args.mqtt).await?;
        conn.connect(&args.client_id, true).await?;
        conn.write(&wire::DISCONNECT).await?;
    }
    if let Some(mut child) = child {
        let _ = child.kill().await;
    }
    let ms = |t: Option<Instant>| {
        t.map_or("-".to_string(), |t| {
            format!("{:.0}", t.duration_since(t0).as_secs_f64() * 1e3)
        })
    };
    let rate = last_at.map_or("-".to_string(), |l| {
        format!(
            "{:.0}",
            received as f64 / l.duration_since(connack).as_secs_f64().max(1e-9)
        )
    });
    Ok(format!(
        "session-drain label={} target={} connack_ms={} session_present={} received={} \
         expected={} dup={} other_packets={} first_ms={} last_ms={} drain_msgs_per_s={}",
        args.label,
        args.mqtt,
        ms(Some(connack)),
        u8::from(present),
        received,
        args.expect,
        dup,
        other,
        ms(first_at),
        ms(last_at),
        rate,
    ))
}

/// A plain TCP connection with a read buffer: frames are cut out of it in place, so a
/// read carrying hundreds of PUBLISHes costs one syscall and one PUBACK write.
struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
    at: usize,
}

impl Conn {
    async fn open(addr: &str) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(Conn {
            tcp,
            buf: Vec::with_capacity(256 * 1024),
            at: 0,
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.tcp.write_all(bytes).await?;
        Ok(())
    }

    /// CONNECT (MQTT 3.1.1, keep alive 0) and its CONNACK: return code, session present.
    async fn connect(&mut self, client_id: &str, clean: bool) -> anyhow::Result<(u8, bool)> {
        let mut connect = wire::Connect::new(Version::V4, client_id).keep_alive(0);
        connect.clean = clean;
        self.write(&connect.encode()).await?;
        let (head, body) = tokio::time::timeout(Duration::from_secs(10), self.frame())
            .await
            .context("no CONNACK within 10 s")??;
        if head != first::CONNACK || body.len() < 2 {
            bail!("expected CONNACK, got packet type {}", head >> 4);
        }
        Ok((body[1], body[0] & 1 == 1))
    }

    /// Reads more bytes; `false` at the end of the stream.
    async fn fill(&mut self) -> anyhow::Result<bool> {
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + 64 * 1024, 0);
        let n = self.tcp.read(&mut self.buf[len..]).await?;
        self.buf.truncate(len + n);
        Ok(n > 0)
    }

    /// The next whole frame already read, if any: first byte and body.
    fn take(&mut self) -> anyhow::Result<Option<(u8, Vec<u8>)>> {
        let rest = &self.buf[self.at..];
        match wire::cut(rest) {
            Ok(Some((head, header, len))) => {
                let body = rest[header..header + len].to_vec();
                self.at += header + len;
                Ok(Some((head, body)))
            }
            Ok(None) => Ok(None),
            Err(_) => bail!("malformed remaining length"),
        }
    }

    /// The next whole frame, reading as needed.
    async fn frame(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        loop {
            if let Some(frame) = self.take()? {
                return Ok(frame);
            }
            if !self.fill().await? {
                bail!("connection closed");
            }
        }
    }
}
