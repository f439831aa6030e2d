"""The asyncio consumer (grpc.aio): the blocking consumer's behaviour, with
coroutine handlers run as tasks.

    async with AsyncSubscriber("localhost:3000", token=token) as subscriber:
        await subscriber.subscribe(handle, consumer="karma-tracker")  # until stop()

``subscribe`` returns after :meth:`AsyncSubscriber.stop` (graceful), raises
the fatal error that stopped it, and when its task is cancelled it stops
gracefully before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import grpc.aio

from prana_bucket import _core, pb
from prana_bucket._convert import KarmaAction
from prana_bucket._core import MAX_BATCH, Backoff, Delivery, FlowControl, LeaseBook, Outcome, log
from prana_bucket._transport import Connection
from prana_bucket.errors import BucketError, from_rpc_error, status_code

if TYPE_CHECKING:
    from prana_bucket._gen.bucket.v1.bucket_pb2_grpc import BucketServiceAsyncStub

#: An asyncio handler: a coroutine function taking a delivery, returning the
#: karma actions to record (or None), raising to record a failure.
AsyncHandler = Callable[[Delivery], Awaitable[Iterable[KarmaAction] | None]]
#: A blocking handler: takes a delivery, returns the karma actions to record
#: (or None), or raises to record a failure with the exception's message.
Handler = Callable[[Delivery], Iterable[KarmaAction] | None]

_CALL_TIMEOUT = 30.0
# How long the marker waits for more outcomes when more are on their way.
_MARK_LINGER = 0.005
_FATAL_MARK = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class AsyncSubscriber:
    """A grpc.aio connection to the bucket for consuming; its channel is
    made on first use, in the running event loop."""

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
        self._channel: grpc.aio.Channel | None = None
        self._stub: BucketServiceAsyncStub | None = None
        self._pulls: set[_AsyncPull] = set()
        self._idle = asyncio.Event()

    def _get_stub(self) -> BucketServiceAsyncStub:
        if self._stub is None:
            self._channel = self.connection.aio_channel()
            self._stub = pb.BucketServiceStub(self._channel)
        return self._stub

    async def subscribe(
        self,
        callback: AsyncHandler,
        *,
        consumer: str = "karma-tracker",
        flow_control: FlowControl | None = None,
        max_concurrency: int = 100,
        grace: float = 30.0,
    ) -> None:
        """Consume until :meth:`stop`: ``callback`` is awaited for each
        delivery, at most ``max_concurrency`` at once."""
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        pull = _AsyncPull(
            self._get_stub(),
            self.connection.metadata,
            _TaskRunner(callback, max_concurrency),
            consumer,
            flow_control or FlowControl(),
            grace,
        )
        self._pulls.add(pull)
        self._idle.clear()
        try:
            await pull.run()
        finally:
            self._pulls.discard(pull)
            if not self._pulls:
                self._idle.set()

    def stop(self, grace: float | None = None) -> None:
        """Stop every subscription gracefully; each ``subscribe`` returns when
        its outcomes are recorded. Call from the event loop's thread."""
        for pull in list(self._pulls):
            pull.stop(grace)

    async def close(self) -> None:
        self.stop()
        if self._pulls:
            await self._idle.wait()
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Flush:
    def __init__(self) -> None:
        self.done = asyncio.Event()


class _Runner(Protocol):
    """Where handlers run: asyncio tasks (AsyncSubscriber) or threads
    (the blocking Subscriber)."""

    def start(self, pull: _AsyncPull) -> None: ...

    def submit(self, delivery: Delivery) -> None: ...

    async def stop(self, grace: float) -> int:
        """Take nothing more; wait up to ``grace`` for handlers running;
        return how many still are."""
        ...


def _handled(delivery: Delivery, result: object, error: BaseException | None) -> None:
    if error is not None:
        log.warning("handler failed on packet %s: %r", delivery.packet_id, error)
    _core.settle_after_handler(delivery, result, error)


