"""The ingest client: idempotent ids, batches, retries and typed errors."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import pytest
from conftest import Bucket, packet

from prana_bucket import (
    BucketError,
    IngestClient,
    InvalidArgumentError,
    Receipt,
    Retry,
    UnavailableError,
    pb,
    uuid7,
)


def test_ingest_makes_a_uuid7_id(bucket: Bucket) -> None:
    with IngestClient(bucket.target) as client:
        receipt = client.ingest(packet())
    assert uuid.UUID(receipt.packet_id).version == 7
    assert receipt.created
    assert receipt.received_at.tzinfo is not None
    (stored,) = bucket.user_packets("user_123")
    assert stored.packet_id == receipt.packet_id
    assert stored.system_type == pb.SystemType.SYSTEM_TYPE_GURUKUL
    assert dict(stored.raw_signals) == {"dwell_time_ms": 1200, "mouse_velocity": 0.5}


def test_the_same_id_is_stored_once(bucket: Bucket) -> None:
    packet_id = str(uuid7())
    with IngestClient(bucket.target) as client:
        first = client.ingest(packet(packet_id=packet_id))
        again = client.ingest(packet(packet_id=packet_id))
    assert (first.packet_id, first.created) == (packet_id, True)
    assert (again.packet_id, again.created) == (packet_id, False)
    assert bucket.status().total_packets == 1


def test_a_message_is_accepted_too(bucket: Bucket) -> None:
    message = pb.PacketInput(
        user_id="typed",
        cognitive_state="ON_TASK",
        active_seconds=5.0,
        system_type=pb.SystemType.SYSTEM_TYPE_EMS,
    )
    message.timestamp.FromJsonString("2024-01-20T10:30:00Z")
    message.raw_signals.SetInParent()
    with IngestClient(bucket.target) as client:
        receipt = client.ingest(message)
    assert not message.packet_id  # the caller's message is left alone
    assert uuid.UUID(receipt.packet_id).version == 7


def test_empty_raw_signals_are_sent(bucket: Bucket) -> None:
    with IngestClient(bucket.target) as client:
        client.ingest(packet(raw_signals={}))
    assert bucket.status().total_packets == 1


def test_bad_input_names_every_violated_field(bucket: Bucket) -> None:
    with IngestClient(bucket.target) as client, pytest.raises(InvalidArgumentError) as caught:
        client.ingest(packet(focus_score=250.0, active_seconds=9.0))
    error = caught.value
    fields = {v.field for v in error.field_violations}
    assert {"packet.focus_score", "packet.active_seconds"} <= fields, error
    assert all(v.description for v in error.field_violations)
    assert "packet.focus_score" in str(error)
    assert bucket.status().total_packets == 0


def test_batch_answers_item_by_item(bucket: Bucket) -> None:
    with IngestClient(bucket.target) as client:
        results = client.ingest_batch([packet("u1"), packet("u2", focus_score=250.0), packet("u3")])
    assert isinstance(results[0], Receipt)
    assert isinstance(results[2], Receipt)
    error = results[1]
    assert isinstance(error, InvalidArgumentError)
    assert error.index == 1
    assert [v.field for v in error.field_violations] == ["focus_score"]
    assert bucket.status().total_packets == 2


def test_batch_over_the_limit_is_refused_whole(make_bucket: Callable[..., Bucket]) -> None:
    bucket = make_bucket(["--max-batch", "3"])
    with IngestClient(bucket.target) as client, pytest.raises(BucketError) as caught:
        client.ingest_batch([packet(f"u{i}") for i in range(4)])
    assert not caught.value.retryable


def test_unknown_packet_fields_are_refused_here() -> None:
    with IngestClient("127.0.0.1:1") as client, pytest.raises(ValueError, match="focus"):
        client.ingest({**packet(), "focus": 1})


def test_retries_unavailable_with_the_same_id(make_bucket: Callable[..., Bucket]) -> None:
    bucket = make_bucket()
    bucket.stop()
    # The bucket comes back while the client is retrying.
    comeback = threading.Timer(1.0, bucket.start)
    comeback.start()
    packet_id = str(uuid7())
    retry = Retry(attempts=30, initial=0.1, maximum=0.5)
    with IngestClient(bucket.target, retry=retry) as client:
        receipt = client.ingest(packet(packet_id=packet_id))
        batch = client.ingest_batch([packet("b1"), packet("b2")])
    # start() is still waiting for the bucket to answer Status: the
    # fixture must not stop it under that wait (the timer's thread then
    # failed on a process already gone, reported under a later test).
    comeback.join()
    assert receipt.packet_id == packet_id
    assert all(isinstance(r, Receipt) for r in batch)
    assert bucket.status().total_packets == 3


def test_gives_up_after_its_attempts() -> None:
    retry = Retry(attempts=2, initial=0.01, maximum=0.02, timeout=1.0)
    started = time.monotonic()
    with IngestClient("127.0.0.1:1", retry=retry) as client, pytest.raises(UnavailableError):
        client.ingest(packet())
    assert time.monotonic() - started < 5
