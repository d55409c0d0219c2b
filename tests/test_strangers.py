"""Strangers on the punch port never crash a peer and never get "Connected to peer!"."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from pathlib import Path

from tests.helpers import Procs, free_ports, pair_args, wait_for_text
from tete_tunnel import hello as msg
from tete_tunnel.identity import load_or_create

DROPPED = "dropped a connection from"


def connect_to(port: int, source_ip: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source_ip, 0))
    s.settimeout(15)
    return s


def drain_until_closed(s: socket.socket) -> None:
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    s.close()


def valid_hello_then_tls12(port: int, tmp: Path) -> None:
    """A stranger that speaks our HELLO/FINISH but then only TLS 1.2."""
    ident = load_or_create(tmp / "stranger")
    nonce = os.urandom(32)
    s = connect_to(port)
    s.sendall(msg.encode_hello(msg.Hello(hashlib.sha256(nonce).digest(), ident.cert_der, b"")))
    header = s.recv(msg.HEADER_SIZE, socket.MSG_WAITALL)
    _, length = msg.parse_header(header)
    peer_cert = msg.parse_hello(s.recv(length, socket.MSG_WAITALL)).cert_der
    s.sendall(msg.encode_finish(msg.Finish(nonce, b"")))
    s.recv(msg.HEADER_SIZE + 33, socket.MSG_WAITALL)  # their FINISH
    server_side = ident.fingerprint > hashlib.sha256(peer_cert).digest()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(ident.path))
    try:
        ctx.wrap_socket(s, server_side=server_side, server_hostname=None if server_side else "x")
        raise AssertionError("TLS 1.2 handshake unexpectedly succeeded")
    except (ssl.SSLError, OSError):
        pass
    s.close()


def raw_tls12_client(port: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = connect_to(port)
    try:
        ctx.wrap_socket(s, server_hostname="x")
        raise AssertionError("TLS handshake unexpectedly succeeded")
    except (ssl.SSLError, OSError):
        pass
    s.close()


def test_strangers_are_dropped_and_the_real_peer_still_connects(
    procs: Procs, tmp_path: Path
) -> None:
    pa, pb = free_ports(2)
    args_a, args_b = pair_args(pa, pb)
    a = procs.start(
        ["pipe", *args_a, "-v", "--timeout", "60", "--identity", str(tmp_path / "a")],
        stdin=b"real data from a\n",
    )
    wait_for_text(a.err_path, "punching", 10)
    time.sleep(0.3)  # the listener is up right after that line

    # From another address: ignored at once, never even handshaken.
    other = connect_to(pa, source_ip="127.0.0.2")
    other.sendall(b"hello?")
    drain_until_closed(other)
    wait_for_text(a.err_path, "ignored a connection from 127.0.0.2", 10)

    strangers = [
        (
            "garbage",
            lambda: (
                (s := connect_to(pa)).sendall(b"GET / HTTP/1.0\r\n\r\n" * 3)
                or drain_until_closed(s)
            ),
        ),
        (
            "oversized HELLO",
            lambda: (
                (s := connect_to(pa)).sendall(
                    msg.HEADER.pack(msg.MAGIC, msg.VERSION, msg.MessageType.HELLO, 0xFFFF)
                    + b"x" * 60000
                )
                or drain_until_closed(s)
            ),
        ),
        ("TLS 1.2 ClientHello", lambda: raw_tls12_client(pa)),
        ("valid HELLO, then TLS 1.2 only", lambda: valid_hello_then_tls12(pa, tmp_path)),
        ("stall", lambda: drain_until_closed(connect_to(pa))),  # sends nothing at all
    ]
    for n, (label, act) in enumerate(strangers, start=1):
        act()
        content = wait_for_text(a.err_path, DROPPED, 20, count=n)
        assert a.popen.poll() is None, f"peer died after {label}: {a.err}"
        assert "Connected to peer!" not in content, label
    text = a.err
    assert "not a tete-tunnel peer" in text
    assert "exceeds 4096" in text
    assert "TLS handshake failed" in text
    assert "sent no complete handshake in time" in text

    b = procs.start(["pipe", *args_b, "--identity", str(tmp_path / "b")], stdin=b"from b\n")
    assert a.wait(30) == 0, a.err
    assert b.wait(30) == 0, b.err
    assert a.out == b"from b\n" and b.out == b"real data from a\n"
    assert a.err.count("Connected to peer!") == 1
    assert "Traceback" not in a.err + b.err
