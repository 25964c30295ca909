"""The TLS MLflow and the image registry speak off loopback (mlops_spec/service_tls.py): a CA per service made from
its secret, the same at every render, and a server certificate that real TLS clients verify by name."""
from __future__ import annotations

import socket
import ssl
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mlops_spec.service_tls import ca_certificate, server_tls

NAMES = ("cluster-model-registry", "model-registry", "10.0.0.10")


def handshake(tls, ca: str, server_name: str) -> bytes:
    """One TLS exchange with a server presenting `tls`, the client trusting `ca` alone and asking for `server_name`."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:
        certificate, key = Path(folder, "certificate.pem"), Path(folder, "key.pem")
        certificate.write_text(tls.certificate)
        key.write_text(tls.key)
        server_context.load_cert_chain(certificate, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        connection, _ = listener.accept()
        try:
            with server_context.wrap_socket(connection, server_side=True) as wrapped:
                wrapped.sendall(b"hello")
        except (ssl.SSLError, OSError):
            pass  # the client refused the certificate: what the test expects of a wrong CA

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_context = ssl.create_default_context(cadata=ca)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client_context.wrap_socket(raw, server_hostname=server_name) as wrapped:
            return wrapped.recv(5)
    finally:
        thread.join(timeout=5)
        listener.close()


def test_the_same_secret_renders_the_same_bytes_and_another_secret_another_ca():
    tls = server_tls("the-secret", "cluster", "model-registry", NAMES)
    again = server_tls.__wrapped__("the-secret", "cluster", "model-registry", NAMES)
    assert tls == again, "deterministic: an unchanged secret replaces nothing at the next `pulumi up`"
    assert tls.ca_certificate == ca_certificate("the-secret", "cluster", "model-registry")
    assert ca_certificate("another-secret", "cluster", "model-registry") != tls.ca_certificate
    assert ca_certificate("the-secret", "prod", "model-registry") != tls.ca_certificate, "each stack has its own"
    assert ca_certificate("the-secret", "cluster", "image-registry") != tls.ca_certificate, "each service its own"
    assert "PRIVATE KEY" in tls.key and "PRIVATE KEY" not in tls.certificate + tls.ca_certificate


def test_the_certificate_names_the_service_where_it_is_reached_and_its_ca_signs_it():
    tls = server_tls("the-secret", "cluster", "model-registry", NAMES)
    leaf, ca = x509.load_pem_x509_certificates(tls.certificate.encode())
    assert ca.public_bytes(Encoding.PEM).decode() == tls.ca_certificate
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["cluster-model-registry", "model-registry", "localhost"]
    assert [str(address) for address in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.10", "127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("server_name", ["cluster-model-registry", "10.0.0.10", "localhost", "127.0.0.1"])
def test_a_client_trusting_the_stages_ca_alone_verifies_the_server_by_each_of_its_names(server_name):
    tls = server_tls("the-secret", "cluster", "model-registry", NAMES)
    assert handshake(tls, tls.ca_certificate, server_name) == b"hello"


def test_a_client_refuses_a_server_of_another_secret_or_under_another_name():
    tls = server_tls("the-secret", "cluster", "model-registry", NAMES)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate|certificate verify failed"):
        handshake(server_tls("a-guessed-secret", "cluster", "model-registry", NAMES), tls.ca_certificate, "10.0.0.10")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match"):
        handshake(tls, tls.ca_certificate, "10.0.0.11")
