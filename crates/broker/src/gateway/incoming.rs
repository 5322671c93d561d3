//! Client to router: every packet a client sends passes [`Gateway::incoming`], which
//! validates it, asks the policy (ACL, limits) and the retained store, and forwards,
//! refuses or answers it.

use super::ledger::Release;
use super::retained::RetainedJob;
use super::{Close, Gateway};
use crate::admit::{admit_numbered, Admitted, Inbound, Refused, Source};
use crate::codec::{make_router_publish, Version};
use crate::event::Event;
use crate::policy::unshare;
use crate::ratelimit::Pace;
use crate::router::router_filter;
use crate::sys::is_sys;
use crate::topic::{valid_topic_filter, valid_topic_name};
use moatmq_store::SubscriptionOptions;
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, QoS, RetainForwardRule, SubAck, Subscribe, SubscribeProperties,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use tokio::time::Instant;
use tracing::warn;

/// How long a SUBSCRIBE joining a shared group waits for the group's consumer.
const GROUP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Gateway {
    /// Client to router: the one place every client packet passes.
    pub(super) fn incoming(
        &mut self,
        packet: Packet,
        header: Option<(QoS, u16, bool)>,
    ) -> Result<(), Close> {
        let limits = &self.shared.config.limits;
        match packet {
            Packet::Publish(mut publish, mut props) => {
                let (qos, pkid, dup) = header.unwrap_or((QoS::AtMostOnce, 0, false));
                self.resolve_alias(&mut publish, &mut props)?;
                let limits = &self.shared.config.limits;
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    return Err(Close::Protocol(
                        DisconnectReasonCode::TopicNameInvalid,
                        "topic not UTF-8",
                    ));
                };
                if props
                    .as_ref()
                    .is_some_and(|p| !p.subscription_identifiers.is_empty())
                {
                    // MQTT-3.3.4-6; the router would drop the link itself, and link
                    // teardowns stay in the gateway's hands (docs/security.md).
                    return Err(Close::Protocol(
                        DisconnectReasonCode::ProtocolError,
                        "subscription identifier in PUBLISH",
                    ));
                }
                if self.ledger.is_resend(qos, pkid, dup) {
                    // A resend before PUBREL: the router has it already (MQTT-4.3.3-10:
                    // not delivered twice). Its PUBREC is ours to repeat.
                    let rec = PubRec {
                        pkid,
                        reason: PubRecReason::Success,
                    };
                    return self.write(Packet::PubRec(rec, None));
                }
                if !valid_topic_name(topic, limits.max_topic_levels) {
                    return Err(Close::Protocol(
                        DisconnectReasonCode::TopicNameInvalid,
                        "invalid topic name",
                    ));
                }
                self.shared.metrics.messages_in.inc();
                if self.ledger.open(qos, pkid).is_err() {
                    return Err(Close::Protocol(
                        DisconnectReasonCode::ReceiveMaximumExceeded,
                        "receive maximum exceeded",
                    ));
                }
                match self.limiter.publish(topic.len() + publish.payload.len()) {
                    Pace::Go => {}
                    Pace::SlowDown(wait) => {
                        self.paused_until = Some(Instant::now() + wait);
                    }
                    Pace::Disconnect => {
                        self.shared.emit(
                            &self.info.client(&self.identity),
                            Event::RateLimited {
                                limit: "messages",
                                audited: true,
                            },
                        );
                        return Err(Close::Protocol(
                            DisconnectReasonCode::MessageRateTooHigh,
                            "publish rate limit exceeded",
                        ));
                    }
                }
                let inbound = Inbound {
                    topic,
                    payload: &publish.payload,
                    qos,
                    retain: publish.retain,
                    properties: props.as_ref(),
                    v5: self.version == Version::V5,
                };
                if let (Some(cluster), QoS::AtLeastOnce | QoS::ExactlyOnce) =
                    (&self.shared.cluster, qos)
                {
                    // Before `admit` numbers it: held back from the router until the
                    // transfer stream has it.
                    cluster.hold_back(self.hold_id);
                }
                if let (None, Some(book)) = (&self.admitting, &self.shared.durable) {
                    // Before `admit` decides which offline sessions to queue it for.
                    self.admitting = Some(book.admitting());
                }
                let admitted = admit_numbered(
                    &self.shared,
                    &self.info,
                    &self.identity,
                    Source::Publish,
                    inbound,
                );
                let id = admitted.as_ref().ok().and_then(|&(_, id)| id);
                let admitted = admitted.map(|(a, _)| a);
                if let (Some(cluster), QoS::AtLeastOnce | QoS::ExactlyOnce) =
                    (&self.shared.cluster, qos)
                {
                    let held =
                        matches!(admitted, Ok(Admitted::AfterSave | Admitted::AfterTransfer));
                    if !held && !self.to_router.waits_for_save() {
                        // Refused, or kept on this node: nothing held back.
                        cluster.released(self.hold_id);
                    }
                }
                // What the subscribers' gateways need of this publish (`origin.rs`).
                let mut published =
                    self.options
                        .published(&self.session.subscriptions, topic, qos, publish.retain);
                published.id = id;
                crate::origin::mark(&mut props, &published);
                // The router keeps no retained messages: moatmq serves them itself.
                let retained = std::mem::replace(&mut publish.retain, false);
                let admitted = match admitted {
                    Ok(a) if qos == QoS::ExactlyOnce => {
                        // A QoS 2 PUBLISH goes in now, exactly once: the router gets it
                        // as QoS 1 (rumqttd would hold it in memory until the PUBREL,
                        // outside its log: a persistent subscriber leaving meanwhile
                        // would miss it, its session moved to another node or stored
                        // for a restart without it), its PUBACK becomes our PUBREC, the
                        // PUBREL is answered here, and a durable session's store
                        // remembers the packet id until then (`qos2_in`). Subscribers
                        // get it at QoS 2 all the same (`origin.rs`).
                        let (topic, payload) = (publish.topic, publish.payload);
                        publish = make_router_publish(topic, payload, QoS::AtLeastOnce, pkid);
                        self.ledger.restore(pkid);
                        let a = self.qos2_in(pkid, a);
                        self.note_transfer(a, retained);
                        match a {
                            Admitted::Now => self.to_router.send(Packet::Publish(publish, props)),
                            Admitted::AfterSave => {
                                self.to_router.after_save(Packet::Publish(publish, props))
                            }
                            Admitted::AfterTransfer => self
                                .to_router
                                .after_transfer(Packet::Publish(publish, props)),
                        }
                        return Ok(());
                    }
                    other => other,
                };
                match admitted {
                    Ok(Admitted::Now) => {}
                    Ok(a @ (Admitted::AfterSave | Admitted::AfterTransfer)) => {
                        // It and everything after it wait for one save of this read
                        // (and the cluster's transfer stream).
                        self.note_transfer(a, retained);
                        let packet = Packet::Publish(publish, props);
                        if a == Admitted::AfterSave {
                            self.to_router.after_save(packet);
                        } else {
                            self.to_router.after_transfer(packet);
                        }
                        return Ok(());
                    }
                    Err(Refused::Quota)
                        if self.version != Version::V5 && qos != QoS::AtMostOnce =>
                    {
                        // 3.1.1 has no "refused" acknowledgement, and a success one
                        // would be a silent loss: close without acknowledging.
                        return Err(Close::Protocol(
                            DisconnectReasonCode::QuotaExceeded,
                            "retained quota exceeded",
                        ));
                    }
                    Err(Refused::Unavailable) => {
                        // Not acknowledged: the client sends it again, here or elsewhere.
                        return Err(Close::Protocol(
                            DisconnectReasonCode::ServerBusy,
                            "cluster forwarding queue full",
                        ));
                    }
                    Err(why) => return self.refuse_publish(qos, pkid, why),
                }
                self.to_router.send(Packet::Publish(publish, props));
                Ok(())
            }
            Packet::Subscribe(mut subscribe, props) => {
                // MQTT 5 subscription identifier (3.8.2.1.2): kept with each filter and
                // given to the router, which adds it to the forwards (`options.rs`).
                let id = props.as_ref().and_then(|p| p.id);
                let subscription_id = match id.map(u32::try_from) {
                    None => None,
                    Some(Ok(id)) if id > 0 => Some(id),
                    Some(_) => {
                        return Err(Close::Protocol(
                            DisconnectReasonCode::ProtocolError,
                            "subscription identifier 0",
                        ))
                    }
                };
                if subscribe
                    .filters
                    .iter()
                    .any(|f| f.nolocal && f.path.starts_with("$share/"))
                {
                    // MQTT-3.8.3-4: a client's own messages are not its to skip in a group.
                    return Err(Close::Protocol(
                        DisconnectReasonCode::ProtocolError,
                        "No Local on a shared subscription",
                    ));
                }
                let mut jobs = Vec::new();
                let mut refused = Vec::with_capacity(subscribe.filters.len());
                let mut kept = Vec::with_capacity(subscribe.filters.len());
                // With `[cluster]`, shared subscriptions go to the router in a SUBSCRIBE
                // of their own, marked (`cluster/groups.rs`); their slots are answered here.
                let mut members = Vec::new();
                for filter in subscribe.filters.drain(..) {
                    let mut reason = self.check_filter(&filter.path);
                    if reason.is_none() {
                        let options = SubscriptionOptions {
                            qos: filter.qos as u8,
                            no_local: filter.nolocal,
                            retain_as_published: filter.preserve_retain,
                            retain_handling: match filter.retain_forward_rule {
                                RetainForwardRule::OnEverySubscribe => 0,
                                RetainForwardRule::OnNewSubscribe => 1,
                                RetainForwardRule::Never => 2,
                            },
                            subscription_id,
                        };
                        let is_new = self
                            .session
                            .subscriptions
                            .insert(filter.path.clone(), options)
                            .is_none();
                        // MQTT 5 retain handling; 3.1.1 always sends them. Shared
                        // subscriptions get none (MQTT 5 section 4.8.2).
                        let wanted = match (self.version, &filter.retain_forward_rule) {
                            (Version::V4, _) => true,
                            (_, RetainForwardRule::OnEverySubscribe) => true,
                            (_, RetainForwardRule::OnNewSubscribe) => is_new,
                            (_, RetainForwardRule::Never) => false,
                        };
                        if wanted && !filter.path.starts_with("$share/") {
                            jobs.push(RetainedJob {
                                filter: filter.path.clone(),
                                qos: filter.qos,
                                subscription_id,
                                after: None,
                            });
                        }
                        if is_sys(&filter.path) {
                            // The gateway's own (`sys.rs`): its slot is answered here.
                            reason = Some(SubscribeReasonCode::Success(filter.qos));
                        } else if self.groups.is_some() && filter.path.starts_with("$share/") {
                            // rumqttd grants the QoS asked for, as it would have here.
                            reason = Some(SubscribeReasonCode::Success(filter.qos));
                            members.push(filter);
                        } else {
                            kept.push(filter);
                        }
                    }
                    refused.push(reason);
                }
                self.subscriptions_changed();
                if kept.is_empty() && members.is_empty() {
                    let codes = refused.into_iter().flatten().collect();
                    self.write(Packet::SubAck(
                        SubAck {
                            pkid: subscribe.pkid,
                            return_codes: codes,
                        },
                        None,
                    ))?;
                    self.retained.start(jobs);
                    self.session_changed();
                    return Ok(());
                }
                if refused.iter().any(Option::is_some) {
                    self.pending_subacks.insert(subscribe.pkid, refused);
                }
                self.retained.after_suback(subscribe.pkid, jobs);
                self.session_changed();
                let user = self.identity.username.as_deref();
                let groups = self
                    .shared
                    .cluster
                    .as_ref()
                    .map(|c| &c.groups as &dyn crate::router::GroupFilters);
                for f in &mut kept {
                    f.path = router_filter(groups, user, &f.path);
                }
                subscribe.filters = kept;
                let packet = Packet::Subscribe(subscribe, props);
                if members.is_empty() {
                    self.to_router.send(packet);
                    return Ok(());
                }
                for f in &mut members {
                    if let Some(ready) = self.groups.as_mut().and_then(|m| m.join(&f.path)) {
                        self.group_waits.push(ready);
                    }
                    f.path = router_filter(groups, user, &f.path);
                }
                let marked = Subscribe {
                    pkid: super::GROUP_SUBSCRIBE,
                    filters: members,
                };
                let mark = SubscribeProperties {
                    id: Some(crate::cluster::groups::MARK),
                    user_properties: Vec::new(),
                };
                // Both wait until the groups' consumers exist (docs/cluster.md), or a
                // message published right after the SUBACK could be missed by a consumer
                // created later. The client's SUBSCRIBE follows, with what is left of
                // it (maybe nothing): the router's SUBACK to it comes after the groups'.
                self.group_subacks += 1;
                self.to_router
                    .after_transfer(Packet::Subscribe(marked, Some(mark)));
                self.to_router.after_transfer(packet);
                Ok(())
            }
            Packet::Unsubscribe(mut unsubscribe, props) => {
                for f in &unsubscribe.filters {
                    self.session.subscriptions.remove(f.as_str());
                    self.retained.cancel(f);
                    if let Some(m) = &mut self.groups {
                        m.leave(f);
                    }
                }
                self.subscriptions_changed();
                self.session_changed();
                // `$SYS/...` filters are the gateway's own: the router never had them.
                let all = unsubscribe.filters.len();
                unsubscribe.filters.retain(|f| !is_sys(f));
                if unsubscribe.filters.is_empty() && all > 0 {
                    let unsuback = UnsubAck {
                        pkid: unsubscribe.pkid,
                        reasons: vec![UnsubAckReason::Success; all],
                    };
                    return self.write(Packet::UnsubAck(unsuback, None));
                }
                let groups = self
                    .shared
                    .cluster
                    .as_ref()
                    .map(|c| &c.groups as &dyn crate::router::GroupFilters);
                for f in &mut unsubscribe.filters {
                    *f = router_filter(groups, self.identity.username.as_deref(), f);
                }
                self.to_router.send(Packet::Unsubscribe(unsubscribe, props));
                Ok(())
            }
            Packet::PubRel(rel, _) => {
                if let (Some(book), Some(key)) = (&self.shared.durable, &self.session.key) {
                    book.qos2_in_done(key, rel.pkid);
                    // Its PUBCOMP goes out once that is stored: a crash before would
                    // leave the packet id pending, and the client's next message under
                    // it (its exchange complete) would be taken for a resend and lost.
                    self.save_before_writing();
                }
                let reason = match self.ledger.release(rel.pkid) {
                    Release::Ours => PubCompReason::Success,
                    // A PUBREL for nothing the router holds (a resend after a reconnect,
                    // or a made-up id): the router would drop the link, so it is
                    // answered here.
                    Release::Unknown => match self.version {
                        Version::V5 => PubCompReason::PacketIdentifierNotFound,
                        Version::V4 => PubCompReason::Success,
                    },
                };
                let comp = PubComp {
                    pkid: rel.pkid,
                    reason,
                };
                self.write(Packet::PubComp(comp, None))
            }
            // Acknowledgements reach the router in the order it forwarded the messages.
            p @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {
                // A PUBACK, a PUBCOMP or a PUBREC refusing the message ends a delivery.
                match &p {
                    Packet::PubAck(a, _) => self.window.done(a.pkid),
                    Packet::PubComp(c, _) => self.window.done(c.pkid),
                    Packet::PubRec(r, _)
                        if !matches!(
                            r.reason,
                            PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                        ) =>
                    {
                        self.window.done(r.pkid)
                    }
                    _ => {}
                }
                if !self.own_ack(&p)? {
                    if let Packet::PubAck(PubAck { pkid, .. }, _)
                    | Packet::PubRec(PubRec { pkid, .. }, _) = &p
                    {
                        self.settle_copy(*pkid);
                    }
                    if let (Some(book), Some(key)) = (&self.shared.durable, &self.session.key) {
                        match &p {
                            Packet::PubAck(a, _) => book.acked(key, a.pkid),
                            Packet::PubRec(r, _)
                                if matches!(
                                    r.reason,
                                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                                ) =>
                            {
                                // The router's PUBREL follows: written once this is
                                // committed (autosave_interval = 0).
                                book.received(key, r.pkid);
                                self.save_before_writing();
                            }
                            Packet::PubRec(r, _) => book.acked(key, r.pkid),
                            Packet::PubComp(c, _) => book.completed(key, c.pkid),
                            _ => {}
                        }
                    }
                    self.to_router.client_ack(p);
                }
                self.release_held()
            }
            Packet::PingReq(_) => self.write(Packet::PingResp(PingResp)),
            // MQTT-3.14.4-3: only a normal disconnection (0x00) discards the will.
            Packet::Disconnect(d, props) => {
                // MQTT 5 3.14.2.2.2: a new session expiry interval; raising 0 (no session
                // kept) to more is a protocol error.
                if let Some(secs) = props.and_then(|p| p.session_expiry_interval) {
                    if self.session.expiry == 0 && secs > 0 {
                        return Err(Close::Protocol(
                            DisconnectReasonCode::ProtocolError,
                            "session expiry raised from 0 in DISCONNECT",
                        ));
                    }
                    self.session.expiry = u64::from(secs).min(limits.max_session_expiry);
                }
                Err(Close::ClientDisconnect {
                    with_will: d.reason_code != DisconnectReasonCode::NormalDisconnection,
                })
            }
            Packet::Connect(..) => Err(Close::Protocol(
                DisconnectReasonCode::ProtocolError,
                "second CONNECT",
            )),
            _ => Err(Close::Protocol(
                DisconnectReasonCode::ProtocolError,
                "packet not allowed from a client",
            )),
        }
    }

    /// MQTT 5 client topic aliases (3.3.2.3.4): a PUBLISH with a topic and an alias sets
    /// the alias, one with an empty topic uses it; the topic is known before any check
    /// (ACL included) and the router never sees the alias. An alias of 0 or above
    /// `limits.max_topic_alias` (announced in the CONNACK) is 0x94; one used before it
    /// was set is a protocol error (0x82).
    fn resolve_alias(
        &mut self,
        publish: &mut rumqttd::protocol::Publish,
        props: &mut Option<rumqttd::protocol::PublishProperties>,
    ) -> Result<(), Close> {
        let Some(alias) = props.as_mut().and_then(|p| p.topic_alias.take()) else {
            return Ok(());
        };
        if alias == 0 || alias > self.shared.config.limits.max_topic_alias {
            return Err(Close::Protocol(
                DisconnectReasonCode::TopicAliasInvalid,
                "topic alias out of range",
            ));
        }
        if publish.topic.is_empty() {
            match self.aliases.get(&alias) {
                Some(topic) => publish.topic = topic.clone(),
                None => {
                    return Err(Close::Protocol(
                        DisconnectReasonCode::ProtocolError,
                        "topic alias used before it was set",
                    ))
                }
            }
        } else {
            self.aliases.insert(alias, publish.topic.clone());
        }
        Ok(())
    }

    /// `None` if the filter may be subscribed, else the refusal code for its SUBACK slot.
    pub(super) fn check_filter(&self, path: &str) -> Option<SubscribeReasonCode> {
        let limits = &self.shared.config.limits;
        let v5 = self.version == Version::V5;
        let code = |v5_code| {
            if v5 {
                v5_code
            } else {
                SubscribeReasonCode::Failure
            }
        };
        if !valid_topic_filter(path, limits.max_topic_levels) {
            return Some(code(SubscribeReasonCode::TopicFilterInvalid));
        }
        if self.session.persistent && path.starts_with("$share/") {
            // rumqttd panics ("group must exists") when it saves a persistent session
            // holding a shared subscription with a message in flight; the CONNACK of a
            // persistent session announces shared subscriptions as unavailable.
            return Some(code(SubscribeReasonCode::SharedSubscriptionsNotSupported));
        }
        if !self.session.subscriptions.contains_key(path)
            && self.session.subscriptions.len() >= limits.max_subscriptions_per_client
        {
            return Some(code(SubscribeReasonCode::QuotaExceeded));
        }
        // The router disconnects clients that subscribe to a `$` filter: the `$SYS` tree
        // (not shared) is served by the gateway itself, any other is refused.
        let inner = unshare(path);
        let decision = self.shared.policy.may_subscribe(&self.identity, inner);
        let own_tree = is_sys(path);
        if (inner.starts_with('$') && !own_tree) || !decision.allowed {
            self.shared.emit(
                &self.info.client(&self.identity),
                Event::AuthzDeny {
                    action: "subscribe",
                    topic: path,
                    rule_line: decision.line,
                },
            );
            return Some(code(SubscribeReasonCode::NotAuthorized));
        }
        None
    }

    /// A persistent session's incoming QoS 2 exchange `pkid` is stored until its PUBREL,
    /// so that after a restart a resend is not admitted twice; with
    /// `autosave_interval = 0` it is durable before the message reaches the router.
    fn qos2_in(&self, pkid: u16, admitted: Admitted) -> Admitted {
        let (Some(book), Some(key)) = (&self.shared.durable, &self.session.key) else {
            return admitted;
        };
        book.qos2_in(key, pkid);
        if book.is_sync() {
            Admitted::AfterSave
        } else {
            admitted
        }
    }

    /// A persistent session's subscriptions changed: the session store keeps them, so a
    /// crash does not lose them.
    fn session_changed(&mut self) {
        self.options.refresh(&self.session.subscriptions);
        if let (Some(book), Some(key)) = (&self.shared.durable, &self.session.key) {
            book.update(key, self.session.meta(self.version));
            // Its SUBACK or UNSUBACK goes out once that is stored (and parked).
            self.park_before_writing();
        }
    }

    /// Drops a publish the client may not make, acknowledging it as the protocol needs.
    pub(super) fn refuse_publish(
        &mut self,
        qos: QoS,
        pkid: u16,
        why: Refused,
    ) -> Result<(), Close> {
        let v5 = self.version == Version::V5;
        let (ack_reason, rec_reason) = match why {
            Refused::NotAuthorized => (PubAckReason::NotAuthorized, PubRecReason::NotAuthorized),
            Refused::Quota => (PubAckReason::QuotaExceeded, PubRecReason::QuotaExceeded),
            Refused::TooLarge | Refused::Unavailable => (
                PubAckReason::ImplementationSpecificError,
                PubRecReason::ImplementationSpecificError,
            ),
        };
        match qos {
            QoS::AtMostOnce => Ok(()),
            QoS::AtLeastOnce => {
                let reason = if v5 {
                    ack_reason
                } else {
                    PubAckReason::Success
                };
                self.write(Packet::PubAck(PubAck { pkid, reason }, None))
            }
            QoS::ExactlyOnce => {
                let reason = if v5 {
                    rec_reason
                } else {
                    // 3.1.1 cannot say no: the exchange completes and the message is dropped.
                    self.ledger.refuse(pkid);
                    PubRecReason::Success
                };
                self.write(Packet::PubRec(PubRec { pkid, reason }, None))
            }
        }
    }

    /// A publish that waits was admitted: with `[cluster]`, what waits must also be in
    /// the transfer stream up to the last message this node forwarded (its own, or a
    /// later one of another connection: never an earlier one), and a retained one in
    /// the retained bucket likewise.
    fn note_transfer(&mut self, admitted: Admitted, retained: bool) {
        if let (Some(cluster), Admitted::AfterSave | Admitted::AfterTransfer) =
            (&self.shared.cluster, admitted)
        {
            self.to_router.transfer_through(cluster.last_forwarded());
            if retained {
                self.to_router.retained_through(cluster.last_retained());
            }
        }
    }

    /// Saves the retained store, commits the session store and waits for the cluster's
    /// transfer stream, then lets the waiting publishes reach the router.
    pub(super) async fn save_then_forward(&mut self) -> Result<(), Close> {
        // What came before the retained publishes need not wait for the save.
        self.link.commit(&mut self.to_router)?;
        let needs_save = self.to_router.needs_save();
        if let Some(store) = self.shared.retained.clone().filter(|_| needs_save) {
            let saved = tokio::task::spawn_blocking(move || store.save_now()).await;
            if !matches!(saved, Ok(Ok(()))) {
                // Not durable: the client must not get an acknowledgement.
                warn!("retained store save failed; closing the connection unacknowledged");
                return Err(Close::Protocol(
                    DisconnectReasonCode::UnspecifiedError,
                    "retained save failed",
                ));
            }
        }
        if let Some(book) = self
            .shared
            .durable
            .as_ref()
            .filter(|b| needs_save && b.is_sync())
        {
            if !book.commit().await {
                warn!("session store commit failed; closing the connection unacknowledged");
                return Err(Close::Protocol(
                    DisconnectReasonCode::UnspecifiedError,
                    "session store commit failed",
                ));
            }
        }
        if let Some(cluster) = &self.shared.cluster {
            // QoS 1/2 publishes are acknowledged once the transfer stream holds them
            // (not waiting for what other connections forwarded since).
            if !cluster
                .transferred_through(self.to_router.transfer_target())
                .await
            {
                return Err(Close::Protocol(
                    DisconnectReasonCode::UnspecifiedError,
                    "cluster transfer stopped",
                ));
            }
            // A retained one once the cluster's retained bucket holds it too, so a node
            // starting after this one died still serves it.
            if !cluster
                .retained_stored_through(self.to_router.retained_target())
                .await
            {
                return Err(Close::Protocol(
                    DisconnectReasonCode::UnspecifiedError,
                    "cluster retained state stopped",
                ));
            }
        }
        for mut ready in std::mem::take(&mut self.group_waits) {
            let waited = tokio::time::timeout(GROUP_WAIT, ready.wait_for(|r| *r)).await;
            if !matches!(waited, Ok(Ok(_))) {
                warn!("cluster: a shared group's consumer is not in place; subscribed anyway");
            }
        }
        let pause = held_pause(&self.identity.client_id);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        self.to_router.saved();
        if self.shared.cluster.is_some() {
            // In the router now (a lazy connection opens its link for it), before
            // anything else of this connection's.
            self.open_link().await?;
            self.link.commit(&mut self.to_router)?;
            if let (Some(cluster), false) = (&self.shared.cluster, self.to_router.has_ready()) {
                cluster.released(self.hold_id);
            }
        }
        Ok(())
    }
}

/// A pause before a connection hands what it held back to the router, once stored:
/// none, or with the `test-hooks` feature the milliseconds in
/// `MOATMQ_TEST_HELD_PAUSE_MS` for clients whose id starts with `held-`, so that a test
/// can keep one connection's publish held back while another's reaches the router.
fn held_pause(client_id: &str) -> std::time::Duration {
    static HOOKED: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    let pause = crate::hooks::hooked(
        &HOOKED,
        "MOATMQ_TEST_HELD_PAUSE_MS",
        std::time::Duration::ZERO,
    );
    if client_id.starts_with("held-") {
        pause
    } else {
        std::time::Duration::ZERO
    }
}
