"""Finding the nodes of our group on the LAN with mDNS / DNS-SD (zeroconf), issue 5 part 3.

Theory of operation
-------------------
Every node with `enable_service_discovery = true` advertises one DNS-SD service (RFC 6763) of
type `_ironsync._tcp.local.` and browses for the others. The service's TXT record is the
contract between nodes (pinned by tests):

    v=1                      format version; other versions are ignored
    id=<node id>             1-64 of [A-Za-z0-9_.-], the node id its certificate will name
    port=<TCP port>          where it serves peers; must equal the SRV record's port
    tag=<16 hex digits>      `group_tag(group, group_secret)`: equal tags mean same group and
                             secret; the tag is scrypt + HKDF of the secret, so it tells an
                             onlooker nothing about it (see ironsync.net.tls)

The instance name is `<node id, cut to 46>-<tag>`: one DNS label (at most 63 bytes), unique
per node and group. It is only a name: everything we act on comes from the TXT record.

What a node learns goes through three filters, each logged and none fatal:
1. `parse_announcement`: a malformed TXT record (missing key, bad node id, port or tag, a
   port that disagrees with SRV) is an InvalidAnnouncement, logged once per service and reason.
2. `ignore_reason`: another group's tag, or our own node id, is skipped (logged at debug).
3. `choose_host`: of the advertised addresses, the one to dial (see its docstring).

`PeerTable` then decides what to report: `on_found(PeerAddress)` the first time a node is
seen and whenever its address or port changes (a re-announcement of the same address says
nothing new), `on_lost(node_id)` when the last service naming that node is gone (a goodbye
packet, or its records expired). Stopping discovery reports nothing.

Interfaces: discovery runs where the daemon listens, so the addresses we advertise are ones a
peer can dial. A specific `listen_address` binds zeroconf to that address's interface only
(`interfaces=[address]`); `0.0.0.0` (or `::`) means every interface. Records carry short TTLs
(HOST_TTL, OTHER_TTL) so a node that crashed without saying goodbye is forgotten in minutes.

Discovery finds candidates; it proves nothing. A tag is public, anyone can replay it: the TLS
handshake with the group CA is what admits a peer (ironsync.net.session).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import ifaddr  # zeroconf's own dependency for listing interfaces
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ironsync.config import Config
from ironsync.net.tls import GROUP_TAG_BYTES, NODE_ID_PATTERN, group_tag

log = logging.getLogger(__name__)

SERVICE_TYPE = "_ironsync._tcp.local."
TXT_VERSION = "1"
TXT_VERSION_KEY = b"v"
TXT_NODE_ID_KEY = b"id"
TXT_PORT_KEY = b"port"
TXT_TAG_KEY = b"tag"
TAG_PATTERN = re.compile(rf"[0-9a-f]{{{2 * GROUP_TAG_BYTES}}}")
PORT_PATTERN = re.compile(r"[0-9]{1,5}")
MAX_LABEL_BYTES = 63  # one DNS label (RFC 1035 section 2.3.4)
INSTANCE_NODE_ID_CHARS = MAX_LABEL_BYTES - 1 - 2 * GROUP_TAG_BYTES  # 46

HOST_TTL = 120
"""Seconds peers may cache our SRV and address records (RFC 6762 section 10's value)."""

OTHER_TTL = 120
"""Seconds peers may cache our PTR and TXT records. RFC 6762 suggests 75 minutes; we pick two,
so a node that crashed without a goodbye is reported lost within minutes, for the price of a
refresh query every ~100 s."""

RESOLVE_TIMEOUT_MS = 3000
"""Milliseconds to wait for a service's SRV, TXT and address records once it is seen."""

MAX_SERVICES = 1024
"""Services of our group remembered at most; a flood of announcements beyond is ignored."""

MAX_COMPLAINTS = 1024
"""Distinct (service, problem) warnings remembered, so each is logged once, not per packet."""


class DiscoveryError(Exception):
    """Discovery could not start (no such interface, address in use, ...): the reason."""


class InvalidAnnouncement(ValueError):
    """A service of our type whose records don't follow the TXT contract (the sender's fault)."""


@dataclass(frozen=True)
class PeerAddress:
    """A node of our group as discovery sees it: who, and where to dial it."""

    node_id: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """`host:port` as `peers` in the config spells it (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Announcement:
    """What one service's records say, validated (see the module docstring)."""

    node_id: str
    group_tag: str
    port: int
    addresses: tuple[str, ...]


class ServiceInfoLike(Protocol):
    """The part of zeroconf's ServiceInfo that `announcement_from_info` reads."""

    @property
    def properties(self) -> Mapping[bytes, bytes | None]: ...

    @property
    def port(self) -> int | None: ...

    def parsed_scoped_addresses(self, version: IPVersion = ...) -> list[str]: ...


# --- the TXT contract -------------------------------------------------------------------------


def txt_properties(node_id: str, port: int, tag: str) -> dict[bytes, bytes]:
    """The TXT record this node advertises."""
    return {
        TXT_VERSION_KEY: TXT_VERSION.encode(),
        TXT_NODE_ID_KEY: node_id.encode(),
        TXT_PORT_KEY: str(port).encode(),
        TXT_TAG_KEY: tag.encode(),
    }


def instance_name(node_id: str, tag: str) -> str:
    """This node's full service name: one label, unique per node and group."""
    return f"{node_id[:INSTANCE_NODE_ID_CHARS]}-{tag}.{SERVICE_TYPE}"


def parse_announcement(
    properties: Mapping[bytes, bytes | None], srv_port: int | None, addresses: Sequence[str]
) -> Announcement:
    """Validate a service's TXT properties (and SRV port); raise InvalidAnnouncement."""
    txt: dict[bytes, bytes | None] = {}
    for key, value in properties.items():
        # Keys are case-insensitive and only the first of a key counts (RFC 6763 section 6.4).
        txt.setdefault(key.lower(), value)
    version = _txt_text(txt, TXT_VERSION_KEY)
    if version != TXT_VERSION:
        raise InvalidAnnouncement(f"TXT format version {version!r}, expected {TXT_VERSION!r}")
    node_id = _txt_text(txt, TXT_NODE_ID_KEY)
    if not NODE_ID_PATTERN.fullmatch(node_id):
        raise InvalidAnnouncement(f"node id {node_id!r} is not 1-64 of [A-Za-z0-9_.-]")
    port_text = _txt_text(txt, TXT_PORT_KEY)
    if not PORT_PATTERN.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise InvalidAnnouncement(f"port {port_text!r} is not a TCP port")
    port = int(port_text)
    if srv_port is not None and srv_port != port:
        raise InvalidAnnouncement(f"SRV port {srv_port} differs from TXT port {port}")
    tag = _txt_text(txt, TXT_TAG_KEY)
    if not TAG_PATTERN.fullmatch(tag):
        raise InvalidAnnouncement(f"group tag {tag!r} is not {2 * GROUP_TAG_BYTES} hex digits")
    return Announcement(node_id, tag, port, tuple(addresses))


def announcement_from_info(info: ServiceInfoLike) -> Announcement:
    """`parse_announcement` of a resolved zeroconf ServiceInfo."""
    return parse_announcement(
        info.properties, info.port, info.parsed_scoped_addresses(IPVersion.All)
    )


def _txt_text(txt: Mapping[bytes, bytes | None], key: bytes) -> str:
    name = key.decode()
    if key not in txt:
        raise InvalidAnnouncement(f"TXT has no {name!r}")
    value = txt[key]
    if value is None:
        raise InvalidAnnouncement(f"TXT {name!r} has no value")
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidAnnouncement(f"TXT {name!r} is not ASCII: {value[:80]!r}") from None


def ignore_reason(announcement: Announcement, node_id: str, tag: str) -> str | None:
    """Why a valid announcement is not a peer of ours, or None when it is."""
    if announcement.group_tag != tag:
        return f"node {announcement.node_id} is in another group"
    if announcement.node_id == node_id:
        return "it is this node"
    return None


# --- addresses --------------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class LocalAddresses:
    """This host's addresses and the networks they are on (what `choose_host` compares)."""

    addresses: frozenset[IPAddress] = frozenset()
    networks: tuple[IPNetwork, ...] = ()


def local_addresses() -> LocalAddresses:
    """Every address of every interface of this host (network namespace), and its network."""
    addresses: set[IPAddress] = set()
    networks: list[IPNetwork] = []
    try:
        adapters = ifaddr.get_adapters()
    except OSError as exc:  # no netlink, no getifaddrs: we just know less
        log.debug("cannot list interfaces: %s", exc)
        adapters = []
    for adapter in adapters:
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                network = ipaddress.ip_network(f"{text}/{ip.network_prefix}", strict=False)
                addresses.add(ipaddress.ip_address(text))
            except ValueError:
                continue
            networks.append(network)
    return LocalAddresses(frozenset(addresses), tuple(networks))


def choose_host(addresses: Sequence[str], local: LocalAddresses) -> str | None:
    """The advertised address to dial, or None when none is usable.

    A node listening on `0.0.0.0` advertises every address it has, some of which lead nowhere
    from here. The order of preference, first criterion first (ties keep the advertised order):
    not one of our own addresses (two hosts with a docker0 at 172.17.0.1 both advertise it,
    and dialing it reaches ourselves), on one of our networks, IPv4, not loopback, not
    link-local. Multicast, unspecified and IPv6 link-local addresses without a scope are never
    chosen."""
    best: tuple[tuple[bool, ...], str] | None = None
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text.partition("%")[0])
        except ValueError:
            continue
        if ip.is_multicast or ip.is_unspecified:
            continue
        if ip.version == 6 and ip.is_link_local and "%" not in text:
            continue  # fe80::/10 is on every link: without a scope it can't be dialed
        rank = (
            ip in local.addresses,
            not any(ip in network for network in local.networks),
            ip.version == 6,
            ip.is_loopback,
            ip.is_link_local,
        )
        if best is None or rank < best[0]:
            best = (rank, text)
    return None if best is None else best[1]


