"""Peak of live CPU tensors in SIFT's steps, unstructured and structured, one method per process.

    python bench/tensor_peak.py               # bench/results/structured/tensor_peak.json (a few minutes)
    python bench/tensor_peak.py --quick       # a tiny random Llama, a smoke test; writes nothing

SmolLM2-135M (every q/k/v/o/gate/up/down weight targeted, LoRA r=8's count),
8 x 128 random tokens, fp32, one thread, 3 optimizer steps: the first
selects. Every tensor storage made while a step runs is counted from its
allocation until it is freed (a ``TorchDispatchMode`` sees every operator's
outputs; a weak reference sees the storage go), so the figures are the bytes
tensors hold beside the loaded model, at their highest in each phase
(forward, backward, optimizer step) of each step. A max RSS adds what the
allocator holds on to beyond live tensors and varies from run to run; these
do not. The process's max RSS is recorded beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

RESULTS = Path(__file__).parent / "results" / "structured" / "tensor_peak.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {"sift": None, "sift-rows": "rows", "sift-columns": "columns"}  # method -> SiftConfig.structure
MIB = 2**20


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages made under this mode and not freed yet; the highest per phase.

    ``model``'s parameters and buffers are not counted: a view of one (the
    transposed weight of a linear layer) or an in-place update of one (the
    optimizer's) returns its storage, which was made before the mode."""

    def __init__(self, model: torch.nn.Module | None = None):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now, self.phase, self.peaks = 0, None, {}
        tensors = [*model.parameters(), *model.buffers()] if model is not None else []
        self.model_storages = {t.untyped_storage().data_ptr() for t in tensors}

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.live or key in self.model_storages:  # empty, a view or in-place result of a
            return                                                      # counted one, or the model's own
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()
        weakref.finalize(storage, self._freed, key)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.now)

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._count(t)
        return out


def build(quick: bool):
    torch.manual_seed(0)
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True)
        return LlamaForCausalLM(config), 2, 16
    from siftune.recipes.models import load_model

    return load_model("smollm2", "causal_lm")[0], 8, 128


def run_one(method: str, steps: int, quick: bool) -> dict:
    """Train ``steps`` steps of ``method`` in this process; its peaks."""
    import siftune

    torch.set_num_threads(1)
    model, batch, length = build(quick)
    model.train()
    layers = [m for n, m in model.named_modules() if n.rpartition(".")[2] in TARGETS]
    density = sum(8 * (m.in_features + m.out_features) for m in layers) / sum(m.weight.numel() for m in layers)
    engine = siftune.attach(model, density=density, target_modules=TARGETS, structure=METHODS[method])
    optimizer = engine.optimizer(lr=2e-4)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (batch, length), generator=generator) for _ in range(steps)]
    tracker = LiveTensors(model)
    for step, ids in enumerate(batches):
        with tracker:
            tracker.phase = f"forward {step}"
            loss = model(input_ids=ids, labels=ids).loss
            tracker.phase = f"backward {step}"
            loss.backward()
            tracker.phase = f"step {step}"
            optimizer.step()
            optimizer.zero_grad()
            del loss
    return {"method": method, "selected": engine.num_selected, "batch": [batch, length], "steps": steps,
            "peak_mib": round(max(tracker.peaks.values()) / MIB, 1),
            "phase_peak_mib": {phase: round(v / MIB, 1) for phase, v in tracker.peaks.items()},
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama; writes nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the worker: one method, a JSON line on stdout
    ns = parser.parse_args()
    if ns.one:
        print(json.dumps(run_one(ns.one, ns.steps, ns.quick)))
        return
    records = []
    for method in ns.methods:  # each in a fresh process: its peaks are its own
        command = [sys.executable, __file__, "--one", method, "--steps", str(ns.steps)] + ["--quick"] * ns.quick
        out = subprocess.run(command, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        records.append(json.loads(out.strip().splitlines()[-1]))
        r = records[-1]
        print(f"{method}: live tensors peak {r['peak_mib']:.1f} MiB (max RSS {r['max_rss_mib']:.0f} MiB, "
              f"load {r['load_avg_1min']})", flush=True)
    if not ns.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
