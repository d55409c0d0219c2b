"""Identities: created once, private, stable, and IDs that round-trip through --peer-id.

An identity file that is not safe to use (wrong key, encrypted, reachable by others, not ours,
behind a symlink) is refused at load with one error line, before any network activity, and
left exactly as it was.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import TOOL, Procs, env_without_config, free_ports
from tete_tunnel.errors import TeteError, UsageError
from tete_tunnel.identity import format_id, load_or_create, parse_id

OTHER_UID = 65534  # nobody
ERROR_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d error: (.*)$")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def tool_id(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOOL, "id", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env_without_config(tmp_path),
    )


def test_id_created_in_xdg_config_home_with_private_key(tmp_path: Path) -> None:
    first = tool_id(tmp_path)
    assert first.returncode == 0, first.stderr
    store = tmp_path / "xdg" / "tete-tunnel" / "identity.pem"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.parent.stat().st_mode) == 0o700
    printed = first.stdout.strip().splitlines()[-1]
    cert = x509.load_pem_x509_certificate(store.read_bytes())
    from cryptography.hazmat.primitives.serialization import Encoding

    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
    assert printed == format_id(digest)
    assert base64.b32decode(printed.replace("-", "") + "====") == digest
    again = tool_id(tmp_path)
    assert again.stdout == first.stdout  # stable across runs


def test_identity_dir_option_gives_a_different_id(tmp_path: Path) -> None:
    default = tool_id(tmp_path).stdout
    other = tool_id(tmp_path, "--identity", str(tmp_path / "other")).stdout
    assert default != other
    assert (tmp_path / "other" / "identity.pem").exists()


def test_unusable_identity_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = tool_id(tmp_path, "--identity", str(blocker / "sub"))
    assert result.returncode == 1
    assert "cannot create identity in" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_identity_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "identity.pem").write_text("garbage")
    (tmp_path / "bad" / "identity.pem").chmod(0o600)  # private, so the content is what fails
    result = tool_id(tmp_path, "--identity", str(tmp_path / "bad"))
    assert result.returncode == 1
    assert "cannot read identity" in result.stderr


def test_concurrent_creation_agrees(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [*TOOL, "id", "--identity", str(tmp_path / "race")],
            stdout=subprocess.PIPE,
            env=env_without_config(tmp_path),
        )
        for _ in range(4)
    ]
    outs = {p.communicate(timeout=30)[0] for p in procs}
    assert len(outs) == 1
    assert [f for f in os.listdir(tmp_path / "race")] == ["identity.pem"]


@given(st.binary(min_size=32, max_size=32), st.sampled_from(["upper", "lower", "nodash", "space"]))
def test_parse_id_accepts_every_spelling_of_printed_ids(digest: bytes, style: str) -> None:
    text = format_id(digest)
    spelled = {
        "upper": text,
        "lower": text.lower(),
        "nodash": text.replace("-", ""),
        "space": text.replace("-", " "),
    }[style]
    assert parse_id(spelled) == digest


@pytest.mark.parametrize("bad", ["", "ABCD", "A" * 51, "A" * 53, "1" * 52, "A" * 51 + "!"])
def test_parse_id_rejects_malformed(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_id(bad)


def test_loaded_identity_matches_tool_output(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path / "i")
    assert tool_id(tmp_path, "--identity", str(tmp_path / "i")).stdout.strip() == ident.id


# --- refusals at load -------------------------------------------------------------------


def pem_parts(path: Path) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of an identity file."""
    data = path.read_bytes()
    key = serialization.load_pem_private_key(data, password=None)
    cert = x509.load_pem_x509_certificate(data)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def new_identity(directory: Path) -> Path:
    """A valid identity made by the tool itself; returns its file."""
    ident = load_or_create(directory)
    assert stat.S_IMODE(ident.path.stat().st_mode) == 0o600
    return ident.path


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def snapshot(*paths: Path) -> list[tuple[str, int, int, bytes]]:
    """What must not change: each path's kind and mode, owner, and bytes (or link target)."""
    out = []
    for p in paths:
        st_ = p.lstat()
        content = (
            os.readlink(p).encode() if p.is_symlink() else p.read_bytes() if p.is_file() else b""
        )
        out.append((str(p), st_.st_mode, st_.st_uid, content))
    return out


