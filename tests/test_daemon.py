"""The daemon as users run it: full sync at start, the control socket, exit codes, history."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import IRONSYNC
from tests.daemons import SyncNode, stop_all, tree, write

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[SyncNode, SyncNode]]:
    a = SyncNode(tmp_path, "alpha")
    b = SyncNode(tmp_path, "beta")
    yield a, b
    stop_all(a, b)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_daemons_run_a_full_sync_at_start(pair: tuple[SyncNode, SyncNode]) -> None:
    a, b = pair
    write(a.root, "from-a.txt", "a")
    write(b.root, "from-b.txt", "b")
    a.add_peers(b)
    b.start()
    a.start()
    wait_for(lambda: tree(a.root) == tree(b.root) and len(tree(a.root)) == 2)
    # the files are in place a moment before the sync records its end
    wait_for(lambda: any(e["detail"]["converged"] for e in a.events("sync_finished")))
    a.stop()
    kinds = [e["kind"] for e in a.events()]
    assert "peer_connected" in kinds and "sync_finished" in kinds


def test_sync_goes_through_the_running_daemon(pair: tuple[SyncNode, SyncNode]) -> None:
    a, b = pair
    a.add_peers(b)
    b.start()
    a.start()
    socket_path = a.db_path.with_name("state.db.sock")
    wait_for(socket_path.exists)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600  # owner only
    write(a.root, "later.txt", "written while the daemon runs")
    result = a.sync()
    assert result["exit"] == 0
    assert (b.root / "later.txt").read_text() == "written while the daemon runs"
    # the daemon did it: the standalone path would have needed the lock the daemon holds
    assert any(e["kind"] == "sync_finished" for e in a.events())
    a.stop()
    assert not socket_path.exists()


def test_sync_with_no_reachable_peer_exits_3(pair: tuple[SyncNode, SyncNode]) -> None:
    a, b = pair
    a.add_peers(b)  # beta is not running
    result = a.sync(expect=3)
    assert result["exit"] == 3
    assert [r["unreachable"] for r in result["results"]] == [b.address]
    plain = a.run("sync", check=False)
    assert plain.returncode == 3 and "unreachable" in plain.stdout


def test_sync_of_an_unknown_storage_is_a_usage_error(pair: tuple[SyncNode, SyncNode]) -> None:
    a, _ = pair
    proc = a.run("sync", "--storage", "nope", check=False)
    assert proc.returncode == 2 and "no storage 'nope'" in proc.stderr


def test_sigterm_stops_the_daemon_cleanly(pair: tuple[SyncNode, SyncNode]) -> None:
    a, _ = pair
    a.start()
    assert a.stop() == 0
    lock = a.db_path.with_name("state.db.lock")
    # the lock is free again: a standalone command can run
    assert lock.exists()
    assert a.run("scan").returncode == 0


def test_a_second_daemon_on_the_same_database_is_refused(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, _ = pair
    a.start()
    other_port = a.port
    a.port = other_port + 1 if other_port < 65535 else other_port - 1
    a.write_config()
    proc = a.run("daemon", check=False, timeout=30)
    assert proc.returncode == 2 and "already running" in proc.stderr


def assert_released(node: SyncNode) -> None:
    """The node's lock is free and its control socket gone: nothing is left behind."""
    from ironsync.control import NodeLock

    lock = NodeLock(node.db_path.with_name(node.db_path.name + ".lock"))
    lock.acquire()  # raises LockHeld if the exiting daemon kept it
    lock.release()
    assert not node.db_path.with_name(node.db_path.name + ".sock").exists()


