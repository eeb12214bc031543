"""The `ironsync` command (click). Verbs match the functions they call.

Exit codes: 0 success; 1 the work failed (a storage could not be scanned, a sync failed);
2 usage or config error (the message names the key and the file). Output is plain lines, one
thing per line, unless a TTY asks for progress; `--json` gives machine-readable output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import click

from ironsync import __version__
from ironsync.config import (
    ALIAS_RE,
    DEFAULT_PORT,
    NODE_ID_RE,
    Config,
    ConfigError,
    default_config_path,
    default_value,
    load_config,
)
from ironsync.model import DIR, FILE, SYMLINK, kind_label

if TYPE_CHECKING:  # imported where used: `sync` and `status` through a daemon need none
    from ironsync.store import Database, index
    from ironsync.store import events as ev
    from ironsync.sync.local import Change, ScanReport

EXIT_FAILED = 1
EXIT_USAGE = 2
DAEMON_START_WAIT_S = 15.0
"""`sync` finding the node's lock held and no daemon answering waits this long for one."""


class UsageFailure(click.ClickException):
    """A config or usage problem: printed as `ironsync: error: ...`, exit 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        click.echo(f"ironsync: error: {self.format_message()}", err=True)


@dataclass
class AppContext:
    config_path: Path | None

    def config(self) -> Config:
        try:
            return load_config(self.config_path)
        except ConfigError as exc:
            raise UsageFailure(str(exc)) from None

    @contextmanager
    def database(self, config: Config) -> Iterator[Database]:
        from ironsync.store import DatabaseError, open_database

        try:
            db = open_database(config.database, config.node_id)
        except DatabaseError as exc:
            raise UsageFailure(str(exc)) from None
        try:
            yield db
        finally:
            db.close()


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
# init and join: where this node listens, and whether it uses mDNS
port_option = click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="TCP port to listen on (two nodes on one machine need two).",
)
listen_address_option = click.option(
    "--listen-address",
    default="0.0.0.0",
    show_default=True,
    help="Address to listen on (127.0.0.1: this machine only).",
)
no_discovery_option = click.option(
    "--no-discovery", is_flag=True, help="Disable mDNS discovery (peers only from the config)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="IRONSYNC_CONFIG",
    help="Config file [default: ~/.config/ironsync/config.toml; env IRONSYNC_CONFIG].",
)
@click.option("-v", "--verbose", count=True, help="More log output on stderr.")
@click.version_option(__version__, prog_name="ironsync")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, verbose: int) -> None:
    """Peer-to-peer file synchronization for the computers of one LAN."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="ironsync: %(levelname)s: %(message)s")
    ctx.obj = AppContext(config_path)


# --- init ----------------------------------------------------------------------------------


@cli.command()
@click.option("--node-id", help="This node's unique id [default: the host name].")
@click.option("--group", default="default", show_default=True, help="Group name.")
@click.option("--group-secret", help="Shared secret (>= 16 chars) [default: generate one].")
@click.option(
    "--path",
    "paths",
    multiple=True,
    required=True,
    metavar="ALIAS=/folder",
    help="A storage to sync (repeatable). The folder is created if missing.",
)
@port_option
@listen_address_option
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT", help="A static peer.")
@click.option("--database", type=click.Path(path_type=Path), help="SQLite state file.")
@no_discovery_option
@click.option("--no-watcher", is_flag=True, help="Disable the file watcher.")
@click.pass_obj
def init(
    app: AppContext,
    node_id: str | None,
    group: str,
    group_secret: str | None,
    paths: tuple[str, ...],
    port: int,
    listen_address: str,
    peers: tuple[str, ...],
    database: Path | None,
    no_discovery: bool,
    no_watcher: bool,
) -> None:
    """Write a commented config and create the database. Never overwrites a config."""
    from secrets import token_urlsafe

    config = _write_new_config(
        app,
        node_id=node_id or _default_node_id(),
        group=group,
        group_secret=group_secret or token_urlsafe(24),
        paths=paths,
        port=port,
        listen_address=listen_address,
        peers=peers,
        database=database,
        no_discovery=no_discovery,
        no_watcher=no_watcher,
    )
    click.echo(f"wrote {config.path}")
    click.echo(f"database {config.database}")
    click.echo("the config holds the group secret: keep it private (mode 0600)")


def _write_new_config(
    app: AppContext,
    *,
    node_id: str,
    group: str,
    group_secret: str,
    paths: tuple[str, ...],
    port: int,
    listen_address: str,
    peers: tuple[str, ...],
    database: Path | None,
    no_discovery: bool,
    no_watcher: bool,
) -> Config:
    """Validate, write (0600, never over an existing file) and load a new config; create its
    database and this node's certificate."""
    target = app.config_path or default_config_path()
    if target.exists():
        raise UsageFailure(f"{target} already exists; not overwriting it")
    if not NODE_ID_RE.match(node_id):
        raise UsageFailure(f"--node-id '{node_id}' must be 1-64 of A-Z a-z 0-9 _ . -")
    storages = {}
    for spec in paths:
        alias, sep, folder = spec.partition("=")
        if not sep or not alias or not folder:
            raise UsageFailure(f"--path '{spec}' is not ALIAS=/folder")
        storages[alias] = Path(folder).expanduser().absolute()
    for alias, folder in storages.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file there, no permission
            raise UsageFailure(
                f"--path {alias}={folder}: cannot make the folder ({exc.strerror})"
            ) from None
    text = render_config(
        node_id=node_id,
        group=group,
        group_secret=group_secret,
        port=port,
        listen_address=listen_address,
        enable_file_watcher=not no_watcher,
        enable_service_discovery=not no_discovery,
        peers=peers,
        database=database.expanduser().absolute() if database else None,
        storages=storages,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o600)  # it holds the group secret
    try:
        config = load_config(tmp)
    except ConfigError as exc:
        tmp.unlink()
        raise UsageFailure(str(exc).replace(str(tmp), str(target))) from None
    os.replace(tmp, target)
    config = load_config(target)
    with app.database(config):
        pass
    from ironsync.net.tls import load_or_create_identity

    load_or_create_identity(config.state_dir, config.node_id, config.group, config.group_secret)
    return config


