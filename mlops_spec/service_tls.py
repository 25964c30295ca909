"""The TLS a stage's MLflow and image registry speak when their ports are published off loopback.

Each of the two services gets a CA of its own, made by the stack from that service's Pulumi config secret
(`mlops:mlflowPassword`, `mlops:registryPassword`), and a server certificate that CA signs for the names the
service is reached by. Both derive from the secret alone: the key is an HMAC of it, the signatures are
deterministic ECDSA (RFC 6979) and the validity is fixed, so every `pulumi up` renders the same bytes and
replaces nothing, while rotating the secret rotates the CA. Whoever holds the secret can mint certificates,
and could log in as the service's administrator anyway. The Pulumi program hands the certificate and key to
the service; `mlops`, which reads the same secret, and the replicas, which get the CA's certificate, verify
the server against the CA. Loopback ports stay plain HTTP: only the host's own processes reach them, and the
Docker engine trusts a registry on loopback without TLS.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mlops_spec.models import PublishedPort

# Fixed, so the certificates are the same bytes at every render; the secret's rotation is what renews them.
NOT_BEFORE = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
NOT_AFTER = datetime.datetime(2046, 1, 1, tzinfo=datetime.timezone.utc)
CURVE_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
"""Of NIST P-256, which every TLS client of the stack (Go's, OpenSSL's) accepts."""
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
"""Always in the server certificate: `mlops` reaches an ssh:// host's ports through a tunnel on loopback, and the
service's own health check asks it there."""


@dataclass(frozen=True)
class ServerTls:
    ca_certificate: str
    """PEM of the CA that clients trust."""
    certificate: str
    """PEM of the server's certificate, then the CA's: the chain the server presents."""
    key: str
    """PEM (PKCS#8) of the server's private key: a secret."""


def _derived_key(secret: str, label: str) -> ec.EllipticCurvePrivateKey:
    digest = hmac.new(secret.encode(), f"mlops-tls-v1\0{label}".encode(), hashlib.sha512).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (CURVE_ORDER - 1) + 1, ec.SECP256R1())


def _serial(label: str) -> int:
    return int.from_bytes(hashlib.sha256(label.encode()).digest()[:19], "big") | 1


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _subject_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _ca(secret: str, stack: str, service: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _derived_key(secret, f"ca\0{stack}\0{service}")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mlops {stack} {service} CA")])
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public)
        .serial_number(_serial(f"ca\0{stack}\0{service}"))
        .not_valid_before(NOT_BEFORE).not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True))
    return key, certificate


@functools.cache
def ca_certificate(secret: str, stack: str, service: str) -> str:
    """PEM of the CA `service` of `stack` is verified against."""
    return _pem(_ca(secret, stack, service)[1])


@functools.cache
def server_tls(secret: str, stack: str, service: str, names: tuple[str, ...]) -> ServerTls:
    """The certificate `service` of `stack` presents, valid for `names` (host names or IP addresses) and loopback."""
    ca_key, ca = _ca(secret, stack, service)
    subject_names = list(dict.fromkeys((*names, *LOOPBACK_NAMES)))
    key = _derived_key(secret, f"server\0{stack}\0{service}\0{','.join(subject_names)}")
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_names[0])]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(_serial(f"server\0{stack}\0{service}\0{','.join(subject_names)}"))
        .not_valid_before(NOT_BEFORE).not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_subject_name(name) for name in subject_names]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return ServerTls(ca_certificate=_pem(ca), certificate=_pem(certificate) + _pem(ca), key=key_pem)


def client_ca(port: PublishedPort, secret: str, stack: str, service: str) -> Optional[str]:
    """PEM of the CA a client verifies `service` of `stack` with where it is published as `port`; None where it
    is on loopback and speaks plain HTTP."""
    return ca_certificate(secret, stack, service) if port.off_loopback else None
