//! MQTT 5 topic aliases from server to client (3.3.2.3.4): when the client's CONNECT
//! allows them (Topic Alias Maximum > 0), the first deliveries on each of up to that
//! many topics carry the topic and a new alias, later ones the alias and an empty topic.
//! Aliases belong to the network connection: a new connection starts without any.
//! Topics past the maximum are sent in full (no alias is ever reassigned, so a client
//! never has to follow a changing mapping).

use bytes::Bytes;
use rumqttd::protocol::{Publish, PublishProperties};
use std::collections::HashMap;

#[derive(Default)]
pub(super) struct OutAliases {
    /// The client's Topic Alias Maximum (0: none).
    max: u16,
    by_topic: HashMap<Bytes, u16>,
}

/// An alias set up by the PUBLISH just encoded: undone if it is not sent after all.
#[must_use]
pub(super) struct NewAlias(Option<Bytes>);

impl OutAliases {
    pub(super) fn new(max: u16) -> OutAliases {
        OutAliases {
            max,
            by_topic: HashMap::new(),
        }
    }

    /// Gives `publish` its topic's alias (the topic then goes) or a new one.
    pub(super) fn apply(
        &mut self,
        publish: &mut Publish,
        props: &mut Option<PublishProperties>,
    ) -> NewAlias {
        if self.max == 0 || publish.topic.is_empty() {
            return NewAlias(None);
        }
        if let Some(&alias) = self.by_topic.get(&publish.topic) {
            props.get_or_insert_with(Default::default).topic_alias = Some(alias);
            publish.topic = Bytes::new();
            return NewAlias(None);
        }
        let next = self.by_topic.len() + 1;
        match u16::try_from(next) {
            Ok(alias) if alias <= self.max => {
                self.by_topic.insert(publish.topic.clone(), alias);
                props.get_or_insert_with(Default::default).topic_alias = Some(alias);
                NewAlias(Some(publish.topic.clone()))
            }
            _ => NewAlias(None),
        }
    }

    /// The PUBLISH that set `new` up was not sent: the client does not know the alias.
    pub(super) fn undo(&mut self, new: NewAlias) {
        if let Some(topic) = new.0 {
            self.by_topic.remove(&topic);
        }
    }
}

impl NewAlias {
    /// Sent: nothing to undo.
    pub(super) fn keep(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::make_publish;
    use rumqttd::protocol::QoS;

    fn publish(topic: &'static str) -> Publish {
        make_publish(
            Bytes::from_static(topic.as_bytes()),
            Bytes::new(),
            QoS::AtMostOnce,
            false,
            0,
        )
    }

    #[test]
    fn up_to_the_maximum_topics_get_an_alias_and_later_deliveries_use_it() {
        let mut a = OutAliases::new(2);
        let mut seen = Vec::new();
        for topic in ["a", "a", "b", "c", "b"] {
            let (mut p, mut props) = (publish(topic), None);
            a.apply(&mut p, &mut props).keep();
            seen.push((p.topic.clone(), props.and_then(|p| p.topic_alias)));
        }
        let t = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert_eq!(
            seen,
            [
                (t("a"), Some(1)),
                (t(""), Some(1)),
                (t("b"), Some(2)),
                (t("c"), None),
                (t(""), Some(2))
            ]
        );
        let (mut p, mut props) = (publish("a"), None);
        OutAliases::new(0).apply(&mut p, &mut props).keep();
        assert!(
            props.is_none() && p.topic == t("a"),
            "not allowed by the client"
        );
    }

    #[test]
    fn an_alias_whose_publish_was_not_sent_is_set_up_again() {
        let mut a = OutAliases::new(5);
        let (mut p, mut props) = (publish("big"), None);
        let new = a.apply(&mut p, &mut props);
        a.undo(new);
        let (mut p, mut props) = (publish("big"), None);
        a.apply(&mut p, &mut props).keep();
        assert_eq!(&p.topic[..], b"big", "the topic is sent again");
        assert_eq!(props.and_then(|p| p.topic_alias), Some(1));
    }
}
