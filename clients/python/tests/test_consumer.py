"""The blocking consumer against the real bucket."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from conftest import Bucket, packet, wait_for

from prana_bucket import (
    BucketError,
    Delivery,
    FlowControl,
    Handler,
    IngestClient,
    KarmaAction,
    StreamingPullFuture,
    Subscriber,
    aio,
    pb,
)


def ingest(bucket: Bucket, n: int, user: str = "user", **fields: Any) -> list[str]:
    with IngestClient(bucket.target) as client:
        results = client.ingest_batch([packet(f"{user}-{i % 7}", **fields) for i in range(n)])
    ids = []
    for result in results:
        assert not isinstance(result, Exception), result
        ids.append(result.packet_id)
    return ids


class Recorder:
    """A handler that records what it was given, and does what ``act`` says."""

    def __init__(self, act: Handler | None = None) -> None:
        self.seen: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.act = act

    def __call__(self, delivery: Delivery) -> Iterable[KarmaAction] | None:
        with self.lock:
            self.seen.append((delivery.packet_id, delivery.delivery_attempt))
        return self.act(delivery) if self.act else None

    def ids(self) -> set[str]:
        with self.lock:
            return {packet_id for packet_id, _ in self.seen}

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


def stop(future: StreamingPullFuture) -> None:
    future.cancel()
    future.result(timeout=30)


def test_every_packet_delivered_and_marked_once(bucket: Bucket) -> None:
    ids = ingest(bucket, 300)
    handler = Recorder(lambda d: [{"action": "completing_lessons", "reward": 5}])
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handler, flow_control=FlowControl(max_in_flight=64))
        wait_for(lambda: bucket.status().processed_packets == 300, what="300 processed")
        stop(future)
    assert sorted(p for p, _ in handler.seen) == sorted(ids)  # each once
    assert {attempt for _, attempt in handler.seen} == {1}
    status = bucket.status()
    assert (status.leased_packets, status.pending_packets, status.failed_packets) == (0, 0, 0)
    stored = bucket.user_packets("user-0")
    assert stored and all(p.processed_by_karma for p in stored)
    assert dict(stored[0].karma_actions[0]) == {"action": "completing_lessons", "reward": 5}


def test_new_packets_arrive_without_polling(bucket: Bucket) -> None:
    handler = Recorder()
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handler)
        time.sleep(0.3)
        ids = ingest(bucket, 5, user="late")
        wait_for(lambda: handler.ids() == set(ids), 5.0, "the new packets")
        stop(future)


def test_max_in_flight_bounds_what_is_held(bucket: Bucket) -> None:
    ingest(bucket, 20, user="bounded")
    gate = threading.Event()

    def act(delivery: Delivery) -> None:
        gate.wait(20)

    handler = Recorder(act)
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(
            handler, flow_control=FlowControl(max_in_flight=5), max_workers=10
        )
        wait_for(lambda: handler.count() == 5, what="5 deliveries")
        time.sleep(0.5)
        assert handler.count() == 5
        assert bucket.status().leased_packets == 5
        gate.set()
        wait_for(lambda: bucket.status().processed_packets == 20, what="the rest, 5 at a time")
        stop(future)


def test_raising_handler_records_a_failure(bucket: Bucket) -> None:
    ids = ingest(bucket, 4, user="failing")

    def handle(delivery: Delivery) -> None:
        raise ConnectionError("karma API down")

    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handle)
        wait_for(lambda: bucket.status().failed_packets == 4, what="4 failed")
        assert future.running()  # the consumer lives on
        stop(future)
    stored = {p.packet_id: p for i in range(4) for p in bucket.user_packets(f"failing-{i}")}
    assert set(stored) == set(ids)
    for stored_packet in stored.values():
        assert stored_packet.status == pb.PacketStatus.PACKET_STATUS_FAILED
        assert stored_packet.error_message == "karma API down"


def test_handler_settles_itself_fail_and_ack(bucket: Bucket) -> None:
    ingest(bucket, 2, user="explicit")

    def handle(delivery: Delivery) -> None:
        if delivery.user_id == "explicit-0":
            delivery.fail("refused by policy")
        else:
            delivery.ack([{"action": "deep_focus", "reward": 10}])
        # Later settlements are ignored.
        assert not delivery.ack()

    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handle)
        wait_for(lambda: bucket.status().pending_packets + bucket.status().leased_packets == 0)
        stop(future)
    (failed,) = bucket.user_packets("explicit-0")
    assert failed.error_message == "refused by policy"
    (done,) = bucket.user_packets("explicit-1")
    assert done.processed_by_karma
    assert dict(done.karma_actions[0])["action"] == "deep_focus"


def test_nack_redelivers(bucket: Bucket) -> None:
    (packet_id,) = ingest(bucket, 1, user="nack")

    def act(delivery: Delivery) -> None:
        if delivery.delivery_attempt == 1:
            delivery.nack()

    handler = Recorder(act)
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handler)
        wait_for(lambda: bucket.status().processed_packets == 1, 10.0, "processed after a nack")
        stop(future)
    assert handler.seen == [(packet_id, 1), (packet_id, 2)]


def test_slow_handler_keeps_its_leases(bucket: Bucket) -> None:
    ids = ingest(bucket, 6, user="slow")
    handler = Recorder(lambda d: time.sleep(4.0))
    flow = FlowControl(lease_seconds=1)
    with Subscriber(bucket.target) as subscriber:
        # 4 s of work on 1 s leases: without extension each would be
        # delivered again about 3 times.
        future = subscriber.subscribe(handler, flow_control=flow, max_workers=6)
        wait_for(lambda: bucket.status().processed_packets == 6, 20.0, "6 processed")
        stop(future)
    assert sorted(handler.seen) == sorted((i, 1) for i in ids)
    for i in range(6):
        for stored in bucket.user_packets(f"slow-{i}"):
            assert stored.delivery_attempts == 1


def test_lease_extension_stops_at_max_lease_duration(bucket: Bucket) -> None:
    (packet_id,) = ingest(bucket, 1, user="stuck")
    release = threading.Event()

    def act(delivery: Delivery) -> None:
        if delivery.delivery_attempt == 1:
            release.wait(10)

    handler = Recorder(act)
    flow = FlowControl(lease_seconds=1, max_lease_duration=1.5)
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handler, flow_control=flow)
        # The stuck handler's lease runs out; the packet is delivered again.
        wait_for(lambda: (packet_id, 2) in handler.seen, 10.0, "a second delivery")
        release.set()
        wait_for(lambda: bucket.status().processed_packets == 1)
        stop(future)


def test_graceful_stop_finishes_what_is_in_hand(bucket: Bucket) -> None:
    ids = ingest(bucket, 20, user="graceful")
    started = threading.Event()

    def act(delivery: Delivery) -> None:
        started.set()
        time.sleep(1.0)

    handler = Recorder(act)
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handler, max_workers=4)
        assert started.wait(10)
        future.cancel()
        future.result(timeout=30)
    begun = handler.ids()
    assert 0 < len(begun) < 20
    # Everything begun was finished and recorded; nothing else was handled.
    status = bucket.status()
    assert status.processed_packets == len(begun)
    assert status.leased_packets == 0
    # The rest went back to the bucket at once, for the next consumer.
    rest = Recorder()
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(rest)
        wait_for(lambda: bucket.status().processed_packets == 20, what="the rest")
        stop(future)
    assert begun | rest.ids() == set(ids)
    assert not begun & rest.ids()


def test_grace_running_out_hands_packets_back(bucket: Bucket) -> None:
    ingest(bucket, 1, user="overtime")
    started = threading.Event()

    def act(delivery: Delivery) -> None:
        started.set()
        time.sleep(3.0)

    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(Recorder(act), grace=0.2)
        assert started.wait(10)
        begun = time.monotonic()
        future.stop()
        assert time.monotonic() - begun < 10
    wait_for(lambda: bucket.status().pending_packets == 1, 5.0, "the packet back to pending")


HOLDER = textwrap.dedent(
    r"""
    import sys, threading, time
    from prana_bucket import FlowControl, Subscriber

    lock = threading.Lock()

    def hold(delivery):
        with lock:  # one whole line per delivery
            sys.stdout.write(f"holding {delivery.packet_id}\n")
            sys.stdout.flush()
        time.sleep(3600)

    subscriber = Subscriber(sys.argv[1])
    future = subscriber.subscribe(hold, flow_control=FlowControl(max_in_flight=8), max_workers=8)
    future.result()
    """
)


def test_killed_consumer_loses_nothing(bucket: Bucket, tmp_path: Path) -> None:
    ids = ingest(bucket, 20, user="killed")
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen(
        [sys.executable, str(script), bucket.target], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        held = [holder.stdout.readline() for _ in range(8)]
        assert all(line.startswith("holding") for line in held), held
        assert bucket.status().leased_packets == 8
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    handler = Recorder()
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handler)
        wait_for(lambda: bucket.status().processed_packets == 20, 10.0, "all 20 processed")
        stop(future)
    assert handler.ids() == set(ids)
    attempts = collections.Counter(attempt for _, attempt in handler.seen)
    assert attempts == {1: 12, 2: 8}  # the 8 held were delivered again


def test_bucket_restarted_under_the_consumer(bucket: Bucket) -> None:
    handler = Recorder()
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handler)
        first = ingest(bucket, 10, user="before")
        wait_for(lambda: handler.ids() >= set(first), what="the first packets")
        wait_for(lambda: bucket.status().processed_packets == 10)
        bucket.restart()
        second = ingest(bucket, 10, user="after")
        wait_for(lambda: handler.ids() >= set(second), 20.0, "packets after the restart")
        wait_for(lambda: bucket.status().processed_packets == 20)
        assert future.running()
        stop(future)


def test_bucket_down_when_the_consumer_starts(make_bucket: Callable[..., Bucket]) -> None:
    bucket = make_bucket()
    bucket.stop()
    handler = Recorder()
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handler)
        time.sleep(1.0)
        assert future.running()
        bucket.start()
        ids = ingest(bucket, 3, user="late-start")
        wait_for(lambda: handler.ids() == set(ids), 20.0, "delivery once the bucket is up")
        stop(future)


def test_outcomes_recorded_after_the_bucket_comes_back(bucket: Bucket) -> None:
    ids = ingest(bucket, 3, user="outage")
    gate = threading.Event()

    def act(delivery: Delivery) -> None:
        gate.wait(20)

    handler = Recorder(act)
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(handler)
        wait_for(lambda: len(handler.ids()) == 3)
        bucket.restart()
        # Handled while the stream is gone: their marks still count.
        gate.set()
        wait_for(lambda: bucket.status().processed_packets == 3, 20.0, "marks after restart")
        stop(future)
    assert set(ids) <= handler.ids()


def test_status_names_the_consumer(bucket: Bucket) -> None:
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(
            Recorder(), consumer="karma-test", flow_control=FlowControl(max_in_flight=32)
        )
        wait_for(lambda: len(bucket.status().consumers) == 1)
        (info,) = bucket.status().consumers
        assert (info.consumer, info.max_in_flight) == ("karma-test", 32)
        stop(future)


def test_returning_something_that_is_not_karma_actions_fails(bucket: Bucket) -> None:
    ingest(bucket, 1, user="odd")
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(lambda d: [42])  # type: ignore[list-item]
        wait_for(lambda: bucket.status().failed_packets == 1)
        stop(future)
    (stored,) = bucket.user_packets("odd-0")
    assert "not karma actions" in stored.error_message


@pytest.mark.parametrize("bad", [0, 10_001])
def test_flow_control_bounds(bad: int) -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        FlowControl(max_in_flight=bad)


def test_an_internal_fault_stops_the_subscription(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: object) -> None:
        raise RuntimeError("lease bookkeeping broke")

    monkeypatch.setattr(aio._AsyncPull, "_lease_loop", broken)
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(Recorder())
        with pytest.raises(BucketError, match="lease bookkeeping broke"):
            future.result(timeout=30)