class _TaskRunner:
    def __init__(self, callback: AsyncHandler, concurrency: int) -> None:
        self.callback = callback
        self.concurrency = concurrency
        self.queue: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, pull: _AsyncPull) -> None:
        self.tasks = [asyncio.create_task(self._work(pull)) for _ in range(self.concurrency)]

    def submit(self, delivery: Delivery) -> None:
        self.queue.put_nowait(delivery)

    async def _work(self, pull: _AsyncPull) -> None:
        while True:
            delivery = await self.queue.get()
            if delivery is None:
                return
            if not pull.should_handle(delivery):
                continue
            result: object = None
            error: BaseException | None = None
            try:
                result = await self.callback(delivery)
            except Exception as e:
                error = e
            _handled(delivery, result, error)

    async def stop(self, grace: float) -> int:
        for _ in self.tasks:
            self.queue.put_nowait(None)
        if not self.tasks:
            return 0
        _done, busy = await asyncio.wait(self.tasks, timeout=grace)
        for task in busy:
            task.cancel()  # the handler is cancelled; its packet goes back
        return len(busy)


class _ThreadRunner:
    """Blocking handlers on threads of their own; the event loop is never
    blocked by them."""

    def __init__(self, callback: Handler, workers: int) -> None:
        self.callback = callback
        self.queue: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._work, name=f"prana-bucket-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        self.pull: _AsyncPull | None = None
        self.running = workers
        self.lock = threading.Lock()
        self.ended = asyncio.Event()

    def start(self, pull: _AsyncPull) -> None:
        self.pull = pull
        for thread in self.threads:
            thread.start()

    def submit(self, delivery: Delivery) -> None:
        self.queue.put(delivery)

    def _work(self) -> None:
        pull = self.pull
        assert pull is not None
        try:
            self._work_on(pull)
        finally:
            with self.lock:
                self.running -= 1
                last = self.running == 0
            if last:
                # The event loop is never blocked joining threads: the last
                # one to end tells it.
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    pull.loop.call_soon_threadsafe(self.ended.set)

    def _work_on(self, pull: _AsyncPull) -> None:
        while True:
            delivery = self.queue.get()
            if delivery is None:
                return
            if not pull.should_handle(delivery):
                continue
            result: object = None
            error: BaseException | None = None
            try:
                result = self.callback(delivery)
            except Exception as e:
                error = e
            _handled(delivery, result, error)

    async def stop(self, grace: float) -> int:
        for _ in self.threads:
            self.queue.put(None)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.ended.wait(), grace)
        with self.lock:
            return self.running


