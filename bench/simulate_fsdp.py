"""Per-GPU device memory of fine-tuning under FSDP2 at Llama 7B, 13B and 70B, simulated on a CPU.

    python bench/simulate_fsdp.py                       # 7b 13b 70b on 8 GPUs; bench/results/simulated_fsdp.json
    python bench/simulate_fsdp.py --sizes 70b --methods sift-5 full
    python bench/simulate_fsdp.py --sizes tiny --world 4 --out runs/fsdp.json

One rank of a ``--world``-GPU job, as torchtune and torchtitan set it up:
the model (bf16 weights, seq 2048, batch 1 per GPU, non-reentrant gradient
checkpointing, q/k/v/o/gate/up/down targeted; bench/gpu.py's shapes, 70B with
8 key/value heads) is sharded by ``fully_shard`` per decoder layer and at the
root on a fake process group (``torch.testing``'s ``FakeStore``: collectives
return at once with outputs of the right shapes), and trained for
``--warmup`` steps plus one on fake tensors. torch's ``FSDPMemTracker``
counts every allocation of that rank and sorts it into sharded and unsharded
parameters, gradients, all-gather and reduce-scatter buffers, activations,
temporaries and optimizer state; each step's peak goes to ``--out``.

The methods are bench/gpu.py's, set up the same way, after sharding:

* ``full``: torch AdamW (fused) on every sharded weight (bf16 moments, as
  the bf16 weights);
* ``lora``: peft LoRA of rank ``--rank`` (64) on the targeted Linears, added
  before sharding (as torchtune does), AdamW on the adapters;
* ``sift-5``: SIFT fixed mode at 5% with the defaults (fp32 masters and
  moments), attached to the sharded model: each rank selects, stores and
  updates its own rows' components (``siftune.sharding``);
* ``sift-5-lean``: 5% with bf16 moments, no masters and 16-bit column
  indices; the update runs in ``optimizer.step()``, not in the backward hook
  (``update_in_backward`` needs one process: the step's clipping norm spans
  every rank);
* ``frozen``: backward through every layer, no weight gradient (the floor).

What stands in for the GPUs, beyond bench/simulate.py's substitutions
(flash attention, fused AdamW, host reads answered 1):

* the fake device is ``cpu`` (FSDP2 needs a device mesh, and a CPU-only torch
  makes none for ``cuda``); the increment ledger, host memory on a GPU, is
  moved to ``meta`` for the run (``siftune.engine.LEDGER_DEVICE``) so that it
  is not counted;
* the fake process group moves no data, so SIFT's global top-k cannot see
  the other ranks' scores; each rank is given an equal share of every
  tensor's k (``ceil(density x local entries)``), which is what a uniform
  gradient gives, and a rank holding more of the top-k needs more;
* FSDP2 on a CPU mesh has no separate all-gather stream, so no all-gather of
  the next layer overlaps the current one: on a GPU, FSDP2's prefetch holds
  one more layer's unsharded weights (one decoder layer: 0.36 GiB at 7B,
  1.6 GiB at 70B in bf16), which this simulation leaves out.

Not simulated either: the CUDA allocator's rounding and caching, NCCL's own
buffers, and memory kernels allocate inside themselves.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).parent))
import gpu  # noqa: E402  (the model shapes and each method's set-up)
from simulate import GiB, HostReads, cuda_kernels  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "simulated_fsdp.json"
METHODS = ["frozen", "full", "lora", "sift-5", "sift-5-lean"]
HOST = torch.device("cpu")  # the fake device: see the module's docstring
DENSITY = {"sift-5": 0.05, "sift-5-lean": 0.05}
# bench/gpu.py's sift-5-lean without update_in_backward, which SIFT refuses on several processes.
LEAN = dict(density=0.05, state_dtype="bfloat16", master_weights=False, compact_indices=True)


def fake_process_group(world: int) -> None:
    """Rank 0 of ``world`` on torch's fake backend (no peers, no data moved); once per process."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise RuntimeError(f"a process group of {dist.get_world_size()} ranks is already set up")
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def _decoder_layers(model) -> torch.nn.ModuleList:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


@contextlib.contextmanager
def _ledger_off_device():
    """Keep SIFT's increment ledger off the counted device (it is host memory on a GPU)."""
    import siftune.engine

    saved = siftune.engine.LEDGER_DEVICE
    siftune.engine.LEDGER_DEVICE = torch.device("meta")
    try:
        yield
    finally:
        siftune.engine.LEDGER_DEVICE = saved


