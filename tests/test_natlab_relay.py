"""Acceptance tests of the relay (issue 11) through real NAT routers (see tests/natlab.py).

A ``tete-tunnel relay`` runs in the lab's wan namespace (10.99.0.254, a "public server");
the peers only ever name the relay and a code: no addresses, no ports of the other side.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import SERVERS, Proc, Procs, wait_for_text
from tests.natlab import NatLab, natlab_available
from tete_tunnel import rendezvous as rv

reason = natlab_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"NAT lab unavailable: {reason}")

RELAY_PORT = 54320  # the relay's default port
PORT_A, PORT_B = 40001, 40002
MiB = 1 << 20
STATS = re.compile(
    r"relay stopped: (\d+) connections, (\d+) pairs, (\d+) relayed, (\d+) bytes relayed"
)


def in_ns(lab: NatLab, host: str) -> list[str]:
    return lab.exec_argv(host, [])


def new_code() -> str:
    """A code whose secret part is unique, so a capture can look for it."""
    return f"{secrets.randbelow(900) + 100}-{secrets.token_hex(6)}-{secrets.token_hex(6)}"


def start_relay(lab: NatLab, procs: Procs, *args: str) -> Proc:
    relay = procs.start(["relay", *args], prefix=in_ns(lab, "wan"), name="relay")
    wait_for_text(relay.err_path, "relay listening on", 15)
    return relay


def stop_relay(relay: Proc) -> dict[str, int]:
    """SIGTERM the relay; its closing statistics."""
    relay.signal(signal.SIGTERM)
    assert relay.wait(15) == 0, relay.err
    match = STATS.search(relay.err)
    assert match, relay.err
    names = ("connections", "pairs", "relayed", "bytes")
    return dict(zip(names, map(int, match.groups()), strict=True))


def peer(
    lab: NatLab, procs: Procs, tmp: Path, host: str, args: list[str], data: bytes | None = None
) -> Proc:
    """``pipe`` (or what ``args`` start with) in ``host``, with its own identity."""
    return procs.start(
        [*args, "--identity", str(tmp / host), "-v"],
        stdin=data,
        prefix=in_ns(lab, host),
        name=host,
    )


def pipe_args(via: str, code: str | None, lport: int) -> list[str]:
    return ["pipe", "--via", via, *(["--code", code] if code else []), "--lport", str(lport)]


def our_id(proc: Proc) -> str:
    match = re.search(r"our ID: (\S+)", proc.err)
    assert match, proc.err
    return match.group(1)


def assert_paired(a: Proc, b: Proc, path: str) -> None:
    """Both logged the same path, and each learnt the other's ID (to pin next time)."""
    for me, other in ((a, b), (b, a)):
        assert f"Connected to peer! ({path})" in me.err, me.err
        peer_id = our_id(other)
        assert f"peer ID: {peer_id} (pin it next time with --peer-id {peer_id})" in me.err
        assert "Traceback" not in me.err


def connected_to(proc: Proc) -> str:
    """The far end of a direct link (logged with -v)."""
    match = re.search(r"connected by (?:dialing|accepting) (\S+)", proc.err)
    assert match, proc.err
    return match.group(1)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_direct_through_port_preserving_nats(procs: Procs, tmp_path: Path) -> None:
    """Both NATs port-preserving: the relay only introduces the peers, who punch directly.
    Nobody typed an address: only the relay and a code."""
    data_a, data_b = os.urandom(8 * MiB), os.urandom(8 * MiB)
    code = new_code()
    with NatLab("drop") as lab:
        relay = start_relay(lab, procs, "--listen", f"{lab.wan_ip}:{RELAY_PORT}")
        via = f"{lab.wan_ip}:{RELAY_PORT}"
        a = peer(lab, procs, tmp_path, "alice", pipe_args(via, code, PORT_A), data_a)
        b = peer(lab, procs, tmp_path, "bob", pipe_args(via, code, PORT_B), data_b)
        assert a.wait(60) == 0, a.err
        assert b.wait(60) == 0, b.err
        stats = stop_relay(relay)
    assert sha(a.out) == sha(data_b)
    assert sha(b.out) == sha(data_a)
    assert_paired(a, b, "direct")
    # the relay saw each through its NAT, with the local port kept; it relayed nothing
    assert f"the relay {via} sees us as {lab.alice_public}:{PORT_A}" in a.err
    assert f"the relay {via} sees us as {lab.bob_public}:{PORT_B}" in b.err
    # ... and the link runs straight between the two NATs' public addresses
    assert connected_to(a) == f"{lab.bob_public}:{PORT_B}"
    assert connected_to(b) == f"{lab.alice_public}:{PORT_A}"
    assert stats["pairs"] == 1 and stats["relayed"] == 0 and stats["bytes"] == 0, stats


