"""``siftune bench``: SIFT, its ablations and its peers, trained and evaluated the same way.

    siftune bench --task classification --methods full lora sift-fixed sift-fixed:0.001 --seeds 0 1 2
    siftune bench --task causal_lm --methods base full lora:8 sift-fixed:matched --steps 40
    siftune bench --task classification --quick          # a few steps, into runs/bench-quick/
    siftune bench --report                               # tables and figure only

Every (method, setting, seed) runs in a fresh process, so that its peak
memory (max RSS) is its own, on identical data, held-out split, steps, batch,
schedule and seed; methods differ only in :mod:`siftune.bench.methods`. Each
finished run's record is merged into ``<results-dir>/<task>.json`` at once,
so an interrupted benchmark keeps what it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .methods import (DENSITY_METHODS, DTYPES, MATCHED_RANK, METHODS, QUANTIZED, RANDOM, RANDOM_OPTIONS, RANKED,
                      SELECT_FIRST, SIFT_MODES, MethodRun, prepare)
from ..core import heap
from ..recipes.loss import batch_loss
from ..errors import ConfigError

RESULTS_DIR = Path("bench/results")
QUICK_RESULTS_DIR = Path("runs/bench-quick")  # quick records never mix with the committed ones
SPLIT_SEED = 0  # the held-out split is the same for every seed: only training varies
WARMUP_FRACTION = 0.1  # linear warm-up over the first 10% of steps, then linear decay to 0


@dataclass(frozen=True)
class TaskSetup:
    """A task's model, data and sizes, and each method's learning rates."""

    model: str
    dataset: str
    steps: int
    batch_size: int
    max_length: int
    eval_size: int
    eval_batch_size: int
    lr: dict  # method -> learning rate of what it adapts
    dense_lr: dict  # method -> learning rate of the densely trained head (default: its lr)
    val_size: int = 0  # validation examples drawn from the training pool, to choose settings on

    def head_lr(self, method: str, lr: float) -> float:
        """The head's rate of ``method`` at rate ``lr`` when none is given."""
        return self.dense_lr.get(method, lr)


TASKS = {
    "classification": TaskSetup(
        "minilm", "rotten_tomatoes", steps=300, batch_size=16, max_length=64, eval_size=2000, eval_batch_size=64,
        lr={"head": 2e-3, "full": 5e-5, "lora": 5e-4, "shira": 5e-4, "random": 2e-3, "sift-fixed": 2e-3,
            "sift-periodic": 2e-3, "sift-per_step": 2e-3, "sift-rows": 2e-3, "sift-columns": 2e-3, "random-rows": 2e-3,
            "random-columns": 2e-3},
        # SIFT's head rate is examples/demo.yaml's dense_lr; peft trains its head copy at the adapter's rate.
        dense_lr={"head": 2e-3, "random": 2e-3, "sift-fixed": 2e-3, "sift-periodic": 2e-3, "sift-per_step": 2e-3,
                  "sift-rows": 2e-3, "sift-columns": 2e-3, "random-rows": 2e-3, "random-columns": 2e-3},
        val_size=1000,
    ),
    "causal_lm": TaskSetup(
        "smollm2", "chatterbot", steps=40, batch_size=8, max_length=128, eval_size=200, eval_batch_size=8,
        lr={"full": 2e-5, "lora": 2e-4, "shira": 2e-4, "random": 2e-4, "sift-fixed": 2e-4, "sift-periodic": 2e-4,
            "sift-per_step": 2e-4, "qlora": 2e-4, "sift-nf4": 2e-4, "sift-bf16": 2e-4, "sift-rows": 2e-4,
            "sift-columns": 2e-4, "random-rows": 2e-4, "random-columns": 2e-4},
        dense_lr={}, val_size=200,
    ),
}
# Quick mode: every run takes seconds; it checks the plumbing, not the methods.
QUICK = {"steps": 3, "batch_size": 4, "max_length": 32, "eval_size": 32, "eval_batch_size": 16, "val_size": 16}
DEFAULT_METHODS = {
    "classification": ["full", "lora", "sift-fixed:matched", "sift-fixed:0.001", "random:0.001"],
    "causal_lm": ["base", "full", "lora", "sift-fixed:matched", "shira"],
}


