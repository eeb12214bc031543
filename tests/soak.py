"""`bin/soak`: run many seeded histories and crash trials, print a summary and replay commands."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from tests.histories import (
    batch_crash_trial,
    crash_trial,
    make_history,
    replay_command,
    run_history,
    sender_crash_trial,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/soak", description=__doc__)
    parser.add_argument("--histories", type=int, default=20, help="histories to run")
    parser.add_argument(
        "--live-histories", type=int, default=10, help="live histories (watchers on) to run"
    )
    parser.add_argument("--crashes", type=int, default=6, help="crash trials to run")
    parser.add_argument("--sender-crashes", type=int, default=6, help="sender crash trials to run")
    parser.add_argument(
        "--batch-crashes", type=int, default=5, help="crash trials mid-group of pulls"
    )
    parser.add_argument("--first", type=int, default=0, help="seed of the first history/trial")
    parser.add_argument("--ops", type=int, default=14, help="operations per history")
    parser.add_argument("--seed", type=int, help="replay this one history (and nothing else)")
    parser.add_argument("--live", action="store_true", help="--seed names a live history")
    parser.add_argument("--crash-seed", type=int, help="replay this one crash trial")
    parser.add_argument("--sender-crash-seed", type=int, help="replay this one sender trial")
    parser.add_argument("--batch-crash-seed", type=int, help="replay this one batch crash trial")
    parser.add_argument("--small", action="store_true", help="crash trials with small files (CI)")
    parser.add_argument("--print-ops", action="store_true", help="print each history's ops")
    parser.add_argument(
        "--show-superseded",
        action="store_true",
        help="list the superseded contents still live on n0 (to look for resurrections)",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every history's `finally` stops its daemons
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seeds: list[int] = []
    live_seeds: list[int] = []
    crash_seeds: list[int] = []
    sender_seeds: list[int] = []
    batch_seeds: list[int] = []
    if args.seed is not None:
        (live_seeds if args.live else seeds).append(args.seed)
    elif args.crash_seed is not None:
        crash_seeds.append(args.crash_seed)
    elif args.sender_crash_seed is not None:
        sender_seeds.append(args.sender_crash_seed)
    elif args.batch_crash_seed is not None:
        batch_seeds.append(args.batch_crash_seed)
    else:
        seeds = list(range(args.first, args.first + args.histories))
        live_seeds = list(range(args.first, args.first + args.live_histories))
        crash_seeds = list(range(args.first, args.first + args.crashes))
        sender_seeds = list(range(args.first, args.first + args.sender_crashes))
        batch_seeds = list(range(args.first, args.first + args.batch_crashes))
    started = time.monotonic()
    ops = conflicts = with_tree_ops = 0
    notes: dict[str, int] = {}
    kinds: dict[str, int] = {}
    failures: list[str] = []
    for live, seed in [(False, s) for s in seeds] + [(True, s) for s in live_seeds]:
        name = f"{'live ' if live else ''}history {seed}"
        if args.print_ops or args.seed is not None:
            print(f"{name}: {json.dumps(make_history(seed, args.ops, live=live))}", flush=True)
        t0 = time.monotonic()
        result = run_history(seed, length=args.ops, live=live)
        ops += result.applied
        conflicts += result.conflicts
        with_tree_ops += result.tree_ops > 0
        for key, value in result.notes.items():
            notes[key] = notes.get(key, 0) + value
        for key, value in result.kinds.items():
            kinds[key] = kinds.get(key, 0) + value
        status = "ok" if result.ok else "FAIL"
        took = time.monotonic() - t0
        print(
            f"{name}: {status} ({result.applied} ops applied, {result.tree_ops} of them on "
            f"folders, links, types or modes, {took:.1f} s)",
            flush=True,
        )
        for remark in result.remarks:
            print(f"  remark: {remark}", flush=True)
        if args.show_superseded:
            for line in result.superseded_live:
                print(f"  superseded, live: {line}", flush=True)
        if not result.ok:
            for failure in result.failures:
                print(f"  {failure}", flush=True)
            print(f"  ops: {json.dumps(result.ops)}", flush=True)
            failures.append(replay_command(seed, args.ops, live))
    crashes: dict[str, int] = {}
    for seed in crash_seeds:
        trial = crash_trial(seed, small=args.small)
        key = f"{trial.point}:{'killed' if trial.killed else 'ran through'}:{trial.state}"
        crashes[key] = crashes.get(key, 0) + 1
        print(f"crash {seed} at {trial.point}: {'ok' if trial.ok else 'FAIL'} ({key})", flush=True)
        if not trial.ok:
            for failure in trial.failures:
                print(f"  {failure}", flush=True)
            failures.append(trial.replay() + (" --small" if args.small else ""))
    sender_crashes: dict[str, int] = {}
    for seed in sender_seeds:
        t0 = time.monotonic()
        sender = sender_crash_trial(seed, small=args.small)
        when = "mid-write" if sender.mid_write else "killed" if sender.killed else "ran through"
        what = "fresh" if sender.fresh else "edit"
        key = f"{sender.variant}:{what}:{when}:exit {sender.exit_code}:{sender.state}"
        if sender.sender_state:
            key += f":sender {sender.sender_state}"
        sender_crashes[key] = sender_crashes.get(key, 0) + 1
        status = "ok" if sender.ok else "FAIL"
        took = time.monotonic() - t0
        print(f"sender crash {seed}: {status} ({key}, {took:.1f} s)", flush=True)
        if not sender.ok:
            for failure in sender.failures:
                print(f"  {failure}", flush=True)
            failures.append(sender.replay())
    batch_crashes: dict[str, int] = {}
    for seed in batch_seeds:
        batch = batch_crash_trial(seed)
        states = ",".join(f"{k} {v}" for k, v in sorted(batch.states.items()))
        key = f"{batch.point.partition('#')[0]}:{'killed' if batch.killed else 'ran through'}"
        batch_crashes[key] = batch_crashes.get(key, 0) + 1
        status = "ok" if batch.ok else "FAIL"
        print(f"batch crash {seed} at {batch.point}: {status} (files {states})", flush=True)
        if not batch.ok:
            for failure in batch.failures:
                print(f"  {failure}", flush=True)
            failures.append(batch.replay())
    print(
        f"\n{len(seeds)} histories, {len(live_seeds)} live histories, {ops} ops applied, "
        f"{conflicts} conflicts seen, {len(crash_seeds)} crash trials, "
        f"{len(sender_seeds)} sender crash trials, {len(batch_seeds)} batch crash trials, "
        f"{len(failures)} failure(s), "
        f"{time.monotonic() - started:.0f} s"
    )
    print(
        f"{with_tree_ops} of {len(seeds) + len(live_seeds)} histories applied folder, link, "
        f"type or mode ops; ops applied by kind: {json.dumps(kinds, sort_keys=True)}"
    )
    print(f"notes: {json.dumps(notes, sort_keys=True)}")
    print(f"crash outcomes: {json.dumps(crashes, sort_keys=True)}")
    print(f"sender crash outcomes: {json.dumps(sender_crashes, sort_keys=True)}")
    print(f"batch crash outcomes: {json.dumps(batch_crashes, sort_keys=True)}")
    for replay in failures:
        print(f"replay: {replay}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