def interface_choice(address: str) -> tuple[list[str] | InterfaceChoice, IPVersion]:
    """zeroconf's `interfaces` and `ip_version` for a listen address (an IP literal)."""
    if address in ("", "0.0.0.0"):
        return InterfaceChoice.All, IPVersion.V4Only
    if address == "::":
        return InterfaceChoice.All, IPVersion.All
    ip = ipaddress.ip_address(address)  # ValueError for a host name: resolve it first
    return [address], IPVersion.V4Only if ip.version == 4 else IPVersion.V6Only


def advertised_addresses(listen_address: str, local: LocalAddresses) -> list[str]:
    """The addresses to put in our A/AAAA records: the listen address when it is specific;
    for a wildcard every non-loopback address of its family (loopback only if that is all)."""
    choice, version = interface_choice(listen_address)
    if isinstance(choice, list):
        return choice
    wanted = {4} if version is IPVersion.V4Only else {4, 6}
    usable = sorted(
        (ip for ip in local.addresses if ip.version in wanted and not ip.is_link_local),
        key=lambda ip: (ip.version, ip.is_loopback, ip.packed),
    )
    routable = [str(ip) for ip in usable if not ip.is_loopback]
    return routable or [str(ip) for ip in usable]


# --- what to report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    peer: PeerAddress


