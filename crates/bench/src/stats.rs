//! Latency percentiles by sorting: every sample is kept (8 bytes each), which is exact
//! and cheap at benchmark sizes.

use std::time::Duration;

/// Nearest-rank percentile (`p` in 0..=100) of samples in nanoseconds; sorts in place.
pub fn percentile(samples: &mut [u64], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = (p / 100.0 * samples.len() as f64).ceil() as usize;
    let index = rank.clamp(1, samples.len()) - 1;
    Some(Duration::from_nanos(samples[index]))
}

#[cfg(test)]
mod tests {
    use super::percentile;
    use std::time::Duration;

    #[test]
    fn nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&mut v, 50.0), Some(Duration::from_nanos(50)));
        assert_eq!(percentile(&mut v, 99.0), Some(Duration::from_nanos(99)));
        assert_eq!(percentile(&mut v, 100.0), Some(Duration::from_nanos(100)));
        assert_eq!(percentile(&mut v, 0.0), Some(Duration::from_nanos(1)));
        assert_eq!(percentile(&mut [], 50.0), None);
    }
}