# --- invite and join ---------------------------------------------------------------------------


@cli.command()
@click.option(
    "--address",
    "addresses",
    multiple=True,
    metavar="HOST:PORT",
    help="Where the new computer can reach this one [default: this node's addresses].",
)
@click.pass_obj
def invite(app: AppContext, addresses: tuple[str, ...]) -> None:
    """Print a one-line token that lets another computer join this group.

    The token holds the group secret: give it only to your own machines."""
    from ironsync.invite import Invite, encode_invite, reachable_addresses
    from ironsync.net.tls import load_or_create_identity

    config = app.config()
    identity = load_or_create_identity(
        config.state_dir, config.node_id, config.group, config.group_secret
    )
    token = encode_invite(
        Invite(
            group=config.group,
            group_secret=config.group_secret,
            node_id=config.node_id,
            addresses=addresses or tuple(reachable_addresses(config.listen_address, config.port)),
            fingerprint=identity.fingerprint,
            storages=tuple(s.name for s in config.storages),
        )
    )
    click.echo(
        "This token holds the group secret: whoever has it can join the group. Paste it into\n"
        "`ironsync join TOKEN` on your other computer, and do not share it otherwise.",
        err=True,
    )
    click.echo(token)


@cli.command()
@click.argument("token")
@click.option(
    "--path",
    "paths",
    multiple=True,
    metavar="ALIAS=/folder",
    help="Where each storage lives here [default: ~/Sync/ALIAS for the inviter's].",
)
@click.option("--node-id", help="This node's unique id [default: the host name].")
@port_option
@listen_address_option
@click.option("--database", type=click.Path(path_type=Path), help="SQLite state file.")
@no_discovery_option
@click.option("--no-watcher", is_flag=True, help="Disable the file watcher.")
@click.pass_obj
def join(
    app: AppContext,
    token: str,
    paths: tuple[str, ...],
    node_id: str | None,
    port: int,
    listen_address: str,
    database: Path | None,
    no_discovery: bool,
    no_watcher: bool,
) -> None:
    """Join the group of an `ironsync invite` TOKEN: write this computer's config, database and
    certificate, and check that the inviting node answers."""
    import asyncio

    from ironsync.invite import InvalidToken, decode_invite

    try:
        invited = decode_invite(token)
    except InvalidToken as exc:
        raise UsageFailure(f"invalid token: {exc}") from None
    chosen = list(paths) or [f"{a}={Path.home() / 'Sync' / a}" for a in invited.storages]
    if not chosen:
        raise UsageFailure("the token names no storage: give --path ALIAS=/folder")
    node_id = node_id or _default_node_id()
    if node_id == invited.node_id:
        raise UsageFailure(f"--node-id '{node_id}' is the inviting node's id: choose another")
    clash = _same_port_here(invited.addresses, listen_address, port)
    if clash:
        raise UsageFailure(
            f"--port {port}: the inviting node listens on {clash}, on this machine: give "
            "another --port (two nodes on one machine need two ports)"
        )
    for spec in chosen:
        alias = spec.partition("=")[0]
        if alias not in invited.storages:
            click.echo(
                f"ironsync: warning: {invited.node_id} has no storage '{alias}' (it has: "
                f"{', '.join(invited.storages) or 'none'}); '{alias}' syncs with no one yet",
                err=True,
            )
    config = _write_new_config(
        app,
        node_id=node_id,
        group=invited.group,
        group_secret=invited.group_secret,
        paths=tuple(chosen),
        port=port,
        listen_address=listen_address,
        peers=invited.addresses,
        database=database,
        no_discovery=no_discovery,
        no_watcher=no_watcher,
    )
    click.echo(f"wrote {config.path} (group {config.group}, node {config.node_id})")
    reached = asyncio.run(_check_inviter(config, invited))
    click.echo(reached)
    click.echo("now run `ironsync daemon` here (and keep it running on the inviting node)")


def _same_port_here(addresses: tuple[str, ...], listen_address: str, port: int) -> str | None:
    """The inviter's loopback address (so it is on this machine) with the port we would
    listen on, where our listen address covers it: both daemons cannot bind it. No socket is
    opened; the daemon's own error covers every other clash."""
    for address in addresses:
        host, _, their_port = address.rpartition(":")
        on_this_machine = host.startswith("127.")
        if on_this_machine and their_port == str(port) and listen_address in (host, "0.0.0.0"):
            return address
    return None


async def _check_inviter(config: Config, invited: Any) -> str:
    """Connect to the inviter once; its certificate must be the one the token names."""
    from ironsync.daemon import Node, parse_peer
    from ironsync.net.session import connect
    from ironsync.store import open_database

    last = "no address in the token"
    with open_database(config.database, config.node_id) as db:
        node = Node(config, db)
        for address in invited.addresses:
            host, port = parse_peer(address)
            try:
                session = await connect(
                    host, port, node.identity, node.hello, node.service, timeout=5
                )
            except (OSError, TimeoutError) as exc:
                last = f"{address}: {exc}"
                continue
            fingerprint = session.peer_fingerprint
            await session.close("join check")
            if fingerprint != invited.fingerprint:
                raise click.ClickException(
                    f"{address} answered with another certificate than the token names: "
                    "not the inviting node; config written, but check the address"
                )
            return f"reached {invited.node_id} at {address} (certificate matches the token)"
    return f"could not reach {invited.node_id} now ({last}); the daemon keeps trying"


def _default_node_id() -> str:
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())
    return (name or "node")[:64]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, list | tuple):
        return f"[{', '.join(_toml_value(v) for v in value)}]"
    return json.dumps(str(value), ensure_ascii=False)


