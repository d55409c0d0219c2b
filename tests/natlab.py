"""Real NAT routers built from Linux network namespaces and iptables, for pytest.

Hole punching can only be tested honestly when real NAT state machines sit between the
peers, so this module builds them on one machine (see /work/shared/NATLAB.md):

    alice (192.168.1.2) --- natA [192.168.1.1 | 10.99.0.1] ---+
                                                   wan: bridge br0, 10.99.0.254
    bob   (192.168.2.2) --- natB [192.168.2.1 | 10.99.0.2] ---+

Every veth is created directly inside its namespaces (``ip -n NS link add ... peer ...
netns OTHER``), so nothing is ever created in, or changed on, the host's own network
namespace.  Interfaces are named by role: ``lan0``/``wan0`` on hosts and NATs, and on a
bridge namespace each leg is named after the host it leads to (``natA``, ``natB``, ``bob``).

Usage::

    with NatLab("drop") as lab:
        p = lab.popen("alice", [sys.executable, "-c", "..."], stdout=subprocess.PIPE)
        lab.run("natA", ["iptables", "-L", "-n"])

An impaired WAN (``loss 5% delay 40ms`` each way, optionally jitter and reordering)::

    with NatLab("drop", impair="loss 5% delay 40ms seed 1") as lab:
        ...                                  # alice <-> bob: ~80 ms RTT, 5% loss each way
        lab.impair("delay 40ms 10ms")        # change it mid-session (or None: unimpaired)

This kernel has no sch_netem, so the impairment is benchmarks/delayline.py, a userspace line
on a TUN device (standard library only; see its docstring), which also draws the loss (seeded,
per wire packet; why not iptables ``statistic`` is told there).  Where the line runs matters:
conntrack binds a connection's NAT at its first POSTROUTING, so a packet sent off through a
TUN device inside a NAT namespace and brought back in would pass the NAT's hooks twice.  So
an impaired lab replaces the wan bridge with a *routed* wan namespace and runs the line there,
as the line was designed (``--iif`` on every WAN leg), and the NAT namespaces are left exactly
as in an unimpaired lab (MASQUERADE, conntrack and TCP simultaneous open work unchanged):

    natA wan0 10.99.0.1/24 --- [natA] wan [natB] --- 10.99.0.2/24 wan0 natB
                                   lo: 10.99.0.254/32, TUN dly0

The public addresses stay those of the bridged lab: the wan namespace holds host routes
(``10.99.0.1 dev natA``, ...) and answers ARP for the far side by proxy ARP (with
``proxy_delay`` 0), so each NAT still sees one /24 on its wan0 and needs no route change.
A policy rule per leg (``iif natA lookup 100``, table 100 ``default dev dly0``) sends every
packet arriving from a NAT through the line once, so each direction alice->bob and bob->alice
gets the delay and loss once, as ``netem`` on both NATs' wan0 would give.  The local rule is
moved after those rules, so packets *to* the wan namespace's own address (a relay or
rendezvous server at ``wan_ip``) are impaired once on the way in and not on the way out --
again what netem on the NATs' wan0 would do.  The line is started only once the lab has
verified its plumbing, and close() ends it with everything else; its summaries (packets
forwarded, lost, reordered) are kept in ``impair_log``.  The other workable place, a line in
alice's and bob's own namespaces for their locally generated traffic (``iif lo`` -> TUN), was
not built: it needs forwarding, ``accept_local`` and ``rp_filter`` changes in the end hosts and
two lines instead of one; the routed wan keeps end hosts and NATs untouched.  Labs built
without ``impair`` keep the bridge (``routed_wan`` is False): exactly what they always were.

``lab.cut_wan("natA")`` / ``lab.restore_wan("natA")`` cut one router's WAN link mid-session
and restore it (DROP rules in filter FORWARD, INPUT and OUTPUT for its wan0; conntrack keeps
seeing, and keeping, the flows), for dead-peer tests; they work with or without impairment.

Kind "same-nat": alice and bob on one LAN behind one NAT (a LAN bridge in a namespace "lan";
natA as in "drop": port-preserving MASQUERADE, unsolicited inbound silently dropped)::

    alice (192.168.1.2) ---+
                           lan: bridge br0 --- natA [192.168.1.1 | 10.99.0.1] --- wan 10.99.0.254
    bob   (192.168.1.3) ---+

``alice_public`` and ``bob_public`` are both 10.99.0.1.  natA does NOT hairpin: nothing
translates a packet from the LAN to natA's own public address back to the LAN, so alice
dialling ``bob_public:port`` reaches natA itself, which has no listener there and answers
RST (ECONNREFUSED), whatever mapping bob holds on that port.  (Hairpinning with iptables
needs a DNAT rule per forwarded port; a lab wanting one adds its own.)  Peers behind one
NAT must therefore meet on their LAN addresses, or through a relay at ``wan_ip``.

Run-time facilities for relay and rendezvous tests (see their docstrings):

- ``lab.set_nat("natA", random_fully=False)``: switch a NAT between port-preserving and
  symmetric mid-test; ``lab.flush_conntrack("natA")`` forgets its existing mappings.
- ``with lab.capture("natA", "wan0") as cap: ...``, then ``cap.data()``: every frame that
  crossed an interface (AF_PACKET, no tcpdump), to assert a marker never went by in plaintext.
- ``lab.whoami_server("wan", port)`` and ``lab.whoami("alice", lab.wan_ip, port,
  local_port=...)``: the source address a server on the WAN sees for a client.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import itertools
import os
import re
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

__all__ = [
    "KINDS",
    "Capture",
    "CommandError",
    "Impairment",
    "NatLab",
    "NatLabError",
    "Peer",
    "Whoami",
    "WhoamiServer",
    "impair_available",
    "natlab_available",
    "netem_available",
]

Kind = Literal["drop", "rst", "symmetric", "no-nat", "same-lan", "same-nat"]
KINDS: tuple[str, ...] = ("drop", "rst", "symmetric", "no-nat", "same-lan", "same-nat")

WAN_NET = "10.99.0"
#: Address of the wan namespace itself: a "public server" for relays/rendezvous.
WAN_SERVER_IP = f"{WAN_NET}.254"

#: The userspace delay/loss line an impaired lab runs in its wan namespace.
DELAYLINE = Path(__file__).resolve().parent.parent / "benchmarks" / "delayline.py"
#: Policy rule priorities in a routed wan: the delay line's rules, then the local rule.
_LINE_RULE_PREF = 1000
_LOCAL_RULE_PREF = 32000
#: The tag on cut_wan()'s DROP rules, so restore_wan() deletes those and only those.
_CUT_TAG = "natlab-cut-wan"
#: cut_wan()'s rules: (chain, interface match) for the router's wan0.
_CUT_RULES = (("FORWARD", "-i"), ("FORWARD", "-o"), ("INPUT", "-i"), ("OUTPUT", "-o"))

_counter = itertools.count()
_live: set[NatLab] = set()

# Connects to each HOST:PORT; a refusal (RST) proves the path works both ways just as well
# as an accept does, so no listener is needed.  Only a timeout/unreachable is a failure.
_PROBE = r"""
import socket, sys
bad = []
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        pass
    except OSError as e:
        bad.append(f"{target}: {e!r}")
