//! Late copies told from replays (docs/cluster.md, "Replays"). A transfer message
//! JetStream stored longer after its sealing than the replay slack is refused by every
//! node. It is a replay, or its node's own copy that NATS stored late (it waited on a
//! stalled path to NATS): that node then finds the copy refused and stores the message
//! again under `<id>~<random>` (`xfer::Output::store_again`), which every node takes.
//! So a late refusal is reported only once its node had the time to do that: an error
//! and `moatmq_cluster_state_rejected_total` if no replacement came within [`GRACE`], a
//! warning and `moatmq_cluster_late_copies_replaced_total` if one did. A replacement
//! settles one refusal of its id: replays of the same copy are still reported.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// How long a late refusal waits for its node's replacement. The node stores it again
/// as soon as the acknowledgement of its own send says the stream held a copy: within
/// a few seconds of NATS storing the late one, once the node reaches NATS again.
pub const GRACE: Duration = Duration::from_secs(30);

/// Refusals waiting at most: past it, one is reported at once (a flood of replays
/// does not grow the node's memory).
const MOST: usize = 4096;

/// A late refusal, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The stream message's id.
    pub id: String,
    pub subject: String,
    pub why: String,
}

/// The late refusals of the transfer stream waiting for their node's replacements.
#[derive(Default)]
pub struct LateCopies {
    /// By message id: its refusals not due yet.
    waiting: HashMap<String, Waiting>,
    /// Ids by when they are due, oldest first (one entry per refusal).
    due: VecDeque<(Instant, String)>,
}

/// The refusals of one message id not due yet.
struct Waiting {
    refusal: Refusal,
    /// How many (its entries in [`LateCopies::due`]).
    refused: u32,
    /// How many of them replacements settled: the oldest ones.
    settled: u32,
}

impl LateCopies {
    /// `refusal` waits for its replacement until `now` + [`grace`]; returned to be
    /// reported at once if too many wait.
    pub fn refused(&mut self, refusal: Refusal, now: Instant) -> Option<Refusal> {
        if let Some(w) = self.waiting.get_mut(&refusal.id) {
            w.refused += 1;
        } else if self.waiting.len() >= MOST {
            return Some(refusal);
        } else {
            let w = Waiting {
                refusal: refusal.clone(),
                refused: 1,
                settled: 0,
            };
            self.waiting.insert(refusal.id.clone(), w);
        }
        self.due.push_back((now + grace(), refusal.id));
        None
    }

    /// Whether no refusal waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// A message stored again under `id` (`<base>~<random>`) opened: the refusal of
    /// its late copy (`base`) it settles, if one waits unsettled.
    pub fn replaced(&mut self, id: &str) -> Option<Refusal> {
        let (base, _) = id.split_once('~')?;
        let w = self
            .waiting
            .get_mut(base)
            .filter(|w| w.settled < w.refused)?;
        w.settled += 1;
        Some(w.refusal.clone())
    }

    /// When the next refusal is due, if one waits.
    pub fn deadline(&self) -> Option<Instant> {
        self.due.front().map(|(at, _)| *at)
    }

    /// The refusals due by `now` that no replacement settled, one per refusal.
    pub fn due(&mut self, now: Instant) -> Vec<Refusal> {
        let mut out = Vec::new();
        while self.due.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, id)) = self.due.pop_front() else {
                break;
            };
            let Some(w) = self.waiting.get_mut(&id) else {
                continue;
            };
            // The oldest refusals are the settled ones.
            if w.settled > 0 {
                w.settled -= 1;
            } else {
                out.push(w.refusal.clone());
            }
            w.refused -= 1;
            if w.refused == 0 {
                self.waiting.remove(&id);
            }
        }
        out
    }
}

/// [`GRACE`] (tests shorten it with `MOATMQ_TEST_LATE_COPY_GRACE_MS`, `test-hooks`
/// only).
fn grace() -> Duration {
    static HOOKED: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    super::hooked(&HOOKED, "MOATMQ_TEST_LATE_COPY_GRACE_MS", GRACE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(id: &str) -> Refusal {
        Refusal {
            id: id.into(),
            subject: "m_xfer.a".into(),
            why: "late".into(),
        }
    }

    #[test]
    fn a_refusal_is_reported_after_the_grace_unless_its_replacement_came() {
        let t = Instant::now();
        let mut late = LateCopies::default();
        assert_eq!(late.refused(refusal("a:1:5"), t), None);
        assert_eq!(late.refused(refusal("a:1:9"), t), None);
        assert_eq!(late.deadline(), Some(t + GRACE));
        assert_eq!(late.replaced("a:1:5"), None, "not a replacement");
        assert_eq!(late.replaced("a:1:6~00ff"), None, "another id's");
        assert_eq!(late.replaced("a:1:5~00ff"), Some(refusal("a:1:5")));
        assert!(late.due(t + GRACE / 2).is_empty());
        assert_eq!(late.due(t + GRACE), vec![refusal("a:1:9")]);
        assert_eq!(late.deadline(), None);
        assert!(late.is_empty());
        assert!(late.due(t + GRACE * 2).is_empty());
    }

    #[test]
    fn a_replacement_settles_one_refusal_of_its_id() {
        // A late copy and a replay of it: one replacement, one error.
        let t = Instant::now();
        let mut late = LateCopies::default();
        late.refused(refusal("a:1:5"), t);
        late.refused(refusal("a:1:5"), t + Duration::from_secs(1));
        assert!(late.replaced("a:1:5~01").is_some());
        assert_eq!(late.due(t + GRACE), Vec::new(), "the replaced one");
        assert_eq!(
            late.due(t + GRACE + Duration::from_secs(1)),
            vec![refusal("a:1:5")]
        );
        assert!(late.replaced("a:1:5~02").is_none(), "none left to settle");
        // Refused twice, never replaced: both reported.
        late.refused(refusal("a:1:7"), t);
        late.refused(refusal("a:1:7"), t);
        assert_eq!(late.due(t + GRACE).len(), 2);
    }

    #[test]
    fn past_the_most_waiting_a_refusal_is_reported_at_once() {
        let t = Instant::now();
        let mut late = LateCopies::default();
        for n in 0..MOST {
            assert_eq!(late.refused(refusal(&format!("a:1:{n}")), t), None);
        }
        let over = refusal("a:1:x");
        assert_eq!(late.refused(over.clone(), t), Some(over));
        // Refused again, one waiting already waits on.
        assert_eq!(late.refused(refusal("a:1:0"), t), None);
        assert_eq!(late.due(t + GRACE).len(), MOST + 1);
    }
}
