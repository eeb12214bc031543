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
