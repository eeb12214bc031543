"""TLS between nodes: real handshakes over loopback, the group CA contract, identity files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ironsync.net import tls
from ironsync.net.tls import (
    STRETCHED_FILE,
    NodeIdentity,
    PeerIdentityError,
    client_context,
    derive_group_ca,
    group_tag,
    load_or_create_identity,
    peer_node_id,
    remember_stretched_secret,
    server_context,
    stretch_secret,
)

GROUP = "example"
SECRET = "correct horse battery staple"
OTHER_SECRET = "another secret of sixteen+"

# The contract between nodes: every node derives exactly this CA from (GROUP, SECRET).
PINNED_CA_PUBLIC_KEY = "7f99e3bf328bc7d92a8d3f6865d810c77bb21a0d1c17f1f2f167406722b8d2c2"
PINNED_CA_FINGERPRINT = "5085f1b19dd91ab7a012309b2ea443d387d7ade6fd6ad1966add7ed32ce8b49c"
PINNED_GROUP_TAG = "c326fb29a21b39ea"

TIMEOUT_SECONDS = 5


def make_identity(tmp_path: Path, node_id: str, secret: str = SECRET) -> NodeIdentity:
    return load_or_create_identity(tmp_path / node_id, node_id, GROUP, secret)


@dataclass
class Exchange:
    """What each end of one connection attempt saw."""

    server_saw_peers: list[str] = field(default_factory=list)
    server_received: bytes = b""
    client_saw_peer: str | None = None
    client_received: bytes = b""
    client_error: Exception | None = None


async def exchange(server: ssl.SSLContext, client: ssl.SSLContext) -> Exchange:
    """Connect over loopback, send b"ping" and expect b"pong"; record what got through."""
    seen = Exchange()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.server_saw_peers.append(peer_node_id(writer.get_extra_info("ssl_object")))
        seen.server_received += await reader.readexactly(4)
        writer.write(b"pong")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        try:
            seen.client_saw_peer = peer_node_id(writer.get_extra_info("ssl_object"))
            writer.write(b"ping")
            await writer.drain()
            seen.client_received = await reader.read(4)
        finally:
            writer.close()
    except (ssl.SSLError, ConnectionError) as error:
        seen.client_error = error
    finally:
        listener.close()
    return seen


def run_exchange(server: ssl.SSLContext, client: ssl.SSLContext) -> Exchange:
    return asyncio.run(asyncio.wait_for(exchange(server, client), TIMEOUT_SECONDS))


def assert_refused(seen: Exchange) -> None:
    assert seen.server_saw_peers == []
    assert seen.server_received == b""
    assert seen.client_received == b""


# --- handshakes over loopback ---------------------------------------------------------------


def test_two_nodes_of_a_group_complete_mutual_tls13_and_learn_each_others_node_id(
    tmp_path: Path,
) -> None:
    alpha = make_identity(tmp_path, "alpha")
    beta = make_identity(tmp_path, "beta")

    seen = run_exchange(server_context(alpha), client_context(beta))

    assert seen.client_error is None
    assert seen.server_saw_peers == ["beta"]
    assert seen.client_saw_peer == "alpha"
    assert seen.server_received == b"ping"
    assert seen.client_received == b"pong"


def test_connection_uses_tls13_with_ed25519_certificates(tmp_path: Path) -> None:
    alpha = make_identity(tmp_path, "alpha")
    beta = make_identity(tmp_path, "beta")
    versions: list[str | None] = []
    key_types: list[type] = []

    async def connect() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context(alpha))
        port = listener.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(beta))
        ssl_object = writer.get_extra_info("ssl_object")
        versions.append(ssl_object.version())
        # An Ed25519 key can only prove itself with the ed25519 scheme (RFC 8446 4.2.3).
        peer = x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))
        key_types.append(type(peer.public_key()))
        writer.close()
        listener.close()

    asyncio.run(asyncio.wait_for(connect(), TIMEOUT_SECONDS))

    assert versions == ["TLSv1.3"]
    assert issubclass(key_types[0], ed25519.Ed25519PublicKey)


@pytest.mark.parametrize("outsider_role", ["client", "server"])
def test_node_with_another_secret_is_refused_in_both_directions(
    tmp_path: Path, outsider_role: str
) -> None:
    member = make_identity(tmp_path, "member")
    outsider = make_identity(tmp_path, "outsider", secret=OTHER_SECRET)

    if outsider_role == "server":
        seen = run_exchange(server_context(outsider), client_context(member))
        assert isinstance(seen.client_error, ssl.SSLCertVerificationError)
    else:
        # TLS 1.3: the client finishes its half of the handshake first, then finds an alert
        # or a closed connection where the server's data would be (assert_refused).
        seen = run_exchange(server_context(member), client_context(outsider))

    assert_refused(seen)


def test_client_without_certificate_is_refused(tmp_path: Path) -> None:
    member = make_identity(tmp_path, "member")
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=member.ca_certificate_pem.decode())

    seen = run_exchange(server_context(member), anonymous)

    assert_refused(seen)


def test_client_limited_to_tls12_is_refused(tmp_path: Path) -> None:
    alpha = make_identity(tmp_path, "alpha")
    beta = make_identity(tmp_path, "beta")
    old_client = client_context(beta)
    old_client.minimum_version = ssl.TLSVersion.TLSv1_2
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2

    seen = run_exchange(server_context(alpha), old_client)

    assert seen.client_error is not None
    assert seen.client_saw_peer is None
    assert_refused(seen)


def test_peer_node_id_refuses_an_unverified_connection() -> None:
    class Unverified:
        def getpeercert(self, binary_form: bool = False) -> dict[str, object] | None:
            return None if binary_form else {}

    with pytest.raises(PeerIdentityError):
        peer_node_id(Unverified())  # type: ignore[arg-type]


# --- the group CA ---------------------------------------------------------------------------


def test_group_ca_is_byte_identical_across_derivations_and_pinned() -> None:
    first = derive_group_ca(GROUP, SECRET)
    second = derive_group_ca(GROUP, SECRET)
    public_key = first.certificate.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )

    assert first.certificate_pem == second.certificate_pem
    assert public_key.hex() == PINNED_CA_PUBLIC_KEY
    assert first.fingerprint == PINNED_CA_FINGERPRINT


def test_group_secret_is_stretched_with_scrypt_salted_by_the_group_before_hkdf() -> None:
    # The parameters are part of the contract; spelled out here so a change fails this test.
    expected = hashlib.scrypt(
        SECRET.encode(),
        salt=b"ironsync group secret v1\x00" + GROUP.encode(),
        n=2**15,
        r=8,
        p=1,
        maxmem=64 * 1024 * 1024,
        dklen=32,
    )

    assert stretch_secret(GROUP, SECRET) == expected
    assert stretch_secret("other group", SECRET) != expected
    assert stretch_secret(GROUP, SECRET) is stretch_secret(GROUP, SECRET)  # paid once


def test_the_stretched_secret_is_kept_once_and_no_later_process_pays_scrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = stretch_secret(GROUP, SECRET)
    monkeypatch.setattr(tls, "_stretched", {})  # a new process
    load_or_create_identity(tmp_path, "alpha", GROUP, SECRET)  # what init and join do
    kept = tmp_path / STRETCHED_FILE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_bytes()[:32] == expected

    def no_scrypt(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("scrypt ran again")

    monkeypatch.setattr(tls, "_stretched", {})  # the next process: its key, with no scrypt
    monkeypatch.setattr(tls.hashlib, "scrypt", no_scrypt)
    identity = load_or_create_identity(tmp_path, "alpha", GROUP, SECRET)
    assert stretch_secret(GROUP, SECRET) == expected
    assert identity.ca_certificate_pem == derive_group_ca(GROUP, SECRET).certificate_pem
    monkeypatch.undo()

    # a file of another secret, or a damaged one, is not believed: derived again, replaced
    for damage in (lambda b: b, lambda b: b[:-1] + bytes([b[-1] ^ 1]), lambda b: b[:10]):
        monkeypatch.setattr(tls, "_stretched", {})
        kept.write_bytes(damage(kept.read_bytes()))
        remember_stretched_secret(tmp_path, GROUP, OTHER_SECRET)
        assert stretch_secret(GROUP, OTHER_SECRET) == hashlib.scrypt(
            OTHER_SECRET.encode(), salt=b"ironsync group secret v1\x00" + GROUP.encode(),
            n=2**15, r=8, p=1, maxmem=64 * 1024 * 1024, dklen=32,
        )  # fmt: skip
    monkeypatch.setattr(tls, "_stretched", {})
    remember_stretched_secret(tmp_path, GROUP, SECRET)  # the file is OTHER_SECRET's now
    assert stretch_secret(GROUP, SECRET) == expected


def test_group_ca_is_a_self_signed_ca_named_after_the_group() -> None:
    ca = derive_group_ca(GROUP, SECRET).certificate

    assert ca.subject == ca.issuer
    assert ca.subject.rfc4514_string() == "CN=ironsync group CA example"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca.verify_directly_issued_by(ca)


def test_group_ca_differs_with_secret_or_group() -> None:
    fingerprints = {
        derive_group_ca(GROUP, SECRET).fingerprint,
        derive_group_ca(GROUP, OTHER_SECRET).fingerprint,
        derive_group_ca("other group", SECRET).fingerprint,
    }

    assert len(fingerprints) == 3


def test_group_ca_accepts_a_group_name_longer_than_a_common_name() -> None:
    ca = derive_group_ca("g" * 100, SECRET)

    assert len(ca.certificate.subject.rfc4514_string()) == len("CN=") + 64


def test_short_secret_is_rejected() -> None:
    with pytest.raises(ValueError, match="16 characters"):
        derive_group_ca(GROUP, "too short")


def test_group_tag_is_pinned_and_differs_between_groups_and_secrets() -> None:
    assert group_tag(GROUP, SECRET) == PINNED_GROUP_TAG
    assert group_tag(GROUP, SECRET) == group_tag(GROUP, SECRET)
    assert group_tag(GROUP, OTHER_SECRET) != PINNED_GROUP_TAG
    assert group_tag("other group", SECRET) != PINNED_GROUP_TAG


# --- identity files -------------------------------------------------------------------------


def test_identity_files_are_private_and_hold_no_ca_key(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    identity = load_or_create_identity(directory, "alpha", GROUP, SECRET)

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
    assert sorted(path.name for path in directory.iterdir()) == ["node.crt", "node.key"]


def test_node_certificate_names_the_node_and_chains_to_the_group_ca(tmp_path: Path) -> None:
    identity = make_identity(tmp_path, "alpha")
    certificate = x509.load_pem_x509_certificate(identity.certificate_path.read_bytes())
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alpha"
    assert set(usages) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert derive_group_ca(GROUP, SECRET).has_issued(certificate)
    assert identity.fingerprint == certificate.fingerprint(hashes.SHA256()).hex()


def test_unchanged_identity_is_reused(tmp_path: Path) -> None:
    first = make_identity(tmp_path, "alpha")
    key_bytes = first.key_path.read_bytes()

    second = make_identity(tmp_path, "alpha")

    assert second.fingerprint == first.fingerprint
    assert second.key_path.read_bytes() == key_bytes


def test_identity_is_reissued_when_the_secret_changes(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path, "alpha", GROUP, SECRET)

    second = load_or_create_identity(tmp_path, "alpha", GROUP, OTHER_SECRET)

    certificate = x509.load_pem_x509_certificate(second.certificate_path.read_bytes())
    assert second.fingerprint != first.fingerprint
    assert derive_group_ca(GROUP, OTHER_SECRET).has_issued(certificate)
    assert not derive_group_ca(GROUP, SECRET).has_issued(certificate)


def test_identity_is_reissued_when_the_node_id_changes(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path, "alpha", GROUP, SECRET)

    second = load_or_create_identity(tmp_path, "gamma", GROUP, SECRET)

    certificate = x509.load_pem_x509_certificate(second.certificate_path.read_bytes())
    assert second.fingerprint != first.fingerprint
    assert certificate.subject.rfc4514_string() == "CN=gamma"


def test_identity_is_reissued_when_key_and_certificate_do_not_match(tmp_path: Path) -> None:
    # What a crash between writing the new key and the new certificate leaves behind.
    first = load_or_create_identity(tmp_path / "a", "alpha", GROUP, SECRET)
    other = load_or_create_identity(tmp_path / "b", "alpha", GROUP, SECRET)
    first.key_path.write_bytes(other.key_path.read_bytes())

    second = load_or_create_identity(tmp_path / "a", "alpha", GROUP, SECRET)

    assert second.fingerprint not in {first.fingerprint, other.fingerprint}
    server_context(second)  # OpenSSL accepts the pair: the key matches the certificate


def test_reused_key_with_loose_permissions_is_made_private(tmp_path: Path) -> None:
    identity = make_identity(tmp_path, "alpha")
    os.chmod(identity.key_path, 0o644)

    make_identity(tmp_path, "alpha")

    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
