"""`tete-tunnel pipe` between two real processes on loopback."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import Procs, free_ports, pair_args, skip_without_ipv6

LOG_LINE = r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} "


@pytest.mark.usefixtures("either_loop")
def test_four_mib_each_way_at_once(procs: Procs, tmp_path: Path) -> None:
    data_a, data_b = os.urandom(4 << 20), os.urandom(4 << 20)
    pa, pb = free_ports(2)
    args_a, args_b = pair_args(pa, pb)
    a = procs.start(["pipe", *args_a, "--identity", str(tmp_path / "a")], stdin=data_a)
    b = procs.start(["pipe", *args_b, "--identity", str(tmp_path / "b")], stdin=data_b)
    assert a.wait(60) == 0, a.err
    assert b.wait(60) == 0, b.err
    assert hashlib.sha256(a.out).digest() == hashlib.sha256(data_b).digest()
    assert hashlib.sha256(b.out).digest() == hashlib.sha256(data_a).digest()
    for p in (a, b):
        assert re.search(LOG_LINE + r"Connected to peer!$", p.err, re.M), p.err
        assert re.search(LOG_LINE + r"Peer closed connection$", p.err, re.M), p.err
        assert re.search(LOG_LINE + r"Closed connection$", p.err, re.M), p.err
        assert "Traceback" not in p.err


def test_seed_command_line_still_works(procs: Procs, tmp_path: Path) -> None:
    """The seed's single-dash flags, -k and -v, and its three log lines."""
    pa, pb = free_ports(2)
    seed_a = ["-myip", "127.0.0.1", "-peerip", "127.0.0.1", "-lport", str(pa), "-rport", str(pb)]
    seed_b = ["-myip", "127.0.0.1", "-peerip", "127.0.0.1", "-lport", str(pb), "-rport", str(pa)]
    a = procs.start(["pipe", *seed_a, "-k", "-v", "--identity", str(tmp_path / "a")], stdin=b"A\n")
    b = procs.start(["pipe", *seed_b, "-k", "-v", "--identity", str(tmp_path / "b")], stdin=b"B\n")
    assert a.wait(30) == 0, a.err
    assert b.wait(30) == 0, b.err
    assert (a.out, b.out) == (b"B\n", b"A\n")
    for p in (a, b):
        lines = [line[20:] for line in p.err.splitlines() if re.match(LOG_LINE, line)]
        assert "Connected to peer!" in lines
        assert "Peer closed connection" in lines
        assert "Closed connection" in lines
        assert lines.index("Connected to peer!") < lines.index("Closed connection")


def test_empty_input_both_sides(procs: Procs, tmp_path: Path) -> None:
    pa, pb = free_ports(2)
    args_a, args_b = pair_args(pa, pb)
    a = procs.start(["pipe", *args_a, "--identity", str(tmp_path / "a")])  # stdin /dev/null
    b = procs.start(["pipe", *args_b, "--identity", str(tmp_path / "b")], stdin=b"")
    assert a.wait(30) == 0, a.err
    assert b.wait(30) == 0, b.err
    assert a.out == b"" and b.out == b""


def test_one_way_transfer_with_the_other_side_idle(procs: Procs, tmp_path: Path) -> None:
    """The tar case: data flows one way; the receiver's stdin is empty."""
    data = os.urandom(3 << 20)
    pa, pb = free_ports(2)
    args_a, args_b = pair_args(pa, pb)
    sender = procs.start(["pipe", *args_a, "--identity", str(tmp_path / "a")], stdin=data)
    receiver = procs.start(["pipe", *args_b, "--identity", str(tmp_path / "b")])
    assert receiver.wait(30) == 0, receiver.err
    assert sender.wait(30) == 0, sender.err
    assert receiver.out == data
    assert sender.out == b""


