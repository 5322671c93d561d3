//! Cluster failures with one `moatmq serve` process per node (docs/cluster.md, "What
//! each failure costs"): nats-servers with JetStream started by the test on loopback
//! ports ([`Nats`]), every node with the same `[retained]` key, anonymous clients on
//! loopback (no ACL file: everything allowed to them). A node is ready (accepts
//! CONNECTs) once its NATS connection, transfer stream consumer and retained bucket
//! are in place; clients retry their CONNECT until then, as real ones do.

use moatmq_e2e::{store_config, Moatmq, Nats};
use moatmq_testkit::v4;
use rumqttc::{Event, Outgoing, Packet, QoS};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// How long a node may take to become ready (a NATS cluster elects its JetStream
/// leader first).
const READY: Duration = Duration::from_secs(30);

/// A test's folder with a new cluster key in it (`cluster.key`), for [`start_node`].
fn cluster_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    moatmq_store::RetainedKey::write_new(&key).unwrap();
    (dir, key)
}

/// `moatmq serve` as cluster node `name` of `nats_url`, in `dir/name`, with the key at
/// `key` (copied, mode kept).
fn start_node(dir: &Path, key: &Path, name: &str, nats_url: &str) -> Moatmq {
    start_node_with(dir, key, name, &[nats_url.to_string()], "")
}

/// [`start_node`] with every server of `servers` and `extra` lines in `[cluster]`.
fn start_node_with(dir: &Path, key: &Path, name: &str, servers: &[String], extra: &str) -> Moatmq {
    start_node_in(dir, key, name, servers, "", extra)
}

/// [`start_node_with`] with `retained` lines in `[retained]` too.
fn start_node_in(
    dir: &Path,
    key: &Path,
    name: &str,
    servers: &[String],
    retained: &str,
    extra: &str,
) -> Moatmq {
    start_node_env(dir, key, name, servers, retained, extra, &[])
}

/// [`start_node_in`] with `env` set for the process (test hooks).
fn start_node_env(
    dir: &Path,
    key: &Path,
    name: &str,
    servers: &[String],
    retained: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> Moatmq {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).unwrap();
    std::fs::copy(key, home.join("store.key")).unwrap();
    let config = store_config(
        &home,
        &format!("{retained}[cluster]\nservers = {servers:?}\nnode_name = \"{name}\"\n{extra}"),
    );
    Moatmq::serve(&config, env)
}