@dataclass(frozen=True)
class Lost:
    node_id: str


Change = Found | Lost


class PeerTable:
    """Which service names which peer, and what that changes for the peers reported.

    A node normally has one service; after a restart with a new name (a name conflict) or a
    change of node id under one name there may briefly be two. The newest service naming a
    node gives its address; the node is lost when no service names it any more."""

    def __init__(self, max_services: int = MAX_SERVICES) -> None:
        self.max_services = max_services
        self._services: dict[str, PeerAddress] = {}  # lowercased name -> peer, oldest first
        self._reported: dict[str, PeerAddress] = {}

    @property
    def peers(self) -> dict[str, PeerAddress]:
        """The peers reported found and not lost since, by node id."""
        return dict(self._reported)

    def seen(self, name: str, peer: PeerAddress) -> list[Change]:
        """Service `name` (re-)announced `peer`."""
        key = name.lower()
        old = self._services.pop(key, None)
        if old is None and len(self._services) >= self.max_services:
            log.warning("ignoring %s: already %d services of our group", name, len(self._services))
            return []
        self._services[key] = peer  # at the end: the newest word about peer.node_id
        node_ids = [old.node_id] if old is not None and old.node_id != peer.node_id else []
        return self._settle([*node_ids, peer.node_id])

    def gone(self, name: str) -> list[Change]:
        """Service `name` said goodbye, expired, or no longer names a peer of ours."""
        old = self._services.pop(name.lower(), None)
        return [] if old is None else self._settle([old.node_id])

    def _settle(self, node_ids: list[str]) -> list[Change]:
        changes: list[Change] = []
        for node_id in node_ids:
            current = None
            for peer in self._services.values():
                if peer.node_id == node_id:
                    current = peer
            if current is None:
                if self._reported.pop(node_id, None) is not None:
                    changes.append(Lost(node_id))
            elif self._reported.get(node_id) != current:
                self._reported[node_id] = current
                changes.append(Found(current))
        return changes


