#!/usr/bin/env python3
"""A constant-delay line for IPv4 packets, in userspace: a stand-in for `tc netem delay`.

Some kernels are built without sch_netem (and without fq, tbf or etf, which could pace or
hold packets). This script adds a fixed delay with a TUN device instead. Run it in a middle
network namespace D that routes between two others, A and B:

    A --veth-- D --veth-- B        (two subnets; D forwards: net.ipv4.ip_forward=1, rp_filter=0)

It creates the TUN device and, for every `--iif` interface, a policy rule sending what arrives
there into the device (`ip rule add iif <veth> lookup <table>`; table: `default dev <tun>`).
It reads each packet, holds it in a FIFO until `--delay-ms` after it arrived, and writes it
back; the kernel sees it received on the TUN device, and the main table routes it on to its
real destination. Every packet crosses the line once per direction, so the round trip gains
twice the delay, as with `netem delay X` on both ends of a veth pair.

Throughput: Python cannot move a hundred thousand packets a second, so the device takes TCP's
segmentation offload (IFF_VNET_HDR + TUNSETOFFLOAD): the kernel hands over whole GSO packets of
up to 64 KiB with a virtio-net header, and takes them back the same way. The MTU stays 1500, so
TCP behaves as on a normal path (its MSS and its congestion window in segments are unchanged);
only the number of packets the script handles drops by ~40x.

The queue is bounded like netem's `limit` (packets, and bytes too since packets can be 64 KiB);
beyond it packets are dropped. SIGTERM or SIGINT ends it cleanly: the rules it added are
deleted and the device goes away with its file descriptor. It prints "ready" on stdout once the
device and rules are in place, and a summary on stderr when it ends.

    ip netns exec D python3 delayline.py --delay-ms 50 --iif vethDA --iif vethDB

Impairments, netem's in miniature (`loss 5% delay 40ms 10ms reorder 25%`):

- `--loss-percent P`: each packet is lost with probability P/100 when it arrives (as netem
  drops on enqueue), independently of the others; both directions alike.
- `--jitter-ms J`: each packet is held delay +- J ms (uniform, never below 0), so a packet held
  less may overtake one held more, as netem's jitter reorders.
- `--reorder-percent R`: with probability R/100 a packet is not held at all and goes out ahead
  of those waiting (netem's `reorder R%`, which needs a delay to mean anything).
- `--seed N`: the random choices come from random.Random(N), so the same packet sequence meets
  the same fate; without it they are seeded from the OS.

Any of these turns the segmentation offload off: the kernel then cuts TCP's GSO packets into
wire-sized ones before they reach the device, so a loss or an overtaking hits one 1500-byte
packet, as on a real link, and not the ~44 segments of a 64 KiB GSO packet at once. Loss is
drawn here rather than by iptables (`-m statistic --mode random`, which does work on kernels
without netem) for that very reason -- iptables sees the same GSO packets whole, since veth
pairs pass them on unsegmented -- and because only here can it be seeded for repeatability.
Python then handles every packet, a few tens of thousands a second, which is far above what
TCP reaches through a lossy long path anyway (5% loss at 80 ms RTT allows well under 1 MB/s).
The summary also counts the packets lost and those written out of their arrival order.

Linux only, root (CAP_NET_ADMIN), the standard library and `ip` (iproute2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import heapq
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# Checksum offload, TCP segmentation offload (v4, v6, with ECN): whole GSO packets, unchecksummed.
TUN_OFFLOADS = 0x01 | 0x02 | 0x04 | 0x08  # TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
READ_SIZE = 10 + 65536  # virtio_net_hdr + the largest GSO packet the device takes
# At most this many reads, then this many writes, in turn: a write is costly (the kernel
# forwards the packet within it, often on into the receiving TCP stack and the sender's next
# segments), and packets left unread meanwhile would be stamped late.
READ_BATCH = WRITE_BATCH = 32


@dataclasses.dataclass(frozen=True)
class Impairment:
    """What happens to each packet: held `delay` (+- `jitter`) seconds, maybe lost or hurried."""

    delay: float
    jitter: float = 0.0
    loss: float = 0.0  # probabilities, 0..1
    reorder: float = 0.0

    @property
    def per_packet(self) -> bool:
        """True if packets are treated differently, which needs them one wire packet each."""
        return bool(self.jitter or self.loss or self.reorder)

    def describe(self) -> str:
        text = f"{self.delay * 1e3:g} ms"
        if self.jitter:
            text += f" +- {self.jitter * 1e3:g} ms"
        if self.loss:
            text += f", loss {self.loss * 100:g}%"
        if self.reorder:
            text += f", reorder {self.reorder * 100:g}%"
        return text


class Stats:
    """What the line did; printed on exit so a caller can tell whether it dropped or lagged."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.dropped = 0
        self.lost = 0  # dropped on purpose, --loss-percent
        self.reordered = 0  # written after a packet that arrived later than it
        self.write_errors = 0
        self.max_queue = 0
        self.max_late = 0.0  # the worst lateness of a write past its due time, seconds

    def summary(self, shape: Impairment) -> str:
        text = (
            f"delayline: {shape.describe()}: {self.packets} packets, {self.bytes / 1e6:.1f} MB "
            f"forwarded; {self.dropped} dropped (queue full), {self.write_errors} write errors; "
            f"max queue {self.max_queue} packets; latest write {self.max_late * 1e3:.2f} ms late"
        )
        if shape.per_packet:
            text += f"; {self.lost} lost at random, {self.reordered} reordered"
        return text


