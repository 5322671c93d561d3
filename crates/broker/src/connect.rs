//! The first packet of a connection: read the CONNECT, decide who the client is, open
//! its router link and answer with a CONNACK.
//!
//! Every refusal gets a CONNACK with the reason code of the client's protocol version
//! (rumqttd's own listeners close without one) and then the connection is closed.

use crate::admit::{may_write, Source};
use crate::codec::{announced_length, codec_for, first_packet, FirstPacket, Version};
use crate::event::Event;
use crate::gateway::{ClientLimits, Gateway, SessionPart};
use crate::policy::{Attempt, AuthFailure, Identity};
use crate::router::router_client_id;
use crate::session_expiry;
use crate::sessions::{Filters, SessionHold, SessionQuota};
use crate::shared::{ConnInfo, Shared};
use crate::transport::{Reader, Writer};
use crate::will::Will;
use bytes::BytesMut;
use moatmq_store::SessionKey;
use rumqttd::protocol::{ConnAck, ConnAckProperties, ConnectReturnCode, Packet, PublishProperties};
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

/// Why a connection ended before it was established.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error("no CONNECT within the connect timeout")]
    Timeout,
    #[error("connection closed before CONNECT")]
    Closed,
    #[error("first packet is not an MQTT CONNECT")]
    NotConnect,
    #[error("unsupported protocol level {0}")]
    UnsupportedLevel(u8),
    #[error("malformed CONNECT: {0}")]
    Malformed(String),
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the CONNECT, authenticates and, on success, runs the gateway until the
/// connection ends.
pub async fn handle(
    shared: Arc<Shared>,
    info: ConnInfo,
    reader: Reader,
    writer: Writer,
) -> Result<(), ConnectFailure> {
    // The login's futures (CONNECT read, password check, router link) are large and
    // needed only until the CONNACK: boxed, an idle connection does not keep their room
    // in its task for the rest of its life (docs/benchmarks.md, idle connections).
    let client = Box::pin(login(shared.clone(), info, reader, writer)).await?;
    client.serve(&shared).await;
    Ok(())
}

/// A client past its CONNACK, ready to be served.
struct LoggedIn {
    gateway: Box<Gateway>,
    reader: Reader,
    writer: Writer,
    /// What the client sent after its CONNECT.
    buf: BytesMut,
    /// The session's router client id, held for this connection.
    hold: SessionHold,
    /// The cluster's record that this node holds the session (released with `hold`).
    owner: Option<crate::cluster::OwnerClaim>,
    router_id: String,
    /// The session's key if it outlives the connection (the gateway says how long).
    key: Option<SessionKey>,
}

impl LoggedIn {
    /// Runs the gateway until the connection ends, then lets the session go.
    async fn serve(self, shared: &Arc<Shared>) {
        let ended = self.gateway.run(self.reader, self.writer, self.buf).await;
        let kept_for = ended.kept_for;
        // The link is torn down. The session's end is settled while this connection
        // still holds its client id, so a client waiting to come back (the hold) finds
        // it as it is: gone if it ended with the connection (an MQTT 5 DISCONNECT with
        // expiry 0), else kept with its expiry running, which a held id skips and the
        // returning client cancels.
        // In a cluster a persistent session taken over by another node goes on there,
        // and one kept here is handed over at a later claim (cluster/handoff.rs).
        let handed = match (&self.owner, &self.key) {
            (Some(claim), Some(key))
                if claim.moved().is_some() || kept_for.is_some_and(|a| !a.is_zero()) =>
            {
                crate::cluster::handoff::settle(shared, claim, &self.router_id, key).await
            }
            _ => false,
        };
        match (kept_for, self.key) {
            _ if handed => {}
            (Some(after), Some(key)) if after.is_zero() => {
                session_expiry::discard(shared, &self.router_id, &key).await;
            }
            (Some(after), Some(key)) => {
                session_expiry::expire_after(shared, &self.router_id, key, after);
            }
            _ => {}
        }
        // A session that ended with its connection leaves the cluster's ownership bucket
        // (one kept here stays there until it expires: `session_expiry::discard`).
        if let (Some(claim), false, Some(after)) = (&self.owner, handed, kept_for) {
            if after.is_zero() {
                claim.release().await;
            }
        }
        let pause = settled_pause();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        drop(self.owner);
        drop(self.hold);
        // After the session is settled (a returning client need not wait), before the
        // connection's slots are released (returning ends `serve_one`, which holds them).
        if let Some(reader) = ended.linger {
            crate::gateway::linger(reader).await;
        }
    }
}

