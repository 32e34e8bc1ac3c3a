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
  updates its own rows' components (``siftune.parallel.sharding``);
* ``sift-5-lean``: 5% with bf16 moments, no masters and 16-bit column
  indices; the update runs in ``optimizer.step()``, not in the backward hook
  (``update_in_backward`` needs one process: the step's clipping norm spans
  every rank);
* ``frozen``: backward through every layer, no weight gradient (the floor).

What stands in for the GPUs, beyond bench/simulate.py's substitutions
(flash attention, fused AdamW, host reads answered 1):

* the fake device is ``cpu`` (FSDP2 needs a device mesh, and a CPU-only torch
  makes none for ``cuda``); the increment ledger, host memory on a GPU, is
  moved to ``meta`` for the run (``siftune.core.engine.LEDGER_DEVICE``) so that it
  is not counted;
* the fake process group moves no data, so SIFT's global top-k cannot see
  the other ranks' scores; each rank is given an equal share of every
  tensor's k (``ceil(density x local entries)``), which is what a uniform
  gradient gives, and a rank holding more of the top-k needs more;
* an optimizer stepping on DTensors (``full``, ``lora``) first runs
  DTensor's sharding propagation of each op on fake tensors of the whole
  (unsharded) shape, under the simulation's fake mode, so the tracker counts
  them as if allocated (4-9x the true optimizer state at the first step;
  DTensor caches the propagation, so later steps are clean). Those methods
  run one untracked step first; their first real step allocates the moments
  at the end of the step, which the later steps hold throughout, so it peaks
  no higher than they do. SIFT's engine works on each rank's local tensors,
  so its selection step (the first) is tracked;
* FSDP2 keeps its communication buffers alive from Python, the same on a
  CPU mesh as on CUDA: the last all-gather's output until the next
  all-gather (so a second layer's weights during forward), the last
  reduce-scatter's input until the next, and the next layer gathered ahead
  in backward. What CUDA adds, blocks freed but held until the streams
  meet, is the caching allocator's and is not counted.

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
# Methods whose optimizer steps on DTensors: their first step runs untracked (see the docstring).
DTENSOR_OPTIMIZED = ("full", "lora")
# bench/gpu.py's sift-5-lean without update_in_backward, which SIFT refuses on several processes.
LEAN = dict(density=0.05, state_dtype="bfloat16", master_weights=False, compact_indices=True)


@contextlib.contextmanager
def fake_process_group(world: int):
    """Rank 0 of ``world`` on torch's fake backend (no peers, no data moved), for the block only."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already set up in this process; simulate in a fresh one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _decoder_layers(model) -> torch.nn.ModuleList:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


@contextlib.contextmanager
def _ledger_off_device():
    """Keep SIFT's increment ledger off the counted device (it is host memory on a GPU)."""
    import siftune.core.engine

    saved = siftune.core.engine.LEDGER_DEVICE
    siftune.core.engine.LEDGER_DEVICE = torch.device("meta")
    try:
        yield
    finally:
        siftune.core.engine.LEDGER_DEVICE = saved


def _build(method: str, size: str, dtype: torch.dtype, device: str, rank: int):
    """bench/gpu.py's model of ``size`` on ``device`` (``meta``: to become fake), with LoRA's adapters."""
    model = gpu.build(size, device).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if method == "lora":  # adapters first, then shard the whole (as torchtune does)
        import peft

        with torch.device(device):
            model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=gpu.TARGETS,
                                                               lora_dropout=0.0))
    return model


