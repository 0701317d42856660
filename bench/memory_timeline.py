"""Where a run's resident memory grows: run a Python script with a thread that samples it.

Every --every seconds the thread writes the process's resident set (VmRSS) and the innermost frames
of the main thread that belong to mathtune or the libraries it drives, so each rise in memory comes
with the code that caused it. Peak resident memory alone (what bench_train.py reports) does not say
which stage holds it. Linux only (/proc/self/status).

    PYTHONPATH=src .venv/bin/python bench/memory_timeline.py --out timeline.txt -- \\
        bench/bench_train.py --side mathtune --work runs/bench-train --model gemma-3-270m \\
        --problems-file full.json --result /tmp/result.json --name mathtune-full

(the `--side mathtune` child of bench_train.py, after one `make bench` has written its files).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import runpy
import sys
import threading
import time
import traceback

WATCHED = ("mathtune", "trainer.py", "modeling_utils", "safetensors", "tokenization")


def resident_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


MALLINFO2 = getattr(ctypes.CDLL(None), "mallinfo2", None)  # glibc 2.33 and later
if MALLINFO2 is not None:
    MALLINFO2.restype = _MallInfo2


def heap_in_use_mb() -> int | None:
    """Bytes the C library's heap has handed out and not had back (glibc's mallinfo2, all arenas), or None.

    Resident memory minus this is mostly heap the allocator keeps free: fragmentation, not live data.
    """
    if MALLINFO2 is None:
        return None
    info = MALLINFO2()
    return (info.uordblks + info.hblkhd) // 2**20


def sample(out, main_thread: int, every: float) -> None:
    """Write one line per change of the watched stack: seconds, resident MB, the heap in use, the frames."""
    started, last = time.perf_counter(), None
    while True:
        frame = sys._current_frames().get(main_thread)
        frames = [f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}"
                  for f in (traceback.extract_stack(frame) if frame else []) if any(w in f.filename for w in WATCHED)]
        where = " > ".join(frames[-5:])
        rss, live = resident_mb(), heap_in_use_mb()
        if (where, rss // 50) != last:  # a new place, or 50 MB more or less
            heap = f" (heap in use {live:5d} MB)" if live is not None else ""
            out.write(f"{time.perf_counter() - started:8.2f} s {rss:6d} MB{heap}  {where}\n")
            out.flush()
            last = (where, rss // 50)
        time.sleep(every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where the timeline goes")
    parser.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("script", help="the Python script to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args()
    out = open(args.out, "w")
    threading.Thread(target=sample, args=(out, threading.get_ident(), args.every), daemon=True).start()
    script_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    sys.argv = [args.script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    try:
        runpy.run_path(args.script, run_name="__main__")
    finally:
        out.write(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB\n")
        out.flush()


if __name__ == "__main__":
    main()
