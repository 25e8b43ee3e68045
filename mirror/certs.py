"""`mirror certs HOST [IP...]`: a private CA and a server certificate for the mirror,
what people otherwise copy openssl recipes for. Uses the cryptography package.

The CA is made once and reused, so re-running with more names only re-issues the
server certificate, and clients that already trust the CA keep working.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825          # what browsers and Apple's TLS stack still accept


@dataclass(frozen=True)
class CertFiles:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load_or_make_ca(cert_path: Path, key_path: Path):
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror private CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def subject_alt_names(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def make_certs(out_dir: Path, names: list[str]) -> CertFiles:
    """CA (reused if present) and a server certificate for ``names`` (DNS names or IPs)."""
    if not names:
        raise ValueError("give at least one host name or IP address")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = CertFiles(out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.crt",
                      out_dir / "server.key")
    ca_cert, ca_key = _load_or_make_ca(files.ca_cert, files.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(subject_alt_names(names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                           + ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


def instructions(files: CertFiles, host: str, port: int) -> str:
    where = f"{host}:{port}"
    docker, containerd = f"/etc/docker/certs.d/{where}", f"/etc/containerd/certs.d/{where}"
    containers = f"/etc/containers/certs.d/{where}"
    return f"""\
Wrote {files.ca_cert} (the CA clients trust), {files.cert} and {files.key} (the server's).
Keep {files.ca_key} private: it signs new server certificates.

Serve with TLS (config.yml):
  tls: {{cert: {files.cert}, key: {files.key}}}

Trust the CA on each client:
  docker:      mkdir -p {docker} && cp {files.ca_cert} {docker}/ca.crt
  containerd:  mkdir -p {containerd} && cp {files.ca_cert} {containerd}/ca.crt
               and in hosts.toml: [host."https://{where}"] ca = "{containerd}/ca.crt"
  podman/skopeo/cri-o:
               mkdir -p {containers} && cp {files.ca_cert} {containers}/ca.crt
  curl:        curl --cacert {files.ca_cert} https://{where}/v2/
"""