if bad:
    sys.exit("unreachable: " + "; ".join(bad))
"""


# capture(): every frame on one interface (both directions) to stdout, each as a record
# "!IB" (length, packet type: 4 = sent by this host) + frame.  The socket is opened with
# protocol 0 (it receives nothing) and only then bound to the interface for ETH_P_ALL, so no
# frame of another interface slips in.  "ready" on stderr once bound; SIGTERM: drain what
# the kernel has queued, report "captured N dropped D" on stderr, exit 0.
# argv: ifname
_CAPTURE = r"""
import select, signal, socket, struct, sys
ETH_P_ALL, SOL_PACKET, PACKET_STATISTICS, SO_RCVBUFFORCE = 3, 263, 6, 33
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
try:
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 25)
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 25)
s.bind((sys.argv[1], ETH_P_ALL))
s.setblocking(False)
out = sys.stdout.buffer
buf = bytearray(1 << 20)  # larger than any GSO/GRO super-frame
head = struct.Struct("!IB")
count = dropped = 0
sys.stderr.write("ready\n")
sys.stderr.flush()

def drain():
    global count, dropped
    while True:
        try:
            n, addr = s.recvfrom_into(buf)
        except BlockingIOError:
            break
        out.write(head.pack(n, addr[2]))
        out.write(buf[:n])
        count += 1
    dropped += struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]

while not stop:
    select.select([s], [], [], 0.1)
    drain()
drain()
out.flush()
sys.stderr.write(f"captured {count} dropped {dropped}\n")
"""

# whoami_server(): for each connection read a "!I"-length-prefixed payload, answer the
# client's address as seen here ("IP PORT\n"), close (the server closes first, so no
# TIME_WAIT is left on the client, which may reuse its local port at once), then print
# "IP PORT NBYTES" on stdout (NBYTES -1 if the client misbehaved).  "ready PORT" first.
# argv: bind_ip port
_WHOAMI_SERVER = r"""
import socket, struct, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=64)
print("ready", srv.getsockname()[1], flush=True)
lock = threading.Lock()

def read(f, n):
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data

def serve(conn, peer):
    got = -1
    with conn:
        try:
            conn.settimeout(10)
            f = conn.makefile("rb")
            got = len(read(f, struct.unpack("!I", read(f, 4))[0]))
            conn.sendall(f"{peer[0]} {peer[1]}\n".encode())
        except (OSError, EOFError, struct.error):
            pass
    with lock:
        print(peer[0], peer[1], got, flush=True)

while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

# whoami(): connect (from a fixed local port if nonzero), send a payload, print
# "LOCAL_IP LOCAL_PORT SEEN_IP SEEN_PORT".  argv: ip port local_port payload_hex timeout
_WHOAMI_CLIENT = r"""
import socket, struct, sys
ip, port, lport, payload, timeout = sys.argv[1:]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if int(lport):
    s.bind(("0.0.0.0", int(lport)))
s.settimeout(float(timeout))
s.connect((ip, int(port)))
local = s.getsockname()
data = bytes.fromhex(payload)
s.sendall(struct.pack("!I", len(data)) + data)
reply = b""
while chunk := s.recv(4096):
    reply += chunk
s.close()
seen = reply.decode().split()
if len(seen) != 2:
    sys.exit(f"server answered {reply!r}")
print(local[0], local[1], *seen)
"""

# flush_conntrack(): ctnetlink IPCTNL_MSG_CT_DELETE without a tuple = flush the table.
_CT_FLUSH = r"""
import os, socket, struct, sys
NETLINK_NETFILTER, NLMSG_ERROR = 12, 2
msg_type = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
body = struct.pack("!BBH", socket.AF_UNSPEC, 0, 0)  # nfgenmsg: every family
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
s.bind((0, 0))
s.send(struct.pack("=IHHII", 16 + len(body), msg_type, 1 | 4, 1, 0) + body)  # REQUEST|ACK
reply = s.recv(65536)
_, typ = struct.unpack_from("=IH", reply)
err = struct.unpack_from("=i", reply, 16)[0] if typ == NLMSG_ERROR else 0
if err:
    sys.exit(f"conntrack flush failed: {os.strerror(-err)}")
"""

# forget_flows(): delete the TCP entries whose original destination is argv[1], each by its
# tuple (ctnetlink IPCTNL_MSG_CT_DELETE with CTA_TUPLE_ORIG); prints how many went.
_CT_FORGET = r"""
import os, socket, struct, sys
NETLINK_NETFILTER, NLMSG_ERROR, NESTED = 12, 2, 0x8000
msg_type = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE

def attr(kind, payload):
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + bytes(-len(payload) % 4)

def tuple_of(src, dst, sport, dport):
    ip = attr(1, socket.inet_aton(src)) + attr(2, socket.inet_aton(dst))
    ports = attr(2, struct.pack("!H", sport)) + attr(3, struct.pack("!H", dport))
    proto = attr(1, bytes([6])) + ports
    return attr(1 | NESTED, attr(1 | NESTED, ip) + attr(2 | NESTED, proto))

s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
s.bind((0, 0))
gone = 0
for seq, line in enumerate(open("/proc/net/nf_conntrack"), 1):
    words = line.split()
    if len(words) < 4 or words[2] != "tcp":
        continue
    fields = {}
    for w in words:
        k, eq, v = w.partition("=")
        if eq and k not in fields:  # the first of each: the original direction
            fields[k] = v
    if fields.get("dst") != sys.argv[1]:
        continue
    body = struct.pack("!BBH", socket.AF_INET, 0, 0) + tuple_of(
        fields["src"], fields["dst"], int(fields["sport"]), int(fields["dport"])
    )
    s.send(struct.pack("=IHHII", 16 + len(body), msg_type, 1 | 4, seq, 0) + body)
    reply = s.recv(65536)
    _, typ = struct.unpack_from("=IH", reply)
    err = struct.unpack_from("=i", reply, 16)[0] if typ == NLMSG_ERROR else 0
    if err and -err != 2:  # ENOENT: gone by itself meanwhile
        sys.exit(f"conntrack delete failed: {os.strerror(-err)}")
    gone += not err
print(gone)
"""


