//! Hostile clients against the real broker over real sockets. Each test attacks one
//! broker, then proves a well-behaved client on the same broker still gets its own
//! publish back within [`LATENCY`], and, for the attacks that could make the broker
//! buffer, that the process's resident memory grew by less than a stated bound.
//!
//! Limits are tight so attacks hit them fast: `connect_timeout = 1`,
//! `max_packet_size = 65536`, `max_topic_levels = 8`, `max_subscriptions_per_client = 100`.
//! Rate limits and per-address caps are off: every connection comes from 127.0.0.1, and
//! the point here is the broker's own bounds, not the per-address limits (prelogin.rs).
//!
//! Memory is the whole test process's VmRSS (the broker runs in-process, and tests run in
//! parallel), so the bounds are generous: they catch growth with the attack's size, not
//! noise.

use moatmq_testkit::wire::{self, Body, Connect, Publish, Version};
use moatmq_testkit::{v4, Frame, Listener, Raw, TestBroker, TestBrokerBuilder, TestCa};
use rumqttc::QoS;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A well-behaved client's publish must come back within this, attack or not.
const LATENCY: Duration = Duration::from_millis(500);
/// A connection the broker must close "at once".
const AT_ONCE: Duration = Duration::from_millis(500);

/// The limits above, with rate limits and per-address caps off.
fn hostile() -> TestBrokerBuilder {
    TestBroker::builder()
        .listener(Listener::tcp("tcp"))
        .anonymous()
        .no_connection_rate()
        .rate_limit("messages_per_second", 0)
        .limit("max_packet_size", 65536)
        .limit("connect_timeout", 1)
        .limit("max_topic_levels", 8)
        .limit("max_subscriptions_per_client", 100)
        .limit("max_client_id_length", 128)
        .limit("max_connections", 2000)
        .limit("max_connections_per_address", 2000)
        .limit("max_pending_per_address", 2000)
}

async fn broker() -> TestBroker {
    hostile().start().await
}

/// A 3.1.1 CONNECT (clean session, keep alive 30), or an MQTT 5 one.
fn connect_packet(v5: bool, id: &[u8], login: Option<(&[u8], &[u8])>) -> Vec<u8> {
    let version = if v5 { Version::V5 } else { Version::V4 };
    let connect = Connect::new(version, id);
    match login {
        Some((user, pass)) => connect.login(user, pass).encode(),
        None => connect.encode(),
    }
}

/// A 3.1.1 PUBLISH.
fn publish_packet(topic: &[u8], qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
    Publish::new(Version::V4, topic, payload)
        .qos(qos, pkid)
        .encode()
}

/// A 3.1.1 SUBSCRIBE at QoS 0.
fn subscribe_packet(pkid: u16, filters: &[Vec<u8>]) -> Vec<u8> {
    let filters: Vec<(&[u8], u8)> = filters.iter().map(|f| (&f[..], 0)).collect();
    wire::subscribe(Version::V4, pkid, &filters)
}

/// A 3.1.1 connection accepted by the broker.
async fn connected(addr: SocketAddr, v5: bool, id: &str) -> Raw {
    let version = if v5 { Version::V5 } else { Version::V4 };
    Raw::connected(addr, version, id).await
}

// ---- health and memory ---------------------------------------------------------------

/// A fresh well-behaved client subscribes, publishes QoS 1 and must get it back within
/// [`LATENCY`]. Returns the latency.
async fn assert_healthy(addr: SocketAddr, tag: &str) -> Duration {
    let id = format!("good-{tag}-{}", rand_suffix());
    let mut c = v4::connected(addr, &id).await;
    let topic = format!("probe/{id}");
    c.client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    c.incoming(|p| matches!(p, rumqttc::Packet::SubAck(_)).then_some(()))
        .await
        .expect("suback for the well-behaved client");
    let start = Instant::now();
    c.client
        .publish(&topic, QoS::AtLeastOnce, false, "ping")
        .await
        .unwrap();
    let got = c.publish_within(LATENCY).await;
    let took = start.elapsed();
    assert!(
        got.is_some(),
        "{tag}: well-behaved client got no publish within {LATENCY:?}"
    );
    let _ = c.client.disconnect().await;
    took
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Tests that measure memory hold this, so their attacks do not overlap.
static MEMORY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Resident memory of this process (broker included), in MiB.
/// Fails without /proc: a memory bound measured as zero would hold vacuously.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status: these tests measure memory through /proc");
    let kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status");
    kib / 1024
}

