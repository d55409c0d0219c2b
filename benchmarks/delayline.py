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

Linux only, root (CAP_NET_ADMIN), the standard library and `ip` (iproute2).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import os
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


class Stats:
    """What the line did; printed on exit so a caller can tell whether it dropped or lagged."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.dropped = 0
        self.write_errors = 0
        self.max_queue = 0
        self.max_late = 0.0  # the worst lateness of a write past its due time, seconds

    def summary(self, delay: float) -> str:
        return (
            f"delayline: {delay * 1e3:g} ms: {self.packets} packets, {self.bytes / 1e6:.1f} MB "
            f"forwarded; {self.dropped} dropped (queue full), {self.write_errors} write errors; "
            f"max queue {self.max_queue} packets; latest write {self.max_late * 1e3:.2f} ms late"
        )


def open_tun(name: str) -> tuple[int, str]:
    """A non-blocking TUN fd with offloads on, so reads and writes carry whole GSO packets."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        got = fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_OFFLOADS)
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


def run(fd: int, delay: float, limit: int, limit_bytes: int, wake: socket.socket) -> Stats:
    """Hold every packet read from `fd` for `delay` seconds, then write it back, until woken."""
    stats = Stats()
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    queued_bytes = 0
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
                queue.append((time.monotonic() + delay, packet))
                queued_bytes += len(packet)
            stats.max_queue = max(stats.max_queue, len(queue))
        for _ in range(WRITE_BATCH):
            late = time.monotonic() - queue[0][0] if queue else -1.0
            if late < 0:
                break
            packet = queue.popleft()[1]
            queued_bytes -= len(packet)
            stats.max_late = max(stats.max_late, late)
            try:
                os.write(fd, packet)
            except OSError:
                stats.write_errors += 1
                continue
            stats.packets += 1
            stats.bytes += len(packet)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay (default 50)")
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
    if args.delay_ms < 0 or min(args.limit, args.limit_mib, args.txqueuelen) < 1:
        parser.error("--delay-ms must be >= 0; --limit, --limit-mib and --txqueuelen >= 1")

    # The handlers only wake the loop (set_wakeup_fd), so no packet is cut off mid-write.
    wake, waker = socket.socketpair()
    for s in (wake, waker):
        s.setblocking(False)
    signal.set_wakeup_fd(waker.fileno())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)

    rules: list[str] = []
    try:
        fd, dev = open_tun(args.dev)
    except OSError as exc:
        print(f"delayline: cannot create TUN device {args.dev}: {exc}", file=sys.stderr)
        return 1
    table = str(args.table)
    try:
        # No IPv6 on the device: nothing of its own (router solicitations) enters the line.
        sysctl(f"net/ipv6/conf/{dev}/disable_ipv6", "1")
        sysctl(f"net/ipv4/conf/{dev}/rp_filter", "0")  # sources behind it belong to other links
        ip("link", "set", "dev", dev, "txqueuelen", str(args.txqueuelen), "up")
        ip("route", "replace", "default", "dev", dev, "table", table)
        for iif in args.iif:
            ip("rule", "add", "iif", iif, "lookup", table)
            rules.append(iif)
        if args.rt_priority > 0:  # after the `ip` children: they need not inherit it
            realtime(args.rt_priority)
        print("ready", flush=True)
        stats = run(fd, args.delay_ms / 1e3, args.limit, args.limit_mib << 20, wake)
        print(stats.summary(args.delay_ms / 1e3), file=sys.stderr)
        return 0
    except RuntimeError as exc:
        print(f"delayline: {exc}", file=sys.stderr)
        return 1
    finally:
        for iif in rules:
            with contextlib.suppress(RuntimeError, OSError, subprocess.SubprocessError):
                ip("rule", "del", "iif", iif, "lookup", table)
        os.close(fd)  # a non-persistent device goes, and its route with it


if __name__ == "__main__":
    sys.exit(main())
