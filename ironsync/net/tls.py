"""TLS between the nodes of one group: a CA derived from the group secret, node certificates.

Theory of operation
-------------------
Every node of a group knows the same `group` and `group_secret`. From them, each node derives
the same *group CA* without talking to anyone: scrypt stretches the secret (salted with the
group name), HKDF-SHA256 turns the result into a 32-byte Ed25519 seed, and a self-signed
certificate with fixed fields is built around that key. Ed25519
signatures are deterministic (RFC 8032 section 5.1.6), so every node builds the byte-identical
CA certificate. The CA private key lives only in memory; it is re-derived whenever a node
certificate has to be issued.

Each node keeps its own random Ed25519 key and a certificate for `CN=<node_id>` signed by the
group CA, in `node.key` (0600) and `node.crt` beside the config. Connections use TLS 1.3 with
certificates required on both sides and the group CA as the only trust anchor, so a peer
that does not hold the secret fails the handshake before it can send or receive a byte of
application data. Hostnames are not checked: the node id in the peer's certificate is the
identity, and the application compares it with what the peer claims in its Hello.

Every node of the group can issue a certificate for any node id: the secret is the
membership, the node id is a name, not a proof. Pinning a peer's certificate fingerprint
(invite tokens) is the layer that tells one member from another.

Why scrypt first: a node certificate (sent in every handshake) and the mDNS group tag are
both fixed functions of the secret, so anyone who sees one can test guesses offline. HKDF alone
costs a guess a microsecond, which makes a hand-picked 16-character secret guessable; scrypt
(RFC 7914, N=2**15, r=8, p=1: 32 MiB and ~0.1 s a guess) makes each guess a million times
dearer. A node pays it once per (group, secret): `init`/`join` (or the first process that
needs it) keep the stretched secret in `group.key` (0600) beside `node.key`, which holds what
the config does (the secret itself) and no more, so no later command pays scrypt again.

Why Ed25519: small keys and signatures, no parameter choices, a deterministic key straight
from a 32-byte seed and deterministic signatures. Python 3.10+ requires OpenSSL >= 1.1.1
(PEP 644), whose libssl signs and verifies Ed25519 in TLS 1.3 (RFC 8446 section 4.2.3,
`ed25519` = 0x0807); the tests run a real handshake to prove it with the OpenSSL at hand.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Everything below up to the file names is a contract between nodes: changing any of it
# gives a different CA, which splits every existing group. Bump the version labels instead.
SCRYPT_SALT_PREFIX = b"ironsync group secret v1\x00"  # followed by the UTF-8 group name
SCRYPT_N = 2**15  # CPU/memory cost: 128 * N * r bytes = 32 MiB
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 64 * 1024 * 1024  # OpenSSL's default cap (32 MiB) is just too small
STRETCHED_SECRET_BYTES = 32
HKDF_SALT = b"ironsync v1"
CA_KEY_INFO = b"ironsync group CA v1\x00"  # followed by the UTF-8 group name
GROUP_TAG_INFO = b"ironsync group tag v1\x00"  # followed by the UTF-8 group name
CA_NAME_PREFIX = "ironsync group CA "
VALID_FROM = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
VALID_UNTIL = datetime.datetime(2120, 1, 1, tzinfo=datetime.UTC)
GROUP_TAG_BYTES = 8
NODE_URI_PREFIX = "urn:ironsync:node:"

MIN_SECRET_CHARS = 16
COMMON_NAME_MAX_CHARS = 64  # RFC 5280 upper bound ub-common-name
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")

KEY_FILE = "node.key"
STRETCHED_FILE = "group.key"  # the stretched secret, and a check of the (group, secret) it is of
_STRETCHED_CHECK = b"ironsync stretched secret check v1\x00"
CERTIFICATE_FILE = "node.crt"


class PeerIdentityError(Exception):
    """The peer's certificate does not name a node (the peer's fault, or no verified peer)."""


@dataclass(frozen=True)
class GroupCA:
    """The group's certificate authority, identical on every node of the group."""

    group: str
    certificate: x509.Certificate
    private_key: ed25519.Ed25519PrivateKey = field(repr=False, compare=False)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, lowercase hex."""
        return certificate_fingerprint(self.certificate)

    def issue_node_certificate(
        self, node_id: str, public_key: ed25519.Ed25519PublicKey
    ) -> x509.Certificate:
        """A certificate for `node_id`'s key, good for both ends of a connection."""
        if not NODE_ID_PATTERN.fullmatch(node_id):
            raise ValueError(f"node id {node_id!r} is not 1-64 of [A-Za-z0-9_.-]")
        ca_public_key = self.private_key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(VALID_FROM)
            .not_valid_after(VALID_UNTIL)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id)]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public_key), critical=False
            )
        )
        return builder.sign(self.private_key, algorithm=None)

    def has_issued(self, certificate: x509.Certificate) -> bool:
        """True when `certificate` carries this CA's signature."""
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def derive_group_ca(group: str, group_secret: str) -> GroupCA:
    """The group CA: the same key and the same certificate bytes on every node."""
    if not group:
        raise ValueError("group must not be empty")
    if len(group_secret) < MIN_SECRET_CHARS:
        raise ValueError(f"group_secret must be at least {MIN_SECRET_CHARS} characters")
    seed = _hkdf(stretch_secret(group, group_secret), CA_KEY_INFO + group.encode(), length=32)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    public_key = key.public_key()
    raw_public_key = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    # A positive serial of at most 20 octets (RFC 5280 section 4.1.2.2), fixed by the key.
    serial = int.from_bytes(hashlib.sha256(raw_public_key).digest()[:16], "big") | 1
    # The name is for people; trust comes from the key. Long group names are cut to fit.
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, (CA_NAME_PREFIX + group)[:COMMON_NAME_MAX_CHARS])]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(VALID_FROM)
        .not_valid_after(VALID_UNTIL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, algorithm=None)
    )
    return GroupCA(group=group, certificate=certificate, private_key=key)


