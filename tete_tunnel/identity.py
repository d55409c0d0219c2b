"""Long-lived Ed25519 identities and their printable IDs.

An identity is a key and a self-signed certificate kept in one PEM file (mode 0600) so that
`ssl.SSLContext.load_cert_chain` can use it directly. The ID a person reads out or pins is
the SHA-256 of the certificate's DER, in base32 (RFC 4648, no padding, 52 characters),
grouped by four with dashes, like Syncthing's device IDs.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from tete_tunnel.errors import TeteError, UsageError

IDENTITY_FILE = "identity.pem"
ID_LENGTH = 52  # base32 characters of a SHA-256 digest, without padding
_ID_CHARS = re.compile(r"^[A-Z2-7]{52}$")


def default_identity_dir() -> Path:
    """`$XDG_CONFIG_HOME/tete-tunnel`, as the XDG base directory spec says."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "tete-tunnel"


def fingerprint(cert_der: bytes) -> bytes:
    return hashlib.sha256(cert_der).digest()


def format_id(digest: bytes) -> str:
    text = base64.b32encode(digest).decode("ascii").rstrip("=")
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def parse_id(text: str) -> bytes:
    """Accept what `tete-tunnel id` prints, in any case, with or without dashes or spaces."""
    compact = re.sub(r"[\s-]", "", text).upper()
    if not _ID_CHARS.match(compact):
        raise UsageError(
            f"not a tete-tunnel ID: {text!r} (expected {ID_LENGTH} letters A-Z and digits 2-7, "
            "as printed by `tete-tunnel id`, dashes optional)"
        )
    return base64.b32decode(compact + "====")


@dataclass(frozen=True)
class Identity:
    path: Path  # the PEM file holding key and certificate
    cert_der: bytes

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.cert_der)

    @property
    def id(self) -> str:
        return format_id(self.fingerprint)


def _new_identity_pem() -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tete-tunnel")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Back-dated so that a peer whose clock runs behind still accepts it; the far end
        # date means an identity never expires under its owner (IDs are pinned, not renewed).
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def _read(path: Path) -> Identity:
    try:
        data = path.read_bytes()
        cert = x509.load_pem_x509_certificate(data)
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError) as exc:
        raise TeteError(
            f"cannot read identity {path}: {exc} (move it away to create a new one, "
            "or pick another with --identity DIR)"
        ) from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TeteError(f"identity {path} does not hold an Ed25519 key")
    return Identity(path=path, cert_der=cert.public_bytes(serialization.Encoding.DER))


def load_or_create(directory: Path | None = None) -> Identity:
    """Load the identity in `directory`, creating it atomically on first use.

    Two processes starting at once must end up with the same identity: the file is written
    under a temporary name and linked into place, and the loser of that race reads the winner's.
    """
    directory = directory or default_identity_dir()
    path = directory / IDENTITY_FILE
    if path.exists():
        return _read(path)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".identity-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_new_identity_pem())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise TeteError(
            f"cannot create identity in {directory}: {exc.strerror or exc} "
            "(pick a writable place with --identity DIR)"
        ) from exc
    return _read(path)
