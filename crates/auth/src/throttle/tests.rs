use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[test]
fn per_user_growth_and_cap() {
    let t = LoginThrottle::new();
    let now = Instant::now();
    let mut seen = Vec::new();
    for _ in 0..12 {
        seen.push(ms(t.delay_at(A, "alice", now)));
        t.failure_at(A, "alice", now);
    }
    // Three free per (address, user); the address's ten free are not the limit here.
    assert_eq!(
        seen,
        [0, 0, 0, 250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
    );
    assert_eq!(
        t.delay_at(B, "alice", now),
        Duration::ZERO,
        "other addresses"
    );
    for _ in 0..1000 {
        t.failure_at(A, "alice", now);
    }
    assert_eq!(t.delay_at(A, "alice", now), Duration::from_secs(10));
}

#[test]
fn spraying_usernames_hits_the_address_count() {
    let t = LoginThrottle::new();
    let now = Instant::now();
    let mut seen = Vec::new();
    for i in 0..14 {
        let user = format!("user{i}");
        seen.push(ms(t.delay_at(A, &user, now)));
        t.failure_at(A, &user, now);
    }
    assert_eq!(seen, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 250, 500, 1000, 2000]);
    // A fresh username from the same address waits the address's delay too.
    assert_eq!(ms(t.delay_at(A, "fresh", now)), 4000);
    assert_eq!(t.delay_at(B, "fresh", now), Duration::ZERO);
}

#[test]
fn success_clears_only_its_own_user() {
    let t = LoginThrottle::new();
    let now = Instant::now();
    for _ in 0..5 {
        t.failure_at(A, "alice", now);
    }
    for _ in 0..6 {
        t.failure_at(A, "bob", now);
    }
    // The attacker logs into its own account: alice's failures stay.
    t.record_success(A, "mallory");
    assert_eq!(ms(t.delay_at(A, "alice", now)), 1000);
    // Bob logs in: his count goes, the address's (11 failures) stays.
    t.record_success(A, "bob");
    assert_eq!(ms(t.delay_at(A, "bob", now)), 500);
    assert_eq!(ms(t.delay_at(A, "alice", now)), 1000);
    assert_eq!(ms(t.delay_at(A, "carol", now)), 500);
}

#[test]
fn quiet_period_forgets() {
    let t = LoginThrottle::new();
    let start = Instant::now();
    for _ in 0..5 {
        t.failure_at(A, "u", start);
    }
    assert_eq!(
        t.delay_at(A, "u", start + Duration::from_secs(599)),
        Duration::from_secs(1)
    );
    assert_eq!(t.delay_at(A, "u", start + FORGET_AFTER), Duration::ZERO);
    // A failure after the quiet period starts counting from one again.
    for _ in 0..5 {
        t.failure_at(B, "u", start);
    }
    t.failure_at(B, "u", start + FORGET_AFTER);
    assert_eq!(t.delay_at(B, "u", start + FORGET_AFTER), Duration::ZERO);
}

#[test]
fn throttled_addresses_are_those_whose_next_attempt_waits() {
    let t = LoginThrottle::new();
    let start = Instant::now();
    // Two failures for alice from A: still free, nobody waits.
    for _ in 0..2 {
        t.failure_at(A, "alice", start);
    }
    assert_eq!(t.throttled_at(start), 0);
    // The third uses up alice's free failures from A: A waits (for alice).
    t.failure_at(A, "alice", start);
    assert_eq!(t.throttled_at(start), 1);
    // B sprays usernames, one failure each: throttled once its address count is used up.
    for i in 0..10 {
        assert_eq!(t.throttled_at(start), 1, "B after {i} failures");
        t.failure_at(B, &format!("user{i}"), start);
    }
    assert_eq!(t.throttled_at(start), 2);
    // Two hosts of one IPv6 /64 are one address.
    let host = |i: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i));
    for i in 1..=3 {
        t.failure_at(host(i), "bob", start);
    }
    assert_eq!(t.throttled_at(start), 3);
    // Alice logging in from A clears only A's count for her: A is not held back any more.
    t.record_success(A, "alice");
    assert_eq!(t.throttled_at(start), 2);
    // Quiet time forgets the rest, without a login to look them up.
    assert_eq!(t.throttled_at(start + FORGET_AFTER), 0);
    // Without a delay nobody is held back, whatever the counts.
    let no_delay = LoginThrottle::with_params(
        ThrottleParams {
            base_delay: Duration::ZERO,
            ..ThrottleParams::default()
        },
        MAX_TRACKED,
    );
    for _ in 0..20 {
        no_delay.failure_at(A, "alice", start);
    }
    assert_eq!(no_delay.throttled_at(start), 0);
}

