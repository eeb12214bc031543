"""sync.blocking: blocking calls run in a thread and are never abandoned midway."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading

from ironsync.sync.blocking import OwnThread, in_thread


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


def test_a_thread_of_ones_own_runs_while_the_shared_pool_is_busy() -> None:
    """sync.blocking.OwnThread (the committer's): its calls do not queue behind the shared
    pool's jobs, run one at a time in one thread, and a cancelled call is waited for, as
    in_thread's."""
    release = threading.Event()
    ended = threading.Event()
    own = OwnThread("test-own")

    def slow() -> None:
        release.wait(30)
        ended.set()

    async def main() -> tuple[set[str], bool]:
        loop = asyncio.get_running_loop()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        loop.set_default_executor(pool)
        busy = asyncio.ensure_future(in_thread(release.wait, 30))  # the whole shared pool
        names = {await own.run(lambda: threading.current_thread().name) for _ in range(3)}
        task = asyncio.ensure_future(own.run(slow))
        await asyncio.sleep(0)
        task.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        still_waiting = not task.done()
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await busy
        own.close()
        return names, still_waiting and ended.is_set()

    names, waited = asyncio.run(main())
    assert len(names) == 1 and next(iter(names)).startswith("test-own")
    assert waited
