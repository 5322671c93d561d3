//! The WebSocket side of a `ws` listener: which upgrade requests are accepted (path list,
//! `mqtt` subprotocol) and how large a frame or message may be before login.

use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Room for the MQTT fixed header (up to 5 bytes) around a packet of `max_packet_size`
/// remaining length, rounded up generously.
const WS_OVERHEAD: usize = 1024;

/// WebSocket limits from `max_packet_size`: tungstenite's defaults (16 MiB frames,
/// 64 MiB messages) let one unauthenticated connection make the broker buffer 64 MiB.
/// A message may carry several MQTT packets (MQTT 5 section 6), but a client that needs
/// more than one packet's worth per message is sending what the broker would refuse.
pub fn config(max_packet_size: usize) -> WebSocketConfig {
    let limit = max_packet_size.saturating_add(WS_OVERHEAD);
    WebSocketConfig {
        max_frame_size: Some(limit),
        max_message_size: Some(limit),
        ..WebSocketConfig::default()
    }
}

/// Accepts a WebSocket upgrade on one of `paths` (`"*"` = any), answering with the
/// `mqtt` subprotocol (MQTT 5 section 6: the client must offer it).
#[allow(clippy::result_large_err)] // the error type is tungstenite's callback signature
pub fn accept(
    paths: &[String],
    req: &Request,
    mut resp: Response,
) -> Result<Response, ErrorResponse> {
    let path = req.uri().path();
    if !paths.iter().any(|p| p == "*" || p == path) {
        let mut err = ErrorResponse::new(Some("no MQTT on this path".into()));
        *err.status_mut() = StatusCode::NOT_FOUND;
        return Err(err);
    }
    let offers_mqtt = req
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
    if !offers_mqtt {
        let mut err = ErrorResponse::new(Some("Sec-WebSocket-Protocol: mqtt required".into()));
        *err.status_mut() = StatusCode::BAD_REQUEST;
        return Err(err);
    }
    resp.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    Ok(resp)
}
