//! One StreamPending or Consume call's end of the dispatcher: the
//! deliveries handed to it, and (at shutdown) the error that ends it.
//! Dropped when the client goes away, which ends its leases at once.
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

use super::dispatcher::{Dispatcher, Sent};

pub struct Subscription {
    rx: mpsc::Receiver<Sent>,
    stream: u64,
    dispatcher: Arc<Dispatcher>,
}

impl Subscription {
    pub(super) fn new(rx: mpsc::Receiver<Sent>, stream: u64, dispatcher: Arc<Dispatcher>) -> Self {
        Subscription {
            rx,
            stream,
            dispatcher,
        }
    }

    /// Nothing more is handed to this stream; what it holds stays leased
    /// until marked, expired or dropped.
    pub fn pause(&self) {
        self.dispatcher.pause(self.stream);
    }
}

impl Stream for Subscription {
    type Item = Sent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Sent>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.dispatcher.unsubscribe(self.stream);
    }
}
