"""Blocking calls (fsync, writev, a scan) run off the event loop, never abandoned midway."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


async def in_thread(function: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking call in a thread. A cancellation waits for the call to end (so the
    descriptor it uses is not closed under it, and the lock it runs under is held until then),
    then propagates."""
    task = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
