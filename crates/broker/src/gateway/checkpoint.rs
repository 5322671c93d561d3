//! Checkpoints of a connected durable session in a cluster (docs/cluster.md, "Connected
//! sessions are parked too"). The node parks such a session live while its client is
//! connected; if the node dies, the node its client reconnects to resumes it from that
//! park and reads what came after the park's cut from the transfer stream. A cut is
//! named in the park only once the client has acknowledged everything the router had
//! for it up to there, found like this:
//!
//! 1. Take the node's cut ([`Cluster::cut`](crate::cluster::Cluster)) and wait until
//!    every publish admitted before it has reached the router
//!    ([`SessionBook::admitted_before`](crate::durable::SessionBook::admitted_before)).
//! 2. Two PINGREQs on the link, one after the other's answer: rumqttd answers a PINGREQ
//!    when it handles it, and forwards what earlier events made ready in the pass that
//!    follows, so everything it forwards for the cut comes before the second answer,
//!    unless that pass stopped at the client's in-flight limit (100 forwards not
//!    acknowledged: then it may still hold some) or at a full link buffer (it said so
//!    with an `Unschedule`). Either way the checkpoint is given up and tried again.
//! 3. Once the forwards received by then have all left the acknowledgement order
//!    (`acks.rs`: the client acknowledged them, QoS 2 at PUBREC, or they were settled
//!    here), the cut is reported (`SessionBook::checkpoint`); the park task writes it.
//!
//! Messages after the cut come twice when the park is taken (QoS 1's at-least-once).

use super::Gateway;
use crate::cluster::Cut;
use rumqttd::protocol::{Packet, PingReq};
use std::time::Duration;
use tokio::time::Instant;

/// A checkpoint not reached within this is given up (and tried again).
const GIVE_UP: Duration = Duration::from_secs(10);
/// How often the admissions before a cut are looked at (they reach the router within
/// microseconds, unless held for the transfer stream: NATS slow or away).
const ADMIT_POLL: Duration = Duration::from_millis(20);
/// rumqttd's limit of forwards in flight to one client (`MAX_INFLIGHT` in 0.20).
const ROUTER_INFLIGHT: u64 = 100;

/// The checkpoints of one connection, and the count of its PINGREQs to the router.
pub(super) struct Checkpoints {
    /// `[cluster] checkpoint_interval`: one at most this often, while forwards come (a
    /// session that receives nothing keeps its last one: nothing after it is its).
    every: Duration,
    /// When the next one may start.
    next_at: Instant,
    /// Forwards arrived since the last checkpoint began.
    busy: bool,
    state: State,
    /// PINGREQs sent to the router, and answers received: the router answers in order.
    pings_sent: u64,
    pings_back: u64,
}

enum State {
    Idle,
    /// Waiting for the publishes admitted before the cut to reach the router.
    Admitting {
        cut: Cut,
        barrier: u64,
        since: Instant,
    },
    /// Waiting for the answer to PINGREQ number `answer` (the first, or `second`).
    Pinging {
        cut: Cut,
        answer: u64,
        second: bool,
        /// Acknowledgements the router had before the first PINGREQ.
        left_before: u64,
        since: Instant,
    },
    /// Waiting for the first `through` forwards to be acknowledged.
    Acks {
        cut: Cut,
        through: u64,
        since: Instant,
    },
}

impl Checkpoints {
    pub(super) fn new(every: Duration) -> Checkpoints {
        Checkpoints {
            every,
            next_at: Instant::now() + every,
            busy: false,
            state: State::Idle,
            pings_sent: 0,
            pings_back: 0,
        }
    }

    /// When the connection's loop must wake for it next, if nothing else wakes it.
    pub(super) fn wake_at(&self) -> Instant {
        match &self.state {
            State::Idle => self.next_at,
            State::Admitting { .. } => Instant::now() + ADMIT_POLL,
            State::Pinging { since, .. } | State::Acks { since, .. } => *since + GIVE_UP,
        }
    }

    /// A forward arrived for the client.
    pub(super) fn forwarded(&mut self) {
        self.busy = true;
    }

    /// The router paused the link: a pass may have left forwards behind.
    pub(super) fn unscheduled(&mut self) {
        if matches!(self.state, State::Pinging { .. }) {
            self.give_up();
        }
    }

