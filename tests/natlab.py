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
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

__all__ = [
    "KINDS",
    "CommandError",
    "Impairment",
    "NatLab",
    "NatLabError",
    "impair_available",
    "natlab_available",
    "netem_available",
]

Kind = Literal["drop", "rst", "symmetric", "no-nat", "same-lan"]
KINDS: tuple[str, ...] = ("drop", "rst", "symmetric", "no-nat", "same-lan")

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


class NatLabError(RuntimeError):
    """The lab could not be built, used or torn down."""


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
        self._created: list[str] = []  # namespace names, in creation order
        self._procs: list[subprocess.Popen[Any]] = []
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
        ``own_ip`` (see the module docstring).
        """
        name = self.ns(host)
        sysctls = [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
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
        # alice behind natA in every other kind
        self._veth("alice", "lan0", "natA", "lan0")
        self._veth("natA", "wan0", "wan", "natA")
        self._up("alice", "lan0", f"{self.alice_ip}/24")
        self._up("natA", "lan0", "192.168.1.1/24")
        self._up("natA", "wan0", f"{self.alice_public}/24")
        self._route_default("alice", "192.168.1.1")
        legs = {"natA": self.alice_public}
        if self.kind == "no-nat":
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
