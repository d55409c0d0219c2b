#!/usr/bin/env python3
"""CPU per short connection of each tete-tunnel peer, for builds compared side by side.

A development harness for the short-connection path (docs/PERFORMANCE.md, "Short
connections"): two `tete-tunnel forward` peers on loopback, -L on peer a, and `count`
connections through it (1 KiB up, 1 KiB back, close; compare.py's echo client and server).
It reports, per peer, the CPU (user + system) spent per connection, which on a shared
machine is steadier than connections per second (also reported). Builds are source trees
put first on PYTHONPATH (e.g. a `git archive` of an older commit, and the worktree), run
in alternating rounds so drift hits them alike; each cell is the median over the rounds.

    python benchmarks/conn_cpu.py --build old=/tmp/old --build new=. --loop uvloop

`--build floor=:floor` measures benchmarks/floor.py instead (on tete-tunnel's TLS transport,
from the PYTHONPATH of the build before it), `:floor-loop` the same on the loop's TLS: the
least Python does for the same hops.

`--profile DIR` runs each peer under cProfile (DIR/<build>-<peer>-<mode>.prof; the
figures are then the profiler's, not the code's). `--sample DIR` samples each peer with
py-spy instead (DIR/<build>-<peer>-<mode>.raw, one stack per line with its count, for a
flame graph or a tally by line), which leaves the peers' speed nearly as it is; py-spy is
not a dependency: `pip install py-spy` into the same environment.

`--modes bulk` measures the data path instead: `--bulk-mib` (default 1024) one way through
the -L, CPU seconds per GiB of each peer (a sends, b receives), MB/s, and each peer's read
and write system calls (from /proc/PID/io): these show which of the two regimes of a
loopback run it was (docs/PERFORMANCE.md, "Two speeds on loopback").
"""

from __future__ import annotations

import argparse
import atexit
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # the helpers and the process bookkeeping of the benchmark

PY_SPY = str(Path(sys.executable).parent / "py-spy")  # --sample: in this environment
WARM_UP = 200  # connections before measuring: imports, caches, the first windows


