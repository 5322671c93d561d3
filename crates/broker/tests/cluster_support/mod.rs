//! What the cluster tests share: a `nats-server -js` on a loopback port of its own,
//! killed when dropped, and moatmq nodes joined through it with one cluster key.
//! tests/cluster.rs takes its `Nats` from here too.
#![allow(dead_code)]

use moatmq_testkit::{TestBroker, TestBrokerBuilder, WAIT};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const USERS: &[(&str, &str)] = &[
    ("alice", "alice-pw"),
    ("bob", "bob-pw"),
    ("admin", "admin-pw"),
];

pub const ACL: &str = "\
user alice
topic readwrite alice/#
topic deny alice/secret/#
topic readwrite common/#

user bob
topic readwrite bob/#
topic readwrite common/#

user admin
topic readwrite #

user natsbridge
topic write alice/from-nats/#
topic write common/#
";

/// The `[retained]` key every node of the test cluster shares (hex).
pub const CLUSTER_KEY: &str = "5ea1ed0c1a55e7a11c0ffee0ddba11d0decade5eedfacade0b5e55edc0de1234";

/// The password of a test user.
pub fn password(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(u, _)| *u == user)
        .map(|(_, p)| *p)
        .expect("a test user")
}

/// `[retained]` with the key `hex` in `retained.key` (mode 0600).
pub fn with_key(b: TestBrokerBuilder, hex: &str) -> TestBrokerBuilder {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(b.dir().join("retained.key"))
        .expect("write retained.key");
    std::io::Write::write_all(&mut file, format!("{hex}\n").as_bytes()).expect("key");
    b.set("retained", "path", "data/retained")
        .set("retained", "key_file", "retained.key")
}

/// A nats-server with JetStream on 127.0.0.1, killed when dropped.
pub struct Nats {
    pub port: u16,
    dir: tempfile::TempDir,
    /// Options after the defaults (TLS).
    extra: Vec<String>,
    child: Option<Child>,
}

impl Nats {
    pub async fn start() -> Nats {
        Nats::start_with(tempfile::tempdir().expect("temp dir"), Vec::new()).await
    }

    /// A server with `extra` options; `dir` holds its JetStream store and any files
    /// the options name.
    pub async fn start_with(dir: tempfile::TempDir, extra: Vec<String>) -> Nats {
        let found = Command::new("sh")
            .args(["-c", "command -v nats-server"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "nats-server not found: install the package nats-server \
             (e.g. `apt-get install nats-server`; .ci/run does)"
        );
        // A free port, chosen by the system, for this server (and its restarts).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut nats = Nats {
            port,
            dir,
            extra,
            child: None,
        };
        nats.restart().await;
        nats
    }

