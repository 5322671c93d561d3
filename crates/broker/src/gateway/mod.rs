//! The per-connection gateway: our equivalent of rumqttd's remote link.
//!
//! It owns the socket. Two steps hold every check, one per direction:
//! - into the broker, [`crate::admit::admit`]: payload limit, write ACL in force, retained
//!   record and quotas, for a client's PUBLISH ([`Gateway::incoming`]) and for a will
//!   (`will.rs`) alike;
//! - out to the client, [`Gateway::deliver`] (`deliver.rs`): read ACL, the client's
//!   maximum packet size, QoS downgrade, for router forwards (`outgoing.rs`) and retained
//!   messages (`retained.rs`) alike.
//!
//! `incoming.rs` keeps the checks on the connection's own protocol state (topic
//! validity, aliases, receive maximum, QoS 2 duplicates, publish rate, subscription
//! filters).
//!
//! Packet ids: the router numbers what it forwards (1..=100). When the gateway withholds a
//! forwarded QoS 1/2 message it acknowledges it to the router itself; when it refuses a
//! client's QoS 2 publish it completes the PUBREC/PUBREL/PUBCOMP exchange itself.

use crate::acks::AckOrder;
use crate::codec::{
    codec_for, mark_publish, publish_header, refuse_before_decode, short_v5_disconnect, Version,
};
use crate::event::Event;
use crate::policy::{AclView, Identity};
use crate::ratelimit::PublishLimiter;
use crate::shared::{ConnInfo, Shared};
use crate::transport::{Reader, Writer};
use crate::will::{self, Will};
use bytes::BytesMut;
use futures_util::FutureExt;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Packet, Protocol, PubRecReason, SubscribeReasonCode,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

mod close;
mod deliver;
mod incoming;
mod outgoing;
mod retained;

use close::Close;
use retained::{OwnState, RetainedJob};

/// Output gathered before one socket write.
const WRITE_BATCH: usize = 64 * 1024;
/// A write that cannot make progress for this long means the client stopped reading.
const WRITE_STALL: Duration = Duration::from_secs(30);

pub struct Gateway {
    shared: Arc<Shared>,
    info: ConnInfo,
    version: Version,
    codec: Box<dyn Protocol + Send>,
    identity: Identity,
    router_id: String,
    tx: LinkTx,
    rx: LinkRx,
    will: Option<Will>,
    keep_alive: Option<Duration>,
    max_out_packet: usize,
    /// Filters the session holds (for the subscription limit), as the client wrote
    /// them; a resumed persistent session starts with the ones it kept.
    subscriptions: HashSet<String>,
    /// Retained messages to send once the SUBACK of that packet id is out.
    retained_after_suback: HashMap<u16, Vec<RetainedJob>>,
    /// Retained messages being sent, oldest subscription first.
    retained_jobs: std::collections::VecDeque<RetainedJob>,
    /// Scratch space for one batch from the retained index.
    retained_batch: Vec<Arc<moatmq_store::RetainedMessage>>,
    /// Our own QoS 1/2 deliveries (retained messages) in flight, by packet id.
    own_inflight: HashMap<u16, OwnState>,
    next_own_pkid: u16,
    /// SUBSCRIBEs partly refused here: reason codes of the refused positions.
    pending_subacks: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// Client QoS 2 publishes we refused: we owe the PUBCOMP.
    refused_qos2: HashSet<u16>,
    /// Router QoS 2 forwards we withheld: we owe the router a PUBCOMP after its PUBREL.
    withheld_qos2: HashSet<u16>,
    out: BytesMut,
    /// Retained publishes recorded but not yet saved (`autosave_interval = 0`): they
    /// reach the router only after the save.
    awaiting_save: Vec<Packet>,
    /// `[rate_limit]` buckets for this client's publishes.
    limiter: PublishLimiter,
    /// Reading is paused until then (publish rate exceeded).
    paused_until: Option<Instant>,
    /// Cached ACL for the per-message read check.
    acl: AclView,
    /// MQTT 5: QoS 1/2 publishes received and not yet acknowledged (receive maximum).
    inflight_in: u16,
    /// Acknowledgements to the router, held until their turn.
    acks: AckOrder,
    /// Scratch list of acknowledgements released by `acks`.
    to_router: Vec<Packet>,
    /// The newest packet for the router; older ones wait in the link's buffer.
    held: Option<Packet>,
    /// The router keeps this session after the connection (clean session 0, expiry).
    persistent: bool,
    /// Notified when a new connection takes this session over.
    kicked: Arc<Notify>,
    /// Client QoS 2 publishes the router holds until their PUBREL, by packet id.
    qos2_in: HashSet<u16>,
}

