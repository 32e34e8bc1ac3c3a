"""One rank of an FSDP2 job on fake tensors: per-GPU device memory, simulated on a CPU.

The model is sharded by ``fully_shard`` per layer and at the root (as
torchtune and torchtitan do it) on a fake process group (``torch.testing``'s
``FakeStore``: collectives return at once with outputs of the right shapes)
and trained for a few steps. torch's ``FSDPMemTracker`` counts every
allocation of that rank and sorts it into sharded and unsharded parameters,
gradients, all-gather and reduce-scatter buffers, activations, temporaries
and optimizer state.

What stands in for the GPUs, beyond :mod:`.simulate`'s substitutions
(flash attention, fused AdamW, host reads answered 1):

* the fake device is ``cpu`` (FSDP2 needs a device mesh, and a CPU-only torch
  makes none for ``cuda``); SIFT's increment ledger, host memory on a GPU, is
  moved to ``meta`` for the run so that it is not counted;
* the fake process group moves no data, so SIFT's top-k cannot see the other
  ranks' scores; each rank is given an equal share of every tensor's k
  (``ceil(density x local entries)``), which is what a uniform gradient gives,
  and a rank holding more of the top-k needs more;
* an optimizer stepping on DTensors (``full``, ``lora``) runs one untracked
  step first: DTensor's sharding propagation on fake tensors of the whole
  shape would otherwise be counted at the first step. Their first tracked
  step holds the moments throughout, as every later step does;
* FSDP2 keeps its communication buffers alive from Python, the same on a CPU
  mesh as on CUDA (the last all-gather's output until the next, the last
  reduce-scatter's input until the next, the next layer gathered ahead in
  backward). What CUDA adds, blocks freed but held until the streams meet, is
  the caching allocator's and is not counted; nor are NCCL's own buffers.

``tests/test_simulate_fsdp.py`` runs the same steps for real in a two-process
gloo job (:func:`measure_cpu`) and holds rank 0's peaks to the simulation's.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import ConfigError
from .methods import Setup, density_of, logical_params, set_up, targeted_entries
from .shapes import layer_count
from .simulate import (HostReads, build_model, cuda_kernels, device_peak_only, fake_process_group, held_bytes, inputs,
                       module_tracking_quiet, phase_peak)

HOST = torch.device("cpu")  # the fake device: see the module's docstring
FSDP_METHODS = ("frozen", "full", "lora", "sift", "sift-lean")
# Methods whose optimizer steps on DTensors: their first step runs untracked (see the docstring).
DTENSOR_OPTIMIZED = ("full", "lora")
PARTS = {"Sharded Param": "parameters", "Unsharded Param": "parameters", "Buffer": "other",
         "Sharded Grad": "gradients", "Unsharded Grad": "gradients", "Activation": "activations",
         "Temp": "temporaries", "All Gather": "communication", "Reduce Scatter": "communication",
         "OptState": "optimizer_state", "Inputs": "activations"}


def layers_of(model, count: int) -> torch.nn.ModuleList:
    """The model's repeated blocks: the first ModuleList of ``count`` modules."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ConfigError(f"cannot find the {count} layers to shard in this model")


@contextlib.contextmanager
def _ledger_off_device():
    """Keep SIFT's increment ledger off the counted device (it is host memory on a GPU)."""
    from ..core import engine

    saved = engine.LEDGER_DEVICE
    engine.LEDGER_DEVICE = torch.device("meta")
    try:
        yield
    finally:
        engine.LEDGER_DEVICE = saved


def _build(config, setup: Setup, device: str):
    """The model of ``config`` on ``device`` (``meta``: to become fake), LoRA's adapters added before sharding;
    with its parameter count and the entries of its targeted weights, counted before the adapters."""
    model = build_model(config, setup, device)
    counts = logical_params(model), targeted_entries(model)
    if setup.gradient_checkpointing:
        from ..recipes.models import checkpoint_activations
        checkpoint_activations(model)
    model.config.use_cache = False
    if setup.method == "lora":  # adapters first, then shard the whole (as torchtune does)
        import peft

        with torch.device(device):
            model = peft.get_peft_model(model, peft.LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank,
                                                               target_modules="all-linear", lora_dropout=0.0))
    return model, counts


