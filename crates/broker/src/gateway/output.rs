//! The output buffer: packets encoded for the client's protocol version, gathered until
//! one socket write, and shrunk again after a burst.

use super::close::Close;
use crate::codec::{codec_for, Version};
use crate::transport::Writer;
use bytes::BytesMut;
use rumqttd::protocol::{DisconnectReasonCode, Packet, Protocol};
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::futures::Notified;

/// Output gathered before one socket write.
pub(super) const WRITE_BATCH: usize = 64 * 1024;
/// A write that cannot make progress for this long means the client stopped reading.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// What an idle connection keeps allocated for its output.
const IDLE_CAPACITY: usize = 4096;

/// Encoded packets waiting for the socket.
pub(super) struct Output {
    buf: BytesMut,
    codec: Box<dyn Protocol + Send>,
    version: Version,
}

impl Output {
    pub(super) fn new(version: Version) -> Output {
        Output {
            // Allocated by the first packet: a device that stays idle never needs it, and
            // a buffer given back later stays resident in the allocator's free lists.
            buf: BytesMut::new(),
            codec: codec_for(version),
            version,
        }
    }

    /// Encodes `packet` at the end of the buffer; MQTT 5 properties are dropped for a
    /// 3.1.1 client (rumqttd's 3.1.1 encoder panics on them).
    pub(super) fn write(&mut self, packet: Packet) -> Result<(), Close> {
        let packet = match self.version {
            Version::V5 => packet,
            Version::V4 => strip_properties(packet),
        };
        self.codec
            .write(packet, &mut self.buf)
            .map(drop)
            .map_err(|_| Close::Protocol(DisconnectReasonCode::UnspecifiedError, "encode failed"))
    }

    /// Bytes waiting.
    pub(super) fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether another packet may join this write (the batch is not full).
    pub(super) fn has_room(&self) -> bool {
        self.buf.len() < WRITE_BATCH
    }

    /// The bytes written since `mark` (a former [`Output::len`]), to read back or patch.
    pub(super) fn since(&mut self, mark: usize) -> &mut [u8] {
        &mut self.buf[mark..]
    }

    /// Rewrites the QoS 1/2 PUBLISH written at `mark` (the last frame) as QoS 0;
    /// `false` if it does not parse (then it is left alone).
    pub(super) fn downgrade_to_qos0(&mut self, mark: usize) -> bool {
        crate::codec::downgrade_to_qos0(&mut self.buf, mark)
    }

    /// Takes back everything written since `mark`.
    pub(super) fn truncate(&mut self, mark: usize) {
        self.buf.truncate(mark);
    }

    /// Writes everything to the socket. Gives up if the client does not read for the
    /// write-stall time, or at once if a new connection takes the session over
    /// (`replaced` completes).
    /// Returns the bytes written.
    pub(super) async fn flush(
        &mut self,
        writer: &mut Writer,
        replaced: Pin<&mut Notified<'_>>,
    ) -> Result<usize, Close> {
        if self.buf.is_empty() {
            return Ok(0);
        }
        let written = tokio::select! {
            w = tokio::time::timeout(WRITE_STALL, writer.write_all(&self.buf)) => w,
            _ = replaced => return Err(Close::Replaced),
        };
        match written {
            Ok(Ok(())) => Ok(self.sent()),
            Ok(Err(e)) => Err(Close::Network(e.to_string())),
            Err(_) => Err(Close::WriteStalled),
        }
    }

    /// The buffer went out: empty it, and give back what a burst grew it to.
    fn sent(&mut self) -> usize {
        let n = self.buf.len();
        self.buf.clear();
        if self.buf.capacity() > 4 * WRITE_BATCH {
            self.buf = BytesMut::with_capacity(IDLE_CAPACITY);
        }
        n
    }

    /// An idle connection's buffer goes back if nothing waits in it.
    pub(super) fn trim(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// A last packet for the closing connection (its DISCONNECT), alone in the buffer.
    pub(super) fn last_words(&mut self, reason: DisconnectReasonCode) -> &[u8] {
        self.buf.clear();
        crate::codec::write_v5_disconnect(reason, &mut self.buf);
        &self.buf
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

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{PubAck, PubAckProperties, PubAckReason};

    fn puback(props: bool) -> Packet {
        let ack = PubAck {
            pkid: 7,
            reason: PubAckReason::NotAuthorized,
        };
        let props = props.then(|| PubAckProperties {
            reason_string: Some("no".into()),
            user_properties: Vec::new(),
        });
        Packet::PubAck(ack, props)
    }

    #[test]
    fn a_3_1_1_client_gets_no_mqtt_5_properties_or_reason_codes() {
        let mut v4 = Output::new(Version::V4);
        v4.write(puback(true)).unwrap();
        assert_eq!(v4.since(0), &[0x40, 2, 0, 7][..]);
        let mut v5 = Output::new(Version::V5);
        v5.write(puback(true)).unwrap();
        let bytes = v5.since(0).to_vec();
        assert_eq!(&bytes[..5], &[0x40, bytes[1], 0, 7, 0x87][..]);
        assert!(bytes.len() > 5, "the reason string is kept: {bytes:?}");
    }

    #[test]
    fn an_idle_buffer_goes_back_and_grows_again() {
        let mut out = Output::new(Version::V5);
        out.trim();
        assert_eq!(out.buf.capacity(), 0);
        out.write(puback(false)).unwrap();
        let waiting = out.len();
        assert!(waiting > 0);
        out.trim();
        assert_eq!(out.len(), waiting, "waiting bytes are kept");
    }

    #[test]
    fn a_burst_gives_its_memory_back_once_written() {
        let mut out = Output::new(Version::V5);
        while out.len() < 5 * WRITE_BATCH {
            out.write(puback(true)).unwrap();
        }
        assert!(!out.has_room());
        let mark = out.len();
        out.write(puback(false)).unwrap();
        out.truncate(mark);
        assert_eq!(out.len(), mark);
        assert_eq!(out.sent(), mark);
        assert_eq!(out.len(), 0);
        assert!(
            out.buf.capacity() <= IDLE_CAPACITY,
            "{}",
            out.buf.capacity()
        );
    }
}
