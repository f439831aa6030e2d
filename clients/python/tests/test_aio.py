"""The asyncio consumer and ingest client against the real bucket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import pytest
from conftest import Bucket, packet

from prana_bucket import (
    AsyncHandler,
    AsyncIngestClient,
    AsyncSubscriber,
    Delivery,
    FlowControl,
    InvalidArgumentError,
    KarmaAction,
    Receipt,
    Subscriber,
    pb,
)


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


async def status(bucket: Bucket) -> pb.StatusResponse:
    return await asyncio.to_thread(bucket.status)


async def ingest(bucket: Bucket, n: int, user: str) -> list[str]:
    async with AsyncIngestClient(bucket.target) as client:
        results = await client.ingest_batch([packet(f"{user}-{i}") for i in range(n)])
    ids = []
    for result in results:
        assert isinstance(result, Receipt), result
        ids.append(result.packet_id)
    return ids


class Seen:
    def __init__(self, act: AsyncHandler | None = None) -> None:
        self.seen: list[tuple[str, int]] = []
        self.act = act

    async def __call__(self, delivery: Delivery) -> Iterable[KarmaAction] | None:
        self.seen.append((delivery.packet_id, delivery.delivery_attempt))
        return await self.act(delivery) if self.act else None


async def consume_until(
    bucket: Bucket,
    handler: Seen,
    done: Callable[[pb.StatusResponse], bool],
    **kwargs: object,
) -> None:
    async with AsyncSubscriber(bucket.target) as subscriber:
        task = asyncio.create_task(subscriber.subscribe(handler, **kwargs))  # type: ignore[arg-type]
        while not done(await status(bucket)):
            assert not task.done(), task
            await asyncio.sleep(0.05)
        subscriber.stop()
        await asyncio.wait_for(task, 30)


def test_every_packet_delivered_and_marked_once(bucket: Bucket) -> None:
    async def main() -> None:
        ids = await ingest(bucket, 200, "aio")

        async def act(delivery: Delivery) -> list[dict[str, object]]:
            await asyncio.sleep(0.001)
            return [{"action": "completing_lessons", "reward": 5}]

        handler = Seen(act)
        await consume_until(bucket, handler, lambda s: s.processed_packets == 200)
        assert sorted(handler.seen) == sorted((i, 1) for i in ids)

    asyncio.run(main())


def test_raising_handler_records_a_failure(bucket: Bucket) -> None:
    async def main() -> None:
        await ingest(bucket, 2, "aio-fail")

        async def act(delivery: Delivery) -> None:
            raise RuntimeError("karma API down")

        await consume_until(bucket, Seen(act), lambda s: s.failed_packets == 2)
        (stored,) = await asyncio.to_thread(bucket.user_packets, "aio-fail-0")
        assert stored.error_message == "karma API down"

    asyncio.run(main())


def test_slow_handler_keeps_its_leases(bucket: Bucket) -> None:
    async def main() -> None:
        ids = await ingest(bucket, 4, "aio-slow")

        async def act(delivery: Delivery) -> None:
            await asyncio.sleep(3.5)

        handler = Seen(act)
        await consume_until(
            bucket,
            handler,
            lambda s: s.processed_packets == 4,
            flow_control=FlowControl(lease_seconds=1),
        )
        assert sorted(handler.seen) == sorted((i, 1) for i in ids)

    asyncio.run(main())


def test_nack_and_settling_from_a_thread(bucket: Bucket) -> None:
    async def main() -> None:
        (packet_id,) = await ingest(bucket, 1, "aio-nack")

        async def act(delivery: Delivery) -> None:
            if delivery.delivery_attempt == 1:
                delivery.nack()
            else:
                # Work handed to a thread settles from there.
                await asyncio.to_thread(delivery.ack, [{"action": "deep_focus"}])

        handler = Seen(act)
        await consume_until(bucket, handler, lambda s: s.processed_packets == 1)
        assert handler.seen == [(packet_id, 1), (packet_id, 2)]

    asyncio.run(main())


def test_cancelling_the_task_stops_gracefully(bucket: Bucket) -> None:
    async def main() -> None:
        await ingest(bucket, 10, "aio-cancel")
        started = asyncio.Event()

        async def act(delivery: Delivery) -> None:
            started.set()
            await asyncio.sleep(0.5)

        handler = Seen(act)
        async with AsyncSubscriber(bucket.target) as subscriber:
            task = asyncio.create_task(subscriber.subscribe(handler, max_concurrency=3))
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        begun = {p for p, _ in handler.seen}
        current = await status(bucket)
        # What was begun was finished and recorded; the rest is pending.
        assert current.processed_packets == len(begun)
        assert current.pending_packets == 10 - len(begun)

    asyncio.run(main())


def test_bucket_restarted_under_the_consumer(bucket: Bucket) -> None:
    async def main() -> None:
        handler = Seen()
        async with AsyncSubscriber(bucket.target) as subscriber:
            task = asyncio.create_task(subscriber.subscribe(handler))
            await ingest(bucket, 5, "aio-before")
            await until(lambda: len(handler.seen) == 5)
            await asyncio.to_thread(bucket.restart)
            ids = await ingest(bucket, 5, "aio-after")
            await until(lambda: set(ids) <= {p for p, _ in handler.seen})
            assert not task.done()
            subscriber.stop()
            await task

    asyncio.run(main())


def test_async_ingest_field_violations(bucket: Bucket) -> None:
    async def main() -> None:
        async with AsyncIngestClient(bucket.target) as client:
            with pytest.raises(InvalidArgumentError) as caught:
                await client.ingest(packet(focus_score=-1.0))
        assert [v.field for v in caught.value.field_violations] == ["packet.focus_score"]

    asyncio.run(main())


def test_blocking_subscriber_beside_an_event_loop(bucket: Bucket) -> None:
    # The blocking Subscriber runs grpc.aio on a loop of its own; the
    # application's loop uses grpc.aio at the same time.
    seen: list[str] = []
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(lambda d: seen.append(d.packet_id))

        async def main() -> list[str]:
            ids = await ingest(bucket, 10, "two-loops")
            await until(lambda: len(seen) == 10)
            return ids

        ids = asyncio.run(main())
        future.cancel()
        future.result(timeout=30)
    assert sorted(seen) == sorted(ids)
