"""Real daemons on a real (virtual) LAN: each node in its own network namespace on a bridge,
discovery on, no `peers` list. Root only: skipped with a reason otherwise (CI runs as root)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.daemons import tree, write
from tests.netns import Lan

pytestmark = [pytest.mark.root, pytest.mark.slow]

SUBNET = "10.231.8"  # exists only inside the test's namespaces
SECRET = "lan test secret, sixteen+"


def test_nodes_of_a_group_find_each_other_and_converge_and_another_group_gets_nothing(
    lan: Callable[[dict[str, str]], Lan], tmp_path: Path
) -> None:
    hosts = {name: f"{SUBNET}.{i}" for i, name in enumerate(("n1", "n2", "n3", "n4"), start=1)}
    net = lan(hosts)
    procs: list[subprocess.Popen[str]] = []
    roots = {}
    try:
        for name, address in hosts.items():
            root = tmp_path / name / "docs"
            root.mkdir(parents=True)
            roots[name] = root
            write(root, f"from-{name}.txt", f"made on {name}")
            other = name == "n4"
            config = write_config(
                tmp_path / name / "config.toml",
                node_id=name,
                group="other-group" if other else "lan-group",
                group_secret="another secret, 16+ chars" if other else SECRET,
                listen_address=address,
                port=25230,
                enable_service_discovery=True,
                enable_file_watcher=False,
                database=str(tmp_path / name / "state.db"),
                log_path=str(tmp_path / name / "daemon.log"),
                paths={"docs": root},
            )
            env = {**os.environ, "IRONSYNC_CONFIG": str(config)}
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        net.ns(name),
                        sys.executable,
                        "-m",
                        "ironsync",
                        "daemon",
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        group = {f"from-{n}.txt": f"made on {n}".encode() for n in ("n1", "n2", "n3")}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(tree(roots[n]) == group for n in ("n1", "n2", "n3")):
                break
            time.sleep(0.2)
        logs = {n: (tmp_path / n / "daemon.log").read_text() for n in hosts}
        for name in ("n1", "n2", "n3"):
            assert tree(roots[name]) == group, logs[name]
        time.sleep(1)
        assert tree(roots["n4"]) == {"from-n4.txt": b"made on n4"}  # nothing arrived
        assert all("from-n4.txt" not in tree(roots[n]) for n in ("n1", "n2", "n3"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
