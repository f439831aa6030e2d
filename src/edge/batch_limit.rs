//! A request's list is refused at its first item over `BUCKET_MAX_BATCH`,
//! before prost builds a single item: the gRPC body is walked as it
//! streams in (frame headers, then the message's top-level tags and
//! lengths), counting the listed field's occurrences without copying or
//! allocating, and the body ends with INVALID_ARGUMENT when the count goes
//! over. Without this, a 4 MiB IngestBatch of 2,000,000 empty packets
//! (`0a 00` repeated) was decoded whole (~600 MB per call) before its
//! length was checked.
//!
//! Sits inside the gRPC-web layer, so it sees gRPC framing for both.
//! A compressed message (the bucket enables no compression, so tonic
//! refuses it) and a malformed one (prost refuses it) pass uncounted.
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use http::Request;
use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::domain::batch::Batch;
use crate::error::Error;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The list a method's request carries: its top-level field number and
/// how the caller knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    field: u32,
    /// Scalars (an enum) may come packed: one length-delimited field
    /// holding many varints.
    packable: bool,
    batch: Batch,
}

impl Listed {
    /// The list of the method at `path`, if its request has one.
    pub fn of_path(path: &str) -> Option<Listed> {
        let method = crate::proto::bucket_method(path)?;
        let (field, packable, batch) = match method {
            "IngestBatch" => (1, false, Batch::Packets),
            "MarkProcessedBatch" => (1, false, Batch::Marks),
            "ExtendLease" => (1, false, Batch::LeaseTokens),
            "Redrive" => (1, true, Batch::Statuses),
            _ => return None,
        };
        Some(Listed {
            field,
            packable,
            batch,
        })
    }
}

/// Where the walk is in the stream of gRPC messages.
#[derive(Debug, Clone, Copy)]
enum State {
    /// The 5-byte frame header: compressed flag, then the length (BE).
    Header {
        seen: u8,
        compressed: bool,
        len: u32,
    },
    /// A field's tag (a varint).
    Tag { value: u64, shift: u32 },
    /// A varint value, skipped.
    Varint,
    /// A length-delimited field's length (a varint).
    Length {
        value: u64,
        shift: u32,
        listed: bool,
    },
    /// Bytes skipped: a fixed-width value or a length-delimited payload;
    /// `packed` counts the varints in it.
    Skip { left: u64, packed: bool },
    /// The rest of this message, not walked (compressed or malformed).
    Opaque,
}

/// Counts one listed field through a stream of gRPC messages.
#[derive(Debug, Clone)]
pub struct Scan {
    listed: Listed,
    max: usize,
    state: State,
    /// Bytes of the current message not yet walked.
    left: u64,
    count: usize,
    /// Groups open around the walk: prost skips an unknown group whole, so
    /// what is inside one is no item, and what follows it still counts.
    groups: u32,
}

/// Deeper than prost's recursion limit: prost refuses the message.
const MAX_GROUPS: u32 = 100;

const HEADER: State = State::Header {
    seen: 0,
    compressed: false,
    len: 0,
};

impl Scan {
    pub fn new(listed: Listed, max: usize) -> Scan {
        Scan {
            listed,
            max,
            state: HEADER,
            left: 0,
            count: 0,
            groups: 0,
        }
    }

