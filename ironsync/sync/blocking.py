"""Blocking calls (fsync, writev, a scan) run off the event loop, never abandoned midway."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

_T = TypeVar("_T")
_Item = TypeVar("_Item")


async def in_thread(function: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking call in a thread. A cancellation waits for the call to end (so the
    descriptor it uses is not closed under it, and the lock it runs under is held until then),
    then propagates; so does a second one meanwhile (a gather that is cancelled cancels its
    tasks, and its caller may cancel them again)."""
    task = asyncio.ensure_future(asyncio.to_thread(function, *args))
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
