//! A fleet of devices at once, each its own connection (hand-written 3.1.1 packets, a
//! small read buffer per connection), spread over several loopback source addresses as
//! devices behind many networks would be.
//!
//! - `reconnect`: `--count` password devices (users `dev<i>`, passwords `pw-<i>`, as
//!   written by `passwords`) log in all at once and stay connected; then every
//!   connection drops at the same moment (the devices' network restarting, the broker
//!   still running) and all of them log in again at once. A device refused as busy
//!   (CONNACK 3) or cut off before its CONNACK retries after a short random pause, as
//!   device firmware does. Reports how long each wave took until every device had its
//!   CONNACK 0.
//! - `idle`: `--count` devices log in and stay idle; reports the broker's resident memory
//!   (VmRSS of `--pid`) before they connect and once they are all in and it has settled.
//! - `passwords`: writes a moatmq password file (Argon2id, the broker's own parameters,
//!   hashed on every core) and a plain `user:password` file for `mosquitto_passwd -U`.

use crate::wire::{self, Conn, Target};
use anyhow::{bail, Context};
use rustls::pki_types::ServerName;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;

/// Read buffer per device connection: CONNACKs only.
const DEVICE_BUFFER: usize = 256;
/// How long one login attempt may take before the device gives up and retries.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A wave that is not complete after this long is reported as failed.
const WAVE_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(clap::Args, Debug)]
pub struct FleetArgs {
    /// Broker address, 127.0.0.1:port.
    #[arg(long)]
    addr: SocketAddr,
    /// Number of devices.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Loopback source addresses the devices are spread over (127.0.0.2 and up).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=250))]
    sources: u8,
    /// Log in with users `dev<i>` / passwords `pw-<i>`; anonymous without.
    #[arg(long)]
    passwords: bool,
    /// CA bundle that signed the server certificate: connect over TLS.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TLS server name to verify.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Free text copied into the report.
    #[arg(long, default_value = "-")]
    label: String,
}

#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// The broker's process id, for its VmRSS.
    #[arg(long)]
    pid: u32,
    /// Seconds to let the broker settle once every device is in.
    #[arg(long, default_value_t = 3)]
    settle: u64,
}

#[derive(clap::Args, Debug)]
pub struct PasswordsArgs {
    /// Number of users (`dev0` ...).
    #[arg(long)]
    count: usize,
    /// moatmq password file to write (Argon2id).
    #[arg(long)]
    out: PathBuf,
    /// Plain `user:password` lines to write, for `mosquitto_passwd -U`.
    #[arg(long)]
    plain: Option<PathBuf>,
}

fn user(i: usize) -> String {
    format!("dev{i}")
}

fn password(i: usize) -> String {
    format!("pw-{i}")
}

/// Writes the password files; every core hashes a share of the users.
pub fn passwords(args: PasswordsArgs) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = AtomicUsize::new(0);
    let mut lines: Vec<String> = vec![String::new(); args.count];
    let hashed: Vec<Vec<(usize, String)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..cores)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= args.count {
                            return Ok::<_, anyhow::Error>(mine);
                        }
                        let hash = moatmq_auth::hash_password(password(i).as_bytes())?;
                        mine.push((i, hash));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("hashing thread"))
            .collect::<anyhow::Result<_>>()
    })?;
    for (i, hash) in hashed.into_iter().flatten() {
        lines[i] = format!("{}:{hash}\n", user(i));
    }
    std::fs::write(&args.out, lines.concat()).with_context(|| format!("{}", args.out.display()))?;
    if let Some(plain) = &args.plain {
        let mut f = std::fs::File::create(plain).with_context(|| format!("{}", plain.display()))?;
        for i in 0..args.count {
            writeln!(f, "{}:{}", user(i), password(i))?;
        }
    }
    Ok(())
}

struct Fleet {
    target: Target,
    addr: SocketAddr,
    sources: u8,
    passwords: bool,
    /// Login attempts refused as busy or cut off, over the whole run.
    retries: AtomicU64,
}

