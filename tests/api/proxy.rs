//! A TCP proxy a test owns between a node and one of its stores, on
//! loopback: whatever the test does to the link (cut it, slow it) happens
//! to that node's connections alone, and the store itself stays up. Every
//! byte goes through unchanged and in order; a cut closes every connection
//! open at that moment and, until the link is mended, refuses or swallows
//! new ones; a delay holds each chunk, either way, for as long as the delay
//! in force when it was read. Memory is bounded per connection (a bounded
//! queue of chunks per direction), and every task ends with its connection
//! or with the proxy.
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a cut link does with a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Cut {
    /// Accepted and closed at once: the client hears of it.
    Refuse,
    /// Accepted and never answered, as a partition looks: the client
    /// hears nothing until its own timeout.
    BlackHole,
}

const OPEN: u8 = 0;
const REFUSE: u8 = 1;
const BLACK_HOLE: u8 = 2;

/// Read at most this much per chunk.
const CHUNK: usize = 16 * 1024;
/// Chunks waiting for their delay per direction: with [`CHUNK`], at most
/// 1 MiB held per direction of a connection.
const QUEUED_CHUNKS: usize = 64;
/// A link to the store that takes longer than this to open is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

struct Link {
    upstream: u16,
    state: AtomicU8,
    delay_ms: AtomicU64,
    /// Cancelled to close every connection it was handed to.
    generation: Mutex<CancellationToken>,
    /// Ends the accept loop and every connection.
    closed: CancellationToken,
}

impl Link {
    fn generation(&self) -> CancellationToken {
        self.generation.lock().unwrap().clone()
    }

    /// Closes every connection of the generation now ending.
    fn next_generation(&self) {
        let old = std::mem::replace(
            &mut *self.generation.lock().unwrap(),
            self.closed.child_token(),
        );
        old.cancel();
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
    }
}

pub(crate) struct Proxy {
    port: u16,
    link: Arc<Link>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port to `127.0.0.1:upstream`, the link open.
    pub(crate) async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the proxy");
        let port = listener.local_addr().unwrap().port();
        let closed = CancellationToken::new();
        let link = Arc::new(Link {
            upstream,
            state: AtomicU8::new(OPEN),
            delay_ms: AtomicU64::new(0),
            generation: Mutex::new(closed.child_token()),
            closed,
        });
        let accept = tokio::spawn(accept_loop(listener, link.clone()));
        Proxy { port, link, accept }
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Closes every open connection; new ones are refused or swallowed
    /// until [`Proxy::mend`].
    pub(crate) fn cut(&self, how: Cut) {
        let state = match how {
            Cut::Refuse => REFUSE,
            Cut::BlackHole => BLACK_HOLE,
        };
        self.link.state.store(state, Ordering::SeqCst);
        self.link.next_generation();
    }

    /// Opens the link again after a cut; the connections swallowed during
    /// it are closed (their clients gave up on them long ago).
    pub(crate) fn mend(&self) {
        self.link.state.store(OPEN, Ordering::SeqCst);
        self.link.next_generation();
    }

    /// Every chunk read from now on, on open connections too, waits this
    /// long before it is passed on (zero: none).
    pub(crate) fn set_delay(&self, delay: Duration) {
        self.link
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.link.closed.cancel();
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, link: Arc<Link>) {
    loop {
        let accepted = tokio::select! {
            _ = link.closed.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            // Out of descriptors, or the like: the next accept may work.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let generation = link.generation();
        match link.state.load(Ordering::SeqCst) {
            REFUSE => drop(client),
            BLACK_HOLE => {
                // Held unanswered until the link is mended or the proxy ends.
                tokio::spawn(async move {
                    generation.cancelled().await;
                    drop(client);
                });
            }
            _ => {
                tokio::spawn(relay(client, link.clone(), generation));
            }
        }
    }
}

/// One connection, both ways, until either side closes or its generation
/// ends.
async fn relay(client: TcpStream, link: Arc<Link>, generation: CancellationToken) {
    let connect = TcpStream::connect(("127.0.0.1", link.upstream));
    let upstream = tokio::select! {
        _ = generation.cancelled() => return,
        connected = tokio::time::timeout(CONNECT_TIMEOUT, connect) => match connected {
            Ok(Ok(upstream)) => upstream,
            // The store is down: the client sees its connection closed.
            _ => return,
        },
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    // Either direction ending ends both: neither store's protocol half-closes.
    tokio::select! {
        _ = generation.cancelled() => {}
        _ = pipe(client_read, upstream_write, &link) => {}
        _ = pipe(upstream_read, client_write, &link) => {}
    }
}

/// Copies `from` to `to`, each chunk held until its delay (fixed when it
/// was read) is over. A reader and a writer joined by a bounded queue, so
/// a delay adds latency without cutting throughput to a chunk per delay.
async fn pipe<R, W>(mut from: R, mut to: W, link: &Link)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let read = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = Instant::now() + link.delay();
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let mut write = std::pin::pin!(write);
    // A writer that failed ends the pipe even while the reader waits for
    // bytes; a reader that ended leaves the writer to drain what it read.
    tokio::select! {
        _ = &mut write => return,
        _ = read => {}
    }
    write.await;
}
