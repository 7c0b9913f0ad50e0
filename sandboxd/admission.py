"""Admission: how many runs at once, who waits, and who is turned away.

Daemon side, pure asyncio. A bounded number of slots; callers beyond it wait in a bounded queue for at most
`max_wait` seconds, then get Overloaded (RESOURCE_EXHAUSTED with a retry hint). Waiters are served round-robin
across principals, so one caller flooding the daemon with requests waits behind its own requests, not in front
of everyone else's.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from typing import AsyncIterator

from .errors import Overloaded


def default_max_concurrent() -> int:
    """Two runs per CPU, but no more than one per 256 MiB of memory (a run's default memory limit)."""
    cpus = len(os.sched_getaffinity(0)) or 1
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(2 * cpus, mem // (256 << 20)))


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, max_wait: float, per_principal: int = 0):
        self.max_concurrent = max_concurrent or default_max_concurrent()
        self.max_queue, self.max_wait, self.per_principal = max_queue, max_wait, per_principal
        self.active: collections.Counter[str] = collections.Counter()
        self.waiting: dict[str, collections.deque[asyncio.Future]] = collections.OrderedDict()

    def reconfigure(self, max_concurrent: int, max_queue: int, max_wait: float) -> None:
        """New limits apply to the next admission; runs already admitted keep their slots."""
        self.max_concurrent = max_concurrent or default_max_concurrent()
        self.max_queue, self.max_wait = max_queue, max_wait
        self._grant()

    @property
    def running(self) -> int:
        return sum(self.active.values())

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def _may_run(self, principal: str) -> bool:
        return self.running < self.max_concurrent and (not self.per_principal
                                                       or self.active[principal] < self.per_principal)

    @contextlib.asynccontextmanager
    async def slot(self, principal: str = "") -> AsyncIterator[float]:
        """Hold a run slot for the body; yields the seconds spent waiting."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        if not self.queued and self._may_run(principal):
            self.active[principal] += 1
        else:
            if self.queued >= self.max_queue:
                raise Overloaded(f"too many runs: {self.running} running and {self.queued} queued "
                                 f"(max_concurrent {self.max_concurrent}, max_queue {self.max_queue})",
                                 retry_after=1.0)
            fut = loop.create_future()
            self.waiting.setdefault(principal, collections.deque()).append(fut)
            try:
                await asyncio.wait_for(asyncio.shield(fut), self.max_wait)
            except (asyncio.TimeoutError, asyncio.CancelledError) as e:
                if fut.done() and not fut.cancelled():
                    self._release(principal)  # granted just as we gave up: pass it on
                else:
                    fut.cancel()
                    self._forget(principal, fut)
                if isinstance(e, asyncio.TimeoutError):
                    raise Overloaded(f"no run slot became free within {self.max_wait:g}s "
                                     f"({self.running} running, {self.queued} queued)", retry_after=2.0) from None
                raise
        try:
            yield loop.time() - start
        finally:
            self._release(principal)

    def _forget(self, principal: str, fut: asyncio.Future) -> None:
        q = self.waiting.get(principal)
        if q is not None:
            with contextlib.suppress(ValueError):
                q.remove(fut)
            if not q:
                del self.waiting[principal]

    def _release(self, principal: str) -> None:
        self.active[principal] -= 1
        if self.active[principal] <= 0:
            del self.active[principal]
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to waiters, one principal at a time in rotation."""
        for _ in range(len(self.waiting)):
            if self.running >= self.max_concurrent or not self.waiting:
                return
            principal, q = next(iter(self.waiting.items()))
            self.waiting.move_to_end(principal)  # next grant goes to the next principal
            if self.per_principal and self.active[principal] >= self.per_principal:
                continue
            fut = q.popleft()
            if not q:
                del self.waiting[principal]
            if not fut.done():
                self.active[principal] += 1
                fut.set_result(None)
