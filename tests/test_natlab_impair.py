"""The impaired WAN and the cut link of tests/natlab.py, proved with plain sockets.

``NatLab("drop", impair="loss 5% delay 40ms")`` must give alice and bob, both behind NAT
routers that silently drop unsolicited SYNs, a path of about 80 ms round trip with about 5%
loss each way that TCP simultaneous open still punches through; ``impair()`` must change it
mid-session (jitter reorders); ``cut_wan``/``restore_wan`` must cut a router off and let the
same connection carry on afterwards.  No project code is used: these test the lab itself.
"""

from __future__ import annotations

import json
import queue
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.natlab import Impairment, NatLab, impair_available, natlab_available

_reason = natlab_available()
if _reason:
    pytest.skip(f"NatLab unavailable: {_reason}", allow_module_level=True)

needs_impair = pytest.mark.skipif(
    impair_available() is not None, reason=f"NatLab impairment unavailable: {impair_available()}"
)

UDP_PORT = 40200
TCP_PORT = 40201
SPEC = "loss 5% delay 40ms seed 1"

# UDP, both ends: say hello until the peer is heard (that punches both NATs), then "send"
# streams COUNT numbered, timestamped datagrams at RATE per second and collects their echoes;
# "reflect" echoes each one and counts what arrived, and how much of it out of order.
# argv: role local_port peer_host peer_port count rate
UDP_PROBE = r"""
import json, select, socket, struct, sys, time
role, lport, rhost, rport, count, rate = sys.argv[1:7]
count, rate, peer = int(count), float(rate), (rhost, int(rport))
HEAD = struct.Struct("!cId")
PAD = bytes(200 - HEAD.size)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
s.bind(("0.0.0.0", int(lport)))
s.setblocking(False)

def drain():
    got = []  # (datagram, when it was read)
    while True:
        try:
            got.append((s.recv(2048), time.monotonic()))
        except BlockingIOError:
            return got

hello = HEAD.pack(b"H", 0, 0.0) + PAD
deadline = time.monotonic() + 20
heard = []
while not heard:
    if time.monotonic() > deadline:
        sys.exit("never heard from the peer")
    s.sendto(hello, peer)
    select.select([s], [], [], 0.05)
    heard = drain()

if role == "reflect":
    seen, reordered, top, last = set(), 0, -1, None
    pending = heard
    while True:
        for d, _ in pending:
            kind, seq, _ = HEAD.unpack_from(d)
            if kind == b"H":
                s.sendto(hello, peer)  # the sender may not have heard us yet
                continue
            s.sendto(d, peer)
            reordered += seq < top
            top = max(top, seq)
            seen.add(seq)
            last = time.monotonic()
        if last is not None and time.monotonic() - last > 1.2:
            break
        if time.monotonic() > deadline + 30:
            break
        select.select([s], [], [], 0.2)
        pending = drain()
    print(json.dumps({"received": len(seen), "reordered": reordered}))
else:
    rtts, echoed = [], set()
    def collect():
        for d, now in drain():
            kind, seq, sent = HEAD.unpack_from(d)
            if kind == b"D" and seq not in echoed:
                echoed.add(seq)
                rtts.append((now - sent) * 1e3)
    start = time.monotonic()
    for seq in range(count):
        due = start + seq / rate
        while (wait := due - time.monotonic()) > 0:
            select.select([s], [], [], wait)
            collect()
        s.sendto(HEAD.pack(b"D", seq, time.monotonic()) + PAD, peer)
    end = time.monotonic() + 0.6
    while (wait := end - time.monotonic()) > 0:
        select.select([s], [], [], wait)
        collect()
    print(json.dumps({"sent": count, "echoed": len(echoed), "rtt_ms": rtts}))
"""

