"""The NAT lab's facilities for relay and rendezvous tests, proved with plain sockets.

Kind "same-nat" (alice and bob on one LAN behind one port-preserving NAT that does not
hairpin), ``set_nat`` (a NAT switched between symmetric and port-preserving mid-test, and
what conntrack keeps across the switch), ``capture`` (every frame on an interface, to show
what crossed it in plaintext), and ``whoami_server``/``whoami`` (the source address a server
at ``wan_ip`` sees).  No project code is used: these test the lab itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.natlab import CommandError, NatLab, NatLabError, impair_available, natlab_available

_reason = natlab_available()
if _reason:
    pytest.skip(f"NatLab unavailable: {_reason}", allow_module_level=True)

LPORT = 41000

# Listen on a port; print "ready", then for up to SECONDS print each peer that connects.
# argv: port seconds
LISTENER = r"""
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
srv.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    while True:
        conn, peer = srv.accept()
        print("accepted", peer[0], flush=True)
        conn.close()
except TimeoutError:
    pass
"""

# Connect; print "connected" or the errno's name.  argv: host port timeout
DIAL = r"""
import errno, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("connected")
except TimeoutError:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, repr(e)))
"""

# Connect from a fixed local port to a whoami server and hold the connection: print the
# address the server will see only once the payload is sent, which waits for a line on stdin.
# argv: host port local_port
HELD = r"""
import socket, struct, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.settimeout(10)
s.connect((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
sys.stdin.readline()
s.sendall(struct.pack("!I", 4) + b"held")
reply = b""
while chunk := s.recv(4096):
    reply += chunk
print(reply.decode().strip(), flush=True)
"""

# A SYN from a fixed local port to an address that never answers: leaves conntrack SYN_SENT.
# argv: host port local_port
SYN_ONLY = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.settimeout(0.5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except TimeoutError:
    print("timeout")
"""


def _dial(lab: NatLab, host: str, ip: str, port: int, timeout: float = 1.0) -> str:
    argv = [sys.executable, "-c", DIAL, ip, str(port), str(timeout)]
    return lab.run(host, argv, timeout=timeout + 10).stdout.strip()


def _leftover(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(prefix + "-")]


def _entries(lab: NatLab, host: str, port: int) -> list[str]:
    """``host``'s conntrack lines for connections from local port ``port``."""
    return [ln for ln in lab.conntrack(host) if f" sport={port} " in ln]


def _public_port(entry: str) -> int:
    """The port a conntrack line's connection was mapped to: its reply tuple's dport."""
    return int(re.findall(r" dport=(\d+)", entry)[-1])


def test_same_nat() -> None:
    with NatLab("same-nat") as lab:
        assert lab.hosts == ("alice", "lan", "natA", "wan", "bob")
        assert (lab.alice_ip, lab.bob_ip) == ("192.168.1.2", "192.168.1.3")
        assert lab.alice_public == lab.bob_public == "10.99.0.1"
        assert lab.wan_ip == "10.99.0.254"
        assert lab.wan_if("natA") == "wan0"
        with pytest.raises(ValueError, match="natB"):
            lab.ns("natB")

        # Both reach the WAN through natA, which keeps a local port where it is free: alice
        # keeps LPORT; bob's LPORT to the same server would reuse alice's public tuple
        # (her connection's conntrack entry lingers in TIME_WAIT), so natA picks another.
        server = lab.whoami_server("wan")
        with pytest.raises(NatLabError, match="in use"):
            lab.whoami_server("wan", server.port)
        a = lab.whoami("alice", lab.wan_ip, server.port, local_port=LPORT)
        assert (a.local_ip, a.local_port) == (lab.alice_ip, LPORT)
        assert (a.seen_ip, a.seen_port) == (lab.alice_public, LPORT)
        assert server.next_peer()[:2] == (lab.alice_public, LPORT)
        b = lab.whoami("bob", lab.wan_ip, server.port, local_port=LPORT + 1)
        assert (b.local_ip, b.seen_ip, b.seen_port) == (lab.bob_ip, lab.bob_public, LPORT + 1)
        assert server.next_peer()[:2] == (lab.bob_public, LPORT + 1)
        b = lab.whoami("bob", lab.wan_ip, server.port, local_port=LPORT)
        assert b.seen_ip == lab.bob_public and b.seen_port != LPORT, b

        # natA silently drops what nobody inside asked for (as in "drop"): a timeout, not
        # a refusal, even on a port that bob has just used (LPORT + 1).
        assert _dial(lab, "wan", lab.bob_public, LPORT + 1) == "timeout"

        # bob announces LPORT + 2 as learnt from the server, then listens there.
        b = lab.whoami("bob", lab.wan_ip, server.port, local_port=LPORT + 2)
        assert (b.seen_ip, b.seen_port) == (lab.bob_public, LPORT + 2)
        listener = lab.popen(
            "bob",
            [sys.executable, "-c", LISTENER, str(LPORT + 2), "2"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert listener.stdout is not None and listener.stdout.readline() == "ready\n"
        # The LAN is direct: alice dialling bob's own address reaches his listener.
        assert _dial(lab, "alice", lab.bob_ip, LPORT + 2) == "connected"
        assert listener.stdout.readline() == f"accepted {lab.alice_ip}\n"
        # No hairpin: alice dialling bob's public address and port reaches natA itself,
        # which has no listener there and refuses; bob's listener sees nothing more.
        assert _dial(lab, "alice", lab.bob_public, LPORT + 2) == "ECONNREFUSED"
        listener.wait(timeout=10)
        assert listener.stdout.read() == ""
        listener.stdout.close()
    assert _leftover(lab.prefix) == []


def test_set_nat_symmetric_to_port_preserving_and_back() -> None:
    with NatLab("symmetric") as lab:
        server = lab.whoami_server("wan")
        port = server.port

        # Symmetric: a fixed local port is not kept.
        sym = lab.whoami("alice", lab.wan_ip, port, local_port=LPORT)
        assert sym.local_port == LPORT and sym.seen_ip == lab.alice_public
        assert sym.seen_port != LPORT, sym
        assert server.next_peer()[:2] == (lab.alice_public, sym.seen_port)

        # A connection open across the switch, and a SYN left half-open (SYN_SENT, to natB,
        # which drops it) from another fixed port.
        held = lab.popen(
            "alice",
            [sys.executable, "-c", HELD, lab.wan_ip, str(port), str(LPORT + 1)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert held.stdout is not None and held.stdout.readline() == "connected\n"
        syn = [sys.executable, "-c", SYN_ONLY, lab.bob_public, "5000", str(LPORT + 2)]
        assert lab.run("alice", syn).stdout == "timeout\n"
        (half_open,) = _entries(lab, "natA", LPORT + 2)
        random_port = _public_port(half_open)
        assert "SYN_SENT" in half_open and random_port != LPORT + 2, half_open

        lab.set_nat("natA", random_fully=False)
        masq = lab.run("natA", ["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout
        assert "-A POSTROUTING -o wan0 -j MASQUERADE\n" in masq and "random" not in masq

        # A new connection, from the very local port that was randomised before (its
        # conntrack entry is in TIME_WAIT, which a new SYN replaces), keeps it now.
        pp = lab.whoami("alice", lab.wan_ip, port, local_port=LPORT)
        assert (pp.seen_ip, pp.seen_port) == (lab.alice_public, LPORT), pp
        assert server.next_peer()[:2] == (lab.alice_public, LPORT)

        # The held connection kept its random mapping and still works both ways.
        assert held.communicate("go\n", timeout=10)[0].split() == [
            lab.alice_public,
            str(server.next_peer().port),
        ]
        assert held.returncode == 0

        # The half-open one, retried from the same port, is the same conntrack connection
        # (still SYN_SENT): it keeps its random public port ...
        assert lab.run("alice", syn).stdout == "timeout\n"
        (retried,) = _entries(lab, "natA", LPORT + 2)
        assert "SYN_SENT" in retried and _public_port(retried) == random_port, retried
        # ... until conntrack forgets it; then the retry is mapped port-preserving.
        lab.flush_conntrack("natA")
        assert lab.conntrack("natA") == []
        assert lab.run("alice", syn).stdout == "timeout\n"
        (retried,) = _entries(lab, "natA", LPORT + 2)
        assert "SYN_SENT" in retried and _public_port(retried) == LPORT + 2, retried

        # And back: symmetric again for new connections.
        lab.set_nat("natA", random_fully=True)
        masq = lab.run("natA", ["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout
        assert "-A POSTROUTING -o wan0 -j MASQUERADE --random-fully\n" in masq
        again = lab.whoami("alice", lab.wan_ip, port, local_port=LPORT + 3)
        assert again.seen_port != LPORT + 3, again

        with pytest.raises(ValueError, match="not a NAT"):
            lab.set_nat("alice", random_fully=False)
    assert _leftover(lab.prefix) == []


def test_capture_sees_plaintext_on_its_interface_only() -> None:
    seen_a, seen_b = b"natlab-marker-ALICE-7f3a", b"natlab-marker-BOB-c41e"
    with NatLab("drop") as lab:
        server = lab.whoami_server("wan")
        with (
            lab.capture("natA", "wan0") as nat_a,
            lab.capture("wan", "natA") as leg_a,
            lab.capture("natB", "wan0") as nat_b,
        ):
            with pytest.raises(NatLabError, match="still running"):
                nat_a.data()
            lab.whoami("alice", lab.wan_ip, server.port, local_port=LPORT, payload=seen_a)
            lab.whoami("bob", lab.wan_ip, server.port, local_port=LPORT, payload=seen_b)
            assert server.next_peer().received == len(seen_a)
            assert server.next_peer().received == len(seen_b)

        for cap in (nat_a, leg_a, nat_b):
            assert cap.packets >= 6 and cap.dropped == 0, cap.packets  # 3 in, >= 3 out
            assert len(cap.frames) == cap.packets
            assert len(cap.data()) == sum(len(f) for _, f in cap.frames)
        # alice's marker crossed natA's WAN link (both ends of the veth), never natB's ...
        assert seen_a in nat_a.data() and seen_a in leg_a.data() and seen_a in nat_a
        assert seen_a not in nat_b.data()
        # ... and bob's, natB's only.
        assert seen_b in nat_b.data()
        assert seen_b not in nat_a.data() and seen_b not in leg_a.data()
        # Translated on natA's wan0: the public address is there, alice's private one not.
        assert bytes([10, 99, 0, 1]) in nat_a.data()
        assert bytes([192, 168, 1, 2]) not in nat_a.data()
        # Frames natA sent (pkttype 4) and frames sent to it (0) are both there.
        assert {4, 0} <= {kind for kind, _ in nat_a.frames}

        with pytest.raises(NatLabError, match="did not start"), lab.capture("natA", "nosuch0"):
            pass
    assert _leftover(lab.prefix) == []


def _pids(lab: NatLab, host: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", lab.ns(host)], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_capture_ended_on_failure_and_by_close() -> None:
    with pytest.raises(RuntimeError, match="boom"), NatLab("drop") as lab:
        with lab.capture("natA", "wan0") as cap:
            (pid,) = _pids(lab, "natA")
            raise RuntimeError("boom")
    assert cap.done and not os.path.exists(f"/proc/{pid}")
    assert _leftover(lab.prefix) == []

    # A capture whose with block never ended (its generator not finalised) is ended by the
    # lab's close().
    with NatLab("drop") as lab:
        unfinished = lab.capture("natA", "wan0")
        cap = unfinished.__enter__()
        (pid,) = _pids(lab, "natA")
    assert cap.done and not os.path.exists(f"/proc/{pid}")
    del unfinished
    assert _leftover(lab.prefix) == []


@pytest.mark.skipif(impair_available() is not None, reason=f"{impair_available()}")
def test_whoami_through_impaired_wan() -> None:
    # A server at wan_ip behind the delay line: every packet of the connection, not only its
    # SYN, must reach it (the routed wan turns early demux off for this).
    with NatLab("same-nat", impair="loss 5% delay 20ms seed 3") as lab:
        server = lab.whoami_server("wan")
        got = lab.whoami("bob", lab.wan_ip, server.port, local_port=LPORT, payload=bytes(30000))
        assert (got.seen_ip, got.seen_port) == (lab.bob_public, LPORT)
        assert server.next_peer() == (lab.bob_public, LPORT, 30000)
        with pytest.raises(CommandError, match="refused"):
            lab.whoami("alice", lab.wan_ip, 9)  # nothing listens there
    assert _leftover(lab.prefix) == []
