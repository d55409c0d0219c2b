"""`forward -D`: the SOCKS parser on its own, then a SOCKS proxy between two real processes."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import os
import re
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import SERVERS, Proc, Procs, free_ports, skip_without_ipv6, wait_for_text
from tests.test_forward import forwarded_port, run_tool, start_pair, start_server, stop
from tete_tunnel import socks
from tete_tunnel.net import endpoint
from tete_tunnel.policy import Policy

# -- the parser, no I/O -------------------------------------------------------------------


def feed(data: bytes, *, one_byte_at_a_time: bool) -> socks.Handshake:
    hs = socks.Handshake()
    chunks = [data[i : i + 1] for i in range(len(data))] if one_byte_at_a_time else [data]
    for chunk in chunks:
        hs.receive_data(chunk)
    return hs


def socks5_request(host: str, port: int, command: int = 1) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        address = bytes([socks.ATYP_DOMAIN, len(host.encode())]) + host.encode()
    else:
        atyp = socks.ATYP_IPV4 if ip.version == 4 else socks.ATYP_IPV6
        address = bytes([atyp]) + ip.packed
    return bytes([5, command, 0]) + address + struct.pack("!H", port)


GREETING = b"\x05\x01\x00"


@pytest.mark.parametrize("one_byte_at_a_time", [False, True])
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1", "b\u00fccher.example"])
def test_socks5_request_parsed_with_the_data_behind_it(host: str, one_byte_at_a_time: bool) -> None:
    hs = feed(
        GREETING + socks5_request(host, 8080) + b"GET /", one_byte_at_a_time=one_byte_at_a_time
    )
    assert hs.data_to_send() == b"\x05\x00"
    assert hs.target == socks.Target(host, 8080)
    assert hs.rest == b"GET /"
    assert hs.success() == b"\x05\x00\x00\x01" + bytes(6)
    assert hs.failure(socks.Reply.NOT_ALLOWED)[:2] == b"\x05\x02"


@pytest.mark.parametrize("one_byte_at_a_time", [False, True])
def test_socks4_and_4a_requests(one_byte_at_a_time: bool) -> None:
    hs = feed(b"\x04\x01\x00\x50\x7f\x00\x00\x01me\0", one_byte_at_a_time=one_byte_at_a_time)
    assert (hs.version, hs.target, hs.data_to_send()) == (4, socks.Target("127.0.0.1", 80), b"")
    hs = feed(b"\x04\x01\x01\xbb\0\0\0\x07\0example.com\0x", one_byte_at_a_time=one_byte_at_a_time)
    assert (hs.target, hs.rest) == (socks.Target("example.com", 443), b"x")
    assert hs.success()[:2] == b"\x00\x5a"
    assert hs.failure(socks.Reply.CONNECTION_REFUSED)[:2] == b"\x00\x5b"


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"\x05\x01\x02", b"\x05\xff"),  # username/password only
        (b"\x05\x00", b"\x05\xff"),  # no methods at all
        (GREETING + socks5_request("localhost", 80, command=2), b"\x05\x07"),  # BIND
        (GREETING + socks5_request("localhost", 80, command=3), b"\x05\x07"),  # UDP
        (GREETING + b"\x05\x01\x00\x05", b"\x05\x08"),  # unknown address type
        (GREETING + socks5_request("localhost", 0), b"\x05\x01"),  # port 0
        (GREETING + b"\x05\x01\x00\x03\x00\x00\x50", b"\x05\x01"),  # empty name
        (GREETING + b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", b"\x05\x01"),  # not UTF-8
        (b"\x04\x02\x00\x50\x7f\0\0\x01\0", b"\x00\x5b"),  # SOCKS4 BIND
        (b"GET / HTTP/1.1\r\n", b""),  # not SOCKS
    ],
)
def test_bad_greetings_and_requests_raise_with_their_reply(data: bytes, reply: bytes) -> None:
    with pytest.raises(socks.SocksError) as info:
        feed(data, one_byte_at_a_time=False)
    assert info.value.reply[:2] == reply


def test_a_request_that_never_ends_is_bounded() -> None:
    hs = socks.Handshake()
    hs.receive_data(b"\x04\x01\x00\x50\x7f\0\0\x01")
    with pytest.raises(socks.SocksError, match="over 1024 bytes"):
        for _ in range(100):
            hs.receive_data(b"u" * 64)  # a user id with no NUL


@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_fuzzed_input_only_ever_raises_socks_error(data: bytes, step: int) -> None:
    hs = socks.Handshake()
    try:
        for i in range(0, len(data), step):
            hs.receive_data(data[i : i + step])
    except socks.SocksError:
        return
    assert hs.target is None or (hs.target.host and 0 < hs.target.port < 65536)


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (Policy().open_refusal("10.1.2.3", 80, ["10.1.2.3"]), socks.Reply.NOT_ALLOWED),
        ("cannot resolve nowhere.invalid: Name or service not known", socks.Reply.HOST_UNREACHABLE),
        *(
            (f"cannot connect to {endpoint('h', 1)}: {os.strerror(e)}", code)
            for e, code in [
                (errno.ECONNREFUSED, socks.Reply.CONNECTION_REFUSED),
                (errno.EHOSTUNREACH, socks.Reply.HOST_UNREACHABLE),
                (errno.ENETUNREACH, socks.Reply.NETWORK_UNREACHABLE),
                (errno.ETIMEDOUT, socks.Reply.TTL_EXPIRED),
                (errno.EACCES, socks.Reply.GENERAL_FAILURE),
            ]
        ),
        # A host name of the client's own cannot pass for the cause.
        ("cannot connect to a: Connection refused:80: Network is unreachable", 3),
        ("this peer runs `tete-tunnel pipe`, not `forward`", socks.Reply.GENERAL_FAILURE),
        ("no link to the peer for 30 s", socks.Reply.GENERAL_FAILURE),
    ],
)
def test_the_peers_refusal_maps_to_its_socks_code(reason: str | None, code: int) -> None:
    assert reason is not None
    assert socks.reply_for_refusal(reason) == code


@pytest.mark.parametrize("spec", ["a:b:c", "99999", "x", "[::1:1080", ""])
def test_malformed_D_exits_2_with_the_syntax(spec: str, tmp_path: Path) -> None:
    result = run_tool(["forward", "--peer-ip", "127.0.0.1", "-D", spec], tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"bad -D {spec!r}" in result.stderr
    assert "expected [bind_address:]port" in result.stderr
    assert "Traceback" not in result.stderr


# -- a proxy between two real processes -----------------------------------------------------


def socks_ports(proc: Proc, n: int) -> list[int]:
    text = wait_for_text(proc.out_path, "(SOCKS", 15, count=n)
    ports = re.findall(r"Forwarding 127\.0\.0\.1:(\d+) -> peer \(SOCKS", text)
    assert len(ports) == n, text
    return [int(p) for p in ports]


def curl(proxy_port: int, url: str, *how: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *how, f"127.0.0.1:{proxy_port}", url],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def socks_reply(proxy_port: int, request: bytes, greeting: bytes = GREETING) -> bytes:
    """Greet, send `request` and EOF; return all until the proxy closes (method choice first)."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=20) as s:
        s.sendall(greeting)
        got = s.recv(2)
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        try:
            while chunk := s.recv(100):
                got += chunk
        except ConnectionResetError:
            pass
    return got