# --- the zeroconf glue ------------------------------------------------------------------------


class Discovery:
    """Advertise this node and report the nodes of its group as they come and go.

    `on_found(peer)` and `on_lost(node_id)` run in the event loop; an exception they raise is
    logged and otherwise ignored."""

    def __init__(
        self,
        node_id: str,
        tag: str,
        port: int,
        on_found: Callable[[PeerAddress], None],
        on_lost: Callable[[str], None],
        *,
        listen_address: str = "0.0.0.0",
    ) -> None:
        if not NODE_ID_PATTERN.fullmatch(node_id):
            raise ValueError(f"node id {node_id!r} is not 1-64 of [A-Za-z0-9_.-]")
        if not TAG_PATTERN.fullmatch(tag):
            raise ValueError(f"group tag {tag!r} is not {2 * GROUP_TAG_BYTES} hex digits")
        self.node_id = node_id
        self.tag = tag
        self.port = port
        self.listen_address = listen_address
        self.on_found = on_found
        self.on_lost = on_lost
        self.table = PeerTable()
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._stale: set[str] = set()  # names re-announced while being resolved
        self._complaints: set[tuple[str, str]] = set()

    @property
    def peers(self) -> dict[str, PeerAddress]:
        """The nodes of our group known now, by node id."""
        return self.table.peers

    @property
    def service_name(self) -> str | None:
        """Our service's name once advertised (zeroconf may have renamed it on a conflict)."""
        return self._info.name if self._info is not None else None

    async def start(self) -> None:
        """Advertise and browse; raise DiscoveryError when zeroconf can't run here."""
        if self._zeroconf is not None:
            raise RuntimeError("discovery already started")
        address = self.listen_address
        try:
            if address not in ("", "0.0.0.0", "::"):
                address = await _resolve_literal(address)
            interfaces, ip_version = interface_choice(address)
            zeroconf = self._zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=ip_version)
        except (OSError, ValueError, RuntimeError) as exc:
            raise DiscoveryError(f"cannot run mDNS on {self.listen_address!r}: {exc}") from exc
        try:
            advertised = advertised_addresses(address, local_addresses())
            if not advertised:
                log.warning("discovery: no address to advertise; peers will not resolve us")
            name = instance_name(self.node_id, self.tag)
            label = name.removesuffix("." + SERVICE_TYPE)
            self._info = AsyncServiceInfo(
                SERVICE_TYPE,
                name,
                port=self.port,
                properties=txt_properties(self.node_id, self.port, self.tag),
                server=f"{label.replace('.', '-')}.local.",
                host_ttl=HOST_TTL,
                other_ttl=OTHER_TTL,
                parsed_addresses=advertised,
            )
            # A name taken by another node (the same node id twice in one group) is renamed
            # rather than fatal: the TLS layer sorts out who is who.
            await zeroconf.async_register_service(self._info, allow_name_change=True)
            if self._info.name != name:
                log.warning("mDNS name %s was taken; advertising as %s", name, self._info.name)
            self._browser = AsyncServiceBrowser(
                zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._service_state_changed]
            )
        except Exception as exc:
            await self.stop()
            raise DiscoveryError(f"cannot advertise on {self.listen_address!r}: {exc}") from exc
        log.info(
            "discovery: advertising %s on %s port %d", self._info.name, address or "*", self.port
        )

    async def stop(self) -> None:
        """Say goodbye (peers report us lost) and stop browsing. Reports nothing itself."""
        zeroconf, self._zeroconf = self._zeroconf, None
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()  # first: no new resolutions start after this
        tasks = list(self._resolving.values())
        self._resolving.clear()
        self._stale.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if zeroconf is not None:
            await zeroconf.async_close()  # unregisters our service: goodbye packets

    # --- what the browser and the resolver report (public for tests) ----------------------

    def service_resolved(self, name: str, info: ServiceInfoLike) -> None:
        """Service `name`'s records are complete: report what they change."""
        try:
            announcement = announcement_from_info(info)
        except InvalidAnnouncement as exc:
            self._complain(name, f"malformed announcement: {exc}")
            return
        reason = ignore_reason(announcement, self.node_id, self.tag)
        if reason is not None:
            log.debug("ignoring %s: %s", name, reason)
            self._report(self.table.gone(name))
            return
        local = local_addresses()
        host = choose_host(announcement.addresses, local)
        if host is None:
            self._complain(name, f"no usable address in {list(announcement.addresses)}")
            return
        self._report(
            self.table.seen(name, PeerAddress(announcement.node_id, host, announcement.port))
        )

    def service_removed(self, name: str) -> None:
        """Service `name` said goodbye or expired."""
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        self._stale.discard(name)
        self._report(self.table.gone(name))

    # --- internals ----------------------------------------------------------------------------

    def _service_state_changed(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Runs inside zeroconf's record processing: whatever goes wrong stays here.
        try:
            if state_change is ServiceStateChange.Removed:
                self.service_removed(name)
            elif name in self._resolving:
                self._stale.add(name)  # resolve again once the current attempt is done
            else:
                task = asyncio.get_running_loop().create_task(self._resolve(name))
                self._resolving[name] = task
        except Exception:
            log.exception("discovery: failed to handle %s of %r", state_change, name)

    async def _resolve(self, name: str) -> None:
        try:
            while True:
                self._stale.discard(name)
                await self._resolve_once(name)
                if name not in self._stale:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("discovery: failed to resolve %r", name)
        finally:
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]

    async def _resolve_once(self, name: str) -> None:
        try:
            if not name.lower().endswith("." + SERVICE_TYPE.lower()):
                raise InvalidAnnouncement(f"not a {SERVICE_TYPE} instance")
            info = AsyncServiceInfo(SERVICE_TYPE, name)
        except Exception as exc:  # BadTypeInNameException and kin: a name zeroconf rejects
            self._complain(name, f"malformed service name: {exc!r}")
            return
        zeroconf = self._zeroconf
        if zeroconf is None:
            return  # stopped meanwhile
        if not await info.async_request(zeroconf.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("discovery: %s did not resolve within %d ms", name, RESOLVE_TIMEOUT_MS)
            return
        self.service_resolved(name, info)

    def _report(self, changes: list[Change]) -> None:
        for change in changes:
            try:
                if isinstance(change, Found):
                    log.info("discovery: found %s at %s", change.peer.node_id, change.peer.address)
                    self.on_found(change.peer)
                else:
                    log.info("discovery: lost %s", change.node_id)
                    self.on_lost(change.node_id)
            except Exception:
                log.exception("discovery: callback failed for %r", change)

    def _complain(self, name: str, problem: str) -> None:
        """Log a problem with someone's announcement: a warning the first time, then debug."""
        key = (name.lower(), problem)
        if key in self._complaints:
            log.debug("ignoring %s: %s", name, problem)
            return
        if len(self._complaints) >= MAX_COMPLAINTS:
            self._complaints.clear()
        self._complaints.add(key)
        log.warning("ignoring %s: %s", name, problem)


async def _resolve_literal(host: str) -> str:
    """`host` as an IP literal: itself when it is one, else its first address."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host!r} has no address")
    address = infos[0][4][0]
    assert isinstance(address, str)
    return address


# --- for the daemon ---------------------------------------------------------------------------


async def run_discovery(
    config: Config,
    on_found: Callable[[PeerAddress], None],
    on_lost: Callable[[str], None],
) -> Discovery | None:
    """Start discovery as `config` says: None when `enable_service_discovery` is false, else a
    started Discovery (advertising on `listen_address`'s interface, `port`, the group's tag)
    that the caller must `await discovery.stop()`. Raises DiscoveryError when mDNS can't run,
    which costs the node discovery, not its static peers."""
    if not config.enable_service_discovery:
        return None
    # group_tag runs scrypt (~0.1 s, 32 MiB) the first time: not in the event loop.
    tag = await asyncio.to_thread(group_tag, config.group, config.group_secret)
    discovery = Discovery(
        config.node_id,
        tag,
        config.port,
        on_found,
        on_lost,
        listen_address=config.listen_address,
    )
    await discovery.start()
    return discovery
