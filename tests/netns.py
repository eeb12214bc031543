"""Test hosts in network namespaces (root only): a bridge in a hub namespace and one namespace
per host, with addresses that exist only inside them. Every namespace made is removed."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest


class NetnsUnavailable(Exception):
    pass


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


@dataclass
class Lan:
    """A bridge in a hub namespace, and one namespace per node with eth0 plugged into it."""

    prefix: str
    namespaces: list[str] = field(default_factory=list)

    def add_namespace(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        return ns

    def build(self, hosts: dict[str, str]) -> None:
        hub = self.add_namespace("hub")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for name, address in hosts.items():
            ns = self.add_namespace(name)
            # Created inside the hub, its peer straight inside the node: the root namespace
            # never sees either end.
            _ip("-n", hub, "link", "add", f"v{name}", "type", "veth", "peer", "eth0", "netns", ns)
            _ip("-n", hub, "link", "set", f"v{name}", "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "multicast", "on", "up")

    def remove(self) -> list[str]:
        """Delete every namespace (which deletes its links); return what failed."""
        failures = []
        for ns in reversed(self.namespaces):
            proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if proc.returncode != 0:
                failures.append(f"{ns}: {proc.stderr.strip()}")
        self.namespaces.clear()
        return failures

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"


@pytest.fixture
def lan() -> Iterator[Callable[[dict[str, str]], Lan]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` command (iproute2)")
    built: list[Lan] = []

    def build(hosts: dict[str, str]) -> Lan:
        lan = Lan(f"isync-{os.getpid()}")
        built.append(lan)
        try:
            lan.build(hosts)
        except NetnsUnavailable as exc:
            lan.remove()
            pytest.skip(f"network namespaces unavailable even as root: {exc}")
        return lan

    yield build
    failures = [failure for lan in built for failure in lan.remove()]
    assert not failures, f"could not remove namespaces: {failures}"