class NatLabError(RuntimeError):
    """The lab could not be built, used or torn down."""


class Whoami(NamedTuple):
    """What whoami() learnt: the client's own address, and the one the server saw."""

    local_ip: str
    local_port: int
    seen_ip: str
    seen_port: int


class Peer(NamedTuple):
    """One connection a WhoamiServer served: its source address and the bytes it sent."""

    ip: str
    port: int
    received: int  # -1 when the client did not send a complete payload


def _read_until_newline(fd: int, buf: bytearray, deadline: float) -> bytes | None:
    """Read from a pipe until ``buf`` holds a line; pop and return it, None on EOF/timeout."""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


class WhoamiServer:
    """A TCP server in a lab namespace that tells each client the source address it sees.

    Made by NatLab.whoami_server(); clients are NatLab.whoami() or any socket that sends a
    4-byte big-endian length and that many bytes, then reads ``"IP PORT\\n"`` until EOF.
    ``ip``/``port``: where to reach it; ``next_peer()``: the next connection it served.
    The lab ends it on close(); ``stop()`` ends it sooner.
    """

    def __init__(self, lab: NatLab, host: str, ip: str, port: int, bind: str) -> None:
        self.host, self.ip = host, ip
        self._lab = lab
        self._buf = bytearray()
        self._err = tempfile.TemporaryFile()  # a file, not a pipe: nothing can block on it
        try:
            self._proc = p = lab.popen(
                host,
                [sys.executable, "-c", _WHOAMI_SERVER, bind, str(port)],
                stdout=subprocess.PIPE,
                stderr=self._err,
            )
        except BaseException:
            self._err.close()
            raise
        lab._closers.append(self.stop)
        assert p.stdout is not None
        line = _read_until_newline(p.stdout.fileno(), self._buf, time.monotonic() + 10)
        if line is None or not line.startswith(b"ready "):
            err = self.stop()
            raise NatLabError(f"whoami server in {host} did not start: {err}")
        self.port = int(line.split()[1])

    def next_peer(self, timeout: float = 10) -> Peer:
        """The next connection served (in the order they finished); NatLabError on timeout."""
        stdout = self._proc.stdout
        line = None
        if stdout is not None and not stdout.closed:
            line = _read_until_newline(stdout.fileno(), self._buf, time.monotonic() + timeout)
        if line is None:
            raise NatLabError(f"whoami server in {self.host}: no connection within {timeout}s")
        ip, port, got = line.decode().split()
        return Peer(ip, int(port), int(got))

    def stop(self) -> str:
        """End the server now (idempotent); return what it wrote on stderr."""
        p = self._proc
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if p.stdout is not None:
            p.stdout.close()
        if p in self._lab._procs:
            self._lab._procs.remove(p)
        if self._err.closed:
            return ""
        self._err.seek(0)
        err = self._err.read().decode(errors="replace").strip()
        self._err.close()
        return err


class Capture:
    """Frames captured on one interface of a lab namespace by NatLab.capture().

    After the ``with`` block: ``packets`` (frames captured), ``frames`` (``(pkttype, bytes)``
    each, Ethernet header on; pkttype as in linux/if_packet.h: 0 to this namespace, 1
    broadcast, 2 multicast, 3 to another host, 4 sent by it), ``data()`` (every frame's bytes
    concatenated).  ``dropped`` is what the kernel dropped
    for a full buffer; capture() raises if that is not 0, so an absence stays a proof.
    """

    def __init__(self, host: str, ifname: str) -> None:
        self.host, self.ifname = host, ifname
        self.packets = 0
        self.dropped = 0
        self.frames: list[tuple[int, bytes]] = []
        self.done = False

    def data(self) -> bytes:
        """All captured bytes, frame after frame (only once the capture has ended)."""
        if not self.done:
            raise NatLabError("capture still running: read data() after its with block")
        return b"".join(frame for _, frame in self.frames)

    def __contains__(self, marker: bytes) -> bool:
        """``marker in cap``: whether one captured frame holds the marker whole."""
        return any(marker in frame for _, frame in self.frames)

    def _load(self, raw: bytes) -> None:
        head = struct.Struct("!IB")
        pos = 0
        while pos + head.size <= len(raw):
            n, kind = head.unpack_from(raw, pos)
            pos += head.size
            self.frames.append((kind, raw[pos : pos + n]))
            pos += n
        self.packets = len(self.frames)


class CommandError(subprocess.CalledProcessError, NatLabError):
    """A command failed; unlike CalledProcessError its message includes stderr."""

    def __str__(self) -> str:
        cmd = shlex.join(str(a) for a in self.cmd)
        err = (self.stderr or "").strip() if isinstance(self.stderr, str) else self.stderr
        return f"command {cmd!r} exited {self.returncode}: {err or '(no stderr)'}"


def _ip() -> str:
    return shutil.which("ip") or "ip"


def _check(argv: Sequence[str], *, timeout: float = 30, input: str | None = None) -> str:
    """Run argv, raise CommandError (with stderr) on failure, return stdout."""
    cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if cp.returncode != 0:
        raise CommandError(cp.returncode, list(argv), cp.stdout, cp.stderr)
    return cp.stdout


@functools.cache
def natlab_available() -> str | None:
    """Return None if NAT labs can be built here, else a human reason to skip.

    Probes for real (a namespace with a veth and a nat table) because containers often
    have the binaries but lack the privileges or kernel features.
    """
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "ip (iproute2) not found"
    if shutil.which("iptables") is None:
        return "iptables not found"
    name = f"tt{os.getpid()}-probe"
    try:
        _check([_ip(), "netns", "add", name])
    except (OSError, subprocess.SubprocessError) as e:
        return f"ip netns not available: {e}"
    try:
        _check([_ip(), "-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0"])
        _check([_ip(), "netns", "exec", name, "iptables", "-t", "nat", "-L", "-n"])
    except (OSError, subprocess.SubprocessError) as e:
        return f"namespace networking not usable: {e}"
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _check([_ip(), "netns", "del", name])
    return None