@dataclass
class RunSpec:
    """Everything one benchmark run depends on; a worker process gets it as JSON."""

    task: str
    method: str
    setting: float | int | str | None
    seed: int
    steps: int
    batch_size: int
    max_length: int
    eval_size: int
    eval_batch_size: int
    lr: float
    dense_lr: float
    model: str
    dataset: str
    quick: bool = False
    threads: int = 2
    # Defaults that mean "as before" for specs written without them (a running benchmark's).
    val_size: int = 0
    sift: dict = field(default_factory=dict)  # SiftConfig fields for sift-* methods, e.g. {"budget": "global"}
    packing: bool = False  # causal_lm: whole examples end to end in each row (siftune.recipes.data)
    increments: str = ""  # a folder: each SIFT run's increment saved into <folder>/<method>-<setting>-lr<lr>-seed<seed>

    @property
    def token(self) -> str:
        return self.method if self.setting is None else f"{self.method}:{self.setting}"

    def command(self) -> str:
        """The ``siftune bench`` command that repeats exactly this run."""
        parts = ["siftune", "bench", "--task", self.task, "--methods", self.token, "--seeds", str(self.seed),
                 "--steps", str(self.steps), "--batch-size", str(self.batch_size), "--max-length",
                 str(self.max_length), "--eval-size", str(self.eval_size), "--val-size", str(self.val_size),
                 "--lr", f"{self.method}={self.lr:g}",
                 "--dense-lr", f"{self.method}={self.dense_lr:g}", "--threads", str(self.threads)]
        defaults = TASKS[self.task]
        if self.model != defaults.model:
            parts += ["--model", self.model]
        if self.dataset != defaults.dataset:
            parts += ["--dataset", self.dataset]
        if self.sift:
            parts += ["--sift", *(f"{k}={v}" for k, v in sorted(self.sift.items()))]
        saving = ["--save-increments", self.increments] if self.increments else []
        return shlex.join(parts + (["--packing"] if self.packing else []) + (["--quick"] if self.quick else [])
                          + saving)

    def increment_folder(self) -> Path:
        """Where ``--save-increments`` puts this run's increment."""
        return Path(self.increments) / f"{self.method}-{self.setting}-lr{self.lr:g}-seed{self.seed}"


def parse_method(token: str) -> tuple[str, float | int | str | None]:
    """``"lora:16"`` -> ("lora", 16); ``"sift-fixed"`` -> ("sift-fixed", "matched"); ``"full"`` -> ("full", None)."""
    name, _, setting = token.partition(":")
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    if name in RANKED:
        if setting and not setting.isdigit():
            raise ConfigError(f"{name} takes a rank, as in {name}:8; got {token!r}")
        return name, int(setting) if setting else MATCHED_RANK
    if name in DENSITY_METHODS:
        if not setting or setting == "matched":
            return name, "matched"
        try:
            density = float(setting)
        except ValueError:
            raise ConfigError(f"{name} takes a density or 'matched', as in {name}:0.001; got {token!r}") from None
        if not 0 < density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {token!r}")
        return name, density
    if setting:
        raise ConfigError(f"method {name!r} takes no setting; got {token!r}")
    return name, None


def parse_rates(values: list[str] | None) -> tuple[float | None, dict[str, float]]:
    """``["1e-3"]`` sets every method's rate; ``["lora=1e-3", ...]`` sets some."""
    every, per_method = None, {}
    for value in values or []:
        name, _, rate = value.rpartition("=")
        try:
            number = float(rate)
        except ValueError:
            raise ConfigError(f"a learning rate is a number or method=number, got {value!r}") from None
        if name and name not in METHODS:
            raise ConfigError(f"unknown method {name!r} in {value!r}; methods: {', '.join(METHODS)}")
        if name:
            per_method[name] = number
        else:
            every = number
    return every, per_method


