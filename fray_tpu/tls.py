"""TLS material for the task channel, and the per-job secret.

Each agent makes its own self-signed certificate on its VM (EC P-256, SAN DNS `fray-tpu-agent`;
``fray_tpu.worker.identity``) and publishes it as a guest attribute; the controller pins that
exact certificate when it dials that host: only the agent holding the key, which never left its
VM, can answer, whatever its IP. No key is ever in node metadata.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from dataclasses import dataclass

import grpc

AGENT_TLS_NAME = "fray-tpu-agent"
DEFAULT_VALIDITY = datetime.timedelta(days=30)
MAX_VALIDITY = datetime.timedelta(days=365)
# Tolerates controller/VM clock skew at the start of the validity window.
CLOCK_SKEW = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class TlsMaterial:
    cert_pem: bytes
    key_pem: bytes


def make_job_tls(validity: datetime.timedelta = DEFAULT_VALIDITY) -> TlsMaterial:
    """A fresh self-signed certificate and key for one job's agents."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not datetime.timedelta(0) < validity <= MAX_VALIDITY:
        raise ValueError(f"TLS validity {validity} must be positive and at most {MAX_VALIDITY}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AGENT_TLS_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(AGENT_TLS_NAME)]), critical=False)
        # A self-signed certificate that is its own trust anchor: marked as a CA so TLS stacks
        # accept it as the pinned root.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return TlsMaterial(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def server_credentials(cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def channel_credentials(pinned_cert_pem: bytes) -> grpc.ChannelCredentials:
    """Trusts exactly the job's certificate (dial with `channel_options()` for the name)."""
    return grpc.ssl_channel_credentials(root_certificates=pinned_cert_pem)


def channel_options() -> list[tuple[str, str]]:
    """Agents are dialled by IP; the certificate names the fixed `AGENT_TLS_NAME`."""
    return [("grpc.ssl_target_name_override", AGENT_TLS_NAME), ("grpc.default_authority", AGENT_TLS_NAME)]


def make_secret() -> str:
    """A fresh per-job secret; only its SHA-256 goes into node metadata."""
    return secrets.token_urlsafe(32)


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