@functools.cache
def netem_available() -> str | None:
    """Return None if ``tc ... netem`` works here, else a reason to skip delay/loss tests.

    Many kernels (and most container hosts) ship without the sch_netem module.
    """
    reason = natlab_available()
    if reason:
        return reason
    if shutil.which("tc") is None:
        return "tc (iproute2) not found"
    name = f"tt{os.getpid()}-netem"
    try:
        _check([_ip(), "netns", "add", name])
        _check([_ip(), "-n", name, "link", "set", "lo", "up"])
        tc = "tc qdisc replace dev lo root netem delay 1ms".split()
        _check([_ip(), "netns", "exec", name, *tc])
    except (OSError, subprocess.SubprocessError) as e:
        return f"netem not available: {e}"
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _check([_ip(), "netns", "del", name])
    return None


@functools.cache
def impair_available() -> str | None:
    """Return None if NatLab(..., impair=...) works here, else a reason to skip."""
    reason = natlab_available()
    if reason:
        return reason
    if not DELAYLINE.is_file():
        return f"{DELAYLINE} not found"
    try:  # opening creates no device (that needs TUNSETIFF), so the host is left alone
        os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return f"/dev/net/tun not usable: {e}"
    return None


_TIME = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(us|ms|s)$")
_PERCENT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)%?$")


@dataclasses.dataclass(frozen=True)
class Impairment:
    """How the WAN treats each packet, each way: netem's ``delay``/``loss``/``reorder``.

    ``Impairment.parse("loss 5% delay 40ms")``; all zero (``parse("none")``) is no impairment.
    """

    delay_ms: float = 0.0
    loss_percent: float = 0.0
    jitter_ms: float = 0.0
    reorder_percent: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"negative delay or jitter in {self}")
        for p in (self.loss_percent, self.reorder_percent):
            if not 0 <= p <= 100:
                raise ValueError(f"percentage {p} out of 0..100 in {self}")

    @property
    def active(self) -> bool:
        """Whether packets need the line at all (else plain routing)."""
        return bool(self.delay_ms or self.loss_percent or self.jitter_ms or self.reorder_percent)

    @classmethod
    def parse(cls, spec: str) -> Impairment:
        """Parse netem-like words: ``delay 40ms [10ms]``, ``jitter 10ms``, ``loss [random] 5%``,
        ``reorder 25%``, ``seed 7``; ``none`` or "" for nothing.  Times need a unit (us/ms/s).
        """
        fields: dict[str, Any] = {}
        words = spec.split()

        def take(what: str, pattern: re.Pattern[str]) -> re.Match[str]:
            if not words or not (m := pattern.match(words[0])):
                got = repr(words[0]) if words else "nothing"
                raise ValueError(f"impairment {spec!r}: expected {what}, got {got}")
            words.pop(0)
            return m

        def ms(m: re.Match[str]) -> float:
            return float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m[2]]

        while words:
            word = words.pop(0).lower()
            if word == "none":
                continue
            if word == "delay":
                fields["delay_ms"] = ms(take("a time such as 40ms", _TIME))
                if words and _TIME.match(words[0]):
                    fields["jitter_ms"] = ms(take("a jitter", _TIME))
            elif word == "jitter":
                fields["jitter_ms"] = ms(take("a time such as 10ms", _TIME))
            elif word == "loss":
                if words and words[0].lower() == "random":
                    words.pop(0)
                fields["loss_percent"] = float(take("a percentage", _PERCENT)[1])
            elif word == "reorder":
                fields["reorder_percent"] = float(take("a percentage", _PERCENT)[1])
            elif word == "seed":
                fields["seed"] = int(take("an integer", re.compile(r"^\d+$"))[0])
            else:
                raise ValueError(
                    f"impairment {spec!r}: unknown word {word!r} "
                    "(known: delay, jitter, loss, reorder, seed, none)"
                )
        return cls(**fields)

    @classmethod
    def coerce(cls, spec: str | Impairment | None) -> Impairment:
        if spec is None:
            return cls()
        return spec if isinstance(spec, Impairment) else cls.parse(spec)

    def delayline_args(self) -> list[str]:
        """The options of benchmarks/delayline.py that give this impairment."""
        args = ["--delay-ms", f"{self.delay_ms:g}"]
        if self.jitter_ms:
            args += ["--jitter-ms", f"{self.jitter_ms:g}"]
        if self.loss_percent:
            args += ["--loss-percent", f"{self.loss_percent:g}"]
        if self.reorder_percent:
            args += ["--reorder-percent", f"{self.reorder_percent:g}"]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        return args

    def __str__(self) -> str:
        words = []
        if self.delay_ms or self.jitter_ms:
            words.append(
                f"delay {self.delay_ms:g}ms" + (f" {self.jitter_ms:g}ms" * bool(self.jitter_ms))
            )
        if self.loss_percent:
            words.append(f"loss {self.loss_percent:g}%")
        if self.reorder_percent:
            words.append(f"reorder {self.reorder_percent:g}%")
        if self.seed is not None:
            words.append(f"seed {self.seed}")
        return " ".join(words) or "none"