def group_tag(group: str, group_secret: str) -> str:
    """A short hex tag to advertise over mDNS: equal tags mean same group and secret."""
    if len(group_secret) < MIN_SECRET_CHARS:
        raise ValueError(f"group_secret must be at least {MIN_SECRET_CHARS} characters")
    stretched = stretch_secret(group, group_secret)
    return _hkdf(stretched, GROUP_TAG_INFO + group.encode(), length=GROUP_TAG_BYTES).hex()


_stretched: dict[tuple[str, str], bytes] = {}


def stretch_secret(group: str, group_secret: str) -> bytes:
    """The group secret after scrypt (salted with the group name): HKDF's input key.

    Deliberately slow (~0.1 s, 32 MiB); a process pays it once per group, and none at all
    once `remember_stretched_secret` has read it from a node's state folder."""
    key = (group, group_secret)
    if key not in _stretched:
        _stretched[key] = hashlib.scrypt(
            group_secret.encode(),
            salt=SCRYPT_SALT_PREFIX + group.encode(),
            n=SCRYPT_N,
            r=SCRYPT_R,
            p=SCRYPT_P,
            maxmem=SCRYPT_MAXMEM,
            dklen=STRETCHED_SECRET_BYTES,
        )
    return _stretched[key]


def _stretched_check(stretched: bytes, group: str, group_secret: str) -> bytes:
    parts = (_STRETCHED_CHECK, stretched, group.encode(), b"\x00", group_secret.encode())
    return hashlib.sha256(b"".join(parts)).digest()


def remember_stretched_secret(directory: Path, group: str, group_secret: str) -> None:
    """Make `stretch_secret` of (group, secret) free in this process: read it from
    `directory`/group.key when that file is of this group and secret, else derive it (scrypt)
    and keep it there for the next process."""
    if (group, group_secret) in _stretched:
        return
    path = Path(directory) / STRETCHED_FILE
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    stretched, check = data[:STRETCHED_SECRET_BYTES], data[STRETCHED_SECRET_BYTES:]
    if len(stretched) == STRETCHED_SECRET_BYTES and check == _stretched_check(
        stretched, group, group_secret
    ):
        _stretched[(group, group_secret)] = stretched
        return
    stretched = stretch_secret(group, group_secret)
    try:
        Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_atomically(
            path, stretched + _stretched_check(stretched, group, group_secret), mode=0o600
        )
    except OSError:
        pass  # a read-only state folder: scrypt again next time, nothing worse