impl Gateway {
    #[allow(clippy::too_many_arguments)] // one call site, in connect.rs; the fields are the state
    pub fn new(
        shared: Arc<Shared>,
        info: ConnInfo,
        version: Version,
        identity: Identity,
        router_id: String,
        tx: LinkTx,
        rx: LinkRx,
        will: Option<Will>,
        keep_alive: u16,
        max_out_packet: Option<u32>,
        persistent: bool,
        kicked: Arc<Notify>,
        subscriptions: HashSet<String>,
    ) -> Gateway {
        let limiter = PublishLimiter::new(&shared.config.rate_limit, identity.username.as_deref());
        let acl = shared.policy.acl_view();
        Gateway {
            shared,
            info,
            version,
            codec: codec_for(version),
            identity,
            router_id,
            tx,
            rx,
            will,
            // MQTT-3.1.2-24: one and a half keep-alive periods; 0 disables it.
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            max_out_packet: max_out_packet.map_or(usize::MAX, |m| m as usize),
            subscriptions,
            retained_after_suback: HashMap::new(),
            retained_jobs: std::collections::VecDeque::new(),
            retained_batch: Vec::new(),
            own_inflight: HashMap::new(),
            next_own_pkid: 0,
            pending_subacks: HashMap::new(),
            refused_qos2: HashSet::new(),
            withheld_qos2: HashSet::new(),
            out: BytesMut::with_capacity(4096),
            awaiting_save: Vec::new(),
            limiter,
            paused_until: None,
            acl,
            inflight_in: 0,
            acks: AckOrder::default(),
            to_router: Vec::new(),
            held: None,
            persistent,
            kicked,
            qos2_in: HashSet::new(),
        }
    }