def simulate(method: str, size: str = "7b", world: int = 8, seq: int = 2048, batch: int = 1, warmup: int = 1,
             rank: int = 64) -> dict:
    """One rank of ``method`` under FSDP2 on ``world`` GPUs: per-step device peaks and their parts."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    started = time.time()
    fake_process_group(world)
    mesh = init_device_mesh(HOST.type, (world,))  # outside fake mode: the mesh reads its ranks
    model = gpu.build(size, "meta").to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    density = DENSITY.get(method)
    reads = HostReads(None if density is None else lambda t: math.ceil(density * t.numel()))
    if method == "lora":  # adapters first, then shard the whole (as torchtune does)
        import peft

        with torch.device("meta"):
            model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=gpu.TARGETS,
                                                               lora_dropout=0.0))
    with FakeTensorMode(allow_non_fake_inputs=True), reads, cuda_kernels(HOST), _ledger_off_device():
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device=HOST)  # now fake, each rank's shard only
        params = sum(p.numel() for p in model.parameters())  # global counts (DTensors)
        if method == "lora":
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt, engine = torch.optim.AdamW(trainable, lr=1e-4, fused=True), None
        elif method == "sift-5-lean":
            import siftune

            engine = siftune.attach(model, siftune.SiftConfig(target_modules=gpu.TARGETS, **LEAN))
            model.enable_input_require_grads()
            opt = engine.optimizer(lr=1e-4)
        else:
            model, opt, engine = gpu.setup(method, model, rank, fused=True)
        n_trainable = engine.num_trainable if engine else sum(p.numel() for g in opt.param_groups for p in g["params"])
        ids = torch.randint(0, 32000, (batch, seq), device=HOST)
        steps = []
        for step in range(warmup + 1):
            tracker = FSDPMemTracker(model, opt)  # one per step: it keeps one iteration's module stats
            tracker.track_inputs((ids,))
            with tracker:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del loss
            peak = tracker.get_tracker_snapshot("peak").get(HOST, {})
            steps.append(dict(step=step, peak_gib=peak.get("Total", 0) / GiB,
                              parts_gib={str(k.value): v / GiB for k, v in peak.items() if k != "Total" and v},
                              after_gib=tracker.get_tracker_snapshot("current").get(HOST, {}).get("Total", 0) / GiB))
            del tracker
            gc.collect()
        local_state = engine.state_bytes(opt) if engine is not None else None
        local_selected = sum(int(i.numel()) for i in engine.selected.values()) if engine is not None else None
    import peft
    import transformers

    record = dict(method=method, size=size, world=world, seq=seq, batch=batch, gc=1, warmup=warmup,
                  rank=rank if method == "lora" else None, params=params, trainable=n_trainable,
                  device=f"simulated: rank 0 of {world} (fake process group), fake tensors, CUDA kernels",
                  peak_gib=max(s["peak_gib"] for s in steps), steps=steps,
                  host_reads_answered=reads.reads, sim_s=round(time.time() - started, 1),
                  torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    if engine is not None:
        record.update(density=engine.config.density, selected=engine.num_selected, selected_rank0=local_selected,
                      state_bytes_rank0=local_state)
    return record


def table(records: list[dict]) -> list[str]:
    """docs/distributed.md's table: per-GPU peak GiB, one row per method, one column per size."""
    sizes = sorted({r["size"] for r in records}, key=lambda s: (len(s), s))
    world = records[0]["world"] if records else 8
    lines = [f"| method | " + " | ".join(f"{s.upper()} (GiB per GPU, {world} GPUs)" for s in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for method in METHODS:
        row = {r["size"]: r for r in records if r["method"] == method}
        if not row:
            continue
        cells = [f"{row[s]['peak_gib']:.2f}" if "peak_gib" in row.get(s, {}) else row.get(s, {}).get("error", "-")
                 for s in sizes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["sift-5", "sift-5-lean", "full", "lora"])
    parser.add_argument("--sizes", nargs="+", choices=sorted(gpu.SIZES), default=["7b", "13b", "70b"])
    parser.add_argument("--world", type=int, default=8, help="GPUs the model is sharded over")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the last one (the first selects)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA's rank")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    command = " ".join(["python", "bench/simulate_fsdp.py", *sys.argv[1:]])
    saved = json.loads(args.out.read_text())["records"] if args.out.exists() else []
    for size in args.sizes:
        for method in args.methods:
            try:
                record = simulate(method, size, args.world, args.seq, args.batch, args.warmup, args.rank)
            except Exception as error:  # a method fake tensors cannot run is reported, not dropped
                record = dict(method=method, size=size, world=args.world, error=f"{type(error).__name__}: {str(error)[:300]}")
            record["command"] = command
            saved = [r for r in saved if (r["method"], r["size"], r["world"]) != (method, size, args.world)] + [record]
            print(json.dumps({k: v for k, v in record.items() if k not in ("steps", "command")}), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(dict(records=saved), indent=1) + "\n")
            tmp.replace(args.out)  # after every method: a crash loses nothing
    for line in table([r for r in saved if r["world"] == args.world]):
        print(line)


if __name__ == "__main__":
    main()
