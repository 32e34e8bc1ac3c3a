"""What the engine's heap trim (siftune.core.heap) and a fixed mmap threshold save and cost: max RSS, faults, time.

    python bench/heap_trim.py           # bench/results/structured/heap_trim.json (a quarter of an hour or so)
    python bench/heap_trim.py --quick   # a tiny model, a smoke test; writes nothing
    python bench/heap_trim.py --methods sift-rows:matched   # one method's records replaced

Each method runs ``siftune bench``'s causal_lm run (SmolLM2-135M, LoRA r=8's
count, the task's batches: 8 examples padded to the batch's longest, at
most 128 tokens) for 6 optimizer steps on one thread, once under each of
three heap settings, each in a fresh process:

* ``trim``: ``SIFTUNE_TRIM_HEAP=1``, the engine trims the heap once in each
  training forward;
* ``default``: glibc's malloc as it comes (the engine's default);
* ``mmap 64 KiB``: ``MALLOC_MMAP_THRESHOLD_=65536``, glibc maps every block
  above 64 KiB on its own and hands it back when it is freed.

A trim hands the heap's free pages back, and a mapped block's pages go
back when it is freed, so the pages a later allocation reuses are faulted
in again: the extra minor page faults and system seconds are their cost.
Step seconds are recorded too, but on shared cores they vary by more than
that. After each step's forward glibc's own count (``mallinfo2``) is
recorded: the heap's size (``arena``) and the bytes of it in use, whose
gap is the free chunks the heap holds.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "structured" / "heap_trim.json"
METHODS = ["sift-fixed:matched", "sift-rows:matched", "sift-columns:matched"]
HEAP_SETTINGS = {  # name -> environment of the run
    "trim": {"SIFTUNE_TRIM_HEAP": "1"},
    "default": {"SIFTUNE_TRIM_HEAP": "0"},
    "mmap 64 KiB": {"SIFTUNE_TRIM_HEAP": "0", "MALLOC_MMAP_THRESHOLD_": "65536"},
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_mib() -> dict | None:
    """glibc's heap size and bytes in use, MiB; None on other C libraries."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"arena": round(info.arena / 2**20, 1), "in_use": round(info.uordblks / 2**20, 1)}


def worker(method: str, steps: int, quick: bool) -> dict:
    from siftune.bench import runner
    from siftune.core import heap

    trim_s = []
    release = heap.release

    def timed_release() -> bool:
        started = time.perf_counter()
        done = release()
        if done:
            trim_s.append(time.perf_counter() - started)
        return done

    heap.release = timed_release  # the engine calls it through the module
    after_forward = []
    loss_of = runner.batch_loss

    def recorded_loss(model, batch):
        loss = loss_of(model, batch)
        if model.training:
            after_forward.append(_heap_mib())
        return loss

    runner.batch_loss = recorded_loss  # the runner's step calls it through the module
    spec = runner.plan("causal_lm", [method], [0], quick=quick, steps=steps, threads=1, eval_size=8, val_size=0)[0]
    before = resource.getrusage(resource.RUSAGE_SELF)
    record = runner.run_one(spec)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"method": method, "trim": heap.enabled(), "peak_mib": record["peak_mib"], "steps": steps,
            "train_s": record["train_s"], "step_s": record["step_s"],
            "minor_faults": after.ru_minflt - before.ru_minflt, "system_s": round(after.ru_stime - before.ru_stime, 2),
            "trims": len(trim_s), "trim_s": round(sum(trim_s), 3), "heap_after_forward_mib": after_forward,
            "load_avg_1min": record["load_avg_1min"],
            "machine": record["machine"], "versions": record["versions"], "date": record["date"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and 2 steps; writes nothing")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                   help="run these only; the other methods' records in the results file are kept")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "OUT"), help=argparse.SUPPRESS)
    ns = p.parse_args()
    steps = 2 if ns.quick else 6
    if ns.worker:
        Path(ns.worker[1]).write_text(json.dumps(worker(ns.worker[0], steps, ns.quick)))
        return
    records = []
    for method in ns.methods:
        for heap_setting, settings in HEAP_SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
            env.update(settings, OMP_NUM_THREADS="1")
            with tempfile.TemporaryDirectory(prefix="heap-trim-") as folder:
                out = Path(folder) / "record.json"
                subprocess.run([sys.executable, __file__, "--worker", method, str(out)] + ["--quick"] * ns.quick,
                               env=env, check=True, stdin=subprocess.DEVNULL)
                records.append({"heap": heap_setting, **json.loads(out.read_text())})
            r = records[-1]
            print(f"{method} {heap_setting}: peak {r['peak_mib']:.0f} MiB, {r['minor_faults']:,} faults, "
                  f"{r['system_s']} s system, {r['trims']} trims {r['trim_s']} s, train {r['train_s']} s",
                  flush=True)
    if not ns.quick:
        if RESULTS.exists():  # the other methods' records stay
            records += [r for r in json.loads(RESULTS.read_text())["records"] if r["method"] not in ns.methods]
        records.sort(key=lambda r: METHODS.index(r["method"]))
        RESULTS.write_text(json.dumps({"command": "python bench/heap_trim.py", "records": records}, indent=1) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
