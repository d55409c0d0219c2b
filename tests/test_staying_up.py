"""Staying up on loopback: a peer that dies and comes back, impostors meanwhile, punching
that does no harm to whatever answers on a wrong port."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import SERVERS, Procs, free_ports, skip_without_ipv6, wait_for_text


def start_server(procs: Procs, kind: str) -> int:
    proc = procs.start([kind, "0"], command=SERVERS, name=f"server-{kind}")
    return int(wait_for_text(proc.out_path, "ready", 15).split()[1])


def echo_once(port: int, payload: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def link(lport: int, rport: int, ident: Path, *extra: str, command: str = "forward") -> list[str]:
    return [
        command,
        "--peer-ip",
        "127.0.0.1",
        "--lport",
        str(lport),
        "--rport",
        str(rport),
        "--identity",
        str(ident),
        *extra,
    ]


def lines_after(text: str, marker: str) -> str:
    return text[text.index(marker) :] if marker in text else ""


@pytest.mark.usefixtures("either_loop")
def test_peer_killed_and_restarted_is_served_again_and_impostors_are_refused(
    procs: Procs, tmp_path: Path
) -> None:
    echo = start_server(procs, "echo")
    pa, pb, local = free_ports(3)
    a = procs.start(link(pa, pb, tmp_path / "a", "-L", f"{local}:127.0.0.1:{echo}"), name="a")
    b = procs.start(link(pb, pa, tmp_path / "b"), name="b")
    wait_for_text(a.err_path, "Connected to peer!", 20)
    assert echo_once(local, b"before") == b"before"

    b.signal(9)  # SIGKILL: no goodbye, no close_notify
    killed = time.monotonic()
    b.wait(5)
    wait_for_text(a.err_path, "Reconnecting", 3)
    assert time.monotonic() - killed < 3.0
    assert "connection to peer lost" in lines_after(a.err, "Reconnecting")

    # The -L port stays open meanwhile: a client is accepted and waits for the link.
    waiting = socket.create_connection(("127.0.0.1", local), timeout=5)
    waiting.sendall(b"sent while the peer was away")
    waiting.shutdown(socket.SHUT_WR)

    # An impostor with another identity on the peer's port is refused; waiting goes on.
    impostor = procs.start(link(pb, pa, tmp_path / "impostor", "--timeout", "5"), name="imp")
    wait_for_text(a.err_path, "peer ID mismatch", 20)
    assert impostor.wait(20) == 1
    assert "refused us" in impostor.err, impostor.err
    assert a.popen.poll() is None
    assert a.err.count("Connected to peer!") == 1

    restarted = procs.start(link(pb, pa, tmp_path / "b"), name="b2")  # same identity
    started = time.monotonic()
    wait_for_text(a.err_path, "Connected to peer!", 60, count=2)
    wait_for_text(restarted.err_path, "Connected to peer!", 10)
    assert time.monotonic() - started < 60
    waiting.settimeout(20)
    got = b""
    while chunk := waiting.recv(65536):
        got += chunk
    waiting.close()
    assert got == b"sent while the peer was away"
    assert echo_once(local, b"after") == b"after"
    assert a.popen.poll() is None
    assert "Traceback" not in a.err + restarted.err


@pytest.mark.usefixtures("either_loop")
def test_streams_open_on_a_lost_link_are_reset_not_ended(procs: Procs, tmp_path: Path) -> None:
    """A client in the middle of a transfer sees a reset when the link dies: never a clean
    end of truncated data."""
    echo = start_server(procs, "echo")
    pa, pb, local = free_ports(3)
    a = procs.start(link(pa, pb, tmp_path / "a", "-L", f"{local}:127.0.0.1:{echo}"), name="a")
    b = procs.start(link(pb, pa, tmp_path / "b"), name="b")
    wait_for_text(a.err_path, "Connected to peer!", 20)
    with socket.create_connection(("127.0.0.1", local), timeout=10) as s:
        s.sendall(b"x" * 1000)
        assert s.recv(1000)  # the stream is up and flowing
        b.signal(9)
        b.wait(5)
        with pytest.raises(ConnectionResetError):
            while s.recv(65536):
                pass
    wait_for_text(a.err_path, "Reconnecting", 5)


@pytest.mark.usefixtures("either_loop")
def test_no_reconnect_exits_1_on_link_loss(procs: Procs, tmp_path: Path) -> None:
    pa, pb = free_ports(2)
    a = procs.start(link(pa, pb, tmp_path / "a", "--no-reconnect"), name="a")
    b = procs.start(link(pb, pa, tmp_path / "b"), name="b")
    wait_for_text(a.err_path, "Connected to peer!", 20)
    b.signal(9)
    assert a.wait(10) == 1
    assert "error: connection to peer lost" in a.err
    assert "Reconnecting" not in a.err


@pytest.mark.usefixtures("either_loop")
def test_remote_forward_is_requested_again_after_a_reconnect(procs: Procs, tmp_path: Path) -> None:
    echo = start_server(procs, "echo")
    pa, pb = free_ports(2)
    a = procs.start(link(pa, pb, tmp_path / "a", "-R", f"0:127.0.0.1:{echo}"), name="a")
    b = procs.start(link(pb, pa, tmp_path / "b"), name="b")
    text = wait_for_text(a.out_path, "Forwarding peer", 20)
    port = int(text.split("Forwarding peer 127.0.0.1:")[1].split()[0])
    assert echo_once(port, b"one") == b"one"
    b.signal(9)
    b.wait(5)
    wait_for_text(a.err_path, "Reconnecting", 5)
    b2 = procs.start(link(pb, pa, tmp_path / "b"), name="b2")
    wait_for_text(b2.err_path, "Connected to peer!", 60)
    deadline = time.monotonic() + 20
    while True:  # the same port is asked for again and listened on by the new process
        try:
            assert echo_once(port, b"two") == b"two"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert a.out.decode().count("Forwarding peer") == 1  # the same port, said once
    assert "Traceback" not in a.err + b2.err


class _CountingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.accepted = 0
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _CountingServer = self.server  # type: ignore[assignment]
        server.accepted += 1
        sock: socket.socket = self.request
        sock.settimeout(15)
        try:
            if server.behaviour == "banner":
                sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                sock.recv(4096)
            elif server.behaviour == "echo":
                while data := sock.recv(4096):
                    sock.sendall(data)
            else:  # silent: reads and says nothing
                while sock.recv(4096):
                    pass
        except OSError:
            pass


@pytest.fixture
def plain_servers() -> Iterator[list[_CountingServer]]:
    """A banner server (like sshd), an echo server and a silent one."""
    servers = [_CountingServer(kind) for kind in ("banner", "echo", "silent")]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield servers
    finally:
        for server, thread in zip(servers, threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join(5)


@pytest.mark.usefixtures("either_loop")
def test_wrong_rport_on_a_plain_tcp_server_is_not_hammered(
    procs: Procs, tmp_path: Path, plain_servers: list[_CountingServer]
) -> None:
    """Three pipes at once, each with a --rport that hits another service."""
    started = time.monotonic()
    pipes = []
    for server, lport in zip(plain_servers, free_ports(3), strict=True):
        rport = server.server_address[1]
        args = link(lport, rport, tmp_path / server.behaviour, "--timeout", "10", command="pipe")
        pipes.append(procs.start(args, name=f"pipe-{server.behaviour}"))
    for server, p in zip(plain_servers, pipes, strict=True):
        assert p.wait(30) == 1, p.err
        err = p.err
        lines = err.strip().splitlines()
        what = f"{server.behaviour}: {server.accepted} connections reached it"
        assert server.accepted < 50, what
        assert len(lines) < 20, err
        assert "Traceback" not in err
        final = lines[-1]
        assert "error:" in final and "--rport" in final, final
        if server.behaviour == "silent":  # its connection is still handshaking at the end
            assert "accepted our connection but sent no tete-tunnel handshake" in final, final
        else:
            assert "something else answers at" in final, final
    assert time.monotonic() - started < 25


@pytest.mark.usefixtures("either_loop")
def test_ipv4_on_one_side_and_ipv6_on_the_other_is_named(procs: Procs, tmp_path: Path) -> None:
    skip_without_ipv6()
    pa, pb = free_ports(2)
    common = ["--timeout", "5"]
    a = procs.start(
        [
            "pipe",
            "--peer-ip",
            "::1",
            "--lport",
            str(pa),
            "--rport",
            str(pb),
            *common,
            "--identity",
            str(tmp_path / "a"),
        ],
        name="a",
    )
    b = procs.start(
        [
            "pipe",
            "--peer-ip",
            "127.0.0.1",
            "--lport",
            str(pb),
            "--rport",
            str(pa),
            *common,
            "--identity",
            str(tmp_path / "b"),
        ],
        name="b",
    )
    assert a.wait(30) == 1
    assert b.wait(30) == 1
    for proc in (a, b):
        assert len(proc.err.strip().splitlines()) < 20, proc.err
        assert "Traceback" not in proc.err
    # The IPv6 side, listening dual-stack, sees the other's IPv4 dials and says so.
    assert "IPv4 on one side and IPv6 on the other" in a.err, a.err
