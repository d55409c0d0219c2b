"""TETE_TUNNEL_LOOP picks the event loop; uvloop is the default when it is installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Procs, env_without_config, free_ports, pair_args


def _pipe_once(procs: Procs, tmp_path: Path, choice: str | None) -> str:
    """One short pipe exchange with -vv; returns peer a's stderr."""
    env = env_without_config(tmp_path)
    env.pop("TETE_TUNNEL_LOOP", None)
    if choice is not None:
        env["TETE_TUNNEL_LOOP"] = choice
    pa, pb = free_ports(2)
    args_a, args_b = pair_args(pa, pb)
    a = procs.start(["pipe", "-vv", *args_a, "--identity", str(tmp_path / "a")], b"x", env=env)
    b = procs.start(["pipe", *args_b, "--identity", str(tmp_path / "b")], b"y", env=env)
    assert a.wait(30) == 0, a.err
    assert b.wait(30) == 0, b.err
    assert (a.out, b.out) == (b"y", b"x")
    return a.err


def test_the_standard_loop_on_request(procs: Procs, tmp_path: Path) -> None:
    assert "event loop: asyncio" in _pipe_once(procs, tmp_path, "asyncio")


def test_uvloop_by_default_when_installed(procs: Procs, tmp_path: Path) -> None:
    pytest.importorskip(
        "uvloop", reason="uvloop is not installed (a default dependency on Linux and macOS CPython)"
    )
    assert "event loop: uvloop" in _pipe_once(procs, tmp_path, None)


def test_a_bad_choice_is_a_usage_error(procs: Procs, tmp_path: Path) -> None:
    env = env_without_config(tmp_path)
    env["TETE_TUNNEL_LOOP"] = "tokio"
    (pa, pb) = free_ports(2)
    args_a, _ = pair_args(pa, pb)
    a = procs.start(["pipe", *args_a, "--identity", str(tmp_path / "a")], env=env)
    assert a.wait(15) == 2
    assert "TETE_TUNNEL_LOOP='tokio': expected one of auto, asyncio, uvloop" in a.err
    assert "Traceback" not in a.err
