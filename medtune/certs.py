"""The consortium's TLS certificates and each hospital's SuperNode key pair.

Why these and nothing more: the SuperLink serves all its APIs over TLS with one server
certificate signed by a consortium CA; every site (and every `flwr` CLI user) trusts that CA.
SuperNode authentication (`--enable-supernode-auth`, which Flower only allows with TLS) admits a
node only if its public key was registered at the SuperLink (`flwr supernode register`), and Flower
reads those keys as NIST elliptic-curve keys in OpenSSH format: here P-384, the curve Flower's
documentation uses.

Private keys are written with mode 0600 (files.atomic_write_bytes creates them so); certificates
and public keys are made world-readable.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medtune.errors import ConfigError
from medtune.files import atomic_write_bytes
from medtune.state import check_hospital_name

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CURVE = ec.SECP384R1
VALID_DAYS = 365


@dataclass(frozen=True)
class ServerCertificates:
    """Where `make_server_certificates` put the files the SuperLink and the sites need."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """A hospital's SuperNode key pair: the private key stays at the site, the public key is
    registered."""

    private_key: Path
    public_key: Path


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, private_format = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, private_format, serialization.NoEncryption())


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    """Each host as an IP-address SAN if it parses as one, else as a DNS-name SAN."""
    if not hosts:
        raise ConfigError(
            "a server certificate needs at least one --host (the SuperLink's DNS name or IP "
            "address)"
        )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _load_or_make_ca(
    out: Path, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA under `out`, made if absent: re-issuing a server certificate keeps every site's
    trust."""
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if cert_path.exists() != key_path.exists():
        present, absent = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise ConfigError(
            f"{present} exists but {absent} does not; restore it or remove both to make a new CA"
        )
    if cert_path.exists():
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as error:
            raise ConfigError(f"{out}: cannot read the CA ({CA_CERT}, {CA_KEY}): {error}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(
                f"{key_path}: expected an elliptic-curve CA key, got {type(key).__name__}"
            )
        return certificate, key
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MedTune consortium CA")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    atomic_write_bytes(key_path, _pem_private(key))
    _write_public(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return certificate, key


def make_server_certificates(
    out: Path, hosts: list[str], rotate: bool = False
) -> ServerCertificates:
    """A consortium CA (kept if already under `out`) and a SuperLink certificate for `hosts`.

    An existing SuperLink key and certificate are replaced only when asked (`rotate`): SuperNodes
    that pinned the old certificate would otherwise fail to connect without a word of why.
    """
    existing = [str(out / name) for name in (SERVER_KEY, SERVER_CERT) if (out / name).exists()]
    if existing and not rotate:
        raise ConfigError(
            f"{existing} already exist; pass --rotate to replace the SuperLink's key and "
            "certificate"
        )
    names = _subject_names(hosts)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert, ca_key = _load_or_make_ca(out, now)
    key = ec.generate_private_key(CURVE())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = ServerCertificates(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    atomic_write_bytes(files.server_key, _pem_private(key))
    _write_public(files.server_cert, certificate.public_bytes(serialization.Encoding.PEM))
    return files


def make_node_keys(out: Path, hospital: str) -> NodeKeys:
    """`<out>/<hospital>` (OpenSSH private key) and `<hospital>.pub`; an existing pair is never
    replaced."""
    check_hospital_name(hospital, source="--hospital")
    files = NodeKeys(out / hospital, out / f"{hospital}.pub")
    existing = [str(path) for path in (files.private_key, files.public_key) if path.exists()]
    if existing:
        raise ConfigError(
            f"{existing} already exist; a registered key is the hospital's identity, so it is not "
            "replaced (remove the files and unregister the old key with `flwr supernode "
            "unregister` first)"
        )
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    atomic_write_bytes(files.private_key, private)
    _write_public(files.public_key, public + f" medtune-{hospital}\n".encode())
    return files
