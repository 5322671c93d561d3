//! The connection's `$SYS/...` subscriptions (`crate::sys`): rumqttd refuses `$` filters,
//! so the gateway holds them itself. Their SUBACK and UNSUBACK slots are answered here,
//! the current values come from the retained set like any retained message, and each
//! update arrives over the tree's broadcast channel, to pass the deliver step at QoS 0
//! (read ACL and packet size, as for every other message).
//!
//! The connection's subscriptions are also counted here, into the
//! `moatmq_subscriptions` gauge: on SUBSCRIBE, UNSUBSCRIBE and when the connection ends.

use super::deliver::Origin;
use super::retained::RetainedJob;
use super::{Close, Gateway};
use crate::codec::make_publish;
use crate::sessions::Filters;
use crate::sys::{is_sys, Update, PREFIX};
use bytes::Bytes;
use moatmq_acl::topic_matches_filter;
use prometheus_client::metrics::gauge::Gauge;
use rumqttd::protocol::QoS;
use std::ops::Bound;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

/// The `$SYS/...` filters among a session's subscriptions.
pub(super) fn sys_filters(filters: &Filters) -> impl Iterator<Item = &String> {
    filters
        .range::<str, _>((Bound::Included(PREFIX), Bound::Unbounded))
        .map(|(f, _)| f)
        .take_while(|f| is_sys(f))
}

/// The next tree update, or never without a receiver (for `select!`).
pub(super) async fn next_update(rx: &mut Option<Receiver<Update>>) -> Result<Update, RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A connection's share of the subscription gauge, given back when it is dropped (the
/// connection's end, however it ends).
pub(super) struct Counted {
    gauge: Gauge,
    n: i64,
}

impl Counted {
    pub(super) fn new(gauge: Gauge, n: usize) -> Counted {
        let mut c = Counted { gauge, n: 0 };
        c.set(n);
        c
    }

    fn set(&mut self, n: usize) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.gauge.inc_by(n - self.n);
        self.n = n;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec_by(self.n);
    }
}

impl Gateway {
    /// The session's subscriptions changed: the gauge follows, and the tree's updates
    /// are received while a `$SYS/...` filter is held.
    pub(super) fn subscriptions_changed(&mut self) {
        self.counted.set(self.session.subscriptions.len());
        let wanted = sys_filters(&self.session.subscriptions).next().is_some();
        match (&self.sys, wanted) {
            (None, true) => self.sys = Some(self.shared.sys.subscribe()),
            (Some(_), false) => self.sys = None,
            _ => {}
        }
    }

    /// An update of the tree (or news that updates were missed).
    pub(super) fn on_sys(&mut self, update: Result<Update, RecvError>) -> Result<(), Close> {
        let update = match update {
            Ok(u) => u,
            Err(RecvError::Lagged(_)) => {
                // Too slow for the live updates: the current values instead.
                let jobs = sys_filters(&self.session.subscriptions)
                    .map(|f| RetainedJob {
                        filter: f.clone(),
                        qos: QoS::AtMostOnce,
                        subscription_id: None,
                        after: None,
                    })
                    .collect();
                self.retained.start(jobs);
                return Ok(());
            }
            Err(RecvError::Closed) => {
                self.sys = None;
                return Ok(());
            }
        };
        for msg in update.iter() {
            let wanted = sys_filters(&self.session.subscriptions)
                .any(|f| topic_matches_filter(f, &msg.topic));
            if !wanted {
                continue;
            }
            // A live update: QoS 0, retain flag clear like any live forward.
            let publish = make_publish(
                Bytes::from(msg.topic.clone()),
                Bytes::from(msg.payload.clone()),
                QoS::AtMostOnce,
                false,
                0,
            );
            self.deliver(publish, None, Origin::Gateway)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_filters_are_found_among_others() {
        let filters: Filters = ["#", "$SYS/#", "$SYS/broker/+", "$share/g/a", "a/b", "$SYSX"]
            .into_iter()
            .map(|f| (f.to_string(), Default::default()))
            .collect();
        let found: Vec<_> = sys_filters(&filters).collect();
        assert_eq!(found, ["$SYS/#", "$SYS/broker/+"]);
    }

    #[test]
    fn the_gauge_follows_and_is_given_back() {
        let gauge = Gauge::default();
        let mut a = Counted::new(gauge.clone(), 3);
        let b = Counted::new(gauge.clone(), 2);
        a.set(1);
        assert_eq!(gauge.get(), 3);
        drop(b);
        drop(a);
        assert_eq!(gauge.get(), 0);
    }
}
