"""`bin/soak`: run many seeded histories and crash trials, print a summary and replay commands."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from tests.histories import crash_trial, make_history, run_history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/soak", description=__doc__)
    parser.add_argument("--histories", type=int, default=20, help="histories to run")
    parser.add_argument("--crashes", type=int, default=6, help="crash trials to run")
    parser.add_argument("--first", type=int, default=0, help="seed of the first history/trial")
    parser.add_argument("--ops", type=int, default=14, help="operations per history")
    parser.add_argument("--seed", type=int, help="replay this one history (and nothing else)")
    parser.add_argument("--crash-seed", type=int, help="replay this one crash trial")
    parser.add_argument("--print-ops", action="store_true", help="print each history's ops")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every history's `finally` stops its daemons
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.seed is not None:
        seeds, crash_seeds = [args.seed], []
    elif args.crash_seed is not None:
        seeds, crash_seeds = [], [args.crash_seed]
    else:
        seeds = list(range(args.first, args.first + args.histories))
        crash_seeds = list(range(args.first, args.first + args.crashes))
    started = time.monotonic()
    ops = conflicts = 0
    notes: dict[str, int] = {}
    failures: list[str] = []
    for seed in seeds:
        if args.print_ops or args.seed is not None:
            print(f"history {seed}: {json.dumps(make_history(seed, args.ops))}", flush=True)
        result = run_history(seed, length=args.ops)
        ops += result.applied
        conflicts += result.conflicts
        for key, value in result.notes.items():
            notes[key] = notes.get(key, 0) + value
        status = "ok" if result.ok else "FAIL"
        print(f"history {seed}: {status} ({result.applied} ops applied)", flush=True)
        if not result.ok:
            for failure in result.failures:
                print(f"  {failure}", flush=True)
            print(f"  ops: {json.dumps(result.ops)}", flush=True)
            failures.append(f"bin/soak --seed {seed} --ops {args.ops}")
    crashes: dict[str, int] = {}
    for seed in crash_seeds:
        trial = crash_trial(seed)
        key = f"{trial.point}:{'killed' if trial.killed else 'ran through'}:{trial.state}"
        crashes[key] = crashes.get(key, 0) + 1
        print(f"crash {seed} at {trial.point}: {'ok' if trial.ok else 'FAIL'} ({key})", flush=True)
        if not trial.ok:
            for failure in trial.failures:
                print(f"  {failure}", flush=True)
            failures.append(trial.replay())
    print(
        f"\n{len(seeds)} histories, {ops} ops applied, {conflicts} conflicts seen, "
        f"{len(crash_seeds)} crash trials, {len(failures)} failure(s), "
        f"{time.monotonic() - started:.0f} s"
    )
    print(f"notes: {json.dumps(notes, sort_keys=True)}")
    print(f"crash outcomes: {json.dumps(crashes, sort_keys=True)}")
    for replay in failures:
        print(f"replay: {replay}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