def _shard_and_set_up(method: str, model, mesh, rank: int):
    """``fully_shard`` per decoder layer and at the root, then ``method``'s optimizer (and engine)."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if next(model.parameters()).device.type == "meta":
        model.to_empty(device=HOST)  # under FakeTensorMode: fake, each rank's shard only
    if method == "lora":
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=1e-4, fused=True), None
    if method == "sift-5-lean":
        import siftune

        engine = siftune.attach(model, siftune.SiftConfig(target_modules=gpu.TARGETS, score="grad", **LEAN))
        model.enable_input_require_grads()
        return model, engine.optimizer(lr=1e-4), engine
    return gpu.setup(method, model, rank, fused=True)


def _step(model, opt, ids) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del loss


def simulate(method: str, size: str = "7b", world: int = 8, seq: int = 2048, batch: int = 1, warmup: int = 1,
             rank: int = 64, dtype: torch.dtype = torch.bfloat16) -> dict:
    """One rank of ``method`` under FSDP2 on ``world`` GPUs: per-step device peaks and their parts."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh

    started = time.time()
    model = _build(method, size, dtype, "meta", rank)  # real meta tensors: no init kernels to run
    density = DENSITY.get(method)
    reads = HostReads(None if density is None else lambda t: math.ceil(density * t.numel()))
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_process_group(world))
        mesh = init_device_mesh(HOST.type, (world,))  # outside fake mode: the mesh reads its ranks
        for context in (FakeTensorMode(allow_non_fake_inputs=True), reads, cuda_kernels(HOST), _ledger_off_device()):
            stack.enter_context(context)
        model, opt, engine = _shard_and_set_up(method, model, mesh, rank)
        params = sum(p.numel() for p in model.parameters())  # global counts (DTensors)
        n_trainable = engine.num_trainable if engine else sum(p.numel() for g in opt.param_groups for p in g["params"])
        ids = torch.randint(0, 32000, (batch, seq), device=HOST)
        steps = []
        untracked = 1 if method in DTENSOR_OPTIMIZED else 0
        for step in range(untracked + warmup + 1):
            if step < untracked:
                _step(model, opt, ids)
                continue
            tracker = FSDPMemTracker(model, opt)  # one per step: it keeps one iteration's module stats
            tracker.track_inputs((ids,))
            with tracker:
                _step(model, opt, ids)
            peak = tracker.get_tracker_snapshot("peak").get(HOST, {})
            steps.append(dict(step=step - untracked, peak_gib=peak.get("Total", 0) / GiB,
                              parts_gib={str(k.value): v / GiB for k, v in peak.items() if k != "Total" and v},
                              after_gib=tracker.get_tracker_snapshot("current").get(HOST, {}).get("Total", 0) / GiB))
            del tracker
            gc.collect()
        local_state = engine.state_bytes(opt) if engine is not None else None
        local_selected = sum(int(i.numel()) for i in engine.selected.values()) if engine is not None else None
    import peft
    import transformers

    record = dict(method=method, size=size, world=world, seq=seq, batch=batch, gc=1, warmup=warmup,
                  rank=rank if method == "lora" else None, untracked_steps=untracked, params=params,
                  trainable=n_trainable, dtype=str(dtype).removeprefix("torch."),
                  device=f"simulated: rank 0 of {world} (fake process group), fake tensors, CUDA kernels",
                  peak_gib=max(s["peak_gib"] for s in steps), steps=steps,
                  host_reads_answered=reads.reads, sim_s=round(time.time() - started, 1),
                  torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    if engine is not None:
        record.update(density=engine.config.density, selected=engine.num_selected, selected_rank0=local_selected,
                      state_bytes_rank0=local_state)
    return record


@contextlib.contextmanager
def _reduce_scatter_without_a_copy():
    """gloo's reduce-scatter first copies its whole input (a transient NCCL's has not): reduce the input
    in place with an all-reduce and copy this rank's part out, as FSDP2's buffers are on a GPU."""
    plain = dist.reduce_scatter_single

    def reduce_scatter(output, input, group=None, op=dist.ReduceOp.SUM, async_op=False):
        dist.all_reduce(input, op=op, group=group)
        output.copy_(input.view(dist.get_world_size(group), -1)[dist.get_rank(group)].view_as(output))
        return dist.barrier(group=group, async_op=True) if async_op else None

    dist.reduce_scatter_single = reduce_scatter
    try:
        yield
    finally:
        dist.reduce_scatter_single = plain


def measure_cpu(method: str, size: str = "tiny", seq: int = 64, warmup: int = 1, rank: int = 64) -> dict:
    """The simulation's twin, run for real: this process's rank of a gloo job (launched as by torchrun)
    trains the same steps on this CPU in fp32; each step's peak bytes as torch's CPU allocator counts them
    (the profiler's allocation events), and for SIFT this rank's selected count."""
    from torch.distributed.device_mesh import init_device_mesh

    from siftune.parallel import distributed

    distributed.init()
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with _reduce_scatter_without_a_copy():
        return _measure(method, size, seq, warmup, rank, mesh)


def _measure(method: str, size: str, seq: int, warmup: int, rank: int, mesh) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from simulate import allocations

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = _build(method, size, torch.float32, "cpu", rank)
        model, opt, engine = _shard_and_set_up(method, model, mesh, rank)
        ids = torch.randint(0, 32000, (1, seq))
        for _ in range(1 if method in DTENSOR_OPTIMIZED else 0):
            _step(model, opt, ids)
    _, size_first, total_first = allocations(prof)[0]
    before = total_first - size_first  # what the count held before this run's first allocation
    peaks = []
    for _ in range(warmup + 1):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _step(model, opt, ids)
        peaks.append(max(total for _, _, total in allocations(prof)) - before)
    selected = sum(int(i.numel()) for i in engine.selected.values()) if engine is not None else None
    return dict(rank=dist.get_rank(), peaks=peaks, selected=selected)


def table(records: list[dict]) -> list[str]:
    """docs/distributed.md's table: per-GPU peak GiB, one row per method, one column per size."""
    sizes = sorted({r["size"] for r in records}, key=lambda s: (len(s), s))
    world = records[0]["world"] if records else 8
    lines = ["| method | " + " | ".join(f"{s.upper()} (GiB per GPU, {world} GPUs)" for s in sizes) + " |",
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