/// Waits until the NATS cluster's JetStream places a stream of `replicas` copies (its
/// leaders elected, which takes seconds after the servers start): a node checks the
/// cluster's key marker in a bucket before it listens, within `Moatmq::serve`'s wait.
async fn jetstream_ready(nats: &Nats, replicas: usize) {
    let client = async_nats::connect(nats.urls().as_slice()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + READY;
    loop {
        let made = js
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "ready-check".into(),
                subjects: vec!["ready-check".into()],
                storage: async_nats::jetstream::stream::StorageType::Memory,
                num_replicas: replicas,
                ..Default::default()
            })
            .await;
        if made.is_ok() {
            let _ = js.delete_stream("ready-check").await;
            return;
        }
        assert!(
            Instant::now() < deadline,
            "JetStream not ready within {READY:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn addr(node: &Moatmq) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], node.port("tcp")))
}

/// A clean-session client of `node`, once the node accepts it.
async fn connect_ready(node: &Moatmq, id: &str) -> v4::Client {
    connect_ready_as(node, id, true).await
}

/// A persistent (clean session 0) client of `node`, once the node accepts it.
async fn persistent_ready(node: &Moatmq, id: &str) -> v4::Client {
    connect_ready_as(node, id, false).await
}

async fn connect_ready_as(node: &Moatmq, id: &str, clean: bool) -> v4::Client {
    connect_ready_with(node, id, |o| {
        o.set_clean_session(clean);
    })
    .await
}

/// A client of `node` with options `set`, once the node accepts it.
async fn connect_ready_with(
    node: &Moatmq,
    id: &str,
    set: impl Fn(&mut rumqttc::MqttOptions),
) -> v4::Client {
    let deadline = Instant::now() + READY;
    loop {
        let mut o = v4::options(addr(node), id);
        set(&mut o);
        match v4::connect(o).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "node not ready within {READY:?}: {e}\n{}",
                    node.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Publishes `indices` at QoS 1 on `topic` (payload: the index) and records which
/// ones the broker acknowledged, until the connection ends or all are acknowledged;
/// `on_acked` is called with the count after each PUBACK.
async fn publish_tracked(
    c: &mut v4::Client,
    topic: &str,
    indices: Vec<usize>,
    mut on_acked: impl FnMut(usize),
) -> BTreeSet<usize> {
    let total = indices.len();
    let client = c.client.clone();
    let order = indices.clone();
    let topic = topic.to_string();
    tokio::spawn(async move {
        for i in indices {
            if client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, i.to_string())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // rumqttc writes requests in order: the n-th outgoing PUBLISH is order[n].
    let mut next = order.into_iter();
    let mut inflight: HashMap<u16, usize> = HashMap::new();
    let mut acked = BTreeSet::new();
    while acked.len() < total {
        match tokio::time::timeout(READY, c.rx.recv()).await {
            Ok(Some(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                if let Some(i) = next.next() {
                    inflight.insert(pkid, i);
                }
            }
            Ok(Some(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(i) = inflight.remove(&ack.pkid) {
                    acked.insert(i);
                    on_acked(acked.len());
                }
            }
            Ok(Some(_)) => {}
            // The connection ended (its event loop is gone), or nothing for too long.
            Ok(None) | Err(_) => break,
        }
    }
    acked
}

/// Publishes `0..n` on `kill/t` ([`publish_tracked`]) and kills `victim` (SIGKILL)
/// once `at` are acknowledged; the indices acknowledged.
async fn publish_killing(
    c: &mut v4::Client,
    n: usize,
    at: usize,
    victim: Moatmq,
) -> BTreeSet<usize> {
    let mut victim = Some(victim);
    let acked = publish_tracked(c, "kill/t", (0..n).collect(), |count| {
        if count == at {
            if let Some(v) = victim.take() {
                v.kill();
            }
        }
    })
    .await;
    assert!(victim.is_none(), "the node was not killed mid-stream");
    acked
}

/// The payload indices `sub` receives until it has all of `want` or nothing arrives
/// for `quiet`; and how many arrived twice.
async fn receive_until(
    sub: &mut v4::Client,
    want: &BTreeSet<usize>,
    quiet: Duration,
) -> (BTreeSet<usize>, usize) {
    let mut got = BTreeSet::new();
    let mut twice = 0;
    while !want.is_subset(&got) {
        let Some(p) = sub.publish_within(quiet).await else {
            break;
        };
        let i: usize = std::str::from_utf8(&p.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("an index");
        if !got.insert(i) {
            twice += 1;
        }
    }
    (got, twice)
}

#[tokio::test]
async fn kill_9_of_a_node_loses_no_message_any_node_acknowledged() {
    const N: usize = 2000;
    let (dir, key) = cluster_dir();
    let nats = Nats::single(dir.path());
    let a = start_node(dir.path(), &key, "node-a", &nats.url(0));
    let b = start_node(dir.path(), &key, "node-b", &nats.url(0));
    let c = start_node(dir.path(), &key, "node-c", &nats.url(0));

    // The subscriber: a clean session on node C, connected throughout.
    let mut sub = connect_ready(&c, "sink").await;
    sub.subscribe_acked("kill/#").await;

    // The publisher on node A; node A is killed (SIGKILL) once a quarter is acknowledged.
    let mut publ = connect_ready(&a, "source").await;
    let _b_ready = connect_ready(&b, "probe").await;
    let acked_by_a = publish_killing(&mut publ, N, N / 4, a).await;
    assert!(
        acked_by_a.len() >= N / 4 && acked_by_a.len() < N,
        "node A acknowledged {} of {N}",
        acked_by_a.len()
    );

    // The publisher reconnects to node B and sends again what A did not acknowledge.
    let mut publ = connect_ready(&b, "source").await;
    let resend: Vec<usize> = (0..N).filter(|i| !acked_by_a.contains(i)).collect();
    let started = Instant::now();
    let acked_by_b = publish_tracked(&mut publ, "kill/t", resend.clone(), |_| {}).await;
    let took = started.elapsed();
    assert_eq!(
        acked_by_b.len(),
        resend.len(),
        "node B acknowledged them all"
    );

    // Node C delivers every message any node acknowledged (QoS 1: some twice).
    let all: BTreeSet<usize> = acked_by_a.union(&acked_by_b).copied().collect();
    let (got, twice) = receive_until(&mut sub, &all, Duration::from_secs(10)).await;
    let lost: Vec<usize> = all.difference(&got).copied().collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost (first {:?}); node A acknowledged {}",
        lost.len(),
        &lost[..lost.len().min(10)],
        acked_by_a.len()
    );
    eprintln!(
        "node A acknowledged {} of {N} before SIGKILL, node B {} resent in {took:?}; \
         node C received {} distinct, {twice} twice",
        acked_by_a.len(),
        acked_by_b.len(),
        got.len()
    );
}

/// A retained message a node acknowledged is served by a node started after that node
/// was killed (SIGKILL right after the last PUBACK): 2,000 retained QoS 1 messages on as
/// many topics, published on node A as fast as its PUBACKs come (100 unacknowledged),
/// all served by node B started afterwards. (Before, the PUBACK waited for the transfer
/// stream only; the retained bucket's puts, one round trip each, lagged behind, and what
/// was not written yet was lost with node A.)
#[tokio::test]
async fn kill_9_right_after_retained_publishes_loses_none_of_them() {
    const N: usize = 2000;
    let (dir, key) = cluster_dir();
    let nats = Nats::single(dir.path());
    let a = start_node(dir.path(), &key, "node-a", &nats.url(0));
    let mut publ = connect_ready(&a, "source").await;
    for i in 0..N {
        publ.client
            .publish(format!("ret/{i}"), QoS::AtLeastOnce, true, i.to_string())
            .await
            .expect("publish queued");
    }
    for acked in 0..N {
        let ack = publ
            .incoming(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await;
        assert!(
            ack.is_some(),
            "node A acknowledged {acked} of {N}\n{}",
            a.log()
        );
    }
    a.kill();

    let b = start_node(dir.path(), &key, "node-b", &nats.url(0));
    let mut sub = connect_ready(&b, "reader").await;
    sub.subscribe_acked("ret/#").await;
    let mut served = BTreeSet::new();
    while let Some(p) = sub.publish_within(Duration::from_secs(3)).await {
        served.insert(p.topic);
    }
    assert_eq!(
        served.len(),
        N,
        "retained messages node A acknowledged and node B does not serve: {}",
        N - served.len()
    );
}

/// Two nodes on different servers of a three-server NATS cluster (JetStream's streams
/// and buckets on whichever server holds them): a QoS 1 message crosses, and a
/// persistent session moves from node to node (resumed offline, with what was queued
/// for it, then taken over while connected) through the buckets.
#[tokio::test]
async fn a_qos_1_message_and_a_session_cross_nodes_on_different_servers_of_a_nats_cluster() {
    let (dir, key) = cluster_dir();
    let nats = Nats::cluster(dir.path(), 3);
    jetstream_ready(&nats, 1).await;
    let a = start_node(dir.path(), &key, "node-a", &nats.url(0));
    let b = start_node(dir.path(), &key, "node-b", &nats.url(2));
    let mut sub = connect_ready(&b, "sink").await;
    sub.subscribe_acked("far/#").await;
    let mut publ = connect_ready(&a, "source").await;
    publ.publish_acked("far/away", false, "hello").await;
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.qos),
        ("far/away", &b"hello"[..], QoS::AtLeastOnce)
    );
    assert!(sub.publish_within(Duration::from_secs(1)).await.is_none());

    // A persistent session moves between the two nodes through the handoff bucket:
    // left offline on node B, a message queued for it there, resumed on node A.
    let mut mover = persistent_ready(&b, "mover").await;
    mover.subscribe_acked("far/#").await;
    mover.client.disconnect().await.unwrap();
    mover.closed_within(READY).await;
    publ.publish_acked("far/queued", false, "while away").await;
    let mut mover = persistent_ready(&a, "mover").await;
    assert!(
        mover.connack.session_present,
        "moved from node B\n{}",
        a.log()
    );
    let p = mover.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("far/queued", &b"while away"[..])
    );
    // And back, taken over while connected: node B gets what node A is sent from now.
    let mut back = persistent_ready(&b, "mover").await;
    assert!(back.connack.session_present, "moved back from node A");
    mover.closed_within(READY).await;
    publ.publish_acked("far/again", false, "on b").await;
    let p = back.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("far/again", &b"on b"[..])
    );
}

/// With `replicas = 3` on a NATS cluster of three, the server leading the transfer
/// stream can die: its copies on the other two take over, the nodes reconnect to the
/// servers left, and every QoS 1 message acknowledged before or after reaches the
/// subscriber on the other node (with one copy the stream is gone with its server and
/// the publisher is held).
#[tokio::test]
async fn losing_a_nats_server_loses_nothing_with_three_replicas() {
    let (dir, key) = cluster_dir();
    let mut nats = Nats::cluster(dir.path(), 3);
    jetstream_ready(&nats, 3).await;
    let servers = nats.urls();
    let a = start_node_with(dir.path(), &key, "node-a", &servers, "replicas = 3\n");
    let b = start_node_with(dir.path(), &key, "node-b", &servers, "replicas = 3\n");
    let mut sub = connect_ready(&b, "sink").await;
    sub.subscribe_acked("ha/#").await;
    // Its publishes are held while JetStream elects the stream's new leader (longer than
    // its keep-alive: the node answers its PINGREQs meanwhile).
    let mut publ = connect_ready(&a, "source").await;
    let before = publish_tracked(&mut publ, "ha/before", (0..20).collect(), |_| {}).await;
    assert_eq!(
        before.len(),
        20,
        "acknowledged before the loss\n{}",
        a.log()
    );

    // Every stream and bucket of the cluster keeps three copies; find the transfer
    // stream's leader and kill it.
    let client = async_nats::connect(servers.as_slice()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let info = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_stream(name)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .clone()
        }
    };
    for name in [
        "moatmq_xfer",
        "KV_moatmq_meta",
        "KV_moatmq_retained",
        "KV_moatmq_owner",
        "KV_moatmq_nodes",
    ] {
        assert_eq!(info(name).await.config.num_replicas, 3, "{name}");
    }
    let info = info("moatmq_xfer").await;
    let leader = info.cluster.and_then(|c| c.leader).expect("a leader");
    let i: usize = leader.trim_start_matches('n').parse().expect("server n<i>");
    drop(js);
    nats.kill(i);

    let after = publish_tracked(&mut publ, "ha/after", (20..60).collect(), |_| {}).await;
    assert_eq!(after.len(), 40, "acknowledged after the loss\n{}", a.log());
    let want: BTreeSet<usize> = (0..60).collect();
    let (got, twice) = receive_until(&mut sub, &want, READY).await;
    let lost: Vec<usize> = want.difference(&got).copied().collect();
    assert!(
        lost.is_empty(),
        "lost {lost:?} ({twice} twice)\n{}",
        b.log()
    );
}

/// Two nodes at `autosave_interval = 0` (what a node queues for a session is on disk
/// before it is acknowledged) on one NATS; a persistent subscriber of `kill/#` offline
/// on node A while a publisher on node B sends `0..N`, node A killed (SIGKILL) a third
/// of the way. What is left: node B, the indices node B acknowledged, and what restarts
/// node A on its store.
struct OfflineSubscriberKilled {
    dir: tempfile::TempDir,
    key: std::path::PathBuf,
    nats: Nats,
    b: Moatmq,
    acked: BTreeSet<usize>,
}

impl OfflineSubscriberKilled {
    // Under `limits.max_queued_messages` (1,000): past it the newest are dropped.
    const N: usize = 900;

    async fn run() -> Self {
        let (dir, key) = cluster_dir();
        let nats = Nats::single(dir.path());
        let a = Self::node_in(dir.path(), &key, &nats, "node-a");
        let b = Self::node_in(dir.path(), &key, &nats, "node-b");
        let mut sub = persistent_ready(&a, "sink").await;
        sub.subscribe_acked("kill/#").await;
        sub.client.disconnect().await.unwrap();
        sub.closed_within(READY).await;
        let mut publ = connect_ready(&b, "source").await;
        let acked = publish_killing(&mut publ, Self::N, Self::N / 3, a).await;
        assert_eq!(acked.len(), Self::N, "node B acknowledged every message");
        OfflineSubscriberKilled {
            dir,
            key,
            nats,
            b,
            acked,
        }
    }

    fn node(&self, name: &str) -> Moatmq {
        Self::node_in(self.dir.path(), &self.key, &self.nats, name)
    }

    fn node_in(dir: &Path, key: &Path, nats: &Nats, name: &str) -> Moatmq {
        let servers = [nats.url(0)];
        start_node_in(dir, key, name, &servers, "autosave_interval = 0\n", "")
    }

    /// `got` holds every index node B acknowledged (`logs` shown otherwise).
    fn assert_none_lost(&self, got: &BTreeSet<usize>, logs: &[&Moatmq]) {
        assert_none_lost(&self.acked, got, logs);
    }
}

/// `got` holds every index of `acked` (`logs` shown otherwise).
fn assert_none_lost(acked: &BTreeSet<usize>, got: &BTreeSet<usize>, logs: &[&Moatmq]) {
    let lost: Vec<usize> = acked.difference(got).copied().collect();
    let logs: Vec<String> = logs.iter().map(|n| n.log()).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost (first {:?})\n{}",
        lost.len(),
        &lost[..lost.len().min(10)],
        logs.join("\n----\n")
    );
}

/// The failure case from a persistent subscriber's side
/// ([`OfflineSubscriberKilled`]): the subscriber comes back on node B (after the
/// handoff wait its session resumes from node A's park: node A is dead), and node A
/// restarts on its store (a StatefulSet pod) and hands over late what it held: what it
/// had queued, and what was published while it was away (from its transfer consumer).
/// Every message node B acknowledged reaches the subscriber (QoS 1: some twice). At
/// `autosave_interval = 0` node A acknowledges a transfer message only once what it
/// queued is committed.
#[tokio::test]
async fn kill_9_of_an_offline_subscribers_node_loses_nothing_once_it_is_back() {
    let killed = OfflineSubscriberKilled::run().await;
    // The subscriber is back on node B: after the wait (node A is dead) its session
    // resumes from what node A had parked of it.
    let mut sub = persistent_ready(&killed.b, "sink").await;
    assert!(sub.connack.session_present, "resumed from node A's park");
    // Node A comes back on its store and hands the session over late.
    let a_again = killed.node("node-a");
    // What node A's previous process had been sent comes again after the consumer's
    // ack wait (30 s): node A hands the session over after that.
    let (got, twice) = receive_until(&mut sub, &killed.acked, Duration::from_secs(60)).await;
    killed.assert_none_lost(&got, &[&a_again, &killed.b]);
    eprintln!("{} received ({twice} twice)", got.len());
}

/// The same with node A lost for good (its disk gone: it never comes back): the
/// subscriber's session resumes on node B from what node A had parked in NATS, and node
/// B reads on node A's behalf what node A's transfer consumer still held for it (what
/// node A had not acknowledged, and everything published after it died). Every message
/// node B acknowledged reaches the subscriber, none from node A's store.
#[tokio::test]
async fn kill_9_of_an_offline_subscribers_node_loses_nothing_even_if_it_never_comes_back() {
    let killed = OfflineSubscriberKilled::run().await;
    let mut sub = persistent_ready(&killed.b, "sink").await;
    assert!(sub.connack.session_present, "resumed from node A's park");
    let (got, twice) = receive_until(&mut sub, &killed.acked, Duration::from_secs(10)).await;
    killed.assert_none_lost(&got, &[&killed.b]);
    eprintln!("{} received ({twice} twice)", got.len());
}

/// The failure case with the persistent subscriber *connected* to the node that
/// dies: a subscriber of `kill/#` on node A (clean session 0, QoS 1, acknowledging by
/// hand), a publisher on node B, node A killed (SIGKILL) in the middle of a stream of
/// messages and never started again. The subscriber acknowledged the first stream, then
/// stops acknowledging (a slow device): node A's router holds the second stream for it,
/// its transfer consumer took it all. The subscriber comes back on node B: its session
/// resumes from what node A had parked of it while it was connected (session present 1,
/// its subscription), and node B reads from the transfer stream everything after the
/// checkpoint node A had parked (where the client had acknowledged all before), so every
/// message node B acknowledged reaches it. (Before, node A parked only offline
/// sessions: the session started new on node B without its subscription and lost all of
/// the second stream; with a park but no checkpoint, node B read only what node A's
/// consumer had not taken, and what node A's router held was lost.)
#[tokio::test]
async fn kill_9_of_a_connected_subscribers_node_loses_nothing_it_acknowledged() {
    connected_subscriber_killed(false).await;
}

/// The same with node A restarted on its store once the subscriber is back on node B
/// (a StatefulSet pod): node A finds the session held by node B and hands over late
/// what it kept of it (node B leaves out what it read after the checkpoint already);
/// the session stays on node B and gets what is published afterwards.
#[tokio::test]
async fn kill_9_of_a_connected_subscribers_node_then_its_return_loses_nothing() {
    connected_subscriber_killed(true).await;
}

async fn connected_subscriber_killed(come_back: bool) {
    const N: usize = 900;
    const FIRST: usize = 100;
    let (dir, key) = cluster_dir();
    let nats = Nats::single(dir.path());
    let node = |name: &str| {
        start_node_in(
            dir.path(),
            &key,
            name,
            &[nats.url(0)],
            "autosave_interval = 0\n",
            "checkpoint_interval = 2\n",
        )
    };
    let a = node("node-a");
    let b = node("node-b");
    let mut sub = connect_ready_with(&a, "sink", |o| {
        o.set_clean_session(false);
        o.set_manual_acks(true);
    })
    .await;
    sub.subscribe_acked("kill/#").await;
    let mut publ = connect_ready(&b, "source").await;
    // A first stream, received and acknowledged; node A takes a checkpoint of the
    // session within 2 s (`checkpoint_interval`) once it had forwards.
    let first = publish_tracked(&mut publ, "kill/t", (0..FIRST).collect(), |_| {}).await;
    assert_eq!(first.len(), FIRST);
    for _ in 0..FIRST {
        let p = sub.publish_within(READY).await.expect("the first stream");
        sub.client.ack(&p).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut victim = Some(a);
    let rest = publish_tracked(&mut publ, "kill/t", (FIRST..N).collect(), |count| {
        if count == (N - FIRST) / 3 {
            if let Some(v) = victim.take() {
                v.kill();
            }
        }
    })
    .await;
    assert!(victim.is_none(), "node A was not killed mid-stream");
    assert_eq!(rest.len(), N - FIRST, "node B acknowledged every message");
    drop(sub);

    let mut sub = persistent_ready(&b, "sink").await;
    assert!(
        sub.connack.session_present,
        "resumed from node A's park\n{}",
        b.log()
    );
    let (got, twice) = receive_until(&mut sub, &rest, Duration::from_secs(10)).await;
    assert_none_lost(&rest, &got, &[&b]);
    eprintln!("{} received on node B ({twice} twice)", got.len());
    if !come_back {
        return;
    }
    let a_again = node("node-a");
    // Node A hands the session over after its consumer's ack wait (30 s).
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut late = 0;
    while let Some(_again) = sub
        .publish_within(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        late += 1;
    }
    let last = publish_tracked(&mut publ, "kill/t", vec![N], |_| {}).await;
    assert_eq!(last.len(), 1);
    let (got, _) = receive_until(&mut sub, &last, Duration::from_secs(10)).await;
    assert!(
        got.contains(&N),
        "the session stays on node B after node A is back\n{}\n----\n{}",
        a_again.log(),
        b.log()
    );
    eprintln!("{late} more came while node A came back");
}

/// A node killed (SIGKILL) while a persistent subscriber is connected to it, its router
/// holding messages for the subscriber beyond the 100 it forwarded and the subscriber
/// has not acknowledged (those 100 are stored as sent; the rest is in no store: the
/// node's transfer consumer acknowledged them once they were in its router), and
/// started again while the subscriber's claim on another node still waits for it (3 s):
/// the node back hands over its store's copy of the session, without those messages.
/// The other node reads them from the stream after the cut the killed process named
/// in its live park as the subscriber connected (`checkpoint_interval = 0`: no other
/// one), not after the cut of the process that handed the session over, so none is
/// lost (all lost before; 4 of 8,000 in a tests/paho/reconnect_loop.py run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_a_quick_return_of_a_connected_subscribers_node_loses_nothing() {
    // rumqttd's in-flight limit: node A's router forwards these and holds the rest.
    const FORWARDED: usize = 100;
    const N: usize = FORWARDED + 40;
    let (dir, key) = cluster_dir();
    let nats = Nats::single(dir.path());
    let servers = [nats.url(0)];
    let node = move |dir: &Path, key: &Path, name: &str, servers: &[String]| {
        start_node_in(
            dir,
            key,
            name,
            servers,
            "autosave_interval = 0\n",
            "checkpoint_interval = 0\n",
        )
    };
    let a = node(dir.path(), &key, "node-a", &servers);
    let b = node(dir.path(), &key, "node-b", &servers);
    let mut sub = connect_ready_with(&a, "sink", |o| {
        o.set_clean_session(false);
        o.set_manual_acks(true);
    })
    .await;
    sub.subscribe_acked("kill/#").await;
    let mut publ = connect_ready(&b, "source").await;
    let sent = publish_tracked(&mut publ, "kill/t", (0..N).collect(), |_| {}).await;
    assert_eq!(sent.len(), N, "node B acknowledged every message");
    for _ in 0..FORWARDED {
        sub.publish_within(READY)
            .await
            .expect("forwarded by node A, never acknowledged");
    }
    assert!(
        sub.publish_within(Duration::from_millis(500))
            .await
            .is_none(),
        "node A's router holds the rest"
    );
    a.kill();
    drop(sub);

    // The subscriber comes back on node B, whose claim waits for node A...
    let b_addr = addr(&b);
    let resumed = tokio::spawn(async move {
        let mut o = v4::options(b_addr, "sink");
        o.set_clean_session(false);
        v4::connect(o).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... which is back meanwhile and hands the session over.
    let (home, key_path) = (dir.path().to_path_buf(), key.clone());
    let servers_again = servers.clone();
    let a_again =
        tokio::task::spawn_blocking(move || node(&home, &key_path, "node-a", &servers_again))
            .await
            .unwrap();
    let mut sub = resumed
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("resumed on node B: {e}\n{}", b.log()));
    assert!(sub.connack.session_present, "the session came along");
    let (got, twice) = receive_until(&mut sub, &sent, Duration::from_secs(10)).await;
    assert_none_lost(&sent, &got, &[&b, &a_again]);
    assert_eq!(
        twice, 0,
        "nothing twice: what node A handed over is not read again (before: node A's \
         cut, at 0 until new traffic, made node B read the whole stream)"
    );
}

/// A node killed (SIGKILL) while its member of a shared group holds copies it has not
/// acknowledged loses none of them for the group: the node acknowledged none of those
/// stream messages to JetStream, which hands them to node B's member after the group
/// consumer's ack wait (10 s). Before, the node acknowledged each once its copies were
/// in its router, and every copy its member held was lost.
#[tokio::test]
async fn kill_9_of_a_node_whose_group_member_holds_copies_loses_none_of_them() {
    const N: usize = 60;
    let (dir, key) = cluster_dir();
    let nats = Nats::single(dir.path());
    let a = start_node(dir.path(), &key, "node-a", &nats.url(0));
    let b = start_node(dir.path(), &key, "node-b", &nats.url(0));
    let filter = "$share/workers/jobs/#";
    let mut holding = connect_ready_with(&a, "w-a", |o| {
        o.set_manual_acks(true);
    })
    .await;
    holding.subscribe_acked(filter).await;
    let mut on_b = connect_ready(&b, "w-b").await;
    on_b.subscribe_acked(filter).await;
    let mut publ = connect_ready(&b, "source").await;
    // One at a time: each its own stream message (a batch goes to one node whole).
    for i in 0..N {
        publ.publish_acked("jobs/t", false, i.to_string()).await;
    }
    let sent: BTreeSet<usize> = (0..N).collect();
    let mut held = BTreeSet::new();
    while let Some(p) = holding.publish_within(Duration::from_secs(2)).await {
        held.insert(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert!(!held.is_empty(), "node A's member got its share");
    eprintln!("node A's member holds {} of {N}", held.len());
    a.kill();
    let (got, _) = receive_until(&mut on_b, &sent, Duration::from_secs(25)).await;
    let lost: Vec<&usize> = sent.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "lost for the group: {lost:?} (node A's member held {} of them)\n{}",
        held.len(),
        b.log()
    );
}

/// A delayed will of a node that dies is not lost with it, nor published for a client
/// that came back: two MQTT 5 devices on node A (session kept 10 minutes, a will with a
/// 5 s delay) leave with DISCONNECT 0x80 (their wills wait), node A is killed (SIGKILL)
/// and never comes back; one device reconnects to node B at once, the other never
/// does. Node B publishes the second device's will once it is overdue (its node did
/// not), once, and never the first's. (Before, both wills were lost with node A.)
#[tokio::test]
async fn a_delayed_will_outlives_its_node_and_not_its_clients_return() {
    use moatmq_testkit::Raw;
    use rumqttc::v5::mqttbytes::v5 as m5;
    let (dir, key) = cluster_dir();
    let nats = Nats::single(dir.path());
    let a = start_node(dir.path(), &key, "node-a", &nats.url(0));
    let b = start_node(dir.path(), &key, "node-b", &nats.url(0));
    let mut watcher = connect_ready(&b, "watcher").await;
    watcher.subscribe_acked("will/#").await;
    let _a_ready = connect_ready(&a, "probe").await;
    let persistent = |id: &str| {
        let mut c = moatmq_testkit::connect5(id);
        c.clean_start = false;
        c.properties = Some(m5::ConnectProperties {
            session_expiry_interval: Some(600),
            ..Default::default()
        });
        c
    };
    for id in ["gone-dev", "back-dev"] {
        let will = moatmq_testkit::delayed_will5(&format!("will/{id}"), id, 5);
        let (mut raw, code) = Raw::connect5(addr(&a), persistent(id), Some(will), None).await;
        assert_eq!(code, Some(m5::ConnectReturnCode::Success));
        // Not a normal DISCONNECT (0x80): the will waits for its delay.
        raw.send(&[0xE0, 0x01, 0x80]).await;
    }
    // Parked (within the autosave interval), the wills not yet due.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill();
    let (_back, ack) = Raw::connack5(addr(&b), persistent("back-dev")).await;
    assert_eq!(ack.code, m5::ConnectReturnCode::Success);
    assert!(ack.session_present, "back-dev resumed on node B");

    let will = watcher
        .publish_within(Duration::from_secs(40))
        .await
        .unwrap_or_else(|| panic!("no will published\n{}", b.log()));
    assert_eq!(will.topic, "will/gone-dev");
    assert_eq!(&will.payload[..], b"gone-dev");
    let more = watcher.publish_within(Duration::from_secs(15)).await;
    assert!(
        more.is_none(),
        "published again, or the will of a client that came back: {more:?}"
    );
}

/// Liveness shortened for the tests of nodes gone: a node not heard from for 3 s is
/// gone, the sweep of what it left runs every 2 s, and a connected persistent session
/// of a node gone is kept 2 s at least (a day otherwise) past its node's last entry
/// (`test-hooks`).
const SHORT_LIVENESS: &[(&str, &str)] = &[
    ("MOATMQ_TEST_NODE_GONE_MS", "3000"),
    ("MOATMQ_TEST_DEAD_SWEEP_MS", "2000"),
    ("MOATMQ_TEST_CONNECTED_KEPT_MS", "2000"),
    ("RUST_LOG", "info,moatmq_broker::cluster::dead=debug"),
];

fn short_lived_node(dir: &Path, key: &Path, name: &str, nats: &Nats) -> Moatmq {
    start_node_env(dir, key, name, &[nats.url(0)], "", "", SHORT_LIVENESS)
}

/// Whether `store` holds a value at `key`.
async fn holds(store: &async_nats::jetstream::kv::Store, key: &str) -> bool {
    matches!(
        store.entry(key).await,
        Ok(Some(e)) if e.operation == async_nats::jetstream::kv::Operation::Put
    )
}

/// A node killed for good leaves its clients' state in NATS: the ownership entries of
/// its clean sessions and the live parks of its connected persistent sessions, which
/// name no disconnect time. Once it is gone they go too: clean ones at once, persistent
/// ones when they expire counted from the node's last sign of life (and, shortened
/// here, a day at least). A persistent
/// session that has not expired stays, and its client resumes it on another node.
#[tokio::test]
async fn what_a_node_killed_for_good_leaves_in_nats_goes_once_nobody_can_need_it() {
    use moatmq_testkit::Raw;
    use rumqttc::v5::mqttbytes::v5 as m5;
    let (dir, key) = cluster_dir();
    let nats = Nats::single(dir.path());
    let a = short_lived_node(dir.path(), &key, "node-a", &nats);
    let b = short_lived_node(dir.path(), &key, "node-b", &nats);
    let _b_ready = connect_ready(&b, "probe-b").await;
    let _clean = connect_ready(&a, "gone-clean").await;
    let persistent = |id: &str, expiry: u32| {
        let mut c = moatmq_testkit::connect5(id);
        c.clean_start = false;
        c.properties = Some(m5::ConnectProperties {
            session_expiry_interval: Some(expiry),
            ..Default::default()
        });
        c
    };
    let mut held = Vec::new();
    for (id, expiry) in [("gone-short", 4), ("gone-long", 600)] {
        let (raw, code) = Raw::connect5(addr(&a), persistent(id, expiry), None, None).await;
        assert_eq!(code, Some(m5::ConnectReturnCode::Success));
        held.push(raw);
    }
    // Anonymous clients: their router client ids are `-:<client id>`.
    let seal = moatmq_store::ClusterSeal::new(&moatmq_store::RetainedKey::load(&key).unwrap());
    let kv_key = |id: &str| seal.session_key_of(&format!("-:{id}"));
    let js = async_nats::jetstream::new(async_nats::connect(nats.url(0)).await.unwrap());
    let owner = js.get_key_value("moatmq_owner").await.unwrap();
    let handoff = js.get_key_value("moatmq_handoff").await.unwrap();
    // The live parks are written after the CONNACK.
    let deadline = Instant::now() + READY;
    while !(holds(&handoff, &kv_key("gone-short")).await
        && holds(&handoff, &kv_key("gone-long")).await)
    {
        assert!(Instant::now() < deadline, "no live parks\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(holds(&owner, &kv_key("gone-clean")).await);

    a.kill();
    // Gone after 3 s, swept every 2 s, the short session expired 4 s after the node's
    // last entry.
    let deadline = Instant::now() + READY;
    loop {
        let left = [
            holds(&owner, &kv_key("gone-clean")).await,
            holds(&owner, &kv_key("gone-short")).await,
            holds(&handoff, &kv_key("gone-short")).await,
        ];
        if left == [false; 3] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still in NATS (clean entry, short entry, short park): {left:?}\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        holds(&owner, &kv_key("gone-long")).await,
        "an unexpired session's entry went"
    );
    assert!(
        holds(&handoff, &kv_key("gone-long")).await,
        "an unexpired session's park went"
    );
    b.wait_for("sessions of nodes gone removed");
    let (_back, ack) = Raw::connack5(addr(&b), persistent("gone-long", 600)).await;
    assert_eq!(ack.code, m5::ConnectReturnCode::Success);
    assert!(ack.session_present, "gone-long resumed on node B");
}

/// Two processes started with one `node_name` (a copied config): both say so.
#[tokio::test]
async fn a_second_process_under_one_node_name_is_named_in_the_log() {
    let (dir, key) = cluster_dir();
    let nats = Nats::single(dir.path());
    let a = short_lived_node(dir.path(), &key, "node-a", &nats);
    let _a_ready = connect_ready(&a, "probe-a").await;
    let twin = short_lived_node(&dir.path().join("twin"), &key, "node-a", &nats);
    let _twin_ready = connect_ready(&twin, "probe-twin").await;
    a.wait_for("another moatmq process runs with this node_name");
}
