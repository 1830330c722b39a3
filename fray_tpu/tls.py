"""TLS for the task channel (and the controller service, and actor servers), and the per-job secret.

Trust is pinned to an *authority*: a self-signed root (EC P-256, valid ``MAX_VALIDITY``, ten
years: longer than any job or VM) whose key stays with the serving side, and whose certificate
the dialing side pins; only a holder of that key can answer, whatever its IP. Each agent makes
its own authority on its VM (``fray_tpu.worker.identity``; the key never leaves the VM, and no key
is ever in node metadata) and publishes the root as a guest attribute, which the controller reads
through the TPU API and pins for that host. Servers never present the root: they present a leaf
the authority signs (SAN DNS ``fray-tpu-agent``, valid ``DEFAULT_LEAF_VALIDITY``), and make a new
one for new connections once a third of its validity is left (``leaf_due``). A job running for
weeks thus never meets an expired certificate, nothing needs to be re-pinned, and open channels
are never interrupted (TLS checks validity only at the handshake).
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

AGENT_TLS_NAME = "fray-tpu-agent"
AUTHORITY_NAME = "fray-tpu-authority"
MAX_VALIDITY = datetime.timedelta(days=3650)
DEFAULT_LEAF_VALIDITY = datetime.timedelta(days=30)
RENEW_WITH_LEFT = 1 / 3  # a new leaf once this fraction of the current one's validity is left
# Tolerates controller/VM clock skew at the start of the validity window.
CLOCK_SKEW = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class TlsMaterial:
    cert_pem: bytes
    key_pem: bytes


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _material(cert, key) -> TlsMaterial:
    from cryptography.hazmat.primitives import serialization

    return TlsMaterial(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
    )


def make_job_tls(validity: datetime.timedelta = MAX_VALIDITY) -> TlsMaterial:
    """A fresh authority: the root certificate the dialing side pins, and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if not datetime.timedelta(0) < validity <= MAX_VALIDITY:
        raise ValueError(f"TLS validity {validity} must be positive and at most {MAX_VALIDITY}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(AUTHORITY_NAME))
        .issuer_name(_name(AUTHORITY_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _material(cert, key)


def issue_leaf(authority: TlsMaterial, validity: datetime.timedelta, now: float) -> TlsMaterial:
    """A serving certificate for ``AGENT_TLS_NAME`` with a key of its own, signed by
    ``authority``, valid from ``now`` (seconds since the epoch) for ``validity``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    authority_key = serialization.load_pem_private_key(authority.key_pem, password=None)
    issuer = x509.load_pem_x509_certificate(authority.cert_pem).subject
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(AGENT_TLS_NAME))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + validity)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(AGENT_TLS_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(authority_key, hashes.SHA256())
    )
    return _material(cert, key)


def leaf_due(issued_at: float, expires_at: float, now: float) -> bool:
    """Whether a server should make a new leaf for its next connections (pure)."""
    return now >= expires_at - (expires_at - issued_at) * RENEW_WITH_LEFT


class RotatingLeaf:
    """The leaf a server presents, renewed (``leaf_due``) when a new connection asks for it."""

    def __init__(self, authority: TlsMaterial, validity: datetime.timedelta,
                 clock: Callable[[], float] = time.time):
        if validity <= datetime.timedelta(0):
            raise ValueError(f"TLS leaf validity {validity} must be positive")
        self._authority = authority
        self._validity = validity
        self._clock = clock
        self._lock = threading.Lock()
        self.renewals = 0
        self._issue(clock())

    def _issue(self, now: float) -> None:
        self.leaf = issue_leaf(self._authority, self._validity, now)
        self._issued_at, self._expires_at = now, now + self._validity.total_seconds()

    def renewed(self) -> TlsMaterial | None:
        """A new leaf when the current one is due, else None (the current one stays)."""
        with self._lock:
            now = self._clock()
            if not leaf_due(self._issued_at, self._expires_at, now):
                return None
            self._issue(now)
            self.renewals += 1
            return self.leaf


def server_credentials(authority_cert_pem: bytes, authority_key_pem: bytes,
                       leaf_validity: datetime.timedelta = DEFAULT_LEAF_VALIDITY) -> grpc.ServerCredentials:
    """Serve leaves of the authority, renewed for new connections before they expire."""
    leaf = RotatingLeaf(TlsMaterial(authority_cert_pem, authority_key_pem), leaf_validity)

    def configuration(material: TlsMaterial):
        return grpc.ssl_server_certificate_configuration([(material.key_pem, material.cert_pem + authority_cert_pem)])

    def fetch():  # called by gRPC on every handshake; None keeps the current leaf
        renewed = leaf.renewed()
        return None if renewed is None else configuration(renewed)

    return grpc.dynamic_ssl_server_credentials(configuration(leaf.leaf), fetch)


def channel_credentials(pinned_cert_pem: bytes) -> grpc.ChannelCredentials:
    """Trusts exactly the pinned authority (dial with `channel_options()` for the name)."""
    return grpc.ssl_channel_credentials(root_certificates=pinned_cert_pem)


def channel_options() -> list[tuple[str, str]]:
    """Agents are dialled by IP; their leaves name the fixed `AGENT_TLS_NAME`."""
    return [("grpc.ssl_target_name_override", AGENT_TLS_NAME), ("grpc.default_authority", AGENT_TLS_NAME)]


def make_secret() -> str:
    """A fresh per-job secret; only its SHA-256 goes into node metadata."""
    return secrets.token_urlsafe(32)


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
