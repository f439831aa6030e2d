"""The bucket's generated messages and stubs (bucket.v1), for code that wants
the contract's types directly: ``from prana_bucket.pb import PacketInput``.

Generated from proto/ when the package is built."""

from prana_bucket._gen.bucket.v1 import bucket_pb2, bucket_pb2_grpc
from prana_bucket._gen.bucket.v1.bucket_pb2 import (
    ExtendLeaseRequest,
    ExtendLeaseResponse,
    FieldViolation,
    IngestBatchRequest,
    IngestBatchResponse,
    IngestError,
    IngestRequest,
    IngestResponse,
    MarkProcessedBatchRequest,
    MarkProcessedBatchResponse,
    MarkProcessedRequest,
    MarkProcessedResponse,
    Packet,
    PacketInput,
    PacketStatus,
    Role,
    StatusRequest,
    StatusResponse,
    StreamPendingRequest,
    StreamPendingResponse,
    SystemType,
    UserPacketsRequest,
    UserPacketsResponse,
)
from prana_bucket._gen.bucket.v1.bucket_pb2_grpc import BucketServiceStub

__all__ = [
    "BucketServiceStub",
    "ExtendLeaseRequest",
    "ExtendLeaseResponse",
    "FieldViolation",
    "IngestBatchRequest",
    "IngestBatchResponse",
    "IngestError",
    "IngestRequest",
    "IngestResponse",
    "MarkProcessedBatchRequest",
    "MarkProcessedBatchResponse",
    "MarkProcessedRequest",
    "MarkProcessedResponse",
    "Packet",
    "PacketInput",
    "PacketStatus",
    "Role",
    "StatusRequest",
    "StatusResponse",
    "StreamPendingRequest",
    "StreamPendingResponse",
    "SystemType",
    "UserPacketsRequest",
    "UserPacketsResponse",
    "bucket_pb2",
    "bucket_pb2_grpc",
]
