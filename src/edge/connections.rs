//! Every connection the node accepts, and how long it may stay: at most
//! `BUCKET_MAX_CONNECTIONS` open at once (one more is closed at accept),
//! a first request within `BUCKET_PREFACE_TIMEOUT` of the connection (of
//! the TLS handshake's end, with TLS), and no longer than
//! `BUCKET_IDLE_TIMEOUT` without a request under way. A thousand sockets
//! that send nothing, or stop inside the HTTP/2 preface, were held open for
//! good before.
//!
//! Writes wait one turn while other requests on the connection are under
//! way: answers that finish together (a commit group's acks wake them all
//! at once) then leave in one write instead of one each. With tokio's LIFO
//! slot, the connection's task would otherwise run, and write, right after
//! each answer's task.
//!
//! The timers live in the connection's reads: a connection past its
//! deadline fails its next read, and hyper closes it. Whether a request is
//! under way is told by the edge layer (`Peer::request`), which sees every
//! request and holds a guard until its answer's body ends, so a long
//! stream (StreamPending) is never idle. The maximum age is tonic's
//! (`max_connection_age`, a graceful GOAWAY, then the grace).
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpIncoming};

/// A client that opens a connection and never finishes its TLS handshake
/// is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How connections are held.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// From accept (or the handshake's end) to the first request; None: no limit.
    pub preface: Option<Duration>,
    /// Without a request under way; None: no limit.
    pub idle: Option<Duration>,
}

/// What one connection's requests tell its timers.
#[derive(Debug)]
struct Activity {
    started: Instant,
    /// Requests whose answers have not ended.
    active: AtomicUsize,
    /// A request was seen: the preface deadline is over.
    served: AtomicBool,
    /// When the last request ended, in ms after `started`.
    quiet_since_ms: AtomicU64,
}

/// The caller's end of a connection, for the edge layer: its address
/// (rate limits, the loopback check) and its activity.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    activity: Arc<Activity>,
}

/// Held by a request until its answer ends.
#[derive(Debug)]
pub struct UnderWay(Arc<Activity>);

impl Peer {
    /// A request starts on this connection.
    pub fn request(&self) -> UnderWay {
        self.activity.served.store(true, Ordering::Relaxed);
        self.activity.active.fetch_add(1, Ordering::AcqRel);
        UnderWay(self.activity.clone())
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        let quiet = self.0.started.elapsed().as_millis();
        self.0
            .quiet_since_ms
            .store(u64::try_from(quiet).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    /// When this connection should be closed, seen at `now`; None: keep it
    /// (until `now + recheck`).
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if !self.served.load(Ordering::Relaxed) {
            return limits.preface.map(|p| self.started + p);
        }
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let quiet = Duration::from_millis(self.quiet_since_ms.load(Ordering::Relaxed));
        limits.idle.map(|idle| self.started + quiet + idle)
    }
}

/// A TCP or TLS stream.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection: its stream, its timer and its place among the
/// open ones (given back when it closes).
pub struct Connection {
    io: Io,
    peer: Peer,
    limits: ConnectionLimits,
    // Boxed so the connection is Unpin, as hyper wants its streams.
    timer: Pin<Box<Sleep>>,
    /// This flush's write has waited its turn.
    waited: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Connection {
    /// Whether a write should wait one turn first: once per flush, and only
    /// while another request is under way (its answer may be about to
    /// join). Waking the task before Pending puts it at the back of the
    /// worker's run queue, behind the answers already woken.
    fn wait_a_turn(&mut self, cx: &mut Context<'_>) -> bool {
        if self.waited || self.peer.activity.active.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.waited = true;
        cx.waker().wake_by_ref();
        true
    }
}

impl Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let read = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if read.is_ready() {
            return read;
        }
        // Nothing to read: is this connection past its deadline? A request
        // that ended may have brought it forward (the preface deadline was
        // set, the idle one is sooner); one under way moves it on when the
        // timer fires.
        if let Some(at) = this.peer.activity.deadline(&this.limits)
            && at < this.timer.deadline()
        {
            this.timer.as_mut().reset(at);
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match this.peer.activity.deadline(&this.limits) {
                Some(at) if at <= now => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connection idle past its limit",
                    )));
                }
                Some(at) => this.timer.as_mut().reset(at),
                None => this.timer.as_mut().reset(now + recheck(&this.limits)),
            }
        }
        Poll::Pending
    }
}

