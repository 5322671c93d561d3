//! Durations and counts that tests change through the environment (`test-hooks` only).

use std::time::Duration;

/// `default`, or with the `test-hooks` feature the milliseconds in the environment
/// variable `name` if set (read once, into `slot`): tests shorten the broker's waits,
/// or slow its disk, with them.
pub(crate) fn hooked(
    slot: &'static std::sync::OnceLock<Duration>,
    name: &str,
    default: Duration,
) -> Duration {
    hooked_with(slot, name, default, |v| {
        v.parse().ok().map(Duration::from_millis)
    })
}

/// [`hooked`] for a count.
pub(crate) fn hooked_count(
    slot: &'static std::sync::OnceLock<usize>,
    name: &str,
    default: usize,
) -> usize {
    hooked_with(slot, name, default, |v| v.parse().ok())
}

fn hooked_with<T: Copy + Send + Sync>(
    slot: &'static std::sync::OnceLock<T>,
    name: &str,
    default: T,
    parse: impl FnOnce(&str) -> Option<T>,
) -> T {
    #[cfg(feature = "test-hooks")]
    {
        *slot.get_or_init(|| {
            std::env::var(name)
                .ok()
                .and_then(|v| parse(&v))
                .unwrap_or(default)
        })
    }
    #[cfg(not(feature = "test-hooks"))]
    {
        let _ = (slot, name, parse);
        default
    }
}
