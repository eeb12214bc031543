"""Invite tokens: everything a second computer needs to join a group, on one line.

A token carries the group, the group secret, the inviting node's id, its reachable addresses
and certificate fingerprint, and its storage aliases. It is base32 (copy-paste safe: letters
and digits only), prefixed `ironsync1-`, with a checksum, so a wrong or truncated token is
refused with a clear error instead of producing a config that cannot work.

Any single changed character is refused, not just most (issue 12). The checksum is a CRC-32,
stored least significant byte first as the reflected CRC wants: a character is 5 bits, so a
change to one alters at most two adjacent bytes, an error burst shorter than 32 bits, which a
CRC-32 always detects (a hash would only make missing it unlikely). And the text must be the
canonical base32 of the bytes it decodes to: the last character can carry bits no byte uses,
which decoding ignores, so changing only those used to give the same token.

The token holds the group secret: whoever has it can join the group. It is printed once, with
that warning, and never stored.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import zlib
from dataclasses import dataclass

PREFIX = "ironsync1-"
VERSION = 1


class InvalidToken(ValueError):
    """A token that is not one of ours, damaged, or truncated."""


@dataclass(frozen=True)
class Invite:
    group: str
    group_secret: str
    node_id: str  # the inviting node
    addresses: tuple[str, ...]  # "host:port" where it can be reached
    fingerprint: str  # SHA-256 of its certificate, hex
    storages: tuple[str, ...]  # its storage aliases


def encode_invite(invite: Invite) -> str:
    body = json.dumps(
        {
            "v": VERSION,
            "g": invite.group,
            "s": invite.group_secret,
            "n": invite.node_id,
            "a": list(invite.addresses),
            "f": invite.fingerprint,
            "p": list(invite.storages),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    packed = zlib.compress(body, 9)
    return PREFIX + _base32(packed + _checksum(packed))


def _checksum(packed: bytes) -> bytes:
    return zlib.crc32(packed).to_bytes(4, "little")


def _base32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


def decode_invite(token: str) -> Invite:
    """The invite in `token`; InvalidToken (saying what is wrong) otherwise."""
    token = "".join(token.split())  # line breaks and spaces from copy-paste
    if not token.lower().startswith(PREFIX):
        raise InvalidToken(f"not an ironsync invite (it should start with {PREFIX!r})")
    text = token[len(PREFIX) :].upper()
    text += "=" * (-len(text) % 8)
    try:
        raw = base64.b32decode(text)
    except ValueError:
        raise InvalidToken(
            "the token is truncated or damaged (not base32): copy the whole line again"
        ) from None
    packed, check = raw[:-4], raw[-4:]
    if len(raw) < 8 or _checksum(packed) != check or _base32(raw) != text.rstrip("=").lower():
        raise InvalidToken("the token is truncated or damaged: copy the whole line again")
    try:
        data = json.loads(zlib.decompress(packed))
    except (zlib.error, ValueError):
        raise InvalidToken("the token is damaged: copy it again") from None
    if not isinstance(data, dict) or data.get("v") != VERSION:
        raise InvalidToken("this token is from another version of ironsync")
    try:
        return Invite(
            group=_text(data["g"]),
            group_secret=_text(data["s"]),
            node_id=_text(data["n"]),
            addresses=tuple(_text(a) for a in data["a"]),
            fingerprint=_text(data["f"]),
            storages=tuple(_text(p) for p in data["p"]),
        )
    except (KeyError, TypeError):
        raise InvalidToken("the token lacks a field: it was not made by ironsync invite") from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def reachable_addresses(listen_address: str, port: int) -> list[str]:
    """Where peers can reach this node: the listen address, or every non-loopback IPv4
    address of this machine when it listens on all of them."""
    if listen_address not in ("0.0.0.0", "::", ""):
        host = f"[{listen_address}]" if ":" in listen_address else listen_address
        return [f"{host}:{port}"]
    found: list[str] = []
    try:
        import ifaddr  # zeroconf's own dependency

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                    found.append(f"{ip.ip}:{port}")
    except Exception:
        pass
    if not found:
        with contextlib.suppress(OSError):
            found.append(f"{socket.gethostbyname(socket.gethostname())}:{port}")
    return sorted(set(found)) or [f"127.0.0.1:{port}"]
