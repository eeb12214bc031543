"""Coalesced runs of one job: at most one at a time, shared by everyone who asked meanwhile.

A peer starting a full sync asks us to scan first, so that "every change made before my
request is indexed". Running a scan per request would let one peer asking in a loop keep this
node scanning (and everyone else waiting); running none while one is already in progress
would break the promise, since that scan may have passed the changed file already. So:

- `run()` when no run is in progress starts one at once and waits for it;
- `run()` during a run waits for the *next* run, which starts as soon as the current one ends
  (so it starts after the request), and every caller that arrives during the same run shares
  that next one.

So at most one run is in progress, at most one more is pending, and a caller waits for at
most two runs. A caller that is cancelled stops waiting; the run goes on for the others.
A run that raises raises in every caller waiting for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Runs `job` as described in the module docstring."""

    def __init__(self, job: Callable[[], Awaitable[T]]) -> None:
        self._job = job
        self._current: asyncio.Future[T] | None = None
        self._next: asyncio.Future[T] | None = None
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # runs started, for tests and status

    @property
    def running(self) -> bool:
        return self._current is not None

    async def run(self) -> T:
        """The result of a run that started after this call."""
        loop = asyncio.get_running_loop()
        if self._current is None:
            future: asyncio.Future[T] = loop.create_future()
            self._start(future)
        else:
            if self._next is None:
                self._next = loop.create_future()
            future = self._next
        return await asyncio.shield(future)

    def _start(self, future: asyncio.Future[T]) -> None:
        self._current = future
        self.runs += 1
        self._task = asyncio.get_running_loop().create_task(self._run(future))

    async def _run(self, future: asyncio.Future[T]) -> None:
        try:
            result = await self._job()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: callers who gave up need not see it logged
        else:
            future.set_result(result)
        finally:
            self._current = None
            pending, self._next = self._next, None
            if pending is not None:
                if future.cancelled():
                    pending.cancel()
                else:
                    self._start(pending)

    async def aclose(self) -> None:
        """Cancel the run in progress (and the pending one), and wait for it to end."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