def parse_sift_options(values: list[str] | None) -> dict:
    """``["budget=global", "selection_batches=4"]`` -> SiftConfig fields, checked by SiftConfig."""
    from ..config import SiftConfig

    options = {}
    for value in values or []:
        name, equals, text = value.partition("=")
        if not equals:
            raise ConfigError(f"--sift takes field=value pairs, as in budget=global; got {value!r}")
        for kind in (int, float, str):
            try:
                options[name] = kind(text)
                break
            except ValueError:
                continue
    fixed = sorted(set(options) & {"density", "target_modules", "dense_modules", "mode", "max_grad_norm", "seed",
                                   "storage"})
    if fixed:
        raise ConfigError(f"--sift {fixed[0]}=... : the method and its setting choose {fixed[0]}; --sift takes "
                          "the selection options (score, budget, min_density, selection_batches, ...)")
    if options.get("selection") in ("gradient", "random"):
        raise ConfigError(f"--sift selection={options['selection']}: the method chooses it (sift-* the gradient's, "
                          "random the random one); --sift selection= takes mixed, balanced or grow_drop")
    if options.get(SELECT_FIRST, 1) not in (0, 1):
        raise ConfigError(f"--sift {SELECT_FIRST}=1 completes the selection window on batches of its own before "
                          f"training (0: within the first steps, the default); got {options[SELECT_FIRST]!r}")
    # unknown fields and bad values: one-line ConfigError (grow_drop runs with sift-periodic)
    config = {k: v for k, v in options.items() if k != SELECT_FIRST}
    factor = config.get("shrink_from", 10.0) if config.get("shrink_after") else 1.0  # the method sets the density
    SiftConfig.from_dict({"density": 1.0 / factor if isinstance(factor, (int, float)) and factor > 1 else 1.0,
                          **config, **({"mode": "periodic"} if options.get("selection") == "grow_drop"
                                                       else {})})
    return options


def plan(task: str, methods: list[str], seeds: list[int], quick: bool = False, steps: int | None = None,
         lr: list[str] | None = None, dense_lr: list[str] | None = None, threads: int = 2,
         lr_grid: list[float] | None = None, sift: list[str] | None = None, **sizes) -> list[RunSpec]:
    """The runs for ``methods`` x ``seeds`` (x ``lr_grid``: factors of each method's rate); ``sizes`` may
    override batch_size, max_length, eval_size, val_size, eval_batch_size, model, dataset, packing. ``sift``:
    SiftConfig fields (``field=value``) for the sift-* methods."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if sizes.get("packing") and task != "causal_lm":
        raise ConfigError("--packing joins causal_lm examples into rows; the classification task holds one "
                          "example a row: drop --packing")
    setup = TASKS[task]
    values = {"steps": setup.steps, "batch_size": setup.batch_size, "max_length": setup.max_length,
              "eval_size": setup.eval_size, "eval_batch_size": setup.eval_batch_size, "model": setup.model,
              "dataset": setup.dataset, "val_size": setup.val_size}
    if quick:
        values.update(QUICK)
    values.update({k: v for k, v in sizes.items() if v is not None})
    if steps is not None:
        values["steps"] = steps
    lr_all, lr_each = parse_rates(lr)
    dense_all, dense_each = parse_rates(dense_lr)
    options = parse_sift_options(sift)
    if any(f <= 0 for f in lr_grid or []):
        raise ConfigError(f"--lr-grid takes factors > 0 of each method's rate, got {lr_grid}")
    runs = []
    for token in methods:
        method, setting = parse_method(token)
        if options.get("selection") == "grow_drop" and method in SIFT_MODES and method != "sift-periodic":
            raise ConfigError(f"--sift selection=grow_drop drops and grows at each refresh: run it as "
                              f"sift-periodic (with refresh_every=N), not {method}")
        base_rate = lr_each.get(method, lr_all or setup.lr.get(method, 0.0))
        # The same relative grid for every method: their good rates differ by 40x (full vs SIFT).
        for rate in [float(f"{base_rate * f:.6g}") for f in lr_grid] if lr_grid and method != "base" else [base_rate]:
            head_rate = dense_each.get(method, dense_all or setup.head_lr(method, rate))
            for seed in seeds:
                runs.append(RunSpec(task, method, setting, seed, lr=rate, dense_lr=head_rate, quick=quick,
                                    threads=threads, sift=_options_of(method, options),
                                    **{**values, "steps": 0 if method == "base" else values["steps"]}))
    return runs


def _options_of(method: str, options: dict) -> dict:
    """The ``--sift`` options a method runs with: all of them for the sift-* methods, those that apply to
    components drawn at random (``RANDOM_OPTIONS``) for random components, none for the others."""
    if method in SIFT_MODES:
        return options
    if method in RANDOM:
        return {k: v for k, v in options.items() if k in RANDOM_OPTIONS}
    return {}


# ------------------------------------------------------------------ one run (worker side)

def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_steps(model, optimizer, stream, steps: int) -> tuple[list[float], list[float]]:
    """The one loop every method trains with: forward, backward, step, schedule.

    Returns per-step training losses and seconds; a step's seconds exclude
    making its batch, so step times compare the methods' compute only. A
    line on stderr every tenth of the run shows a long run's progress.
    """
    from ..recipes.train import _warmup_then_decay

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_decay(warmup_steps(steps), steps))
    model.train()
    losses, seconds = [], []
    for _ in range(steps):
        loss, took = _step(model, optimizer, next(stream))
        scheduler.step()
        seconds.append(took)
        losses.append(loss)
        if len(losses) % max(1, steps // 10) == 0:
            print(f"  step {len(losses)}/{steps}: loss {losses[-1]:.4f}, {seconds[-1]:.2f} s", file=sys.stderr,
                  flush=True)
    model.eval()
    return losses, seconds


def _step(model, optimizer, batch) -> tuple[float, float]:
    """One optimizer step on ``batch``: its training loss and seconds."""
    started = time.perf_counter()
    loss = batch_loss(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach()), time.perf_counter() - started


def warmup_steps(steps: int) -> int:
    return max(1, round(WARMUP_FRACTION * steps))


def _load(spec: RunSpec):
    """The run's data split, labels, freshly loaded model and batch maker."""
    from ..recipes import data, models
    from ..recipes.loss import check_packing
    from ..recipes.train import TrainArgs, _BatchMaker

    examples = data.load_examples(spec.dataset, spec.task)
    train_set, eval_set = data.split_examples(examples, spec.eval_size, seed=SPLIT_SEED)
    labels = data.label_names(train_set) if spec.task == "classification" else None
    torch.manual_seed(spec.seed)  # the new head's initialisation, the same for every method
    model, tokenizer = models.load_model(spec.model, spec.task, labels=labels, quantize=QUANTIZED.get(spec.method),
                                         dtype=DTYPES.get(spec.method, torch.float32))
    if spec.packing:
        check_packing(model)
    batches = _BatchMaker(TrainArgs(model=spec.model, dataset=spec.dataset, task=spec.task, seed=spec.seed,
                                    batch_size=spec.batch_size, max_length=spec.max_length, packing=spec.packing,
                                    eval_batch_size=spec.eval_batch_size), tokenizer, labels)
    return train_set, eval_set, labels, model, batches