@pytest.fixture
def blob(tmp_path: Path) -> bytes:
    data = os.urandom(200_000)
    (tmp_path / "blob").write_bytes(data)
    return data


@pytest.mark.usefixtures("either_loop")
def test_curl_through_two_D_by_name_and_by_ip_next_to_L_and_R(
    procs: Procs, tmp_path: Path, blob: bytes
) -> None:
    http = start_server(procs, "http", str(tmp_path / "blob"))
    a, b = start_pair(
        procs,
        tmp_path,
        ["-D", "0", "-L", f"0:127.0.0.1:{http}", "-D", "0", "-R", f"0:127.0.0.1:{http}"],
        ["-D", "0"],
    )
    first, second = socks_ports(a, 2)
    (theirs,) = socks_ports(b, 1)
    l_port = forwarded_port(a, r"Forwarding 127\.0\.0\.1:(\d+) -> peer 127\.0\.0\.1:")
    wait_for_text(a.out_path, "Forwarding peer 127.0.0.1:", 15)  # the -R, once the peer listens
    r_port = forwarded_port(a, r"Forwarding peer 127\.0\.0\.1:(\d+) ->")
    for url in (f"http://127.0.0.1:{l_port}/blob", f"http://127.0.0.1:{r_port}/blob"):
        with urllib.request.urlopen(url, timeout=20) as response:
            assert response.read() == blob
    result = curl(theirs, f"http://localhost:{http}/blob", "--socks5-hostname")
    assert (result.returncode, result.stdout == blob) == (0, True), result.stderr
    for port in (first, second):
        for host in ("localhost", "127.0.0.1"):
            result = curl(port, f"http://{host}:{http}/blob", "--socks5-hostname")
            assert result.returncode == 0, result.stderr
            assert result.stdout == blob
    result = curl(first, f"http://localhost:{http}/blob", "--socks4a")
    assert (result.returncode, result.stdout == blob) == (0, True), result.stderr
    assert "Traceback" not in a.err
    stop(a, b)


