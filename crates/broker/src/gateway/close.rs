//! Why a connection ended, as one stable snake_case word for logs, audit events and
//! metrics consumers ([`Close::as_str`]), plus free text for people ([`Close::detail`]).
//!
//! The words are an interface: docs/operating.md lists them and operators alert on
//! them, so a variant's word never changes. Closes that carry an MQTT 5 reason code use
//! the specification's name for it (`keep_alive_timeout`, `message_rate_too_high`, ...).

use rumqttd::protocol::DisconnectReasonCode;

/// Why the connection loop stopped.
#[derive(Debug)]
pub(crate) enum Close {
    /// The client sent DISCONNECT (with any reason but 0x00 the will is still published).
    ClientDisconnect { with_will: bool },
    /// The client closed the socket without a DISCONNECT.
    ClientClosed,
    /// The socket failed (the OS error).
    Network(String),
    /// The client stopped reading: a write made no progress for the write-stall time.
    WriteStalled,
    /// We close the connection; MQTT 5 clients get a DISCONNECT with this reason.
    Protocol(DisconnectReasonCode, &'static str),
    /// The router dropped the link (it stopped, or a bug let it take the session over).
    TakenOver,
    /// A new connection for the same session asked this one to close (`sessions.rs`).
    Replaced,
    /// The broker is shutting down.
    Shutdown,
}

impl Close {
    /// The stable reason word.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Close::ClientDisconnect { with_will: false } => "client_disconnect",
            Close::ClientDisconnect { with_will: true } => "client_disconnect_with_will",
            Close::ClientClosed => "connection_closed",
            Close::Network(_) => "network_error",
            Close::WriteStalled => "client_not_reading",
            Close::Protocol(code, _) => reason_code_name(*code),
            Close::TakenOver => "router_link_lost",
            Close::Replaced => "session_taken_over",
            Close::Shutdown => "server_shutting_down",
        }
    }

    /// What exactly happened, for people; not stable, absent where the word says it all.
    pub(crate) fn detail(&self) -> Option<&str> {
        match self {
            Close::Network(e) => Some(e),
            Close::Protocol(_, text) => Some(text),
            _ => None,
        }
    }
}

/// The MQTT 5 specification's name of a DISCONNECT reason code, in snake_case.
pub(crate) fn reason_code_name(code: DisconnectReasonCode) -> &'static str {
    use DisconnectReasonCode as C;
    match code {
        C::NormalDisconnection => "normal_disconnection",
        C::DisconnectWithWillMessage => "disconnect_with_will_message",
        C::UnspecifiedError => "unspecified_error",
        C::MalformedPacket => "malformed_packet",
        C::ProtocolError => "protocol_error",
        C::ImplementationSpecificError => "implementation_specific_error",
        C::NotAuthorized => "not_authorized",
        C::ServerBusy => "server_busy",
        C::ServerShuttingDown => "server_shutting_down",
        C::KeepAliveTimeout => "keep_alive_timeout",
        C::SessionTakenOver => "session_taken_over",
        C::TopicFilterInvalid => "topic_filter_invalid",
        C::TopicNameInvalid => "topic_name_invalid",
        C::ReceiveMaximumExceeded => "receive_maximum_exceeded",
        C::TopicAliasInvalid => "topic_alias_invalid",
        C::PacketTooLarge => "packet_too_large",
        C::MessageRateTooHigh => "message_rate_too_high",
        C::QuotaExceeded => "quota_exceeded",
        C::AdministrativeAction => "administrative_action",
        C::PayloadFormatInvalid => "payload_format_invalid",
        C::RetainNotSupported => "retain_not_supported",
        C::QoSNotSupported => "qos_not_supported",
        C::UseAnotherServer => "use_another_server",
        C::ServerMoved => "server_moved",
        C::SharedSubscriptionNotSupported => "shared_subscription_not_supported",
        C::ConnectionRateExceeded => "connection_rate_exceeded",
        C::MaximumConnectTime => "maximum_connect_time",
        C::SubscriptionIdentifiersNotSupported => "subscription_identifiers_not_supported",
        C::WildcardSubscriptionsNotSupported => "wildcard_subscriptions_not_supported",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_snake_case_words_without_debug_text() {
        let closes = [
            Close::ClientDisconnect { with_will: false },
            Close::ClientDisconnect { with_will: true },
            Close::ClientClosed,
            Close::Network("Connection reset by peer (os error 104)".into()),
            Close::WriteStalled,
            Close::Protocol(DisconnectReasonCode::KeepAliveTimeout, "keep alive timeout"),
            Close::Protocol(DisconnectReasonCode::MessageRateTooHigh, "publish rate"),
            Close::TakenOver,
            Close::Shutdown,
        ];
        for c in &closes {
            let word = c.as_str();
            assert!(
                !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{c:?}: {word}"
            );
        }
        assert_eq!(closes[0].as_str(), "client_disconnect");
        assert_eq!(closes[5].as_str(), "keep_alive_timeout");
        assert_eq!(closes[6].as_str(), "message_rate_too_high");
        assert_eq!(
            closes[3].detail(),
            Some("Connection reset by peer (os error 104)")
        );
    }
}