def render_config(
    *,
    node_id: str,
    group: str,
    group_secret: str,
    port: int,
    listen_address: str,
    enable_file_watcher: bool,
    enable_service_discovery: bool,
    peers: tuple[str, ...],
    database: Path | None,
    storages: dict[str, Path],
) -> str:
    """A commented config.toml with every key, the way `ironsync init` writes it: what init
    sets as values, every other key commented out with its default (uncommenting it changes
    nothing), each under a line saying what it does."""
    v = _toml_value

    def unset(key: str) -> str:
        return f"# {key} = {v(default_value(key))}"

    lines = [
        "# ironsync configuration. Every key is here: a line `# key = value` shows the default",
        "# in force while it stays commented out. The README (Config) says more.",
        "",
        "# this node's unique id: 1-64 of A-Z a-z 0-9 _ . -",
        f"node_id = {v(node_id)}",
        "# nodes talk only inside their group",
        f"group = {v(group)}",
        "# the same on every node of the group; TLS certificates derive from it. Never sent.",
        f"group_secret = {v(group_secret)}",
        "",
        f"# TCP port to listen on (default {default_value('port')}; two nodes on one machine"
        " need two)",
        f"port = {port}",
        f"# the address to bind (default {default_value('listen_address')}: every address of"
        " this machine)",
        f"listen_address = {v(listen_address)}",
        '# find peers with mDNS on the local network; `peers` lists more, as "host:port"',
        f"enable_service_discovery = {v(enable_service_discovery)}",
        f"peers = {v(list(peers))}",
        "",
        "# watch the storages and send changes in near real time after the full sync",
        f"enable_file_watcher = {v(enable_file_watcher)}",
        "# seconds a changed path must stay unchanged before it is sent (debounce)",
        unset("delay_watcher_events"),
        "# seconds between safety rescans of every storage (0: none; the watcher alone)",
        unset("rescan_interval"),
        "# days to keep replaced and deleted files in ROOT/.ironsync/versions (0: keep none)",
        unset("keep_versions_days"),
        "# sync symlinks as links (false: leave this node's links alone)",
        unset("sync_symlinks"),
        "",
        "# the daemon's text log; unset (the default) it goes to stderr, which systemd keeps.",
        '# For a file: log_path = "~/.local/state/ironsync/ironsync.log"',
        "# the SQLite state; the lock and the daemon's control socket live beside it",
        f"database = {v(str(database))}" if database else unset("database"),
        "",
        '# storages: alias = "/folder"; the alias is the name peers share',
        "[paths]",
    ]
    lines += [f"{v(alias)} = {v(str(folder))}" for alias, folder in storages.items()]
    return "\n".join(lines) + "\n"


# --- scan ----------------------------------------------------------------------------------


class TtyProgress:
    """A progress bar on stderr for the hashing part of a scan (only on a TTY)."""

    def __init__(self) -> None:
        self._bar: Any = None

    def begin(self, storage: str, files: int, total_bytes: int) -> None:
        if total_bytes > 0:
            label = f"{storage}: hashing {files} file(s)"
            self._bar = click.progressbar(length=total_bytes, label=label, file=sys.stderr)
            self._bar.__enter__()

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@cli.command()
@click.option("--storage", "names", multiple=True, help="Only this storage (repeatable).")
@json_option
@click.pass_obj
def scan(app: AppContext, names: tuple[str, ...], as_json: bool) -> None:
    """Bring the index up to date with the disk (offline changes too) and say what changed."""
    from ironsync.store import events as ev
    from ironsync.sync.local import StorageUnavailable, scan_storage

    config = app.config()
    storages = _select_storages(config, names)
    failed = False
    progress = TtyProgress() if sys.stderr.isatty() and not as_json else None
    results: list[dict[str, Any]] = []
    with app.database(config) as db:
        for storage in storages:
            try:
                report = scan_storage(db, config.node_id, storage, progress)
            except StorageUnavailable as exc:
                failed = True
                with db.atomic():
                    ev.append_event(
                        db, "error", storage=storage.name, status="error",
                        detail={"reason": exc.reason},
                    )  # fmt: skip
                if as_json:
                    results.append({"storage": storage.name, "error": exc.reason})
                else:
                    click.echo(f"ironsync: error: {exc}", err=True)
                continue
            if report.changes:  # the running daemon tells its peers at once
                _tell_daemon(config, storage.name, [])
            if as_json:
                results.append(_report_json(report))
            else:
                _print_report(report)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    if failed:
        sys.exit(EXIT_FAILED)


def _select_storages(config: Config, names: tuple[str, ...]) -> list[Any]:
    known = {s.name for s in config.storages}
    for name in names:
        if name not in known:
            raise UsageFailure(f"no storage '{name}' in {config.path} (known: {sorted(known)})")
    return [s for s in config.storages if not names or s.name in names]


def _print_report(report: ScanReport) -> None:
    for change in report.changes:
        if change.kind == "moved":
            click.echo(f"{report.storage}: moved     {change.from_path} -> {change.path}")
        else:
            shown = _shown(change.path) + ("/" if change.entry == DIR else "")
            if change.entry == SYMLINK:
                shown += " (symlink)"
            click.echo(f"{report.storage}: {change.kind:<9} {shown}")
    for path, reason in report.unreadable + report.bad_names:
        click.echo(f"{report.storage}: skipped   {_shown(path)} ({reason})")
    parts = [f"{report.count(k)} {k}" for k in ("created", "modified", "deleted", "moved")]
    click.echo(f"{report.storage}: {', '.join(parts)}, {report.unchanged} unchanged")


def _report_json(report: ScanReport) -> dict[str, Any]:
    return {
        "storage": report.storage,
        "changes": [
            {"kind": c.kind, "path": c.path, **({"from": c.from_path} if c.from_path else {})}
            for c in report.changes
        ],
        "unchanged": report.unchanged,
        "bytes_hashed": report.bytes_hashed,
        "unreadable": [{"path": p, "reason": r} for p, r in report.unreadable],
        "bad_names": [{"path": p, "reason": r} for p, r in report.bad_names],
        "symlinks_skipped": len(report.symlinks),
    }


# --- status --------------------------------------------------------------------------------


@cli.command()
@json_option
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds (on a terminal).")
@click.pass_obj
def status(app: AppContext, as_json: bool, watch: bool) -> None:
    """Storages, file counts, storage hashes, peers, last scan and sync."""
    if watch:
        if not sys.stdout.isatty():
            raise UsageFailure("--watch needs a terminal; use --json for scripts")
        try:
            while True:
                click.clear()
                _show_status(app, as_json)
                time.sleep(2)
        except KeyboardInterrupt:
            return
    _show_status(app, as_json)


