//! Online password guessing and login floods against the real broker: how many guesses
//! one address gets checked, that an attacker's own successful login does not reset its
//! count, and that a flood from many addresses neither refuses a correct password nor
//! counts "no capacity" as a failed login.
//!
//! Attackers come from their own loopback addresses (127.0.0.2 and up, bound before
//! connecting); rate limits are off so the throttle is what is measured.

use bytes::BytesMut;
use moatmq_auth::{max_checked_guesses, ThrottleParams};
use moatmq_testkit::{Raw, TestBroker, TestBrokerBuilder, WAIT};
use rumqttc::mqttbytes::v4::Login;
use rumqttc::ConnectReturnCode as C4;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A broker with these users, rate limits off, metrics and audit.
fn broker_of(users: &[(&str, &str)]) -> TestBrokerBuilder {
    TestBroker::builder()
        .users(users)
        .no_connection_rate()
        .rate_limit("messages_per_second", 0)
        .limit("max_connections", 5000)
        .metrics()
        .audit()
}

async fn broker() -> TestBroker {
    broker_of(&[("alice", "alice-pw"), ("mallory", "mallory-pw")])
        .start()
        .await
}

fn from(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A TCP connection to `addr` from the source address `source`.
async fn dial(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(addr).await.expect("connect")
}

/// One 3.1.1 login attempt from `source`; the CONNACK code, `None` if none came within
/// `wait` (still waiting out a delay or a queue).
async fn attempt(
    source: IpAddr,
    addr: SocketAddr,
    user: &str,
    pass: &str,
    wait: Duration,
) -> Option<C4> {
    let mut connect = moatmq_testkit::connect4("guess");
    connect.login = Some(Login::new(user, pass));
    let mut raw = Raw::new(dial(source, addr).await);
    let mut out = BytesMut::new();
    connect.write(&mut out).unwrap();
    raw.send(&out).await;
    match raw.next4(wait).await {
        Some(rumqttc::Packet::ConnAck(ack)) => Some(ack.code),
        Some(other) => panic!("expected CONNACK, got {other:?}"),
        None => None,
    }
}

/// A 3.1.1 login from `source` that hangs up as soon as the broker has started checking
/// its password (`moatmq_password_checks_total` went up).
async fn abandon_once_checked(
    source: IpAddr,
    addr: SocketAddr,
    metrics: SocketAddr,
    client_id: &str,
    user: &str,
    pass: &str,
) {
    let before = metric(metrics, "moatmq_password_checks_total").await;
    let mut connect = moatmq_testkit::connect4(client_id);
    connect.login = Some(Login::new(user, pass));
    let mut raw = Raw::new(dial(source, addr).await);
    let mut out = BytesMut::new();
    connect.write(&mut out).unwrap();
    raw.send(&out).await;
    let started = Instant::now();
    while metric(metrics, "moatmq_password_checks_total").await == before {
        assert!(started.elapsed() < WAIT, "{user}'s login never checked");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(raw);
}

async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
}

/// A busy answer comes at once: retrying in a tight loop would only measure the test's
/// own CPU use.
async fn pause_if_busy(codes: &[C4]) {
    if codes.last() == Some(&C4::ServiceUnavailable) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn audit_events(broker: &TestBroker, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(broker.path("audit.log")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|e| e["event"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_guesses_from_one_address_stay_within_the_documented_bound() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let attacker = from(9);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(6);
    // 30 connections in parallel (more than 2 in progress + 16 waiting), each guessing again as soon as it is answered, each
    // guess for another username (so only the per-address count slows it down).
    let mut tasks = Vec::new();
    for worker in 0..30 {
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let left = deadline.saturating_duration_since(Instant::now());
                let user = format!("user-{worker}-{n}");
                match attempt(attacker, addr, &user, "guess", left).await {
                    Some(code) => codes.push(code),
                    None => break,
                }
                pause_if_busy(&codes).await;
            }
            codes
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.extend(t.await.unwrap());
    }
    // Failures first: each is recorded after its check, so failures <= checks holds.
    let failures = metric(broker.metrics_addr(), "moatmq_auth_failures_total").await;
    let checked = metric(broker.metrics_addr(), "moatmq_password_checks_total").await;
    let window = start.elapsed();
    let bound = max_checked_guesses(&ThrottleParams::default(), window);
    assert!(
        checked <= bound,
        "{checked} passwords checked in {window:?}, documented bound {bound}"
    );
    // The free failures were checked, so the bound was met by real checks.
    assert!(checked >= 10, "only {checked} checked");
    let busy = codes
        .iter()
        .filter(|&&c| c == C4::ServiceUnavailable)
        .count();
    let refused = codes
        .iter()
        .filter(|&&c| c == C4::BadUserNamePassword)
        .count();
    assert_eq!(busy + refused, codes.len(), "{codes:?}");
    assert!(
        busy > 0,
        "30 parallel logins beyond 2 + 16 must be answered busy"
    );
    // A busy answer is not a failed login: every failure was a checked guess.
    assert!(failures <= checked, "{failures} failures, {checked} checks");
    // Answers racing the deadline may be audited but not seen here.
    let audited = audit_events(&broker, "login_busy").len();
    assert!(
        audited >= busy,
        "{audited} login_busy events, {busy} busy answers"
    );
}

#[tokio::test]
async fn an_attackers_own_login_does_not_clear_its_failures() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let attacker = from(10);
    // Four wrong passwords for alice: three free, the fourth already delayed 250 ms.
    for _ in 0..4 {
        let code = attempt(attacker, addr, "alice", "guess", WAIT).await;
        assert_eq!(code, Some(C4::BadUserNamePassword));
    }
    // The attacker logs into its own account from the same address...
    let code = attempt(attacker, addr, "mallory", "mallory-pw", WAIT).await;
    assert_eq!(code, Some(C4::Success));
    // ...and alice's next guess still waits (500 ms after four failures).
    let t = Instant::now();
    let code = attempt(attacker, addr, "alice", "guess", WAIT).await;
    assert_eq!(code, Some(C4::BadUserNamePassword));
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "alice's count was reset: answered in {:?}",
        t.elapsed()
    );
    // Alice herself from another address is not slowed down by it.
    let code = attempt(from(11), addr, "alice", "alice-pw", WAIT).await;
    assert_eq!(code, Some(C4::Success));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_many_addresses_does_not_refuse_a_correct_password() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let stop = Instant::now() + Duration::from_secs(5);
    // 40 addresses, 12 connections each, guessing until `stop`.
    let mut flood = Vec::new();
    for a in 0..40u8 {
        for c in 0..12 {
            flood.push(tokio::spawn(async move {
                let mut codes = Vec::new();
                let mut n = 0;
                while Instant::now() < stop {
                    n += 1;
                    let user = format!("bot-{a}-{c}-{n}");
                    let left = stop.saturating_duration_since(Instant::now());
                    match attempt(from(20 + a), addr, &user, "guess", left).await {
                        Some(code) => codes.push(code),
                        None => break,
                    }
                    pause_if_busy(&codes).await;
                }
                codes
            }));
        }
    }
    // Meanwhile alice logs in four times from her own address, each within WAIT.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..4 {
        let code = attempt(from(1), addr, "alice", "alice-pw", WAIT).await;
        assert_eq!(
            code,
            Some(C4::Success),
            "alice's login {i} during the flood"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut codes = Vec::new();
    for t in flood {
        codes.extend(t.await.unwrap());
    }
    let busy = codes
        .iter()
        .filter(|&&c| c == C4::ServiceUnavailable)
        .count();
    assert!(
        codes
            .iter()
            .all(|&c| c == C4::ServiceUnavailable || c == C4::BadUserNamePassword),
        "{codes:?}"
    );
    // No strike for alice: no failure was ever recorded under her name.
    assert!(audit_events(&broker, "auth_failure")
        .iter()
        .all(|e| e["username"] != "alice"));
    assert!(audit_events(&broker, "login_busy").len() >= busy);
}

#[tokio::test]
async fn busy_is_0x89_in_mqtt5_costs_no_strike_and_hanging_up_frees_the_slot() {
    use rumqttc::v5::mqttbytes::v5 as m5;
    let broker = broker().await;
    let addr = broker.first_addr();
    let attacker = from(12);
    // Use up the address's free failures, so each further attempt waits >= 250 ms.
    for n in 0..10 {
        let code = attempt(attacker, addr, &format!("u{n}"), "guess", WAIT).await;
        assert_eq!(code, Some(C4::BadUserNamePassword));
    }
    // 2 attempts in progress and 16 waiting hold the address's slots...
    let mut held = Vec::new();
    for n in 0..18 {
        held.push(tokio::spawn(async move {
            attempt(attacker, addr, &format!("w{n}"), "guess", WAIT * 3).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    // ...so an MQTT 5 login from there is answered "server busy" at once.
    let stream = dial(attacker, addr).await;
    let mut raw = Raw::new(stream);
    raw.send5(m5::Packet::Connect(
        moatmq_testkit::connect5("busy5"),
        None,
        Some(m5::Login::new("alice", "alice-pw")),
    ))
    .await;
    match raw.next5(Duration::from_millis(200)).await {
        Some(m5::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, m5::ConnectReturnCode::ServerBusy)
        }
        other => panic!("expected CONNACK 0x89 at once, got {other:?}"),
    }
    let busy = audit_events(&broker, "login_busy");
    assert_eq!(busy.len(), 1, "{busy:?}");
    assert_eq!(busy[0]["username"], "alice");
    // No failure, so no strike, was recorded for alice.
    assert!(audit_events(&broker, "auth_failure")
        .iter()
        .all(|e| e["username"] != "alice"));
    // The held attempts give up: hanging up frees their places, so alice's own login
    // from that address waits only the address's delay, not behind 18 abandoned ones.
    for h in held {
        h.abort();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let code = attempt(attacker, addr, "alice", "alice-pw", WAIT).await;
    assert_eq!(code, Some(C4::Success));
}

#[tokio::test]
async fn hanging_up_during_the_check_still_counts_as_a_failure() {
    let broker = broker().await;
    let addr = broker.first_addr();
    let metrics = broker.metrics_addr();
    let attacker = from(13);
    // Twelve guesses, each abandoned as soon as its hash check has started: they must
    // use up the address's 10 free failures like answered ones would.
    for n in 0..12 {
        abandon_once_checked(attacker, addr, metrics, "gone", &format!("u{n}"), "guess").await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next guess waits out a delay (>= 250 ms) before it is answered.
    let t = Instant::now();
    let code = attempt(attacker, addr, "next", "guess", WAIT).await;
    assert_eq!(code, Some(C4::BadUserNamePassword));
    assert!(
        t.elapsed() >= Duration::from_millis(240),
        "abandoned checks were free: answered in {:?}",
        t.elapsed()
    );
}

/// A reconnect storm: devices give up on logins that wait too long (their connect
/// timeout) and retry. A device that hung up while its *correct* password was being
/// hashed is not a guesser: the check is settled as the success it was (remembered in
/// the credential cache, so the retry costs no second hash) instead of as a failure.
/// Counted as failures, a few dozen timed-out devices behind one address throttled it,
/// every later attempt then waited out a delay longer than the devices' timeout, and
/// the address was locked out for 10 minutes (seen with 5,000 devices in fleet.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_gives_up_during_its_check_is_not_throttled_for_it() {
    let users: Vec<(String, String)> = (0..12)
        .map(|i| (format!("dev{i}"), format!("pw-{i}")))
        .collect();
    let pairs: Vec<(&str, &str)> = users
        .iter()
        .map(|(u, p)| (u.as_str(), p.as_str()))
        .collect();
    let broker = broker_of(&pairs).start().await;
    let (addr, metrics) = (broker.first_addr(), broker.metrics_addr());
    let nat = from(14);
    // Twelve devices behind one address, each gone as soon as its check has started:
    // more than the address's 10 free failures, were they counted as failures.
    for (user, pass) in &users {
        abandon_once_checked(nat, addr, metrics, user, user, pass).await;
    }
    let checked = metric(metrics, "moatmq_password_checks_total").await;
    // The abandoned checks finish on the pool; then the address is not throttled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        metric(metrics, "moatmq_login_throttled_addresses").await,
        0,
        "correct passwords whose clients hung up were counted as failed logins"
    );
    // Each device's retry is answered from what its abandoned check found.
    for (user, pass) in &users {
        assert_eq!(
            attempt(nat, addr, user, pass, WAIT).await,
            Some(C4::Success)
        );
    }
    assert_eq!(
        metric(metrics, "moatmq_password_checks_total").await,
        checked,
        "the retries were hashed again"
    );
}

/// A reconnect storm after a restart: a device that logged in a moment ago skips the
/// Argon2id hash on its next login with the same password, while a wrong password is
/// hashed every time, and a changed password file (SIGHUP) forgets the old password at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_the_same_credentials_skips_the_hash_until_the_file_changes() {
    let broker = broker().await;
    let (addr, metrics) = (broker.first_addr(), broker.metrics_addr());
    let checks = || metric(metrics, "moatmq_password_checks_total");

    let first = attempt(from(1), addr, "alice", "alice-pw", WAIT).await;
    assert_eq!(first, Some(C4::Success));
    let after_first = checks().await;
    assert!(after_first >= 1, "the first login is hashed");
    for _ in 0..5 {
        let again = attempt(from(1), addr, "alice", "alice-pw", WAIT).await;
        assert_eq!(again, Some(C4::Success));
    }
    assert_eq!(checks().await, after_first, "reconnects were hashed again");

    // A wrong password for a cached user is never answered from the cache.
    let wrong = attempt(from(3), addr, "alice", "not-alice-pw", WAIT).await;
    assert_eq!(wrong, Some(C4::BadUserNamePassword));
    assert_eq!(
        checks().await,
        after_first + 1,
        "a wrong password skipped the hash"
    );

    // The operator changes alice's password and reloads: the old one is refused at once.
    moatmq_testkit::write_password_file(
        broker.path("").as_path(),
        &[("alice", "new-alice-pw"), ("mallory", "mallory-pw")],
    );
    assert!(broker.reload().is_empty());
    let old = attempt(from(1), addr, "alice", "alice-pw", WAIT).await;
    assert_eq!(
        old,
        Some(C4::BadUserNamePassword),
        "the old password still works"
    );
    let new = attempt(from(1), addr, "alice", "new-alice-pw", WAIT).await;
    assert_eq!(new, Some(C4::Success));
}

/// With `credential_cache_ttl = 0` every login is hashed, as before the cache existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_credential_cache_ttl_hashes_every_login() {
    let broker = broker_of(&[("alice", "alice-pw")])
        .set("auth", "credential_cache_ttl", 0)
        .start()
        .await;
    let (addr, metrics) = (broker.first_addr(), broker.metrics_addr());
    for _ in 0..3 {
        let ok = attempt(from(1), addr, "alice", "alice-pw", WAIT).await;
        assert_eq!(ok, Some(C4::Success));
    }
    assert_eq!(metric(metrics, "moatmq_password_checks_total").await, 3);
}