@dataclass(frozen=True)
class NodeIdentity:
    """This node's key and certificate on disk, and the group CA certificate to trust."""

    node_id: str
    group: str
    key_path: Path
    certificate_path: Path
    certificate_pem: bytes
    ca_certificate_pem: bytes
    fingerprint: str  # SHA-256 of this node's DER certificate, lowercase hex


def load_or_create_identity(
    directory: Path, node_id: str, group: str, group_secret: str
) -> NodeIdentity:
    """Reuse `node.key`/`node.crt` in `directory` when they still fit, else issue new ones.

    They fit when the key matches the certificate, the certificate names `node_id` and was
    signed by the CA of (`group`, `group_secret`). A new key and certificate replace both
    files otherwise (a changed node id or secret, a crash between the two writes).
    """
    directory = Path(directory)
    remember_stretched_secret(directory, group, group_secret)
    ca = derive_group_ca(group, group_secret)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = directory / KEY_FILE
    certificate_path = directory / CERTIFICATE_FILE
    certificate = _load_fitting_certificate(key_path, certificate_path, node_id, ca)
    if certificate is None:
        key = ed25519.Ed25519PrivateKey.generate()
        certificate = ca.issue_node_certificate(node_id, key.public_key())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Key first: a crash before the certificate lands leaves a pair that does not
        # match, which the next start detects and replaces.
        _write_atomically(key_path, key_pem, mode=0o600)
        _write_atomically(
            certificate_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644
        )
    elif key_path.stat().st_mode & 0o077:
        key_path.chmod(0o600)
    return NodeIdentity(
        node_id=node_id,
        group=group,
        key_path=key_path,
        certificate_path=certificate_path,
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        ca_certificate_pem=ca.certificate_pem,
        fingerprint=certificate_fingerprint(certificate),
    )


def server_context(identity: NodeIdentity) -> ssl.SSLContext:
    """Accept only TLS 1.3 clients whose certificate chains to the group CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # No session tickets: nothing resumes, so every connection proves membership afresh.
    context.num_tickets = 0
    return _configure(context, identity)


def client_context(identity: NodeIdentity) -> ssl.SSLContext:
    """Connect only to TLS 1.3 servers whose certificate chains to the group CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The identity is the node id in the certificate, checked by the caller: see peer_node_id.
    context.check_hostname = False
    return _configure(context, identity)


def peer_node_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The node id in the verified peer certificate (asyncio: `get_extra_info("ssl_object")`)."""
    # An empty dict means the certificate was not verified (a context with CERT_NONE).
    if not ssl_object.getpeercert():
        raise PeerIdentityError("no verified peer certificate")
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:  # unreachable after the check above; narrows the type
        raise PeerIdentityError("no verified peer certificate")
    subject = x509.load_der_x509_certificate(der).subject
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PeerIdentityError(f"peer certificate has {len(names)} common names, expected 1")
    node_id = names[0].value
    if not isinstance(node_id, str) or not NODE_ID_PATTERN.fullmatch(node_id):
        raise PeerIdentityError(f"peer certificate names no valid node id: {node_id!r}")
    return node_id


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def _configure(context: ssl.SSLContext, identity: NodeIdentity) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    # Our certificates follow RFC 5280 closely enough for OpenSSL's strict checks.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata=identity.ca_certificate_pem.decode("ascii"))
    context.load_cert_chain(identity.certificate_path, identity.key_path)
    return context


def _hkdf(stretched_secret: bytes, info: bytes, length: int) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=HKDF_SALT, info=info)
    return hkdf.derive(stretched_secret)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_fitting_certificate(
    key_path: Path, certificate_path: Path, node_id: str, ca: GroupCA
) -> x509.Certificate | None:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    except (OSError, ValueError, TypeError):
        return None  # missing or unreadable: issue a new pair
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if certificate.public_key() != key.public_key():
        return None
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [name.value for name in names] != [node_id]:
        return None
    if not ca.has_issued(certificate):
        return None
    now = datetime.datetime.now(datetime.UTC)
    if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
        return None
    return certificate


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # mkstemp creates the file 0600, so a key is never readable by others, not even briefly.
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
