//! Consume: deliveries and their outcomes on one stream, in the spirit of
//! Pub/Sub's StreamingPull.
//!
//! Invariants: every request is answered exactly once, in request order;
//! the marks of every request read while a write is under way go together
//! in the next store call (one per group, not one per request, so a busy
//! stream costs a write per group); the stream is never leased more than
//! its `max_in_flight` unsettled deliveries (the dispatcher's flow control:
//! a mark as it comes in, a nack or an expiry frees a slot); when the
//! requests end (the client closed its side, or sent something that ends
//! the stream) nothing more is delivered, what was read is applied and
//! answered, and only then are the leases still held handed back, as when
//! a StreamPending stream ends.
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use serde_json::Value;

use super::{Bucket, Marked};
use crate::delivery::{Delivery, LeaseChange, LeaseToken, Subscription};
use crate::domain::FieldViolation;
use crate::domain::PacketId;
use crate::domain::batch::Batch;
use crate::domain::lease;
use crate::domain::mark::MarkRequest;
use crate::error::Error;

/// Items read but not yet applied, past which no more requests are read
/// (the client then waits on the transport's flow control).
const MAX_WAITING_ITEMS: usize = 4096;
/// Most deliveries sent in one response.
const MAX_DELIVERIES_PER_EVENT: usize = 256;

/// One request of a Consume stream, as the door read it.
#[derive(Debug, Default)]
pub struct ConsumeRequest {
    pub marks: Vec<StreamMark>,
    /// Lease tokens to hand back now.
    pub nacks: Vec<String>,
    /// Lease tokens whose leases last longer.
    pub extensions: Vec<String>,
    /// How long the extended leases last from now; 0: the stream's lease.
    pub extend_seconds: u32,
}

impl ConsumeRequest {
    fn items(&self) -> usize {
        self.marks.len() + self.nacks.len() + self.extensions.len()
    }
}

/// An outcome sent on the stream, naming its delivery by lease token.
#[derive(Debug, Clone, Default)]
pub struct StreamMark {
    pub lease_token: String,
    pub success: bool,
    pub karma_actions: Vec<Value>,
    pub error_message: Option<String>,
}

/// A recorded mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMarked {
    pub marked: Marked,
    /// The lease the token named had ended before the outcome was recorded.
    pub lease_ended: bool,
}

/// What became of one request's items, each list in request order.
#[derive(Debug, Default)]
pub struct Answer {
    pub marks: Vec<Result<StreamMarked, Error>>,
    pub nacks: Vec<Result<(PacketId, LeaseChange), Error>>,
    pub extensions: Vec<Result<(PacketId, LeaseChange), Error>>,
}

/// What a Consume stream sends: what is ready, together, so a mark's
/// answer and the delivery its freed slot let through go in one message.
#[derive(Debug, Default)]
pub struct ConsumeEvent {
    /// Packets now leased to the stream, in the order handed out.
    pub deliveries: Vec<Delivery>,
    /// The answer to the oldest request not yet answered.
    pub answer: Option<Answer>,
}

pub type ConsumeRequests = Pin<Box<dyn Stream<Item = Result<ConsumeRequest, Error>> + Send>>;
type Applying = Pin<Box<dyn Future<Output = Vec<Answer>> + Send>>;

impl Bucket {
    /// Subscribes as StreamPending does, and takes the stream's marks,
    /// nacks and extensions from `requests`. An `Err` among them ends the
    /// stream with that error once what came before it is answered.
    pub fn consume(
        self: &Arc<Self>,
        consumer: &str,
        max_in_flight: u32,
        lease_seconds: u32,
        requests: ConsumeRequests,
    ) -> Result<Consumption, Error> {
        let options = self.subscribe_options(consumer, max_in_flight, lease_seconds)?;
        let lease = options.lease;
        let subscription = self.dispatcher.subscribe(options)?;
        Ok(Consumption {
            bucket: self.clone(),
            subscription: Some(subscription),
            lease,
            requests: Some(requests),
            waiting: Vec::new(),
            waiting_items: 0,
            applying: None,
            answers: VecDeque::new(),
            ending: None,
            done: false,
        })
    }