impl Fleet {
    fn new(args: &FleetArgs) -> anyhow::Result<Fleet> {
        let tls = match &args.ca {
            Some(ca) => Some((
                wire::tls_connector(ca, None)?,
                ServerName::try_from(args.server_name.clone())?,
            )),
            None => None,
        };
        Ok(Fleet {
            target: Target {
                addr: args.addr.to_string(),
                tls,
            },
            addr: args.addr,
            sources: args.sources,
            passwords: args.passwords,
            retries: AtomicU64::new(0),
        })
    }

    fn source(&self, device: usize) -> IpAddr {
        let last = 2 + (device % usize::from(self.sources)) as u8;
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    /// One login attempt of `device`: the connection once CONNACK 0 came, else why not.
    async fn attempt(&self, device: usize) -> anyhow::Result<Conn> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(self.source(device), 0))?;
        let tcp = socket.connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let io: Box<dyn wire::Io> = match &self.target.tls {
            Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
            None => Box::new(tcp),
        };
        let mut conn = moatmq_testkit::Raw::with_capacity(io, DEVICE_BUFFER);
        let (u, p) = (user(device), password(device));
        let login = if self.passwords {
            (Some(u.as_str()), Some(p.as_str()))
        } else {
            (None, None)
        };
        let rc = wire::login(&mut conn, &format!("fleet-{device}"), login.0, login.1).await?;
        if rc != 0 {
            bail!("CONNACK {rc}");
        }
        Ok(conn)
    }

    /// Logs `device` in, retrying until it is in: a refused (busy) or failed attempt
    /// waits 50–250 ms first, as device firmware backs off.
    async fn login(&self, device: usize) -> Conn {
        loop {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, self.attempt(device)).await {
                Ok(Ok(conn)) => return conn,
                Ok(Err(_)) | Err(_) => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    let jitter =
                        (device as u64 * 7919 + self.retries.load(Ordering::Relaxed)) % 200;
                    tokio::time::sleep(Duration::from_millis(50 + jitter)).await;
                }
            }
        }
    }

    /// Every device logs in at once; the connections and the time until the last one
    /// was in.
    async fn wave(self: &Arc<Self>, count: usize) -> anyhow::Result<(Vec<Conn>, Duration)> {
        let started = Instant::now();
        let tasks: Vec<_> = (0..count)
            .map(|device| {
                let fleet = self.clone();
                tokio::spawn(async move { fleet.login(device).await })
            })
            .collect();
        let mut conns = Vec::with_capacity(count);
        let all = async {
            for task in tasks {
                conns.push(task.await?);
            }
            Ok::<_, tokio::task::JoinError>(())
        };
        match tokio::time::timeout(WAVE_TIMEOUT, all).await {
            Ok(joined) => joined?,
            Err(_) => bail!(
                "only {} of {count} devices were in after {WAVE_TIMEOUT:?}",
                conns.len()
            ),
        }
        Ok((conns, started.elapsed()))
    }
}

/// `reconnect`: first wave, every connection dropped at once, second wave.
pub async fn reconnect(args: FleetArgs) -> anyhow::Result<String> {
    let fleet = Arc::new(Fleet::new(&args)?);
    let (conns, first) = fleet.wave(args.count).await?;
    let first_retries = fleet.retries.swap(0, Ordering::Relaxed);
    drop(conns);
    let (conns, again) = fleet.wave(args.count).await?;
    let again_retries = fleet.retries.load(Ordering::Relaxed);
    drop(conns);
    Ok(format!(
        "label={} devices={} first_s={:.2} first_retries={first_retries} again_s={:.2} again_retries={again_retries}",
        args.label,
        args.count,
        first.as_secs_f64(),
        again.as_secs_f64(),
    ))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

/// `idle`: the broker's RSS before and with `--count` idle devices.
pub async fn idle(args: IdleArgs) -> anyhow::Result<String> {
    let fleet = Arc::new(Fleet::new(&args.fleet)?);
    let before = rss_kib(args.pid)?;
    let (conns, took) = fleet.wave(args.fleet.count).await?;
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let with = rss_kib(args.pid)?;
    let per = with.saturating_sub(before) as f64 / args.fleet.count as f64;
    drop(conns);
    Ok(format!(
        "label={} devices={} rss_before_kib={before} rss_kib={with} per_conn_kib={per:.1} connect_s={:.2}",
        args.fleet.label,
        args.fleet.count,
        took.as_secs_f64(),
    ))
}