/// How often a connection with a request under way looks again.
fn recheck(limits: &ConnectionLimits) -> Duration {
    limits
        .idle
        .or(limits.preface)
        .unwrap_or(Duration::from_secs(3600))
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.wait_a_turn(cx) {
            return Poll::Pending;
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.wait_a_turn(cx) {
            return Poll::Pending;
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let flushed = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        };
        if flushed.is_ready() {
            this.waited = false;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections from `tcp`, over TLS when `tls` is set (each handshake
/// on its own task, so a slow one never holds up the next client). Ends
/// when the server stops listening (drops the returned stream).
pub fn incoming(
    mut tcp: TcpIncoming,
    tls: Option<Arc<ServerConfig>>,
    limits: ConnectionLimits,
) -> impl Stream<Item = std::io::Result<Connection>> {
    let acceptor = tls.map(TlsAcceptor::from);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = tcp.next() => accepted,
            };
            let stream = match accepted {
                Some(Ok(stream)) => stream,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
                None => return,
            };
            let Ok(permit) = open.clone().try_acquire_owned() else {
                // Closed at once: the client learns now, and may try
                // another node, instead of waiting in the backlog.
                tracing::debug!(
                    max = limits.max_connections,
                    "connection refused: this node holds its most connections"
                );
                continue;
            };
            let addr = stream.peer_addr().ok();
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let io = match acceptor {
                    None => Io::Plain(stream),
                    Some(acceptor) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        {
                            Ok(Ok(tls)) => Io::Tls(Box::new(tls)),
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let started = Instant::now();
                let activity = Arc::new(Activity {
                    started,
                    active: AtomicUsize::new(0),
                    served: AtomicBool::new(false),
                    quiet_since_ms: AtomicU64::new(0),
                });
                let first = activity
                    .deadline(&limits)
                    .unwrap_or(started + recheck(&limits));
                let connection = Connection {
                    io,
                    peer: Peer { addr, activity },
                    limits,
                    timer: Box::pin(tokio::time::sleep_until(first)),
                    waited: false,
                    _permit: permit,
                };
                let _ = tx.send(Ok(connection)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activity() -> Activity {
        Activity {
            started: Instant::now(),
            active: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            quiet_since_ms: AtomicU64::new(0),
        }
    }

    const LIMITS: ConnectionLimits = ConnectionLimits {
        max_connections: 1,
        preface: Some(Duration::from_secs(10)),
        idle: Some(Duration::from_secs(120)),
    };

    #[test]
    fn the_deadline_follows_the_requests() {
        let a = Arc::new(activity());
        let peer = Peer {
            addr: None,
            activity: a.clone(),
        };
        assert_eq!(
            a.deadline(&LIMITS),
            Some(a.started + Duration::from_secs(10))
        );
        let under_way = peer.request();
        assert_eq!(a.deadline(&LIMITS), None, "busy: never idle");
        drop(under_way);
        let idle_end = a.deadline(&LIMITS).unwrap();
        assert!(idle_end >= a.started + Duration::from_secs(120));
        let off = ConnectionLimits {
            idle: None,
            ..LIMITS
        };
        assert_eq!(a.deadline(&off), None);
    }

    /// Counts its wakes: a write that returns Pending must have woken its
    /// task, or the connection would hang.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn a_write_waits_one_turn_while_other_requests_are_under_way() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let peer = Peer {
            addr: None,
            activity: Arc::new(activity()),
        };
        let mut conn = Connection {
            io: Io::Plain(server),
            peer: peer.clone(),
            limits: LIMITS,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(60))),
            waited: false,
            _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
        };
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut conn = Pin::new(&mut conn);

        // Nothing else under way: written at once.
        assert!(matches!(
            conn.as_mut().poll_write(&mut cx, b"one"),
            Poll::Ready(Ok(3))
        ));
        assert!(conn.as_mut().poll_flush(&mut cx).is_ready());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);

        // Another request under way: one turn's wait (woken), then written,
        // and every write until the flush goes at once.
        let _under_way = peer.request();
        assert!(conn.as_mut().poll_write(&mut cx, b"two").is_pending());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
        assert!(matches!(
            conn.as_mut().poll_write(&mut cx, b"two"),
            Poll::Ready(Ok(3))
        ));
        let bufs = [std::io::IoSlice::new(b"three")];
        assert!(matches!(
            conn.as_mut().poll_write_vectored(&mut cx, &bufs),
            Poll::Ready(Ok(5))
        ));
        assert!(conn.as_mut().poll_flush(&mut cx).is_ready());
        // The next flush's first write waits again.
        assert!(conn.as_mut().poll_write(&mut cx, b"four").is_pending());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
        assert!(conn.as_mut().poll_write(&mut cx, b"four").is_ready());

        let mut got = [0u8; 15];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwothreefour");
    }
}