    /// Tried again later: a busy link, or NATS slow, lets none be taken for a while.
    fn give_up(&mut self) {
        self.state = State::Idle;
        self.busy = true;
        self.next_at = Instant::now() + self.every;
    }
}

impl Gateway {
    /// Sends a PINGREQ to the router (with the next commit); its number.
    pub(super) fn ping_router(&mut self) -> u64 {
        self.to_router.send(Packet::PingReq(PingReq));
        match self.checkpoints.as_mut() {
            Some(c) => {
                c.pings_sent += 1;
                c.pings_sent
            }
            None => 0,
        }
    }

    /// The router answered a PINGREQ: `true` if it was number `mine` (or later).
    pub(super) fn ping_answered(&mut self, mine: u64) -> bool {
        match self.checkpoints.as_mut() {
            Some(c) => {
                c.pings_back += 1;
                c.pings_back >= mine
            }
            None => true,
        }
    }

    /// A PINGREQ answer the connection's loop received.
    pub(super) fn on_ping_answer(&mut self) {
        let Some(c) = self.checkpoints.as_mut() else {
            return;
        };
        c.pings_back += 1;
        let State::Pinging {
            answer,
            second,
            left_before,
            ..
        } = c.state
        else {
            return;
        };
        if c.pings_back < answer {
            return;
        }
        if !second {
            let number = self.ping_router();
            if let Some(State::Pinging { answer, second, .. }) =
                self.checkpoints.as_mut().map(|c| &mut c.state)
            {
                *answer = number;
                *second = true;
            }
            return;
        }
        let counts = self.to_router.inflight_counts();
        let holding = self.window.is_holding();
        let Some(c) = self.checkpoints.as_mut() else {
            return;
        };
        let State::Pinging { cut, .. } = std::mem::replace(&mut c.state, State::Idle) else {
            return;
        };
        if holding || counts.entered.saturating_sub(left_before) >= ROUTER_INFLIGHT {
            // The router may hold forwards of the cut still.
            c.give_up();
            return;
        }
        c.state = State::Acks {
            cut,
            through: counts.entered,
            since: Instant::now(),
        };
    }

    /// Moves the connection's checkpoint on; called at each turn of its loop.
    pub(super) fn checkpoint_turn(&mut self) {
        let Some(c) = self.checkpoints.as_mut() else {
            return;
        };
        match &c.state {
            State::Idle => {
                let now = Instant::now();
                if now < c.next_at {
                    return;
                }
                if !c.busy {
                    c.next_at = now + c.every;
                    return;
                }
                c.busy = false;
                let (Some(cluster), Some(book)) = (&self.shared.cluster, &self.shared.durable)
                else {
                    return;
                };
                c.state = State::Admitting {
                    cut: cluster.cut(),
                    barrier: book.admission_barrier(),
                    since: now,
                };
            }
            State::Admitting { barrier, since, .. } => {
                let Some(book) = &self.shared.durable else {
                    return;
                };
                if !book.admitted_before(*barrier) {
                    if since.elapsed() > GIVE_UP {
                        c.give_up();
                    }
                    return;
                }
                let left_before = self.to_router.inflight_counts().left;
                let since = *since;
                let number = self.ping_router();
                let Some(c) = self.checkpoints.as_mut() else {
                    return;
                };
                let State::Admitting { cut, .. } = std::mem::replace(&mut c.state, State::Idle)
                else {
                    return;
                };
                c.state = State::Pinging {
                    cut,
                    answer: number,
                    second: false,
                    left_before,
                    since,
                };
            }
            State::Pinging { since, .. } => {
                if since.elapsed() > GIVE_UP {
                    c.give_up();
                }
            }
            State::Acks { through, since, .. } => {
                if self.to_router.inflight_counts().left < *through {
                    if since.elapsed() > GIVE_UP {
                        c.give_up();
                    }
                    return;
                }
                let State::Acks { cut, .. } = std::mem::replace(&mut c.state, State::Idle) else {
                    return;
                };
                c.next_at = Instant::now() + c.every;
                if let (Some(book), Some(key)) = (&self.shared.durable, &self.session.key) {
                    book.checkpoint(key, cut);
                }
            }
        }
    }
}