def _show_status(app: AppContext, as_json: bool) -> None:
    config = app.config()
    with app.database(config) as db:
        info = collect_status(db, config)
    info["daemon"] = _ask_daemon_status(config)
    live = (info["daemon"] or {}).get("connected", {})
    for peer in info["peers"]:
        session = live.get(peer["node_id"])
        peer["connected"] = session is not None
        if session is not None:  # the open sessions' figures, live, on top of the ended ones'
            peer["bytes_in"] += session["bytes_in"]
            peer["bytes_out"] += session["bytes_out"]
            peer["last_seen"] = info["daemon"].get("now", peer["last_seen"])
            peer["address"] = peer["address"] or session["address"]
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"node {info['node_id']} (group {info['group']}), database {info['database']}")
    for s in info["storages"]:
        click.echo(
            f"storage {s['name']}: {s['files']} files, {s['folders']} folders, "
            f"{s['symlinks']} symlinks, {s['bytes']} bytes, {s['tombstones']} tombstones,"
            f" {s['pending']} pending, {s['conflicts']} conflicts,"
            f" hash {s['storage_hash']}"
        )
        click.echo(f"  root {s['root']}")
        click.echo(
            f"  last scan {s['last_scan_at'] or 'never'}, last sync {s['last_sync_at'] or 'never'}"
        )
        if s["write_failures"]:
            err = s["last_write_error"]
            click.echo(
                f"  {s['write_failures']} failed write(s) since the last sync; last: "
                f"{err['path']} at {err['at']}: {err['reason']}"
            )
    daemon_info = info["daemon"]
    if daemon_info is None:
        click.echo("daemon: not running")
    else:
        watcher = daemon_info["watcher"]
        state = (
            "off"
            if not watcher["enabled"]
            else (
                "healthy" if watcher.get("healthy") else f"NOT healthy ({watcher.get('failure')})"
            )
        )
        click.echo(f"daemon: running (pid {daemon_info['pid']}), watcher {state}")
    if not info["peers"]:
        click.echo("peers: none seen yet")
    for p in info["peers"]:
        state = "connected" if p["connected"] else "not connected"
        seen = "now" if p["connected"] else p["last_seen"] or "never"
        click.echo(
            f"peer {p['node_id']}: {state}, {p['address'] or 'address unknown'}, last seen "
            f"{seen}, last sync {p['last_sync_at'] or 'never'}, "
            f"{p['bytes_in']} bytes in, {p['bytes_out']} bytes out"
        )


def _ask_daemon_status(config: Config) -> dict[str, Any] | None:
    """The running daemon's live view (connected peers, watcher), or None."""
    return _daemon_answer(config, {"cmd": "status"})


def _daemon_answer(config: Config, request: dict[str, Any]) -> dict[str, Any] | None:
    """The running daemon's one-line answer to `request` (None when no daemon answers)."""
    from ironsync.control import ask_daemon

    try:
        with contextlib.closing(ask_daemon(config, request)) as replies:
            for reply in replies:
                return reply
    except (OSError, ValueError):  # TimeoutError is an OSError
        return None
    return None


def collect_status(db: Database, config: Config) -> dict[str, Any]:
    from ironsync.store import index

    storages = []
    for storage in config.storages:
        row = index.ensure_storage(db, storage.name, storage.root)
        counts = db.query_one(
            "SELECT coalesce(sum(deleted = 0 AND type = 'file'), 0),"
            " coalesce(sum(CASE WHEN type = 'file' THEN size END), 0),"
            " coalesce(sum(deleted = 1), 0), coalesce(sum(deleted = 0 AND type = 'dir'), 0),"
            " coalesce(sum(deleted = 0 AND type = 'symlink'), 0)"
            " FROM files WHERE storage_id = ?",
            (row.id,),
        )
        assert counts is not None
        storages.append(
            {
                "name": row.name,
                "root": str(row.root),
                "files": counts[0],
                "folders": counts[3],
                "symlinks": counts[4],
                "bytes": counts[1],
                "tombstones": counts[2],
                "storage_hash": index.storage_hash(db, row.id).hex(),
                # paths where a peer's last announced row differs from ours
                "pending": db.scalar(
                    "SELECT count(DISTINCT path) FROM peer_differences WHERE storage = ?",
                    (row.name,),
                ),
                "conflicts": db.scalar(
                    "SELECT count(*) FROM files WHERE storage_id = ? AND deleted = 0"
                    " AND instr(path, '.sync-conflict-') > 0",
                    (row.id,),
                ),
                "sequence": row.sequence,
                "last_scan_at": row.last_scan_at,
                "last_sync_at": row.last_sync_at,
                **_write_failures(db, row.name, row.last_sync_at),
            }
        )
    peers = [
        {
            "node_id": r[0],
            "address": r[1],
            "last_seen": r[2],
            "last_sync_at": r[3],
            "bytes_in": r[4],
            "bytes_out": r[5],
        }
        for r in db.query(
            "SELECT node_id, address, last_seen, last_sync_at, bytes_in, bytes_out"
            " FROM peers ORDER BY node_id"
        )
    ]
    return {
        "node_id": config.node_id,
        "group": config.group,
        "database": str(config.database),
        "storages": storages,
        "peers": peers,
    }


def _write_failures(db: Database, storage: str, since: str | None) -> dict[str, Any]:
    """How many writes failed in `storage` since its last converged sync, and the last one."""
    where = "FROM events WHERE kind = 'write_failed' AND storage = ? AND at > ?"
    args = (storage, since or "")
    last = db.query_one(f"SELECT at, path, peer, detail {where} ORDER BY seq DESC LIMIT 1", args)
    error = None
    if last is not None:
        detail = json.loads(last[3]) if last[3] else {}
        error = {"at": last[0], "path": last[1], "peer": last[2], "reason": detail.get("reason")}
    return {
        "write_failures": db.scalar(f"SELECT count(*) {where}", args),
        "last_write_error": error,
    }


