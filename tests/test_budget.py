"""The byte budget of a pull pass (ironsync.sync.fullsync._Budget): files in flight together
never hold more than the budget; a file larger than all of it runs alone."""

from __future__ import annotations

import asyncio
import random

from ironsync.sync.fullsync import _Budget


def test_tasks_share_the_budget_and_an_oversized_one_runs_alone() -> None:
    async def main() -> tuple[int, list[int], int]:
        budget = _Budget(100)
        held = 0
        peak = 0
        alone: list[int] = []
        rng = random.Random(7)

        async def job(amount: int) -> None:
            nonlocal held, peak
            async with budget.taken(amount):
                held += min(amount, 100)
                peak = max(peak, held)
                if amount >= 100:
                    alone.append(held)
                await asyncio.sleep(rng.random() / 200)
                held -= min(amount, 100)

        amounts = [rng.randint(1, 80) for _ in range(60)] + [250, 100]
        rng.shuffle(amounts)
        await asyncio.gather(*(job(n) for n in amounts))
        return peak, alone, budget.free

    peak, alone, free = asyncio.run(main())

    assert 80 < peak <= 100  # shared: several at once, never more than the budget
    assert alone == [100, 100]  # the 250 and the 100 each ran with nothing else
    assert free == 100


def test_a_lease_released_early_lets_the_next_task_in_while_the_first_goes_on() -> None:
    async def main() -> list[str]:
        budget = _Budget(100)
        order: list[str] = []
        written = asyncio.Event()
        finish = asyncio.Event()

        async def first() -> None:
            async with budget.taken(80) as lease:
                order.append("first holds 80")
                lease.release()  # its data is written; it still waits for its flush
                lease.release()  # once only
                written.set()
                await finish.wait()
            order.append("first ends")

        async def second() -> None:
            await written.wait()
            async with budget.taken(90):
                order.append("second holds 90")
                finish.set()

        await asyncio.gather(first(), second())
        assert budget.free == 100
        return order

    assert asyncio.run(main()) == ["first holds 80", "second holds 90", "first ends"]


def test_waiters_are_served_in_turn_and_a_cancelled_waiter_gives_its_share_back() -> None:
    async def main() -> tuple[list[str], int]:
        budget = _Budget(100)
        order: list[str] = []
        release = asyncio.Event()

        async def holder() -> None:
            async with budget.taken(20):  # 80 stay free: "small" would fit at once
                await release.wait()

        async def waiter(name: str, amount: int) -> None:
            async with budget.taken(amount):
                order.append(name)

        hold = asyncio.create_task(holder())
        await asyncio.sleep(0)
        big = asyncio.create_task(waiter("big", 90))
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(waiter("cancelled", 5))
        await asyncio.sleep(0)
        small = asyncio.create_task(waiter("small", 5))
        await asyncio.sleep(0)
        cancelled.cancel()  # while it waits: it leaves the line
        release.set()
        await asyncio.gather(hold, big, small)
        assert cancelled.cancelled()
        # a waiter granted its share in the step it is cancelled gives the share back
        async with budget.taken(100) as lease:
            granted = asyncio.create_task(waiter("granted, then cancelled", 50))
            await asyncio.sleep(0)  # it waits
            lease.release()  # its 50 are granted now...
            granted.cancel()  # ...and it is cancelled before it runs again
        await asyncio.gather(granted, return_exceptions=True)
        assert granted.cancelled()
        return order, budget.free

    order, free = asyncio.run(main())
    assert order == ["big", "small"]  # the 5 behind the 90 waited its turn
    assert free == 100


def test_a_share_given_back_while_the_first_waiter_is_being_cancelled_goes_to_the_next() -> None:
    """A task cancelled while it waits has its wait cancelled at once, but leaves the line only
    when it runs again: a share given back in between skips it, and goes to the next."""

    async def main() -> tuple[bool, bool, int]:
        budget = _Budget(100)
        served: list[str] = []

        async def waiter(name: str, amount: int) -> None:
            async with budget.taken(amount):
                served.append(name)

        async with budget.taken(100) as lease:
            first = asyncio.create_task(waiter("first", 50))
            second = asyncio.create_task(waiter("second", 60))
            await asyncio.sleep(0)  # both wait, first at the head
            first.cancel()
            lease.release()  # before `first` runs again
        await asyncio.gather(first, second, return_exceptions=True)
        return first.cancelled(), served == ["second"], budget.free

    assert asyncio.run(main()) == (True, True, 100)
