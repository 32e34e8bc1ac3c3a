"""siftune beside its peers on a GPU: peak memory and step time on a Llama-7B-shaped model.

    python bench/gpu.py                       # every method, one process each; bench/results/gpu.json
    python bench/gpu.py --methods frozen sift-5 --size tiny --out runs/gpu-smoke.json   # CPU smoke test

The protocol is the team's ``shared/bench/gpu_peers.py`` (whose numbers
ANCHORS.md quotes): a random-initialised Llama of the given shape, bf16 weights
on a GPU (fp32 on a CPU), sequence 2048, batch 1, non-reentrant gradient
checkpointing, q/k/v/o/gate/up/down targeted, 2 warm-up steps then the median
of 5 timed steps, and ``torch.cuda.max_memory_allocated`` over all of them.
Peers and siftune run here with that same loop, so one invocation measures
them side by side on the same card:

* ``frozen``: backward through every layer, no weight gradient: the floor;
* ``full``: torch AdamW (fused) on every weight;
* ``lora`` / ``shira``: peft adapters of rank ``--rank`` (64);
* ``sift-5``: SIFT fixed mode at 5% with the defaults (fp32 master values and
  moments): target (a), peak <= floor + 18 B per selected component;
* ``sift-5-lean``: 5% with bf16 moments, no master copies, 16-bit column
  indices and the update applied inside the backward hook: target (b);
* ``sift-lora``: SIFT at LoRA r=64's trainable count (2.47% on the 7B shape),
  fp32 master values and moments, the update applied in backward (16 B a
  component: LoRA pays ~12 B a parameter, so the default's 18 B would land
  just above 1.05x LoRA's peak): target (c).

Each method runs in its own process (peak memory is per process); a record
per method goes to ``--out`` as a JSON list (rewritten after each method), with
the device named. ``--budget`` (default 280 s) stops starting new methods
past it, so a 5-minute limit holds even if a method is slow. On a CPU it runs at
``--size tiny`` (fp32 weights, no peak memory), which the tests exercise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {  # hidden, layers, intermediate, heads: the shapes of gpu_peers.py
    "tiny": (256, 2, 688, 4),
    "1b": (2048, 22, 5632, 32),
    "7b": (4096, 32, 11008, 32),
    "13b": (5120, 40, 13824, 40),
    "70b": (8192, 80, 28672, 64),
}
KV_HEADS = {"70b": 8}  # Llama-2-70B's grouped-query attention; the others have a key/value head per head
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["frozen", "full", "lora", "shira", "sift-5", "sift-5-lean", "sift-lora"]
# On an nf4 base (quantize_nf4): QLoRA r=64 and SIFT with storage="delta" .
# Not in METHODS: a plain run measures the bf16 methods only; name these with --methods.
NF4_METHODS = ["qlora-64-nf4", "sift-5-nf4", "sift-5-lean-nf4", "sift-qlora-nf4", "sift-qlora-nf4-compact"]
RESULTS = Path(__file__).parent / "results" / "gpu.json"


def build(size: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=KV_HEADS.get(size, heads), vocab_size=32000,
                         max_position_embeddings=4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def lora_count(model, rank: int) -> int:
    """Trainable entries of a rank-``rank`` LoRA on the targeted Linears: r x (in + out) each."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS)


def targeted_count(model) -> int:
    """Entries of the targeted weights, counted by their logical shape (a packed 4-bit weight holds half)."""
    return sum(m.in_features * m.out_features for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS)


def quantize_nf4(model, compute_dtype: torch.dtype):
    """Swap each targeted Linear for a bitsandbytes nf4 ``Linear4bit`` (blocksize 64, no double quantization).

    Embeddings, norms and lm_head keep their dtype. The new layer's weight is a
    ``Params4bit`` holding the float weight, quantized when the layer moves to its
    device, as bitsandbytes does it.
    """
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not (type(module) is torch.nn.Linear and name.rsplit(".", 1)[-1] in TARGETS):
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=64,
                                         compress_statistics=False, quant_type="nf4", module=layer)
        if module.bias is not None:
            layer.bias = module.bias
        model.set_submodule(name, layer)
    return model


