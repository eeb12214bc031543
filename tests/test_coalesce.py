"""Coalesced runs (ironsync.sync.coalesce): at most one at a time; a caller waits for a run
that starts after it asked, shared with everyone who asked during the same run."""

from __future__ import annotations

import asyncio

import pytest

from ironsync.sync.coalesce import Coalescer


class Job:
    """A job whose runs wait for `release`, numbered from 1; records when each started."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.release = asyncio.Event()
        self.fail_with: Exception | None = None
        self.running = 0
        self.most_at_once = 0

    async def __call__(self) -> int:
        self.started.append(len(self.started) + 1)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await self.release.wait()
            if self.fail_with is not None:
                raise self.fail_with
            return self.started[-1]
        finally:
            self.running -= 1


def test_a_call_while_idle_starts_a_run_at_once() -> None:
    async def body() -> None:
        job = Job()
        job.release.set()
        coalescer = Coalescer(job)
        assert await coalescer.run() == 1
        assert await coalescer.run() == 2

    asyncio.run(body())


def test_calls_during_a_run_share_the_next_run_which_starts_after_them() -> None:
    async def body() -> None:
        job = Job()
        coalescer = Coalescer(job)
        first = asyncio.ensure_future(coalescer.run())
        await asyncio.sleep(0.01)
        assert job.started == [1]
        later = [asyncio.ensure_future(coalescer.run()) for _ in range(10)]
        await asyncio.sleep(0.01)
        assert job.started == [1]  # nothing new starts while one runs
        job.release.set()
        results = await asyncio.gather(first, *later)

        assert results == [1] + [2] * 10
        assert job.started == [1, 2] and job.most_at_once == 1

    asyncio.run(body())


def test_a_caller_that_gives_up_does_not_stop_the_run_for_the_others() -> None:
    async def body() -> None:
        job = Job()
        coalescer = Coalescer(job)
        first = asyncio.ensure_future(coalescer.run())
        await asyncio.sleep(0.01)
        quitter = asyncio.ensure_future(coalescer.run())
        stayer = asyncio.ensure_future(coalescer.run())
        await asyncio.sleep(0.01)
        quitter.cancel()
        first.cancel()
        await asyncio.sleep(0.01)
        job.release.set()

        assert await stayer == 2
        assert quitter.cancelled() and first.cancelled()
        assert job.started == [1, 2]  # the first run went on, and so did the next

    asyncio.run(body())


def test_a_run_that_fails_fails_every_caller_waiting_for_it_and_the_next_starts_afresh() -> None:
    async def body() -> None:
        job = Job()
        job.fail_with = OSError("disk gone")
        coalescer = Coalescer(job)
        callers = [asyncio.ensure_future(coalescer.run()) for _ in range(3)]
        await asyncio.sleep(0)
        job.release.set()
        results = await asyncio.gather(*callers, return_exceptions=True)
        job.fail_with = None

        assert [type(r) for r in results] == [OSError, OSError, OSError]
        assert await coalescer.run() == 3

    asyncio.run(body())


def test_aclose_cancels_the_run_in_progress_and_the_pending_one() -> None:
    async def body() -> None:
        job = Job()
        coalescer = Coalescer(job)
        current = asyncio.ensure_future(coalescer.run())
        await asyncio.sleep(0)
        pending = asyncio.ensure_future(coalescer.run())
        await asyncio.sleep(0)
        await coalescer.aclose()

        with pytest.raises(asyncio.CancelledError):
            await current
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert not coalescer.running

    asyncio.run(body())
