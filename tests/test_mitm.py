"""A man in the middle: two tool instances relaying between the victims.

Each victim was given the middleman's address instead of the other victim's; the two
middle instances are cross-wired stdout to stdin, so in unverified mode bytes really flow.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.helpers import Proc, Procs, free_ports, pair_args
from tete_tunnel.identity import load_or_create


def middle(
    procs: Procs, tmp: Path, victim_args: tuple[list[str], list[str]], mitm_args: list[str]
) -> tuple[Proc, Proc, Proc, Proc]:
    pa, pb, pm1, pm2 = free_ports(4)
    a_side, m1_side = pair_args(pa, pm1)
    b_side, m2_side = pair_args(pb, pm2)
    a = procs.start(
        [
            "pipe",
            *a_side,
            "--identity",
            str(tmp / "a"),
            "--timeout",
            "20",
            *victim_args[0],
        ],
        stdin=b"secret from a\n",
        name="a",
    )
    b = procs.start(
        [
            "pipe",
            *b_side,
            "--identity",
            str(tmp / "b"),
            "--timeout",
            "20",
            *victim_args[1],
        ],
        stdin=b"secret from b\n",
        name="b",
    )
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        m1 = procs.start(
            [
                "pipe",
                *m1_side,
                "--identity",
                str(tmp / "m1"),
                "--timeout",
                "20",
                *mitm_args,
            ],
            stdin_fd=r1,
            stdout_fd=w2,
            name="m1",
        )
        m2 = procs.start(
            [
                "pipe",
                *m2_side,
                "--identity",
                str(tmp / "m2"),
                "--timeout",
                "20",
                *mitm_args,
            ],
            stdin_fd=r2,
            stdout_fd=w1,
            name="m2",
        )
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    return a, b, m1, m2


@pytest.fixture
def ids(tmp_path: Path) -> tuple[str, str]:
    return load_or_create(tmp_path / "a").id, load_or_create(tmp_path / "b").id


def safety_code(err: str) -> str:
    match = re.search(r"safety code (\d{3}-\d{3})", err)
    assert match, err
    return match.group(1)


def test_unverified_mode_shows_differing_safety_codes(procs: Procs, tmp_path: Path) -> None:
    a, b, m1, m2 = middle(procs, tmp_path, ([], []), [])
    for p in (a, b, m1, m2):
        assert p.wait(30) == 0, p.err
    assert b.out == b"secret from a\n"  # the middleman relayed (and could read) it
    assert safety_code(a.err) != safety_code(b.err)
    assert safety_code(a.err) == safety_code(m1.err)  # each victim matches its own middleman


def test_unverified_mode_without_middleman_shows_equal_codes(procs: Procs, tmp_path: Path) -> None:
    args_a, args_b = pair_args(*free_ports(2))
    a = procs.start(["pipe", *args_a, "--identity", str(tmp_path / "a")], stdin=b"x")
    b = procs.start(["pipe", *args_b, "--identity", str(tmp_path / "b")], stdin=b"y")
    assert a.wait(30) == 0 and b.wait(30) == 0
    assert "safety code" in a.err and "WARNING" in a.err
    assert safety_code(a.err) == safety_code(b.err)


def test_pinned_ids_refuse_the_middleman(
    procs: Procs, tmp_path: Path, ids: tuple[str, str]
) -> None:
    a, b, m1, m2 = middle(procs, tmp_path, (["--peer-id", ids[1]], ["--peer-id", ids[0]]), [])
    for victim in (a, b):  # the middleman is dropped each time; at the deadline it is named
        assert victim.wait(40) == 1, victim.err
        assert "peer ID mismatch" in victim.err
        last = victim.err.strip().splitlines()[-1]
        assert "error: no peer was linked in time" in last and "peer ID mismatch" in last
        assert "Connected to peer!" not in victim.err
        assert victim.out == b""
    for m in (m1, m2):
        assert m.wait(40) == 1
        assert "refused us" in m.err


def test_codes_refuse_the_middleman(procs: Procs, tmp_path: Path) -> None:
    a, b, m1, m2 = middle(
        procs,
        tmp_path,
        (["--code", "4-river-bend"], ["--code", "4-river-bend"]),
        ["--code", "4-river-band"],
    )
    for p in (a, b, m1, m2):
        assert p.wait(30) == 1, p.err
        assert "wrong code" in p.err
        assert "Connected to peer!" not in p.err
    assert a.out == b"" and b.out == b""


def test_pinned_and_coded_pipes_connect_and_code_mode_prints_peer_id(
    procs: Procs, tmp_path: Path, ids: tuple[str, str]
) -> None:
    args_a, args_b = pair_args(*free_ports(2))
    a = procs.start(
        ["pipe", *args_a, "--identity", str(tmp_path / "a"), "--code", "9-owl"], stdin=b"1"
    )
    b = procs.start(
        ["pipe", *args_b, "--identity", str(tmp_path / "b"), "--code", "9-owl"], stdin=b"2"
    )
    assert a.wait(30) == 0 and b.wait(30) == 0, a.err + b.err
    assert f"peer ID: {ids[1]}" in a.err and f"peer ID: {ids[0]}" in b.err
    assert (a.out, b.out) == (b"2", b"1")
    # Next time, pin what was printed.
    args_a, args_b = pair_args(*free_ports(2))
    a = procs.start(
        ["pipe", *args_a, "--identity", str(tmp_path / "a"), "--peer-id", ids[1].lower()],
        stdin=b"3",
    )
    b = procs.start(
        ["pipe", *args_b, "--identity", str(tmp_path / "b"), "--peer-id", ids[0].replace("-", "")],
        stdin=b"4",
    )
    assert a.wait(30) == 0 and b.wait(30) == 0, a.err + b.err
    assert (a.out, b.out) == (b"4", b"3")
    assert "not verified" not in a.err and "WARNING" not in a.err  # verified: no warning
