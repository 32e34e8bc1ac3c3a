"""One estimate: a set-up's simulated peak per GPU, its parts and its step time, from two or three layers.

A model whose layers are all alike adds the same allocations per layer at
every point of a step: its parameters, gradients and optimizer state, the
input each checkpointed layer keeps, the activations of the layer running.
So each phase's peak (forward, backward, optimizer step) of each step is
``a + b x layers``: simulating 2 and 3 layers gives ``a`` and ``b`` exactly
(3 and 4 under FSDP2, whose backward gathers the next layer ahead),
and the model's peak is each phase's line taken at its layer count, the
highest. What is checked, not assumed: the config gives every layer the same
kind (no per-layer list that varies), and the base's parameter count at 2 and
3 layers extrapolates to the full model's exactly. A model with unlike
layers, or with no more layers than that, is simulated whole. ``tests/test_estimate.py``
holds the shortcut to the whole simulation.
"""
from __future__ import annotations

from ..errors import ConfigError
from . import calibration
from .methods import Setup, density_of
from .shapes import layer_count, uniform_layers, with_layers

GiB = 2**30
SHORT = (2, 3)
# Under FSDP2 the backward holds the running layer's and the prefetched next layer's buffers; with
# two layers there is no layer between the first and the last, so the line starts at three.
SHORT_FSDP = (3, 4)


def trace_once(config, setup: Setup, gpus: int, fsdp: bool, warmup: int) -> dict:
    """The simulation of ``config`` as it is (all its layers): one GPU, or rank 0 of ``gpus`` under FSDP2
    or plain data parallelism."""
    if fsdp:
        from .fsdp import trace as trace_fsdp

        return trace_fsdp(config, setup, gpus, warmup=warmup)
    from .simulate import trace

    return trace(config, setup, warmup=warmup, roofline=calibration.ROOFLINE, world=gpus)


def counts(config) -> tuple[int, int]:
    """Parameters of ``config``'s model and entries of its targeted weights, counted on ``meta``."""
    import torch

    from .methods import logical_params, targeted_entries
    from .simulate import build_model

    model = build_model(config, Setup("full", dtype="float32"), device=torch.device("meta"))
    return logical_params(model), targeted_entries(model)


def estimate(config, setup: Setup, gpus: int = 1, fsdp: bool = False, whole: bool = False, warmup: int = 1,
             progress=None) -> dict:
    """``setup`` on ``config``'s model: peak device bytes per GPU and its parts, and the step time.

    ``whole`` simulates every layer instead of extrapolating from two and three.
    ``progress`` (a tqdm bar or None) is advanced once per simulation.
    """
    record, setup, how = simulate_record(config, setup, gpus, fsdp, whole, warmup, progress)
    return _summary(record, config, setup, gpus, fsdp, how)


def simulate_record(config, setup: Setup, gpus: int = 1, fsdp: bool = False, whole: bool = False,
                    warmup: int = 1, progress=None) -> tuple[dict, Setup, str]:
    """The simulation's own record of every phase of every step (:func:`.simulate.trace`'s), for the whole
    model, extrapolated or not; the set-up as simulated (a trainable count made a density); how."""
    layers = layer_count(config)
    uneven = uniform_layers(config)
    params, entries = counts(config)
    if setup.trainable is not None:  # a count of the whole model's entries, whatever is simulated
        setup = setup.replace(density=density_of(setup, entries), trainable=None)
    short = SHORT_FSDP if fsdp else SHORT
    if whole or uneven or layers <= short[-1]:
        record = trace_once(config, setup, gpus, fsdp, warmup)
        _advance(progress, len(short))
        return record, setup, f"all {layers} layers simulated" + (f" ({uneven})" if uneven and not whole else "")
    traces = []
    for count in short:
        traces.append(trace_once(with_layers(config, count), setup, gpus, fsdp, warmup))
        _advance(progress, 1)
    record = extrapolate(traces, short, layers)
    if record["base_params"] != params:
        raise ConfigError(f"the layers of this {config.model_type} model are not alike: {short[0]} and {short[1]} "
                          f"layers extrapolate to {record['base_params']:,} parameters, the model has {params:,}; "
                          "estimate it with --whole")
    return record, setup, f"layers {short[0]} and {short[1]} simulated, extrapolated to {layers}"


