"""The ``siftune train`` recipe: data -> model -> SIFT loop -> increment, metrics, plot.

Reads top to bottom as one straight line (:func:`run`); every knob is a field
of :class:`TrainArgs`, which the CLI fills from flags or a YAML file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SiftConfig
from .engine import attach
from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD_NAMES = ("classifier", "score")  # the new head of transformers' sequence classifiers


@dataclass
class TrainArgs:
    """Everything ``siftune train`` takes; YAML keys and ``--flags`` share these names.

    Args:
        model: model name or local folder ("minilm", "smollm2" are built in).
        dataset: built-in name ("rotten_tomatoes", "chatterbot") or a .csv/.jsonl file.
        task: "classification" or "causal_lm".
        output_dir: folder for the increment, metrics.json and loss_curve.png.
        density, mode, selection_batches, refresh_every, state_dtype, selection:
            as in :class:`SiftConfig`.
        target_modules: module names (or one regex); default: every Linear but the head.
        dense_modules: trained densely; default: the classification head, if any.
        lr: learning rate of the selected components. dense_lr: of dense modules (default lr).
        steps: optimizer steps; epochs: used instead when steps is 0.
        batch_size: examples per micro-batch; grad_accum: micro-batches per step.
        max_length: tokens per example. warmup_steps: linear warm-up, then linear decay to 0.
        weight_decay, max_grad_norm: AdamW decay on the weights, global-norm clip (0 = off).
        eval_size: held-out examples (count, or fraction if < 1). eval_batch_size: their batch size.
        dtype: weights' dtype. gradient_checkpointing: recompute activations in backward.
        seed: data order, split and initialisation of new heads.
        text_column, label_column, prompt_column, response_column: column names of user files.
    """

    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    task: str = "classification"
    output_dir: str = "runs/train"
    density: float = 0.01
    mode: str = "fixed"
    selection_batches: int = 1
    refresh_every: int = 100
    state_dtype: str = "float32"
    selection: str = "gradient"
    target_modules: list[str] | str | None = None
    dense_modules: list[str] | None = None
    lr: float = 1e-3
    dense_lr: float | None = None
    steps: int = 300
    epochs: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 64
    warmup_steps: int = 30
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_size: float = 2000
    eval_batch_size: int = 64
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    seed: int = 0
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None

    def validate(self) -> None:
        """ConfigError naming the field for every value no run could use."""
        if self.task not in ("classification", "causal_lm"):
            raise ConfigError(f"task must be 'classification' or 'causal_lm', got {self.task!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "max_length": self.max_length,
                    "eval_batch_size": self.eval_batch_size, "lr": self.lr}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            raise ConfigError(f"give steps > 0 or epochs > 0 (got steps={self.steps}, epochs={self.epochs})")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_steps, max_grad_norm and weight_decay must be >= 0")
        if self.eval_size < 0:
            raise ConfigError(f"eval_size must be >= 0, got {self.eval_size}")
        self.sift_config()  # density, mode, ... are checked there

    def sift_config(self, dense_modules=None) -> SiftConfig:
        return SiftConfig(
            density=self.density, mode=self.mode, selection_batches=self.selection_batches,
            refresh_every=self.refresh_every, state_dtype=self.state_dtype, selection=self.selection,
            target_modules=self.target_modules, dense_modules=dense_modules or self.dense_modules or (),
            max_grad_norm=self.max_grad_norm or None, seed=self.seed,
        )

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def run(args: TrainArgs, progress: bool = True) -> dict:
    """Train a SIFT increment as ``args`` says; returns the metrics it also writes."""
    from . import data

    args.validate()
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)

    examples = data.load_examples(args.dataset, args.task, text_column=args.text_column,
                                  label_column=args.label_column, prompt_column=args.prompt_column,
                                  response_column=args.response_column)
    eval_size = int(args.eval_size) if args.eval_size >= 1 else args.eval_size  # a count, or a fraction
    train_set, eval_set = data.split_examples(examples, eval_size, seed=args.seed)
    labels = data.label_names(train_set) if args.task == "classification" else None
    model, tokenizer = data.load_model(args.model, args.task, num_labels=len(labels) if labels else None,
                                       dtype=DTYPES[args.dtype], labels=labels)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = _BatchMaker(args, tokenizer, labels)
    print(f"siftune train: {args.model} on {args.dataset} ({len(train_set)} train / {len(eval_set)} held out)")

    before = evaluate(model, batches.eval(eval_set), args.task) if eval_set else {}
    _report("before", before)

    dense = args.dense_modules or _default_head(model, args.task)
    engine = attach(model, args.sift_config(dense_modules=dense))
    optimizer = engine.optimizer(lr=args.lr, dense_lr=args.dense_lr, weight_decay=args.weight_decay)
    steps = args.steps or max(1, math.ceil(args.epochs * len(train_set) / (args.batch_size * args.grad_accum)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_decay(args.warmup_steps, steps))

    model.train()
    losses, started = [], time.perf_counter()
    stream = batches.train_forever(train_set)
    bar = _progress(steps, progress)
    for step in range(steps):
        step_loss = 0.0
        for _ in range(args.grad_accum):
            loss = model(**next(stream)).loss / args.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(step_loss)
        seen = (step + 1) * args.batch_size * args.grad_accum
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}",
                        ex_s=f"{seen / (time.perf_counter() - started):.1f}")
        bar.update(1)
    bar.close()
    train_s = time.perf_counter() - started
    model.eval()

    after = evaluate(model, batches.eval(eval_set), args.task) if eval_set else {}
    _report("after", after)

    increment = engine.increment(base_model=args.model, values=optimizer.master_values())
    increment.metadata.update(task=args.task, labels=labels, dataset=args.dataset)
    increment.save(out)
    metrics = {
        "before": before, "after": after, "steps": steps, "train_s": round(train_s, 2),
        "step_s": round(train_s / steps, 4), "trainable": engine.num_trainable,
        "increment_bytes": increment.nbytes, "skipped_steps": optimizer.skipped_steps,
        "losses": losses, "args": dataclasses.asdict(args),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses(losses, out / "loss_curve.png", title=_title(args, before, after))
    print(f"wrote {out}/ ({increment.nbytes / 1e6:.2f} MB increment, {engine.num_trainable:,} trainable, "
          f"{train_s:.0f} s training)")
    return metrics


class _BatchMaker:
    """Tokenised batches for the task, with the run's sizes and seed."""

    def __init__(self, args: TrainArgs, tokenizer, labels):
        self.args, self.tokenizer, self.labels = args, tokenizer, labels

    def _make(self, examples, batch_size, shuffle, seed):
        from . import data

        a = self.args
        if a.task == "classification":
            return data.classification_batches(examples, self.tokenizer, self.labels, batch_size, a.max_length,
                                               shuffle=shuffle, seed=seed)
        return data.causal_lm_batches(examples, self.tokenizer, batch_size, a.max_length, shuffle=shuffle, seed=seed)

    def eval(self, examples):
        return self._make(examples, self.args.eval_batch_size, shuffle=False, seed=0)

    def train_forever(self, examples):
        epoch = 0
        while True:
            yield from self._make(examples, self.args.batch_size, shuffle=True, seed=self.args.seed + epoch)
            epoch += 1


