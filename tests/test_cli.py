"""Usage errors: exit 2, one clear line, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import TOOL, env_without_config


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOOL, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env_without_config(tmp_path),
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pipe", "--peer-ip", "not-an-ip"], "not an IP address: 'not-an-ip'"),
        (["pipe", "--peer-ip", "1.2.3.4", "--lport", "70000"], "--lport 70000 is not a TCP port"),
        (["pipe", "--peer-ip", "1.2.3.4", "--peer-id", "XYZ"], "not a tete-tunnel ID: 'XYZ'"),
        (
            ["pipe", "--peer-ip", "1.2.3.4", "--peer-id", "A" * 52, "--code", "x"],
            "use either --peer-id or --code, not both",
        ),
        (["pipe", "--peer-ip", "1.2.3.4", "--code", "  "], "--code must not be empty"),
        (["pipe", "--peer-ip", "1.2.3.4", "--my-ip", "::1"], "of different IP versions"),
        (
            ["pipe", "--peer-ip", "127.0.0.1", "--lport", "5000", "--rport", "5000"],
            "would connect to itself",
        ),
        (["pipe", "--peer-ip", "1.2.3.4", "--timeout", "0"], "--timeout must be a positive"),
    ],
)
def test_bad_input_exits_2_with_a_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = run(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_missing_peer_ip_is_a_usage_error(tmp_path: Path) -> None:
    result = run(["pipe"], tmp_path)
    assert result.returncode == 2
    assert "--peer-ip" in result.stderr


def test_unknown_flag_is_a_usage_error(tmp_path: Path) -> None:
    result = run(["pipe", "--peer-ip", "1.2.3.4", "--frobnicate"], tmp_path)
    assert result.returncode == 2
    assert "--frobnicate" in result.stderr


def test_help_and_version(tmp_path: Path) -> None:
    result = run(["pipe", "--help"], tmp_path)
    assert result.returncode == 0
    for flag in ("--peer-ip", "-peerip", "--lport", "-lport", "--peer-id", "--code", "--timeout"):
        assert flag in result.stdout
    version = run(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("tete-tunnel ")


def test_python_dash_m_and_console_script_agree(tmp_path: Path) -> None:
    script = Path(TOOL[0]).with_name("tete-tunnel")
    if not script.exists():
        pytest.skip(f"console script not installed beside {TOOL[0]}")
    a = subprocess.run([*TOOL, "id", "--identity", str(tmp_path / "i")], capture_output=True)
    b = subprocess.run([script, "id", "--identity", str(tmp_path / "i")], capture_output=True)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def test_punch_timeout_names_likely_causes(tmp_path: Path) -> None:
    """Nobody answers: exit 1 by --timeout with the reasons, no traceback."""
    result = run(
        [
            "pipe",
            "--peer-ip",
            "127.0.0.1",
            "--lport",
            "45231",
            "--rport",
            "45232",
            "--timeout",
            "1.5",
            "--identity",
            str(tmp_path / "i"),
        ],
        tmp_path,
    )
    assert result.returncode == 1
    assert "could not connect to the peer at 127.0.0.1:45232" in result.stderr
    assert "has not started" in result.stderr and "symmetric NAT" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Connected to peer!" not in result.stderr


def test_port_in_use_names_the_holder(tmp_path: Path) -> None:
    import socket

    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = run(
            [
                "pipe",
                "--peer-ip",
                "127.0.0.1",
                "--lport",
                str(port),
                "--rport",
                "45233",
                "--timeout",
                "2",
                "--identity",
                str(tmp_path / "i"),
            ],
            tmp_path,
        )
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"local port {port} is already in use" in result.stderr
    assert "python" in result.stderr.lower()  # the holder is this pytest process


def test_traceback_only_with_vv(tmp_path: Path) -> None:
    args = [
        "pipe",
        "--peer-ip",
        "127.0.0.1",
        "--lport",
        "45241",
        "--rport",
        "45242",
        "--timeout",
        "0.5",
        "--identity",
        str(tmp_path / "i"),
    ]
    assert "Traceback" not in run(args, tmp_path).stderr
    assert "Traceback" in run([*args, "-vv"], tmp_path).stderr
