"""One node's discovery as a process, for tests/test_discovery.py (run in a network namespace).

usage: python tests/discovery_node.py CONFIG

Starts discovery with `run_discovery(load_config(CONFIG), ...)` and prints one JSON object a
line on stdout: {"event": "started", "name": ...}, then {"event": "found", "node_id", "host",
"port"} and {"event": "lost", "node_id"} as discovery reports them, {"event": "log", "level",
"message"} for every record ironsync.net.discovery logs (debug included), and after SIGTERM or
SIGINT {"event": "stopped"} once the goodbyes are sent. Exits 2 when discovery can't start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

from ironsync.config import load_config
from ironsync.net.discovery import DiscoveryError, PeerAddress, run_discovery


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class EmitLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        emit("log", level=record.levelname, message=record.getMessage())


async def main(config_path: str) -> int:
    logger = logging.getLogger("ironsync.net.discovery")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(EmitLog())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def found(peer: PeerAddress) -> None:
        emit("found", node_id=peer.node_id, host=peer.host, port=peer.port)

    def lost(node_id: str) -> None:
        emit("lost", node_id=node_id)

    try:
        discovery = await run_discovery(load_config(config_path), found, lost)
    except DiscoveryError as exc:
        emit("error", message=str(exc))
        return 2
    if discovery is None:
        emit("error", message="enable_service_discovery is false")
        return 2
    emit("started", name=discovery.service_name)
    try:
        await stop.wait()
    finally:
        await discovery.stop()
    emit("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
