"""The one persistent background thread that runs the network (cuDNN and MPS caches are per thread); no Qt inside."""

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any


class Worker:
    """One persistent background thread for the network work (cuDNN and MPS caches are per thread); no Qt inside.

    :meth:`submit` queues ``job()`` for the thread; :meth:`deliver`, called on the main thread (the widget calls it
    from a QTimer), runs ``done(result, error)`` there for every finished job, in submission order. Only one job runs
    at a time.
    """

    def __init__(self, name: str = "MAISSegment worker") -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs submitted whose ``done`` has not been delivered yet."""
        with self._lock:
            return self._pending

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident

    def submit(self, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None] | None = None) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the MAISSegment worker thread has stopped")
        with self._lock:
            self._pending += 1
        self._jobs.put((job, done))

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, done = item
            try:
                result, error = job(), None
            except BaseException as exc:  # any failure (even SystemExit/KeyboardInterrupt raised in a job) is
                result, error = None, exc  # delivered to the main thread, which reports it and is no longer busy
            self._results.put((done, result, error))

    def deliver(self) -> int:
        """Run the ``done`` callbacks of finished jobs (call on the main thread). Returns how many were delivered."""
        count = 0
        while True:
            try:
                done, result, error = self._results.get_nowait()
            except queue.Empty:
                return count
            with self._lock:
                self._pending -= 1
            count += 1
            if done is None:
                if error is not None:
                    logging.error("MAISSegment: background job failed: %s", error)
                continue
            try:
                done(result, error)
            except Exception:  # one failing callback must not stop the delivery of the others
                logging.exception("MAISSegment: error while handling a background result")

    def stop(self, timeout: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)