def measure(
    tete: compare.Tete, site: compare.Site, count: int, parallel: int, perf: Path | None = None
) -> tuple[float, float, float]:
    """(a's CPU us/conn, b's CPU us/conn, conn/s) for `count` connections."""
    a, b = (compare.psutil.Process(p.pid) for p in reversed(tete.procs))
    recorders = []
    if perf is not None and perf.suffix == ".data":  # `perf record` of both peers
        pids = f"{a.pid},{b.pid}"
        recorders.append(subprocess.Popen(["perf", "record", "-q", "-o", str(perf), "-p", pids]))
    elif perf is not None and perf.suffix == ".raw":  # py-spy samples of each peer
        for peer, p in (("a", a), ("b", b)):
            command = [PY_SPY, "record", "-r", "500", "-f", "raw", "-o", str(perf).format(peer)]
            recorders.append(
                subprocess.Popen(
                    [*command, "-p", str(p.pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    elif perf is not None:  # the system calls of each peer, counted
        for peer, p in (("a", a), ("b", b)):
            out = str(perf).format(peer)
            recorders.append(subprocess.Popen(["strace", "-c", "-o", out, "-p", str(p.pid)]))
    if recorders:
        time.sleep(0.5)
    before = [compare.cpu_seconds([p]) for p in (a, b)]
    try:
        result = site.client(["echo", str(tete.port), str(count), str(parallel)], 60 + count)
    finally:
        for recorder in recorders:
            recorder.send_signal(compare.signal.SIGINT)
            recorder.wait(30)
    after = [compare.cpu_seconds([p]) for p in (a, b)]
    a_us, b_us = ((x - y) / count * 1e6 for x, y in zip(after, before, strict=True))
    return a_us, b_us, count / result["seconds"]


def measure_bulk(tete: compare.Tete, site: compare.Site, mib: int) -> tuple[float, ...]:
    """(a's CPU s/GiB, b's, MB/s, a's reads, a's writes, b's reads, b's writes)."""
    peers = [compare.psutil.Process(p.pid) for p in reversed(tete.procs)]
    before = [(compare.cpu_seconds([p]), p.io_counters()) for p in peers]
    result = site.client(["stream", str(tete.port), str(mib << 20), "1"], 600)
    after = [(compare.cpu_seconds([p]), p.io_counters()) for p in peers]
    gib = mib / 1024
    (a0, ia0), (b0, ib0) = before
    (a1, ia1), (b1, ib1) = after
    return (
        (a1 - a0) / gib,
        (b1 - b0) / gib,
        (mib << 20) / result["seconds"] / 1e6,
        ia1.read_count - ia0.read_count,
        ia1.write_count - ia0.write_count,
        ib1.read_count - ib0.read_count,
        ib1.write_count - ib0.write_count,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=2000, help="connections per measurement")
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--modes", default="par,seq", help="par, seq, bulk (comma-separated)")
    parser.add_argument("--bulk-mib", type=int, default=1024, help="MiB per bulk measurement")
    parser.add_argument("--profile", type=Path, metavar="DIR")
    parser.add_argument("--perf", type=Path, metavar="DIR", help="perf record the peers")
    parser.add_argument("--strace", type=Path, metavar="DIR", help="count each peer's syscalls")
    parser.add_argument(
        "--sample",
        type=Path,
        metavar="DIR",
        help="py-spy samples of each peer (raw stacks, 500 a second); needs py-spy",
    )
    args = parser.parse_args()
    if args.sample is not None and not Path(PY_SPY).exists():
        parser.error(f"--sample needs py-spy ({PY_SPY} is missing: pip install py-spy)")
    builds = [tuple(b.split("=", 1)) for b in args.build]
    modes = [m for m in args.modes.split(",") if m]
    os.environ["TETE_TUNNEL_LOOP"] = args.loop
    atexit.register(compare.PROCS.stop_all)
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tete-conncpu-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["PYTHONPATH"] = str(Path(builds[-1][1]).resolve())
        assets = compare.prepare_assets(tmp)
        ids = assets["ids"]
        site = compare.Site("loopback", None, None, "127.0.0.1", "127.0.0.1", "127.0.0.1", tmp)
        site.start_sink()
        try:
            for r in range(args.rounds):
                shift = r % len(builds)
                for name, path in builds[shift:] + builds[:shift]:
                    floor = path in (":floor", ":floor-loop")  # benchmarks/floor.py
                    if not floor:
                        os.environ["PYTHONPATH"] = str(Path(path).resolve())
                    for mode in modes:
                        if args.profile is not None:
                            args.profile.mkdir(parents=True, exist_ok=True)
                            out = args.profile / f"{name}-{{}}-{mode}.prof"
                            compare._tete_cmd = _profiled(out)  # type: ignore[assignment]
                        if floor:
                            own_tls = path == ":floor"
                            tete = compare.Floor(site, assets["cert"], assets["key"], own_tls)
                        else:
                            tete = compare.Tete(site, ids)
                        tete.start()
                        if mode == "bulk":
                            try:
                                measure(tete, site, WARM_UP, 50)
                                got = measure_bulk(tete, site, args.bulk_mib)
                            finally:
                                tete.stop()
                            results.setdefault((name, mode), []).append(got)
                            print(
                                f"round {r} {name:>8} bulk: a {got[0]:5.2f} s/GiB  b {got[1]:5.2f}"
                                f" s/GiB  {got[2]:5.0f} MB/s  syscalls a {got[3]:.0f} r"
                                f" {got[4]:.0f} w, b {got[5]:.0f} r {got[6]:.0f} w",
                                file=sys.stderr,
                                flush=True,
                            )
                            continue
                        try:
                            parallel = args.parallel if mode == "par" else 1
                            measure(tete, site, WARM_UP, parallel)
                            count = args.count if mode == "par" else args.count // 4
                            perf = None
                            if args.perf is not None:
                                args.perf.mkdir(parents=True, exist_ok=True)
                                perf = args.perf / f"{name}-{mode}.data"
                            if args.strace is not None:
                                args.strace.mkdir(parents=True, exist_ok=True)
                                perf = args.strace / f"{name}-{{}}-{mode}.txt"
                            if args.sample is not None:
                                args.sample.mkdir(parents=True, exist_ok=True)
                                perf = args.sample / f"{name}-{{}}-{mode}.raw"
                            got = measure(tete, site, count, parallel, perf)
                        finally:
                            tete.stop()
                        results.setdefault((name, mode), []).append(got)
                        print(
                            f"round {r} {name:>8} {mode}: a {got[0]:6.0f} us  b {got[1]:6.0f} us"
                            f"  sum {got[0] + got[1]:6.0f} us  {got[2]:7.0f} conn/s",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            compare.PROCS.stop_all()
    print(f"loop {args.loop}; medians of {args.rounds} rounds (CPU us per connection, s per GiB)")
    for mode in modes:
        for name, _ in builds:
            got = results[name, mode]
            a, b, rate = (statistics.median(x[i] for x in got) for i in range(3))
            if mode == "bulk":
                spread = ", ".join(f"{x[2]:.0f}" for x in got)
                print(f"bulk {name:>8}: a {a:5.2f}  b {b:5.2f} s/GiB  {rate:5.0f} MB/s ({spread})")
                continue
            print(f"{mode} {name:>8}: a {a:6.0f}  b {b:6.0f}  sum {a + b:6.0f}  {rate:7.0f} conn/s")
    return 0


def _profiled(out: Path):  # type: ignore[no-untyped-def]
    """A _tete_cmd whose peers run under cProfile (peer a is started second).

    The peers run in the repository, and `-m` puts the current directory first on
    sys.path, before the build's PYTHONPATH: `-P` (Python 3.11) keeps it off, so the
    build's code is the one profiled.
    """
    started = iter(["b", "a"])
    script = Path(sys.executable).parent / "tete-tunnel"

    def cmd() -> list[str]:
        path = str(out).format(next(started))
        return [sys.executable, "-P", "-m", "cProfile", "-o", path, str(script)]

    return cmd


if __name__ == "__main__":
    sys.exit(main())