#[test]
fn bounded_memory_evicts_oldest() {
    let t = LoginThrottle::with_capacity(3);
    let now = Instant::now();
    for i in 0..10u8 {
        t.failure_at(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)), "u", now);
    }
    assert_eq!(t.tracked(), 6, "3 addresses + 3 (address, user) pairs");
    // Keep A hot; it must survive a flood of new addresses.
    let t = LoginThrottle::with_capacity(3);
    for _ in 0..4 {
        t.failure_at(A, "u", now);
    }
    for i in 0..10u8 {
        t.failure_at(A, "u", now);
        t.failure_at(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)), "u", now);
    }
    assert_eq!(t.tracked(), 6);
    assert_eq!(t.delay_at(A, "u", now), Duration::from_secs(10));
    // Long usernames are stored as hashes: many of them stay within the same bound.
    let long = "x".repeat(60_000);
    for i in 0..10u8 {
        t.failure_at(A, &format!("{long}{i}"), now);
    }
    assert_eq!(t.tracked(), 6);
}

#[test]
fn ipv6_counts_per_slash_64() {
    let t = LoginThrottle::new();
    let now = Instant::now();
    for i in 0..4u16 {
        t.failure_at(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, i, i, i, i)),
            "u",
            now,
        );
    }
    let same_prefix = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 9, 9, 9, 9));
    let other_prefix = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
    assert_eq!(ms(t.delay_at(same_prefix, "u", now)), 500);
    assert_eq!(t.delay_at(other_prefix, "u", now), Duration::ZERO);
    let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
    for _ in 0..3 {
        t.failure_at(mapped, "u", now);
    }
    assert_eq!(ms(t.delay_at(A, "u", now)), 250);
    assert_eq!(address_bucket(mapped), A);
    assert_eq!(
        address_bucket(same_prefix),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 0))
    );
}

#[test]
fn worst_case_guesses_follow_the_schedule() {
    let p = ThrottleParams::default();
    // 10 free, plus one the other slot had in progress when its count was read; then
    // each slot waits the delay for what it has seen.
    assert_eq!(max_checked_guesses(&p, Duration::ZERO), 11);
    // Both slots then saw 10 failures: 250 ms each; then 12 (1 s), 14 (4 s), 16 (10 s).
    assert_eq!(max_checked_guesses(&p, Duration::from_millis(249)), 11);
    assert_eq!(max_checked_guesses(&p, Duration::from_millis(250)), 13);
    assert_eq!(max_checked_guesses(&p, Duration::from_millis(1250)), 15);
    assert_eq!(max_checked_guesses(&p, Duration::from_millis(5250)), 17);
    assert_eq!(max_checked_guesses(&p, Duration::from_millis(15_250)), 19);
    let one_minute = max_checked_guesses(&p, Duration::from_secs(60));
    let one_hour = max_checked_guesses(&p, Duration::from_secs(3600));
    assert!(one_minute < 30, "{one_minute}");
    // Sustained: two slots at 10 s each.
    assert!((0.2 - p.sustained_guesses_per_second()).abs() < 1e-9);
    let slope = (one_hour - one_minute) as f64 / 3540.0;
    assert!((slope - 0.2).abs() < 0.01, "{slope}");
    // One slot and no free failures: the plain doubling schedule.
    let strict = ThrottleParams {
        in_progress_per_address: 1,
        free_per_address: 0,
        ..p
    };
    // Checks at 0.25, 0.75, 1.75, 3.75 s.
    assert_eq!(max_checked_guesses(&strict, Duration::from_secs(3)), 3);
    assert_eq!(max_checked_guesses(&strict, Duration::from_secs(4)), 4);
    let unlimited = ThrottleParams {
        base_delay: Duration::ZERO,
        ..p
    };
    assert_eq!(
        max_checked_guesses(&unlimited, Duration::from_secs(1)),
        u64::MAX
    );
}

/// The table in docs/operating.md ("Login throttle").
#[test]
fn documented_worst_cases() {
    let p = ThrottleParams::default();
    let table = [
        (1, 13),
        (10, 17),
        (60, 27),
        (600, 135),
        (3600, 735),
        (86_400, 17_295),
    ];
    for (secs, guesses) in table {
        assert_eq!(
            max_checked_guesses(&p, Duration::from_secs(secs)),
            guesses,
            "{secs} s"
        );
    }
}

#[test]
fn is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<LoginThrottle>();
    check::<crate::PasswordFile>();
}
