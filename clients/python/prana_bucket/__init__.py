"""prana-bucket: the PRANA bucket's Python client.

- :class:`Subscriber` (threads) and :class:`AsyncSubscriber` (asyncio):
  a StreamPending subscription with flow control, outcomes recorded in
  batches in the background, automatic lease extension, nack, reconnects
  and a graceful stop, in the manner of google-cloud-pubsub's subscriber.
- :class:`IngestClient` and :class:`AsyncIngestClient`: single and batch
  ingest with idempotent UUIDv7 packet ids and retries.
- :mod:`prana_bucket.errors`: typed errors with the server's field violations.
- :mod:`prana_bucket.pb`: the generated messages and stub.
"""

from prana_bucket._convert import KarmaAction, packet_input
from prana_bucket._core import Delivery, FlowControl
from prana_bucket._transport import Connection
from prana_bucket._uuid7 import new_packet_id, uuid7
from prana_bucket.aio import AsyncHandler, AsyncSubscriber
from prana_bucket.consumer import Handler, StreamingPullFuture, Subscriber
from prana_bucket.errors import (
    BucketError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from prana_bucket.ingest import AsyncIngestClient, IngestClient, PacketLike, Receipt, Retry

__version__ = "0.1.0"

__all__ = [
    "AsyncHandler",
    "AsyncIngestClient",
    "AsyncSubscriber",
    "BucketError",
    "Connection",
    "Delivery",
    "FailedPreconditionError",
    "FieldViolation",
    "FlowControl",
    "Handler",
    "IngestClient",
    "InvalidArgumentError",
    "KarmaAction",
    "NotFoundError",
    "PacketLike",
    "PermissionDeniedError",
    "Receipt",
    "ResourceExhaustedError",
    "Retry",
    "StreamingPullFuture",
    "Subscriber",
    "UnauthenticatedError",
    "UnavailableError",
    "new_packet_id",
    "packet_input",
    "uuid7",
]