    /// A request's lists within the batch limit, else why not.
    fn check_request(&self, request: &ConsumeRequest) -> Result<(), Error> {
        let violations: Vec<FieldViolation> = [
            (Batch::Marks, "marks", request.marks.len()),
            (Batch::LeaseTokens, "nack_lease_tokens", request.nacks.len()),
            (
                Batch::LeaseTokens,
                "extend_lease_tokens",
                request.extensions.len(),
            ),
        ]
        .into_iter()
        .filter_map(|(batch, field, len)| {
            batch
                .check(self.max_batch, len)
                .err()
                .map(|v| FieldViolation::new(field, v.description))
        })
        .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidInput(violations))
        }
    }

    /// Applies a group of requests: each one's nacks and extensions (in
    /// memory), then every mark of the group in one store call.
    async fn apply(
        self: Arc<Self>,
        requests: Vec<ConsumeRequest>,
        stream_lease: Duration,
    ) -> Vec<Answer> {
        let mut answers = Vec::with_capacity(requests.len());
        let mut marks = Vec::new();
        let mut tokens = Vec::new();
        // Per request: where its marks sit among `marks`, or their refusals.
        let mut parsed_marks = Vec::with_capacity(requests.len());
        for request in requests {
            let nacks = self.change(&request.nacks, None).await;
            let extensions =
                match lease::lease_seconds("extend_lease_seconds", request.extend_seconds) {
                    Ok(seconds) => {
                        let lease =
                            seconds.map_or(stream_lease, |s| Duration::from_secs(u64::from(s)));
                        self.change(&request.extensions, Some(lease)).await
                    }
                    Err(v) => request
                        .extensions
                        .iter()
                        .map(|_| Err(Error::InvalidInput(vec![v.clone()])))
                        .collect(),
                };
            let mine: Vec<Result<usize, Error>> = request
                .marks
                .into_iter()
                .map(|m| match LeaseToken::parse(&m.lease_token) {
                    None => Err(not_a_token()),
                    Some(token) => {
                        marks.push(MarkRequest {
                            packet_id: token.packet_id.text(),
                            success: m.success,
                            karma_actions: m.karma_actions,
                            error_message: m.error_message,
                        });
                        tokens.push(token);
                        Ok(marks.len() - 1)
                    }
                })
                .collect();
            parsed_marks.push(mine);
            answers.push(Answer {
                marks: Vec::new(),
                nacks,
                extensions,
            });
        }
        let mut recorded: Vec<Option<Result<(Marked, bool), Error>>> = if marks.is_empty() {
            Vec::new()
        } else {
            self.record_marks(marks, &tokens)
                .await
                .into_iter()
                .map(Some)
                .collect()
        };
        for (answer, mine) in answers.iter_mut().zip(parsed_marks) {
            answer.marks = mine
                .into_iter()
                .map(|at| {
                    let (marked, lease_ended) = recorded[at?].take().expect("each mark once")?;
                    Ok(StreamMarked {
                        marked,
                        lease_ended,
                    })
                })
                .collect();
        }
        answers
    }

    /// Nacks (`lease` None) or extends the leases `tokens` name.
    async fn change(
        &self,
        tokens: &[String],
        lease: Option<Duration>,
    ) -> Vec<Result<(PacketId, LeaseChange), Error>> {
        if tokens.is_empty() {
            return Vec::new();
        }
        let parsed: Vec<Option<LeaseToken>> = tokens.iter().map(|t| LeaseToken::parse(t)).collect();
        let valid: Vec<LeaseToken> = parsed.iter().flatten().cloned().collect();
        let mut changed = self
            .dispatcher
            .change_leases(&valid, lease)
            .await
            .into_iter();
        parsed
            .into_iter()
            .map(|token| match token {
                None => Err(not_a_token()),
                Some(t) => changed
                    .next()
                    .expect("one answer per valid token")
                    .map(|c| (t.packet_id, c)),
            })
            .collect()
    }
}

fn not_a_token() -> Error {
    Error::invalid(
        "lease_token",
        "not a lease token this server makes (deliveries carry them)",
    )
}