    /// Serves the connection until it ends, then tears down the link. Returns whether
    /// the session is still this connection's (not taken over by a new one).
    pub async fn run(mut self, mut reader: Reader, mut writer: Writer, mut buf: BytesMut) -> bool {
        let mut shutdown = self.shared.shutdown.clone();
        let close = self
            .serve(&mut reader, &mut writer, &mut buf, &mut shutdown)
            .await;
        let reason = match &close {
            Close::Protocol(code, _) => Some(*code),
            Close::TakenOver | Close::Replaced => Some(DisconnectReasonCode::SessionTakenOver),
            Close::Shutdown => Some(DisconnectReasonCode::ServerShuttingDown),
            _ => None,
        };
        if let (Version::V5, Some(reason_code)) = (self.version, reason) {
            self.out.clear();
            crate::codec::write_v5_disconnect(reason_code, &mut self.out);
            let _ = tokio::time::timeout(Duration::from_secs(1), writer.write_all(&self.out)).await;
        }
        // A client that reads nothing cannot hold up the teardown (TLS close_notify).
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
        let publish_will = !matches!(
            close,
            Close::ClientDisconnect { with_will: false } | Close::Shutdown
        );
        if let (true, Some(will)) = (publish_will, self.will.take()) {
            will::publish_will(&self.shared, &self.router_id, will);
        }
        if !matches!(close, Close::TakenOver) {
            let _ = self.commit_router();
            // Tells the router the link is gone; it keeps a persistent session's state.
            let bye = Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            );
            let _ = self.tx.send(bye).now_or_never();
        }
        if self.persistent {
            // Before the session hold is released: a new connection resumes these.
            self.shared
                .sessions
                .save(&self.router_id, &self.subscriptions);
        }
        self.shared.emit(
            &self.info.client(&self.identity),
            Event::Disconnect {
                reason: close.as_str(),
                detail: close.detail(),
            },
        );
        !matches!(close, Close::TakenOver | Close::Replaced)
    }

    async fn serve(
        &mut self,
        reader: &mut Reader,
        writer: &mut Writer,
        buf: &mut BytesMut,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Close {
        let max_packet = self.shared.config.limits.max_packet_size;
        let far_future = Duration::from_secs(86400 * 365);
        let mut deadline = Instant::now() + self.keep_alive.unwrap_or(far_future);
        let kicked = self.kicked.clone();
        // Bytes already buffered after the CONNECT are packets too.
        if let Err(close) = self.decode_all(buf, max_packet) {
            return close;
        }
        loop {
            // One save (autosave_interval = 0) for all retained publishes of a read.
            if !self.awaiting_save.is_empty() {
                if let Err(close) = self.save_then_forward().await {
                    return close;
                }
            }
            if let Err(close) = self.commit_router() {
                return close;
            }
            if let Err(close) = self.flush(writer).await {
                return close;
            }
            // Over its publish rate the client is read more slowly: its own TCP window
            // then slows it down (back-pressure) while deliveries to it continue.
            let paused_until = self.paused_until;
            tokio::select! {
                _ = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)), if paused_until.is_some() => {
                    self.paused_until = None;
                    // A paused client cannot send its PINGREQ: the pause does not count.
                    deadline = Instant::now() + self.keep_alive.unwrap_or(far_future);
                    if let Err(close) = self.decode_all(buf, max_packet) {
                        return close;
                    }
                }
                read = reader.read(buf), if paused_until.is_none() => {
                    match read {
                        Ok(0) => return Close::ClientClosed,
                        Ok(n) => self.shared.metrics.bytes_in.inc_by(n as u64),
                        Err(e) => return Close::Network(e.to_string()),
                    };
                    deadline = Instant::now() + self.keep_alive.unwrap_or(far_future);
                    if let Err(close) = self.decode_all(buf, max_packet) {
                        return close;
                    }
                }
                notification = self.rx.next() => {
                    match notification {
                        Ok(Some(n)) => {
                            if let Err(close) = self.outgoing(n) {
                                return close;
                            }
                            // Gather what else is ready into the same write.
                            while self.out.len() < WRITE_BATCH {
                                match self.rx.next().now_or_never() {
                                    Some(Ok(Some(n))) => {
                                        if let Err(close) = self.outgoing(n) {
                                            return close;
                                        }
                                    }
                                    Some(Ok(None)) => continue,
                                    Some(Err(_)) => return Close::TakenOver,
                                    None => break,
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(_) => return Close::TakenOver,
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Close::Protocol(DisconnectReasonCode::KeepAliveTimeout, "keep alive timeout");
                }
                _ = shutdown.changed() => return Close::Shutdown,
                _ = kicked.notified() => return Close::Replaced,
                _ = std::future::ready(()), if self.can_feed_retained() => {
                    if let Err(close) = self.feed_retained() {
                        return close;
                    }
                }
            }
        }
    }

    /// Decodes and handles every complete packet in `buf`.
    fn decode_all(&mut self, buf: &mut BytesMut, max_packet: usize) -> Result<(), Close> {
        loop {
            // A throttled publisher's remaining packets wait in the buffer.
            if buf.is_empty() || self.paused_until.is_some() {
                return Ok(());
            }
            // QoS and packet id are private in rumqttd's Publish: read them off the wire.
            let header = publish_header(buf);
            // Tell the egress side what QoS the message was published at (codec.rs).
            mark_publish(&mut buf[..]);
            if let Some(kind) = refuse_before_decode(buf) {
                // rumqttd's v5 decoder panics on these; a client never sends them.
                debug!(kind, "server-only packet type from a client");
                return Err(Close::Protocol(
                    DisconnectReasonCode::ProtocolError,
                    "packet not allowed from a client",
                ));
            }
            if self.version == Version::V5 {
                if let Some(reason) = short_v5_disconnect(buf) {
                    // MQTT 5 3.14.2.2: with a remaining length of 1 the property length is
                    // absent; rumqttd would wait for it forever.
                    return Err(Close::ClientDisconnect {
                        with_will: reason != 0x00,
                    });
                }
            }
            match self.codec.read_mut(buf, max_packet) {
                Ok(packet) => self.incoming(packet, header)?,
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => return Ok(()),
                Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(_)) => {
                    return Err(Close::Protocol(
                        DisconnectReasonCode::PacketTooLarge,
                        "packet larger than limits.max_packet_size",
                    ))
                }
                Err(e) => {
                    debug!(error = %e, "malformed packet");
                    return Err(Close::Protocol(
                        DisconnectReasonCode::MalformedPacket,
                        "malformed packet",
                    ));
                }
            }
        }
    }

    /// Queues a packet for the router. Packets of one read go to the router's buffer
    /// together and wake it once (`commit_router`), as rumqttd's own link does: one
    /// wake-up per packet costs more than the rest of the path.
    fn send_router(&mut self, packet: Packet) -> Result<(), Close> {
        if !self.awaiting_save.is_empty() {
            // Behind a retained publish that waits for its save: keep the order.
            self.awaiting_save.push(packet);
            return Ok(());
        }
        if let Some(previous) = self.held.replace(packet) {
            self.tx.buffer().push_back(previous);
        }
        Ok(())
    }

    /// Hands everything queued to the router with one wake-up.
    fn commit_router(&mut self) -> Result<(), Close> {
        match self.held.take() {
            None => Ok(()),
            Some(last) => match self.tx.send(last).now_or_never() {
                Some(Ok(_)) => Ok(()),
                _ => Err(Close::TakenOver),
            },
        }
    }

    /// Encodes a packet for this client's protocol version into the output buffer.
    fn write(&mut self, packet: Packet) -> Result<(), Close> {
        // The end of an incoming QoS 1/2 exchange frees a receive-maximum slot.
        match &packet {
            Packet::PubAck(..) | Packet::PubComp(..) => {
                self.inflight_in = self.inflight_in.saturating_sub(1)
            }
            Packet::PubRec(rec, _)
                if !matches!(
                    rec.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                ) =>
            {
                self.inflight_in = self.inflight_in.saturating_sub(1)
            }
            _ => {}
        }
        // rumqttd's 3.1.1 encoder panics on MQTT 5 properties: strip them for 3.1.1 clients.
        let packet = match self.version {
            Version::V5 => packet,
            Version::V4 => strip_properties(packet),
        };
        self.codec
            .write(packet, &mut self.out)
            .map(drop)
            .map_err(|_| Close::Protocol(DisconnectReasonCode::UnspecifiedError, "encode failed"))
    }

    async fn flush(&mut self, writer: &mut Writer) -> Result<(), Close> {
        if self.out.is_empty() {
            return Ok(());
        }
        // A new connection for this session need not wait out a stalled write.
        let kicked = self.kicked.clone();
        let written = tokio::select! {
            w = tokio::time::timeout(WRITE_STALL, writer.write_all(&self.out)) => w,
            _ = kicked.notified() => return Err(Close::Replaced),
        };
        match written {
            Ok(Ok(())) => {
                self.shared.metrics.bytes_out.inc_by(self.out.len() as u64);
                self.out.clear();
                if self.out.capacity() > 4 * WRITE_BATCH {
                    self.out = BytesMut::with_capacity(4096);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(Close::Network(e.to_string())),
            Err(_) => Err(Close::WriteStalled),
        }
    }
}

fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::ConnAck(p, _) => Packet::ConnAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        other => other,
    }
}
