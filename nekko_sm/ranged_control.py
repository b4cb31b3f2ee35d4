"""How many connections one ranged download uses, adapted while it runs.

For a blob of at least ``GROW_MIN``: one stream first; after a short measurement, if
the hasher is not already the limit, the first count of ``connections`` (``--jobs``),
twice as many, ... up to :func:`connection_cap` that would keep the hasher busy at the
rate one stream got (a server that limits each connection to 20 MB/s, with the hasher
10% busy: 16), then twice as many, each step kept only while the aggregate rate rises by
``GAIN`` and the hasher keeps up; a step that does not pay is undone and the count stays.  What worked is remembered per origin for this process, and the next blob from
there starts at it.  Extra connections come from the transfer's shared budgets, so many
blobs at once do not multiply them.  A smaller blob simply gets ``connections`` from the
start.  :class:`ConnectionControl` measures and sets the target; it starts no worker
itself (the fetch in :mod:`nekko_sm.ranged` does, through ``_spawn``) and reads no byte.
"""

from __future__ import annotations

import logging

from nekko_sm.httpio import origin
from nekko_sm.ranged_parts import PartMap
from nekko_sm.refs import redact

log = logging.getLogger("nekko_sm.ranged")

MAX_CONNECTIONS = 32  # per blob, however much faster more would be
GROW_MIN = 64 << 20  # smaller blobs keep the connections they start with
PROBE = 0.15  # seconds one stream is measured before more connections are tried
WINDOW = 0.25  # seconds each later connection count is measured
WINDOW_BYTES = 2 << 20  # ... and at least this much per connection (servers pace in bursts),
WINDOW_MAX = 4  # unless the window is this many times longer already
SETTLE = 0.5  # at most this long for new connections to start bringing bytes
GAIN = 1.25  # a step up must raise the aggregate rate this much to be kept
HASH_BOUND = 0.85  # the hasher busy this share of the time: more bytes would only wait


def connection_cap(jobs: int) -> int:
    """Connections one transfer may hold for ranged downloads: up to 4 x ``--jobs``
    (at most ``MAX_CONNECTIONS``), never fewer than ``--jobs`` itself."""
    return max(jobs, min(MAX_CONNECTIONS, 4 * jobs))


class ConnectionControl(PartMap):
    """The connection count of one ranged download: its levels, their rates, and when to
    stop trying more."""

    def __init__(self, transfer, url: str, writer, connections: int, max_span: int | None) -> None:
        super().__init__(writer, connections, max_span)
        self.transfer = transfer
        self.url = url
        self.connections = connections
        cap = max(self.connections, getattr(transfer, "connection_cap", self.connections))
        self.adaptive = self.total >= GROW_MIN and self.connections > 1
        levels = [1, self.connections]
        while levels[-1] < cap:
            levels.append(min(cap, levels[-1] * 2))
        self._levels = levels
        self._level = 0
        self._rates: dict[int, float] = {}
        self._prev: int | None = None  # the level measured before this one
        self._mark: tuple | None = None
        self._settle_until = 0.0
        self._frozen = not self.adaptive
        self._origin = origin(url)
        self._memory = getattr(transfer, "connection_memory", None)
        remembered = self._memory.get(self._origin) if self._memory is not None else None
        if self.adaptive:
            self.target = 1  # one stream first
            if remembered:  # what this origin settled at earlier in this process
                self.target = min(cap, remembered)
                self._frozen = True

    def _adapt(self, now: float) -> None:
        got = self._got()
        busy = self.writer.hash_stats()[1] if hasattr(self.writer, "hash_stats") else 0.0
        if self._mark is None:  # wait until the connections of this step bring bytes
            with self._lock:  # (one stream: past the burst a server sends at first)
                first = WINDOW_BYTES if self._level == 0 else 1
                ready = all(w.got >= first for w in self._workers if w.alive)
            if ready or now >= self._settle_until:
                self._mark = (now, got, busy)
            return
        t0, g0, b0 = self._mark
        n = self._levels[self._level]
        least = PROBE if self._level == 0 else WINDOW
        if now - t0 < least or (got - g0 < n * WINDOW_BYTES and now - t0 < least * WINDOW_MAX):
            return
        rate = (got - g0) / (now - t0)
        hashing = (busy - b0) / (now - t0)
        self._rates[self._level] = rate
        below = self._rates.get(self._prev) if self._prev is not None else None
        left = self.total - sum(p.next - p.start for p in self.parts)
        log.debug(
            "%s: %d connection(s): %.0f MiB/s, hasher busy %.0f%%",
            redact(self.url),
            n,
            rate / (1 << 20),
            100 * hashing,
        )
        self._mark = None
        self._settle_until = now + SETTLE
        if below is not None and rate < below * GAIN:
            assert self._prev is not None
            self._set_level(self._prev)  # the last step did not pay: undo it, stay
            self._frozen = True
        elif hashing >= HASH_BOUND or self._level + 1 >= len(self._levels) or left < GROW_MIN // 4:
            self._frozen = True  # hashing is the limit already, or little is left
        else:
            prev = self._level
            if self._set_level(self._next_level(hashing)):
                self._prev = prev
            else:
                self._frozen = True  # no connections to spare in the transfer
        if self._frozen:
            log.debug(
                "%s: staying at %d connection(s)", redact(self.url), self._levels[self._level]
            )

    def _next_level(self, hashing: float) -> int:
        """One step up; from the one-stream probe, straight to the first level with enough
        connections to keep the hasher busy at that stream's rate (``GAIN / hashing``), so
        that a server which limits each connection is not climbed one doubling at a time
        (each step costs a measurement window)."""
        nxt = self._level + 1
        if self._level == 0 and hashing > 0:
            want = GAIN / hashing
            while nxt + 1 < len(self._levels) and self._levels[nxt] < want:
                nxt += 1
        return nxt

    def _set_level(self, level: int) -> bool:
        """Aim at ``self._levels[level]`` connections; False if none could be added."""
        want, old = self._levels[level], self.target
        self.target = want  # before the new workers look at it
        if want > old:
            added = 0
            for _ in range(want - self._active):  # (not while short: they may leave at once)
                if not self._spawn():
                    break
                added += 1
            if not added:
                self.target = old
                return False
            self.target = min(want, old + added)  # fewer were free: that is what is measured
            self._levels[level] = self.target
        self._level = level
        return True

    def _spawn(self, first=None, own: bool = False) -> bool:
        """Start one more worker; False when the transfer has no connection to spare."""
        raise NotImplementedError
