"""The pulls in the air: one :class:`Flight` per canonical URL, and the workers that fly them.

Single flight, in this process: a caller who asks for a URL already being pulled joins its
flight (a caller with other credentials than a protected pull's first proves its access);
otherwise a new flight waits in a queue for one of ``PULL_WORKERS`` threads, at most
``MAX_QUEUED_PULLS`` of them (then 503 busy).  :class:`FlightTable`, a base of the
service, holds the table, lands a flight (forgets it, then answers every caller) and
remembers each URL's last failure for status.  It never pulls anything itself and never
touches the store: what a flight does is :mod:`nekko_sm.puller`'s.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable

from nekko_sm import logs
from nekko_sm.errors import Busy, Cancelled, Conflict, NekkoError
from nekko_sm.sources.base import Progress

if TYPE_CHECKING:  # imported by the first Flight: status, path and ls make none
    from concurrent.futures import Future

log = logs.get("nekko_sm.service")  # imports logging at its first use

# Failures remembered for status (a URL's last error), the oldest forgotten first.
MAX_FAILURES = 1000

# Pulls run on a fixed pool of worker threads (each pull may use up to --jobs more for its
# blobs and ranges); the rest wait in a queue, at most MAX_QUEUED_PULLS, beyond which a new
# pull is refused (503 busy).  500 slow pulls used to be 1,001 threads and 2,506 fds.
PULL_WORKERS = 16
MAX_QUEUED_PULLS = 1000


class Workers:
    """A fixed number of daemon threads that run queued pulls, oldest first.  Threads start
    as work comes and end after a minute idle, or at :meth:`close`."""

    IDLE = 60.0

    def __init__(self, n: int) -> None:
        self._n = n
        self._cond = threading.Condition()
        self._queue: deque[tuple[Callable[..., None], tuple]] = deque()
        self._threads = 0
        self._idle = 0
        self._closed = False

    def __len__(self) -> int:
        """Pulls waiting for a worker."""
        with self._cond:
            return len(self._queue)

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        with self._cond:
            self._queue.append((fn, args))
            if len(self._queue) > self._idle and self._threads < self._n:
                self._threads += 1
                threading.Thread(target=self._loop, daemon=True, name="pull worker").start()
            self._cond.notify()

    def discard(self, first_arg: object) -> bool:
        """Take the queued call whose first argument is ``first_arg`` out of the queue."""
        with self._cond:
            for item in self._queue:
                if item[1] and item[1][0] is first_arg:
                    self._queue.remove(item)
                    return True
        return False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._queue and not self._closed:
                    if not self._cond.wait(self.IDLE) and not self._queue:
                        break
                self._idle -= 1
                if not self._queue:
                    self._threads -= 1
                    return
                fn, args = self._queue.popleft()
            try:
                fn(*args)
            except BaseException:  # _run answers its callers itself: this is a bug
                log.exception("pull worker")


class Flight:
    """One pull in progress, shared by every caller who asks for the same URL."""

    def __init__(
        self, url: str, sink: Callable[[int], None] | None = None, limit: int | None = None
    ) -> None:
        from concurrent.futures import Future

        self.url = url
        self.future: Future = Future()
        self.cancel = threading.Event()
        self.progress = Progress(sink, limit, url)
        self.started = time.time()
        self.keep_partial = False  # set when stopping the server: the pull stays resumable
        self.digest: str | None = None  # the digest the pull checks (its first caller's)
        self.cred = "anonymous"  # hash of the credentials the pull uses (access.credential_hash)
        self.protected = False  # the pull uses credentials: its entry will be protected
        self.marks: dict[str, Any] = {}  # pin/hold its callers asked for, set at commit

    def want(self, pin: bool | None, hold: float | None) -> None:
        """A caller's pin and hold, applied when the pull commits (the last pin wins)."""
        if pin is not None:
            self.marks["pin"] = pin
        if hold:
            self.marks["hold"] = max(hold, self.marks.get("hold", 0))

    def joined(self, digest: str | None, confirm: Callable[[], None] | None = None) -> Flight:
        """This flight as another caller sees it: ``confirm()`` proves the caller's access
        (a protected pull, other credentials), then the answer must match ``digest``."""
        if (digest is None or digest == self.digest) and confirm is None:
            return self
        import copy
        from concurrent.futures import Future

        view = copy.copy(self)
        view.future = Future()

        def answer(done: Future) -> None:
            try:
                entry, created = done.result()
                if confirm is not None:
                    confirm()  # first: a refused caller learns nothing, not even the digest
                check_entry_digest(entry, digest)
            except BaseException as e:  # noqa: BLE001 - the joined caller's answer
                view.future.set_exception(e)
            else:
                view.future.set_result((entry, created))

        def land(done: Future) -> None:
            if confirm is None:
                answer(done)
            else:  # asks the upstream: not on the thread that answers everyone else
                threading.Thread(
                    target=answer, args=(done,), name="access check", daemon=True
                ).start()

        self.future.add_done_callback(land)
        return view


