//! MQTT 5 subscription options the router ignores (3.8.3.1), applied by the gateway that
//! holds the subscriptions: No Local, Retain As Published, and the subscription
//! identifiers the router keeps per filter but never forgets when a filter is
//! subscribed again without one. What the publisher sent comes with each forward
//! (`origin.rs`).
//!
//! rumqttd forwards one copy per matching filter and does not say which filter a copy
//! is for, so with overlapping subscriptions of different options each copy follows
//! all the client's matching subscriptions: it is dropped as the client's own only if
//! every matching one is No Local, and keeps its retain flag if any is Retain As
//! Published.

use crate::origin::Published;
use crate::sessions::Filters;
use moatmq_acl::{strip_share, topic_matches_filter};
use moatmq_store::SubscriptionOptions;
use rumqttd::protocol::PublishProperties;

/// The connection's number and which options its subscriptions use at all: with none,
/// no per-message work.
pub(super) struct SubOptions {
    /// This connection, as its publishes name it for No Local.
    pub connection: u64,
    no_local: bool,
    retain_as_published: bool,
    identifiers: bool,
}

impl SubOptions {
    pub(super) fn new(subscriptions: &Filters) -> SubOptions {
        let mut o = SubOptions {
            connection: crate::origin::next_connection(),
            no_local: false,
            retain_as_published: false,
            identifiers: false,
        };
        o.refresh(subscriptions);
        o
    }

    /// The subscriptions changed.
    pub(super) fn refresh(&mut self, subscriptions: &Filters) {
        let any = |f: fn(&SubscriptionOptions) -> bool| subscriptions.values().any(f);
        self.no_local = any(|o| o.no_local);
        self.retain_as_published = any(|o| o.retain_as_published);
        self.identifiers = any(|o| o.subscription_id.is_some());
    }

    /// What a publish of this client on `topic` records for the subscribers' side: the
    /// connection when one of its own No Local subscriptions matches.
    pub(super) fn published(
        &self,
        subscriptions: &Filters,
        topic: &str,
        qos: rumqttd::protocol::QoS,
        retain: bool,
    ) -> Published {
        let own = self.no_local && matching(subscriptions, topic).any(|o| o.no_local);
        Published {
            qos,
            retain,
            connection: own.then_some(self.connection),
            id: None,
        }
    }

    /// Whether a forward on `topic` is this client's own and every matching
    /// subscription says No Local.
    pub(super) fn is_own(&self, subscriptions: &Filters, topic: &str, from: &Published) -> bool {
        self.no_local
            && from.connection == Some(self.connection)
            && matching(subscriptions, topic).all(|o| o.no_local)
    }

    /// Whether a forward on `topic` published with retain keeps the flag.
    pub(super) fn keeps_retain(
        &self,
        subscriptions: &Filters,
        topic: &str,
        from: &Published,
    ) -> bool {
        from.retain
            && self.retain_as_published
            && matching(subscriptions, topic).any(|o| o.retain_as_published)
    }

    /// The identifiers of the client's subscriptions matching `topic`, for a message the
    /// gateway sends itself (one copy for all of them).
    pub(super) fn identifiers<'a>(
        &self,
        subscriptions: &'a Filters,
        topic: &'a str,
    ) -> impl Iterator<Item = u32> + 'a {
        // Without any identifier, no walk over the subscriptions.
        let walk = self.identifiers.then(|| matching(subscriptions, topic));
        walk.into_iter().flatten().filter_map(|o| o.subscription_id)
    }

    /// Keeps in `props` only the subscription identifiers of the client's current
    /// subscriptions matching `topic` (the router adds the one it stored per filter,
    /// even after the client subscribed again without one).
    pub(super) fn check_identifiers(
        &self,
        subscriptions: &Filters,
        topic: &str,
        props: &mut Option<PublishProperties>,
    ) {
        let Some(p) = props.as_mut() else { return };
        if p.subscription_identifiers.is_empty() {
            return;
        }
        if self.identifiers {
            p.subscription_identifiers.retain(|&id| {
                matching(subscriptions, topic)
                    .any(|o| o.subscription_id.is_some_and(|s| s as usize == id))
            });
        } else {
            p.subscription_identifiers.clear();
        }
        if *p == PublishProperties::default() {
            *props = None;
        }
    }
}

/// The options of the subscriptions in `subscriptions` matching `topic`.
fn matching<'a>(
    subscriptions: &'a Filters,
    topic: &'a str,
) -> impl Iterator<Item = &'a SubscriptionOptions> + 'a {
    subscriptions.iter().filter_map(move |(filter, options)| {
        let plain = strip_share(filter).unwrap_or(filter);
        topic_matches_filter(plain, topic).then_some(options)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::QoS;

    fn subs(list: &[(&str, bool, bool, Option<u32>)]) -> Filters {
        list.iter()
            .map(|&(f, no_local, rap, id)| {
                let o = SubscriptionOptions {
                    qos: 1,
                    no_local,
                    retain_as_published: rap,
                    retain_handling: 0,
                    subscription_id: id,
                };
                (f.to_owned(), o)
            })
            .collect()
    }

    #[test]
    fn own_messages_are_dropped_only_where_every_matching_subscription_is_no_local() {
        let s = subs(&[("a/#", true, false, None), ("b/+", false, true, None)]);
        let o = SubOptions::new(&s);
        let mine = o.published(&s, "a/x", QoS::AtLeastOnce, false);
        assert_eq!(mine.connection, Some(o.connection));
        assert!(o.is_own(&s, "a/x", &mine));
        let other = SubOptions::new(&s);
        assert!(!other.is_own(&s, "a/x", &mine), "another connection's");
        assert_eq!(
            o.published(&s, "b/x", QoS::AtLeastOnce, true).connection,
            None
        );
        let both = subs(&[("a/#", true, false, None), ("+/x", false, false, None)]);
        let o2 = SubOptions::new(&both);
        let m = o2.published(&both, "a/x", QoS::AtMostOnce, false);
        assert!(
            !o2.is_own(&both, "a/x", &m),
            "a plain overlapping subscription wins"
        );
        assert!(o.keeps_retain(&s, "b/x", &o.published(&s, "b/x", QoS::AtMostOnce, true)));
        assert!(!o.keeps_retain(&s, "a/x", &o.published(&s, "a/x", QoS::AtMostOnce, true)));
    }

    #[test]
    fn identifiers_of_gone_or_changed_subscriptions_are_removed() {
        let s = subs(&[
            ("a/#", false, false, Some(7)),
            ("$share/g/b/+", false, false, None),
        ]);
        let o = SubOptions::new(&s);
        let mut props = Some(PublishProperties {
            subscription_identifiers: vec![7, 9],
            ..Default::default()
        });
        o.check_identifiers(&s, "a/1", &mut props);
        assert_eq!(props.as_ref().unwrap().subscription_identifiers, vec![7]);
        o.check_identifiers(&s, "b/1", &mut props);
        assert_eq!(props, None, "nothing else in them: none");
    }
}