def test_relayed_through_symmetric_nats_is_ciphertext(procs: Procs, tmp_path: Path) -> None:
    """Both NATs symmetric: no direct path, so the relay splices the two connections.

    Everything alice sends and receives crosses natA's WAN interface; a capture there holds
    neither the plaintext marker repeated inside both data streams nor the code's secret
    part, while a marker sent in plaintext during the same capture is found (the control
    that makes the absence mean something).  Relay and peers use the default port.
    """
    marker = b"MARKER-" + secrets.token_hex(8).encode()
    control = b"CONTROL-" + secrets.token_hex(8).encode()

    def marked() -> bytes:
        chunks = [os.urandom(4096 - len(marker)) + marker for _ in range(8 * MiB // 4096)]
        return b"".join(chunks)

    data_a, data_b = marked(), marked()
    assert data_a.count(marker) == 8 * MiB // 4096
    code = new_code()
    with NatLab("symmetric") as lab:
        relay = start_relay(lab, procs)  # default: all addresses, port 54320
        via = lab.wan_ip  # default port
        whoami = lab.whoami_server("wan", 0)
        wan_if = lab.wan_if("natA")
        with lab.capture("natA", wan_if) as cap:
            a = peer(lab, procs, tmp_path, "alice", pipe_args(via, code, PORT_A), data_a)
            b = peer(lab, procs, tmp_path, "bob", pipe_args(via, code, PORT_B), data_b)
            assert a.wait(60) == 0, a.err
            assert b.wait(60) == 0, b.err
            lab.whoami("alice", lab.wan_ip, whoami.port, payload=control)
        stats = stop_relay(relay)
    assert sha(a.out) == sha(data_b)
    assert sha(b.out) == sha(data_a)
    assert_paired(a, b, f"relayed via {lab.wan_ip}:{RELAY_PORT}")
    captured = cap.data()
    assert len(captured) > 16 * MiB  # both 8 MiB directions crossed natA's WAN side
    assert control in cap  # the capture does see plaintext
    assert marker not in captured
    assert code.split("-", 1)[1].encode() not in captured
    assert stats["pairs"] == 1 and stats["relayed"] == 1, stats
    assert stats["bytes"] >= 16 * MiB, stats


def test_same_nat_peers_meet_on_their_lan(procs: Procs, tmp_path: Path) -> None:
    """Alice and bob behind one NAT (no hairpin): the relay gives each the other's LAN
    address too, and they connect directly over the LAN; nothing is relayed."""
    data_a, data_b = os.urandom(4 * MiB), os.urandom(4 * MiB)
    code = new_code()
    with NatLab("same-nat") as lab:
        relay = start_relay(lab, procs, "--listen", f"{lab.wan_ip}:{RELAY_PORT}")
        via = f"{lab.wan_ip}:{RELAY_PORT}"
        a = peer(lab, procs, tmp_path, "alice", pipe_args(via, code, PORT_A), data_a)
        b = peer(lab, procs, tmp_path, "bob", pipe_args(via, code, PORT_B), data_b)
        assert a.wait(60) == 0, a.err
        assert b.wait(60) == 0, b.err
        stats = stop_relay(relay)
    assert sha(a.out) == sha(data_b)
    assert sha(b.out) == sha(data_a)
    assert_paired(a, b, "direct")
    # over the LAN, between the peers' own addresses (natA does not hairpin)
    assert connected_to(a) == f"{lab.bob_ip}:{PORT_B}"
    assert connected_to(b) == f"{lab.alice_ip}:{PORT_A}"
    assert stats["pairs"] == 1 and stats["relayed"] == 0, stats


def test_whoami_via_relay_prints_the_nat_public_address(procs: Procs, tmp_path: Path) -> None:
    """whoami inside alice's LAN prints natA's public address, not 192.168.x; the port is
    --lport on a port-preserving NAT, and another one once the NAT is made symmetric."""

    def whoami(lab: NatLab, name: str, *args: str) -> str:
        p = procs.start(
            ["whoami", "--via", f"{lab.wan_ip}:{RELAY_PORT}", *args],
            prefix=in_ns(lab, "alice"),
            name=name,
        )
        assert p.wait(30) == 0, p.err
        return p.out.decode().strip().splitlines()[-1]

    with NatLab("drop") as lab:
        relay = start_relay(lab, procs, "--listen", f"{lab.wan_ip}:{RELAY_PORT}")
        assert whoami(lab, "who1", "--lport", "40777") == f"{lab.alice_public}:40777"
        assert whoami(lab, "who2") == f"{lab.alice_public}:54312"  # the default --lport
        lab.set_nat("natA", random_fully=True)
        seen = whoami(lab, "who3", "--lport", "40778")
        stop_relay(relay)
    ip, port = seen.rsplit(":", 1)
    assert ip == lab.alice_public
    assert port != "40778"  # the symmetric NAT picked its own port, and whoami says so


@pytest.mark.parametrize(("kind", "path"), [("drop", "direct"), ("symmetric", "relayed")])
def test_generated_code(kind: str, path: str, procs: Procs, tmp_path: Path) -> None:
    """Alice gives only the relay: it hands out a code, which bob types; they connect
    (directly, or through the relay when the NATs are symmetric)."""
    data_a, data_b = os.urandom(2 * MiB), os.urandom(2 * MiB)
    with NatLab(kind) as lab:
        relay = start_relay(lab, procs, "--listen", f"{lab.wan_ip}:{RELAY_PORT}")
        via = f"{lab.wan_ip}:{RELAY_PORT}"
        a = peer(lab, procs, tmp_path, "alice", pipe_args(via, None, PORT_A), data_a)
        said = wait_for_text(a.err_path, "on the other side, type:", 15)
        match = re.search(r"your code: (\S+)", said)
        assert match, said
        code = match.group(1)
        assert re.fullmatch(r"\d+-[a-z]+-[a-z]+", code), code
        wanted = rf"on the other side, type: .*pipe --via {re.escape(via)} --code {code}$"
        assert re.search(wanted, said, re.M), said
        b = peer(lab, procs, tmp_path, "bob", pipe_args(via, code, PORT_B), data_b)
        assert a.wait(60) == 0, a.err
        assert b.wait(60) == 0, b.err
        stats = stop_relay(relay)
    assert sha(a.out) == sha(data_b)
    assert sha(b.out) == sha(data_a)
    assert_paired(a, b, "direct" if path == "direct" else f"relayed via {via}")
    assert stats["pairs"] == 1, stats
    assert stats["relayed"] == (path == "relayed"), stats


def relay_connections(lab: NatLab, host: str) -> list[dict[str, int]]:
    """``host``'s established connections to the relay, from ``ss``: local port, bytes
    waiting to be read, bytes sent (and acknowledged), bytes received."""
    argv = ["ss", "-Htin", "state", "established", "dst", f"{lab.wan_ip}:{RELAY_PORT}"]
    out = lab.run(host, argv).stdout.strip()
    conns = []
    for entry in re.split(r"\n(?=\S)", out) if out else []:  # an address line, an info line
        recv_q, _, local, _ = entry.split()[:4]
        info = dict(re.findall(r"bytes_(acked|received):(\d+)", entry))
        conns.append(
            {
                "lport": int(local.rsplit(":", 1)[1]),
                "recv_q": int(recv_q),
                "sent": int(info.get("acked", 0)),
                "received": int(info.get("received", 0)),
            }
        )
    return conns


def relayed_links(lab: NatLab) -> list[str]:
    """The peers' connections to the relay that carried over 1 MiB: the spliced ones (the
    others are small control connections)."""
    return [
        f"{host}: {conn}"
        for host in ("alice", "bob")
        for conn in relay_connections(lab, host)
        if max(conn["sent"], conn["received"]) > MiB
    ]


# Reads an HTTP/1.0 download from 127.0.0.1:PORT slowly (about 0.8 MB/s) until the file GO
# exists, then at full speed; prints "started", "at-go N" and finally "N SHA256".
SLOW_GET = r"""
import hashlib, os, socket, sys, time
port, go = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port), timeout=60)
s.sendall(b"GET /big HTTP/1.0\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit(f"no response header: {head!r}")
    head += chunk
head, _, body = head.partition(b"\r\n\r\n")
if not head.startswith(b"HTTP/1.0 200"):
    sys.exit(f"bad response: {head!r}")
digest, n = hashlib.sha256(body), len(body)
print("started", flush=True)
while not os.path.exists(go):
    chunk = s.recv(16384)
    if not chunk:
        break
    digest.update(chunk)
    n += len(chunk)
    time.sleep(0.02)
print("at-go", n, flush=True)
while chunk := s.recv(1 << 20):
    digest.update(chunk)
    n += len(chunk)
print(n, digest.hexdigest(), flush=True)
"""


def set_both_nats(lab: NatLab, *, random_fully: bool) -> None:
    """Both NATs symmetric or port-preserving; the conntrack entries of connections between
    the two (old punch attempts, a direct link) are forgotten, so their next packets are
    mapped afresh, while the relay connections keep their mappings."""
    for nat in ("natA", "natB"):
        lab.set_nat(nat, random_fully=random_fully)
    lab.forget_flows("natA", lab.bob_public)
    lab.forget_flows("natB", lab.alice_public)


def serve_file(lab: NatLab, procs: Procs, path: Path) -> tuple[Proc, int]:
    """An HTTP server for one file in bob's namespace: the process and its port."""
    srv = procs.start(
        ["http", "0", str(path)], command=SERVERS, prefix=in_ns(lab, "bob"), name=f"srv-{path.name}"
    )
    return srv, int(wait_for_text(srv.out_path, "ready", 15).split()[1])


def fetch_in_alice(lab: NatLab, procs: Procs, name: str, url: str, n: int = 1) -> list[str]:
    """`n` downloads of `url` in alice's namespace: the SHA-256 of each."""
    p = procs.start(["fetch", url, str(n)], command=SERVERS, prefix=in_ns(lab, "alice"), name=name)
    assert p.wait(60) == 0, p.err
    return p.out.decode().split()


def test_relayed_forward_upgrades_to_direct(procs: Procs, tmp_path: Path) -> None:
    """A forward that had to be relayed moves to a direct path once one exists.

    Both NATs start symmetric (relayed), then BOTH are made port-preserving: flipping only
    one is not enough, because Linux MASQUERADE filters inbound by address and port, so a
    symmetric NAT on one side can never be punched from the other (measured: no upgrade in
    30 s).  The old punch attempts' conntrack entries (SYN_SENT, refreshed by each retry,
    holding their random mappings for 120 s) are forgotten so the next attempt is mapped
    afresh; the relay connections keep theirs.

    A slow download started before the flip must finish intact after the upgrade: an old
    stream finishes on the relayed link (which stays open for it, then closes; the relay
    counts all of its bytes), while downloads after the upgrade take the direct path (the
    relay counts none of theirs).
    """
    small, big = os.urandom(4 * MiB), os.urandom(48 * MiB)
    (tmp_path / "small").write_bytes(small)
    (tmp_path / "big").write_bytes(big)
    go = tmp_path / "go"
    code = new_code()
    with NatLab("drop") as lab:
        set_both_nats(lab, random_fully=True)
        relay = start_relay(
            lab, procs, "--listen", f"{lab.wan_ip}:{RELAY_PORT}", "--upgrade-interval", "8"
        )
        via = f"{lab.wan_ip}:{RELAY_PORT}"
        (srv_small, port_small), (srv_big, port_big) = (
            serve_file(lab, procs, tmp_path / n) for n in ("small", "big")
        )
        fwd = ["forward", "--via", via, "--code", code]
        tunnels = ["-L", f"8080:127.0.0.1:{port_small}", "-L", f"8081:127.0.0.1:{port_big}"]
        a = peer(lab, procs, tmp_path, "alice", [*fwd, "--lport", str(PORT_A), *tunnels])
        b = peer(lab, procs, tmp_path, "bob", [*fwd, "--lport", str(PORT_B)])
        relayed = f"Connected to peer! (relayed via {via})"
        wait_for_text(a.err_path, relayed, 30)
        wait_for_text(b.err_path, relayed, 30)
        wait_for_text(a.out_path, "Forwarding 127.0.0.1:8081", 15)

        def fetch(name: str, n: int) -> list[str]:
            return fetch_in_alice(lab, procs, name, "http://127.0.0.1:8080/small", n)

        assert fetch("fetch-relayed", 1) == [sha(small)]
        assert len(relayed_links(lab)) == 2  # alice's and bob's, spliced
        slow = procs.start(
            [],
            command=[sys.executable, "-c", SLOW_GET, "8081", str(go)],
            prefix=in_ns(lab, "alice"),
            name="slow",
        )
        wait_for_text(slow.out_path, "started", 15)

        set_both_nats(lab, random_fully=False)
        wait_for_text(a.err_path, "Upgraded to a direct connection", 25)
        wait_for_text(b.err_path, "Upgraded to a direct connection", 10)
        assert len(relayed_links(lab)) == 2  # still carrying the slow download
        go.touch()
        assert slow.wait(60) == 0, slow.err
        assert fetch("fetch-direct", 3) == [sha(small)] * 3
        # its last stream done, the relayed link is retired: closed on both sides
        deadline = time.monotonic() + 10
        while held := relayed_links(lab):
            assert time.monotonic() < deadline, f"relayed links still open: {held}"
            time.sleep(0.2)
        for p in (a, b):
            p.signal(signal.SIGINT)
        for p in (a, b):
            assert p.wait(15) == 0, p.err
        stats = stop_relay(relay)
        for srv in (srv_small, srv_big):
            srv.signal(signal.SIGTERM)
            srv.wait(10)
    at_go, done = slow.out.decode().splitlines()[1:]
    # the old stream was still far from done at the switch, and finished intact
    assert int(at_go.split()[1]) < len(big) // 2, at_go
    assert done.split() == [str(len(big)), sha(big)]
    for p in (a, b):
        assert "Upgraded to a direct connection" in p.err
        assert p.err.count("Connected to peer!") == 1
        assert "Traceback" not in p.err
    assert stats["relayed"] == 1, stats
    # what crossed the relay: the first download and the whole slow one, not the last three
    before = len(small) + len(big)
    assert before <= stats["bytes"] < before + 3 * len(small) // 2, stats


def test_an_upgraded_forward_falls_back_to_the_relay(procs: Procs, tmp_path: Path) -> None:
    """After the upgrade, the direct path dies (both NATs turn symmetric again and forget
    the direct connection's mapping, so its packets come from ports the other NAT drops):
    keepalive declares the link dead, forward reconnects through the relay (as pinned IDs
    now: a direct attempt, then relayed), and -L works again, with no restart."""
    small = os.urandom(2 * MiB)
    (tmp_path / "small").write_bytes(small)
    code = new_code()
    with NatLab("drop") as lab:
        set_both_nats(lab, random_fully=True)
        relay = start_relay(
            lab, procs, "--listen", f"{lab.wan_ip}:{RELAY_PORT}", "--upgrade-interval", "4"
        )
        via = f"{lab.wan_ip}:{RELAY_PORT}"
        srv, port = serve_file(lab, procs, tmp_path / "small")
        fwd = ["forward", "--via", via, "--code", code]
        fwd += ["--keepalive-interval", "1", "--keepalive-timeout", "4"]
        a = peer(
            lab,
            procs,
            tmp_path,
            "alice",
            [*fwd, "--lport", str(PORT_A), "-L", f"8080:127.0.0.1:{port}"],
        )
        b = peer(lab, procs, tmp_path, "bob", [*fwd, "--lport", str(PORT_B)])
        relayed = f"Connected to peer! (relayed via {via})"
        wait_for_text(a.err_path, relayed, 30)
        wait_for_text(b.err_path, relayed, 30)
        wait_for_text(a.out_path, "Forwarding 127.0.0.1:8080", 15)

        def fetch(name: str) -> list[str]:
            return fetch_in_alice(lab, procs, name, "http://127.0.0.1:8080/small")

        set_both_nats(lab, random_fully=False)
        wait_for_text(a.err_path, "Upgraded to a direct connection", 25)
        assert fetch("fetch-direct") == [sha(small)]

        set_both_nats(lab, random_fully=True)  # the direct link's mapping is forgotten too
        started = time.monotonic()
        poll("a second relayed link", lambda: a.err.count(relayed) >= 2, 40)
        poll("a second relayed link", lambda: b.err.count(relayed) >= 2, 10)
        fell_back = time.monotonic() - started
        assert fetch("fetch-relayed-again") == [sha(small)]
        for p in (a, b):
            p.signal(signal.SIGINT)
        for p in (a, b):
            assert p.wait(15) == 0, p.err
        stats = stop_relay(relay)
        srv.signal(signal.SIGTERM)
        srv.wait(10)
    print(f"\nfell back to the relay {fell_back:.1f} s after the direct path died")
    for p in (a, b):
        err = p.err
        assert "Reconnecting (connection to peer lost" in err, err
        assert err.index("Upgraded to a direct connection") < err.index("Reconnecting"), err
        assert err.count(relayed) == 2 and "Traceback" not in err, err
    assert stats["relayed"] == 2, stats


def poll(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Wait for ``check()``; a RuntimeError (not an AssertionError) if it never holds, for
    a test setup that did not come about."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def test_relayed_handshake_right_behind_go(procs: Procs, tmp_path: Path) -> None:
    """The peer's first bytes may arrive together with the relay's go: they belong to the
    handshake, and the relayed pairing must work the first time.

    Made deterministic: bob's data connection to the relay is held back (natB drops its
    SYNs), so alice's waits at the relay for go; alice is then stopped (SIGSTOP), bob let
    through: the relay sends go to both and splices, bob reads go and sends his HELLO, which
    queues in alice's socket right behind go; then alice continues.
    """
    data_a, data_b = os.urandom(MiB), os.urandom(MiB)
    code = new_code()
    go_size = len(rv.encode({"op": "go"}))
    with NatLab("symmetric") as lab:
        relay = start_relay(lab, procs, "--listen", f"{lab.wan_ip}:{RELAY_PORT}")
        via = f"{lab.wan_ip}:{RELAY_PORT}"
        # bob's data connection (from any port but his --lport, which is his control's)
        hold = ["FORWARD", "-s", lab.bob_ip, "-d", lab.wan_ip, "-p", "tcp", "--syn"]
        hold += ["--dport", str(RELAY_PORT), "!", "--sport", str(PORT_B), "-j", "DROP"]
        lab.run("natB", ["iptables", "-I", *hold])
        a = peer(lab, procs, tmp_path, "alice", pipe_args(via, code, PORT_A), data_a)
        b = peer(lab, procs, tmp_path, "bob", pipe_args(via, code, PORT_B), data_b)

        def alice_data() -> dict[str, int] | None:
            conns = [c for c in relay_connections(lab, "alice") if c["lport"] != PORT_A]
            return conns[0] if conns else None

        # her splice request has reached the relay (bob's SYN retries for 5 s: be quick)
        poll(
            "alice's data connection at the relay",
            lambda: bool((alice_data() or {}).get("sent")),
            20,
        )
        a.signal(signal.SIGSTOP)
        try:
            lab.run("natB", ["iptables", "-D", *hold])
            poll(
                "bob's HELLO queued behind go for alice",
                lambda: (alice_data() or {}).get("recv_q", 0) > go_size,
                10,
            )
        finally:
            a.signal(signal.SIGCONT)
        assert a.wait(60) == 0, a.err
        assert b.wait(60) == 0, b.err
        stats = stop_relay(relay)
    for p in (a, b):
        assert "meeting the peer at the relay again" not in p.err, p.err
    assert stats["pairs"] == 1 and stats["relayed"] == 1, stats
    assert sha(a.out) == sha(data_b)
    assert sha(b.out) == sha(data_a)
    assert_paired(a, b, f"relayed via {via}")