/// A Consume call's stream of events; see the module's invariants.
pub struct Consumption {
    bucket: Arc<Bucket>,
    /// Dropped (its leases handed back) when the stream ends.
    subscription: Option<Subscription>,
    /// The stream's lease, for extensions that do not say.
    lease: Duration,
    /// None once they ended.
    requests: Option<ConsumeRequests>,
    /// Read, not yet applied, in order.
    waiting: Vec<ConsumeRequest>,
    waiting_items: usize,
    /// The group being applied.
    applying: Option<Applying>,
    answers: VecDeque<Answer>,
    /// What ends the stream once everything read is answered.
    ending: Option<Error>,
    done: bool,
}

impl Consumption {
    /// Reads requests while there is room; an end or an error stops reading
    /// and delivering.
    fn read(&mut self, cx: &mut Context<'_>) {
        while self.waiting_items < MAX_WAITING_ITEMS
            && let Some(requests) = self.requests.as_mut()
        {
            let read = match requests.as_mut().poll_next(cx) {
                Poll::Pending => return,
                Poll::Ready(read) => read,
            };
            match read.map(|r| r.and_then(|r| self.bucket.check_request(&r).map(|()| r))) {
                Some(Ok(request)) => {
                    self.waiting_items += request.items().max(1);
                    self.waiting.push(request);
                }
                end => {
                    self.ending = end.and_then(Result::err);
                    self.requests = None;
                    if let Some(subscription) = &self.subscription {
                        subscription.pause();
                    }
                }
            }
        }
    }

    /// Drives the group being applied; starts the next from what waits.
    fn apply(&mut self, cx: &mut Context<'_>) {
        loop {
            if let Some(applying) = self.applying.as_mut() {
                match applying.as_mut().poll(cx) {
                    Poll::Pending => return,
                    Poll::Ready(answers) => {
                        self.answers.extend(answers);
                        self.applying = None;
                    }
                }
            }
            if self.waiting.is_empty() {
                return;
            }
            let group = std::mem::take(&mut self.waiting);
            self.waiting_items = 0;
            self.applying = Some(Box::pin(self.bucket.clone().apply(group, self.lease)));
        }
    }

    /// What the dispatcher handed the stream; the error that ends the
    /// stream (shutdown) comes after what came before it.
    fn deliveries(&mut self, cx: &mut Context<'_>) -> Vec<Delivery> {
        let mut batch = Vec::new();
        // Once the requests ended, what is still handed here goes back
        // with the stream's leases: nobody could mark it.
        let (Some(_), Some(subscription)) = (&self.requests, self.subscription.as_mut()) else {
            return batch;
        };
        while batch.len() < MAX_DELIVERIES_PER_EVENT {
            match Pin::new(&mut *subscription).poll_next(cx) {
                Poll::Ready(Some(Ok(delivery))) => batch.push(delivery),
                Poll::Ready(Some(Err(e))) => {
                    self.fail(e);
                    break;
                }
                // The dispatcher let the stream go without a word: it is
                // closed (shutdown) or lost; the client reconnects.
                Poll::Ready(None) => {
                    self.fail(Error::Unavailable(
                        "the bucket ended this stream; reconnect".into(),
                    ));
                    break;
                }
                Poll::Pending => break,
            }
        }
        batch
    }

    /// Ends the stream now with `e`: the dispatcher is done with it.
    fn fail(&mut self, e: Error) {
        self.requests = None;
        self.waiting.clear();
        self.applying = None;
        self.answers.clear();
        self.ending = Some(e);
    }
}

impl Stream for Consumption {
    type Item = Result<ConsumeEvent, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        this.read(cx);
        this.apply(cx);
        let answer = this.answers.pop_front();
        let deliveries = this.deliveries(cx);
        if answer.is_some() || !deliveries.is_empty() {
            return Poll::Ready(Some(Ok(ConsumeEvent { deliveries, answer })));
        }
        let settled = this.requests.is_none()
            && this.waiting.is_empty()
            && this.applying.is_none()
            && this.answers.is_empty();
        if !settled {
            return Poll::Pending;
        }
        this.done = true;
        this.subscription = None;
        Poll::Ready(this.ending.take().map(Err))
    }
}