    /// Walks `chunk`; Err with the violation once the list is over `max`.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), Error> {
        while let Some((&byte, rest)) = chunk.split_first() {
            if let State::Header {
                seen,
                compressed,
                len,
            } = self.state
            {
                chunk = rest;
                let (compressed, len) = match seen {
                    0 => (byte != 0, len),
                    _ => (compressed, len << 8 | u32::from(byte)),
                };
                self.state = match seen {
                    4 => self.begin(compressed, len),
                    _ => State::Header {
                        seen: seen + 1,
                        compressed,
                        len,
                    },
                };
                continue;
            }
            // Inside a message: never past its end.
            let here = &chunk[..chunk
                .len()
                .min(usize::try_from(self.left).unwrap_or(usize::MAX))];
            let used = self.walk(here)?;
            self.left -= used as u64;
            chunk = &chunk[used..];
            if self.left == 0 {
                self.count = 0;
                self.groups = 0;
                self.state = HEADER;
            }
        }
        Ok(())
    }

    /// A new message of `len` bytes starts.
    fn begin(&mut self, compressed: bool, len: u32) -> State {
        self.left = u64::from(len);
        self.count = 0;
        self.groups = 0;
        match (len, compressed) {
            (0, _) => HEADER,
            (_, true) => State::Opaque,
            (_, false) => State::Tag { value: 0, shift: 0 },
        }
    }

    fn counted(&mut self) -> Result<(), Error> {
        self.count += 1;
        if self.count > self.max {
            return Err(Error::InvalidInput(vec![self.listed.batch.over(self.max)]));
        }
        Ok(())
    }

    /// Walks `bytes` (all within the message); how many it used.
    fn walk(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        let mut at = 0;
        while at < bytes.len() {
            match self.state {
                State::Header { .. } => unreachable!("headers are read by feed"),
                State::Opaque => return Ok(bytes.len()),
                State::Skip { left, packed } => {
                    let n = (bytes.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                    if packed {
                        // A packed varint ends at each byte without the high bit.
                        for &b in &bytes[at..at + n] {
                            if b & 0x80 == 0 {
                                self.counted()?;
                            }
                        }
                    }
                    at += n;
                    let left = left - n as u64;
                    self.state = match left {
                        0 => State::Tag { value: 0, shift: 0 },
                        _ => State::Skip { left, packed },
                    };
                }
                State::Varint => {
                    if bytes[at] & 0x80 == 0 {
                        self.state = State::Tag { value: 0, shift: 0 };
                    }
                    at += 1;
                }
                State::Tag { value, shift } | State::Length { value, shift, .. } => {
                    let byte = bytes[at];
                    at += 1;
                    if shift > 63 {
                        self.state = State::Opaque;
                        continue;
                    }
                    let value = value | u64::from(byte & 0x7f) << shift;
                    if byte & 0x80 != 0 {
                        self.state = match self.state {
                            State::Length { listed, .. } => State::Length {
                                value,
                                shift: shift + 7,
                                listed,
                            },
                            _ => State::Tag {
                                value,
                                shift: shift + 7,
                            },
                        };
                        continue;
                    }
                    self.state = match self.state {
                        State::Length { listed, .. } => self.length_done(value, listed)?,
                        _ => self.tag_done(value)?,
                    };
                }
            }
        }
        Ok(at)
    }

    fn tag_done(&mut self, tag: u64) -> Result<State, Error> {
        let listed = self.groups == 0 && tag >> 3 == u64::from(self.listed.field);
        Ok(match tag & 7 {
            0 => {
                if listed {
                    self.counted()?;
                }
                State::Varint
            }
            1 => State::Skip {
                left: 8,
                packed: false,
            },
            2 => State::Length {
                value: 0,
                shift: 0,
                listed,
            },
            5 => State::Skip {
                left: 4,
                packed: false,
            },
            3 if self.groups < MAX_GROUPS => {
                self.groups += 1;
                State::Tag { value: 0, shift: 0 }
            }
            4 if self.groups > 0 => {
                self.groups -= 1;
                State::Tag { value: 0, shift: 0 }
            }
            // An unbalanced or too deep group, or no wire type at all:
            // prost refuses the message.
            _ => State::Opaque,
        })
    }

    fn length_done(&mut self, len: u64, listed: bool) -> Result<State, Error> {
        let packed = listed && self.listed.packable;
        if listed && !packed {
            self.counted()?;
        }
        Ok(match len {
            0 => State::Tag { value: 0, shift: 0 },
            left => State::Skip { left, packed },
        })
    }
}

/// Puts a [`Scan`] on the body of every request whose method has a list.
#[derive(Clone)]
pub struct BatchLimitLayer {
    max: usize,
}

impl BatchLimitLayer {
    pub fn new(max_batch: usize) -> BatchLimitLayer {
        BatchLimitLayer { max: max_batch }
    }
}

impl<S> Layer<S> for BatchLimitLayer {
    type Service = BatchLimit<S>;

    fn layer(&self, inner: S) -> BatchLimit<S> {
        BatchLimit {
            inner,
            max: self.max,
        }
    }
}

#[derive(Clone)]
pub struct BatchLimit<S> {
    inner: S,
    max: usize,
}

impl<S, B> Service<Request<B>> for BatchLimit<S>
where
    S: Service<Request<Body>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> S::Future {
        // tonic's Body::new takes its own type back without boxing it again.
        let request = request.map(Body::new);
        let Some(listed) = Listed::of_path(request.uri().path()) else {
            return self.inner.call(request);
        };
        let scan = Scan::new(listed, self.max);
        let request = request.map(|body| {
            Body::new(Scanned {
                inner: body,
                scan: Some(scan),
            })
        });
        self.inner.call(request)
    }
}

pin_project_lite::pin_project! {
    /// A request body walked by its [`Scan`] as it streams through.
    struct Scanned {
        #[pin]
        inner: Body,
        // None once the list was refused: the body is over.
        scan: Option<Scan>,
    }
}

