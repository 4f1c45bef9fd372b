"""A throw-away PKI for the demo and the tests: a CA, a broker certificate, client certificates.

Production certificates come from the operator's CA (docs/uplink.md); this module only makes the
same *shape* of PKI on one machine so the TLS + ACL setup of `deploy/mosquitto/` can be run for
real: the broker's certificate names 127.0.0.1 and localhost, every client certificate carries
the account name as its CN (a site id, or `HUB_CN` for the hub), which Mosquitto takes as the
user name (`use_identity_as_username`) that the ACL matches.

Keys are ECDSA P-256: generated in milliseconds, accepted by OpenSSL, Mosquitto and Python's ssl.
Private keys are written with mode 0600.

    python -m devstack.certs DIR --client site-a --client isocam.hub
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: CN of the hub's client certificate. The dot makes it impossible as a site id
#: (`sitelink.topics.SITE_ID_RE`), so no site certificate can ever be mistaken for the hub's
#: account in the broker ACL (deploy/mosquitto/acl).
HUB_CN = "isocam.hub"

#: Names the test broker's certificate is valid for (loopback only, see common rules).
LOOPBACK_NAMES: tuple[str, ...] = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class IssuedCert:
    """A certificate and its private key, both PEM files."""

    cert_file: Path
    key_file: Path
    common_name: str


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    # An hour of slack backwards: the broker and clients may read the clock a moment apart.
    return now - dt.timedelta(hours=1), now + dt.timedelta(days=days)


class CertificateAuthority:
    """A self-signed CA that issues the broker's server certificate and client certificates."""

    def __init__(self, directory: Path, *, name: str = "isocam test CA", days: int = 2) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.days = days
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        not_before, not_after = _validity(days)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = self.directory / "ca.crt"
        self.key_file = self.directory / "ca.key"
        _write_cert(self.cert_file, self._cert)
        _write_key(self.key_file, self._key)

    def _issue(
        self,
        common_name: str,
        stem: str,
        usage: x509.ObjectIdentifier,
        san: Sequence[x509.GeneralName] = (),
    ) -> IssuedCert:
        key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = _validity(self.days)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = IssuedCert(
            self.directory / f"{stem}.crt", self.directory / f"{stem}.key", common_name
        )
        _write_cert(issued.cert_file, cert)
        _write_key(issued.key_file, key)
        return issued

    def issue_server(self, names: Sequence[str] = LOOPBACK_NAMES) -> IssuedCert:
        """The broker's certificate, valid for `names` (IP addresses or DNS names)."""
        san: list[x509.GeneralName] = []
        for name in names:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                san.append(x509.DNSName(name))
        return self._issue(names[0], "server", ExtendedKeyUsageOID.SERVER_AUTH, san)

    def issue_client(self, common_name: str) -> IssuedCert:
        """A client certificate whose CN is the broker account: a site id, or `HUB_CN`."""
        if not common_name or any(c in common_name for c in "/+#\x00"):
            raise ValueError(f"{common_name!r} cannot be an MQTT user name")
        stem = "client-" + common_name.replace(".", "_")
        return self._issue(common_name, stem, ExtendedKeyUsageOID.CLIENT_AUTH)


def main(argv: Sequence[str] | None = None) -> int:
    """Write a CA, a loopback broker certificate and the requested client certificates."""
    parser = argparse.ArgumentParser(prog="python -m devstack.certs", description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--client", action="append", default=[], help="CN of a client certificate (repeatable)"
    )
    args = parser.parse_args(argv)
    ca = CertificateAuthority(args.directory)
    server = ca.issue_server()
    print(f"CA      {ca.cert_file}")
    print(f"broker  {server.cert_file} {server.key_file}")
    for cn in args.client:
        client = ca.issue_client(cn)
        print(f"client  {cn}: {client.cert_file} {client.key_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