@torch.no_grad()
def evaluate(model, batches, task: str) -> dict:
    """Held-out accuracy (classification) or response-token loss and perplexity (causal LM)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = tokens = 0.0
    for batch in batches:
        output = model(**batch)
        if task == "classification":
            correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
            total += batch["labels"].numel()
        else:
            logits = output.logits[:, :-1].float()
            target = batch["labels"][:, 1:]
            loss_sum += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"))
            tokens += int((target != -100).sum())
    model.train(was_training)
    if task == "classification":
        return {"accuracy": correct / max(total, 1), "examples": total}
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens)}


def _default_head(model, task: str) -> list[str]:
    if task != "classification":
        return []
    names = {n for n, _ in model.named_children()}
    return [n for n in HEAD_NAMES if n in names]


def _warmup_then_decay(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def _report(when: str, metrics: dict) -> None:
    if metrics:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"held-out {when}: {shown}")


def _title(args: TrainArgs, before: dict, after: dict) -> str:
    key = "accuracy" if args.task == "classification" else "loss"
    change = f"; held-out {key} {before[key]:.3f} -> {after[key]:.3f}" if key in before and key in after else ""
    return f"SIFT {args.mode}, density {args.density:g}, {args.model}{change}"


def plot_losses(losses: list[float], path: Path, title: str = "") -> None:
    """Training loss per step and its moving average, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, color="0.75", linewidth=0.8, label="per step")
    window = max(1, len(losses) // 20)
    if len(losses) >= window:
        smooth = [sum(losses[i - window + 1:i + 1]) / window for i in range(window - 1, len(losses))]
        ax.plot(range(window, len(losses) + 1), smooth, color="C0", label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
