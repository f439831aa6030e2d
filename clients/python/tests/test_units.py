"""Pieces that need no bucket."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from prana_bucket import Connection, InvalidArgumentError, packet_input, pb, uuid7
from prana_bucket._core import Backoff, Delivery, LeaseBook, Outcome, error_text
from prana_bucket.errors import ResourceExhaustedError, from_item_error, from_rpc_error


def test_uuid7_is_version_7_and_increasing() -> None:
    ids = [uuid7() for _ in range(10_000)]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert ids == sorted(ids, key=lambda u: u.int)
    assert len(set(ids)) == len(ids)
    stamp = ids[0].int >> 80
    assert abs(stamp - time.time() * 1000) < 5_000


def test_packet_input_takes_the_rest_json() -> None:
    message = packet_input(
        {
            "user_id": "u",
            "system_type": "ems",
            "role": "employee",
            "timestamp": dt.datetime(2024, 1, 20, 10, 30),
            "state": "WORKING",
            "active_seconds": 5,
            "focus_score": None,
            "raw_signals": {"nested": {"a": [1, 2]}},
        }
    )
    assert message.system_type == pb.SystemType.SYSTEM_TYPE_EMS
    assert message.role == pb.Role.ROLE_EMPLOYEE
    assert message.timestamp.ToJsonString() == "2024-01-20T10:30:00Z"
    assert not message.HasField("focus_score")
    assert message.active_seconds == 5.0
    with pytest.raises(ValueError, match="system_type"):
        packet_input({"system_type": "moodle"})
    for text, seconds, nanos in [
        ("2024-01-20T10:30:00Z", 1705746600, 0),
        ("2024-01-20T12:30:00.5+02:00", 1705746600, 500_000_000),
        ("2024-01-20T10:30:00.123456789Z", 1705746600, 123456789),
    ]:
        stamp = packet_input({"timestamp": text}).timestamp
        assert (stamp.seconds, stamp.nanos) == (seconds, nanos), text
    with pytest.raises(ValueError):
        packet_input({"timestamp": "2024-01-20T10:30:00"})


def test_backoff_grows_with_jitter_and_resets() -> None:
    backoff = Backoff(0.1, 1.0)
    waits = [backoff.next() for _ in range(8)]
    assert 0.05 <= waits[0] <= 0.1
    assert all(w <= 1.0 for w in waits)
    assert waits[-1] >= 0.5
    backoff.reset()
    assert backoff.next() <= 0.1


class FakeCall(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def _details(*messages: Any) -> bytes:
    status = status_pb2.Status(code=3, message="bad")
    for message in messages:
        packed = any_pb2.Any()
        packed.Pack(message)
        status.details.append(packed)
    return status.SerializeToString()


def test_errors_decode_bad_request_and_retry_info() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="packet.x", description="no")
        ]
    )
    error = from_rpc_error(
        FakeCall(
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad packet",
            (("grpc-status-details-bin", _details(bad)), ("other", "x")),
        )
    )
    assert isinstance(error, InvalidArgumentError)
    assert [(v.field, v.description) for v in error.field_violations] == [("packet.x", "no")]
    assert not error.retryable

    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=250_000_000))
    limited = from_rpc_error(
        FakeCall(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "slow down",
            (("grpc-status-details-bin", _details(retry)),),
        )
    )
    assert isinstance(limited, ResourceExhaustedError)
    assert limited.retry_after == 0.25
    assert limited.retryable
    # A trailer that is not a Status leaves code and message.
    garbled = from_rpc_error(
        FakeCall(grpc.StatusCode.INTERNAL, "x", (("grpc-status-details-bin", b"\xff\xff"),))
    )
    assert garbled.code is grpc.StatusCode.INTERNAL


def test_item_errors() -> None:
    error = from_item_error(
        pb.IngestError(
            code=3,
            message="invalid",
            field_violations=[pb.FieldViolation(field="focus_score", description="0..100")],
        ),
        4,
    )
    assert isinstance(error, InvalidArgumentError)
    assert error.index == 4
    assert str(error) == "item 4: INVALID_ARGUMENT: invalid (focus_score: 0..100)"


def test_error_text_is_cut_to_what_the_bucket_keeps() -> None:
    assert error_text(ValueError("boom")) == "boom"
    assert error_text(KeyError()) == "KeyError"
    long = error_text(RuntimeError("é" * 5000))
    assert len(long.encode()) <= 4096


def _delivery(token: str, settled: list[Outcome]) -> Delivery:
    response = pb.StreamPendingResponse(
        packet=pb.Packet(packet_id=f"p-{token}"), delivery_attempt=1, lease_token=token
    )
    return Delivery(response, settled.append, generation=1)


def test_lease_book_extends_and_gives_up() -> None:
    book = LeaseBook(lease_seconds=3, max_lease_duration=5.0)
    settled: list[Outcome] = []
    first = _delivery("a", settled)
    book.add(first)
    now = first.received
    assert book.due(now) == []
    assert 1.5 <= book.next_due(now) <= 2.0
    assert book.due(now + 2.0) == ["a"]
    book.extended(["a"], now + 2.0)
    assert book.due(now + 2.1) == []
    # Extending past max_lease_duration is not done: the lease runs out.
    assert book.due(now + 4.0) == []
    assert len(book) == 0


def test_a_delivery_settles_once() -> None:
    settled: list[Outcome] = []
    delivery = _delivery("t", settled)
    assert delivery.ack([{"action": "x"}])
    assert not delivery.fail("late")
    assert not delivery.nack()
    assert len(settled) == 1
    mark = settled[0].mark
    assert mark is not None and mark.success
    with pytest.raises(TypeError):
        _delivery("u", settled).ack(["not a mapping"])  # type: ignore[list-item]


def test_connection_targets() -> None:
    assert Connection("https://bucket.example:443/").tls
    assert Connection("https://bucket.example:443/").target == "bucket.example:443"
    plain = Connection("http://127.0.0.1:3000", token="t")
    assert not plain.tls
    assert plain.target == "127.0.0.1:3000"
    assert plain.metadata == (("authorization", "Bearer t"),)
    assert Connection("localhost:3000").metadata == ()
