//! MQTT 3.1.1 framing on a byte stream, with rumqttc's packet parser (`mqttbytes::v4`).
//! A client that spoke MQTT 5 or 3.1 in its CONNECT is read and written through `v5`'s
//! translations, so what leaves this module is always 3.1.1.
//!
//! The parser refuses a remaining length over the limit as soon as the fixed header is in, so an
//! absurd length field costs five bytes, not a buffer of that size. [`FrameReader::next`] is
//! cancel-safe (bytes read stay in its buffer), so it can sit in a `select!` beside timers.

use bytes::BytesMut;
use rumqttc::mqttbytes::{self, v4::Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::Reason;
use crate::v5::{self, Codec, Incoming, Origin, Version};

/// Why a stream stopped yielding packets.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The peer closed the stream in the middle of a packet.
    Truncated,
    /// A remaining length over the limit.
    Oversized(usize),
    /// Not MQTT 3.1.1.
    Malformed(mqttbytes::Error),
    /// Not MQTT 5, or an MQTT 5 packet the broker does not serve (AUTH, a topic alias).
    Protocol(String),
    /// The socket failed.
    Io(std::io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => f.write_str("connection closed in the middle of a packet"),
            Self::Oversized(n) => write!(f, "packet of {n} bytes is over the limit"),
            Self::Malformed(e) => write!(f, "malformed packet: {e}"),
            Self::Protocol(e) => write!(f, "MQTT 5: {e}"),
            Self::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

impl FrameError {
    /// The reason a connection closed for this error is counted under.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            Self::Oversized(_) => Reason::Oversized,
            Self::Truncated | Self::Malformed(_) | Self::Protocol(_) | Self::Io(_) => {
                Reason::Malformed
            }
        }
    }
}

/// One side of a connection: its read and write halves, the reader's buffer, and a buffer for
/// writing packets, which the handshake and then the relay use in turn.
pub(crate) struct Framed<R, W> {
    pub(crate) rd: R,
    pub(crate) wr: W,
    pub(crate) reader: FrameReader,
    pub(crate) scratch: BytesMut,
    /// How to write for the peer's MQTT version (3.1.1 until a client's CONNECT says otherwise).
    pub(crate) codec: Codec,
}

impl<R, W> Framed<R, W> {
    /// Reads packets of at most `max` bytes of remaining length from `rd`.
    pub(crate) fn new(rd: R, wr: W, max: usize) -> Self {
        Self {
            rd,
            wr,
            reader: FrameReader::new(max),
            scratch: BytesMut::new(),
            codec: Codec::new(Version::V311, None),
        }
    }
}

impl<R, W: AsyncWrite + Unpin> Framed<R, W> {
    /// Writes one packet to this client, in its MQTT version.
    pub(crate) async fn send(&mut self, packet: &Packet, origin: Origin) -> std::io::Result<()> {
        write_to_client(&mut self.wr, packet, &self.codec, origin, &mut self.scratch).await
    }
}

/// Reads whole packets of at most `max` bytes of remaining length.
pub(crate) struct FrameReader {
    buffer: BytesMut,
    max: usize,
    version: Version,
}

