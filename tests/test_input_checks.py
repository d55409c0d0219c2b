"""Input checks (issue 12, point 7): each bad input is one error line in our words, exit 2 for
usage errors (1 for a refused identity), never a traceback; --keep-going's lines are warnings."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import TOOL, Procs, env_without_config, free_ports, wait_for_text

LOG_LINE = r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d "
HELP_HINT = re.compile(r"Try 'tete-tunnel( [a-z]+)* --help' for help\.")  # the subcommand's


def run(
    args: list[str], tmp_path: Path, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOOL, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env_without_config(tmp_path),
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one error line (a usage error adds the help hint after it); no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == (2 if code == 2 else 1), result.stderr
    if code == 2:
        assert HELP_HINT.fullmatch(lines[1]), result.stderr
    match = re.fullmatch(LOG_LINE + "error: (.*)", lines[0])
    assert match, lines[0]
    return match.group(1)


def test_empty_identity_is_refused_and_nothing_written(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run(["id", "--identity", ""], tmp_path, cwd=cwd)
    assert error_line(result, 2) == "--identity must name a directory, not ''"
    assert list(cwd.iterdir()) == []  # no identity.pem in the current directory
    result = run(["pipe", "--peer-ip", "1.2.3.4", "--identity", ""], tmp_path, cwd=cwd)
    assert error_line(result, 2) == "--identity must name a directory, not ''"
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
@pytest.mark.parametrize("command", ["pipe", "forward"])
def test_timeout_must_be_finite_and_positive(command: str, value: str, tmp_path: Path) -> None:
    result = run([command, "--peer-ip", "1.2.3.4", "--timeout", value], tmp_path)
    message = error_line(result, 2)
    assert message.startswith("--timeout must be a positive number of seconds, not "), message


def test_timeout_with_via_checked_too(tmp_path: Path) -> None:
    result = run(["pipe", "--via", "127.0.0.1:1", "--timeout", "nan"], tmp_path)
    assert "--timeout must be a positive number" in error_line(result, 2)


@pytest.mark.parametrize(
    ("spec", "bad"),
    [("abc:127.0.0.1:80", "'abc'"), ("8080:127.0.0.1:http", "'http'"), ("8080:h:+80", "'+80'")],
)
def test_port_that_is_not_a_number(spec: str, bad: str, tmp_path: Path) -> None:
    message = error_line(run(["forward", "--peer-ip", "1.2.3.4", "-L", spec], tmp_path), 2)
    assert f"port must be a number, not {bad}" in message, message
    assert "invalid literal" not in message and "base 10" not in message


def test_duplicate_local_forward(tmp_path: Path) -> None:
    args = ["-L", "8080:127.0.0.1:80", "-L", "127.0.0.1:8080:127.0.0.1:81"]
    message = error_line(run(["forward", "--peer-ip", "1.2.3.4", *args], tmp_path), 2)
    assert message == (
        "-L '127.0.0.1:8080:127.0.0.1:81' is a duplicate: -L '8080:127.0.0.1:80' already "
        "listens on 127.0.0.1:8080"
    )
    assert "in use" not in message


def test_port_zero_twice_is_no_duplicate(tmp_path: Path) -> None:
    """Two -L 0:... each get their own port: not refused as duplicates (the link then
    fails, here at once: a --timeout too short for anyone to answer)."""
    args = ["-L", "0:127.0.0.1:80", "-L", "0:127.0.0.1:81", "--timeout", "0.5"]
    port = free_ports(1)[0]
    result = run(["forward", "--peer-ip", "127.0.0.1", "--rport", str(port), *args], tmp_path)
    assert "duplicate" not in result.stderr, result.stderr


def test_keep_going_says_warning(procs: Procs) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        busy = holder.getsockname()[1]
        lport, rport = free_ports(2)
        p = procs.start(
            [
                "forward",
                "--peer-ip",
                "127.0.0.1",
                "--lport",
                str(lport),
                "--rport",
                str(rport),
                "--keep-going",
                "-L",
                f"{busy}:127.0.0.1:9",
            ]
        )
        err = wait_for_text(p.err_path, "going on without it", 15)
    finally:
        holder.close()
    line = next(ln for ln in err.splitlines() if "going on without it" in ln)
    assert re.fullmatch(LOG_LINE + rf"warning: -L {busy}:127.0.0.1:9: .*", line), line
    assert "error:" not in line


def make_identity(tmp_path: Path) -> Path:
    directory = tmp_path / "ident"
    result = run(["id", "--identity", str(directory)], tmp_path)
    assert result.returncode == 0, result.stderr
    return directory / "identity.pem"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_readable_by_others_is_refused_with_the_chmod(tmp_path: Path, mode: int) -> None:
    path = make_identity(tmp_path)
    os.chmod(path, mode)
    message = error_line(run(["id", "--identity", str(path.parent)], tmp_path), 1)
    assert f"identity file {path} is accessible by group or others" in message, message
    assert f"chmod 600 {path}" in message, message


@pytest.mark.parametrize(
    "damage",
    [
        lambda pem: b"garbage\n",
        lambda pem: pem[: len(pem) // 2],  # cut short
        lambda pem: pem.replace(b"PRIVATE KEY-----\n", b"PRIVATE KEY-----\nAAAA", 1),
    ],
    ids=["garbage", "truncated", "bad-key"],
)
def test_corrupt_key_gets_advice_that_keeps_it(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    path = make_identity(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    before = path.read_bytes()
    message = error_line(run(["id", "--identity", str(path.parent)], tmp_path), 1)
    assert str(path) in message, message
    assert "restore it from a backup" in message, message
    assert "--identity DIR" in message, message
    for bad in ("delete", "remove", "rm ", "move it away"):
        assert bad not in message, message
    assert path.read_bytes() == before  # untouched