impl http_body::Body for Scanned {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let Some(scan) = this.scan.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref()
            && let Err(refused) = scan.feed(data)
        {
            *this.scan = None;
            // tonic answers a body error that is a Status with that status.
            return Poll::Ready(Some(Err(Box::new(tonic::Status::from(refused)))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.scan.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    fn listed(path: &str) -> Listed {
        Listed::of_path(path).unwrap()
    }

    /// Fed whole, and fed a byte at a time: the same verdict.
    fn verdict(path: &str, max: usize, body: &[u8]) -> Result<(), String> {
        let whole = Scan::new(listed(path), max)
            .feed(body)
            .map_err(|e| e.to_string());
        let mut scan = Scan::new(listed(path), max);
        let bytewise = body
            .iter()
            .try_for_each(|b| scan.feed(std::slice::from_ref(b)))
            .map_err(|e| e.to_string());
        assert_eq!(whole, bytewise, "chunking changed the verdict");
        whole
    }

    const BATCH: &str = "/bucket.v1.BucketService/IngestBatch";

    #[test]
    fn counts_the_listed_field_and_refuses_one_too_many() {
        let empty_packets = |n: usize| framed(&[0x0a, 0x00].repeat(n));
        assert!(verdict(BATCH, 3, &empty_packets(3)).is_ok());
        let e = verdict(BATCH, 3, &empty_packets(4)).unwrap_err();
        assert!(e.contains("at most 3 packets"), "{e}");
        // Two messages of 3 on one stream: counted per message.
        let two = [empty_packets(3), empty_packets(3)].concat();
        assert!(verdict(BATCH, 3, &two).is_ok());
    }

    #[test]
    fn other_fields_and_nested_items_are_skipped_not_counted() {
        use prost::Message;
        let request = crate::proto::bucket::v1::ExtendLeaseRequest {
            lease_tokens: vec!["a".repeat(300), String::new(), "b".into()],
            lease_seconds: 300,
        };
        let body = framed(&request.encode_to_vec());
        let path = "/bucket.v1.BucketService/ExtendLease";
        assert!(verdict(path, 3, &body).is_ok());
        assert!(verdict(path, 2, &body).is_err());
        // A packet whose nested fields number 1 too: only the top level counts.
        let packet = [0x0a, 0x04, 0x0a, 0x02, 0x0a, 0x00];
        assert!(verdict(BATCH, 1, &framed(&packet)).is_ok());
    }

    #[test]
    fn packed_and_unpacked_statuses_are_counted_alike() {
        let path = "/bucket.v1.BucketService/Redrive";
        // Packed: field 1, length 3, three varints (one of two bytes).
        let packed = framed(&[0x0a, 0x04, 0x04, 0x05, 0x85, 0x01]);
        assert!(verdict(path, 3, &packed).is_ok());
        assert!(verdict(path, 2, &packed).is_err());
        let unpacked = framed(&[0x08, 0x04, 0x08, 0x05, 0x12, 0x01, b'u', 0x08, 0x04]);
        assert!(verdict(path, 3, &unpacked).is_ok());
        assert!(verdict(path, 2, &unpacked).is_err());
    }

    #[test]
    fn compressed_malformed_and_unlisted_pass_uncounted() {
        let mut compressed = framed(&[0x0a, 0x00].repeat(10));
        compressed[0] = 1;
        assert!(verdict(BATCH, 1, &compressed).is_ok());
        // An unclosed group: prost refuses it, the walk stops counting.
        let group = framed(&[[0x0b].as_slice(), &[0x0a, 0x00].repeat(10)].concat());
        assert!(verdict(BATCH, 1, &group).is_ok());
        // A closed one is skipped whole by prost: what follows still counts.
        let closed = [
            [0x1b, 0x0a, 0x00, 0x0a, 0x00, 0x1c].as_slice(),
            &[0x0a, 0x00].repeat(2),
        ]
        .concat();
        assert!(verdict(BATCH, 2, &framed(&closed)).is_ok());
        assert!(verdict(BATCH, 1, &framed(&closed)).is_err());
        // An overlong varint tag.
        let overlong = framed(&[[0xff; 11].as_slice(), &[0x0a, 0x00].repeat(10)].concat());
        assert!(verdict(BATCH, 1, &overlong).is_ok());
        assert_eq!(Listed::of_path("/bucket.v1.BucketService/Ingest"), None);
        assert_eq!(Listed::of_path("/api/v1/bucket/prana/ingest"), None);
    }
}