def _wait_for(proc_err: Path, text: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in proc_err.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen in {proc_err}: {proc_err.read_text()}")


@pytest.mark.usefixtures("either_loop")
def test_sigint_mid_transfer_aborts_both_sides(procs: Procs, tmp_path: Path) -> None:
    """Both sides keep stdin open (a fifo nobody closes): SIGINT on one cuts the transfer
    short, so neither side may report success; each writes out what it did get."""
    pa, pb = free_ports(2)
    args_a, args_b = pair_args(pa, pb)
    fifo_a, fifo_b = tmp_path / "fa", tmp_path / "fb"
    os.mkfifo(fifo_a)
    os.mkfifo(fifo_b)
    # Hold the write ends open so the tools never see EOF on stdin.
    wa = os.open(fifo_a, os.O_RDWR)
    wb = os.open(fifo_b, os.O_RDWR)
    try:
        a = procs.start(["pipe", *args_a, "--identity", str(tmp_path / "a")], stdin=fifo_a)
        b = procs.start(["pipe", *args_b, "--identity", str(tmp_path / "b")], stdin=fifo_b)
        os.write(wa, b"from a\n")
        os.write(wb, b"from b\n")
        _wait_for(a.err_path, "Connected to peer!", 20)
        _wait_for(b.err_path, "Connected to peer!", 20)
        _wait_for(b.out_path, "from a", 10)
        _wait_for(a.out_path, "from b", 10)
        a.signal(signal.SIGINT)
        assert a.wait(10) == 1, a.err
        assert b.wait(10) == 1, b.err
    finally:
        os.close(wa)
        os.close(wb)
    assert "interrupted: the transfer was cut short" in a.err
    assert "the peer aborted the transfer" in b.err
    assert b.out == b"from a\n"
    assert a.out == b"from b\n"
    assert "Traceback" not in a.err + b.err


def test_sigterm_while_punching_exits_1_without_traceback(procs: Procs, tmp_path: Path) -> None:
    (pa, pb) = free_ports(2)
    args_a, _ = pair_args(pa, pb)
    a = procs.start(["pipe", *args_a, "-v", "--identity", str(tmp_path / "a")])
    _wait_for(a.err_path, "punching", 10)
    a.signal(signal.SIGTERM)
    assert a.wait(10) == 1
    assert "interrupted before the peer was connected" in a.err
    assert "Traceback" not in a.err


def test_peer_killed_means_link_lost(procs: Procs, tmp_path: Path) -> None:
    pa, pb = free_ports(2)
    args_a, args_b = pair_args(pa, pb)
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    w = os.open(fifo, os.O_RDWR)
    try:
        a = procs.start(["pipe", *args_a, "--identity", str(tmp_path / "a")], stdin=fifo)
        b = procs.start(["pipe", *args_b, "--identity", str(tmp_path / "b")], stdin=fifo)
        _wait_for(a.err_path, "Connected to peer!", 20)
        _wait_for(b.err_path, "Connected to peer!", 20)
        b.signal(signal.SIGKILL)
        assert a.wait(10) == 1, a.err
    finally:
        os.close(w)
    assert "connection to peer lost" in a.err
    assert "Traceback" not in a.err


def test_ipv6_loopback(procs: Procs, tmp_path: Path) -> None:
    """The address family comes from --peer-ip; brackets are accepted as people write them."""
    skip_without_ipv6()
    data_a, data_b = os.urandom(1 << 20), os.urandom(1 << 20)
    pa, pb = free_ports(2)
    # Both spellings of an IPv6 --peer-ip: bare and in brackets.
    args_a, args_b = pair_args(pa, pb, ip_a="[::1]", ip_b="::1")
    a = procs.start(["pipe", *args_a, "-v", "--identity", str(tmp_path / "a")], stdin=data_a)
    b = procs.start(["pipe", *args_b, "--identity", str(tmp_path / "b")], stdin=data_b)
    assert a.wait(30) == 0, a.err
    assert b.wait(30) == 0, b.err
    assert (a.out, b.out) == (data_b, data_a)
    assert f"[::1]:{pb}" in a.err


@pytest.mark.usefixtures("either_loop")
def test_slow_reader_gets_every_byte(procs: Procs, tmp_path: Path) -> None:
    """Regression: the sender's session end must not overtake its queued data.

    The receiver's stdout is a pipe drained slowly, so the sender finishes long before its
    data has left; the receiver must still get all of it (and both exit 0).
    """
    import threading

    data = os.urandom(8 << 20)
    pa, pb = free_ports(2)
    args_a, args_b = pair_args(pa, pb)
    r, w = os.pipe()
    digest = hashlib.sha256()
    received = 0

    def slow_drain() -> None:
        nonlocal received
        with os.fdopen(r, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                digest.update(chunk)
                received += len(chunk)
                time.sleep(0.005)  # ~13 MB/s: far slower than the link

    drainer = threading.Thread(target=slow_drain)
    drainer.start()
    try:
        a = procs.start(["pipe", *args_a, "--identity", str(tmp_path / "a")], stdin=data)
        b = procs.start(["pipe", *args_b, "--identity", str(tmp_path / "b")], stdout_fd=w)
    finally:
        os.close(w)
    assert a.wait(120) == 0, a.err
    assert b.wait(120) == 0, b.err
    drainer.join(60)
    assert received == len(data)
    assert digest.digest() == hashlib.sha256(data).digest()
