"""An unverified `forward` on a terminal asks to confirm the safety code before it serves
anything (issue 12, point 5), as ssh asks about an unknown host key.

The asking side runs with its standard input a pty (the `pty` module); the other side is not
on a terminal, so it shows the code and serves at once, but nothing it accepts goes anywhere
until the asking side said yes: the asking side does not serve the session until then.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import Proc, Procs, free_ports, pair_args, wait_for_text

QUESTION = re.compile(r"Does the peer see the same safety code (\d{3}-\d{3})\? \[y/N\] ")
SAFETY = re.compile(r"safety code (?:is )?(\d{3}-\d{3})")


class Target:
    """A TCP echo service that records every connection it accepts and every byte."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conns: list[socket.socket] = []
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    conn, _ = self.listener.accept()
                    conn.settimeout(0.1)
                    conns.append(conn)
                    self.accepted += 1
                for conn in list(conns):
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        conns.remove(conn)
                        conn.close()
                        continue
                    self.received += data
                    with contextlib.suppress(OSError):
                        conn.sendall(data)
        finally:
            for conn in conns:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


@contextlib.contextmanager
def target() -> Iterator[Target]:
    t = Target()
    try:
        yield t
    finally:
        t.close()


@contextlib.contextmanager
def terminal() -> Iterator[tuple[int, int]]:
    """A pty: (master, slave); the slave is the child's standard input."""
    master, slave = pty.openpty()
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def asked(proc: Proc, within: float = 30) -> str:
    """The safety code in the question, once it is asked (the line has no newline)."""
    deadline = time.monotonic() + within
    while True:
        match = QUESTION.search(proc.err)
        if match:
            return match.group(1)
        assert proc.popen.poll() is None, f"exited {proc.popen.returncode}:\n{proc.err}"
        assert time.monotonic() < deadline, proc.err
        time.sleep(0.05)


def client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"must not arrive before a yes\n")
    return sock


def start_pair(
    procs: Procs, tmp_path: Path, slave: int, echo: int, b_extra: list[str] | None = None
) -> tuple[Proc, Proc, int, int]:
    """A on the terminal with -L la, B not, with -L lb; both forward to the echo service."""
    la, lb, pa, pb = free_ports(4)
    args_a, args_b = pair_args(pa, pb)
    a = procs.start(
        ["forward", *args_a, "-L", f"{la}:127.0.0.1:{echo}", "--identity", str(tmp_path / "a")],
        stdin_fd=slave,
        name="a",
    )
    b = procs.start(
        [
            "forward",
            *args_b,
            "-L",
            f"{lb}:127.0.0.1:{echo}",
            "--identity",
            str(tmp_path / "b"),
            *(b_extra or []),
        ],
        name="b",
    )
    return a, b, la, lb


def test_no_ends_both_sides_before_any_data(procs: Procs, tmp_path: Path) -> None:
    with target() as echo, terminal() as (master, slave):
        a, b, la, lb = start_pair(procs, tmp_path, slave, echo.port)
        code = asked(a)
        wait_for_text(b.err_path, "Connected to peer!", 30)
        assert SAFETY.search(b.err).group(1) == code, b.err  # B shows the same code
        # Clients on both -L ports while A is asking: nothing may reach the target.
        clients = [client(la), client(lb)]
        time.sleep(1.0)
        assert echo.accepted == 0 and echo.received == b""
        os.write(master, b"n\n")
        assert a.wait(20) == 1, a.err
        assert b.wait(20) == 1, b.err
        for sock in clients:
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                assert sock.recv(100) == b""  # closed or reset, never an echo
            sock.close()
        assert echo.accepted == 0 and echo.received == b""
    assert "error: the safety code was not confirmed" in a.err, a.err
    assert "error: the peer did not confirm the safety code" in b.err, b.err
    for p in (a, b):
        assert "Traceback" not in p.err and "Reconnecting" not in p.err, p.err


def test_eof_is_a_no(procs: Procs, tmp_path: Path) -> None:
    with target() as echo, terminal() as (master, slave):
        a, b, _, _ = start_pair(procs, tmp_path, slave, echo.port)
        asked(a)
        os.write(master, b"\x04")  # ^D at the start of a line: EOF
        assert a.wait(20) == 1, a.err
        assert b.wait(20) == 1, b.err
    assert "error: the safety code was not confirmed" in a.err, a.err
    assert "error: the peer did not confirm the safety code" in b.err, b.err


def test_yes_serves_and_a_pinned_peer_shows_the_code(procs: Procs, tmp_path: Path) -> None:
    """B pinned A's ID (only one side pinned): B shows the code too, A asks; yes serves."""
    ident = procs.start(["id", "--identity", str(tmp_path / "a")], name="id")
    assert ident.wait(20) == 0, ident.err
    a_id = ident.out.decode().strip()
    with target() as echo, terminal() as (master, slave):
        a, b, la, lb = start_pair(procs, tmp_path, slave, echo.port, ["--peer-id", a_id])
        code = asked(a)
        wait_for_text(b.err_path, "safety code", 30)
        assert SAFETY.search(b.err).group(1) == code, b.err
        os.write(master, b"y\n")
        for port in (la, lb):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"ping\n")
                got = b""
                while len(got) < 5:
                    chunk = sock.recv(100)
                    assert chunk, (a.err, b.err)
                    got += chunk
                assert got == b"ping\n"
        assert a.popen.poll() is None and b.popen.poll() is None
    assert "Traceback" not in a.err + b.err


def test_not_on_a_terminal_keeps_the_warning(procs: Procs, tmp_path: Path) -> None:
    """Without a terminal no question is asked: the warning, and it serves at once."""
    with target() as echo:
        la, pa, pb = free_ports(3)
        args_a, args_b = pair_args(pa, pb)
        a = procs.start(
            ["forward", *args_a, "-L", f"{la}:127.0.0.1:{echo.port}", "--identity", str(tmp_path)]
        )
        b = procs.start(["forward", *args_b, "--identity", str(tmp_path / "b")])
        wait_for_text(a.err_path, "Connected to peer!", 30)
        with socket.create_connection(("127.0.0.1", la), timeout=10) as sock:
            sock.sendall(b"x\n")
            assert sock.recv(10) == b"x\n"
        assert "WARNING: the peer is not verified" in a.err
        assert "Does the peer see" not in a.err + b.err


def test_link_lost_while_asking_ends_the_run(procs: Procs, tmp_path: Path) -> None:
    """The peer vanishes during the question: no new link is made (it would be pinned to a
    peer nobody confirmed), the run ends with exit 1."""
    with target() as echo, terminal() as (_master, slave):
        a, b, _, _ = start_pair(procs, tmp_path, slave, echo.port)
        asked(a)
        wait_for_text(b.err_path, "Connected to peer!", 30)
        b.signal(signal.SIGKILL)
        b.wait(10)
        assert a.wait(30) == 1, a.err
    assert "error: the link was lost before the safety code was confirmed" in a.err, a.err
    assert "Reconnecting" not in a.err and "Traceback" not in a.err, a.err
