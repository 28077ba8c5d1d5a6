"""One generation at a time, on a thread of its own, handed to the event loop token by token.

The model is not thread-safe, and a decode step keeps the CPU or GPU busy for milliseconds, which would
freeze every other connection if it ran on the event loop. So every request becomes a `Job` that a
single worker thread runs in arrival order (FIFO). The job's items (one per decoded token) go to the
event loop as they are produced, so a streamed reply flows while it is generated, and the worker checks
between two tokens whether the job was cancelled: a client that goes away frees the model after at most
one more decode step, and the next request in line starts.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Generic, TypeVar

logger = logging.getLogger("minillm.serving")

T = TypeVar("T")

_END = object()  # the last item a job delivers when it ends normally


class _Failure:
    """An exception raised on the worker thread, carried to the event loop to be raised there."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ServerBusy(Exception):
    """Raised by `GenerationWorker.submit` when as many requests as allowed are already admitted."""


class Job(Generic[T]):
    """A unit of work for the worker thread, and the channel its results come back through.

    `produce` is called on the worker thread and must return an iterator (typically a generator) whose
    every `next()` does a bounded amount of work, such as one decode step: the worker checks for
    cancellation between items and closes the iterator on cancellation, so closing must stop the work.
    """

    def __init__(self, produce: Callable[[], Iterator[T]], loop: asyncio.AbstractEventLoop) -> None:
        self._produce = produce
        self._loop = loop
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop the job: it is skipped if still waiting, or stopped after its current item if running.
        Safe to call from any thread, any number of times, also after the job ended."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def results(self) -> AsyncIterator[T]:
        """The job's items as they are produced; raises what `produce` raised. Ends early (without an
        error) when the job was cancelled. Meant for one consumer, on the loop the job was made on."""
        while True:
            item = await self._items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    # ------------------------------------------------------------------ worker side
    def _deliver(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    def _execute(self) -> None:
        """Run the job to its end or until it is cancelled; always delivers a final item."""
        if self.cancelled:
            self._deliver(_END)
            return
        try:
            items = self._produce()
            try:
                for item in items:
                    self._deliver(item)
                    if self.cancelled:
                        break
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()  # a generator's cleanup (closing the model's decode loop) runs now
        except Exception as error:  # noqa: BLE001 - delivered to the request that caused it
            if not isinstance(error, ValueError):
                logger.exception("generation failed")
            self._deliver(_Failure(error))
        else:
            self._deliver(_END)


class GenerationWorker:
    """Runs `Job`s one at a time, in submission order, on a daemon thread started on first use.

    At most `max_pending` jobs are admitted at once (the running one included); `submit` refuses more
    with `ServerBusy`, so that a burst of requests cannot queue unbounded work.
    """

    def __init__(self, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.max_pending = max_pending
        self._jobs: queue.SimpleQueue[Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._running = False
        self._thread: threading.Thread | None = None

    def submit(self, produce: Callable[[], Iterator[T]]) -> Job[T]:
        """Queue `produce` to run on the worker thread; call from the event loop that consumes the job."""
        job: Job[T] = Job(produce, asyncio.get_running_loop())
        with self._lock:
            if self._pending >= self.max_pending:
                raise ServerBusy(f"the server is busy: {self._pending} requests are already generating or "
                                 f"waiting (the limit is {self.max_pending}); retry later")
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="minillm-generation", daemon=True)
                self._thread.start()
        self._jobs.put(job)
        return job

    def stats(self) -> dict[str, int]:
        """How many requests are generating (0 or 1) and how many wait behind it."""
        with self._lock:
            running = int(self._running)
            return {"running": running, "queued": self._pending - running}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after the job it is running; waiting jobs are left undone."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._running = True
            try:
                job._execute()
            finally:
                with self._lock:
                    self._running = False
                    self._pending -= 1
