"""Start flannelpy's flanneld from a given source tree, for the side-by-side benchmark.

    python fp_launch.py TREE [flanneld flags...]

TREE is a directory holding a `flannelpy/` package (vs_flanneld.py extracts the committed one
with `git archive`, so a run measures a commit even while others edit the work tree), or `-`
for whatever `import flannelpy` finds.  The editable install's import hook would win over
sys.path, so it is taken out first.  Otherwise this is exactly the `flanneld` console script.

FLANNELPY_BENCH_CPROFILE=FILE: run under cProfile (the trio thread only) and write the stats to
FILE when the agent exits (SIGTERM ends it cleanly).  Handled here, not in flannelpy.
FLANNELPY_BENCH_TRACEMALLOC=FILE: trace allocations from the start; each SIGUSR2 writes what is
held then (total, and the biggest holders by line) to FILE.  RSS is then not comparable.
FLANNELPY_BENCH_CENSUS=FILE: each SIGUSR2 writes the live objects by type (count, bytes) to FILE;
two runs with different peer counts tell which types grow per peer (no tracing cost until then).
FLANNELPY_BENCH_GCSTATS=FILE: at exit, write how many passes the cyclic collector made per
generation and how long they took.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    tree, args = sys.argv[1], sys.argv[2:]
    if tree != "-":
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        sys.path.insert(0, os.path.abspath(tree))
    sys.argv = ["flanneld", *args]
    profile_to = os.environ.pop("FLANNELPY_BENCH_CPROFILE", "")
    trace_to = os.environ.pop("FLANNELPY_BENCH_TRACEMALLOC", "")
    heap_to = os.environ.pop("FLANNELPY_BENCH_HEAP", "")
    if heap_to:
        _heap_report(heap_to)
    if trace_to:
        _trace_allocations(trace_to)
    census_to = os.environ.pop("FLANNELPY_BENCH_CENSUS", "")
    if census_to:
        _census(census_to)
    gc_to = os.environ.pop("FLANNELPY_BENCH_GCSTATS", "")
    if gc_to:
        _gc_stats(gc_to)
    from flannelpy.cli.flanneld import main as flanneld_main

    if not profile_to:
        return flanneld_main(args)
    import cProfile

    prof = cProfile.Profile()
    try:
        return prof.runcall(flanneld_main, args)
    finally:
        prof.dump_stats(profile_to)


def _census(path: str) -> None:
    """On SIGUSR2, write the live objects by type: count and bytes (sys.getsizeof), the
    collector's objects and the untracked ones they hold (ints, strings, bytes)."""
    import collections
    import gc
    import signal

    def dump(*_: object) -> None:
        gc.collect()
        counts: collections.Counter[str] = collections.Counter()
        sizes: collections.Counter[str] = collections.Counter()
        found = gc.get_objects()
        seen = {id(o) for o in found}  # made after the listing, so not in it
        seen.add(id(found))
        while found:  # untracked objects (a tuple of atomics, a string) are reached through holders
            for obj in found:
                name = type(obj).__qualname__
                counts[name] += 1
                sizes[name] += sys.getsizeof(obj)
            new, found = found, []
            for holder in new:  # an untracked atom is also counted under its first holder's type
                for o in gc.get_referents(holder):
                    if not gc.is_tracked(o) and id(o) not in seen:
                        seen.add(id(o))
                        found.append(o)
                        if type(o) in (int, str, float, bytes, tuple):
                            via = f"{type(o).__qualname__}<-{type(holder).__qualname__}"
                            counts[via] += 1
                            sizes[via] += sys.getsizeof(o)
        with open(path, "w") as f:
            for name, size in sizes.most_common(80):
                f.write(f"{name} {counts[name]} {size}\n")

    signal.signal(signal.SIGUSR2, dump)


def _gc_stats(path: str) -> None:
    """Time the cyclic collector's passes, per generation; written to `path` at exit."""
    import atexit
    import gc
    import time

    totals = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}  # generation -> [passes, seconds]
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        row = totals[info["generation"]]
        row[0] += 1
        row[1] += time.perf_counter() - started[0]

    def write() -> None:
        with open(path, "w") as f:
            for gen, (passes, seconds) in totals.items():
                f.write(f"gen{gen} {passes} passes {seconds * 1000:.1f} ms\n")

    gc.callbacks.append(on_gc)
    atexit.register(write)


def _mallinfo2_type() -> type:
    import ctypes

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    return MallInfo2


def _heap_report(path: str) -> None:
    """On SIGUSR1, write pymalloc's arena statistics, then RSS before and after glibc's
    malloc_trim(0): how much of the RSS is Python's free-but-kept memory (no tracing cost)."""
    import ctypes
    import signal

    _MallInfo2 = _mallinfo2_type()

    def rss_kib() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    def report(*_: object) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        saved = os.dup(2)
        try:
            os.dup2(fd, 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        before = rss_kib()
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        libc.malloc_trim(0)
        os.write(fd, f"\nRSS {before} KiB, after malloc_trim(0) {rss_kib()} KiB\n"
                     f"glibc: heap {info.arena // 1024} KiB (in use {info.uordblks // 1024}, free "
                     f"{info.fordblks // 1024}), mmapped {info.hblkhd // 1024} KiB in {info.hblks}\n".encode())
        os.close(fd)

    signal.signal(signal.SIGUSR1, report)


def _trace_allocations(path: str) -> None:
    import signal
    import tracemalloc

    tracemalloc.start(8)

    def dump(*_: object) -> None:
        import gc

        gc.collect()
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        current, peak = tracemalloc.get_traced_memory()
        with open(path, "w") as f:
            f.write(f"held {current} B, peak {peak} B\n")
            for stat in snap.statistics("lineno")[:200]:
                f.write(f"{stat}\n")
            f.write("\nby call path:\n")
            for stat in snap.statistics("traceback")[:25]:
                f.write(f"{stat}\n" + "".join(f"    {line}\n" for line in stat.traceback.format()))

    signal.signal(signal.SIGUSR2, dump)
    if os.environ.get("FLANNELPY_BENCH_TRACE_PEAK"):
        _watch_peak(path)


def _watch_peak(path: str) -> None:
    """Keep a snapshot of the highest point held so far (checked every 2 ms), and on SIGUSR2
    also write what that peak held beyond the final state: the short-lived allocations that
    set the RSS high-water mark."""
    import signal
    import threading
    import time
    import tracemalloc

    best: list = [0, None]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            current, _ = tracemalloc.get_traced_memory()
            if current > best[0] + 100_000:
                best[:] = [current, tracemalloc.take_snapshot()]
            time.sleep(0.002)

    threading.Thread(target=poll, daemon=True).start()
    previous = signal.getsignal(signal.SIGUSR2)

    def dump(*args: object) -> None:
        stop.set()  # the dump's own allocations are no peak of the agent's
        time.sleep(0.01)
        final = tracemalloc.take_snapshot()
        previous(*args)  # type: ignore[operator, misc]
        if best[1] is None:
            return
        with open(path, "a") as f:
            f.write(f"\npeak held {best[0]} B; at the peak beyond the end, by line:\n")
            for stat in best[1].compare_to(final, "lineno")[:40]:
                f.write(f"{stat}\n")
            f.write("\nby call path:\n")
            for stat in best[1].compare_to(final, "traceback")[:12]:
                f.write(f"{stat}\n" + "".join(f"    {line}\n" for line in stat.traceback.format()))

    signal.signal(signal.SIGUSR2, dump)


if __name__ == "__main__":
    sys.exit(main())