# --- log -----------------------------------------------------------------------------------


@cli.group()
def log() -> None:
    """The event log (the `events` table)."""


@log.command("tail")
@click.option("-n", "count", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events as they come.")
@json_option
@click.pass_obj
def log_tail(app: AppContext, count: int, follow: bool, as_json: bool) -> None:
    """Print the last N events, oldest first; with -f, follow new ones."""
    from ironsync.store import events as ev

    config = app.config()
    show: Callable[[ev.Event], None] = _print_event_json if as_json else _print_event
    with app.database(config) as db:
        last_seq = 0
        for event in ev.last_events(db, count):
            show(event)
            last_seq = event.seq
        if not follow:
            return
        if count == 0:
            last_seq = int(db.scalar("SELECT coalesce(max(seq), 0) FROM events"))
        try:
            while True:
                batch = ev.events_after(db, last_seq)
                for event in batch:
                    show(event)
                    last_seq = event.seq
                if not batch:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            return


def _shown(path: str) -> str:
    """A path as it is printed for people: its control characters (legal in names, and
    synced) as \\xNN, so that a name cannot move the cursor or forge a line of output."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _print_event(event: ev.Event) -> None:
    detail = dict(event.detail) if isinstance(event.detail, dict) else event.detail
    entry = detail.pop("type", None) if isinstance(detail, dict) else None
    path = event.path
    if path and entry == DIR:
        path += "/"  # a folder reads as one: "created docs:photos/"
    where = f"{event.storage}:{_shown(path)}" if path else (event.storage or "-")
    what = event.kind if entry is None else f"{event.kind} {kind_label(entry)}"
    parts = [event.at, what, where]
    if isinstance(detail, dict) and entry == SYMLINK and "target" in detail:
        parts.append(f"-> {_shown(detail.pop('target'))}")
    if isinstance(detail, dict) and entry == DIR and "mode" in detail:
        parts.append(f"mode {detail.pop('mode')}")
    if event.status != "ok":
        parts.append(f"[{event.status}]")
    if event.peer:
        parts.append(f"peer={event.peer}")
    if detail:
        parts.append(json.dumps(detail, sort_keys=True, separators=(",", ":")))
    click.echo("  ".join(parts))


def _print_event_json(event: ev.Event) -> None:
    click.echo(json.dumps(event.to_json(), sort_keys=True, separators=(",", ":")))


@log.command("compact")
@click.option(
    "--older-than",
    "days",
    type=click.IntRange(min=1),
    required=True,
    metavar="DAYS",
    help="Delete events older than this many days.",
)
@click.pass_obj
def log_compact(app: AppContext, days: int) -> None:
    """Delete old events (the documented exception to append-only; tombstones stay)."""
    from ironsync.store import events as ev

    config = app.config()
    before = ev.iso_now(datetime.now(UTC) - timedelta(days=days))
    with app.database(config) as db:
        removed = ev.compact_events(db, before)
    click.echo(f"removed {removed} event(s) older than {before}")


# --- daemon and sync ------------------------------------------------------------------------


@cli.command()
@click.pass_obj
def daemon(app: AppContext) -> None:
    """Serve peers, full sync at start, then keep peers current. Stays in the foreground;
    SIGTERM or SIGINT stop it cleanly."""
    from ironsync.control import LockHeld
    from ironsync.daemon import CannotStart, run_daemon

    config = app.config()
    _setup_log_file(config)
    with app.database(config) as db:
        try:
            code = run_daemon(config, db)
        except LockHeld as exc:
            raise UsageFailure(f"{exc}: is a daemon already running?") from None
        except CannotStart as exc:
            if config.log_path is not None:  # stderr has it once; the log file too
                logging.getLogger("ironsync.daemon").error("%s", exc)
            raise UsageFailure(str(exc)) from None
    sys.exit(code)


def _setup_log_file(config: Config) -> None:
    root = logging.getLogger()
    root.setLevel(min(root.level, logging.INFO))
    if config.log_path is not None:
        config.log_path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(config.log_path)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]


class SyncTtyProgress:
    """Files, bytes and rate on one refreshing stderr line (only on a TTY)."""

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0
        self.started = time.monotonic()

    def file_done(self, storage: str, path: str, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes
        rate = self.bytes / max(time.monotonic() - self.started, 1e-3)
        line = f"\r{self.files} file(s), {_human(self.bytes)}, {_human(rate)}/s  {path[-40:]}"
        click.echo(line.ljust(90), err=True, nl=False)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@cli.command()
@click.option("--storage", "names", multiple=True, help="Only this storage (repeatable).")
@json_option
@click.pass_obj
def sync(app: AppContext, names: tuple[str, ...], as_json: bool) -> None:
    """One full sync with every reachable peer now (for cron).

    Through the running daemon when one answers, otherwise standalone. Exit 0: every reachable
    peer converged; 1: a sync failed or did not converge; 2: usage or config error; 3: no peer
    reachable; 4: converged, but files were left out (listed): files that cannot be read here,
    names that are not valid UTF-8, names this node (or a peer) cannot store."""
    from ironsync.control import LockHeld, ask_daemon

    config = app.config()
    storages = tuple(s.name for s in _select_storages(config, names)) if names else None
    tty = sys.stderr.isatty() and not as_json
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []

    def report(item: dict[str, Any]) -> None:
        if "peer" not in item and "skipped" in item:  # what this node's scan left out
            skipped.extend(item["skipped"])
            return
        # names this node could not store, pulling from that peer (the same in each result)
        skipped.extend(s for s in item.get("skipped", []) if s not in skipped)
        results.append(item)
        if tty:
            click.echo("", err=True)

    shown = SyncTtyProgress() if tty else None

    def via_daemon() -> int | None:
        try:
            ask = {"cmd": "sync", "storages": storages, "progress": shown is not None}
            for message in ask_daemon(config, ask):
                if "progress" in message and shown is not None:
                    item = message["progress"]
                    shown.file_done(item["storage"], item["path"], item["bytes"])
                elif "peer_result" in message:
                    report(message["peer_result"])
                elif "exit" in message:
                    return int(message["exit"])
        except OSError:  # TimeoutError is one
            return None
        raise click.ClickException("the daemon closed the control socket without a result")

    # A daemon that is starting holds the lock before its socket answers: ask again a while.
    deadline = time.monotonic() + DAEMON_START_WAIT_S
    while (code := via_daemon()) is None:
        import asyncio

        from ironsync.daemon import standalone_sync  # only now: TLS, the engine, discovery

        with app.database(config) as db:
            try:
                code = asyncio.run(standalone_sync(config, db, storages, report, shown))
                break
            except LockHeld as exc:
                if time.monotonic() >= deadline:
                    raise click.ClickException(
                        f"{exc}, and no daemon answers on its control socket"
                    ) from None
        time.sleep(0.2)
    _print_sync_results(results, skipped, code, as_json)
    sys.exit(code)


def _print_sync_results(
    results: list[dict[str, Any]], skipped: list[dict[str, str]], code: int, as_json: bool
) -> None:
    if as_json:
        click.echo(json.dumps({"exit": code, "results": results, "skipped": skipped}, indent=2))
        return
    for item in skipped:
        click.echo(
            f"{item['storage']}: skipped {_shown(item['path'])} ({item['reason']}): not synced"
        )
    peers = [r for r in results if "peer" in r]
    unreachable = [r for r in results if "unreachable" in r]
    for r in peers:
        state = "converged" if r["converged"] else f"NOT converged ({r.get('error') or 'see log'})"
        click.echo(
            f"peer {r['peer']}: {state}; pulled {r['pulled']} file(s), "
            f"{r['bytes_from_peer']} bytes from the peer, {r['deleted']} deleted, "
            f"{r['conflicts']} conflict(s), peer changed {r['peer_changed']}"
        )
        for failure in r.get("failed", []):
            click.echo(f"  failed: {_shown(failure)}")
        if r.get("peer_skipped"):
            click.echo(
                f"  peer {r['peer']} skipped {r['peer_skipped']} name(s) it cannot store "
                "(`ironsync log tail` there lists them): not synced there"
            )
    for r in unreachable:
        click.echo(f"peer {r['unreachable']}: unreachable ({r['reason']})")
    if not peers:
        click.echo("no peer reachable")


# --- history ---------------------------------------------------------------------------------


@cli.command()
@click.argument("path")
@click.option("--storage", "name", help="The storage (default: found from PATH).")
@json_option
@click.pass_obj
def history(app: AppContext, path: str, name: str | None, as_json: bool) -> None:
    """Every recorded version and event of one file on this node.

    PATH is ALIAS:PATH, from anywhere (docs:notes/todo.txt), or a path inside a storage
    folder, absolute or relative to the current folder (notes/todo.txt in ~/Documents, with
    docs = "~/Documents" in the config's [paths])."""
    from ironsync.store import events as ev
    from ironsync.store import index

    config = app.config()
    storage_name, rel = _locate(config, path, name)
    with app.database(config) as db:
        row = index.get_storage(db, storage_name)
        current = index.get_file(db, row.id, rel) if row else None
        events = ev.events_for_path(db, storage_name, rel)
    from ironsync.sync.versions import list_versions

    kept = list_versions(config.storage(storage_name).root, rel)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "storage": storage_name,
                    "path": rel,
                    "current": None
                    if current is None
                    else {
                        "deleted": current.deleted,
                        "type": current.kind,
                        "target": current.target,
                        "mode": f"{current.mode:o}",
                        "size": current.size,
                        "mtime_ns": current.mtime_ns,
                        "hash": current.hash.hex() if current.hash else None,
                        "version": json.loads(current.version),
                        "modified_by": current.modified_by,
                        "sequence": current.sequence,
                    },
                    "events": [e.to_json() for e in events],
                    "versions": [
                        {"file": str(v.file), "stamp": v.stamp.isoformat(), "size": v.size}
                        for v in kept
                    ],
                },
                indent=2,
            )
        )
        return
    if current is None and not events and not kept:
        raise click.ClickException(f"nothing recorded for {storage_name}:{rel}")
    click.echo(f"{storage_name}:{rel}")
    if current is not None:
        state = _describe_row(current)
        click.echo(
            f"  now: {state}, version {current.version} by {current.modified_by}, "
            f"sequence {current.sequence}"
        )
    for event in events:
        _print_event(event)
    for version in kept:
        click.echo(
            f"  kept version {version.stamp:%Y-%m-%dT%H:%M:%SZ}: {version.size} bytes, "
            f"{version.file}"
        )