// ---- the attacks ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_without_connect_is_closed_after_connect_timeout() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut r = Raw::tcp(addr).await;
        if i % 2 == 0 {
            // Half of them start a CONNECT and stall.
            r.send(&[0x10, 0x20, 0x00]).await;
        }
        idle.push(r);
    }
    assert_healthy(addr, "slowloris").await;
    let start = Instant::now();
    for r in &mut idle {
        assert!(r.closed_within(Duration::from_secs(3)).await);
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    assert_healthy(addr, "slowloris-after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_tls_handshake_is_closed_after_connect_timeout() {
    let ca = TestCa::new("hostile ca");
    let broker = hostile()
        .listener(Listener::tcp("tls").tls())
        .server_cert(&ca)
        .start()
        .await;
    let mut stalled = Vec::new();
    for i in 0..50 {
        let mut r = Raw::tcp(broker.addr("tls")).await;
        if i % 2 == 0 {
            // A TLS record header announcing a ClientHello, then nothing.
            r.send(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
        }
        stalled.push(r);
    }
    assert_healthy(broker.addr("tcp"), "tls-stall").await;
    for r in &mut stalled {
        assert!(r.closed_within(Duration::from_secs(3)).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_flood_is_served_and_cleaned_up() {
    let _serial = MEMORY.lock().await;
    let broker = broker().await;
    let addr = broker.first_addr();
    let before = rss_mib();
    let mut tasks = Vec::new();
    for i in 0..500 {
        tasks.push(tokio::spawn(async move {
            connected(addr, i % 2 == 0, &format!("flood-{i}")).await
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.expect("flood client connects"));
    }
    let took = assert_healthy(addr, "flood").await;
    let grown = rss_mib().saturating_sub(before);
    assert!(grown < 200, "500 connections grew RSS by {grown} MiB");
    drop(conns);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_healthy(addr, "flood-after").await;
    eprintln!("flood: probe latency {took:?}, RSS +{grown} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriber_that_never_reads_is_bounded() {
    let _serial = MEMORY.lock().await;
    // The router's per-filter log of unread messages is bounded by max_queued_bytes.
    const QUEUED_MIB: u64 = 4;
    let broker = hostile()
        .limit("max_queued_bytes", (QUEUED_MIB << 20) as i64)
        .start()
        .await;
    let addr = broker.first_addr();
    // Subscribes to the busy topic, then never reads a byte.
    let mut lazy = connected(addr, false, "never-reads").await;
    lazy.send(&subscribe_packet(1, &[b"busy/#".to_vec()])).await;
    let Frame { first, body: _ } = lazy
        .frame_within(Duration::from_secs(5))
        .await
        .expect("suback");
    assert_eq!(first, 0x90);
    // rumqttd keeps unread publishes in its per-filter log: four segments of a quarter
    // of max_queued_bytes plus the active one (crates/broker/src/router.rs), so 5/4 of
    // it; the gateway holds at most one 64 KiB batch. SLACK covers the rest (socket and
    // router buffers, allocator, the tests running beside this one).
    const SLACK_MIB: u64 = 64;
    let bound = QUEUED_MIB * 5 / 4 + SLACK_MIB;
    // A broker that held what it cannot deliver would grow by what was published: the
    // flood must be twice the bound, or the bound would hold even without a queue limit.
    let target = 2 * (bound << 20);
    const FLOOD_FOR_AT_MOST: Duration = Duration::from_secs(30);
    let before = rss_mib();
    // 16 KiB publishes, as fast as the broker takes them, until `target` is sent.
    let mut publisher = connected(addr, false, "busy-publisher").await;
    let payload = vec![b'x'; 16 * 1024];
    let packet = publish_packet(b"busy/t", 0, 0, &payload);
    let flood = tokio::spawn(async move {
        let end = Instant::now() + FLOOD_FOR_AT_MOST;
        let mut sent = 0u64;
        while Instant::now() < end && sent < target {
            if publisher.write(&packet).await.is_err() {
                break;
            }
            sent += packet.len() as u64;
        }
        sent
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = assert_healthy(addr, "never-reads").await;
    let sent = flood.await.unwrap();
    let grown = rss_mib().saturating_sub(before);
    eprintln!(
        "never-reads: {} MiB published, RSS +{grown} MiB, probe latency {during:?}",
        sent >> 20
    );
    assert!(
        sent >= target,
        "the flood only sent {} of {} MiB in {FLOOD_FOR_AT_MOST:?}: the bound proves nothing",
        sent >> 20,
        target >> 20
    );
    assert!(grown < bound, "RSS grew by {grown} MiB (bound {bound} MiB)");
    assert_healthy(addr, "never-reads-after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_remaining_length_is_closed_at_once() {
    let broker = broker().await;
    let addr = broker.first_addr();
    // A CONNECT announcing 256 MiB - 1 (the largest remaining length), then nothing:
    // refused as soon as the length is read, without waiting for connect_timeout.
    let mut r = Raw::tcp(addr).await;
    r.send(&[0x10, 0xff, 0xff, 0xff, 0x7f]).await;
    assert!(r.closed_within(AT_ONCE).await, "CONNECT");
    // With the protocol name sent, at once.
    let mut r = Raw::tcp(addr).await;
    r.send(&[
        0x10, 0xff, 0xff, 0xff, 0x7f, 0, 4, b'M', b'Q', b'T', b'T', 4,
    ])
    .await;
    assert!(r.closed_within(AT_ONCE).await, "CONNECT with protocol name");
    // The same after a good CONNECT, as a PUBLISH.
    let mut r = connected(addr, false, "huge").await;
    r.send(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await;
    assert!(r.closed_within(AT_ONCE).await, "PUBLISH");
    let mut r = connected(addr, true, "huge5").await;
    r.send(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await;
    let Frame { first, body } = r.frame_within(AT_ONCE).await.expect("DISCONNECT");
    assert_eq!(
        (first, body[0]),
        (0xE0, 0x95),
        "v5 DISCONNECT packet too large"
    );
    assert_healthy(addr, "huge").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deep_and_long_topics_are_refused() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let deep = "a/".repeat(5000) + "z";
    // A SUBSCRIBE past max_topic_levels: SUBACK failure, connection kept.
    let mut r = connected(addr, false, "deep-sub").await;
    r.send(&subscribe_packet(
        1,
        &[deep.clone().into_bytes(), b"ok/+".to_vec()],
    ))
    .await;
    let Frame { first, body } = r
        .frame_within(Duration::from_secs(2))
        .await
        .expect("suback");
    assert_eq!(first, 0x90);
    assert_eq!(&body[2..], &[0x80, 0x00]);
    // A PUBLISH past it: disconnected.
    r.send(&publish_packet(deep.as_bytes(), 0, 0, b"x")).await;
    assert!(r.closed_within(AT_ONCE).await);
    // One level of 60,000 bytes is within the limits: accepted, nothing breaks.
    let mut r = connected(addr, false, "long").await;
    let long = vec![b'l'; 60_000];
    r.send(&publish_packet(&long, 1, 1, b"x")).await;
    let Frame { first, body: _ } = r
        .frame_within(Duration::from_secs(2))
        .await
        .expect("puback");
    assert_eq!(first, 0x40);
    assert_healthy(addr, "deep").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_subscriptions_hit_the_limit() {
    let _serial = MEMORY.lock().await;
    let broker = broker().await;
    let addr = broker.first_addr();
    let before = rss_mib();
    let mut r = connected(addr, false, "many-subs").await;
    let (mut granted, mut refused) = (0, 0);
    for batch in 0..100u16 {
        let filters: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("s/{batch}/{i}").into_bytes())
            .collect();
        r.send(&subscribe_packet(batch + 1, &filters)).await;
        let Frame { first, body } = r
            .frame_within(Duration::from_secs(5))
            .await
            .expect("suback");
        assert_eq!(first, 0x90);
        for &code in &body[2..] {
            if code == 0x80 {
                refused += 1;
            } else {
                granted += 1;
            }
        }
    }
    assert_eq!((granted, refused), (100, 9900));
    assert_healthy(addr, "many-subs").await;
    let grown = rss_mib().saturating_sub(before);
    assert!(grown < 64, "RSS grew by {grown} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qos2_packet_id_exhaustion_and_unknown_pubrel() {
    let _serial = MEMORY.lock().await;
    let broker = broker().await;
    let addr = broker.first_addr();
    let before = rss_mib();
    let mut r = connected(addr, false, "qos2-exhaust").await;
    let mut reader_side = Vec::new();
    // Every packet id once, never released; then every id again (duplicates).
    for round in 0..2 {
        let mut batch = Vec::new();
        for pkid in 1..=u16::MAX {
            batch.extend(publish_packet(b"q2/x", 2, pkid, b"p"));
            if batch.len() > 64 * 1024 {
                r.send(&batch).await;
                batch.clear();
                // Drain PUBRECs so our own socket buffer does not stall the broker.
                while let Some(p) = r.frame_within(Duration::from_millis(1)).await {
                    reader_side.push(p.first);
                }
            }
        }
        r.send(&batch).await;
        let _ = round;
    }
    // PUBREL for ids the broker never saw from this connection.
    let mut r2 = connected(addr, false, "unknown-pubrel").await;
    let mut rels = Vec::new();
    for pkid in [0u16, 1, 2, 777, 65535] {
        rels.extend(wire::ack(wire::first::PUBREL, pkid));
    }
    r2.send(&rels).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_healthy(addr, "qos2").await;
    let grown = rss_mib().saturating_sub(before);
    assert!(grown < 128, "RSS grew by {grown} MiB");
    eprintln!(
        "qos2: {} acks read back, RSS +{grown} MiB",
        reader_side.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_client_id_and_password() {
    let broker = broker().await;
    let addr = broker.first_addr();
    // 64 KiB client id: the CONNECT is over max_packet_size, closed at once.
    let mut r = Raw::tcp(addr).await;
    r.send(&connect_packet(false, &vec![b'c'; 65535], None))
        .await;
    assert!(r.closed_within(AT_ONCE).await, "64 KiB client id");
    // 60,000-byte client id fits in a packet: refused with 0x02 (max_client_id_length).
    let mut r = Raw::tcp(addr).await;
    r.send(&connect_packet(false, &vec![b'c'; 60_000], None))
        .await;
    let Frame { first, body } = r.frame_within(AT_ONCE).await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0x02));
    // A 1 MiB password (length field says 65535; the rest follows as junk): closed once
    // the remaining length is over the limit, before the broker reads it all.
    let mut r = Raw::tcp(addr).await;
    let mut b = Body::default();
    b.str(b"MQTT")
        .raw(&[4, 0xC2, 0, 30])
        .str(b"pw")
        .str(b"user");
    b.u16(u16::MAX).raw(&vec![b'p'; 1 << 20]);
    let packet = wire::frame(wire::first::CONNECT, &b.0);
    let start = Instant::now();
    r.send(&packet[..64]).await;
    assert!(r.closed_within(AT_ONCE).await, "1 MiB password");
    assert!(start.elapsed() < AT_ONCE);
    assert_healthy(addr, "oversized").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_utf8_and_nul_in_string_fields() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let bad: [&[u8]; 3] = [b"a\xff\xfe", b"a\0b", b"\xed\xa0\x80"]; // last: a UTF-16 surrogate
    for (i, s) in bad.iter().enumerate() {
        // Client id, username, password (3.1.1 and 5): refused or closed, never accepted.
        for v5 in [false, true] {
            for field in 0..2 {
                let mut r = Raw::tcp(addr).await;
                let packet = match field {
                    0 => connect_packet(v5, s, None),
                    _ => connect_packet(v5, format!("u{i}").as_bytes(), Some((s, b"pw"))),
                };
                r.send(&packet).await;
                match r.frame_within(AT_ONCE).await {
                    Some(Frame { first: 0x20, body }) => {
                        assert_ne!(body[1], 0, "accepted {s:?} in field {field}")
                    }
                    Some(other) => panic!("unexpected {other:?}"),
                    None => {}
                }
                assert!(r.closed_within(AT_ONCE).await);
            }
        }
        // Topic of a PUBLISH, filter of a SUBSCRIBE / UNSUBSCRIBE: closed or refused.
        let mut r = connected(addr, false, &format!("bad-pub-{i}")).await;
        r.send(&publish_packet(s, 0, 0, b"x")).await;
        assert!(r.closed_within(AT_ONCE).await, "publish topic {s:?}");
        let mut r = connected(addr, false, &format!("bad-sub-{i}")).await;
        r.send(&subscribe_packet(1, &[s.to_vec()])).await;
        match r.frame_within(AT_ONCE).await {
            Some(Frame { first: 0x90, body }) => {
                assert_eq!(body[2], 0x80, "subscribe {s:?} granted")
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => {}
        }
        r.send(&wire::unsubscribe(Version::V4, 5, &[s])).await;
        let _ = r.frame_within(Duration::from_millis(200)).await;
    }
    // A will topic with a NUL.
    let will_nul = Connect::new(Version::V4, "will-nul").will(b"w/\0", b"bye", 0, false);
    let mut r = Raw::tcp(addr).await;
    r.send(&will_nul.encode()).await;
    assert!(r.closed_within(AT_ONCE).await, "will topic with NUL");
    assert_healthy(addr, "utf8").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wildcard_publish_topic_is_refused_and_not_delivered() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let mut watcher = v4::connected(addr, "watcher").await;
    watcher
        .client
        .subscribe("#", QoS::AtMostOnce)
        .await
        .unwrap();
    watcher
        .incoming(|p| matches!(p, rumqttc::Packet::SubAck(_)).then_some(()))
        .await
        .expect("suback");
    for topic in [&b"a/#"[..], b"a/+", b"+", b"#"] {
        let mut r = connected(addr, false, "wild").await;
        r.send(&publish_packet(topic, 1, 1, b"wild")).await;
        assert!(r.closed_within(AT_ONCE).await, "{topic:?}");
    }
    assert!(watcher
        .publish_within(Duration::from_millis(300))
        .await
        .is_none());
    assert_healthy(addr, "wildcard").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_connect_closes_the_connection() {
    let broker = broker().await;
    let addr = broker.first_addr();
    for v5 in [false, true] {
        let mut r = connected(addr, v5, "twice").await;
        r.send(&connect_packet(v5, b"twice", None)).await;
        assert!(r.closed_within(AT_ONCE).await);
    }
    assert_healthy(addr, "reconnect").await;
}

/// rumqttd 0.20's MQTT 5 decoder panics (`unreachable!`) on a CONNACK or UNSUBACK with a
/// body (found by fuzz/, target mqtt_v5). The gateway refuses both before decoding:
/// the connection closes with DISCONNECT 0x82 and the broker keeps serving. Many of them,
/// with distinct client ids, so a leak of router links per attempt would show.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_only_packets_from_a_v5_client_do_not_crash_anything() {
    let broker = broker().await;
    let addr = broker.first_addr();
    for i in 0..300 {
        let mut r = connected(addr, true, &format!("rumqttd-panic-{i}")).await;
        let packet: &[u8] = if i % 2 == 0 {
            &[0x20, 0x02, 0x00, 0x00]
        } else {
            &[0xB0, 0x03, 0x00, 0x01, 0x00]
        };
        r.send(packet).await;
        let Frame { first, body } = r.frame_within(AT_ONCE).await.expect("DISCONNECT");
        assert_eq!((first, body[0]), (0xE0, 0x82));
        assert!(r.closed_within(AT_ONCE).await);
    }
    assert_healthy(addr, "v5-connack").await;
}
