"""sync.blocking: blocking calls run in a thread and are never abandoned midway."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable

from ironsync.sync.blocking import OwnThread, in_thread


class Blocking:
    """A blocking call that runs until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.ended = threading.Event()

    def __call__(self) -> None:
        self.release.wait(30)
        self.ended.set()

    async def outlives_cancels(self, run: Callable[[], Awaitable[None]], cancels: int) -> bool:
        """Whether a task running the call, cancelled `cancels` times, ends only after the
        call has ended."""
        task = asyncio.ensure_future(run())
        await asyncio.sleep(0)  # the call has started in its thread
        for _ in range(cancels):
            task.cancel()
            for _ in range(3):
                await asyncio.sleep(0)
        still_waiting = not task.done()
        self.release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return still_waiting and self.ended.is_set()


def test_a_blocking_call_outlives_no_cancellation_even_a_second_one() -> None:
    """sync.blocking.in_thread: a task cancelled twice (a cancelled gather cancels its tasks,
    and its caller cancels them again) still ends only after its thread's call has ended, so
    no cleanup runs while the call still writes (a pull's temp file and folder were left)."""
    call = Blocking()
    assert asyncio.run(call.outlives_cancels(lambda: in_thread(call), cancels=2))


def test_a_thread_of_ones_own_runs_while_the_shared_pool_is_busy() -> None:
    """sync.blocking.OwnThread (the committer's): its calls do not queue behind the shared
    pool's jobs, run one at a time in one thread, and a cancelled call is waited for, as
    in_thread's."""
    call = Blocking()
    own = OwnThread("test-own")

    async def main() -> tuple[set[str], bool]:
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        busy = asyncio.ensure_future(in_thread(call.release.wait, 30))  # the whole shared pool
        names = {await own.run(lambda: threading.current_thread().name) for _ in range(3)}
        waited = await call.outlives_cancels(lambda: own.run(call), cancels=1)
        await busy
        own.close()
        return names, waited

    names, waited = asyncio.run(main())
    assert len(names) == 1 and next(iter(names)).startswith("test-own")
    assert waited
