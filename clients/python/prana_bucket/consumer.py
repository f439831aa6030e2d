"""The blocking consumer, in the manner of google-cloud-pubsub's
``SubscriberClient.subscribe``:

    subscriber = Subscriber("localhost:3000", token=os.environ.get("BUCKET_TOKEN"))
    future = subscriber.subscribe(handle, consumer="karma-tracker")
    future.result()          # until future.cancel() (graceful) or a fatal error

The handler runs on ``max_workers`` threads of the subscription's own. The
subscription's I/O (the StreamPending stream, outcomes recorded with
MarkProcessedBatch, nacks and lease extensions with ExtendLease) runs on
one more thread, an asyncio event loop with grpc.aio: the same engine as
:class:`~prana_bucket.AsyncSubscriber`, and several times cheaper per
packet than grpc's blocking stream iterator, which wakes a thread per
message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Iterable
from typing import Any

from prana_bucket import pb
from prana_bucket._core import FlowControl
from prana_bucket._transport import Connection
from prana_bucket.aio import Handler, _AsyncPull, _ThreadRunner
from prana_bucket.errors import BucketError

__all__ = ["Handler", "StreamingPullFuture", "Subscriber"]


class StreamingPullFuture(concurrent.futures.Future[None]):
    """A running subscription. ``result()`` waits until it stops: None after
    :meth:`cancel`, or the fatal error (a refused token, say) that stopped
    it. Lost connections are not fatal: it reconnects."""

    def __init__(self, pull: _Pull) -> None:
        super().__init__()
        self._pull = pull
        self.set_running_or_notify_cancel()

    def cancel(self) -> bool:
        """Stop gracefully, in the background: take no more deliveries,
        let handlers running finish within the grace period, record every
        outcome, then close the stream. Returns at once; ``result()`` waits."""
        self._pull.stop()
        return True

    def stop(self, grace: float | None = None, timeout: float | None = None) -> None:
        """:meth:`cancel` with this grace period, and wait for the end."""
        self._pull.stop(grace)
        # A fatal error is result()'s to raise; stop() only waits.
        with contextlib.suppress(BucketError):
            self.result(timeout)

    @property
    def in_hand(self) -> int:
        """Deliveries received and not yet recorded."""
        engine = self._pull.engine
        return len(engine.book) if engine is not None else 0


class Subscriber:
    """A connection to the bucket for consuming. ``close()`` (or leaving a
    ``with`` block) stops its subscriptions gracefully."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self.connection = Connection(
            target,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            server_name=server_name,
            options=tuple(options),
        )
        self._futures: list[StreamingPullFuture] = []

    def subscribe(
        self,
        callback: Handler,
        *,
        consumer: str = "karma-tracker",
        flow_control: FlowControl | None = None,
        max_workers: int = 10,
        grace: float = 30.0,
    ) -> StreamingPullFuture:
        """Start consuming: ``callback`` is called on one of ``max_workers``
        threads for each delivery. ``consumer`` names this subscriber in the
        bucket's Status; ``grace`` is how long a stop waits for handlers."""
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        pull = _Pull(
            self.connection, callback, consumer, flow_control or FlowControl(), max_workers, grace
        )
        future = StreamingPullFuture(pull)
        pull.start(future)
        self._futures.append(future)
        return future

    def close(self, grace: float | None = None) -> None:
        for future in self._futures:
            future.stop(grace)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pull:
    """One subscription's event-loop thread, running the asyncio engine with
    its handlers on threads."""

    def __init__(
        self,
        connection: Connection,
        callback: Handler,
        consumer: str,
        flow_control: FlowControl,
        max_workers: int,
        grace: float,
    ) -> None:
        self.connection = connection
        self.callback = callback
        self.consumer = consumer
        self.flow = flow_control
        self.max_workers = max_workers
        self.grace = grace
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: _AsyncPull | None = None
        self.stop_asked = False
        self.stop_grace: float | None = None
        self.future: StreamingPullFuture | None = None
        self.thread = threading.Thread(target=self._run, name="prana-bucket-loop", daemon=True)

    def start(self, future: StreamingPullFuture) -> None:
        self.future = future
        self.thread.start()

    def stop(self, grace: float | None = None) -> None:
        with self.lock:
            if self.stop_asked:
                return
            self.stop_asked = True
            self.stop_grace = grace
            if self.loop is not None and self.engine is not None:
                with contextlib.suppress(RuntimeError):  # the loop already ended
                    self.loop.call_soon_threadsafe(self.engine.stop, grace)

    def _run(self) -> None:
        assert self.future is not None
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self.future.set_exception(e)
        else:
            self.future.set_result(None)

    async def _main(self) -> None:
        channel = self.connection.aio_channel()
        try:
            engine = _AsyncPull(
                pb.BucketServiceStub(channel),
                self.connection.metadata,
                _ThreadRunner(self.callback, self.max_workers),
                self.consumer,
                self.flow,
                self.grace,
            )
            with self.lock:
                self.loop = asyncio.get_running_loop()
                self.engine = engine
                if self.stop_asked:
                    engine.stop(self.stop_grace)
            await engine.run()
        finally:
            await channel.close()
