"""Identities: created once, private, stable, and IDs that round-trip through --peer-id."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import TOOL, env_without_config
from tete_tunnel.errors import UsageError
from tete_tunnel.identity import format_id, load_or_create, parse_id


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
