"""`forward` through real NAT routers (see tests/natlab.py)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
from pathlib import Path

import pytest

from tests.helpers import SERVERS, Proc, Procs, pair_args, wait_for_text
from tests.natlab import NatLab, natlab_available

reason = natlab_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"NAT lab unavailable: {reason}")

PORT_A, PORT_B = 40123, 40456


def in_ns(lab: NatLab, host: str) -> list[str]:
    return lab.exec_argv(host, [])


def server(lab: NatLab, procs: Procs, host: str, *args: str) -> int:
    p = procs.start(list(args), command=SERVERS, prefix=in_ns(lab, host), name=f"srv-{args[0]}")
    return int(wait_for_text(p.out_path, "ready", 15).split()[1])


def pair(
    lab: NatLab, procs: Procs, tmp: Path, a_args: list[str], b_args: list[str]
) -> tuple[Proc, Proc]:
    link_a, link_b = pair_args(PORT_A, PORT_B, lab.alice_public, lab.bob_public)
    a = procs.start(
        ["forward", *link_a, "--identity", str(tmp / "a"), *a_args],
        prefix=in_ns(lab, "alice"),
        name="alice",
    )
    b = procs.start(
        ["forward", *link_b, "--identity", str(tmp / "b"), *b_args],
        prefix=in_ns(lab, "bob"),
        name="bob",
    )
    wait_for_text(a.err_path, "Connected to peer!", 30)
    wait_for_text(b.err_path, "Connected to peer!", 30)
    return a, b


def port_from(proc: Proc, pattern: str) -> int:
    match = re.search(pattern, wait_for_text(proc.out_path, "Forwarding", 15))
    assert match, proc.out
    return int(match.group(1))


def stop(*procs: Proc) -> None:
    for p in procs:
        if p.popen.poll() is None:
            p.signal(signal.SIGINT)
    for p in procs:
        assert p.wait(15) == 0, p.err


def test_http_through_nat_via_L_and_R(procs: Procs, tmp_path: Path) -> None:
    blob = os.urandom(1 << 20)
    (tmp_path / "blob").write_bytes(blob)
    want = hashlib.sha256(blob).hexdigest()
    with NatLab("drop") as lab:
        http = server(lab, procs, "bob", "http", "0", str(tmp_path / "blob"))
        a, b = pair(
            lab, procs, tmp_path, ["-L", f"0:127.0.0.1:{http}"], ["-R", f"0:127.0.0.1:{http}"]
        )
        l_port = port_from(a, r"Forwarding 127\.0\.0\.1:(\d+) ->")
        r_port = port_from(b, r"Forwarding peer 127\.0\.0\.1:(\d+) ->")
        for port in (l_port, r_port):  # from alice's side, across both NATs, to bob's server
            fetch = procs.start(
                ["fetch", f"http://127.0.0.1:{port}/blob", "50"],
                command=SERVERS,
                prefix=in_ns(lab, "alice"),
                name=f"fetch{port}",
            )
            assert fetch.wait(120) == 0, fetch.err
            assert fetch.out.decode().split() == [want] * 50
        stop(a, b)


def test_open_policy_off_loopback_in_the_lab(procs: Procs, tmp_path: Path) -> None:
    """A target on bob's LAN address is refused by default, allowed with --allow-open."""
    with NatLab("drop") as lab:
        echo = server(lab, procs, "bob", "echo", "0", "0.0.0.0")
        target = f"{lab.bob_ip}:{echo}"
        a, b = pair(lab, procs, tmp_path, ["-L", f"0:{target}"], [])
        port = port_from(a, r"Forwarding 127\.0\.0\.1:(\d+) ->")
        probe = [
            "python3",
            "-c",
            "import socket,sys\n"
            "try:\n"
            " s=socket.create_connection(('127.0.0.1', int(sys.argv[1])), 10)\n"
            " s.sendall(b'hi'); s.shutdown(socket.SHUT_WR); print(repr(s.recv(10)))\n"
            "except (ConnectionResetError, BrokenPipeError): print('reset')",
            str(port),
        ]
        refused = procs.start([], command=probe, prefix=in_ns(lab, "alice"), name="probe1")
        assert refused.wait(15) == 0, refused.err
        assert refused.out.strip() in (b"b''", b"reset")  # closed at once, not left hanging
        text = wait_for_text(a.err_path, "refused the connection", 10)
        assert f"connecting to {target} is not allowed on the peer" in text
        assert f"--allow-open {target}" in text
        stop(a, b)

    with NatLab("drop") as lab:
        echo = server(lab, procs, "bob", "echo", "0", "0.0.0.0")
        target = f"{lab.bob_ip}:{echo}"
        a, b = pair(lab, procs, tmp_path, ["-L", f"0:{target}"], ["--allow-open", target])
        port = port_from(a, r"Forwarding 127\.0\.0\.1:(\d+) ->")
        probe[-1] = str(port)
        allowed = procs.start([], command=probe, prefix=in_ns(lab, "alice"), name="probe2")
        assert allowed.wait(15) == 0, allowed.err
        assert allowed.out.strip() == b"b'hi'"
        stop(a, b)
