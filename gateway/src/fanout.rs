//! The write side of every WebSocket client, shared by the fan-out and the client's session.
//!
//! An update is framed once, as one [`Bytes`] buffer (a server's frames are not masked, so the
//! bytes are the same for every client), and the fan-out tasks (`crate::dispatch`) write that
//! buffer — or several updates joined in one, when they queued up — straight to each client's
//! socket with one non-blocking `write`: no task wake-up, no copy, no per-client encoding. Only a
//! client whose socket is full gets the buffer queued (a reference, not a copy) and its session
//! woken to finish the write when the socket drains; one with `--client-queue` frames or more
//! waiting is marked as lagging, and its session disconnects it.
//!
//! Every write to a client, the session's own pings, pongs and close frames included, goes
//! through its [`Client::push`] under one small lock, so frames never interleave on the wire.

use std::{
    collections::VecDeque,
    future::poll_fn,
    io,
    pin::Pin,
    sync::{Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};
use tungstenite::protocol::frame::{
    Frame,
    coding::{Data, OpCode},
};

/// A client's connection: the upgraded HTTP connection in the gateway, a plain socket in tests.
pub trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}

/// One WebSocket client's connection and its pending writes.
pub struct Client {
    inner: Mutex<Inner>,
    /// Wakes the session: a write is pending, the client lags, or the connection failed.
    wake: Notify,
    /// Most data frames queued before the client counts as lagging.
    queue_limit: usize,
}

struct Inner {
    io: Box<dyn Socket>,
    pending: VecDeque<Chunk>,
    /// Frames in `pending`: what `--client-queue` bounds.
    queued: usize,
    /// Bytes of `pending[0]` already written.
    written: usize,
    /// Bytes written since the start: what tells progress from a stuck socket.
    total: u64,
    lagged: bool,
    failed: bool,
}

/// Bytes to write and how many frames they hold (the fan-out writes several updates as one
/// buffer when it is behind).
struct Chunk {
    bytes: Bytes,
    frames: usize,
}

/// What the session must do after being woken.
#[derive(Debug, PartialEq, Eq)]
pub enum Pending {
    /// Nothing is waiting.
    Nothing,
    /// Bytes wait for room in the socket.
    Bytes,
    /// The client fell more than `--client-queue` frames behind.
    Lagged,
    /// A write failed: the client is gone.
    Failed,
}

/// Why [`Client::drain`] gave up.
#[derive(Debug, PartialEq, Eq)]
pub enum DrainError {
    /// The connection failed: the client is gone.
    Failed,
    /// The socket took nothing for the whole wait: the client stopped reading.
    Stuck,
    /// The client fell more than `--client-queue` frames behind meanwhile.
    Lagged,
}