def test_a_second_node_on_the_port_of_a_running_one_exits_2_with_one_line(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    # issue 12: two nodes on one host, both on the default port: a raw traceback, exit 1
    a, b = pair
    a.start()
    b.port = a.port
    b.write_config()
    proc = b.run("daemon", check=False, timeout=60)
    assert proc.returncode == 2
    message = (
        f"ironsync: error: cannot listen on 127.0.0.1:{a.port} (port in use): "
        f"set `port` in {b.config_path} or stop the other program"
    )
    assert proc.stderr == message + "\n"  # one line, no traceback (the log is in a file)
    assert message.removeprefix("ironsync: error: ") in b.log()
    assert_released(b)
    assert a.proc is not None and a.proc.poll() is None  # the first one serves on


def test_a_listen_address_not_on_this_host_exits_2_naming_the_key(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    unassigned = "192.0.2.1"  # TEST-NET-1 (RFC 5737): binding to it fails, nothing is sent
    with socket.socket() as probe:
        try:
            probe.bind((unassigned, 0))
        except OSError:
            pass
        else:
            pytest.skip(f"{unassigned} is an address of this host")
    _, b = pair
    text = b.config_path.read_text()
    b.config_path.write_text(text.replace('"127.0.0.1"', f'"{unassigned}"'))
    proc = b.run("daemon", check=False, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"ironsync: error: cannot listen on {unassigned}:{b.port} (address not on this host): "
        f"set `listen_address` in {b.config_path}\n"
    )
    assert_released(b)


@pytest.mark.parametrize(
    ("address", "port", "error", "expected"),
    [
        ("::1", 1234, OSError(errno.EADDRINUSE, "in use"),
         "cannot listen on [::1]:1234 (port in use): set `port` in C or stop the other program"),
        ("0.0.0.0", 80, OSError(errno.EACCES, "denied"),
         "cannot listen on 0.0.0.0:80 (permission denied: ports below 1024 need root): "
         "set `port` in C"),
        ("nas.lan", 25230, socket.gaierror(-2, "Name or service not known"),
         "cannot listen on nas.lan:25230 (unknown address: Name or service not known): "
         "set `listen_address` in C"),
        ("0.0.0.0", 25230, OSError(errno.ENOBUFS, "No buffer space available"),
         "cannot listen on 0.0.0.0:25230 (No buffer space available): "
         "set `listen_address` or `port` in C"),
    ],
)  # fmt: skip
def test_each_listen_failure_is_one_line_naming_the_key_to_change(
    tmp_path: Path, address: str, port: int, error: OSError, expected: str
) -> None:
    from ironsync.config import Config
    from ironsync.daemon import listen_failure

    config = Config(Path("C"), "n", "g", "s" * 16, (), port=port, listen_address=address)
    assert str(listen_failure(config, error)) == expected


def test_a_missing_storage_folder_exits_2_naming_it_and_touches_nothing(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    _, b = pair
    b.root.rmdir()
    proc = b.run("daemon", check=False, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"ironsync: error: {b.config_path}: key 'paths.docs': {b.root} does not exist\n"
    )
    assert not b.db_path.exists() and not b.root.exists()


def test_history_lists_every_version_and_event_of_a_file(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    path = write(a.root, "notes/todo.txt", "one")
    a.add_peers(b)
    b.start()
    a.sync()
    path.write_text("two, longer")
    a.sync()
    proc = a.run("history", str(path))
    lines = proc.stdout.splitlines()
    assert lines[0] == "docs:notes/todo.txt"
    assert '"alpha":2' in lines[1]
    kinds = [line.split("  ")[1] for line in lines[2:]]
    assert kinds == ["created", "modified"]
    on_b = json.loads(b.run("history", "--json", "docs:notes/todo.txt").stdout)
    assert [e["kind"] for e in on_b["events"]] == [
        "write_started", "write_finished", "write_started", "write_finished",
    ]  # fmt: skip
    assert all(e["peer"] == "alpha" for e in on_b["events"])
    assert on_b["current"]["version"] == {"alpha": 2}
    missing = a.run("history", str(a.root / "never.txt"), check=False)
    assert missing.returncode == 1 and "nothing recorded" in missing.stderr
    assert os.path.exists(path)


def test_a_change_on_a_peer_whose_daemon_stays_up_is_seen_by_the_next_sync(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    # The session between the daemons outlives one sync; the next full sync must still make
    # the peer rescan (its watcher is off), or its edit would be overwritten or missed.
    a, b = pair
    a.add_peers(b)
    b.add_peers(a)
    write(b.root, "x.txt", "first")
    b.start()
    a.start()
    wait_for(lambda: tree(a.root) == tree(b.root) == {"x.txt": b"first"})
    write(b.root, "x.txt", "beta's edit")
    write(a.root, "y.txt", "alpha's new file")
    assert a.sync()["exit"] == 0
    assert tree(a.root) == tree(b.root) == {"x.txt": b"beta's edit", "y.txt": b"alpha's new file"}
    # and concurrent edits on both, daemons up: a conflict copy, nothing lost
    write(a.root, "x.txt", "alpha's edit")
    time.sleep(0.05)
    write(b.root, "x.txt", "beta's later edit")
    assert a.sync()["exit"] == 0
    files = tree(a.root)
    assert files == tree(b.root)
    assert files["x.txt"] == b"beta's later edit"
    assert [c for p, c in files.items() if ".sync-conflict-" in p] == [b"alpha's edit"]


def test_status_shows_each_peer_connected_or_not_and_the_watcher(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    a.add_peers(b)
    b.start()
    a.start()
    wait_for(lambda: any(e["kind"] == "sync_finished" for e in a.events()))
    info = json.loads(a.run("status", "--json").stdout)
    assert info["daemon"]["pid"] == a.proc.pid  # type: ignore[union-attr]
    assert info["daemon"]["watcher"] == {"enabled": False}
    (peer,) = info["peers"]
    assert peer["node_id"] == "beta" and peer["connected"] is True
    assert peer["last_sync_at"] is not None
    assert "peer beta: connected" in a.run("status").stdout
    b.stop()
    wait_for(lambda: not json.loads(a.run("status", "--json").stdout)["peers"][0]["connected"])
    a.stop()
    info = json.loads(a.run("status", "--json").stdout)
    assert info["daemon"] is None and info["peers"][0]["connected"] is False
    assert "daemon: not running" in a.run("status").stdout


def test_sigterm_during_a_transfer_abandons_the_write_cleanly(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    a, b = pair
    old = b"the old content"
    write(b.root, "big.bin", old)
    a.add_peers(b)
    b.start()
    a.sync()  # both hold the old content
    write(a.root, "big.bin", os.urandom(400_000_000))
    syncing = subprocess.Popen(
        [*IRONSYNC, "sync"], env=a.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # beta pulls the new content (alpha's SyncRequest); stop it while it writes
        wait_for(lambda: any(p.name.startswith(".ironsync-") for p in b.root.iterdir()), timeout=60)
        assert b.stop() == 0
    finally:
        syncing.wait(timeout=60)
    assert (b.root / "big.bin").read_bytes() == old  # the old file, never a mix
    assert not [p for p in b.root.iterdir() if p.name.startswith(".ironsync-")]
    failed = [e for e in b.events("write_failed") if e["path"] == "big.bin"]
    assert failed  # the abandoned write is on record


def run_on_a_tty(node: SyncNode, *args: str) -> tuple[int, str, str]:
    """Run `ironsync ARGS` with stderr on a pseudo-terminal, as a person at a shell would."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*IRONSYNC, *args], env=node.env(), stdout=subprocess.PIPE, stderr=slave, text=True
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read()  # type: ignore[union-attr]
    code = proc.wait(timeout=60)
    os.close(master)
    return code, out, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("through_daemon", [False, True])
def test_sync_on_a_tty_shows_files_bytes_and_rate(
    pair: tuple[SyncNode, SyncNode], through_daemon: bool
) -> None:
    a, b = pair
    for n in range(3):
        write(b.root, f"f{n}.bin", os.urandom(300_000))
    a.add_peers(b)
    b.start()
    if through_daemon:
        a.start()
        wait_for(lambda: len(tree(a.root)) == 3)
        for n in range(3, 6):
            write(b.root, f"f{n}.bin", os.urandom(300_000))
    code, out, err = run_on_a_tty(a, "sync")
    assert code == 0, (out, err)
    assert "3 file(s)" in err and "/s" in err and "KiB" in err
    assert "peer beta: converged" in out
    # without a terminal: no progress, one summary line per peer
    plain = a.run("sync")
    assert plain.stderr == "" and plain.stdout.count("\n") == 1


def test_sync_while_the_daemon_is_starting_waits_for_it_instead_of_failing(
    pair: tuple[SyncNode, SyncNode],
) -> None:
    import fcntl

    a, _ = pair  # no peers: the sync itself has nothing to do
    for n in range(4000):  # a start-up scan long enough to run `sync` inside it
        write(a.root, f"d{n % 40}/f{n}.txt", f"file {n}")
    lock = a.db_path.with_name(a.db_path.name + ".lock")
    sock = a.db_path.with_name(a.db_path.name + ".sock")
    a.proc = subprocess.Popen(
        [*IRONSYNC, "daemon"], env=a.env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def lock_held() -> bool:
        if not lock.exists():
            return False
        with lock.open("rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    wait_for(lock_held, timeout=30)
    assert not sock.exists()  # the daemon is starting: lock held, no socket yet

    # used to exit 1 at once: "... is held by another ironsync process"; now the daemon
    # answers once it is up (exit 3: no peer to sync with)
    result = a.sync(expect=3)

    assert result == {"exit": 3, "results": [], "skipped": []}
    assert sock.exists()
