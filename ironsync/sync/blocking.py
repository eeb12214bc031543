"""Blocking calls (fsync, writev, a scan) run off the event loop, never abandoned midway."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

_T = TypeVar("_T")
_Item = TypeVar("_Item")


async def in_thread(function: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking call in a thread. A cancellation waits for the call to end (so the
    descriptor it uses is not closed under it, and the lock it runs under is held until then),
    then propagates; so does a second one meanwhile (a gather that is cancelled cancels its
    tasks, and its caller may cancel them again)."""
    return await _waited(asyncio.ensure_future(asyncio.to_thread(function, *args)))


class OwnThread:
    """A thread of one's own for a chain of blocking calls that must not wait behind the
    shared pool's jobs (the committer's steps, while pulls write and flush in the pool):
    `await own.run(function, *args)`, with in_thread's rules. Started on first use; `close`
    ends it once its calls are done."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def run(self, function: Callable[..., _T], *args: Any) -> _T:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.name)
        call = functools.partial(contextvars.copy_context().run, function, *args)
        return await _waited(asyncio.get_running_loop().run_in_executor(self._pool, call))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


async def _waited(task: asyncio.Future[_T]) -> _T:
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await wait_through_cancellations([task])
        raise


async def wait_through_cancellations(futures: list[asyncio.Future[Any]]) -> None:
    """Wait until every one of `futures` is done, whatever cancellations arrive meanwhile
    (the caller is being cancelled already, and re-raises that once this returns)."""
    while not all(f.done() for f in futures):
        try:
            await asyncio.wait(futures)
        except asyncio.CancelledError:
            continue


def each(call: Callable[[_Item], _T], items: Iterable[_Item]) -> list[_T | Exception]:
    """`call` on every item in turn (one thread job for a batch: `in_thread(each, ...)`):
    each one's result, or the exception it raised; an item that fails, fails alone."""
    outcomes: list[_T | Exception] = []
    for item in items:
        try:
            outcomes.append(call(item))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes
