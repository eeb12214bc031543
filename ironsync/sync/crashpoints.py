"""Named points where a test makes this process die (tests/histories.py crash trials).

`IRONSYNC_TEST_CRASH_AT=NAME` kills the process with SIGKILL the first time it reaches the point
NAME; `NAME#K` the K-th time (a crash in the middle of a group of pulls switching together).
Unset, every point is a no-op: one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("IRONSYNC_TEST_CRASH_AT", "")
_NAME, _, _NTH = _SPEC.partition("#")
_AT = int(_NTH) if _NTH.isdigit() and int(_NTH) > 0 else 1
_reached = 0


def crash_point(name: str) -> None:
    """Die here if a test asked for it (module docstring)."""
    global _reached
    if name != _NAME:
        return
    _reached += 1
    if _reached >= _AT:
        os.kill(os.getpid(), signal.SIGKILL)