def assert_refused(result: subprocess.CompletedProcess[str], named: Path, *phrases: str) -> str:
    """Exit 1 and exactly one error line on stderr (nothing else), naming `named`."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    match = ERROR_LINE.match(lines[0])
    assert match, lines[0]
    message = match.group(1)
    assert str(named) in message, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    assert "internal error" not in message
    assert result.stdout == ""
    return message


def test_key_not_matching_its_certificate_is_refused(tmp_path: Path) -> None:
    key_a, _ = pem_parts(new_identity(tmp_path / "a"))
    _, cert_b = pem_parts(new_identity(tmp_path / "b"))
    mixed = tmp_path / "mixed" / "identity.pem"
    write_private(mixed, key_a + cert_b)
    before = snapshot(mixed.parent, mixed)
    result = tool_id(tmp_path, "--identity", str(mixed.parent))
    assert_refused(
        result,
        mixed,
        "does not match its certificate",
        "restore it from a backup",
        "--identity DIR",
    )
    assert snapshot(mixed.parent, mixed) == before
    with pytest.raises(TeteError, match="does not match"):
        load_or_create(mixed.parent)


def encrypt_identity(path: Path, password: bytes) -> None:
    key_pem, cert_pem = pem_parts(path)
    key = serialization.load_pem_private_key(key_pem, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    path.write_bytes(encrypted + cert_pem)


def test_passphrase_protected_key_is_refused_with_a_fix(tmp_path: Path) -> None:
    store = new_identity(tmp_path / "enc")
    encrypt_identity(store, b"secret")
    assert b"ENCRYPTED PRIVATE KEY" in store.read_bytes()
    before = snapshot(store.parent, store)
    result = tool_id(tmp_path, "--identity", str(store.parent))
    assert_refused(
        result, store, "passphrase-protected", "needs an unencrypted", "move it away", "openssl"
    )
    assert snapshot(store.parent, store) == before


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_the_suggested_openssl_decryption_gives_back_the_same_identity(tmp_path: Path) -> None:
    store = new_identity(tmp_path / "enc")
    original = tool_id(tmp_path, "--identity", str(store.parent)).stdout
    encrypt_identity(store, b"secret")
    message = assert_refused(tool_id(tmp_path, "--identity", str(store.parent)), store)
    command = message.split("decrypt it with: ", 1)[1]
    # The advice as printed, with the passphrase given on the command line instead of typed.
    command = command.replace("openssl pkey ", "openssl pkey -passin pass:secret ", 1)
    subprocess.run(command, shell=True, check=True, cwd=tmp_path, timeout=30)
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    again = tool_id(tmp_path, "--identity", str(store.parent))
    assert again.returncode == 0, again.stderr
    assert again.stdout == original


def test_key_readable_by_others_is_refused_and_left_alone(tmp_path: Path) -> None:
    store = new_identity(tmp_path / "open")
    store.chmod(0o644)
    before = snapshot(store.parent, store)
    result = tool_id(tmp_path, "--identity", str(store.parent))
    assert_refused(result, store, "mode 0644", f"chmod 600 {store}")
    assert snapshot(store.parent, store) == before
    assert stat.S_IMODE(store.stat().st_mode) == 0o644  # not chmod-ed behind our back


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o610, 0o601])
def test_any_access_for_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    store = new_identity(tmp_path / "m")
    store.chmod(mode)
    with pytest.raises(TeteError, match=re.escape(f"chmod 600 {store}")) as info:
        load_or_create(store.parent)
    assert "\n" not in str(info.value)
    assert stat.S_IMODE(store.stat().st_mode) == mode


def test_owner_only_modes_are_fine(tmp_path: Path) -> None:
    store = new_identity(tmp_path / "m")
    for mode in (0o400, 0o600, 0o700):
        store.chmod(mode)
        assert load_or_create(store.parent).path == store


def _faulty_identity(tmp_path: Path, fault: str) -> tuple[Path, str, Callable[[], None]]:
    """An identity file with `fault`, the phrase its refusal holds, and how to fix it."""
    store = new_identity(tmp_path / fault)
    good = store.read_bytes()
    if fault == "mode":
        store.chmod(0o644)
        return store, f"chmod 600 {store}", lambda: store.chmod(0o600)
    if fault == "mismatch":
        key_a, _ = pem_parts(store)
        _, cert_b = pem_parts(new_identity(tmp_path / "other"))
        store.write_bytes(key_a + cert_b)
        return store, "does not match its certificate", lambda: store.write_bytes(good)
    encrypt_identity(store, b"secret")
    return store, "passphrase-protected", lambda: store.write_bytes(good)


@pytest.mark.parametrize("fault", ["mode", "mismatch", "passphrase"])
def test_refused_key_stops_pipe_before_any_network_activity(tmp_path: Path, fault: str) -> None:
    store, phrase, fix = _faulty_identity(tmp_path, fault)
    before = snapshot(store.parent, store)
    lport, rport = free_ports(2)
    args = ["--peer-ip", "127.0.0.1", "--lport", str(lport), "--rport", str(rport)]
    args += ["--identity", str(store.parent), "--timeout", "5", "-v"]
    with socket.create_server(("127.0.0.1", rport)) as listener:
        result = subprocess.run(
            [*TOOL, "pipe", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            env=env_without_config(tmp_path),
        )
        assert result.returncode == 1, result.stderr
        errors = [m.group(1) for m in map(ERROR_LINE.match, result.stderr.splitlines()) if m]
        assert len(errors) == 1, result.stderr
        assert str(store) in errors[0] and phrase in errors[0]
        assert result.stderr.count("error:") == 1, result.stderr
        assert "punching" not in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected, not even briefly
        assert snapshot(store.parent, store) == before

        # The same command with the key fixed does reach the listener: the check above
        # would have seen a connection.
        fix()
        procs = Procs(tmp_path)
        try:
            proc = procs.start(["pipe", *args], stdin=b"")
            listener.settimeout(20)
            conn, _ = listener.accept()
            conn.close()
            assert "punching" in proc.err
        finally:
            procs.close()


@needs_root
def test_key_owned_by_another_uid_is_refused_even_for_root(tmp_path: Path) -> None:
    store = new_identity(tmp_path / "theirs")
    os.chown(store, OTHER_UID, -1)
    before = snapshot(store.parent, store)
    result = tool_id(tmp_path, "--identity", str(store.parent))
    assert_refused(result, store, f"uid {OTHER_UID}", f"not by you (uid {os.geteuid()})")
    assert snapshot(store.parent, store) == before
    assert store.stat().st_uid == OTHER_UID


@needs_root
def test_directory_owned_by_another_uid_is_refused(tmp_path: Path) -> None:
    store = new_identity(tmp_path / "theirs")
    os.chown(store.parent, OTHER_UID, -1)
    before = snapshot(store.parent, store)
    result = tool_id(tmp_path, "--identity", str(store.parent))
    message = assert_refused(result, store.parent, "identity directory", f"uid {OTHER_UID}")
    assert "--identity DIR" in message
    assert snapshot(store.parent, store) == before
    # Nor is a new identity created in an empty directory of theirs.
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    os.chown(empty, OTHER_UID, -1)
    assert_refused(tool_id(tmp_path, "--identity", str(empty)), empty, f"uid {OTHER_UID}")
    assert os.listdir(empty) == []


@pytest.mark.parametrize("mode", [0o770, 0o730, 0o707, 0o703])
def test_directory_writable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    store = new_identity(tmp_path / "shared")
    store.parent.chmod(mode)
    before = snapshot(store.parent, store)
    result = tool_id(tmp_path, "--identity", str(store.parent))
    assert_refused(result, store.parent, f"mode {mode:04o}", f"chmod 700 {store.parent}")
    assert snapshot(store.parent, store) == before


def test_directory_readable_by_others_is_fine(tmp_path: Path) -> None:
    store = new_identity(tmp_path / "readable")
    store.parent.chmod(0o755)
    result = tool_id(tmp_path, "--identity", str(store.parent))
    assert result.returncode == 0, result.stderr


def test_symlinked_identity_directory_is_refused(tmp_path: Path) -> None:
    store = new_identity(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(store.parent)
    before = snapshot(link, store.parent, store)
    result = tool_id(tmp_path, "--identity", str(link))
    assert_refused(result, link, "symbolic link", "--identity")
    assert snapshot(link, store.parent, store) == before
    # The identity behind it is fine: it is the link that is refused.
    assert tool_id(tmp_path, "--identity", str(store.parent)).returncode == 0
    # A dangling link is not followed to create an identity where it points either.
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "elsewhere")
    assert_refused(tool_id(tmp_path, "--identity", str(dangling)), dangling, "symbolic link")
    assert not (tmp_path / "elsewhere").exists()


def test_symlinked_identity_file_is_refused(tmp_path: Path) -> None:
    store = new_identity(tmp_path / "real")
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    link = directory / "identity.pem"
    link.symlink_to(store)
    before = snapshot(directory, link, store)
    result = tool_id(tmp_path, "--identity", str(directory))
    assert_refused(result, link, "symbolic link", "replace the link")
    assert snapshot(directory, link, store) == before
    assert os.listdir(directory) == ["identity.pem"]


def test_identity_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "fifo"
    directory.mkdir(mode=0o700)
    os.mkfifo(directory / "identity.pem", 0o600)  # would block a plain open() forever
    result = tool_id(tmp_path, "--identity", str(directory))
    assert_refused(result, directory / "identity.pem", "not a regular file")


def tls_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> bytes:
    """Run a TLS handshake in memory; return the certificate the server presented (DER)."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_side=False, server_hostname="tete-tunnel")
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, end in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            peer = c.getpeercert(binary_form=True)
            assert peer is not None
            return peer
    raise AssertionError("handshake did not finish")


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="reads the path again without memfd")
def test_tls_uses_the_bytes_checked_at_load_not_the_path_again(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path / "i")
    assert ident.pem == ident.path.read_bytes()
    assert "BEGIN PRIVATE KEY" not in repr(ident)
    # Swap the file on disk after the load: what TLS presents must still be what was checked.
    ident.path.unlink()
    other = load_or_create(tmp_path / "i")
    assert other.cert_der != ident.cert_der
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ident.load_into(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cadata=ident.cert_der)
    assert tls_handshake(server, client) == ident.cert_der