@pytest.mark.usefixtures("either_loop")
def test_curl_through_D_to_an_ipv6_target(procs: Procs, tmp_path: Path, blob: bytes) -> None:
    skip_without_ipv6()
    proc = procs.start(["http", "0", str(tmp_path / "blob"), "::1"], command=SERVERS)
    http = int(wait_for_text(proc.out_path, "ready", 15).split()[1])
    a, b = start_pair(procs, tmp_path, ["-D", "0"], [])
    (port,) = socks_ports(a, 1)
    result = curl(port, f"http://[::1]:{http}/blob", "--socks5-hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout == blob
    stop(a, b)


@pytest.mark.usefixtures("either_loop")
def test_a_target_the_peers_policy_forbids_gets_code_2_and_the_reason_is_logged(
    procs: Procs, tmp_path: Path
) -> None:
    echo = start_server(procs, "echo")
    a, b = start_pair(procs, tmp_path, ["-D", "0"], [])
    (port,) = socks_ports(a, 1)
    got = socks_reply(port, socks5_request("10.255.255.1", echo))
    assert got == b"\x05\x00" + socks.reply5(socks.Reply.NOT_ALLOWED)
    text = wait_for_text(a.err_path, "the peer refused the connection", 10)
    assert f"(to 10.255.255.1:{echo}): connecting to 10.255.255.1:{echo} is not allowed" in text
    result = curl(port, f"http://10.255.255.1:{echo}/", "--socks5-hostname")
    assert result.returncode == 97, result.stderr  # curl: the proxy said no
    stop(a, b)


@pytest.mark.usefixtures("either_loop")
def test_a_closed_port_gets_code_5_and_a_refused_socks4_request_0x5b(
    procs: Procs, tmp_path: Path
) -> None:
    (closed,) = free_ports(1)
    a, b = start_pair(procs, tmp_path, ["-D", "0"], [])
    (port,) = socks_ports(a, 1)
    started = time.monotonic()
    got = socks_reply(port, socks5_request("127.0.0.1", closed))
    assert got == b"\x05\x00" + socks.reply5(socks.Reply.CONNECTION_REFUSED)
    assert time.monotonic() - started < 5
    text = wait_for_text(a.err_path, "the peer refused the connection", 10)
    assert f"cannot connect to 127.0.0.1:{closed}: Connection refused" in text
    socks4 = b"\x04\x01" + struct.pack("!H", closed) + b"\x7f\0\0\x01\0"
    got = socks_reply(port, b"", greeting=socks4)
    assert got == b"\x00\x5b" + bytes(6)
    stop(a, b)


def closed_within(s: socket.socket, seconds: float) -> bytes:
    """What the proxy sends before it closes `s` (EOF or reset), within `seconds`."""
    s.settimeout(seconds)
    got = b""
    try:
        while chunk := s.recv(100):
            got += chunk
    except ConnectionResetError:
        pass
    return got


@pytest.mark.usefixtures("either_loop")
def test_bad_and_slow_clients_are_closed_and_the_tunnel_keeps_working(
    procs: Procs, tmp_path: Path
) -> None:
    echo = start_server(procs, "echo")
    a, b = start_pair(procs, tmp_path, ["-D", "0"], [])
    (port,) = socks_ports(a, 1)
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    half = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        started = time.monotonic()
        half.sendall(GREETING)
        assert half.recv(2) == b"\x05\x00"
        half.sendall(socks5_request("localhost", echo)[:5])  # and no more
        assert socks_reply(port, b"", greeting=b"\x05\x01\x02") == b"\x05\xff"  # user/pass only
        got = socks_reply(port, socks5_request("localhost", echo, command=2))  # BIND
        assert got == b"\x05\x00" + socks.reply5(socks.Reply.COMMAND_NOT_SUPPORTED)
        got = socks_reply(port, socks5_request("localhost", echo, command=3))  # UDP ASSOCIATE
        assert got[2:4] == b"\x05\x07"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as garbage:
            garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_within(garbage, 5) == b""
        # The slow ones are closed after the 10 s limit, not before.
        assert closed_within(slow, 15) == b""
        assert closed_within(half, 15) == b""
        assert 9 < time.monotonic() - started < 15
    finally:
        slow.close()
        half.close()
    assert "closed the SOCKS client" in wait_for_text(a.err_path, "no SOCKS request", 5)
    got = socks_reply(port, socks5_request("localhost", echo) + b"still here")
    assert got == b"\x05\x00" + socks.reply5(socks.Reply.SUCCEEDED) + b"still here"
    assert "Traceback" not in a.err + b.err
    stop(a, b)


@pytest.mark.usefixtures("either_loop")
def test_fifty_concurrent_socks_connections_keep_their_data(procs: Procs, tmp_path: Path) -> None:
    echo = start_server(procs, "echo")
    a, b = start_pair(procs, tmp_path, ["-D", "0"], [])
    (port,) = socks_ports(a, 1)

    async def one(i: int) -> bool:
        payload = hashlib.sha256(str(i).encode()).digest() * 4096  # 128 KiB, distinct
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        host = "localhost" if i % 2 else "127.0.0.1"
        writer.write(GREETING + socks5_request(host, echo) + payload)  # all at once
        await writer.drain()
        writer.write_eof()
        head = await reader.readexactly(2 + 10)
        received = await reader.read()
        writer.close()
        await writer.wait_closed()
        return head == b"\x05\x00" + socks.reply5(socks.Reply.SUCCEEDED) and received == payload

    async def main() -> list[bool]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), 60)

    results = asyncio.run(main())
    assert all(results), f"{results.count(False)} of 50 connections failed or corrupted"
    stop(a, b)
