"""Long-lived Ed25519 identities and their printable IDs.

An identity is a key and a self-signed certificate kept in one PEM file (mode 0600) so that
`ssl.SSLContext.load_cert_chain` can use it directly. The ID a person reads out or pins is
the SHA-256 of the certificate's DER, in base32 (RFC 4648, no padding, 52 characters),
grouped by four with dashes, like Syncthing's device IDs.

The file is checked when it is loaded, as ssh checks its keys, before any network activity:
it must be a regular file (not a symlink) owned by us with no access for group or others, in
a directory (not a symlink) owned by us and not writable by group or others, and hold an
unencrypted Ed25519 key that matches its certificate. Each refusal is one TeteError line
naming the file and what to do. The file is read once; `Identity.pem` keeps its bytes.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import pwd
import re
import secrets
import shlex
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tete_tunnel.errors import TeteError, UsageError

IDENTITY_FILE = "identity.pem"
ID_LENGTH = 52  # base32 characters of a SHA-256 digest, without padding
_ID_CHARS = re.compile(r"^[A-Z2-7]{52}$")
_MAX_FILE_SIZE = 1 << 20  # ours is under 1 KiB; anything this large is not an identity
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted under our name must not hang the open (it is refused after).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_MOVE_AWAY = "move it away to create a new identity, or pick another with --identity DIR"
# For a file that may be the user's damaged identity: never advice that throws it away (a new
# identity is a new ID, and every peer that pinned the old one refuses it).
_DAMAGED = (
    "if it is your identity, restore it from a backup; or use another one with --identity DIR "
    "(a new identity has a new ID that peers must pin again)"
)


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
    pem: bytes = field(repr=False)  # the file's bytes as read and checked at load (has the key)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.cert_der)

    @property
    def id(self) -> str:
        return format_id(self.fingerprint)

    def load_into(self, ctx: ssl.SSLContext, password: Callable[[], str] | None = None) -> None:
        """`ctx.load_cert_chain` from the bytes checked at load, not from the path again.

        `load_cert_chain` only takes a path, so on Linux the bytes go into an anonymous
        memory file opened through /proc; elsewhere the (checked) path is read again.
        """
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is None or not os.path.isdir("/proc/self/fd"):
            ctx.load_cert_chain(self.path, password=password)
            return
        fd = memfd_create("tete-tunnel-identity", os.MFD_CLOEXEC)
        try:
            view = memoryview(self.pem)
            while view:
                view = view[os.write(fd, view) :]
            ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=password)
        finally:
            os.close(fd)


def _new_identity_pem() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

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


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _not_ours(what: str, name: Path, owner: int, risk: str, fix: str) -> TeteError:
    return TeteError(
        f"{what} {name} is owned by {_user(owner)}, not by you (uid {os.geteuid()}): "
        f"refused, {risk} ({fix})"
    )


def _symlink(what: str, name: Path, fix: str) -> TeteError:
    return TeteError(
        f"{what} {name} is a symbolic link: refused, whoever can change the link or what it "
        f"points to could swap the key ({fix})"
    )


def _cannot_create(directory: Path, exc: OSError) -> TeteError:
    return TeteError(
        f"cannot create identity in {directory}: {exc.strerror or exc} "
        "(pick a writable place with --identity DIR)"
    )


def _directory_error(directory: Path, exc: OSError) -> TeteError:
    """Explain why the directory could not be opened (no symlink is followed there)."""
    try:
        st = os.lstat(directory)
    except OSError:
        return _cannot_create(directory, exc)
    if stat.S_ISLNK(st.st_mode):
        return _symlink(
            "identity directory",
            directory,
            "point --identity at the real directory, or replace the link with it",
        )
    if not stat.S_ISDIR(st.st_mode):
        return TeteError(
            f"identity directory {directory} is not a directory (pick another with --identity DIR)"
        )
    if st.st_uid != os.geteuid():
        return _not_ours(
            "identity directory",
            directory,
            st.st_uid,
            "its owner could swap the key",
            "use a directory of your own with --identity DIR",
        )
    return TeteError(
        f"cannot open identity directory {directory}: {exc.strerror or exc} "
        "(pick another with --identity DIR)"
    )


def _open_directory(directory: Path) -> int:
    """Open (creating it 0700 on first use) and check the directory; return its descriptor.

    The file is then opened relative to this descriptor, so what was checked is what is used.
    """
    try:
        fd = os.open(directory, _DIR_FLAGS)
    except FileNotFoundError:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise _cannot_create(directory, exc) from exc
        try:
            fd = os.open(directory, _DIR_FLAGS)
        except OSError as exc:
            raise _directory_error(directory, exc) from exc
    except OSError as exc:
        raise _directory_error(directory, exc) from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise _not_ours(
                "identity directory",
                directory,
                st.st_uid,
                "its owner could swap the key",
                "use a directory of your own with --identity DIR",
            )
        if st.st_mode & 0o022:
            raise TeteError(
                f"identity directory {directory} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): refused, they could swap the key "
                f"(fix it with: chmod 700 {shlex.quote(str(directory))})"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _file_not_ours(path: Path, owner: int) -> TeteError:
    return _not_ours(
        "identity file",
        path,
        owner,
        "its owner could read or swap the key",
        "move it away to create a new identity, or chown it to yourself if it is yours",
    )


def _read_file(path: Path, dir_fd: int) -> bytes | None:
    """The checked bytes of the identity file in `dir_fd`, or None if there is none yet."""
    try:
        fd = os.open(path.name, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        try:
            st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise _symlink(
                "identity file", path, "replace the link with the file itself, mode 0600"
            ) from exc
        if st is not None and st.st_uid != os.geteuid():  # unreadable to us: not ours
            raise _file_not_ours(path, st.st_uid) from exc
        raise TeteError(
            f"cannot read identity {path}: {exc.strerror or exc} ({_MOVE_AWAY})"
        ) from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TeteError(f"identity file {path} is not a regular file ({_DAMAGED})")
        if st.st_uid != os.geteuid():
            raise _file_not_ours(path, st.st_uid)
        if st.st_mode & 0o077:
            raise TeteError(
                f"identity file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): refused, its private key must be "
                f"yours alone (fix it with: chmod 600 {shlex.quote(str(path))})"
            )
        data = f.read(_MAX_FILE_SIZE + 1)
    if len(data) > _MAX_FILE_SIZE:
        raise TeteError(f"cannot read identity {path}: too large for an identity ({_DAMAGED})")
    return data


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
# DER prefixes: an Ed25519 SubjectPublicKeyInfo (in the certificate), a PKCS#8 Ed25519 key.
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")
_ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")


def _parse(path: Path, data: bytes) -> Identity:
    return _parse_quickly(path, data) or _parse_thoroughly(path, data)


def _parse_quickly(path: Path, data: bytes) -> Identity | None:
    """The usual file (ours, as written) checked without importing cryptography, which
    would cost ~9 MiB for the life of the process: OpenSSL loads it as the TLS context will,
    refusing an encrypted key or one that does not match the certificate. None for anything
    else; the thorough parse then names what is wrong."""
    blocks = _PEM_BLOCK.findall(data)
    if [kind for kind, _ in blocks] != [b"PRIVATE KEY", b"CERTIFICATE"]:
        return None
    try:
        key_der, cert_der = (base64.b64decode(body) for _, body in blocks)
    except ValueError:
        return None
    if not key_der.startswith(_ED25519_PKCS8) or _ED25519_SPKI not in cert_der:
        return None
    identity = Identity(path=path, cert_der=cert_der, pem=data)

    def no_passphrase() -> str:
        raise ValueError("encrypted")

    try:
        identity.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), password=no_passphrase)
    except (ssl.SSLError, ValueError, OSError):
        return None
    return identity


def _parse_thoroughly(path: Path, data: bytes) -> Identity:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise TeteError(
            f"cannot read identity {path}: no valid certificate in it ({_DAMAGED})"
        ) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography's way of saying "it needs a password"
        quoted = shlex.quote(str(path))
        new = shlex.quote(str(path) + ".new")
        raise TeteError(
            f"identity file {path} holds a passphrase-protected (encrypted) private key and "
            "tete-tunnel needs an unencrypted one: move it away to create a new identity, or "
            f"decrypt it with: openssl pkey -in {quoted} -out {new} && "
            f"openssl x509 -in {quoted} >> {new} && mv {new} {quoted}"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TeteError(
            f"cannot read identity {path}: no valid private key in it ({_DAMAGED})"
        ) from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TeteError(f"identity file {path} does not hold an Ed25519 key ({_DAMAGED})")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        cert_key = cert.public_key().public_bytes(*spki)
    except (ValueError, UnsupportedAlgorithm):
        cert_key = b""
    if cert_key != key.public_key().public_bytes(*spki):
        raise TeteError(
            f"identity file {path} holds a private key that does not match its certificate "
            f"({_DAMAGED})"
        )
    return Identity(path=path, cert_der=cert.public_bytes(serialization.Encoding.DER), pem=data)


def _create(directory: Path, dir_fd: int) -> None:
    """Write a new identity under a temporary name and link it into place.

    Two processes starting at once must end up with the same identity: the loser of the
    link race drops its own and reads the winner's.
    """
    tmp = f".identity-{secrets.token_hex(8)}"
    try:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_new_identity_pem())
                f.flush()
                os.fsync(f.fileno())  # never a linked-in but empty identity after a crash
            try:
                os.link(tmp, IDENTITY_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp, dir_fd=dir_fd)
    except OSError as exc:
        raise _cannot_create(directory, exc) from exc


def load_or_create(directory: Path | None = None) -> Identity:
    """Load and check the identity in `directory`, creating it atomically on first use."""
    directory = directory or default_identity_dir()
    path = directory / IDENTITY_FILE
    dir_fd = _open_directory(directory)
    try:
        data = _read_file(path, dir_fd)
        if data is None:
            _create(directory, dir_fd)
            data = _read_file(path, dir_fd)
            if data is None:
                raise TeteError(f"identity {path} vanished as it was created ({_MOVE_AWAY})")
    finally:
        os.close(dir_fd)
    return _parse(path, data)