class FlightTable:
    """The flights of one service by URL, the queue of those waiting for a worker, and the
    last failure of each URL.  ``_lock`` guards the table (and the service's counters)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}
        # The last failure of each URL, as its JSON error only (never the exception: its
        # traceback holds frames and buffers), the oldest forgotten past MAX_FAILURES.
        self._failures: OrderedDict[str, dict] = OrderedDict()
        self._workers = Workers(PULL_WORKERS)

    def _fly(
        self,
        new: Flight,
        pin: bool | None,
        hold: float | None,
        confirm: Callable[[], None],
        run: Callable[..., None],
        *args: object,
    ) -> Flight:
        """The flight of ``new.url``: the one in the air, joined (``confirm()`` first, when
        it is protected and ``new`` has other credentials), else ``new``, queued for a
        worker that calls ``run(new, *args)``.  Busy when the queue is full."""
        key = new.url
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.want(pin, hold)
                mine = None
                if flight.protected and new.cred != flight.cred:
                    mine = confirm
                return flight.joined(new.digest, mine)
            if len(self._workers) >= MAX_QUEUED_PULLS:
                raise Busy(f"{MAX_QUEUED_PULLS} pulls are waiting already: try again later")
            new.want(pin, hold)
            self._flights[key] = new
            self._failures.pop(key, None)
            self._workers.submit(run, new, *args)
        return new

    def _land(self, flight: Flight, result=None, error: NekkoError | None = None) -> None:
        """Forget the flight first, then answer: a woken caller never joins a finished one."""
        with self._lock:
            if self._flights.get(flight.url) is flight:
                del self._flights[flight.url]
            if error is not None and not flight.future.done():
                self._failures[flight.url] = error.to_json()["error"]
                self._failures.move_to_end(flight.url)
                while len(self._failures) > MAX_FAILURES:
                    self._failures.popitem(last=False)
        if flight.future.done():
            return
        if error is not None:
            flight.future.set_exception(error)
        else:
            flight.future.set_result(result)

    def _live(self, key: str) -> tuple[Progress | None, dict | None]:
        with self._lock:
            flight = self._flights.get(key)
            failure = self._failures.get(key)
        return (flight.progress if flight is not None else None), failure

    def _forget(self, key: str) -> None:
        """Forget the last failure of ``key``."""
        with self._lock:
            self._failures.pop(key, None)

    def _cancel(self, key: str, wait: float) -> Flight | None:
        """Cancel the flight of ``key``, if any, and wait up to ``wait`` seconds for it."""
        from concurrent.futures import TimeoutError as FutureTimeout

        with self._lock:
            flight = self._flights.get(key)
        if flight is not None:
            flight.cancel.set()
            if self._workers.discard(flight):  # still waiting for a worker: it ends now
                self._land(flight, error=Cancelled(f"pull of {key} was cancelled"))
            try:
                flight.future.result(timeout=wait)
            except (NekkoError, FutureTimeout):  # its failure is its caller's; we only wait
                pass
        return flight

    def _stop_flights(self) -> None:
        """Cancel every flight (its partial download kept for a resume), stop the workers
        and wait a little for the flights to land."""
        from concurrent.futures import TimeoutError as FutureTimeout

        with self._lock:
            flights = list(self._flights.values())
        for f in flights:
            f.keep_partial = True
            f.cancel.set()
            if self._workers.discard(f):
                self._land(f, error=Cancelled(f"pull of {f.url} was cancelled: stopping"))
        self._workers.close()
        for f in flights:
            try:
                f.future.result(timeout=10)
            except (NekkoError, FutureTimeout):  # its failure is its caller's; we only wait
                pass


def check_entry_digest(entry: dict, wanted: str | None) -> None:
    """A caller's digest selects and checks: a cached entry with other bytes is a 409.

    Images answer to the digest the reference resolved to and to the chosen manifest's.
    """
    if wanted is None or wanted in (entry.get("digest"), entry.get("manifest")):
        return
    raise Conflict(
        f"{entry['url']} is cached with digest {entry.get('digest')}, not the"
        f" {wanted} asked for: remove it first (rm, or DELETE) to pull it again"
    )
