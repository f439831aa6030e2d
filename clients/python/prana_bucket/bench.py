"""Throughput of the blocking consumer with a handler that does nothing.

    python -m prana_bucket.bench --bucket-bin target/release/bucket --packets 100000

Starts the bucket (a fresh SQLite file in a temp dir, on a free port),
stores ``--packets`` packets with IngestBatch (not measured), then
subscribes with :class:`~prana_bucket.Subscriber` and measures from the
subscription to the moment the bucket counts every packet processed: each
was delivered over the stream, handed to a worker thread, and its outcome
recorded with MarkProcessedBatch. With ``--target`` it measures a bucket
already running (which should have no backlog of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prana_bucket import AsyncSubscriber, FlowControl, IngestClient, Subscriber, pb
from prana_bucket._transport import Connection


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _status(target: str) -> pb.StatusResponse:
    with Connection(target).channel() as channel:
        response: pb.StatusResponse = pb.BucketServiceStub(channel).Status(
            pb.StatusRequest(), timeout=5
        )
        return response


def _start_bucket(binary: str, directory: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BUCKET_", "REDIS_", "DATABASE_URL"))
    }
    env["RUST_LOG"] = "error"
    process = subprocess.Popen(
        [
            binary,
            "--listen",
            f"127.0.0.1:{port}",
            "--database-url",
            f"sqlite://{Path(directory) / 'bucket.db'}",
        ],
        env=env,
    )
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            _status(target)
            return process, target
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.1)


def _load(target: str, packets: int) -> None:
    packet = {
        "session_id": "session_456",
        "lesson_id": "lesson_789",
        "system_type": "gurukul",
        "role": "student",
        "timestamp": "2024-01-20T10:30:00Z",
        "cognitive_state": "ON_TASK",
        "active_seconds": 4.5,
        "idle_seconds": 0.3,
        "away_seconds": 0.2,
        "focus_score": 85.0,
        "raw_signals": {"dwell_time_ms": 1200, "mouse_velocity": 0.5},
    }
    batches = [range(start, min(start + 500, packets)) for start in range(0, packets, 500)]
    with IngestClient(target) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:

        def send(batch: range) -> None:
            results = client.ingest_batch([{**packet, "user_id": f"u{i % 1000}"} for i in batch])
            refused = [r for r in results if isinstance(r, Exception)]
            if refused:
                raise RuntimeError(f"{len(refused)} packets refused: {refused[0]}")

        list(pool.map(send, batches))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(target: str, packets: int, max_in_flight: int, workers: int) -> float:
    # One channel for the progress polls: a new one per poll would cost
    # this process more CPU than the polls themselves.
    polls = Connection(target).channel()
    stub = pb.BucketServiceStub(polls)

    def processed() -> int:
        return stub.Status(pb.StatusRequest(), timeout=5).processed_packets

    before = processed()
    handled = itertools.count()

    def handle(_delivery: object) -> None:
        next(handled)  # the handler does nothing else

    subscriber = Subscriber(target)
    cpu = _cpu()
    started = time.monotonic()
    future = subscriber.subscribe(
        handle,
        consumer="bench",
        flow_control=FlowControl(max_in_flight=max_in_flight),
        max_workers=workers,
    )
    while processed() - before < packets:
        if future.done():
            future.result()
            raise RuntimeError("the subscription stopped")
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    cpu = _cpu() - cpu
    future.stop()
    subscriber.close()
    polls.close()
    rate = packets / elapsed
    print(
        f"{packets} packets in {elapsed:.2f} s: {rate:,.0f} packets/s "
        f"(max_in_flight {max_in_flight}, {workers} workers; "
        f"consumer CPU {cpu:.2f} s, {cpu / packets * 1e6:.0f} µs/packet; "
        f"handler calls {next(handled)})"
    )
    return rate


def measure_asyncio(target: str, packets: int, max_in_flight: int, concurrency: int) -> float:
    """The same with :class:`~prana_bucket.AsyncSubscriber` and a coroutine
    handler that does nothing."""

    async def run() -> tuple[float, int]:
        polls = Connection(target).aio_channel()
        stub = pb.BucketServiceStub(polls)

        async def processed() -> int:
            response = await stub.Status(pb.StatusRequest(), timeout=5)
            return response.processed_packets

        before = await processed()
        handled = itertools.count()

        async def handle(_delivery: object) -> None:
            next(handled)

        subscriber = AsyncSubscriber(target)
        started = time.monotonic()
        task = asyncio.create_task(
            subscriber.subscribe(
                handle,
                consumer="bench",
                flow_control=FlowControl(max_in_flight=max_in_flight),
                max_concurrency=concurrency,
            )
        )
        while await processed() - before < packets:
            if task.done():
                await task
                raise RuntimeError("the subscription stopped")
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
        await subscriber.close()
        await task
        await polls.close()
        return elapsed, next(handled)

    cpu = _cpu()
    elapsed, calls = asyncio.run(run())
    cpu = _cpu() - cpu
    rate = packets / elapsed
    print(
        f"{packets} packets in {elapsed:.2f} s: {rate:,.0f} packets/s (asyncio, "
        f"max_in_flight {max_in_flight}, {concurrency} handler tasks; "
        f"consumer CPU {cpu:.2f} s, {cpu / packets * 1e6:.0f} µs/packet; handler calls {calls})"
    )
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prana_bucket.bench", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bucket-bin", help="start this bucket binary (fresh SQLite)")
    where.add_argument("--target", help="a running bucket, host:port")
    parser.add_argument("--packets", type=int, default=100_000)
    parser.add_argument("--max-in-flight", type=int, default=1000)
    parser.add_argument(
        "--workers", type=int, default=4, help="handler threads (asyncio: handler tasks)"
    )
    parser.add_argument("--api", choices=["blocking", "asyncio"], default="blocking")
    parser.add_argument("--runs", type=int, default=1, help="load and measure this many times")
    args = parser.parse_args(argv)

    rates = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as directory:
            process = None
            target = args.target
            if args.bucket_bin:
                process, target = _start_bucket(args.bucket_bin, directory)
            try:
                _load(target, args.packets)
                how = measure if args.api == "blocking" else measure_asyncio
                rates.append(how(target, args.packets, args.max_in_flight, args.workers))
            finally:
                if process is not None:
                    process.terminate()
                    process.wait()
    if len(rates) > 1:
        print(f"runs: {', '.join(f'{r:,.0f}' for r in rates)} packets/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