def test_loading_an_existing_identity_leaves_cryptography_unimported(tmp_path: Path) -> None:
    """cryptography costs ~9 MiB for the life of a process: the usual identity file is
    checked by OpenSSL alone (issue 13, memory at rest); creating one still uses it."""
    directory = tmp_path / "id"
    probe = (
        "import sys; from pathlib import Path; from tete_tunnel.identity import load_or_create; "
        f"i = load_or_create(Path({str(directory)!r})); "
        "print(i.id, 'cryptography' in sys.modules)"
    )
    run = [sys.executable, "-c", probe]
    env = env_without_config(tmp_path)
    created = subprocess.run(run, capture_output=True, text=True, timeout=30, env=env)
    loaded = subprocess.run(run, capture_output=True, text=True, timeout=30, env=env)
    assert created.returncode == loaded.returncode == 0, created.stderr + loaded.stderr
    new_id, created_imports = created.stdout.split()
    same_id, loaded_imports = loaded.stdout.split()
    assert new_id == same_id
    assert (created_imports, loaded_imports) == ("True", "False")


def test_the_quick_check_refuses_what_the_thorough_one_refuses(tmp_path: Path) -> None:
    from tete_tunnel.identity import _parse_quickly, _parse_thoroughly

    good = new_identity(tmp_path / "a")
    key_a, cert_a = pem_parts(good)
    _, cert_b = pem_parts(new_identity(tmp_path / "b"))
    assert _parse_quickly(good, good.read_bytes()) == _parse_thoroughly(good, good.read_bytes())
    assert _parse_quickly(good, key_a + cert_b) is None  # mismatch: the thorough parse says so
    assert _parse_quickly(good, cert_a + key_a) is None
    assert _parse_quickly(good, key_a) is None