    /// Starts the server (again) on its port and waits until it accepts connections.
    pub async fn restart(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path().join("js"))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not listen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.expect("NATS client")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A moatmq node joined to `nats` as `name`; ready when this returns.
pub async fn node(nats: &Nats, name: &str) -> TestBroker {
    node_with(nats, name, |b| b).await
}

/// [`node`], with more set up on its builder (limits).
#[allow(dead_code)] // not every test file that includes this module uses it
pub async fn node_with(
    nats: &Nats,
    name: &str,
    more: impl FnOnce(moatmq_testkit::TestBrokerBuilder) -> moatmq_testkit::TestBrokerBuilder,
) -> TestBroker {
    node_joined(nats, name, "", more).await
}

/// [`node`] taking NATS-native messages in as `natsbridge` (`native_user`).
pub async fn native_node(nats: &Nats, name: &str) -> TestBroker {
    node_joined(nats, name, "native_user = \"natsbridge\"\n", |b| b).await
}

/// [`node_with`], with `cluster_keys` (TOML lines) added to its `[cluster]` section.
pub async fn node_joined(
    nats: &Nats,
    name: &str,
    cluster_keys: &str,
    more: impl FnOnce(moatmq_testkit::TestBrokerBuilder) -> moatmq_testkit::TestBrokerBuilder,
) -> TestBroker {
    node_with_acl(nats, name, ACL, cluster_keys, more).await
}

/// [`node_joined`] with the ACL `acl` instead of [`ACL`] (the users are [`USERS`]).
pub async fn node_with_acl(
    nats: &Nats,
    name: &str,
    acl: &str,
    cluster_keys: &str,
    more: impl FnOnce(moatmq_testkit::TestBrokerBuilder) -> moatmq_testkit::TestBrokerBuilder,
) -> TestBroker {
    node_at(&nats.url(), name, acl, cluster_keys, more).await
}

/// A node of [`node_with_acl`] reaching NATS at `url` (a [`NatsLink`]).
pub async fn node_at(
    url: &str,
    name: &str,
    acl: &str,
    cluster_keys: &str,
    more: impl FnOnce(moatmq_testkit::TestBrokerBuilder) -> moatmq_testkit::TestBrokerBuilder,
) -> TestBroker {
    let broker = more(with_key(TestBroker::builder(), CLUSTER_KEY))
        .users(USERS)
        .acl(acl)
        .metrics()
        .no_connection_rate()
        .toml(&format!(
            "[cluster]\nservers = [\"{url}\"]\nnode_name = \"{name}\"\n{cluster_keys}"
        ))
        .start()
        .await;
    wait_ready(&broker, true).await;
    broker
}

/// One node's way to NATS through a TCP relay on a loopback port of its own: cut, the
/// node is up but cut off from NATS (as in a partition) until it is restored.
pub struct NatsLink {
    port: u16,
    nats: u16,
    relay: Option<tokio::task::JoinHandle<()>>,
    /// While true, what the node sends is held in the link (its connection stays
    /// open), and goes on to NATS, in order, once it is false again.
    stalled: tokio::sync::watch::Sender<bool>,
}

impl NatsLink {
    pub async fn start(nats: &Nats) -> NatsLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stalled, _) = tokio::sync::watch::channel(false);
        let mut link = NatsLink {
            port,
            nats: nats.port,
            relay: None,
            stalled,
        };
        link.relay = Some(tokio::spawn(relay(
            listener,
            nats.port,
            link.stalled.subscribe(),
        )));
        link
    }

    /// Holds what the node sends to NATS from now on (a congested or stalled network
    /// path: the connection stays up, nothing arrives) until [`NatsLink::resume`].
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Lets what was held, and what follows, reach NATS.
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the link and refuses new ones.
    pub async fn cut(&mut self) {
        if let Some(relay) = self.relay.take() {
            relay.abort();
            let _ = relay.await;
        }
    }

    /// Lets the node reach NATS again (it reconnects by itself).
    pub async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.relay = Some(tokio::spawn(relay(
            listener,
            self.nats,
            self.stalled.subscribe(),
        )));
    }
}

/// Relays each connection to `listener` to NATS on `nats`, what the node sends held
/// while `stalled`; aborted, all of them end.
async fn relay(
    listener: tokio::net::TcpListener,
    nats: u16,
    stalled: tokio::sync::watch::Receiver<bool>,
) {
    let mut pipes = tokio::task::JoinSet::new();
    while let Ok((inbound, _)) = listener.accept().await {
        let stalled = stalled.clone();
        pipes.spawn(async move {
            if let Ok(out) = tokio::net::TcpStream::connect(("127.0.0.1", nats)).await {
                let (node_read, mut node_write) = inbound.into_split();
                let (mut nats_read, nats_write) = out.into_split();
                // NATS closing closes the node's side too.
                let to_node = async {
                    let _ = tokio::io::copy(&mut nats_read, &mut node_write).await;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut node_write).await;
                };
                tokio::join!(pump(node_read, nats_write, stalled), to_node);
            }
        });
    }
}