def _describe_row(row: index.FileRow) -> str:
    """What a row holds, for a person: deleted, a folder, a link, a file."""
    if row.deleted:
        return "deleted" if row.kind == FILE else f"deleted ({kind_label(row.kind)})"
    if row.kind == DIR:
        return f"folder, mode {row.mode:o}"
    if row.kind == SYMLINK:
        return f"symlink -> {row.target}"
    assert row.hash is not None
    return f"{row.size} bytes, mode {row.mode:o}, hash {row.hash.hex()}"


# --- restore ---------------------------------------------------------------------------------


@cli.command()
@click.argument("path")
@click.option(
    "--at",
    "at",
    metavar="TIME",
    help="The newest version at or before TIME "
    "(ISO date or date-time, UTC unless it says otherwise). Default: the newest.",
)
@click.option("--storage", "name", help="The storage (default: found from PATH).")
@click.pass_obj
def restore(app: AppContext, path: str, at: str | None, name: str | None) -> None:
    """Put a kept version of PATH back, as a new local change that syncs to every peer.

    What PATH holds now (if anything) is kept as a version first, unless a kept version holds
    it already. A PATH that holds the version already is left alone ("unchanged"). A deleted
    folder comes back with every file the versions folder holds under it.

    PATH is ALIAS:PATH, from anywhere (docs:notes/todo.txt), or a path inside a storage
    folder, absolute or relative to the current folder."""
    from ironsync.sync.versions import version_at, versioned_under

    config = app.config()
    storage_name, rel = _locate(config, path, name)
    storage = config.storage(storage_name)
    moment = _parse_time(at) if at else None
    when = f" at or before {moment:%Y-%m-%dT%H:%M:%SZ}" if moment else ""
    version = version_at(storage.root, rel, moment)
    if version is None:
        inside = [
            p for p in versioned_under(storage.root, rel) if version_at(storage.root, p, moment)
        ]
        if not inside:
            raise click.ClickException(f"no kept version of {storage_name}:{rel}{when}")
        (storage.root / rel).mkdir(parents=True, exist_ok=True)
        unchanged = 0
        for member in inside:
            found = version_at(storage.root, member, moment)
            assert found is not None
            unchanged += not _put_back(storage.root, member, found.file)
        changes, told = _record_changed(app, config, storage, [*_folders_to(rel, inside), *inside])
        same = f", {unchanged} of them unchanged" if unchanged else ""
        click.echo(
            f"restored {storage_name}:{rel}/ with {len(inside)} file(s) from the versions "
            f"folder{when} ({len(changes)} change(s){same}); {_reach(told)}"
        )
        return
    if not _put_back(storage.root, rel, version.file):
        click.echo(
            f"{storage_name}:{rel} unchanged: it holds the version of "
            f"{version.stamp:%Y-%m-%dT%H:%M:%SZ} already; nothing written, no version kept"
        )
        return
    changes, told = _record_changed(app, config, storage, [rel])
    kind = changes[0].kind if changes else "unchanged"
    click.echo(
        f"restored {storage_name}:{rel} from the version of "
        f"{version.stamp:%Y-%m-%dT%H:%M:%SZ} ({kind}); {_reach(told)}"
    )