class NatLab:
    """A disposable NAT topology; a context manager that always tears itself down.

    Attributes: ``alice_ip``/``bob_ip`` (own addresses), ``alice_public``/``bob_public``
    (what the other side must dial), ``wan_ip`` (the wan namespace's own address, a place
    for a relay or rendezvous server; None for "same-lan"), ``prefix`` (unique namespace
    prefix), ``hosts`` (host names that exist in this kind), ``routed_wan`` (True when the
    wan namespace routes instead of bridging: whenever ``impair`` was given), ``impairment``
    (the current one; all zero for none), ``impair_log`` (the delay line's summaries, one per
    line ended).

    Kinds: "drop" (both NATs port-preserving, silently dropping unsolicited SYNs), "rst"
    (natB answers them RST), "symmetric" (both ``MASQUERADE --random-fully``), "no-nat" (bob
    on the WAN itself), "same-lan" (alice and bob on one LAN, no NAT, no WAN), "same-nat"
    (alice and bob on one LAN behind natA as in "drop", ``bob_ip`` 192.168.1.3, both public
    addresses natA's; natA does not hairpin: see the module docstring).

    ``impair``: a netem-like spec such as ``"loss 5% delay 40ms"`` (see Impairment.parse) or
    an Impairment; ``"none"`` gives a routed but unimpaired WAN that impair() can degrade
    later.  Not for "same-lan", which has no WAN.
    """

    def __init__(self, kind: Kind | str, impair: str | Impairment | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown NatLab kind {kind!r}; expected one of {KINDS}")
        if impair is not None and kind == "same-lan":
            raise ValueError("a 'same-lan' NatLab has no WAN to impair")
        self.routed_wan: bool = impair is not None
        self.impairment: Impairment = Impairment.coerce(impair)
        self.impair_log: list[str] = []
        self._line: subprocess.Popen[bytes] | None = None
        self._line_log: IO[bytes] | None = None
        self._cut: set[str] = set()
        self.kind: str = kind
        self.prefix: str = f"tt{os.getpid()}-{next(_counter)}"
        self.alice_ip = "192.168.1.2"
        self.alice_public = f"{WAN_NET}.1"
        self.bob_ip = "192.168.2.2"
        self.bob_public = f"{WAN_NET}.2"
        self.wan_ip: str | None = WAN_SERVER_IP
        self.hosts: tuple[str, ...] = ("alice", "natA", "wan", "natB", "bob")
        if kind == "no-nat":
            self.hosts = ("alice", "natA", "wan", "bob")
            self.bob_ip = self.bob_public = f"{WAN_NET}.3"
        elif kind == "same-lan":
            self.hosts = ("alice", "lan", "bob")
            self.bob_ip = self.bob_public = "192.168.1.3"
            self.alice_public = self.alice_ip
            self.wan_ip = None
        elif kind == "same-nat":
            self.hosts = ("alice", "lan", "natA", "wan", "bob")
            self.bob_ip = "192.168.1.3"
            self.bob_public = self.alice_public
        self._created: list[str] = []  # namespace names, in creation order
        self._procs: list[subprocess.Popen[Any]] = []
        # run by close() once the processes have ended: close their pipes and files
        self._closers: list[Callable[[], object]] = []
        self._ifaces: dict[str, set[str]] = {h: {"lo"} for h in self.hosts}
        self._closed = False

    # -- public API ------------------------------------------------------------------

    def ns(self, host: str) -> str:
        """Real namespace name of a host; ValueError if the host is not in this kind."""
        if host not in self.hosts:
            raise ValueError(
                f"host {host!r} does not exist in a {self.kind!r} NatLab "
                f"(hosts: {', '.join(self.hosts)})"
            )
        return f"{self.prefix}-{host}"

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside a host's namespace (for custom spawning)."""
        return [_ip(), "netns", "exec", self.ns(host), *map(str, argv)]

    def popen(
        self,
        host: str,
        argv: Sequence[str],
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start argv inside a host's namespace; the lab ends it on exit.

        ``ip netns exec`` execs in place, so the Popen's pid is the command's own pid.
        Extra keyword arguments (text=True, cwd=...) go to subprocess.Popen.
        """
        self._require_open()
        p = subprocess.Popen(
            self.exec_argv(host, argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            **kwargs,
        )
        self._procs.append(p)
        return p

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside a host's namespace, capturing text output.

        With check=True a failure raises CommandError (a CalledProcessError whose message
        includes stderr).
        """
        self._require_open()
        full = self.exec_argv(host, argv)
        cp = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        if check and cp.returncode != 0:
            raise CommandError(cp.returncode, full, cp.stdout, cp.stderr)
        return cp

    def wan_if(self, host: str) -> str:
        """Interface of a NAT (or of bob in "no-nat") that faces the WAN (bridge or router)."""
        self.ns(host)
        if "wan0" not in self._ifaces[host]:
            raise ValueError(f"host {host!r} has no WAN interface in a {self.kind!r} NatLab")
        return "wan0"

    def set_nat(self, host: str, *, random_fully: bool) -> None:
        """Switch NAT router ``host`` between port-preserving and symmetric, at run time.

        ``random_fully=False``: plain ``MASQUERADE`` (keeps the local port where it is free:
        endpoint-independent mapping, what punching needs); ``True``: ``MASQUERADE
        --random-fully`` (a random public port per connection: a "symmetric" NAT).  The rule
        is replaced in place (``iptables -R``, one transaction), so no packet ever leaves
        untranslated.  Nothing else on the router changes (its firewall stays as built).

        Existing connection-tracking entries keep their mappings: conntrack binds a
        connection's NAT once, at its first packet, so connections already open carry on
        through their old public port, and only connections conntrack sees as new get the
        new behaviour.  Beware what conntrack counts as new: a connection is its 5-tuple, and
        a SYN matching a live entry (a punching loop retrying from the same local port to
        the same peer: the entry stays SYN_SENT for up to 120 s, refreshed by every retry)
        is the *same* connection, keeping the old mapping however often it is retried; only
        an entry that reached TIME_WAIT or CLOSE is replaced by a SYN.  Call
        flush_conntrack(host) too when the next attempt must get the new behaviour whatever
        came before.
        """
        self._require_open()
        if not host.startswith("nat"):
            raise ValueError(f"set_nat: {host!r} is not a NAT router")
        ifname = self.wan_if(host)
        out = self.run(host, ["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout
        rules = [ln for ln in out.splitlines() if ln.startswith("-A ")]
        found = [i for i, ln in enumerate(rules, 1) if "MASQUERADE" in ln.split()]
        if len(found) != 1:
            raise NatLabError(f"set_nat({host!r}): expected one MASQUERADE rule, got {rules}")
        masq = ["-j", "MASQUERADE", *(["--random-fully"] if random_fully else [])]
        cmd = ["iptables", "-t", "nat", "-R", "POSTROUTING", str(found[0]), "-o", ifname]
        self.run(host, [*cmd, *masq])

    def flush_conntrack(self, host: str) -> None:
        """Delete every connection-tracking entry in ``host``'s namespace (its NAT table).

        Like a router reboot: new connections are mapped afresh, and so is the next packet of
        a connection already open (a mid-stream outbound ACK is picked up again, with a
        mapping that may differ; a reply arriving first from the WAN finds no mapping and is
        dropped by the firewall).  Done with ctnetlink directly: no conntrack(8) needed.
        """
        self._require_open()
        self.ns(host)
        self.run(host, [sys.executable, "-c", _CT_FLUSH])

    def forget_flows(self, host: str, dst_ip: str) -> int:
        """Delete ``host``'s connection-tracking entries of TCP connections to ``dst_ip``
        (IPv4, original direction) and return how many: the next SYN of such a connection is
        mapped afresh (after set_nat(), say), while every other connection keeps its mapping."""
        self._require_open()
        return int(self.run(host, [sys.executable, "-c", _CT_FORGET, dst_ip]).stdout)

    def conntrack(self, host: str) -> list[str]:
        """``host``'s connection-tracking entries, one line each (``/proc/net/nf_conntrack``)."""
        cp = self.run(host, ["cat", "/proc/net/nf_conntrack"], check=False)
        if cp.returncode != 0:
            raise NatLabError(f"conntrack({host!r}): {cp.stderr.strip()}")
        return cp.stdout.splitlines()

    @contextlib.contextmanager
    def capture(self, host: str, ifname: str) -> Iterator[Capture]:
        """Record every frame crossing ``ifname`` inside ``host``'s namespace, both ways.

        ``with lab.capture("natA", "wan0") as cap: ...``, then ``cap.data()`` (all bytes),
        ``cap.packets``, ``marker in cap`` (in one frame).  An AF_PACKET socket in a small
        script (no tcpdump); frames as the interface sees them, so on a NAT's wan0 after
        translation.  The block must end only once its traffic has been sent and answered:
        what the kernel queued by then is drained before the script ends.  Leaving the block
        ends the script (the lab ends it too, on close()); NatLabError if it failed or the
        kernel dropped frames.  A payload split over segments is split in the capture too:
        look for markers that fit one write of a small message.
        """
        self._require_open()
        self.ns(host)
        cap = Capture(host, ifname)
        out = tempfile.TemporaryFile()
        try:
            p = self.popen(
                host, [sys.executable, "-c", _CAPTURE, ifname], stdout=out, stderr=subprocess.PIPE
            )
        except BaseException:
            out.close()
            raise
        assert p.stderr is not None
        buf = bytearray()

        def stop() -> str:
            if cap.done:
                return ""
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            try:
                _, err = p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate(timeout=5)
            if p in self._procs:
                self._procs.remove(p)
            out.seek(0)
            cap._load(out.read())
            out.close()
            cap.done = True
            return (bytes(buf) + err).decode(errors="replace").strip()

        self._closers.append(stop)  # if the block never ends (see close())
        try:
            line = _read_until_newline(p.stderr.fileno(), buf, time.monotonic() + 10)
            if line != b"ready":
                raise NatLabError(
                    f"capture({host!r}, {ifname!r}) did not start: {(line or b'').decode()} "
                    f"{stop()}"
                )
            yield cap
        except BaseException:
            if not cap.done:
                with contextlib.suppress(Exception):
                    stop()
            raise
        said = stop()
        m = re.search(r"captured (\d+) dropped (\d+)$", said)
        if p.returncode != 0 or not m:
            raise NatLabError(f"capture({host!r}, {ifname!r}) failed ({p.returncode}): {said}")
        cap.dropped = int(m[2])
        if int(m[1]) != cap.packets:
            raise NatLabError(f"capture: {m[1]} frames captured, {cap.packets} stored")
        if cap.dropped:
            raise NatLabError(f"capture({host!r}, {ifname!r}): kernel dropped {cap.dropped}")

    def whoami_server(
        self, host: str = "wan", port: int = 0, *, bind: str = "0.0.0.0"
    ) -> WhoamiServer:
        """Start a TCP server in ``host`` that tells each client its source address as seen.

        ``port`` 0 picks a free one (``server.port``).  ``server.ip`` is ``wan_ip`` for
        "wan", else ``bind`` (pass the address to dial there).  ``server.next_peer()``:
        ``Peer(ip, port, received)`` of each connection served.  Use whoami() as client.
        """
        self._require_open()
        self.ns(host)
        ip = self.wan_ip if host == "wan" and self.wan_ip else bind
        return WhoamiServer(self, host, ip, port, bind)

    def whoami(
        self,
        host: str,
        ip: str,
        port: int,
        *,
        local_port: int = 0,
        payload: bytes = b"",
        timeout: float = 5,
    ) -> Whoami:
        """Connect from ``host`` to a WhoamiServer at ``ip:port`` and learn how it saw us.

        ``local_port``: bind the client there first (SO_REUSEADDR), to see whether the NAT
        kept it.  ``payload`` (small; it goes on the command line) is sent in one write, in
        plaintext.  The server closes first, so the client leaves no TIME_WAIT and may reuse
        ``local_port`` for the same server at once.  CommandError if the connection fails.
        """
        argv = [sys.executable, "-c", _WHOAMI_CLIENT, ip, str(port), str(local_port)]
        argv += [payload.hex(), str(timeout)]
        local_ip, lport, seen_ip, seen_port = self.run(
            host, argv, timeout=timeout + 10
        ).stdout.split()
        return Whoami(local_ip, int(lport), seen_ip, int(seen_port))

    def set_netem(self, host: str, ifname: str, spec: str) -> None:
        """Shape egress of one interface, e.g. ``set_netem("natA", "wan0", "delay 40ms")``.

        Needs the sch_netem kernel module; check netem_available() to skip cleanly.
        """
        tc = ["tc", "qdisc", "replace", "dev", ifname, "root", "netem", *shlex.split(spec)]
        self.run(host, tc)

    def impair(self, spec: str | Impairment | None) -> None:
        """Change the WAN's impairment mid-session: ``lab.impair("loss 5% delay 40ms")``.

        ``None`` (or ``"none"``) removes it.  The lab must have been built with a routed WAN
        (``NatLab(kind, impair=...)``, ``"none"`` will do).  The delay line is restarted, so
        packets it held at that moment are lost, as on a link that changes under load.
        """
        self._require_open()
        if not self.routed_wan:
            raise NatLabError(
                "this NatLab's WAN is a bridge; build it with NatLab(kind, impair=...) "
                "(impair='none' for a routed WAN that starts unimpaired)"
            )
        new = Impairment.coerce(spec)
        errors: list[str] = []
        self._stop_line(errors)
        if errors:
            raise NatLabError("; ".join(errors))
        self.impairment = new
        if new.active:
            self._start_line()

    def cut_wan(self, host: str) -> None:
        """Cut ``host``'s WAN link: DROP everything in or out of its wan0.

        Inserted first in filter FORWARD (both directions), INPUT and OUTPUT, so forwarded and
        the router's own traffic alike vanish silently, as when a cable is pulled; conntrack
        still sees each packet (and keeps its NAT mappings), nothing is unloaded.  Idempotent.
        """
        self._require_open()
        ifname = self.wan_if(host)
        if host in self._cut:
            return
        self._cut.add(host)  # before the rules: a half-done cut is still undone by restore
        for chain, match in _CUT_RULES:
            self.run(host, ["iptables", "-I", chain, "1", *self._cut_rule(match, ifname)])

    def restore_wan(self, host: str) -> None:
        """Undo cut_wan(host): delete exactly its DROP rules.  Idempotent."""
        self._require_open()
        ifname = self.wan_if(host)
        if host not in self._cut:
            return
        failed = []
        for chain, match in _CUT_RULES:
            cp = self.run(
                host, ["iptables", "-D", chain, *self._cut_rule(match, ifname)], check=False
            )
            if cp.returncode != 0:
                failed.append(f"{chain}: {cp.stderr.strip()}")
        self._cut.discard(host)
        if failed:
            raise NatLabError(f"restore_wan({host!r}): " + "; ".join(failed))

    @staticmethod
    def _cut_rule(match: str, ifname: str) -> list[str]:
        return [match, ifname, "-m", "comment", "--comment", _CUT_TAG, "-j", "DROP"]

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> NatLab:
        reason = natlab_available()
        if reason:
            raise NatLabError(f"NatLab not available: {reason}")
        if self.routed_wan and (reason := impair_available()):
            raise NatLabError(f"NatLab impairment not available: {reason}")
        _live.add(self)
        try:
            self._build()
            self._wait_carrier()
            self._verify()
            if self.impairment.active:  # after the checks, which loss could make flaky
                self._start_line()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as cleanup_error:  # never mask the test's own failure
            print(f"natlab: cleanup after failure also failed: {cleanup_error}", file=sys.stderr)

    def close(self) -> None:
        """End every process we started, then delete every namespace we created.

        Idempotent.  Tries every step even if one fails and raises NatLabError at the end
        listing what went wrong.
        """
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        errors: list[str] = []
        self._stop_line(errors)
        self._stop_procs(errors)
        for closer in self._closers:
            try:
                closer()
            except Exception as e:
                errors.append(f"{closer}: {e}")
        self._closers.clear()
        for name in reversed(self._created):
            self._kill_stragglers(name, errors)
        for name in reversed(self._created):
            try:
                _check([_ip(), "netns", "del", name])
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(str(e))
        self._created.clear()
        if errors:
            raise NatLabError("NatLab cleanup: " + "; ".join(errors))

    # -- internals -------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise NatLabError("this NatLab has been closed")

    def _stop_procs(self, errors: list[str]) -> None:
        """SIGTERM all, give them up to 5 s together, then SIGKILL the rest (by pid)."""
        running = [p for p in self._procs if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + 5
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    errors.append(f"pid {p.pid} survived SIGKILL")

    def _start_line(self) -> None:
        """Run delayline.py in the routed wan, every leg's packets through it; wait for ready."""
        legs = sorted(self._ifaces["wan"] - {"lo"})
        argv = [sys.executable, str(DELAYLINE), *self.impairment.delayline_args()]
        argv += ["--pref", str(_LINE_RULE_PREF)]
        for leg in legs:
            argv += ["--iif", leg]
        log = tempfile.TemporaryFile()  # closed by _stop_line
        self._line_log = log
        self._line = p = self.popen("wan", argv, stdout=subprocess.PIPE, stderr=log)
        assert p.stdout is not None
        said = b""
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 15
            while not said.endswith(b"\n") and (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    continue
                chunk = os.read(p.stdout.fileno(), 64)
                if not chunk:
                    break
                said += chunk
        p.stdout.close()
        if said != b"ready\n":
            errors: list[str] = []
            self._stop_line(errors)
            why = self.impair_log[-1] if self.impair_log else "; ".join(errors)
            raise NatLabError(f"delay line did not start (said {said!r}): {why}")

    def _stop_line(self, errors: list[str]) -> None:
        """End the delay line (SIGTERM: it deletes its rules) and keep its summary."""
        p, log = self._line, self._line_log
        self._line = self._line_log = None
        if p is None:
            if log is not None:
                log.close()
            return
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(timeout=5)
            errors.append("delay line ignored SIGTERM")
        if p in self._procs:
            self._procs.remove(p)
        if log is not None:
            log.seek(0)
            text = log.read().decode(errors="replace").strip()
            log.close()
            self.impair_log.append(text or f"(exit {p.returncode}, said nothing)")
            if p.returncode not in (0, -signal.SIGTERM):
                errors.append(f"delay line exited {p.returncode}: {text}")

    def _kill_stragglers(self, name: str, errors: list[str]) -> None:
        """SIGKILL processes left in our namespace that were not started via popen().

        A namespace with live processes outlives ``ip netns del`` (with its veths), so a
        tool spawned some other way must not be allowed to keep it alive.
        """
        try:
            pids = _check([_ip(), "netns", "pids", name]).split()
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(str(e))
            return
        for pid in pids:
            if int(pid) == os.getpid():
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def _sh(self, *argv: str) -> None:
        _check([_ip(), *argv])

    def _add_ns(self, host: str) -> None:
        name = self.ns(host)
        _check([_ip(), "netns", "add", name])
        self._created.append(name)
        self._sh("-n", name, "link", "set", "lo", "up")

    def _veth(self, host_a: str, if_a: str, host_b: str, if_b: str) -> None:
        """Create a veth pair straight inside two namespaces (never in the host's)."""
        a, b = self.ns(host_a), self.ns(host_b)
        self._sh(*f"-n {a} link add {if_a} type veth peer name {if_b} netns {b}".split())
        self._ifaces[host_a].add(if_a)
        self._ifaces[host_b].add(if_b)

    def _up(self, host: str, ifname: str, cidr: str | None = None) -> None:
        if cidr:
            self._sh("-n", self.ns(host), "addr", "add", cidr, "dev", ifname)
        self._sh("-n", self.ns(host), "link", "set", ifname, "up")

    def _bridge(self, host: str, legs: Sequence[str], cidr: str | None) -> None:
        """A bridge br0 in ``host`` joining legs named after the hosts they lead to."""
        name = self.ns(host)
        self._sh("-n", name, "link", "add", "br0", "type", "bridge")
        self._ifaces[host].add("br0")
        for leg in legs:
            self._sh("-n", name, "link", "set", leg, "master", "br0")
            self._up(host, leg)
        self._up(host, "br0", cidr)

    def _router(self, host: str, legs: Mapping[str, str], own_ip: str) -> None:
        """Make ``host`` a router standing in for a bridge: the same /24 on every side.

        A host route per leg to the address behind it, proxy ARP (answered at once) so the
        hosts on each leg reach the others as on-link neighbours, and ``own_ip`` on lo.  The
        local rule moves after the delay line's rules, which then also catch packets to
        ``own_ip`` (see the module docstring).  TCP and UDP early demux are off here: they
        would attach a local connected socket to each later packet of a connection to
        ``own_ip`` before the policy rules route it into the line, and the kernel drops a
        forwarded packet that carries a socket, so only a connection's SYN got through.
        """
        name = self.ns(host)
        sysctls = [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            # else a server at own_ip gets a connection's SYN and nothing after it
            "net.ipv4.tcp_early_demux=0",
            "net.ipv4.udp_early_demux=0",
        ]
        for leg in legs:
            sysctls += [
                f"net.ipv4.conf.{leg}.proxy_arp=1",
                f"net.ipv4.conf.{leg}.rp_filter=0",
                f"net.ipv4.neigh.{leg}.proxy_delay=0",
            ]
        self.run(host, ["sysctl", "-qw", *sysctls])
        self._sh("-n", name, "addr", "add", f"{own_ip}/32", "dev", "lo")
        for leg, addr in legs.items():
            self._up(host, leg)
            self._sh("-n", name, "route", "add", f"{addr}/32", "dev", leg)
        self._sh("-n", name, "rule", "add", "pref", str(_LOCAL_RULE_PREF), "lookup", "local")
        self._sh("-n", name, "rule", "del", "pref", "0", "lookup", "local")

    def _route_default(self, host: str, via: str) -> None:
        self._sh("-n", self.ns(host), "route", "add", "default", "via", via)

    def _nat(self, host: str, *, random_fully: bool, drop_inbound: bool) -> None:
        """Make ``host`` a home router: MASQUERADE out of wan0, stateful FORWARD firewall."""
        masq = "MASQUERADE --random-fully" if random_fully else "MASQUERADE"
        rules = [
            "sysctl -qw net.ipv4.ip_forward=1",
            f"iptables -t nat -A POSTROUTING -o wan0 -j {masq}",
            "iptables -P FORWARD DROP",
            "iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "iptables -A FORWARD -i lan0 -j ACCEPT",
        ]
        if drop_inbound:  # real routers silently drop unsolicited SYNs
            rules += [
                "iptables -A INPUT -i wan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "iptables -A INPUT -i wan0 -j DROP",
            ]
        for rule in rules:
            self.run(host, rule.split())

    def _build(self) -> None:
        for host in self.hosts:
            self._add_ns(host)
        if self.kind == "same-lan":
            self._veth("alice", "lan0", "lan", "alice")
            self._veth("bob", "lan0", "lan", "bob")
            self._bridge("lan", ["alice", "bob"], None)
            self._up("alice", "lan0", f"{self.alice_ip}/24")
            self._up("bob", "lan0", f"{self.bob_ip}/24")
            return
        # alice behind natA in every other kind; in "same-nat" bob too, on a bridged LAN
        if self.kind == "same-nat":
            self._veth("alice", "lan0", "lan", "alice")
            self._veth("bob", "lan0", "lan", "bob")
            self._veth("natA", "lan0", "lan", "natA")
            self._bridge("lan", ["alice", "bob", "natA"], None)
        else:
            self._veth("alice", "lan0", "natA", "lan0")
        self._veth("natA", "wan0", "wan", "natA")
        self._up("alice", "lan0", f"{self.alice_ip}/24")
        self._up("natA", "lan0", "192.168.1.1/24")
        self._up("natA", "wan0", f"{self.alice_public}/24")
        self._route_default("alice", "192.168.1.1")
        legs = {"natA": self.alice_public}
        if self.kind == "same-nat":
            self._up("bob", "lan0", f"{self.bob_ip}/24")
            self._route_default("bob", "192.168.1.1")
        elif self.kind == "no-nat":
            self._veth("bob", "wan0", "wan", "bob")
            self._up("bob", "wan0", f"{self.bob_ip}/24")
            legs["bob"] = self.bob_public
        else:
            self._veth("bob", "lan0", "natB", "lan0")
            self._veth("natB", "wan0", "wan", "natB")
            self._up("bob", "lan0", f"{self.bob_ip}/24")
            self._up("natB", "lan0", "192.168.2.1/24")
            self._up("natB", "wan0", f"{self.bob_public}/24")
            self._route_default("bob", "192.168.2.1")
            legs["natB"] = self.bob_public
        if self.routed_wan:
            self._router("wan", legs, str(self.wan_ip))
        else:
            self._bridge("wan", list(legs), f"{self.wan_ip}/24")
        symmetric = self.kind == "symmetric"
        self._nat("natA", random_fully=symmetric, drop_inbound=True)
        if "natB" in self.hosts:
            self._nat("natB", random_fully=symmetric, drop_inbound=self.kind != "rst")

    def _wait_carrier(self, timeout: float = 5) -> None:
        """Wait until every link reports UP: veth carrier appears asynchronously."""
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            while True:
                out = _check([_ip(), "-n", self.ns(host), "-br", "link"])
                down = [
                    ln.split()[0]
                    for ln in out.splitlines()
                    if not ln.startswith("lo ") and ln.split()[1] != "UP"
                ]
                if not down:
                    break
                if time.monotonic() > deadline:
                    raise NatLabError(f"NatLab: links still down in {host}: {down}")
                time.sleep(0.02)

    def _verify(self) -> None:
        """Fail loudly now if the plumbing is broken, rather than as a punching failure."""
        if self.kind == "same-lan":
            checks = {"alice": [self.bob_ip], "bob": [self.alice_ip]}
        elif self.kind == "same-nat":
            checks = {"alice": [str(self.wan_ip), self.bob_ip], "bob": [str(self.wan_ip)]}
        else:
            checks = {"alice": [str(self.wan_ip)], "bob": [str(self.wan_ip)]}
        procs = {
            host: self.popen(
                host,
                [sys.executable, "-c", _PROBE, *(f"{t}:9" for t in targets)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for host, targets in checks.items()
        }
        for host, p in procs.items():
            out, err = p.communicate(timeout=15)
            if p.returncode != 0:
                raise NatLabError(
                    f"NatLab({self.kind!r}) self-check from {host} failed: "
                    f"{err.strip() or out.strip()}"
                )
        self._procs = [p for p in self._procs if p not in procs.values()]


@atexit.register
def _close_all() -> None:
    """Safety net: tear down labs a crashed test never exited."""
    for lab in list(_live):
        with contextlib.suppress(Exception):
            lab.close()