impl Client {
    /// A client on `io`, lagging once more than `queue_limit` frames wait.
    pub fn new(io: impl Socket + 'static, queue_limit: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                io: Box::new(io),
                pending: VecDeque::new(),
                queued: 0,
                written: 0,
                total: 0,
                lagged: false,
                failed: false,
            }),
            wake: Notify::new(),
            queue_limit: queue_limit.max(1),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // The state is plain buffers and flags; a panic elsewhere cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one data frame: written at once if the socket has room, else queued (by reference)
    /// for the session. Returns whether the client takes it (not lagging or gone).
    pub fn push_data(&self, frame: &Bytes) -> bool {
        self.push_frames(frame, 1)
    }

    /// Sends `frames` data frames held in one buffer, as [`Client::push_data`] does one. A client
    /// with `--client-queue` frames or more waiting takes nothing more: it lags.
    pub fn push_frames(&self, bytes: &Bytes, frames: usize) -> bool {
        let mut inner = self.inner();
        if inner.lagged || inner.failed {
            return false;
        }
        if inner.queued >= self.queue_limit {
            inner.lagged = true;
            drop(inner);
            self.wake.notify_one();
            return false;
        }
        self.push_locked(&mut inner, bytes.clone(), frames);
        true
    }

    /// Sends bytes that must go out whatever the queue holds: control frames (ping, pong, close).
    pub fn push_control(&self, bytes: Bytes) {
        let mut inner = self.inner();
        if !inner.failed {
            self.push_locked(&mut inner, bytes, 1);
        }
    }

    /// Marks the client as lagging (the fan-out is further behind than any client may be); its
    /// session disconnects it.
    pub fn lag(&self) {
        self.inner().lagged = true;
        self.wake.notify_one();
    }

    fn push_locked(&self, inner: &mut Inner, bytes: Bytes, frames: usize) {
        inner.queued += frames;
        inner.pending.push_back(Chunk { bytes, frames });
        if inner.pending.len() == 1 {
            // Nothing was waiting, so nobody waits for room: write now, from this thread, without
            // waking anyone. (The no-op waker is never needed: if the socket is full, the session
            // is woken below and waits for room with its own.)
            inner.write(&mut Context::from_waker(Waker::noop()));
            if inner.pending.is_empty() && !inner.failed {
                return;
            }
        }
        self.wake.notify_one();
    }

    /// Writes what it can of the queue now, and says what is left to do.
    pub fn flush(&self) -> Pending {
        let mut inner = self.inner();
        inner.write(&mut Context::from_waker(Waker::noop()));
        if inner.failed {
            Pending::Failed
        } else if inner.lagged {
            Pending::Lagged
        } else if inner.pending.is_empty() {
            Pending::Nothing
        } else {
            Pending::Bytes
        }
    }

    /// Writes the whole queue, waiting for room as needed; each wait for room is bounded by
    /// `no_progress` (frames added meanwhile are not progress; bytes written are). `Err` if the
    /// connection failed or stayed full that long. (Used to deliver the last frames, a close
    /// frame, to a client that lagged.)
    pub async fn drain(&self, no_progress: Duration) -> Result<(), DrainError> {
        self.write_out(no_progress, false).await
    }

    /// [`Client::drain`] for a live session: also gives up as soon as the client lags.
    pub async fn drain_live(&self, no_progress: Duration) -> Result<(), DrainError> {
        self.write_out(no_progress, true).await
    }

    async fn write_out(&self, no_progress: Duration, until_lagged: bool) -> Result<(), DrainError> {
        let mut deadline = tokio::time::Instant::now() + no_progress;
        loop {
            let before = self.progress();
            let step = poll_fn(|cx| {
                let mut inner = self.inner();
                inner.write(cx);
                if inner.failed {
                    Poll::Ready(Err(DrainError::Failed))
                } else if until_lagged && inner.lagged {
                    Poll::Ready(Err(DrainError::Lagged))
                } else if inner.pending.is_empty() {
                    Poll::Ready(Ok(true))
                } else if inner.total != before {
                    Poll::Ready(Ok(false))
                } else {
                    Poll::Pending
                }
            });
            // The fan-out wakes the session when the client lags: look again then.
            let step = async {
                tokio::select! {
                    step = step => Some(step),
                    () = self.wake.notified(), if until_lagged => None,
                }
            };
            match tokio::time::timeout_at(deadline, step).await {
                Ok(Some(Ok(true))) => return Ok(()),
                // Some bytes went out: the clock starts again.
                Ok(Some(Ok(false))) => deadline = tokio::time::Instant::now() + no_progress,
                Ok(Some(Err(e))) => return Err(e),
                // Woken: a frame was added (not progress) or the client lags.
                Ok(None) => {}
                Err(_) => return Err(DrainError::Stuck),
            }
        }
    }

    fn progress(&self) -> u64 {
        self.inner().total
    }

    /// Waits until the fan-out or a control write needs the session.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Stops taking data frames: the session is ending.
    pub fn retire(&self) {
        self.inner().lagged = true;
    }

    /// Reads from the connection (the session's WebSocket reads go through here).
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.inner();
        Pin::new(&mut inner.io).poll_read(cx, buf)
    }
}

impl Inner {
    /// Writes queued bytes until the queue is empty or the socket is full (then `cx` is woken
    /// when it has room).
    fn write(&mut self, cx: &mut Context<'_>) {
        while let Some(front) = self.pending.front() {
            let rest = &front.bytes[self.written..];
            match Pin::new(&mut self.io).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return self.fail(),
                Poll::Ready(Ok(n)) => {
                    let whole = n == rest.len();
                    self.written += n;
                    self.total += n as u64;
                    if whole {
                        let frames = front.frames;
                        self.pending.pop_front();
                        self.queued -= frames;
                        self.written = 0;
                    }
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(_)) => return self.fail(),
                Poll::Pending => return,
            }
        }
    }

    fn fail(&mut self) {
        self.failed = true;
        self.pending.clear();
        self.queued = 0;
        self.written = 0;
    }
}