def setup(method: str, model, rank: int, fused: bool | None = None):
    """``(model, optimizer, engine or None)`` for ``method``; torch AdamW is fused on a GPU (or if ``fused``)."""
    fused = torch.cuda.is_available() if fused is None else fused
    if method == "frozen":
        for name, p in model.named_parameters():
            p.requires_grad = name == "model.norm.weight"
        model.enable_input_require_grads()  # backward still runs through every layer
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5), None
    if method == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused), None
    if method in ("lora", "shira", "qlora-64-nf4"):
        import peft

        config = (peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
                  if method != "shira" else peft.ShiraConfig(r=rank, target_modules=TARGETS))
        model = peft.get_peft_model(model, config)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused), None
    import siftune

    options = {"sift-5": dict(density=0.05),
               "sift-5-lean": dict(density=0.05, state_dtype="bfloat16", master_weights=False,
                                   compact_indices=True, update_in_backward=True),
               "sift-lora": dict(density=lora_count(model, rank) / targeted_count(model), update_in_backward=True),
               # nf4 bases: the values train beside the frozen 4-bit weights.
               "sift-5-nf4": dict(density=0.05, storage="delta"),
               "sift-5-lean-nf4": dict(density=0.05, storage="delta", delta_dtype="bfloat16", master_weights=False,
                                       state_dtype="bfloat16", update_in_backward=True, compact_indices=True),
               "sift-qlora-nf4": dict(density=lora_count(model, rank) / targeted_count(model), storage="delta"),
               "sift-qlora-nf4-compact": dict(density=lora_count(model, rank) / targeted_count(model),
                                              storage="delta", compact_indices=True),
               }[method]
    # The paper's score, with which every published figure was measured: score="grad_weight" (the
    # default) adds, at a selection only, one layer's weight in fp32 (dequantized on an
    # nf4 base: 180 MB at 7B), which fake tensors cannot dequantize in the simulation.
    engine = siftune.attach(model, siftune.SiftConfig(target_modules=TARGETS, score="grad", **options))
    model.enable_input_require_grads()  # as peft does: checkpointed layers need a grad-requiring input
    return model, engine.optimizer(lr=1e-4), engine


def worker(args) -> dict:
    """One method, in this process: build, train warm-up + timed steps, measure."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    started = time.time()
    model = build(args.size, device)
    params = sum(p.numel() for p in model.parameters())
    if args.method in NF4_METHODS:  # quantized as the layers move to the device
        model = quantize_nf4(model, model.dtype).to(device)
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model, opt, engine = setup(args.method, model, args.rank)
    build_s = time.time() - started
    trainable = engine.num_trainable if engine else sum(p.numel() for g in opt.param_groups for p in g["params"])
    ids = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses, state = [], [], None
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if engine is not None and step == args.warmup + args.steps - 1:
            state = engine.state_bytes(opt)  # gradient buffers are alive now (none with the lean set-up)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    record = dict(method=args.method, size=args.size, params=params, trainable=trainable, seq=args.seq,
                  batch=args.batch, gc=args.gc, device=torch.cuda.get_device_name() if cuda else "cpu",
                  torch=torch.__version__, step_s_median=statistics.median(times),
                  tokens_per_s=args.seq * args.batch / statistics.median(times), build_s=round(build_s, 1),
                  loss_first=losses[0], loss_last=losses[-1])
    if engine is not None:
        record.update(selected=engine.num_selected, density=engine.config.density,
                      state_bytes_per_component=round(sum(state.values()) / engine.num_selected, 3))
    if cuda:
        record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return record


def compare(records: list[dict]) -> list[str]:
    """The GPU targets (a)-(c), checked against the floor and LoRA of the same run."""
    by = {r["method"]: r for r in records}
    lines = []
    floor, lora = by.get("frozen", {}).get("peak_gib"), by.get("lora", {})
    if floor is not None and "sift-5" in by and "peak_gib" in by["sift-5"]:
        budget = floor + 18 * by["sift-5"]["selected"] / 2**30
        r = by["sift-5"]
        lines.append(f"(a) sift-5: {r['peak_gib']:.2f} GiB (budget {budget:.2f}), {r['step_s_median']:.3f} s "
                     f"(target 0.30 s)")
    if "sift-5-lean" in by and "peak_gib" in by["sift-5-lean"]:
        lines.append(f"(b) sift-5-lean: {by['sift-5-lean']['peak_gib']:.2f} GiB (target 16.1)")
    if "sift-lora" in by and "peak_gib" in by["sift-lora"] and "peak_gib" in lora:
        r = by["sift-lora"]
        lines.append(f"(c) sift-lora: {r['peak_gib']:.2f} GiB vs LoRA {lora['peak_gib']:.2f} (x1.05 allowed), "
                     f"{r['step_s_median']:.3f} s vs LoRA {lora['step_s_median']:.3f} s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS + NF4_METHODS, default=METHODS)
    parser.add_argument("--size", default="7b", choices=sorted(SIZES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gc", type=int, default=1, help="gradient checkpointing (1/0)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64, help="LoRA/SHiRA rank, and SIFT's matched count")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--budget", type=float, default=280, help="seconds; no method starts past it")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # worker mode: one method, record on stdout
    args = parser.parse_args()
    if args.method:
        print("RECORD " + json.dumps(worker(args)), flush=True)
        return
    started, records = time.time(), []
    for method in args.methods:
        if time.time() - started > args.budget:
            print(f"skipping {method}: past the {args.budget:.0f} s budget", flush=True)
            continue
        command = [sys.executable, __file__, "--method", method, "--size", args.size, "--seq", str(args.seq),
                   "--batch", str(args.batch), "--gc", str(args.gc), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--rank", str(args.rank)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RECORD ")]
        if done.returncode or not lines:
            record = {"method": method, "error": (done.stderr or done.stdout).strip()[-1500:]}
        else:
            record = json.loads(lines[-1][len("RECORD "):])
        record["command"] = " ".join(["python", "bench/gpu.py", *command[2:]])
        records.append(record)
        print(json.dumps(record), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1) + "\n")  # after every method: a crash loses nothing
    for line in compare(records):
        print(line)


if __name__ == "__main__":
    main()
