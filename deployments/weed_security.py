"""SeaweedFS's `security.toml` for a server that only its own S3 gateway may reach inside.

`weed mini` opens HTTP and gRPC ports for its master, volume server, filer and admin besides the
S3 gateway, and none of them asks for credentials by default: anyone on the machine could list,
read and write the store through the filer (port 8888 by default) or ask the master for write
tokens. Written before each start (owner-only, in the server's data folder, where `weed` reads
it as `./security.toml`), this file makes every one of those ports demand:
- a client certificate signed by a CA made for this start (mutual TLS on every internal HTTP
  and gRPC port); the CA's key is never written, so no one can sign another certificate;
- on top of it, JWTs signed with fresh random keys for volume writes and reads and for filer
  writes and reads, which only the master and the S3 gateway mint.
The S3 port keeps checking request signatures against the identities file; it is the one door.
The keys for this schema are those `weed scaffold -config=security` prints (SeaweedFS 4.x).
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from pathlib import Path

from deployments.state import write_private

FILE = "security.toml"
# Components that serve gRPC (each needs a server certificate), and those serving HTTP.
_GRPC_SERVERS = ("master", "volume", "filer", "s3", "admin", "worker")
_HTTPS_SERVERS = ("master", "volume", "filer", "admin")
_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and one certificate it signs for 127.0.0.1, used by every component
    as server and as client: (ca.pem, node.pem, node.key). The CA key stays in memory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=3650))

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def builder(subject: str, issuer: str, public_key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("saeflow-seaweedfs-ca", "saeflow-seaweedfs-ca", ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = (
        builder("saeflow-seaweedfs", "saeflow-seaweedfs-ca", node_key.public_key())
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (folder / "ca.pem", folder / "node.pem", folder / "node.key")
    pem = serialization.Encoding.PEM
    write_private(paths[0], ca.public_bytes(pem).decode())
    write_private(paths[1], node.public_bytes(pem).decode())
    key_bytes = node_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(paths[2], key_bytes.decode())
    return paths


def write_security(folder: Path) -> Path:
    """Fresh certificates and JWT keys in `folder/tls/` and `folder/security.toml` (all
    owner-only); returns the toml's path. `weed` must run with `folder` as its working
    directory to read it."""
    tls = folder / "tls"
    tls.mkdir(mode=0o700, exist_ok=True)
    tls.chmod(0o700)
    ca, cert, key = (str(p) for p in _certificates(tls))
    pair = f'cert = "{cert}"\nkey = "{key}"\n'
    sections = [f'[{s}]\nkey = "{secrets.token_hex(32)}"\n' for s in _JWT_SECTIONS]
    sections += [
        "[access]\nui = false\n",  # the volume server's status page
        "[filer.expose_directory_metadata]\nenabled = false\n",
        f'[grpc]\nca = "{ca}"\n',
        *(f"[grpc.{s}]\n{pair}" for s in _GRPC_SERVERS),
        f"[grpc.client]\n{pair}",
        *(f'[https.{s}]\n{pair}ca = "{ca}"\n' for s in _HTTPS_SERVERS),
        f'[https.client]\nenabled = true\n{pair}ca = "{ca}"\n',
    ]
    path = folder / FILE
    write_private(path, "\n".join(sections))
    return path
