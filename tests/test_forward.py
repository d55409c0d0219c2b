"""`tete-tunnel forward` between two real processes on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import (
    SERVERS,
    TOOL,
    Proc,
    Procs,
    env_without_config,
    free_ports,
    pair_args,
    wait_for_text,
)


def start_server(procs: Procs, kind: str, *extra: str) -> int:
    proc = procs.start([kind, "0", *extra], command=SERVERS, name=f"server-{kind}")
    text = wait_for_text(proc.out_path, "ready", 15)
    return int(text.split()[1])


def start_pair(procs: Procs, tmp: Path, args_a: list[str], args_b: list[str]) -> tuple[Proc, Proc]:
    link_a, link_b = pair_args(*free_ports(2))
    a = procs.start(["forward", *link_a, "--identity", str(tmp / "a"), *args_a], name="fwd-a")
    b = procs.start(["forward", *link_b, "--identity", str(tmp / "b"), *args_b], name="fwd-b")
    wait_for_text(a.err_path, "Connected to peer!", 20)
    wait_for_text(b.err_path, "Connected to peer!", 20)
    return a, b


def forwarded_port(proc: Proc, pattern: str) -> int:
    text = wait_for_text(proc.out_path, "Forwarding", 15)
    match = re.search(pattern, text)
    assert match, text
    return int(match.group(1))


def stop(*procs: Proc) -> None:
    for p in procs:
        if p.popen.poll() is None:
            p.signal(signal.SIGINT)
    for p in procs:
        assert p.wait(15) == 0, p.err
        assert "Traceback" not in p.err


def fetch_many(url: str, n: int) -> list[str]:
    def one(_: int) -> str:
        with urllib.request.urlopen(url, timeout=60) as response:
            return hashlib.sha256(response.read()).hexdigest()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.usefixtures("either_loop")
def test_http_through_L_and_R_fifty_concurrent_downloads(procs: Procs, tmp_path: Path) -> None:
    blob = os.urandom(1 << 20)
    (tmp_path / "blob").write_bytes(blob)
    http = start_server(procs, "http", str(tmp_path / "blob"))
    a, b = start_pair(procs, tmp_path, ["-L", f"0:127.0.0.1:{http}"], ["-R", f"0:127.0.0.1:{http}"])
    l_port = forwarded_port(a, r"Forwarding 127\.0\.0\.1:(\d+) -> peer 127\.0\.0\.1:" + str(http))
    r_port = forwarded_port(b, r"Forwarding peer 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:" + str(http))
    want = hashlib.sha256(blob).hexdigest()
    assert fetch_many(f"http://127.0.0.1:{l_port}/blob", 50) == [want] * 50  # via -L
    assert fetch_many(f"http://127.0.0.1:{r_port}/blob", 50) == [want] * 50  # via -R
    stop(a, b)


@pytest.mark.usefixtures("either_loop")
def test_five_hundred_concurrent_echo_connections(procs: Procs, tmp_path: Path) -> None:
    echo = start_server(procs, "echo")
    a, b = start_pair(procs, tmp_path, ["-L", f"0:127.0.0.1:{echo}"], [])
    port = forwarded_port(a, r"Forwarding 127\.0\.0\.1:(\d+) ->")

    async def one(i: int) -> bool:
        payload = hashlib.sha256(str(i).encode()).digest() * 2048  # 64 KiB, distinct
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        received = await reader.read()
        writer.close()
        await writer.wait_closed()
        return received == payload

    async def main() -> list[bool]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(500))), 120)

    results = asyncio.run(main())
    assert all(results), f"{results.count(False)} of 500 connections corrupted"
    stop(a, b)


@pytest.mark.usefixtures("either_loop")
def test_half_close_reply_after_eof(procs: Procs, tmp_path: Path) -> None:
    server = start_server(procs, "linecount")
    a, b = start_pair(procs, tmp_path, ["-L", f"0:127.0.0.1:{server}"], [])
    port = forwarded_port(a, r"Forwarding 127\.0\.0\.1:(\d+) ->")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"a line\n" * 1000)
        s.shutdown(socket.SHUT_WR)  # the server answers only after our EOF
        reply = b""
        while chunk := s.recv(100):
            reply += chunk
    assert reply == b"1000\n"
    stop(a, b)


@pytest.mark.usefixtures("either_loop")
def test_closed_target_closes_the_client_promptly_and_says_why(
    procs: Procs, tmp_path: Path
) -> None:
    (closed,) = free_ports(1)
    a, b = start_pair(procs, tmp_path, ["-L", f"0:127.0.0.1:{closed}"], [])
    port = forwarded_port(a, r"Forwarding 127\.0\.0\.1:(\d+) ->")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
    assert data == b""
    assert time.monotonic() - started < 2.0
    text = wait_for_text(a.err_path, "refused the connection", 5)
    assert f"cannot connect to 127.0.0.1:{closed}" in text
    assert "Connection refused" in text
    stop(a, b)


def test_non_loopback_listen_refused_by_default_with_reason(procs: Procs, tmp_path: Path) -> None:
    args_a, args_b = pair_args(*free_ports(2))
    a = procs.start(["forward", *args_a, "--identity", str(tmp_path / "a")])
    b = procs.start(
        ["forward", *args_b, "--identity", str(tmp_path / "b"), "-R", "0.0.0.0:0:127.0.0.1:9"]
    )
    assert b.wait(30) == 1
    assert "the peer refused -R 0.0.0.0:0:127.0.0.1:9" in b.err
    assert "listening on 0.0.0.0:0 is not allowed on the peer" in b.err
    assert "--allow-listen" in b.err
    a.signal(signal.SIGINT)
    a.wait(15)


def test_non_loopback_listen_allowed_with_allow_listen(procs: Procs, tmp_path: Path) -> None:
    echo = start_server(procs, "echo")
    a, b = start_pair(
        procs, tmp_path, ["--allow-listen", "0.0.0.0:*"], ["-R", f"*:0:127.0.0.1:{echo}"]
    )
    port = forwarded_port(b, r"Forwarding peer 0\.0\.0\.0:(\d+) ->")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"ping"
    stop(a, b)


def test_keep_going_survives_a_refused_remote_forward(procs: Procs, tmp_path: Path) -> None:
    echo = start_server(procs, "echo")
    a, b = start_pair(
        procs,
        tmp_path,
        [],
        ["--keep-going", "-R", "0.0.0.0:0:127.0.0.1:9", "-R", f"0:127.0.0.1:{echo}"],
    )
    port = forwarded_port(b, r"Forwarding peer 127\.0\.0\.1:(\d+) ->")
    wait_for_text(b.err_path, "going on without it", 10)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"still here")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"still here"
    stop(a, b)


def run_tool(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOOL, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env_without_config(tmp),
        stdin=subprocess.DEVNULL,
    )


def test_local_port_taken_exits_1_naming_the_holder(tmp_path: Path) -> None:
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        result = run_tool(
            [
                "forward",
                "--peer-ip",
                "127.0.0.1",
                "--lport",
                "45301",
                "--rport",
                "45302",
                "-L",
                f"{port}:127.0.0.1:22",
            ],
            tmp_path,
        )
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use by python" in (
        result.stderr
    )
    assert f"(pid {os.getpid()})" in result.stderr  # the holder is this test process
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "spec", ["8080", "8080:localhost", "a:b:c:d", "1:2:3:4:5", "99999:h:80", "0:h:0", "[::1:80:h:1"]
)
def test_malformed_spec_exits_2_with_the_syntax(spec: str, tmp_path: Path) -> None:
    result = run_tool(["forward", "--peer-ip", "127.0.0.1", "-L", spec], tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"bad -L {spec!r}" in result.stderr
    assert "expected [bind_address:]port:host:hostport" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("either_loop")
def test_sigint_ends_both_sides_and_frees_the_ports(procs: Procs, tmp_path: Path) -> None:
    echo = start_server(procs, "echo")
    (l_port,) = free_ports(1)
    a, b = start_pair(
        procs, tmp_path, ["-L", f"{l_port}:127.0.0.1:{echo}"], ["-R", f"0:127.0.0.1:{echo}"]
    )
    r_port = forwarded_port(b, r"Forwarding peer 127\.0\.0\.1:(\d+) ->")
    forwarded_port(a, r"Forwarding 127\.0\.0\.1:(\d+) ->")
    with socket.create_connection(("127.0.0.1", l_port), timeout=10) as open_conn:  # left open
        a.signal(signal.SIGINT)
        assert a.wait(15) == 0, a.err
        assert b.wait(15) == 0, b.err
        assert "Closed connection" in a.err
        assert "Peer closed connection" in b.err
        open_conn.settimeout(5)
        try:  # the forwarded connection was closed or reset, not left hanging
            assert open_conn.recv(10) == b""
        except ConnectionResetError:
            pass
    for port in (l_port, r_port):  # both listeners are gone: the ports bind again
        s = socket.create_server(("127.0.0.1", port))
        s.close()


def test_demo_exits_0_and_reports_fetch_and_pipe(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TOOL, "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_without_config(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(
        r"fetched http://127\.0\.0\.1:\d+/ through the tunnel: 1048576 bytes, "
        r"SHA-256 equal, \d+ MB/s",
        result.stdout,
    )
    assert re.search(r"piped 32 MiB .* SHA-256 equal, \d+ MB/s", result.stdout)
    assert "demo OK" in result.stdout