def _advance(progress, n: int) -> None:
    if progress is not None:
        progress.update(n)


def extrapolate(traces: list[dict], counts: tuple[int, int], layers: int) -> dict:
    """The record of a ``layers``-layer model from the records of ``counts`` layers: every count, byte
    and roofline figure taken on the line through the two."""
    (a, b), (n0, n1) = traces, counts
    t = (layers - n0) / (n1 - n0)

    def line(x, y):
        if isinstance(x, dict) or isinstance(y, dict):  # an op only one of the two ran counts 0 in the other
            x, y = x or {}, y or {}
            return {k: line(x.get(k, 0), y.get(k, 0)) for k in set(x) | set(y)}
        if isinstance(x, list):
            return [line(u, v) for u, v in zip(x, y)]
        if isinstance(x, bool) or x is None or isinstance(x, str):
            return x
        value = x + (y - x) * t
        return round(value) if isinstance(x, int) and isinstance(y, int) else value

    out = {}
    for key in a:
        if key in ("density", "world", "host_reads"):
            out[key] = a[key]
        else:
            out[key] = line(a[key], b[key])
    return out


def _summary(record: dict, config, setup: Setup, gpus: int, fsdp: bool, how: str) -> dict:
    """What the command shows: the peak over every phase of every step, the parts there, and the step time."""
    peak_step, peak_phase, peak = 0, None, {"total": 0}
    for i, step in enumerate(record["steps"]):
        for phase, snap in step["phases"].items():
            if snap["total"] >= peak["total"]:
                peak_step, peak_phase, peak = i, phase, snap
    step_s, why = calibration.step_time(record.get("roofline"), setup, gpus, fsdp)
    steps = record["steps"]
    return dict(
        method=setup.method, model=getattr(config, "name_or_path", "") or config.model_type,
        layers=layer_count(config), gpus=gpus, fsdp=fsdp, setup=_setup_fields(setup), simulated=how,
        params=record["base_params"], trainable=record["trainable"], selected=record.get("selected"),
        targeted=record["targeted"], density=record.get("density"), peak_bytes=peak["total"],
        parts={k: v for k, v in peak.items() if k != "total" and v},
        peak_at=dict(step=_step_name(peak_step, len(steps), setup), phase=peak_phase),
        first_step_peak_bytes=max(s["total"] for s in steps[0]["phases"].values()),
        steady_step_peak_bytes=max(s["total"] for s in steps[-1]["phases"].values()),
        held_bytes=steps[-1]["held"], step_s=step_s, step_s_left_out=why or None,
        roofline=record.get("roofline"), notes=_notes(record, setup, gpus, fsdp))


def _notes(record: dict, setup: Setup, gpus: int, fsdp: bool) -> list[str]:
    """What the answer assumed or added, in words, for the table."""
    notes = []
    if setup.quantize == "int8":
        notes.append(f"int8 base: {setup.int8_outliers:.2%} of each layer's input columns taken as outlier "
                     "columns (--int8-outliers: the data decides; the LLM.int8() paper finds about 0.15% at 6.7B)")
    if gpus > 1 and not fsdp:
        if record.get("ddp_bucket_bytes"):
            notes.append("DDP with torch's defaults (25 MiB buckets, gradient_as_bucket_view off): its buckets "
                         "hold one more copy of the trainable gradients, as communication")
        elif setup.method.startswith("sift"):
            notes.append("no DDP: siftune all-reduces the selected gradient entries (an fp32 buffer at the step) "
                         "and, at a selection, an fp32 copy of each dense gradient, counted where they happen")
        else:
            notes.append("nothing to exchange: the same as one GPU")
    return notes


def _step_name(index: int, count: int, setup: Setup) -> str:
    if index == count - 1:
        return "steady"
    return "selection" if index == 0 and setup.method.startswith("sift") else "first"


def _setup_fields(setup: Setup) -> dict:
    import dataclasses

    fields = dataclasses.asdict(setup)
    if not fields["sift_options"]:
        del fields["sift_options"]
    return fields
