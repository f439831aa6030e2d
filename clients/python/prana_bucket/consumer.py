"""The blocking consumer: a StreamPending subscription whose deliveries are
handled on a pool of threads, in the manner of google-cloud-pubsub's
``SubscriberClient.subscribe``.

    subscriber = Subscriber("localhost:3000", token=os.environ.get("BUCKET_TOKEN"))
    future = subscriber.subscribe(handle, consumer="karma-tracker")
    future.result()          # until future.cancel() (graceful) or a fatal error

Threads: one reads the stream, ``max_workers`` run the handler, one records
outcomes (MarkProcessedBatch, as many as piled up while the previous call
was answered; nacks with ExtendLease 0), and one extends the leases of what
is still in hand. The stream is kept open until the outcomes of a stop are
recorded: the bucket ends a stream's leases the moment it closes, so closing
first would hand packets that are about to be marked to another consumer.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from prana_bucket import _core, pb
from prana_bucket._convert import KarmaAction
from prana_bucket._core import (
    MAX_BATCH,
    Backoff,
    Delivery,
    FlowControl,
    LeaseBook,
    Outcome,
    log,
)
from prana_bucket._transport import Connection
from prana_bucket.errors import BucketError, from_rpc_error, status_code

#: A handler: takes a delivery, returns the karma actions to record (or
#: None), or raises to record a failure with the exception's message.
Handler = Callable[[Delivery], Iterable[KarmaAction] | None]

# Deadline of each MarkProcessedBatch / ExtendLease call: a bucket that
# hangs is retried like one that is down.
_CALL_TIMEOUT = 30.0
# Codes after which marking cannot succeed by retrying: the subscription fails.
_FATAL_MARK = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class _Flush:
    """Put in the outcome queue: set once everything before it was sent."""

    def __init__(self) -> None:
        self.done = threading.Event()


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
        return len(self._pull.book)


class Subscriber:
    """A connection to the bucket for consuming. One channel is shared by
    every subscription it makes; ``close()`` (or leaving a ``with`` block)
    stops them gracefully and closes it."""

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
        self._channel = self.connection.channel()
        self._stub = pb.BucketServiceStub(self._channel)
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
            self._stub,
            self.connection.metadata,
            callback,
            consumer,
            flow_control or FlowControl(),
            max_workers,
            grace,
        )
        future = StreamingPullFuture(pull)
        pull.start(future)
        self._futures.append(future)
        return future

    def close(self, grace: float | None = None) -> None:
        for future in self._futures:
            future.stop(grace)
        self._channel.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pull:
    def __init__(
        self,
        stub: pb.BucketServiceStub,
        metadata: tuple[tuple[str, str], ...],
        callback: Handler,
        consumer: str,
        flow_control: FlowControl,
        max_workers: int,
        grace: float,
    ) -> None:
        self.stub = stub
        self.metadata = metadata
        self.callback = callback
        self.request = _core.stream_request(consumer, flow_control)
        self.flow = flow_control
        self.grace = grace
        self.book = LeaseBook(flow_control.lease_seconds, flow_control.max_lease_duration)
        self.work: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self.outcomes: queue.SimpleQueue[Outcome | _Flush | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.lease_stop = threading.Event()
        self.lock = threading.Lock()
        self.call: Any = None  # the StreamPending call now open
        self.closed = False
        self.generation = 0
        self.fatal: BucketError | None = None
        self.flush_deadline: float | None = None
        self.stop_started = False
        self.future: StreamingPullFuture | None = None
        self.workers = [
            threading.Thread(target=self._work_loop, name=f"prana-bucket-worker-{i}", daemon=True)
            for i in range(max_workers)
        ]
        self.stream_thread = threading.Thread(
            target=self._stream_loop, name="prana-bucket-stream", daemon=True
        )
        self.mark_thread = threading.Thread(
            target=self._mark_loop, name="prana-bucket-marker", daemon=True
        )
        self.lease_thread = threading.Thread(
            target=self._lease_loop, name="prana-bucket-leaser", daemon=True
        )

    def start(self, future: StreamingPullFuture) -> None:
        self.future = future
        for thread in (*self.workers, self.mark_thread, self.lease_thread, self.stream_thread):
            thread.start()

    # --- stopping -------------------------------------------------------------
    def stop(self, grace: float | None = None) -> None:
        with self.lock:
            if self.stop_started:
                return
            self.stop_started = True
        threading.Thread(
            target=self._shutdown,
            args=(self.grace if grace is None else grace,),
            name="prana-bucket-stop",
            daemon=True,
        ).start()

    def _fail(self, error: BucketError) -> None:
        if self.fatal is None:
            self.fatal = error
        log.error("subscription stopped: %s", error)
        self.stop()

    def _shutdown(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        # Stop taking: the stream stays open, what arrives now is not handled
        # and goes back to the bucket when the stream closes.
        self.stopping.set()
        for _ in self.workers:
            self.work.put(None)
        for worker in self.workers:
            worker.join(max(deadline - time.monotonic(), 0.0))
        busy = sum(worker.is_alive() for worker in self.workers)
        if busy:
            log.warning(
                "%d handlers still running after the %.1f s grace: their packets "
                "go back to the bucket",
                busy,
                grace,
            )
        # Record what was settled; give a slow bucket a few seconds even when
        # the grace is spent, since these packets were handled.
        self.flush_deadline = max(deadline, time.monotonic() + 5.0)
        flush = _Flush()
        self.outcomes.put(flush)
        flush.done.wait(max(self.flush_deadline - time.monotonic(), 0.0))
        with self.lock:
            self.closed = True
            if self.call is not None:
                self.call.cancel()
        self.outcomes.put(None)
        self.lease_stop.set()
        for thread in (self.stream_thread, self.mark_thread, self.lease_thread):
            thread.join(5.0)
        assert self.future is not None
        if self.fatal is not None:
            self.future.set_exception(self.fatal)
        else:
            self.future.set_result(None)

    # --- the stream -------------------------------------------------------------
    def _stream_loop(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set():
            with self.lock:
                if self.closed:
                    return
                self.generation += 1
                generation = self.generation
                # Leases of an earlier stream ended with it: nothing to extend.
                self.book.remove_generation_before(generation)
                self.call = call = self.stub.StreamPending(self.request, metadata=self.metadata)
            try:
                for response in call:
                    backoff.reset()
                    if self.stopping.is_set():
                        continue
                    delivery = Delivery(response, self._settle, generation)
                    self.book.add(delivery)
                    self.work.put(delivery)
                if not self.stopping.is_set():
                    log.info("the bucket ended the stream; reconnecting")
            except grpc.RpcError as e:
                if self.stopping.is_set():
                    return
                error = from_rpc_error(e)
                if error.code not in _core.RETRYABLE:
                    self._fail(error)
                    return
                log.warning("stream lost (%s); reconnecting", error)
            self.stopping.wait(backoff.next())

    # --- handlers ---------------------------------------------------------------
    def _settle(self, outcome: Outcome) -> None:
        self.outcomes.put(outcome)

    def _work_loop(self) -> None:
        while True:
            delivery = self.work.get()
            if delivery is None:
                return
            if self.stopping.is_set():
                continue  # not started: back to the bucket with the stream
            if delivery.generation != self.generation:
                # Its stream ended, and with it the lease: the bucket delivers
                # it again (to this subscription's new stream, or another).
                self.book.remove(delivery.lease_token)
                continue
            result: object = None
            error: BaseException | None = None
            try:
                result = self.callback(delivery)
            except Exception as e:
                error = e
                log.warning("handler failed on packet %s: %r", delivery.packet_id, e)
            _core.settle_after_handler(delivery, result, error)

    # --- outcomes -----------------------------------------------------------------
    def _mark_loop(self) -> None:
        while True:
            batch: list[Outcome] = []
            flushes: list[_Flush] = []
            item = self.outcomes.get()
            last = item is None
            while item is not None:
                if isinstance(item, _Flush):
                    flushes.append(item)
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self.outcomes.get_nowait()
                except queue.Empty:
                    break
                last = item is None
            if batch:
                marks, nacks = _core.split_outcomes(batch)
                if marks:
                    self._send_marks(marks)
                if nacks:
                    self._send_nacks(nacks)
            for flush in flushes:
                flush.done.set()
            if last:
                return

    def _give_up(self) -> bool:
        return self.flush_deadline is not None and time.monotonic() > self.flush_deadline

    def _send_marks(self, marks: list[Outcome]) -> None:
        backoff = Backoff(0.05, 2.0)
        while marks:
            request = pb.MarkProcessedBatchRequest(marks=[m.mark for m in marks if m.mark])
            try:
                response = self.stub.MarkProcessedBatch(
                    request, metadata=self.metadata, timeout=_CALL_TIMEOUT
                )
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                if error.code in _FATAL_MARK:
                    self._fail(error)
                elif error.code in _core.RETRYABLE and not self._give_up():
                    log.warning("marking %d packets failed (%s); retrying", len(marks), error)
                    time.sleep(backoff.next())
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
                time.sleep(backoff.next())

    def _send_nacks(self, nacks: list[Outcome]) -> None:
        for outcome in nacks:
            self.book.remove(outcome.lease_token)
        request = pb.ExtendLeaseRequest(
            lease_tokens=[n.lease_token for n in nacks], lease_seconds=0
        )
        try:
            self.stub.ExtendLease(request, metadata=self.metadata, timeout=_CALL_TIMEOUT)
        except grpc.RpcError as e:
            # The leases run out by themselves: a nack only hurries them.
            log.warning("nack of %d packets failed: %s", len(nacks), from_rpc_error(e))

    # --- leases -------------------------------------------------------------------
    def _lease_loop(self) -> None:
        seconds = self.flow.lease_seconds
        while True:
            wait = min(self.book.next_due(time.monotonic()), seconds / 3.0)
            if self.lease_stop.wait(max(wait, 0.05)):
                return
            tokens = self.book.due(time.monotonic())
            for start in range(0, len(tokens), MAX_BATCH):
                chunk = tokens[start : start + MAX_BATCH]
                asked = time.monotonic()
                try:
                    response = self.stub.ExtendLease(
                        pb.ExtendLeaseRequest(lease_tokens=chunk, lease_seconds=seconds),
                        metadata=self.metadata,
                        timeout=min(_CALL_TIMEOUT, seconds / 3.0 + 1.0),
                    )
                except grpc.RpcError as e:
                    log.warning("extending %d leases failed: %s", len(chunk), from_rpc_error(e))
                    # Not at once again: the bucket is likely down.
                    self.lease_stop.wait(min(1.0, seconds / 6.0))
                    break
                extended = []
                for result in response.results:
                    token = chunk[result.index]
                    if result.HasField("extended"):
                        extended.append(token)
                    elif status_code(result.error.code) is not grpc.StatusCode.UNAVAILABLE:
                        # This stream no longer holds it (marked meanwhile, or
                        # the stream ended): nothing to extend any more.
                        self.book.remove(token)
                self.book.extended(extended, asked)