/// A pause between a connection's session being settled and the connection letting
/// its claim and client id go: none, or with the `test-hooks` feature the milliseconds
/// in `MOATMQ_TEST_SETTLED_PAUSE_MS`, so that a test can have another node claim the
/// session then.
fn settled_pause() -> std::time::Duration {
    static HOOKED: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    crate::hooks::hooked(
        &HOOKED,
        "MOATMQ_TEST_SETTLED_PAUSE_MS",
        std::time::Duration::ZERO,
    )
}

/// Everything up to and including the CONNACK.
async fn login(
    shared: Arc<Shared>,
    info: ConnInfo,
    mut reader: Reader,
    mut writer: Writer,
) -> Result<LoggedIn, ConnectFailure> {
    let mut buf = BytesMut::with_capacity(1024);
    let (version, packet) = tokio::time::timeout_at(
        info.deadline,
        read_connect(&shared, &mut reader, &mut writer, &mut buf),
    )
    .await
    .map_err(|_| ConnectFailure::Timeout)??;
    let Packet::Connect(connect, props, will, will_props, mut login) = packet else {
        return Err(ConnectFailure::NotConnect);
    };
    let protocol = version.name();
    let claimed = login.as_ref().map(|l| l.username.clone());
    shared.emit(
        &info.who(Some(&connect.client_id), claimed.as_deref()),
        Event::Connect { protocol },
    );
    if info.rate_limited {
        shared.emit(
            &info.who(Some(&connect.client_id), None),
            Event::RateLimited {
                limit: "connections_per_second",
                audited: true,
            },
        );
        refuse(&mut writer, version, Refusal::RateLimited).await;
        return Err(ConnectFailure::Refused("connection rate exceeded"));
    }

    // Enhanced authentication (4.12) is not supported: a client that asked for it must
    // not be let in on some other basis (MQTT-4.12.0-1: 0x8C and close).
    if let Some(method) = props
        .as_ref()
        .and_then(|p| p.authentication_method.as_ref())
    {
        debug!(method, "enhanced authentication asked for");
        refuse(&mut writer, version, Refusal::AuthMethod).await;
        return Err(ConnectFailure::Refused("unsupported authentication method"));
    }

    // 3.1.2.11.3, 3.1.2.11.4: zero is not a Receive Maximum or a Maximum Packet Size
    // (taken at its word, the latter would drop every message to the client).
    if props
        .as_ref()
        .is_some_and(|p| p.receive_maximum == Some(0) || p.max_packet_size == Some(0))
    {
        refuse(&mut writer, version, Refusal::Protocol).await;
        return Err(ConnectFailure::Refused(
            "receive maximum or maximum packet size of 0",
        ));
    }

    let limits = &shared.config.limits;
    let mut client_id = connect.client_id.clone();
    let mut assigned = None;
    if client_id.is_empty() {
        if version == Version::V4 && !connect.clean_session {
            // MQTT-3.1.3-8: a zero-length id needs a clean session.
            refuse(&mut writer, version, Refusal::ClientId).await;
            return Err(ConnectFailure::Refused(
                "empty client id without clean session",
            ));
        }
        client_id = format!("auto-{:016x}", rand::random::<u64>());
        assigned = Some(client_id.clone());
    }
    if client_id.len() > limits.max_client_id_length || client_id.contains('\0') {
        refuse(&mut writer, version, Refusal::ClientId).await;
        return Err(ConnectFailure::Refused("client id too long or invalid"));
    }
    // limits.max_keepalive (Mosquitto's max_keepalive): MQTT 5 clients are told the
    // server keep alive (3.2.2.3.14); 3.1.1 cannot be told, so it is refused (0x02).
    let max_keepalive = limits.max_keepalive;
    let over_max =
        max_keepalive < u16::MAX && (connect.keep_alive == 0 || connect.keep_alive > max_keepalive);
    let server_keep_alive = match (over_max, version) {
        (false, _) => None,
        (true, Version::V5) => Some(max_keepalive),
        (true, Version::V4) => {
            refuse(&mut writer, version, Refusal::ClientId).await;
            return Err(ConnectFailure::Refused(
                "keep alive over limits.max_keepalive",
            ));
        }
    };
    let keep_alive = server_keep_alive.unwrap_or(connect.keep_alive);

    // A cluster node that cannot reach NATS could not route this client's messages to
    // the other nodes, nor theirs to it: the client is better served by another node.
    if shared.cluster.is_some() && !shared.metrics.cluster_ready() {
        refuse(&mut writer, version, Refusal::Unavailable).await;
        return Err(ConnectFailure::Refused(
            "cluster: NATS is unreachable or its state not loaded",
        ));
    }
    let attempt = Attempt {
        listener: &info.listener,
        peer: info.peer.ip(),
        username: login.as_ref().map(|l| l.username.as_str()),
        password: login.as_ref().map(|l| l.password.as_str()),
        cert_identity: info.cert_identity.as_deref(),
    };
    let authenticate = shared.policy.authenticate(&attempt);
    // A client that hangs up while its login waits (for its address's slot, its delay
    // or the hashing pool) gives its place up: dropping the check frees the slot and
    // the pool skips it. What it sent meanwhile stays in `buf` for the gateway.
    let verdict = tokio::select! {
        verdict = authenticate => verdict,
        () = hung_up(&mut reader, &mut buf, limits.max_packet_size) => {
            debug!(peer = %info.peer, "client closed the connection during its login");
            return Err(ConnectFailure::Closed);
        }
    };
    // The password is no longer needed: wipe the decoder's copy of it.
    if let Some(l) = login.as_mut() {
        zeroize::Zeroize::zeroize(&mut l.password);
    }
    let username = match verdict {
        Ok(u) => u,
        Err(AuthFailure::Busy) => {
            // Not a failed login: the password was never checked.
            shared.emit(
                &info.who(Some(&client_id), claimed.as_deref()),
                Event::LoginBusy {
                    reason: &AuthFailure::Busy.reason(),
                },
            );
            refuse(&mut writer, version, Refusal::Busy).await;
            return Err(ConnectFailure::Refused("server busy"));
        }
        Err(failure) => {
            let refusal = match failure {
                AuthFailure::BadCredentials => Refusal::BadCredentials,
                AuthFailure::NotAuthorized | AuthFailure::UsernameNotCertificateCn { .. } => {
                    Refusal::NotAuthorized
                }
                AuthFailure::Busy => Refusal::Busy,
            };
            shared.emit(
                &info.who(Some(&client_id), claimed.as_deref()),
                Event::AuthFailure {
                    reason: &failure.reason(),
                },
            );
            refuse(&mut writer, version, refusal).await;
            return Err(ConnectFailure::Refused("authentication failed"));
        }
    };
    let identity = Identity {
        username,
        client_id,
    };

    let will = match will {
        None => None,
        Some(w) => {
            let topic = std::str::from_utf8(&w.topic).unwrap_or("");
            if !crate::topic::valid_topic_name(topic, limits.max_topic_levels) {
                refuse(&mut writer, version, Refusal::TopicInvalid).await;
                return Err(ConnectFailure::Refused("invalid will topic"));
            }
            if !may_write(&shared, &info, &identity, Source::Will, topic) {
                refuse(&mut writer, version, Refusal::NotAuthorized).await;
                return Err(ConnectFailure::Refused("will topic not authorized"));
            }
            let delay = will_props
                .as_ref()
                .and_then(|p| p.delay_interval)
                .unwrap_or(0);
            // MQTT-3.1.3-9 and 3.1.3.2: the will's properties travel with the message.
            let properties = will_props.map(|p| PublishProperties {
                payload_format_indicator: p.payload_format_indicator,
                message_expiry_interval: p.message_expiry_interval,
                topic_alias: None,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                user_properties: p.user_properties,
                subscription_identifiers: Vec::new(),
                content_type: p.content_type,
            });
            Some(Will {
                will: w,
                v5: version == Version::V5,
                properties,
                delay: Duration::from_secs(delay.into()),
                owner: identity.clone(),
                info: info.clone(),
            })
        }
    };

    // How long the session outlives this connection. rumqttd keeps a persistent session
    // forever and knows only "clean or not": the gateway expires sessions itself.
    let requested = props.as_ref().and_then(|p| p.session_expiry_interval);
    let max_expiry = limits.max_session_expiry;
    let keep_for = match version {
        Version::V4 => (!connect.clean_session).then_some(max_expiry),
        // 0xFFFFFFFF means "never": capped like any other value.
        Version::V5 => Some(u64::from(requested.unwrap_or(0)).min(max_expiry)),
    };
    let keep_for = keep_for.filter(|&secs| secs > 0 || !connect.clean_session);
    let router_id = router_client_id(identity.username.as_deref(), &identity.client_id);
    // A connection still holding this session closes first, tearing its link down in
    // order: rumqttd's own takeover can panic the router (sessions.rs).
    let Some(hold) = shared.sessions.hold(&router_id, TAKEOVER_WAIT).await else {
        tracing::warn!(client_id = %identity.client_id, "previous connection did not close in time");
        refuse(&mut writer, version, Refusal::Unavailable).await;
        return Err(ConnectFailure::Refused(
            "session still held by another connection",
        ));
    };
    // A persistent session must fit the user's cap on this node before it is claimed:
    // a claim takes it from the node holding it (cluster/handoff.rs), and a session
    // moved in past the cap would go around `limits.max_sessions_per_user`.
    if keep_for.is_some()
        && !shared.sessions.within_quota(
            &router_id,
            identity.username.as_deref(),
            shared.config.limits.max_sessions_per_user,
        )
    {
        return Err(refuse_session_quota(&shared, &info, &identity, &mut writer, version).await);
    }
    // In a cluster, the node holding the session's connection elsewhere closes it when
    // it sees this claim (cluster/owner.rs); without the claim, no CONNACK.
    let owner = match &shared.cluster {
        None => None,
        Some(cluster) => match cluster
            .claim(&router_id, keep_for.is_some(), hold.kicked.clone())
            .await
        {
            Ok(claim) => Some(claim),
            Err(e) => {
                tracing::warn!(client_id = %identity.client_id, reason = %e.0, "session ownership not recorded");
                refuse(&mut writer, version, Refusal::Unavailable).await;
                return Err(ConnectFailure::Refused("session ownership not recorded"));
            }
        },
    };
    let will_waited = shared.delayed_wills.cancel(&router_id);
    if let Some(claim) = &owner {
        // A will of the session waiting in the cluster (here or on the node it came
        // from) is not published: the client is back (cluster/wills.rs).
        if will_waited || claim.from_elsewhere {
            crate::cluster::wills::cancel(&shared, &router_id).await;
        }
    }
    session_expiry::cancel(&shared, &router_id);
    let session_key = SessionKey {
        owner: identity.username.clone(),
        client_id: identity.client_id.clone(),
    };
    // A persistent session last held on another node: that node hands it over first.
    if let (Some(cluster), Some(claim)) = (&shared.cluster, &owner) {
        if claim.from_elsewhere && keep_for.is_some() && !connect.clean_session {
            let seal = cluster.owners.seal();
            let received =
                crate::cluster::handoff::receive(&shared, seal, claim, &router_id, &session_key)
                    .await;
            let parked = match received {
                crate::cluster::handoff::Received::TimedOut => Some(None),
                crate::cluster::handoff::Received::Parked(parked) => Some(Some(parked)),
                _ => None,
            };
            if let (Some(parked), Some(_)) = (parked, &shared.durable) {
                cluster
                    .late
                    .wait(&claim.key, &router_id, &session_key, claim.revision, parked);
            }
        }
    }
    if connect.clean_session && keep_for.is_some() {
        // MQTT 5 clean start with a session kept afterwards: discard the old one first.
        session_expiry::discard(&shared, &router_id, &session_key).await;
    }
    let router_clean = keep_for.is_none();
    // A clean session whose id the router keeps nothing under opens its link only when
    // it first sends the router something (`gateway/link.rs`): until then the router has
    // nothing to give it (no subscriptions, no queue) and nothing to take from it.
    let mut lazy = router_clean;
    // What moatmq keeps of the session: a clean link makes the router drop it.
    let kept_filters = if router_clean {
        // A persistent session kept under this id is dropped by a clean link, now.
        lazy = !shared.sessions.forget(&router_id);
        if let Some(book) = &shared.durable {
            book.remove(&session_key);
        }
        Filters::new()
    } else {
        match shared.sessions.resume(
            &router_id,
            identity.username.as_deref(),
            limits.max_sessions_per_user,
        ) {
            Ok(filters) => filters,
            Err(SessionQuota) => {
                return Err(
                    refuse_session_quota(&shared, &info, &identity, &mut writer, version).await,
                );
            }
        }
    };
    let (link, session_present) = if lazy {
        // A clean session is never present (MQTT-3.2.2-2, MQTT 5 3.2.2.1.1).
        (None, false)
    } else {
        let (tx, rx, ack) = match shared.router.connect(router_id.clone(), router_clean).await {
            Ok(link) => link,
            Err(e) => {
                tracing::error!(error = %e, "router link failed");
                refuse(&mut writer, version, Refusal::Unavailable).await;
                return Err(ConnectFailure::Refused("router unavailable"));
            }
        };
        let present = match Option::<Packet>::from(ack) {
            Some(Packet::ConnAck(ack, _)) => ack.session_present && !connect.clean_session,
            _ => false,
        };
        (Some((tx, rx)), present)
    };
    let session = SessionPart {
        persistent: !router_clean,
        kicked: hold.kicked.clone(),
        late: hold.late.clone(),
        subscriptions: if session_present {
            kept_filters
        } else {
            Filters::new()
        },
        expiry: keep_for.unwrap_or(0),
        key: shared
            .durable
            .as_ref()
            .and(keep_for)
            .map(|_| session_key.clone()),
        moved: owner.as_ref().map(|claim| claim.moved_flag()),
    };
    // A persistent session's stored messages from before a restart are replayed first.
    // On a cluster node its live park (`cluster/park.rs`) names where the node's traffic
    // stood before it resumed: what came after, the router's and not in the park, is
    // read from the transfer stream by a node that takes the park (this one dead)
    // before the connection's first checkpoint (`gateway/checkpoint.rs`).
    let resumed = match (&shared.durable, &session.key) {
        (Some(book), Some(key)) => {
            let cut = shared.cluster.as_ref().map(|c| c.cut_here());
            let resumed = book.resume(key, session.meta(version)).await;
            if let Some(cut) = cut {
                book.checkpoint(key, cut);
            }
            resumed
        }
        _ => Default::default(),
    };
    let connack_props = match version {
        Version::V4 => None,
        Version::V5 => Some(ConnAckProperties {
            // Announce the cap when it shortens what the client asked for.
            session_expiry_interval: requested
                .filter(|&r| u64::from(r) > max_expiry)
                .map(|_| u32::try_from(max_expiry).unwrap_or(u32::MAX)),
            receive_max: Some(limits.max_inflight),
            max_qos: None,
            retain_available: Some(1),
            max_packet_size: u32::try_from(limits.max_packet_size).ok(),
            assigned_client_identifier: assigned,
            topic_alias_max: Some(limits.max_topic_alias),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            // Not for persistent sessions: see Gateway::check_filter.
            shared_subscription_available: Some(u8::from(router_clean)),
            server_keep_alive,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        }),
    };
    let connack = Packet::ConnAck(
        ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        },
        connack_props,
    );
    let mut out = BytesMut::new();
    codec_for(version)
        .write(connack, &mut out)
        .map_err(|e| ConnectFailure::Malformed(e.to_string()))?;
    writer.write_all(&out).await?;
    info.established();
    let method = match (&info.cert_identity, &identity.username) {
        (Some(_), _) => "certificate",
        (None, Some(_)) => "password",
        (None, None) => "anonymous",
    };
    shared.emit(
        &info.client(&identity),
        Event::AuthSuccess { method, protocol },
    );

    let client = ClientLimits {
        max_packet_size: props.as_ref().and_then(|p| p.max_packet_size),
        receive_maximum: props.as_ref().and_then(|p| p.receive_maximum),
        topic_alias_max: props.as_ref().and_then(|p| p.topic_alias_max),
    };
    let key = keep_for.map(|_| session_key);
    let gateway = Box::new(Gateway::new(
        shared.clone(),
        info,
        version,
        identity,
        router_id.clone(),
        link,
        will,
        keep_alive,
        client,
        session,
        resumed,
    ));
    if buf.is_empty() {
        // Nothing followed the CONNECT: the buffer goes back now, to be taken by the
        // next login, rather than after the idle trim, when a fleet's worth of them
        // would stay resident (docs/benchmarks.md, idle connections).
        buf = BytesMut::new();
    }
    Ok(LoggedIn {
        gateway,
        reader,
        writer,
        buf,
        hold,
        owner,
        router_id,
        key,
    })
}