def run_one(spec: RunSpec) -> dict:
    """Load, prepare, train and evaluate one run in this process; its record."""
    from ..recipes.data import split_examples
    from ..recipes.train import evaluate

    torch.set_num_threads(spec.threads)
    load_avg = os.getloadavg()[0]
    train_set, eval_set, labels, model, batches = _load(spec)
    val_set = []
    if spec.val_size:  # from the training pool: the held-out (test) split is never used to choose settings
        train_set, val_set = split_examples(train_set, spec.val_size, seed=SPLIT_SEED)
    load_mib = _max_rss_mib()
    prepared = prepare(model, MethodRun(spec.method, spec.task, spec.setting, spec.lr, spec.dense_lr, spec.seed,
                                        sift=spec.sift))
    losses, seconds = [], []
    if spec.steps and prepared.select is not None:  # --sift select_first=1: the window on batches of its own
        prepared.select(batches.train_forever(train_set))
    if spec.steps:
        losses, seconds = train_steps(prepared.model, prepared.optimizer, batches.train_forever(train_set),
                                      spec.steps)
    peak_mib = _max_rss_mib()  # before evaluation: the training peak
    if spec.increments and prepared.increment is not None:
        prepared.increment().save(spec.increment_folder())
    metrics = evaluate(prepared.model, batches.eval(eval_set), spec.task)
    metric = "accuracy" if spec.task == "classification" else "loss"
    val_value = evaluate(prepared.model, batches.eval(val_set), spec.task)[metric] if val_set else None
    record = {
        "task": spec.task, "method": spec.method,
        "setting": spec.setting if spec.setting is not None else "",
        "density": prepared.density, "rank": prepared.rank,
        "trainable": prepared.trainable, "trainable_head": prepared.head,
        "metric": metric, "value": metrics[metric], "val_value": val_value, "val_examples": len(val_set),
        "sift": _selection_options(spec),
        "step_s": statistics.median(seconds[1:] or seconds) if seconds else None,  # step 1 selects: not typical
        "first_step_s": seconds[0] if seconds else None,  # SIFT selects in it
        "train_s": round(sum(seconds), 2), "peak_mib": round(peak_mib, 1), "load_mib": round(load_mib, 1),
        "heap_trim": heap.enabled(), "increment_bytes": prepared.increment_bytes(),
        "steps": spec.steps, "seed": spec.seed, "lr": spec.lr, "dense_lr": spec.dense_lr,
        "batch_size": spec.batch_size, "max_length": spec.max_length, "packing": spec.packing,
        "warmup_steps": warmup_steps(spec.steps),
        "eval_examples": len(eval_set), "model": spec.model, "dataset": spec.dataset, "quick": spec.quick,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "machine": _machine(spec.threads), "load_avg_1min": round(load_avg, 2), "versions": _versions(),
        "command": spec.command(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if spec.task == "classification":
        counts = [sum(e["label"] == label for e in eval_set) for label in labels]
        record["majority_accuracy"] = max(counts) / len(eval_set)
    else:
        record["perplexity"] = metrics["perplexity"]
        record["eval_tokens"] = metrics["tokens"]
    return record


def _machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch threads"


def _versions() -> dict:
    import peft
    import transformers

    from .. import __version__

    return {"siftune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def in_turns(steppers: list, batches, rounds: int, report=None) -> list[list]:
    """Each of ``steppers`` called on the same batch in turn, ``rounds`` + 1 times (the order reversed
    every other round, so that none always follows another); what each returned, round 0 left out
    (SIFT selects there). ``report(round, returned)``, if given, is called after every round with what
    each stepper returned in it, in the steppers' order."""
    seen: list[list] = [[] for _ in steppers]
    for round_ in range(rounds + 1):
        batch = next(batches)
        returned = [None] * len(steppers)
        for i in list(range(len(steppers)))[::1 if round_ % 2 == 0 else -1]:
            returned[i] = steppers[i](batch)
            if round_:
                seen[i].append(returned[i])
        if report is not None:
            report(round_, returned)
    return seen


def paired_step_times(runs: list[RunSpec], steps: int) -> dict:
    """Median step seconds of several methods timed in turns, in one process, on the same batches.

    On shared cores the load changes from minute to minute, so separate
    runs' ``step_s`` differ by more than the methods do. Here every method
    takes one step in turn (the order reversed every other round), so all of
    them see the same load and their ratios are meaningful.
    """
    torch.set_num_threads(runs[0].threads)
    load_avg = os.getloadavg()[0]
    prepared, stream = [], None
    for spec in runs:
        train_set, _, _, model, batches = _load(spec)
        prepared.append(prepare(model, MethodRun(spec.method, spec.task, spec.setting, spec.lr, spec.dense_lr,
                                                 spec.seed, sift=spec.sift)))
        prepared[-1].model.train()
        stream = stream or batches.train_forever(train_set)
    def report(round_: int, took: list[float]) -> None:  # a line a round: a long timing shows progress
        what = "selects, not counted" if round_ == 0 else f"{round_}/{steps}"
        print(f"  round {what}: " + ", ".join(f"{spec.token} {t:.2f} s" for spec, t in zip(runs, took)),
              file=sys.stderr, flush=True)

    seconds = in_turns([lambda batch, p=p: _step(p.model, p.optimizer, batch)[1] for p in prepared], stream, steps,
                       report)
    first = runs[0]
    return {"task": first.task, "steps": steps, "batch_size": first.batch_size, "max_length": first.max_length,
            "packing": first.packing, "step_s": {spec.token: statistics.median(s) for spec, s in zip(runs, seconds)},
            "trainable": {spec.token: p.trainable for spec, p in zip(runs, prepared)},
            "machine": _machine(first.threads), "load_avg_1min": round(load_avg, 2), "versions": _versions(),
            "command": shlex.join(["siftune", "bench", "--task", first.task, "--methods", *[r.token for r in runs],
                                   "--paired-steps", str(steps), "--threads", str(first.threads)]
                                  + (["--packing"] if first.packing else [])),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _selection_options(spec) -> dict:
    """The ``--sift`` options of a record; for a gradient-selecting SIFT method with the score it ran
    with, given or not, so that records stay apart when SiftConfig's default changes."""
    from ..config import SiftConfig

    if not spec.method.startswith("sift-"):
        return dict(spec.sift)
    return {"score": SiftConfig.__dataclass_fields__["score"].default, **spec.sift}


# ------------------------------------------------------------------ many runs (parent side)

def record_key(record: dict) -> tuple:
    """Records with the same key are the same experiment: a new one replaces the old."""
    return (record["method"], str(record["setting"]), record["seed"], record["steps"], record["lr"],
            record["dense_lr"], record["batch_size"], record["max_length"], record.get("val_examples", 0),
            json.dumps(record.get("sift") or {}, sort_keys=True), bool(record.get("packing")))


def merge_records(path: Path, new: list[dict]) -> list[dict]:
    """Write ``path`` (a JSON list) with ``new`` replacing records of the same key; returns all."""
    from ..artifacts.io import atomic_write_text

    records = json.loads(path.read_text()) if path.is_file() else []
    keys = {record_key(r) for r in new}
    records = [r for r in records if record_key(r) not in keys] + new
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(records, indent=1) + "\n")
    return records


def append_json(path: Path, entry: dict) -> None:
    """Add ``entry`` to the JSON list in ``path``."""
    from ..artifacts.io import atomic_write_text

    entries = json.loads(path.read_text()) if path.is_file() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(entries + [entry], indent=1) + "\n")


def run_isolated(spec: RunSpec) -> dict:
    """:func:`run_one` in a fresh Python process, so max RSS is this run's alone."""
    with tempfile.TemporaryDirectory(prefix="siftune-bench-") as folder:
        out = Path(folder) / "record.json"
        cmd = [sys.executable, "-m", "siftune.bench.runner", "--worker", json.dumps(dataclasses.asdict(spec)), str(out)]
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{spec.token} seed {spec.seed} failed (exit {done.returncode}); "
                               f"repeat it with: {spec.command()}")
        return json.loads(out.read_text())


def run_bench(runs: list[RunSpec], results_dir: Path, isolate: bool = True, log=print) -> list[dict]:
    """Run ``runs`` one after another, merging each record into ``results_dir/<task>.json`` as it ends.

    A failed run is reported and skipped, so one bad setting does not cost
    the rest of a long benchmark; returns the new records.
    """
    done = []
    for i, spec in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {spec.task} {spec.token} seed {spec.seed}: {spec.steps} steps, lr {spec.lr:g}")
        try:
            record = run_isolated(spec) if isolate else run_one(spec)
        except RuntimeError as exc:
            log(f"  FAILED: {exc}")
            continue
        merge_records(Path(results_dir) / f"{spec.task}.json", [record])
        done.append(record)
        step = f"{record['step_s']:.3f} s/step" if record["step_s"] is not None else "no training"
        log(f"  {record['metric']} {record['value']:.4f}, {record['trainable']:,} trainable, {step}, "
            f"peak {record['peak_mib']:.0f} MiB")
    return done


# ------------------------------------------------------------------ command line

def add_parser(sub) -> None:
    """The ``bench`` subcommand, on the ``siftune`` command's subparsers."""
    p = sub.add_parser("bench", help="benchmark SIFT against full fine-tuning, LoRA, SHiRA and ablations",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="classification",
                   help="classification (MiniLM-L6 on Rotten Tomatoes) or causal_lm (SmolLM2 on chatterbot); "
                   "sets the model, data, sizes and learning rates (default: classification)")
    p.add_argument("--methods", nargs="+", help="method[:setting] tokens: " + ", ".join(METHODS) +
                   "; lora/shira take a rank (default 8), random/sift-* a density or 'matched' (LoRA r=8's count, "
                   "the default)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="one run of every method per seed; the held-out split stays the same (default: 0)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the task's)")
    p.add_argument("--quick", action="store_true", help="a few tiny steps, results into runs/bench-quick/")
    p.add_argument("--lr", nargs="+", help="a learning rate for every method, or method=rate pairs")
    p.add_argument("--dense-lr", nargs="+", help="the head's learning rate, same forms as --lr")
    p.add_argument("--lr-grid", nargs="+", type=float, metavar="FACTOR",
                   help="run every method at each of these multiples of its rate (e.g. 0.5 1 2); --report then "
                   "picks each method's rate by its validation score")
    p.add_argument("--sift", nargs="+", metavar="FIELD=VALUE",
                   help="SiftConfig fields for the sift-* methods, e.g. budget=global score=grad_squared "
                   "selection_batches=4 min_density=0.0001; and the bench's select_first=1: the selection window "
                   "runs on batches of its own before training (SiftEngine.select), not within the first steps. "
                   "sift-* run the top-k with plain AdamW steps and selection=balanced runs line_cap=2 unless "
                   "given, as the recorded sweep did; SiftConfig's default is selection=balanced line_cap=1 "
                   "step_scale=input")
    for name, what in (("batch-size", "examples per training batch"), ("max-length", "tokens per example"),
                       ("eval-size", "held-out (test) examples"),
                       ("val-size", "validation examples taken from the training pool to choose rates on, 0 for "
                        "none"),
                       ("eval-batch-size", "examples per held-out batch")):
        default = "the task's, 1000 / 200" if name == "val-size" else "the task's"
        p.add_argument(f"--{name}", type=int, help=f"{what} (default: {default})")
    p.add_argument("--packing", action="store_true", help="causal_lm: fill each row of a batch with whole "
                   "examples up to --max-length tokens, each attending to itself only (default: one example a "
                   "row, padded to the batch's longest)")
    p.add_argument("--model", help="model name or folder (default: the task's)")
    p.add_argument("--dataset", help="built-in dataset or file (default: the task's)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    p.add_argument("--results-dir", type=Path, help="folder of the results files (default: bench/results, or "
                   "runs/bench-quick with --quick)")
    p.add_argument("--in-process", action="store_true", help="no subprocess per run (peak memory is then shared)")
    p.add_argument("--paired-steps", type=int, metavar="N", help="train nothing to the end: time N steps of "
                   "each method in turns in one process (fair step times on shared cores); appends to "
                   "<results-dir>/<task>_paired_timing.json")
    p.add_argument("--save-increments", type=Path, metavar="DIR", help="save each SIFT run's increment into "
                   "DIR/<method>-<setting>-lr<lr>-seed<seed>, for a later run's --sift select_from=... (where "
                   "{seed} stands for that run's seed)")
    p.add_argument("--report", action="store_true", help="run nothing; regenerate the tables and the "
                   "figure from the results")
    p.set_defaults(func=cmd_bench)


def cmd_bench(ns: argparse.Namespace) -> int:
    from .report import write_report

    results_dir = ns.results_dir or (QUICK_RESULTS_DIR if ns.quick else RESULTS_DIR)
    if ns.report:
        main_results = Path(results_dir) == RESULTS_DIR  # a study's own folder leaves the README alone
        for path in write_report(results_dir, readme=Path("README.md") if main_results else None,
                                 figure_dir=Path("docs/figures") if main_results else None):
            print(f"wrote {path}")
        return 0
    runs = plan(ns.task, ns.methods or DEFAULT_METHODS[ns.task], ns.seeds, quick=ns.quick, steps=ns.steps,
                lr=ns.lr, dense_lr=ns.dense_lr, threads=ns.threads, lr_grid=ns.lr_grid, sift=ns.sift,
                batch_size=ns.batch_size, max_length=ns.max_length, eval_size=ns.eval_size, val_size=ns.val_size,
                eval_batch_size=ns.eval_batch_size, model=ns.model, dataset=ns.dataset, packing=ns.packing)
    if ns.save_increments:
        runs = [dataclasses.replace(run, increments=str(ns.save_increments)) for run in runs]
    if ns.paired_steps:
        timing = paired_step_times(runs, ns.paired_steps)
        path = Path(results_dir) / f"{ns.task}_paired_timing.json"
        append_json(path, timing)
        print(json.dumps(timing["step_s"], indent=1))
        print(f"wrote {path}")
        return 0
    done = run_bench(runs, results_dir, isolate=not ns.in_process)
    for path in write_report(results_dir):
        print(f"wrote {path}")
    return 0 if len(done) == len(runs) else 1


def _worker(spec_json: str, out: str) -> None:
    from ..artifacts.io import atomic_write_text

    spec = RunSpec(**json.loads(spec_json))
    atomic_write_text(Path(out), json.dumps(run_one(spec)))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3])