def open_tun(name: str, offload: bool = True) -> tuple[int, str]:
    """A non-blocking TUN fd; with `offload`, reads and writes carry whole GSO packets.

    Without it the kernel segments (and checksums) packets before handing them over, so each
    read is one wire packet. Both ways they carry a virtio-net header, written back as read.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        got = fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_OFFLOADS if offload else 0)
    except OSError:
        os.close(fd)
        raise
    return fd, got[:16].rstrip(b"\0").decode()


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def sysctl(path: str, value: str) -> None:
    """Best effort: the knob may be absent (no IPv6) and the setting is only a nicety."""
    with contextlib.suppress(OSError):
        Path("/proc/sys", path).write_text(value)


def realtime(priority: int) -> None:
    """Real-time scheduling: netem's timers fire in softirq, whatever else the CPUs are doing.

    A userspace line must be woken on time too, or the delay grows with the endpoints' CPU load
    (on two cores a busy sender and receiver held writes back by up to ~50 ms). The loop blocks
    between packets and the kernel's RT throttling bounds it anyway, so it cannot starve others.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:
        print(f"delayline: no SCHED_FIFO ({exc}); the delay may grow under load", file=sys.stderr)


def run(
    fd: int,
    shape: Impairment,
    limit: int,
    limit_bytes: int,
    wake: socket.socket,
    rng: random.Random | None = None,
) -> Stats:
    """Hold every packet read from `fd` as `shape` says, then write it back, until woken.

    The queue is a heap on (due time, arrival number): with a constant delay that is arrival
    order; with jitter or reordering a packet due earlier goes out first, as in netem's tfifo.
    """
    rng = rng or random.Random()
    stats = Stats()
    queue: list[tuple[float, int, bytes]] = []
    queued_bytes = 0
    arrivals = 0  # numbers packets in arrival order
    newest_written = -1  # the highest arrival number written so far
    delay, jitter, loss, reorder = shape.delay, shape.jitter, shape.loss, shape.reorder
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        # select, not poll/epoll: its timeout has microsecond resolution, theirs millisecond.
        ready, _, _ = select.select([fd, wake], [], [], timeout)
        if wake in ready:
            return stats
        if ready:
            for _ in range(READ_BATCH):
                try:
                    packet = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                if len(queue) >= limit or queued_bytes + len(packet) > limit_bytes:
                    stats.dropped += 1
                    continue
                if loss and rng.random() < loss:
                    stats.lost += 1
                    continue
                hold = delay
                if reorder and rng.random() < reorder:
                    hold = 0.0
                elif jitter:
                    hold = max(0.0, delay + rng.uniform(-jitter, jitter))
                heapq.heappush(queue, (time.monotonic() + hold, arrivals, packet))
                arrivals += 1
                queued_bytes += len(packet)
            stats.max_queue = max(stats.max_queue, len(queue))
        for _ in range(WRITE_BATCH):
            late = time.monotonic() - queue[0][0] if queue else -1.0
            if late < 0:
                break
            _, number, packet = heapq.heappop(queue)
            queued_bytes -= len(packet)
            stats.max_late = max(stats.max_late, late)
            if number < newest_written:
                stats.reordered += 1
            newest_written = max(newest_written, number)
            try:
                os.write(fd, packet)
            except OSError:
                stats.write_errors += 1
                continue
            stats.packets += 1
            stats.bytes += len(packet)