def _record_changed(
    app: AppContext, config: Config, storage: Any, paths: list[str]
) -> tuple[list[Change], bool]:
    """Index `paths` of `storage`, which a command just changed on disk: through the
    running daemon when one answers (it tells its peers at once), else here. Returns the
    changes and whether the daemon recorded them."""
    from ironsync.sync.local import Change, rescan_paths

    reply = _tell_daemon(config, storage.name, paths)
    if reply is not None and "changes" in reply:
        return [Change(*item) for item in reply["changes"]], True
    with app.database(config) as db:
        return rescan_paths(db, config.node_id, storage, paths), False


def _tell_daemon(config: Config, storage: str, paths: list[str]) -> dict[str, Any] | None:
    """The running daemon's answer to `changed` (None when no daemon answers)."""
    return _daemon_answer(config, {"cmd": "changed", "storage": storage, "paths": paths})


def _reach(told: bool) -> str:
    if told:
        return "the running daemon has told its peers"
    return "no daemon is running here: it reaches the peers with the next sync"


def _put_back(root: Path, rel: str, kept: Path) -> bool:
    """Copy the kept version `kept` to `rel`, unless `rel` holds the same bytes already
    (False). What is there now is kept as a version first, unless the newest version or one
    with its stamp holds it already."""
    import shutil

    from ironsync.sync.versions import keep_version, same_content, version_at

    target = root / rel
    if same_content(target, kept):
        return False
    newest = version_at(root, rel, None)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".ironsync-restore-{os.getpid()}.tmp"
    try:
        shutil.copy2(kept, temp, follow_symlinks=False)
        keep_version(root, rel, move=False, like=newest.file if newest else None)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return True


def _folders_to(folder: str, paths: list[str]) -> list[str]:
    """`folder` and every folder between it and `paths`, outermost first."""
    found = {folder}
    for path in paths:
        parts = path.split("/")[:-1]
        found.update("/".join(parts[:n]) for n in range(folder.count("/") + 1, len(parts) + 1))
    return sorted(found)


# --- conflicts -------------------------------------------------------------------------------


@cli.command()
@json_option
@click.pass_obj
def conflicts(app: AppContext, as_json: bool) -> None:
    """List conflicts per name: the file under the name, then each conflict copy, each with
    the node that wrote it, its time and size."""
    from ironsync.sync.conflicts import find_conflicts

    config = app.config()
    with app.database(config) as db:
        found = [c for s in config.storages for c in find_conflicts(db, s)]
    by_name: dict[tuple[str, str], list[Any]] = {}
    for c in found:
        by_name.setdefault((c.storage, c.path), []).append(c)
    if as_json:
        listed = [_conflict_json(*name, group) for name, group in by_name.items()]
        click.echo(json.dumps(listed, indent=2))
        return
    if not found:
        click.echo("no conflicts")
    for (storage, path), group in by_name.items():
        click.echo(f"{storage}:{_shown(path)}")
        rows = _conflict_rows(group)
        width = max(len(shown) for shown, _ in rows)
        for shown, said in rows:
            click.echo(f"  {shown:<{width}}  {said}")


def _conflict_rows(group: list[Any]) -> list[tuple[str, str]]:
    """(path, what it holds and who wrote it) for the name of `group` and each of its copies."""
    original = group[0].original
    sides = [c.copy for c in group]
    rows = []
    if original is None:
        rows.append((_shown(group[0].path), "not in the index"))
    else:
        sides.insert(0, original)
    node_width = max(len(side.node) for side in sides)
    for side in sides:
        if side.deleted:
            said = f"deleted by {side.node}"
        else:
            said = (
                f"written by {side.node:<{node_width}} "
                f"{side.mtime:%Y-%m-%dT%H:%M:%SZ}  {side.size} bytes"
            )
        rows.append((_shown(side.path), said))
    return rows


def _conflict_json(storage: str, path: str, group: list[Any]) -> dict[str, Any]:
    def side(s: Any, copy: bool) -> dict[str, Any]:
        return {
            "path": s.path,
            "node": s.node,
            "deleted": s.deleted,
            "mtime": None if s.deleted else s.mtime.isoformat(),
            "size": None if s.deleted else s.size,
            "conflict_copy": copy,
        }

    original = group[0].original
    sides = [] if original is None else [side(original, False)]
    sides += [side(c.copy, True) for c in group]
    return {"storage": storage, "path": path, "sides": sides}