/// A text message framed for every client at once.
pub fn text_frame(text: &str) -> Bytes {
    format(Frame::message(
        Bytes::copy_from_slice(text.as_bytes()),
        OpCode::Data(Data::Text),
        true,
    ))
}

/// A frame as bytes on the wire.
pub fn format(frame: Frame) -> Bytes {
    let mut buf = Vec::with_capacity(frame.len());
    // Writing into a Vec cannot fail.
    let _ = frame.format(&mut buf);
    Bytes::from(buf)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use std::sync::Arc;

    use tokio::{
        io::AsyncReadExt,
        net::{TcpSocket, TcpStream},
        task::JoinHandle,
    };

    use super::*;

    /// A connected pair on loopback; the server side's send buffer and the peer's receive
    /// buffer are small and fixed before connecting (no autotuning), so a peer that stops
    /// reading fills them soon.
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpSocket::new_v4().unwrap();
        listener.set_send_buffer_size(4096).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(8).unwrap();
        let peer = TcpSocket::new_v4().unwrap();
        peer.set_recv_buffer_size(4096).unwrap();
        let peer = peer.connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (server, peer)
    }

    #[test]
    fn a_text_frame_is_unmasked_with_the_right_length_encoding() {
        let short = text_frame("hi");
        assert_eq!(&short[..], b"\x81\x02hi");
        let medium = text_frame(&"x".repeat(300));
        assert_eq!(&medium[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(medium.len(), 4 + 300);
    }

    #[tokio::test]
    async fn frames_are_written_at_once_and_in_order() {
        let (server, mut peer) = pair().await;
        let client = Client::new(server, 4);
        assert!(client.push_data(&text_frame("one")));
        client.push_control(Bytes::from_static(b"\x89\x00"));
        assert!(client.push_data(&text_frame("two")));
        assert_eq!(client.flush(), Pending::Nothing);
        let mut got = vec![0; 12];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], b"\x81\x03one\x89\x00\x81\x03two");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_queued_then_marked_lagging() {
        let (server, mut peer) = pair().await;
        let client = Client::new(server, 3);
        let big = text_frame(&"x".repeat(60_000));
        let mut taken = 0;
        while client.push_data(&big) {
            taken += 1;
            assert!(taken < 1000, "never lagged");
        }
        assert_eq!(client.flush(), Pending::Lagged);
        assert!(
            !client.push_data(&big),
            "a lagging client takes nothing more"
        );
        // What was taken is still delivered, whole and in order, once the peer reads.
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).await.unwrap();
            all.len()
        });
        client.drain(Duration::from_secs(5)).await.unwrap();
        drop(client);
        assert_eq!(reader.await.unwrap(), taken * big.len());
    }

    /// A full socket, and a task that keeps adding small frames to it.
    async fn fed_while_full(queue_limit: usize) -> (Arc<Client>, TcpStream, JoinHandle<()>) {
        let (server, peer) = pair().await;
        let client = Arc::new(Client::new(server, queue_limit));
        let big = text_frame(&"x".repeat(60_000));
        while client.flush() != Pending::Bytes {
            client.push_data(&big);
        }
        let fed = Arc::clone(&client);
        let feeder = tokio::spawn(async move {
            let small = text_frame("y");
            loop {
                fed.push_data(&small);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        (client, peer, feeder)
    }

    #[tokio::test]
    async fn frames_added_while_waiting_are_not_progress() {
        let (client, _peer, feeder) = fed_while_full(1_000_000).await;
        assert_eq!(
            client.drain(Duration::from_millis(200)).await,
            Err(DrainError::Stuck)
        );
        feeder.abort();
    }

    #[tokio::test]
    async fn a_live_drain_ends_when_the_client_lags() {
        let (client, _peer, feeder) = fed_while_full(20).await;
        assert_eq!(
            client.drain_live(Duration::from_secs(30)).await,
            Err(DrainError::Lagged)
        );
        feeder.abort();
    }

    #[tokio::test]
    async fn a_full_socket_that_never_drains_is_stuck() {
        let (server, _peer) = pair().await;
        let client = Client::new(server, 1_000_000);
        let big = text_frame(&"x".repeat(60_000));
        while client.flush() != Pending::Bytes {
            client.push_data(&big);
        }
        assert_eq!(
            client.drain(Duration::from_millis(100)).await,
            Err(DrainError::Stuck)
        );
    }
}