# TCP simultaneous open: both ends bind the same port (SO_REUSEADDR/SO_REUSEPORT) and keep
# connecting to the other's public address until one attempt meets the other's.
PUNCH = r"""
import errno, socket, sys, time
def punch(lport, rhost, rport, budget=20.0):
    deadline = time.monotonic() + budget
    errors = {}
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("0.0.0.0", lport))
        s.settimeout(min(2.0, max(0.1, deadline - time.monotonic())))
        try:
            s.connect((rhost, rport))
        except OSError as e:
            key = errno.errorcode.get(e.errno, type(e).__name__)
            errors[key] = errors.get(key, 0) + 1
            s.close()
            time.sleep(0.05)
            continue
        s.settimeout(60)
        print(f"punched errors={errors}", file=sys.stderr, flush=True)
        return s
    sys.exit(f"gave up punching, errors={errors}")
"""

# argv: role(send|receive) local_port peer_host peer_port nbytes
TCP_TRANSFER = (
    PUNCH
    + r"""
import hashlib, json, random
role, lport, rhost, rport, nbytes = sys.argv[1:6]
conn = punch(int(lport), rhost, int(rport))
t0 = time.monotonic()
if role == "send":
    data = random.Random(7).randbytes(int(nbytes))
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    theirs = conn.makefile("rb").readline().decode().strip()
    mine = hashlib.sha256(data).hexdigest()
    print(json.dumps({"sha": mine, "peer_sha": theirs, "seconds": time.monotonic() - t0}))
else:
    h, n = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 16):
        h.update(chunk)
        n += len(chunk)
    seconds = time.monotonic() - t0
    conn.sendall((h.hexdigest() + "\n").encode())
    print(json.dumps({"sha": h.hexdigest(), "bytes": n, "seconds": seconds}))
conn.close()
"""
)

# argv: role(drive|echo) local_port peer_host peer_port.  "drive" sends each stdin line and
# prints "recv LINE" for each line that comes back; "echo" sends every line back.
TCP_ECHO = (
    PUNCH
    + r"""
import threading
role, lport, rhost, rport = sys.argv[1:5]
conn = punch(int(lport), rhost, int(rport))
conn.settimeout(None)
if role == "echo":
    for line in conn.makefile("rb"):
        conn.sendall(line)
else:
    def show():
        for line in conn.makefile("rb"):
            print("recv", line.decode().strip(), flush=True)
    threading.Thread(target=show, daemon=True).start()
    print("connected", flush=True)
    for line in sys.stdin:
        conn.sendall(line.encode())
conn.close()
"""
)

# A TCP connect to HOST:9 from inside a namespace: "open" if it was answered (a refusal is an
# answer), "silent" if it timed out.  argv: host timeout
CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=float(sys.argv[2])).close()
    print("open")
except ConnectionRefusedError:
    print("open")
except OSError:
    print("silent")
"""


# The median TCP connect time to HOST:9, in ms (a refusal is an answer).  argv: host
CONNECT_TIME = r"""
import socket, statistics, sys, time
times = []
for _ in range(7):
    t = time.monotonic()
    try:
        socket.create_connection((sys.argv[1], 9), timeout=3).close()
    except ConnectionRefusedError:
        pass
    times.append((time.monotonic() - t) * 1e3)
