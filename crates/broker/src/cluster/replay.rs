//! Replays of sealed cluster state (docs/cluster.md, "Replays"): a transfer stream
//! message, a retained value or a pending will carries, sealed, the time its node sealed
//! it (sealed again at each send or put); one JetStream stored more than
//! [`REPLAY_SLACK`] after that is a copy stored again by someone with access to NATS,
//! and is refused. Transfer messages without the time (written by releases before it)
//! cannot be told from replays of them and are refused too, unless `[cluster]
//! accept_untimed` is set for a rolling upgrade from such a release; KV values without
//! it are taken ([`check_kv`]).

use std::time::Duration;

/// A value stored later than this after it was sealed is a replay. Under the transfer
/// stream's duplicate window, so that a replay the stream lets through (after the
/// window) is always refused; the rest is room for the clocks of a node and its NATS
/// server to differ.
pub const REPLAY_SLACK: Duration = Duration::from_secs(60);
const _: () = assert!(REPLAY_SLACK.as_secs() < moatmq_config::TRANSFER_DUPLICATE_WINDOW_SECS);

/// How transfer messages without the time they were sealed are taken, and whether this
/// node writes the time into the KV values it seals (`[cluster] accept_untimed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untimed {
    /// Transfer messages without the time refused; KV values written with it.
    Refuse,
    /// Transfer messages without the time taken (a rolling upgrade from a release
    /// before it); retained values and wills written without it, so that nodes of that
    /// release can open them. (KV values without it are taken either way, `check_kv`.)
    Accept,
}

impl Untimed {
    pub fn of(accept: bool) -> Untimed {
        if accept {
            Untimed::Accept
        } else {
            Untimed::Refuse
        }
    }

    /// The time to seal a KV value with now: `None` while nodes of a release before it
    /// must open it.
    pub fn seal_time(self) -> Option<u64> {
        match self {
            Untimed::Refuse => Some(now_ms()),
            Untimed::Accept => None,
        }
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// When JetStream stored something, by its metadata, in Unix milliseconds.
pub fn stored_ms(at: time::OffsetDateTime) -> i128 {
    at.unix_timestamp_nanos() / 1_000_000
}

/// How long a replayed value may trail its sealing ([`REPLAY_SLACK`]; tests of the
/// refusal shorten it with `MOATMQ_TEST_REPLAY_SLACK_MS`, `test-hooks` only).
pub(super) fn slack() -> Duration {
    static HOOKED: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    super::hooked(&HOOKED, "MOATMQ_TEST_REPLAY_SLACK_MS", REPLAY_SLACK)
}

/// Why a value JetStream stored at `stored_ms` (Unix ms, the NATS server's clock; `None`
/// if unknown) and sealed at `sealed` (the sealing node's clock) is not taken: stored
/// more than the slack after it was sealed (a replay), or without the time unless
/// `untimed` accepts that.
pub fn check(sealed: Option<u64>, stored_ms: Option<i128>, untimed: Untimed) -> Result<(), Stale> {
    let Some(sealed) = sealed else {
        return match untimed {
            Untimed::Accept => Ok(()),
            Untimed::Refuse => Err(Stale::Untimed(
                "no sealing time (from a release before it, or a replay of such a value; \
                 [cluster] accept_untimed takes them during an upgrade)",
            )),
        };
    };
    let Some(stored) = stored_ms else {
        return Err(Stale::Untimed("no time JetStream stored it"));
    };
    let late = stored.saturating_sub(i128::from(sealed));
    if late > slack().as_millis() as i128 {
        return Err(Stale::Late { ms: late });
    }
    Ok(())
}

/// Why [`check`] refused a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// Stored this many milliseconds after it was sealed, more than the slack: a
    /// replay, or (a transfer message) its node's own copy that NATS stored late, which
    /// that node then stores again under a new id (`xfer::Output::store_again`).
    Late { ms: i128 },
    /// Without the time it was sealed, or JetStream stored it.
    Untimed(&'static str),
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::Late { ms } => write!(
                f,
                "stored {} s after it was sealed: replayed, or a copy that NATS stored late \
                 (a stalled or lost connection) and its node did not replace",
                ms / 1000
            ),
            Stale::Untimed(why) => f.write_str(why),
        }
    }
}

/// [`check`] for a KV value (a retained value, a will). One without the time, of
/// version one, is a value of a release before it or of a node with `accept_untimed`,
/// and may be the current value of its key long after an upgrade (a retained topic not
/// written since): taken, whatever `accept_untimed` says. Only timed values are
/// protected from being put back (docs/cluster.md, "Replays").
pub fn check_kv(sealed: Option<u64>, stored_ms: Option<i128>) -> Result<(), String> {
    check(sealed, stored_ms, Untimed::Accept).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEALED: u64 = 1_765_000_000_000;

    #[test]
    fn only_what_was_stored_soon_after_it_was_sealed_is_taken() {
        let at = |ms: i128| Some(SEALED as i128 + ms);
        let slack = REPLAY_SLACK.as_millis() as i128;
        let window = moatmq_config::TRANSFER_DUPLICATE_WINDOW_SECS as i128 * 1000;
        let taken = |stored| check(Some(SEALED), stored, Untimed::Refuse).is_ok();
        assert!(taken(at(500)));
        assert!(taken(at(slack)), "at the slack");
        assert!(taken(at(-5_000)), "the node's clock ahead of NATS");
        assert!(!taken(at(slack + 1)), "after the slack");
        assert_eq!(
            check(Some(SEALED), at(slack + 1), Untimed::Refuse),
            Err(Stale::Late { ms: slack + 1 }),
            "told from a value without the time"
        );
        assert!(!taken(at(window)), "a replay past the duplicate window");
        assert!(!taken(None), "no time JetStream stored it");
        // A timed value is checked whatever `untimed` says.
        assert!(check(Some(SEALED), at(window), Untimed::Accept).is_err());
        assert!(check(None, at(0), Untimed::Refuse).is_err());
        assert!(check(None, at(window), Untimed::Accept).is_ok());
        assert_eq!(Untimed::Accept.seal_time(), None);
        assert!(Untimed::Refuse.seal_time().is_some());
    }
}