def percent(text: str) -> float:
    value = float(text.rstrip("%"))
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage between 0 and 100")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay (default 50)")
    parser.add_argument(
        "--jitter-ms",
        type=float,
        default=0.0,
        help="hold each packet delay +- this (uniform), so packets overtake (default 0)",
    )
    parser.add_argument(
        "--loss-percent",
        type=percent,
        default=0.0,
        help="lose each packet with this probability, each way (default 0)",
    )
    parser.add_argument(
        "--reorder-percent",
        type=percent,
        default=0.0,
        help="send this share of packets at once, ahead of those held (default 0)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed for loss/jitter/reorder (default: random)"
    )
    parser.add_argument("--dev", default="dly0", help="TUN device name (default dly0)")
    parser.add_argument(
        "--iif",
        action="append",
        default=[],
        metavar="DEV",
        help="route packets arriving on DEV through the line (repeat for each side)",
    )
    parser.add_argument("--table", type=int, default=100, help="routing table (default 100)")
    parser.add_argument(
        "--pref",
        type=int,
        default=None,
        help="priority of the policy rules (default: the kernel's choice, just before main's); "
        "lower than the local rule's to catch packets to the namespace's own addresses too",
    )
    parser.add_argument(
        "--txqueuelen",
        type=int,
        default=10000,
        help="packets the device holds while the script is busy (default 10000; the kernel's "
        "500 drops bursts)",
    )
    parser.add_argument(
        "--limit", type=int, default=100000, help="most packets held (default 100000)"
    )
    parser.add_argument("--limit-mib", type=int, default=256, help="most MiB held (default 256)")
    parser.add_argument(
        "--rt-priority",
        type=int,
        default=10,
        help="SCHED_FIFO priority, so busy endpoints do not delay the line (default 10; 0: off)",
    )
    args = parser.parse_args()
    if (
        min(args.delay_ms, args.jitter_ms) < 0
        or min(args.limit, args.limit_mib, args.txqueuelen) < 1
    ):
        parser.error(
            "--delay-ms and --jitter-ms must be >= 0; --limit, --limit-mib and --txqueuelen >= 1"
        )
    shape = Impairment(
        delay=args.delay_ms / 1e3,
        jitter=args.jitter_ms / 1e3,
        loss=args.loss_percent / 100,
        reorder=args.reorder_percent / 100,
    )

    # The handlers only wake the loop (set_wakeup_fd), so no packet is cut off mid-write.
    wake, waker = socket.socketpair()
    for s in (wake, waker):
        s.setblocking(False)
    signal.set_wakeup_fd(waker.fileno())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)

    rules: list[str] = []
    try:
        fd, dev = open_tun(args.dev, offload=not shape.per_packet)
    except OSError as exc:
        print(f"delayline: cannot create TUN device {args.dev}: {exc}", file=sys.stderr)
        return 1
    table = str(args.table)
    pref = [] if args.pref is None else ["pref", str(args.pref)]
    try:
        # No IPv6 on the device: nothing of its own (router solicitations) enters the line.
        sysctl(f"net/ipv6/conf/{dev}/disable_ipv6", "1")
        sysctl(f"net/ipv4/conf/{dev}/rp_filter", "0")  # sources behind it belong to other links
        ip("link", "set", "dev", dev, "txqueuelen", str(args.txqueuelen), "up")
        ip("route", "replace", "default", "dev", dev, "table", table)
        for iif in args.iif:
            ip("rule", "add", *pref, "iif", iif, "lookup", table)
            rules.append(iif)
        if args.rt_priority > 0:  # after the `ip` children: they need not inherit it
            realtime(args.rt_priority)
        print("ready", flush=True)
        rng = random.Random(args.seed)
        stats = run(fd, shape, args.limit, args.limit_mib << 20, wake, rng)
        print(stats.summary(shape), file=sys.stderr)
        return 0
    except RuntimeError as exc:
        print(f"delayline: {exc}", file=sys.stderr)
        return 1
    finally:
        for iif in rules:
            with contextlib.suppress(RuntimeError, OSError, subprocess.SubprocessError):
                ip("rule", "del", *pref, "iif", iif, "lookup", table)
        os.close(fd)  # a non-persistent device goes, and its route with it


if __name__ == "__main__":
    sys.exit(main())
