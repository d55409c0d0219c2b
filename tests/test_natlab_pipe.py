"""`pipe` through real NAT routers built from network namespaces (see tests/natlab.py)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from tests.helpers import Procs, pair_args
from tests.natlab import NatLab, natlab_available

reason = natlab_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"NAT lab unavailable: {reason}")

PORT_A, PORT_B = 40123, 40456


def start_pair(
    lab: NatLab,
    procs: Procs,
    tmp: Path,
    data_a: bytes,
    data_b: bytes,
    extra: list[str] | None = None,
    bob_delay: float = 0.0,
) -> tuple:
    extra = extra or []
    link_a, link_b = pair_args(PORT_A, PORT_B, lab.alice_public, lab.bob_public)
    a = procs.start(
        ["pipe", *link_a, "--identity", str(tmp / "a"), "-v", *extra],
        stdin=data_a,
        prefix=lab.exec_argv("alice", []),
        name="alice",
    )
    time.sleep(bob_delay)
    b = procs.start(
        ["pipe", *link_b, "--identity", str(tmp / "b"), "-v", *extra],
        stdin=data_b,
        prefix=lab.exec_argv("bob", []),
        name="bob",
    )
    return a, b


@pytest.mark.parametrize(
    ("kind", "bob_delay"),
    [
        ("drop", 0.0),  # both routers silently drop unsolicited SYNs
        ("drop", 1.5),  # ... with one side late: its first SYNs are lost
        ("rst", 1.5),  # bob's router answers alice's early SYNs with RST
        ("no-nat", 1.0),  # bob has a public address, alice is behind NAT
        ("same-lan", 0.5),  # no NAT; the listener catches the other's SYN
    ],
)
def test_pipe_through_nat(kind: str, bob_delay: float, procs: Procs, tmp_path: Path) -> None:
    data_a, data_b = os.urandom(4 << 20), os.urandom(4 << 20)
    with NatLab(kind) as lab:
        a, b = start_pair(lab, procs, tmp_path, data_a, data_b, bob_delay=bob_delay)
        assert a.wait(60) == 0, a.err
        assert b.wait(60) == 0, b.err
    assert hashlib.sha256(a.out).digest() == hashlib.sha256(data_b).digest()
    assert hashlib.sha256(b.out).digest() == hashlib.sha256(data_a).digest()
    for p in (a, b):
        assert "Connected to peer!" in p.err and "Closed connection" in p.err
    # The far ends really are the routers' public addresses, not the peers' own.
    assert f"{lab.bob_public}:" in a.err
    assert f"{lab.alice_public}:" in b.err


def test_rst_router_refusals_are_survived(procs: Procs, tmp_path: Path) -> None:
    """Alice's early SYNs are refused by bob's router; she retries until bob is up."""
    with NatLab("rst") as lab:
        a, b = start_pair(
            lab, procs, tmp_path, b"a" * 1000, b"b" * 1000, extra=["-vv"], bob_delay=2.0
        )
        assert a.wait(60) == 0, a.err
        assert b.wait(60) == 0, b.err
    assert "ECONNREFUSED" in a.err  # the router's RSTs really happened
    assert a.out == b"b" * 1000 and b.out == b"a" * 1000


def test_symmetric_nat_fails_by_the_deadline(procs: Procs, tmp_path: Path) -> None:
    with NatLab("symmetric") as lab:
        started = time.monotonic()
        a, b = start_pair(lab, procs, tmp_path, b"x", b"y", extra=["--timeout", "5"])
        assert a.wait(30) == 1, a.err
        assert b.wait(30) == 1, b.err
        elapsed = time.monotonic() - started
    assert elapsed < 20  # well before the default 30 s: --timeout was obeyed
    for p in (a, b):
        assert "could not connect to the peer" in p.err
        assert "symmetric NAT" in p.err
        assert "Connected to peer!" not in p.err
        assert "Traceback" not in p.err
