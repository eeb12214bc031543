"""sync.blocking: blocking calls run in a thread and are never abandoned midway."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from ironsync.sync.blocking import in_thread


def test_a_blocking_call_outlives_no_cancellation_even_a_second_one() -> None:
    """sync.blocking.in_thread: a task cancelled twice (a cancelled gather cancels its tasks,
    and its caller cancels them again) still ends only after its thread's call has ended, so
    no cleanup runs while the call still writes (a pull's temp file and folder were left)."""
    release = threading.Event()
    ended = threading.Event()

    def blocking() -> None:
        release.wait(30)
        ended.set()

    async def main() -> bool:
        task = asyncio.ensure_future(in_thread(blocking))
        await asyncio.sleep(0)  # the call has started in its thread
        task.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()  # the second one
        for _ in range(3):
            await asyncio.sleep(0)
        still_waiting = not task.done()
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return still_waiting and ended.is_set()

    assert asyncio.run(main())