print(statistics.median(times))
"""


def _leftover(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(prefix + "-")]


def _both(
    lab: NatLab, script: str, roles: dict[str, list[str]], timeout: float
) -> dict[str, dict[str, Any]]:
    """Run ``script`` in alice and bob at once (alice dials bob's public address and bob
    alice's) with per-host role args; return each one's JSON line, failing on a bad exit."""
    peers = {"alice": lab.bob_public, "bob": lab.alice_public}
    procs = {}
    for host, (role, port, *rest) in roles.items():
        argv = [sys.executable, "-c", script, role, port, peers[host], port, *rest]
        procs[host] = lab.popen(
            host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results = {}
    for host, p in procs.items():
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"{host} exited {p.returncode}: {err.strip()}"
        results[host] = json.loads(out.strip().splitlines()[-1])
    return results


def _udp_probe(lab: NatLab, count: int, rate: float) -> tuple[dict[str, Any], dict[str, Any]]:
    port, n = str(UDP_PORT), str(count)
    res = _both(
        lab,
        UDP_PROBE,
        {"alice": ["send", port, n, str(rate)], "bob": ["reflect", port, n, str(rate)]},
        timeout=60,
    )
    return res["alice"], res["bob"]


@pytest.fixture(scope="module")
def impaired() -> Iterator[NatLab]:
    """One impaired "drop" lab for the measurements (each leaves it as it found it)."""
    if reason := impair_available():
        pytest.skip(f"NatLab impairment unavailable: {reason}")
    with NatLab("drop", impair=SPEC) as lab:
        yield lab
    print(f"\n{SPEC}: {lab.impair_log}")
    assert _leftover(lab.prefix) == []


def test_impairment_parse() -> None:
    imp = Impairment.parse("loss 5% delay 40ms")
    assert (imp.delay_ms, imp.loss_percent, imp.jitter_ms, imp.seed) == (40, 5, 0, None)
    imp = Impairment.parse("delay 0.04s 10ms loss random 2.5 reorder 25% seed 9")
    assert imp == Impairment(
        delay_ms=40, jitter_ms=10, loss_percent=2.5, reorder_percent=25, seed=9
    )
    assert Impairment.parse(str(imp)) == imp
    assert not Impairment.parse("none").active and not Impairment.parse("").active
    assert imp.delayline_args() == [
        "--delay-ms", "40", "--jitter-ms", "10", "--loss-percent", "2.5",
        "--reorder-percent", "25", "--seed", "9",
    ]  # fmt: skip
    for bad in ("delay 40", "loss 120%", "lossy 5%", "delay -1ms"):
        with pytest.raises(ValueError):
            Impairment.parse(bad)
    with pytest.raises(ValueError, match="same-lan"):
        NatLab("same-lan", impair=SPEC)


@needs_impair
def test_rtt_and_loss_each_way(impaired: NatLab) -> None:
    alice, bob = _udp_probe(impaired, count=3000, rate=3000)
    rtt = statistics.median(alice["rtt_ms"])
    loss_there = 1 - bob["received"] / alice["sent"]
    loss_back = 1 - alice["echoed"] / bob["received"]
    print(
        f"\nUDP echo, {alice['sent']} datagrams: RTT median {rtt:.1f} ms "
        f"(min {min(alice['rtt_ms']):.1f}, max {max(alice['rtt_ms']):.1f}); "
        f"loss alice->bob {loss_there:.2%}, bob->alice {loss_back:.2%}"
    )
    assert 70 <= rtt <= 200
    assert min(alice["rtt_ms"]) >= 78  # 40 ms each way, never less
    assert 0.02 <= loss_there <= 0.10
    assert 0.02 <= loss_back <= 0.10
    assert bob["reordered"] == 0  # a constant delay keeps the order


@needs_impair
def test_tcp_punch_and_transfer_intact(impaired: NatLab) -> None:
    # 5% loss each way at 80 ms caps loss-based congestion control (cubic, reno) near 80 kB/s
    # (3 MiB: ~40 s); BBR, which ignores random loss, moves 3 MiB in a few seconds.
    cc = impaired.run("alice", ["cat", "/proc/sys/net/ipv4/tcp_congestion_control"]).stdout
    nbytes = 3 << 20 if cc.strip() == "bbr" else 1 << 20
    port = str(TCP_PORT)
    res = _both(
        impaired,
        TCP_TRANSFER,
        {"alice": ["send", port, str(nbytes)], "bob": ["receive", port, str(nbytes)]},
        timeout=90,
    )
    alice, bob = res["alice"], res["bob"]
    print(
        f"\nTCP ({cc.strip()}) {nbytes >> 20} MiB alice->bob through two NATs, {SPEC}: "
        f"{bob['seconds']:.1f} s, {nbytes / bob['seconds'] / 1e3:.0f} kB/s"
    )
    assert bob["bytes"] == nbytes
    assert alice["sha"] == bob["sha"] == alice["peer_sha"]


@needs_impair
def test_routed_wan_impaired_mid_session() -> None:
    """impair="none" routes without impairing; impair() then adds jitter, which reorders."""
    with NatLab("drop", impair="none") as lab:
        assert lab.routed_wan and not lab.impairment.active
        alice, bob = _udp_probe(lab, count=500, rate=2000)
        assert alice["echoed"] == bob["received"] == 500
        assert statistics.median(alice["rtt_ms"]) < 20
        assert lab.run("alice", [sys.executable, "-c", CONNECT, str(lab.wan_ip), "2"]).stdout == (
            "open\n"
        )
        lab.impair("delay 20ms 10ms seed 3")
        assert lab.impairment == Impairment(delay_ms=20, jitter_ms=10, seed=3)
        alice, bob = _udp_probe(lab, count=1000, rate=4000)
        rtt = statistics.median(alice["rtt_ms"])
        print(f"\ndelay 20ms 10ms: RTT median {rtt:.1f} ms, {bob['reordered']} of 1000 reordered")
        assert 30 <= rtt <= 80
        assert alice["echoed"] == bob["received"] == 1000
        assert bob["reordered"] > 50
        # The wan server is impaired on the way in only, as by netem on the NATs' wan0.
        argv = [sys.executable, "-c", CONNECT_TIME, str(lab.wan_ip)]
        to_server = float(lab.run("alice", argv).stdout)
        assert 8 <= to_server <= 45, to_server
        lab.impair(None)
        assert not lab.impairment.active
        alice, _ = _udp_probe(lab, count=200, rate=2000)
        assert statistics.median(alice["rtt_ms"]) < 20
    assert len(lab.impair_log) == 1 and "reordered" in lab.impair_log[0], lab.impair_log
    assert _leftover(lab.prefix) == []


def test_bridged_lab_cannot_be_impaired() -> None:
    with NatLab("drop") as lab:
        assert not lab.routed_wan
        with pytest.raises(RuntimeError, match="bridge"):
            lab.impair("delay 40ms")
    assert _leftover(lab.prefix) == []


class _Lines:
    """Lines of a process's stdout, read by a thread, so the test can wait with a timeout."""

    def __init__(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        self._stdout = p.stdout
        self._q: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stdout:
            self._q.put(line.strip())

    def next(self, timeout: float) -> str | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """After the process has ended: the reader sees EOF, then the pipe is closed."""
        self._thread.join(timeout=5)
        self._stdout.close()


@pytest.mark.parametrize("impair", [None, "delay 10ms"], ids=["bridged", "routed"])
def test_cut_and_restore_wan(impair: str | None) -> None:
    if impair is not None and (reason := impair_available()):
        pytest.skip(f"NatLab impairment unavailable: {reason}")
    port = str(TCP_PORT)
    with NatLab("drop", impair=impair) as lab:
        echo = lab.popen(
            "bob",
            [sys.executable, "-c", TCP_ECHO, "echo", port, lab.alice_public, port],
            stderr=subprocess.DEVNULL,
        )
        drive = lab.popen(
            "alice",
            [sys.executable, "-c", TCP_ECHO, "drive", port, lab.bob_public, port],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert drive.stdin is not None
        lines = _Lines(drive)

        def say(word: str) -> None:
            assert drive.stdin is not None
            drive.stdin.write(word + "\n")
            drive.stdin.flush()

        def reach(host: str) -> str:
            argv = [sys.executable, "-c", CONNECT, str(lab.wan_ip), "1"]
            return lab.run(host, argv).stdout.strip()

        assert lines.next(25) == "connected"
        say("one")
        assert lines.next(5) == "recv one"

        lab.cut_wan("natA")
        lab.cut_wan("natA")  # idempotent
        say("two")
        assert reach("alice") == "silent"  # forwarded traffic
        assert reach("natA") == "silent"  # the router's own
        assert lines.next(0.1) is None  # nothing through natA, either way, for 2 s
        rules = lab.run("natA", ["iptables", "-S"]).stdout
        assert rules.count("natlab-cut-wan") == 4, rules

        lab.restore_wan("natA")
        lab.restore_wan("natA")  # idempotent
        assert "natlab-cut-wan" not in lab.run("natA", ["iptables", "-S"]).stdout
        # The same connection carries on: TCP retransmits "two", the NAT mapping held.
        assert lines.next(15) == "recv two"
        say("three")
        assert lines.next(5) == "recv three"
        assert reach("alice") == "open" and reach("natA") == "open"

        drive.stdin.close()
        assert drive.wait(timeout=10) == 0
        assert echo.wait(timeout=10) == 0
        lines.close()
    assert _leftover(lab.prefix) == []