impl FrameReader {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buffer: BytesMut::with_capacity(1024),
            max,
            version: Version::V311,
        }
    }

    /// The next packet (as 3.1.1), or `Ok(None)` when the peer ended without a DISCONNECT that
    /// drops its will: it closed the stream between packets, or (MQTT 5) sent DISCONNECT 0x04.
    pub(crate) async fn next<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
    ) -> Result<Option<Packet>, FrameError> {
        loop {
            match self.parse() {
                Ok(Some(Incoming::Packet(packet))) => return Ok(Some(packet)),
                Ok(Some(Incoming::DisconnectWithWill)) => return Ok(None),
                Ok(Some(Incoming::Violation(why))) => {
                    return Err(FrameError::Protocol(why.to_owned()));
                }
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            if self.buffer.capacity() - self.buffer.len() < 512 {
                self.buffer.reserve(4096);
            }
            let read = stream
                .read_buf(&mut self.buffer)
                .await
                .map_err(FrameError::Io)?;
            if read == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// One whole packet from the buffer, if there is one, translated to 3.1.1.
    fn parse(&mut self) -> Result<Option<Incoming>, FrameError> {
        if self.version == Version::V5 {
            return match v5::read(&mut self.buffer, self.max) {
                Ok(packet) => Ok(Some(v5::incoming(packet))),
                Err(v5::ReadError::Incomplete) => Ok(None),
                Err(v5::ReadError::Oversized(n)) => Err(FrameError::Oversized(n)),
                Err(v5::ReadError::Malformed(e)) => Err(FrameError::Protocol(e)),
            };
        }
        match Packet::read(&mut self.buffer, self.max) {
            Ok(packet) => Ok(Some(Incoming::Packet(packet))),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => Err(FrameError::Oversized(n)),
            Err(e) => Err(FrameError::Malformed(e)),
        }
    }

    /// After [`Self::first`] found an MQTT 3.1 CONNECT: rewrites it to 3.1.1 (see
    /// [`v5::v31_connect_to_v311`]); false if it was not one.
    pub(crate) fn accept_v31(&mut self) -> bool {
        let rewritten = v5::v31_connect_to_v311(&mut self.buffer);
        if rewritten {
            self.version = Version::V31;
        }
        rewritten
    }

    /// After [`Self::first`] found an MQTT 5 CONNECT: takes it (whole, with its will and
    /// login), and reads the client's later packets as MQTT 5.
    pub(crate) fn take_v5_connect(
        &mut self,
    ) -> Result<rumqttc::v5::mqttbytes::v5::Packet, FrameError> {
        self.version = Version::V5;
        match v5::read(&mut self.buffer, self.max) {
            Ok(packet) => Ok(packet),
            Err(v5::ReadError::Incomplete) => Err(FrameError::Truncated),
            Err(v5::ReadError::Oversized(n)) => Err(FrameError::Oversized(n)),
            Err(v5::ReadError::Malformed(e)) => Err(FrameError::Protocol(e)),
        }
    }

    /// Waits for the first whole packet and tells its MQTT protocol level if it is a CONNECT:
    /// 4 is 3.1.1, 3 is 3.1 (`MQIsdp`), 5 is MQTT 5. Read before parsing, because rumqttc's v4
    /// parser would misread an MQTT 5 CONNECT. The packet stays buffered for [`Self::next`].
    pub(crate) async fn first<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
    ) -> Result<First, FrameError> {
        loop {
            // A CONNECT's first byte is exactly 0x10: anything else is refused at once, not after
            // waiting for the length it claims (`GET / HTTP/1.1` would claim 69 bytes).
            if self.buffer.first().is_some_and(|b| *b != 0x10) {
                return Ok(First::NotConnect);
            }
            match mqttbytes::check(self.buffer.iter(), self.max) {
                Ok(_) => {
                    return Ok(match connect_level(&self.buffer) {
                        Some(level) => First::Connect(level),
                        None => First::NotConnect,
                    });
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => {
                    return Err(FrameError::Oversized(n));
                }
                Err(e) => return Err(FrameError::Malformed(e)),
            }
            let read = stream
                .read_buf(&mut self.buffer)
                .await
                .map_err(FrameError::Io)?;
            if read == 0 {
                return if self.buffer.is_empty() {
                    Ok(First::Closed)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }
}

/// What a connection sent first.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum First {
    /// Nothing: it closed.
    Closed,
    /// A CONNECT with this protocol level.
    Connect(u8),
    /// Some other packet (a protocol violation).
    NotConnect,
}

/// The protocol level byte of a complete CONNECT frame at the start of `frame`.
fn connect_level(frame: &[u8]) -> Option<u8> {
    if frame.first()? >> 4 != 1 {
        return None;
    }
    let length_bytes = frame.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let header = 1 + length_bytes;
    let name_len = usize::from(u16::from_be_bytes([
        *frame.get(header)?,
        *frame.get(header + 1)?,
    ]));
    frame.get(header + 2 + name_len).copied()
}

/// Writes one packet to a client, in the client's MQTT version (see `v5`).
pub(crate) async fn write_to_client<W: AsyncWrite + Unpin>(
    stream: &mut W,
    packet: &Packet,
    codec: &Codec,
    origin: Origin,
    scratch: &mut BytesMut,
) -> std::io::Result<()> {
    scratch.clear();
    codec
        .encode(packet, origin, scratch)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    stream.write_all(scratch).await?;
    stream.flush().await
}

/// Writes one packet; `scratch` is reused between calls to avoid an allocation per packet.
pub(crate) async fn write<W: AsyncWrite + Unpin>(
    stream: &mut W,
    packet: &Packet,
    scratch: &mut BytesMut,
) -> std::io::Result<()> {
    scratch.clear();
    packet
        .write(scratch, usize::MAX)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    stream.write_all(scratch).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::{Connect, Publish};

    use super::*;

    fn bytes_of(packet: &Packet) -> Vec<u8> {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, usize::MAX).unwrap();
        buf.to_vec()
    }

    #[tokio::test]
    async fn reads_packets_split_anywhere() {
        let mut publish = Publish::new("k3sense/pi-1/state", QoS::AtLeastOnce, "{}");
        publish.pkid = 7;
        let publish = Packet::Publish(publish);
        let mut wire = bytes_of(&Packet::PingReq);
        wire.extend(bytes_of(&publish));
        for split in 0..wire.len() {
            let (mut a, mut b) = tokio::io::duplex(64);
            let (first, second) = wire.split_at(split);
            let (first, second) = (first.to_vec(), second.to_vec());
            let writer = tokio::spawn(async move {
                a.write_all(&first).await.unwrap();
                tokio::task::yield_now().await;
                a.write_all(&second).await.unwrap();
            });
            let mut reader = FrameReader::new(1024);
            assert_eq!(reader.next(&mut b).await.unwrap(), Some(Packet::PingReq));
            assert_eq!(reader.next(&mut b).await.unwrap(), Some(publish.clone()));
            writer.await.unwrap();
            assert!(reader.next(&mut b).await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn refuses_absurd_lengths_garbage_and_truncation() {
        let mut reader = FrameReader::new(1024);
        let mut absurd: &[u8] = &[0x30, 0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(
            reader.next(&mut absurd).await,
            Err(FrameError::Oversized(268_435_455))
        ));
        let mut reader = FrameReader::new(1024);
        let mut five_length_bytes: &[u8] = &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(matches!(
            reader.next(&mut five_length_bytes).await,
            Err(FrameError::Malformed(_))
        ));
        let mut reader = FrameReader::new(1024);
        let mut garbage: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert!(reader.next(&mut garbage).await.is_err());
        let mut reader = FrameReader::new(1024);
        let mut truncated: &[u8] = &[0x30, 0x10, 0x00, 0x03, b'a'];
        assert!(matches!(
            reader.next(&mut truncated).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn tells_the_protocol_level_of_a_connect() {
        let wire = bytes_of(&Packet::Connect(Connect::new("c")));
        let mut reader = FrameReader::new(1024);
        assert_eq!(
            reader.first(&mut &wire[..]).await.unwrap(),
            First::Connect(4)
        );
        assert!(matches!(
            reader.next(&mut &[][..]).await,
            Ok(Some(Packet::Connect(_)))
        ));
        let mut v5 = wire.clone();
        v5[2 + 2 + 4] = 5;
        let mut reader = FrameReader::new(1024);
        assert_eq!(reader.first(&mut &v5[..]).await.unwrap(), First::Connect(5));
        let mut reader = FrameReader::new(1024);
        let ping = bytes_of(&Packet::PingReq);
        assert_eq!(
            reader.first(&mut &ping[..]).await.unwrap(),
            First::NotConnect
        );
        let mut reader = FrameReader::new(1024);
        assert_eq!(reader.first(&mut &[][..]).await.unwrap(), First::Closed);
    }
}