/// Copies what the node sends to NATS, holding it while `stalled`; what was held when
/// the node closed its side still goes once the stall ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = true;
    loop {
        if !*stalled.borrow() && !held.is_empty() {
            if to.write_all(&held).await.is_err() {
                return;
            }
            held.clear();
        }
        if !open {
            if held.is_empty() {
                return;
            }
            if stalled.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => open = false,
                Ok(n) => held.extend_from_slice(&buf[..n]),
            },
            changed = stalled.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// `/readyz`'s answer is 200.
pub async fn ready(broker: &TestBroker) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(broker.metrics_addr()).await else {
        return false;
    };
    if s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await.is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text).await;
    text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200")
}

/// Waits until `/readyz` answers 200 (`want`) or not.
pub async fn wait_ready(broker: &TestBroker, want: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ready(broker).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz did not become {}",
            if want { "200" } else { "503" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The transfer stream of the default prefix, as a NATS client sees it.
pub async fn transfer_stream(nats: &Nats) -> async_nats::jetstream::stream::Stream {
    async_nats::jetstream::new(nats.client().await)
        .get_stream("moatmq_xfer")
        .await
        .expect("the transfer stream exists")
}

/// Node `node`'s durable consumer of the transfer stream, as a NATS client sees it.
pub async fn transfer_consumer(
    nats: &Nats,
    node: &str,
) -> async_nats::jetstream::consumer::PullConsumer {
    transfer_stream(nats)
        .await
        .get_consumer(node)
        .await
        .expect("the node's consumer")
}

/// The sequence of `stream`'s last message.
pub async fn last_sequence(stream: &mut async_nats::jetstream::stream::Stream) -> u64 {
    stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence
}

/// The transfer stream's last message.
pub async fn last_transfer_message(nats: &Nats) -> async_nats::jetstream::message::StreamMessage {
    let mut stream = transfer_stream(nats).await;
    let last = last_sequence(&mut stream).await;
    stream.get_raw_message(last).await.expect("the message")
}

/// The cluster's seal, as the nodes derive it, to read and forge bucket values.
pub fn cluster_seal() -> moatmq_store::ClusterSeal {
    moatmq_store::ClusterSeal::new(
        &moatmq_store::RetainedKey::from_hex(CLUSTER_KEY).expect("a key"),
    )
}

/// One transfer message's plaintext as a node writes it before sealing: alice's QoS 1
/// publish of `payload` to `topic` (client "x"), sealed now.
pub fn transfer_plaintext(topic: &str, payload: &[u8]) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    transfer_plaintext_at(topic, payload, Some(now))
}

/// [`transfer_plaintext`] sealed at `sealed` (Unix milliseconds); `None`: without the
/// time, as releases before it wrote messages.
pub fn transfer_plaintext_at(topic: &str, payload: &[u8], sealed: Option<u128>) -> Vec<u8> {
    let time = sealed.map_or(String::new(), |t| format!(",\"sealed\":{t}"));
    let header = format!(
        "{{\"topic\":\"{topic}\",\"qos\":1,\"retain\":false,\"user\":\"alice\",\"client\":\"x\"{time}}}"
    );
    let mut out = (header.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Stores in the transfer stream, with a plain NATS client, node `node`'s (epoch 9)
/// message number `n`: [`transfer_plaintext`] sealed with the cluster's key, as that
/// node would.
pub async fn forge_transfer(
    js: &async_nats::jetstream::Context,
    node: &str,
    n: u64,
    topic: &str,
    payload: &[u8],
) {
    forge_transfer_plain(js, node, n, &transfer_plaintext(topic, payload)).await;
}

/// [`forge_transfer`] of the plaintext `plain` (as [`transfer_plaintext_at`] makes it).
pub async fn forge_transfer_plain(
    js: &async_nats::jetstream::Context,
    node: &str,
    n: u64,
    plain: &[u8],
) {
    let id = format!("{node}:9:{n}");
    let value = cluster_seal()
        .seal_transfer("moatmq_xfer", &id, plain)
        .expect("sealed");
    let message = async_nats::jetstream::message::PublishMessage::build()
        .message_id(id)
        .payload(value.into());
    js.send_publish(format!("moatmq_xfer.{node}"), message)
        .await
        .expect("published")
        .await
        .expect("stored");
}

/// Subscribes an MQTT 5 client at QoS 1 and waits for the SUBACK.
pub async fn subscribed5(c: &mut moatmq_testkit::v5::Client, filter: &str) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    c.client
        .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    c.incoming(|p| matches!(p, Packet::SubAck(_)).then_some(()))
        .await
        .expect("SUBACK");
}

/// Publishes `payload` to `topic` at QoS 1 with an MQTT 5 message expiry interval of
/// `secs` and waits for the PUBACK.
pub async fn publish_expiring5(
    c: &mut moatmq_testkit::v5::Client,
    topic: &str,
    payload: &str,
    secs: u32,
) {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    let props = PublishProperties {
        message_expiry_interval: Some(secs),
        ..PublishProperties::default()
    };
    c.client
        .publish_with_properties(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            payload.as_bytes().to_vec(),
            props,
        )
        .await
        .expect("publish queued");
    c.incoming(|p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await
        .expect("PUBACK");
}

/// Every PUBLISH an MQTT 5 client gets until nothing arrives for `quiet`: payload and
/// message expiry interval.
pub async fn expiring5(
    c: &mut moatmq_testkit::v5::Client,
    quiet: Duration,
) -> Vec<(String, Option<u32>)> {
    let mut got = Vec::new();
    while let Some(p) = c.publish_within(quiet).await {
        let left = p.properties.and_then(|p| p.message_expiry_interval);
        got.push((String::from_utf8_lossy(&p.payload).into_owned(), left));
    }
    got
}

/// What [`expiring5`] received of a "short" (2 s) and a "long" (60 s) message that
/// spent about 3 s in the transfer stream before it was read: only the long one, its
/// interval counted down by that time.
pub fn only_the_long_one_counted_down(got: &[(String, Option<u32>)]) {
    assert_eq!(got.len(), 1, "only the message still alive: {got:?}");
    let (payload, left) = &got[0];
    assert_eq!(payload, "long");
    let left = left.expect("an expiry interval");
    assert!(
        (50..=57).contains(&left),
        "3 s in the stream counted: {left}"
    );
}

/// A 3.1.1 login of the test user `user` with client id `id` on `addr`, with a clean
/// session or one kept (`clean` false); `Err` if refused.
pub async fn connect4(
    addr: std::net::SocketAddr,
    id: &str,
    user: &str,
    clean: bool,
) -> Result<moatmq_testkit::v4::Client, moatmq_testkit::v4::ConnectionError> {
    let mut o = moatmq_testkit::v4::options(addr, id);
    o.set_credentials(user, password(user));
    o.set_clean_session(clean);
    moatmq_testkit::v4::connect(o).await
}

/// A 3.1.1 login of the test user `user` with client id `id` on `addr`.
pub async fn login4(
    addr: std::net::SocketAddr,
    id: &str,
    user: &str,
) -> moatmq_testkit::v4::Client {
    connect4(addr, id, user, true).await.expect("login")
}

/// A 3.1.1 login keeping its session (clean session 0).
pub async fn persistent4(
    addr: std::net::SocketAddr,
    id: &str,
    user: &str,
) -> moatmq_testkit::v4::Client {
    connect4(addr, id, user, false).await.expect("login")
}

/// A persistent 3.1.1 session of `user` with client id `id` on `addr`, subscribed to
/// `topic` at `qos`, its client gone: what is published there is queued for it.
pub async fn offline4_at(
    addr: std::net::SocketAddr,
    id: &str,
    user: &str,
    topic: &str,
    qos: rumqttc::QoS,
) {
    let mut c = persistent4(addr, id, user).await;
    c.subscribe_at(topic, qos).await;
    c.client.disconnect().await.unwrap();
    c.closed_within(WAIT).await;
}