/// Returns once the client has closed its side (or the connection failed). Reads into
/// `buf` meanwhile, up to `max` bytes, then only waits.
async fn hung_up(reader: &mut Reader, buf: &mut BytesMut, max: usize) {
    while buf.len() < max {
        match reader.read(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending::<()>().await;
}

/// How long a new connection waits for the previous holder of its session to close.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// Reads until a whole CONNECT is buffered and decodes it with the right codec.
async fn read_connect(
    shared: &Shared,
    reader: &mut Reader,
    writer: &mut Writer,
    buf: &mut BytesMut,
) -> Result<(Version, Packet), ConnectFailure> {
    let max = shared.config.limits.max_packet_size;
    loop {
        // An announced length over the limit is refused before waiting for its bytes.
        if announced_length(buf).is_some_and(|len| len > max) {
            return Err(ConnectFailure::Malformed(
                "CONNECT larger than max_packet_size".into(),
            ));
        }
        match first_packet(buf) {
            FirstPacket::Incomplete => {}
            FirstPacket::NotConnect => return Err(ConnectFailure::NotConnect),
            FirstPacket::Connect { level } => {
                let version = match level {
                    4 => Version::V4,
                    5 => Version::V5,
                    other => {
                        // MQTT-3.1.2-2: answer 0x01 in 3.1.1 form, which older clients read.
                        refuse(writer, Version::V4, Refusal::ProtocolVersion).await;
                        return Err(ConnectFailure::UnsupportedLevel(other));
                    }
                };
                match codec_for(version).read_mut(buf, max) {
                    Ok(packet) => return Ok((version, packet)),
                    Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
                    Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(_)) => {
                        refuse(writer, version, Refusal::TooLarge).await;
                        return Err(ConnectFailure::Malformed("CONNECT too large".into()));
                    }
                    Err(e) => {
                        refuse(writer, version, Refusal::Malformed).await;
                        return Err(ConnectFailure::Malformed(e.to_string()));
                    }
                }
            }
        }
        if reader.read(buf).await? == 0 {
            return Err(ConnectFailure::Closed);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Refusal {
    ProtocolVersion,
    ClientId,
    BadCredentials,
    NotAuthorized,
    Unavailable,
    Busy,
    TopicInvalid,
    TooLarge,
    Malformed,
    RateLimited,
    SessionQuota,
    AuthMethod,
    Protocol,
}

/// A persistent session over `limits.max_sessions_per_user`: audited, refused.
async fn refuse_session_quota(
    shared: &Shared,
    info: &ConnInfo,
    identity: &Identity,
    writer: &mut Writer,
    version: Version,
) -> ConnectFailure {
    shared.emit(
        &info.client(identity),
        Event::SessionRefused {
            limit: "max_sessions_per_user",
        },
    );
    refuse(writer, version, Refusal::SessionQuota).await;
    ConnectFailure::Refused("too many persistent sessions")
}

/// Sends a refusing CONNACK (best effort) and closes.
async fn refuse(writer: &mut Writer, version: Version, refusal: Refusal) {
    use ConnectReturnCode as C;
    let code = match (version, refusal) {
        (Version::V4, Refusal::ProtocolVersion) | (_, Refusal::ProtocolVersion) => {
            C::RefusedProtocolVersion
        }
        (Version::V4, Refusal::ClientId) => C::ClientIdentifierNotValid,
        (Version::V4, Refusal::BadCredentials) => C::BadUserNamePassword,
        (Version::V4, Refusal::NotAuthorized) => C::NotAuthorized,
        (Version::V4, Refusal::Unavailable | Refusal::Busy | Refusal::SessionQuota) => {
            C::ServiceUnavailable
        }
        // 3.1.1 has no code for these: close without a CONNACK (MQTT-3.2.2-4 allows it).
        (
            Version::V4,
            Refusal::TopicInvalid
            | Refusal::TooLarge
            | Refusal::Malformed
            | Refusal::RateLimited
            | Refusal::AuthMethod
            | Refusal::Protocol,
        ) => {
            writer.shutdown().await;
            return;
        }
        (Version::V5, Refusal::ClientId) => C::ClientIdentifierNotValid,
        (Version::V5, Refusal::BadCredentials) => C::BadUserNamePassword,
        (Version::V5, Refusal::NotAuthorized) => C::NotAuthorized,
        (Version::V5, Refusal::Unavailable) => C::ServerUnavailable,
        (Version::V5, Refusal::Busy) => C::ServerBusy,
        (Version::V5, Refusal::TopicInvalid) => C::TopicNameInvalid,
        (Version::V5, Refusal::TooLarge) => C::PacketTooLarge,
        (Version::V5, Refusal::Malformed) => C::MalformedPacket,
        (Version::V5, Refusal::RateLimited) => C::ConnectionRateExceeded,
        (Version::V5, Refusal::SessionQuota) => C::QuotaExceeded,
        (Version::V5, Refusal::AuthMethod) => C::BadAuthenticationMethod,
        (Version::V5, Refusal::Protocol) => C::ProtocolError,
    };
    let props = (version == Version::V5).then(ConnAckProperties::default);
    let packet = Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        props,
    );
    let mut out = BytesMut::new();
    if codec_for(version).write(packet, &mut out).is_ok() {
        let _ = writer.write_all(&out).await;
    }
    debug!(?refusal, "connection refused");
    writer.shutdown().await;
}