@cli.command()
@click.argument("path")
@click.option(
    "--keep",
    required=True,
    metavar="mine|theirs|CONFLICT_FILE",
    help="Which side keeps the name: mine = the file under the original name, theirs = the "
    "conflict copy (when there is one), or the conflict copy named. Every other side goes to "
    "the versions folder.",
)
@click.option("--storage", "name", help="The storage (default: found from PATH).")
@click.pass_obj
def resolve(app: AppContext, path: str, keep: str, name: str | None) -> None:
    """Settle the conflict of PATH; the outcome syncs to every peer.

    PATH is ALIAS:PATH, from anywhere (docs:notes/todo.txt), or a path inside a storage
    folder, absolute or relative to the current folder."""
    from ironsync.sync.conflicts import find_conflicts
    from ironsync.sync.conflicts import resolve as settle

    config = app.config()
    storage_name, rel = _locate(config, path, name)
    storage = config.storage(storage_name)
    if keep not in ("mine", "theirs"):
        keep = _locate(config, keep, storage_name)[1]
    with app.database(config) as db:
        matching = [c for c in find_conflicts(db, storage) if rel in (c.path, c.copy.path)]
        if not matching:
            raise click.ClickException(f"no conflict copy of {storage_name}:{rel}")
        original = matching[0].path
        group = [c for c in find_conflicts(db, storage) if c.path == original]
    try:
        touched = settle(storage, group, keep)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    changes, told = _record_changed(app, config, storage, touched)
    for change in changes:
        click.echo(f"{storage_name}: {change.kind:<9} {change.path}")
    click.echo(
        f"resolved {storage_name}:{original} (kept {keep}); the other side is in versions; "
        f"{_reach(told)}"
    )


# --- service and completion --------------------------------------------------------------------


@cli.group()
def service() -> None:
    """Run the daemon as a systemd user service (restart on failure, SIGTERM to stop)."""


@service.command("install")
@click.option("--dry-run", is_flag=True, help="Only print the unit; change nothing.")
@click.pass_obj
def service_install(app: AppContext, dry_run: bool) -> None:
    """Write and enable ~/.config/systemd/user/ironsync.service, and start it."""
    from ironsync import service as svc

    config = app.config()  # a broken config is an error now, not at the next boot
    unit = svc.render_unit(config.path.absolute())
    if dry_run:
        click.echo(unit, nl=False)
        return
    path = svc.unit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit, encoding="utf-8")
    click.echo(f"wrote {path}")
    for args in (("daemon-reload",), ("enable", "--now", svc.UNIT_NAME)):
        _systemctl(svc, *args)
    click.echo("enabled and started; `ironsync service status` shows it")


@service.command("uninstall")
def service_uninstall() -> None:
    """Stop, disable and remove the user unit."""
    from ironsync import service as svc

    path = svc.unit_path()
    if path.exists():
        _systemctl(svc, "disable", "--now", svc.UNIT_NAME, check=False)
        path.unlink()
        click.echo(f"removed {path}")
        _systemctl(svc, "daemon-reload", check=False)
    else:
        click.echo(f"{path} is not installed")


@service.command("status")
def service_status() -> None:
    """systemd's view of the user unit."""
    from ironsync import service as svc

    result = _systemctl(svc, "status", "--no-pager", svc.UNIT_NAME, check=False)
    click.echo(result.stdout, nl=False)
    sys.exit(0 if result.returncode == 0 else EXIT_FAILED)


def _systemctl(svc: Any, *args: str, check: bool = True) -> Any:
    click.echo(f"$ systemctl --user {' '.join(args)}")
    try:
        result = svc.systemctl(*args)
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc}; use cron with `ironsync sync` instead") from None
    if check and result.returncode != 0:
        raise click.ClickException(
            f"systemctl --user {' '.join(args)} failed: {result.stderr.strip()}"
        )
    return result


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: e.g. `eval "$(ironsync completion bash)"`."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "ironsync", "_IRONSYNC_COMPLETE").source())


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageFailure(f"--at {text!r} is not an ISO date or date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if len(text) == 10:  # a date alone: the end of that day
        moment = moment.replace(hour=23, minute=59, second=59)
    return moment.astimezone(UTC)


def _locate(config: Config, path: str, name: str | None) -> tuple[str, str]:
    """The storage and relative path that PATH names: ALIAS:PATH, or a path inside a storage
    folder, absolute or relative to the current folder; with `name` (the --storage option),
    PATH is relative to that storage's folder."""
    if name is not None:
        _select_storages(config, (name,))
        return name, path.strip("/")
    alias, sep, rest = path.partition(":")
    if sep and any(s.name == alias for s in config.storages):
        return alias, rest.strip("/")
    typed = Path(os.path.abspath(Path(path).expanduser()))  # "." and ".." resolved
    # the storage roots are resolved: so is the folder holding PATH (a symlinked way in)
    for full in (typed, Path(os.path.realpath(typed.parent)) / typed.name):
        for storage in config.storages:
            if full.is_relative_to(storage.root):
                return storage.name, full.relative_to(storage.root).as_posix()
    raise UsageFailure(_outside_storages(config, path))


def _outside_storages(config: Config, path: str) -> str:
    """The error for a PATH found in no storage: what the storages are, and the two forms."""
    folders = ", ".join(f"{s.name}: {s.root}" for s in config.storages)
    first = config.storages[0].name
    alias, sep, rest = path.partition(":")
    if sep and ALIAS_RE.match(alias):
        return (
            f"{path}: no storage is named '{alias}' in {config.path} ({folders}); give "
            f"ALIAS:PATH with one of them, e.g. {first}:{rest.strip('/')}, or a path inside "
            "a storage folder"
        )
    typed = PurePosixPath(path)
    inside = typed.name if typed.is_absolute() or ".." in typed.parts else typed.as_posix()
    return (
        f"{path} is not inside a storage folder ({folders}); give a path inside one or "
        f"ALIAS:PATH, e.g. {first}:{inside}"
    )


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="ironsync")
    except BrokenPipeError:  # `ironsync log tail | head`
        sys.stderr.close()
        sys.exit(0)
