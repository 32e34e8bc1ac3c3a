"""SIFT in transformers' Trainer and the trainers built on it (TRL's SFTTrainer, ...).

:class:`SiftMixin` turns any ``transformers.Trainer`` subclass into a SIFT
trainer; :class:`Trainer` is the plain case::

    class SiftSFTTrainer(SiftMixin, trl.SFTTrainer):
        pass

    trainer = SiftSFTTrainer(model=model, args=SFTConfig(...), train_dataset=chats,
                             sift_config=SiftConfig(density=0.01))
"""
from __future__ import annotations

import contextlib

import transformers

from ..config import SiftConfig
from ..core.engine import attach
from ..errors import ConfigError

# accelerate's parallelisms that shard or own the weights, which the engine's hooks must see whole.
_SHARDING = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
# Evaluation figures that describe the run's speed, not the model.
_TIMING_SUFFIXES = ("_runtime", "_per_second", "_preparation_time")


class SiftMixin:
    """Makes a ``transformers.Trainer`` subclass train a SIFT increment instead of the whole model.

    Put it first among the bases: ``class SiftSFTTrainer(SiftMixin, trl.SFTTrainer)``.
    The trainer builds, wraps and prepares its model as usual; SIFT is then
    attached to the model it trains. The mixin replaces only the optimizer
    (a :class:`SiftAdamW` built from ``TrainingArguments``: learning rate,
    betas, epsilon, weight decay, ``max_grad_norm``), gradient clipping
    (moved into the optimizer's step, the only place that sees the sparse
    gradients) and ``save_model``, which writes the increment
    (``increment.safetensors``, ``increment_config.json``, ``README.md``)
    instead of the dense model. Everything else, the subclass's own
    ``compute_loss`` and ``create_optimizer`` included, runs unchanged.

    Args:
        sift_config: the :class:`SiftConfig` to attach with.
        base_model: name or path recorded in saved increments. Default: the
            model config's ``_name_or_path``.
        increment_metadata: extra facts stored with saved increments (e.g.
            ``{"dataset": "my-chats"}``); ``task`` and ``labels`` are found
            from the model when not given here.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if transformers.Trainer not in mro or mro.index(SiftMixin) > mro.index(transformers.Trainer):
            raise TypeError(f"{cls.__name__}: SiftMixin must come before a transformers.Trainer subclass among the "
                            f"bases, e.g. class {cls.__name__}(SiftMixin, SFTTrainer)")

    def __init__(self, *args, sift_config: SiftConfig, base_model: str | None = None,
                 increment_metadata: dict | None = None, **kwargs):
        # Refused before the subclass wraps the caller's model in adapters.
        if kwargs.get("peft_config") is not None:
            raise ConfigError("SIFT trains a sparse increment of the model's own weights; drop peft_config "
                              "(SIFT and a PEFT adapter do not combine)")
        model = kwargs.get("model", args[0] if args else None)
        with _quantized_base_allowed(model, sift_config):
            super().__init__(*args, **kwargs)
        self._check_compatible()
        self.sift = attach(self.model, sift_config)
        # accelerate wraps the model in DistributedDataParallel after this. The engine's
        # ignore list keeps DDP off the targeted weights, whose selected entries the
        # engine exchanges; DDP averages the densely trained ones.
        self.sift.reduce_dense = self.accelerator.num_processes == 1
        if not self.sift.reduce_dense and not self.sift.dense:
            self.sift.detach()  # leave the model as it came
            raise ConfigError("under several processes accelerate wraps the model in DistributedDataParallel, which "
                              "refuses a model whose only trained weights are SIFT's (no dense_modules); train "
                              "with `siftune train` or your own loop instead, see docs/guides/distributed.md")
        config = getattr(self.model, "config", None)
        self.base_model = base_model or getattr(config, "_name_or_path", None) or None
        self.increment_metadata = {**_task_of(self.model), **(increment_metadata or {})}
        self._evaluations: list[tuple[str, dict]] = []  # ("eval at step N", metrics) of each evaluate()

    def _check_compatible(self) -> None:
        """Refuse what would silently train something else than the SIFT increment."""
        name = type(self).__name__
        kind = str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
        if kind == "FSDP" or self.args.fsdp or self.is_fsdp_enabled:
            # accelerate shards the model after SIFT attached to it, replacing the weights it trains.
            raise ConfigError(f"{name} does not run under accelerate's FSDP plugin; to train a sharded model use "
                              "`torchrun ... -m siftune.cli train --fsdp` or your own loop (fully_shard, then "
                              "siftune.attach), see docs/guides/distributed.md")
        if kind in _SHARDING:
            raise ConfigError(f"{name} runs under plain data parallelism (DDP) only, not {kind}; "
                              "see docs/guides/distributed.md")
        if self.model_init is not None:
            raise ConfigError(f"{name} cannot take model_init: train() would build a new model, without SIFT "
                              "attached; pass model=... instead")
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            raise ConfigError(f"{name} got a PeftModel; SIFT trains a sparse increment of the model's own "
                              "weights: pass the base model without adapters")
        if self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            raise ConfigError(f"{name} trains with SIFT's own sparse AdamW; do not pass `optimizers` or "
                              "`optimizer_cls_and_kwargs` (set lr, betas, weight decay in the TrainingArguments)")
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if "adamw" not in optim:
            raise ConfigError(f"{name} trains with SIFT's own sparse AdamW, not optim={optim!r}; leave "
                              "TrainingArguments.optim at its default")
        if self.args.load_best_model_at_end:
            raise ConfigError(f"{name} cannot load_best_model_at_end: its checkpoints hold increments, which the "
                              "Trainer cannot load back into the model; set load_best_model_at_end=False")

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            raise ConfigError(f"{type(self).__name__} cannot resume from a Trainer checkpoint: it holds the "
                              "increment, not SIFT's selection and optimizer state; start again, or train with "
                              "`siftune train --checkpoint-every N`, whose --resume can")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        # Set before delegating, so the Trainer's own code (and any subclass's
        # create_optimizer in between) keeps this optimizer instead of building a dense one.
        if self.optimizer is None:
            targs = self.args
            self.optimizer = self.sift.optimizer(
                lr=targs.learning_rate, betas=(targs.adam_beta1, targs.adam_beta2), eps=targs.adam_epsilon,
                weight_decay=targs.weight_decay, max_grad_norm=targs.max_grad_norm or None,
            )
        return super().create_optimizer(*args, **kwargs)

    def _clip_grad_norm(self, model):
        return None  # SiftAdamW.step clips: dense .grad alone would give the wrong norm

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    def increment(self):
        """The trained :class:`SparseIncrement`, with fp32 master values where kept.

        Its metadata holds ``increment_metadata``, the task and, once the
        trainer has evaluated, the metrics of the first and the last evaluation.
        """
        # After train(), accelerate has wrapped our optimizer; its master copies live inside.
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        values = optimizer.master_values() if optimizer is not None else None
        increment = self.sift.increment(base_model=self.base_model, values=values)
        increment.metadata.update(self.increment_metadata)
        if self._evaluations:
            # The first shows where training started from (the base, if evaluated before train()), the last where
            # it got; the same step twice keeps the later.
            increment.metadata["metrics"] = dict([self._evaluations[0], self._evaluations[-1]])
        return increment

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                   metric_key_prefix=metric_key_prefix)
        # Kept here, not read from state.log_history, which train() empties: an evaluation of
        # the base model before training belongs in the model card.
        lead = f"{metric_key_prefix}_"
        kept = {key[len(lead):]: value for key, value in metrics.items()
                if key.startswith(lead) and not key.endswith(_TIMING_SUFFIXES)}
        if kept:
            self._evaluations.append((f"eval at step {self.state.global_step}", kept))
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.increment().save(output_dir)


class Trainer(SiftMixin, transformers.Trainer):
    """A ``transformers.Trainer`` that trains a SIFT increment: pass ``sift_config`` besides the usual arguments.

    Schedulers, gradient accumulation and gradient checkpointing work as
    usual; see :class:`SiftMixin` for what changes and the extra arguments.
    """


def _task_of(model) -> dict:
    """``task`` (and ``labels``) as ``siftune train`` records them, from the model's head, so merge loads it alike."""
    kind = type(model).__name__
    if kind.endswith("ForCausalLM"):
        return {"task": "causal_lm"}
    if kind.endswith("ForSequenceClassification"):
        id2label = model.config.id2label
        return {"task": "classification", "labels": [id2label[i] for i in sorted(id2label)]}
    return {}


@contextlib.contextmanager
def _quantized_base_allowed(model, sift_config: SiftConfig):
    """Let transformers' Trainer take a quantized model that SIFT trains a delta beside.

    The Trainer refuses a quantized model unless adapters are loaded into it
    (it checks ``_hf_peft_config_loaded``, set by transformers' PEFT
    integration); the delta SIFT attaches right after is such an adapter.
    """
    if not getattr(model, "is_quantized", False) or getattr(model, "_hf_peft_config_loaded", False):
        yield
        return
    if sift_config.storage != "delta":
        raise ConfigError("the model is quantized: SIFT cannot write updates into its weights; pass "
                          "SiftConfig(storage='delta', ...) to train the increment beside them")
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        del model._hf_peft_config_loaded
