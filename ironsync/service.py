"""`ironsync service`: run the daemon as a systemd *user* unit.

The unit restarts the daemon on failure and stops it with SIGTERM, which the daemon answers by
finishing or abandoning its current write cleanly. Nothing here needs root.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

UNIT_NAME = "ironsync.service"


def unit_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user" / UNIT_NAME


def ironsync_command() -> list[str]:
    """How to start this very ironsync: its console script, else this interpreter."""
    script = shutil.which("ironsync")
    if script and Path(script).resolve().parent == Path(sys.executable).resolve().parent:
        return [script]
    beside = Path(sys.executable).parent / "ironsync"
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-m", "ironsync"]


def render_unit(config_path: Path) -> str:
    exec_start = shlex.join([*ironsync_command(), "--config", str(config_path), "daemon"])
    return (
        "[Unit]\n"
        "Description=ironsync peer-to-peer file synchronization\n"
        "Documentation=https://pypi.org/project/ironsync/\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "KillSignal=SIGTERM\n"
        "TimeoutStopSec=60\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemctl") is None:
        raise FileNotFoundError("systemctl is not installed here")
    return subprocess.run(
        ["systemctl", "--user", *args], capture_output=True, text=True, timeout=60
    )