def _shard_and_set_up(config, setup: Setup, model, mesh, density: float):
    """``fully_shard`` per layer and at the root, then the method's optimizer (and engine)."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers_of(model, layer_count(config)):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if next(model.parameters()).device.type == "meta":
        model.to_empty(device=HOST)  # under FakeTensorMode: fake, each rank's shard only
        model.tie_weights()  # to_empty makes a new tensor for each module's reference to a tied weight
    if setup.method == "lora":
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=1e-4, fused=True), None
    return set_up(setup, model, density, fused=True, distributed=True)


def _step(model, opt, batch, tracker=None, phases=None) -> None:
    loss = model(**batch).loss
    if tracker is not None:
        phases["forward"] = phase_peak(tracker, HOST, PARTS)
    loss.backward()
    if tracker is not None:
        phases["backward"] = phase_peak(tracker, HOST, PARTS)
    del loss
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if tracker is not None:
        phases["optimizer"] = phase_peak(tracker, HOST, PARTS)


def check(setup: Setup) -> None:
    if setup.method not in FSDP_METHODS:
        raise ConfigError(f"{setup.method} is not simulated under FSDP; methods there: {', '.join(FSDP_METHODS)}")
    if setup.quantize:
        raise ConfigError("a quantized base is not simulated under FSDP (bitsandbytes' packed weights are not "
                          "sharded by fully_shard); estimate it on one GPU")


def trace(config, setup: Setup, world: int, warmup: int = 1) -> dict:
    """Rank 0 of ``setup`` under FSDP2 on ``world`` GPUs: per-phase peaks of each step, as
    :func:`.simulate.trace` gives them for one GPU (no roofline: communication is not modelled)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh

    check(setup)
    model, (base, entries) = _build(config, setup, "meta")  # real meta tensors: no init kernels to run
    density = density_of(setup, entries)
    sift = setup.method.startswith("sift")
    reads = HostReads((lambda t: math.ceil(density * t.numel())) if sift else None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_process_group(world))
        mesh = init_device_mesh(HOST.type, (world,))  # outside fake mode: the mesh reads its ranks
        for context in (FakeTensorMode(allow_non_fake_inputs=True), reads, cuda_kernels(HOST), _ledger_off_device()):
            stack.enter_context(context)
        model, opt, engine = _shard_and_set_up(config, setup, model, mesh, density)
        params = sum(p.numel() for p in model.parameters())  # global counts (DTensors)
        trainable = engine.num_trainable if engine else sum(p.numel() for p in model.parameters() if p.requires_grad)
        batch = inputs(config, setup, HOST)
        steps = []
        untracked = 1 if setup.method in DTENSOR_OPTIMIZED else 0
        for _ in range(untracked):
            _step(model, opt, batch)
        for _ in range(warmup + 1):
            tracker = FSDPMemTracker(model, opt)  # one per step: it keeps one iteration's module stats
            tracker._update_peak_stats = lambda peak_state, tracker=tracker: device_peak_only(tracker)
            tracker.track_inputs(tuple(batch.values()))
            phases = {}
            with module_tracking_quiet(), tracker:
                _step(model, opt, batch, tracker, phases)
            steps.append(dict(phases=phases, held=held_bytes(tracker, HOST)))
            del tracker
        selected = engine.num_selected if engine is not None else None
        rank_selected = sum(int(i.numel()) for i in engine.selected.values()) if engine is not None else None
        rank_state = engine.state_bytes(opt) if engine is not None else None
    return dict(base_params=base, params=params, trainable=trainable, selected=selected, targeted=entries,
                density=density if sift else None, world=world, steps=steps, roofline=None,
                first_step_roofline=None, selected_rank0=rank_selected, state_bytes_rank0=rank_state,
                host_reads=reads.reads)


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


def measure_cpu(config, setup: Setup, warmup: int = 1) -> dict:
    """The simulation's twin, run for real: this process's rank of a gloo job (launched as by torchrun)
    trains the same steps on this CPU in fp32; each step's peak bytes as torch's CPU allocator counts
    them (the profiler's allocation events), and for SIFT this rank's selected count."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.profiler import ProfilerActivity, profile

    from ..parallel import distributed
    from .simulate import allocations

    distributed.init()
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with _reduce_scatter_without_a_copy():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, (_, entries) = _build(config, setup, "cpu")
            density = density_of(setup, entries)
            model, opt, engine = _shard_and_set_up(config, setup, model, mesh, density)
            batch = inputs(config, setup, "cpu")
            for _ in range(1 if setup.method in DTENSOR_OPTIMIZED else 0):
                _step(model, opt, batch)
        _, size_first, total_first = allocations(prof)[0]
        before = total_first - size_first  # what the count held before this run's first allocation
        peaks = []
        for _ in range(warmup + 1):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                _step(model, opt, batch)
            peaks.append(max(total for _, _, total in allocations(prof)) - before)
    selected = sum(int(i.numel()) for i in engine.selected.values()) if engine is not None else None
    return dict(rank=dist.get_rank(), peaks=peaks, selected=selected)