class _AsyncPull:
    def __init__(
        self,
        stub: BucketServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        runner: _Runner,
        consumer: str,
        flow_control: FlowControl,
        grace: float,
    ) -> None:
        self.stub = stub
        self.metadata = metadata
        self.runner = runner
        self.request = _core.stream_request(consumer, flow_control)
        self.flow = flow_control
        self.grace = grace
        self.book = LeaseBook(flow_control.lease_seconds, flow_control.max_lease_duration)
        # Outcomes settled on other threads wait here until the loop takes
        # them: one wake-up of the loop per burst, not one per outcome.
        self.from_threads: collections.deque[Outcome] = collections.deque()
        self.wake_pending = False
        self.marker_waiting = False
        self.outcomes: asyncio.Queue[Outcome | _Flush | None] = asyncio.Queue()
        self.stopping = asyncio.Event()
        self.lease_stop = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.stop_grace: float = grace
        self.call: Any = None
        self.closed = False
        self.generation = 0
        self.fatal: BucketError | None = None
        self.flush_deadline: float | None = None
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()

    def stop(self, grace: float | None = None) -> None:
        if not self.stop_requested.is_set():
            self.stop_grace = self.grace if grace is None else grace
            self.stop_requested.set()

    def _fail(self, error: BucketError) -> None:
        if self.fatal is None:
            self.fatal = error
        log.error("subscription stopped: %s", error)
        self.stop()

    async def run(self) -> None:
        self.runner.start(self)
        marker = asyncio.create_task(self._mark_loop())
        leaser = asyncio.create_task(self._lease_loop())
        streamer = asyncio.create_task(self._stream_loop())
        for task in (marker, leaser, streamer):
            task.add_done_callback(self._task_ended)
        cancelled = False
        try:
            await self.stop_requested.wait()
        except asyncio.CancelledError:
            # Cancelled from outside: stop gracefully all the same, then let
            # the cancellation go on.
            cancelled = True
            self.stop()
        await asyncio.shield(self._shutdown(marker, leaser, streamer))
        if cancelled:
            raise asyncio.CancelledError
        if self.fatal is not None:
            raise self.fatal

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        # A fault of this package's own (not a gRPC error, which each loop
        # handles) must stop the subscription, not leave it hanging.
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        if not isinstance(error, BucketError):
            error = BucketError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
        self._fail(error)

    async def _shutdown(
        self,
        marker: asyncio.Task[None],
        leaser: asyncio.Task[None],
        streamer: asyncio.Task[None],
    ) -> None:
        grace = self.stop_grace
        deadline = time.monotonic() + grace
        # Stop taking: the stream stays open (closing it would end the leases
        # of packets about to be marked); what arrives now is not handled and
        # goes back to the bucket when the stream closes.
        self.stopping.set()
        busy = await self.runner.stop(grace)
        if busy:
            log.warning(
                "%d handlers still running after the %.1f s grace: their packets "
                "go back to the bucket",
                busy,
                grace,
            )
        # Outcomes settled on threads just before they ended.
        self._take_from_threads()
        # Record what was settled; give a slow bucket a few seconds even when
        # the grace is spent, since these packets were handled.
        self.flush_deadline = max(deadline, time.monotonic() + 5.0)
        flush = _Flush()
        self.outcomes.put_nowait(flush)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                flush.done.wait(), max(self.flush_deadline - time.monotonic(), 0.0)
            )
        self.closed = True
        if self.call is not None:
            self.call.cancel()
        self.outcomes.put_nowait(None)
        self.lease_stop.set()
        _done, late = await asyncio.wait([streamer, marker, leaser], timeout=5.0)
        for task in late:
            task.cancel()

    # --- the stream -----------------------------------------------------------
    async def _stream_loop(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set() and not self.closed:
            self.generation += 1
            generation = self.generation
            self.book.remove_generation_before(generation)
            self.call = call = self.stub.StreamPending(self.request, metadata=self.metadata)
            try:
                async for response in call:
                    backoff.reset()
                    if self.stopping.is_set():
                        continue
                    delivery = Delivery(response, self._settle, generation)
                    self.book.add(delivery)
                    self.runner.submit(delivery)
                if not self.stopping.is_set():
                    log.info("the bucket ended the stream; reconnecting")
            except grpc.aio.AioRpcError as e:
                if self.stopping.is_set():
                    return
                error = from_rpc_error(e)
                if error.code not in _core.RETRYABLE:
                    self._fail(error)
                    return
                log.warning("stream lost (%s); reconnecting", error)
            except asyncio.CancelledError:
                if self.stopping.is_set():
                    return
                raise
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff.next())

    # --- handlers -------------------------------------------------------------
    def should_handle(self, delivery: Delivery) -> bool:
        """Whether a runner should start a delivery it took (any thread)."""
        if self.stopping.is_set():
            return False  # not started: back to the bucket with the stream
        if delivery.generation != self.generation:
            # Its stream ended, and with it the lease: the bucket delivers it
            # again (to this subscription's new stream, or another).
            self.book.remove(delivery.lease_token)
            return False
        return True

    def _settle(self, outcome: Outcome) -> None:
        if threading.get_ident() == self.loop_thread:
            self.outcomes.put_nowait(outcome)
            return
        self.from_threads.append(outcome)
        # Only an idle marker needs waking: a busy one takes what is here
        # when it next looks. Each wake-up is a write to the loop's socket,
        # which also hands the GIL to the loop thread and keeps this thread
        # waiting for it back.
        if self.marker_waiting and not self.wake_pending:
            self.wake_pending = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: it is over
                self.loop.call_soon_threadsafe(self._take_from_threads)

    def _take_from_threads(self) -> None:
        # Cleared before taking: an outcome appended meanwhile either is
        # taken below or schedules another call.
        self.wake_pending = False
        while self.from_threads:
            self.outcomes.put_nowait(self.from_threads.popleft())

    # --- outcomes -------------------------------------------------------------
    def _gather(
        self, item: Outcome | _Flush | None, batch: list[Outcome], flushes: list[_Flush]
    ) -> bool:
        """Adds ``item`` and whatever else is waiting to the batch; True at
        the end of the outcomes (the None that stops the marker)."""
        while item is not None:
            if isinstance(item, _Flush):
                flushes.append(item)
            else:
                batch.append(item)
            if len(batch) >= MAX_BATCH or self.outcomes.empty():
                return False
            item = self.outcomes.get_nowait()
        return True

    async def _mark_loop(self) -> None:
        while True:
            batch: list[Outcome] = []
            flushes: list[_Flush] = []
            # Set before looking, so that a thread settling meanwhile either
            # is seen here or wakes the marker.
            self.marker_waiting = True
            self._take_from_threads()
            item = await self.outcomes.get()
            self.marker_waiting = False
            last = self._gather(item, batch, flushes)
            if (
                not last
                and not flushes
                and len(batch) < min(MAX_BATCH, len(self.book))
                and not self.stopping.is_set()
            ):
                # More deliveries are in hand, so more outcomes are coming:
                # a moment's wait makes fewer, fuller MarkProcessedBatch
                # calls, each of which costs this process far more than an
                # item. A lone packet is marked at once.
                await asyncio.sleep(_MARK_LINGER)
                self._take_from_threads()
                if not self.outcomes.empty():
                    last = self._gather(self.outcomes.get_nowait(), batch, flushes)
            if batch:
                marks, nacks = _core.split_outcomes(batch)
                if marks:
                    await self._send_marks(marks)
                if nacks:
                    await self._send_nacks(nacks)
            for flush in flushes:
                flush.done.set()
            if last:
                return

    def _give_up(self) -> bool:
        return self.flush_deadline is not None and time.monotonic() > self.flush_deadline

    async def _send_marks(self, marks: list[Outcome]) -> None:
        backoff = Backoff(0.05, 2.0)
        while marks:
            request = pb.MarkProcessedBatchRequest(marks=[m.mark for m in marks if m.mark])
            try:
                response = await self.stub.MarkProcessedBatch(
                    request, metadata=self.metadata, timeout=_CALL_TIMEOUT
                )
            except grpc.aio.AioRpcError as e:
                error = from_rpc_error(e)
                if error.code in _FATAL_MARK:
                    self._fail(error)
                elif error.code in _core.RETRYABLE and not self._give_up():
                    log.warning("marking %d packets failed (%s); retrying", len(marks), error)
                    await asyncio.sleep(backoff.next())
                    continue
                log.error("%d outcomes not recorded: %s", len(marks), error)
                return
            retry = []
            for result in response.results:
                outcome = marks[result.index]
                if result.HasField("error"):
                    code = status_code(result.error.code)
                    if code is grpc.StatusCode.UNAVAILABLE and not self._give_up():
                        retry.append(outcome)
                        continue
                    log.warning(
                        "outcome of packet %s refused: %s %s",
                        outcome.packet_id,
                        code.name,
                        result.error.message,
                    )
                self.book.remove(outcome.lease_token)
            marks = retry
            if marks:
                await asyncio.sleep(backoff.next())

    async def _send_nacks(self, nacks: list[Outcome]) -> None:
        for outcome in nacks:
            self.book.remove(outcome.lease_token)
        request = pb.ExtendLeaseRequest(
            lease_tokens=[n.lease_token for n in nacks], lease_seconds=0
        )
        try:
            await self.stub.ExtendLease(request, metadata=self.metadata, timeout=_CALL_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            log.warning("nack of %d packets failed: %s", len(nacks), from_rpc_error(e))

    # --- leases ---------------------------------------------------------------
    async def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep; True when the leaser should stop."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.lease_stop.wait(), seconds)
        return self.lease_stop.is_set()

    async def _lease_loop(self) -> None:
        seconds = self.flow.lease_seconds
        while True:
            wait = min(self.book.next_due(time.monotonic()), seconds / 3.0)
            if await self._sleep_unless_stopped(max(wait, 0.05)):
                return
            tokens = self.book.due(time.monotonic())
            for start in range(0, len(tokens), MAX_BATCH):
                chunk = tokens[start : start + MAX_BATCH]
                asked = time.monotonic()
                try:
                    response = await self.stub.ExtendLease(
                        pb.ExtendLeaseRequest(lease_tokens=chunk, lease_seconds=seconds),
                        metadata=self.metadata,
                        timeout=min(_CALL_TIMEOUT, seconds / 3.0 + 1.0),
                    )
                except grpc.aio.AioRpcError as e:
                    log.warning("extending %d leases failed: %s", len(chunk), from_rpc_error(e))
                    if await self._sleep_unless_stopped(min(1.0, seconds / 6.0)):
                        return
                    break
                extended = []
                for result in response.results:
                    token = chunk[result.index]
                    if result.HasField("extended"):
                        extended.append(token)
                    elif status_code(result.error.code) is not grpc.StatusCode.UNAVAILABLE:
                        self.book.remove(token)
                self.book.extended(extended, asked)
