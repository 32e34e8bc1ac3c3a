"""SIFT in the transformers Trainer: ``siftune.Trainer`` is a drop-in subclass."""
from __future__ import annotations

import transformers

from .config import SiftConfig
from .engine import attach
from .errors import ConfigError

# accelerate's parallelisms that shard or own the weights, which the engine's hooks must see whole.
_SHARDING = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


class Trainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains a SIFT increment instead of the whole model.

    Pass ``sift_config`` besides the usual arguments. The optimizer is a
    :class:`SiftAdamW` built from ``TrainingArguments`` (learning rate, betas,
    epsilon, weight decay, ``max_grad_norm``); schedulers, gradient
    accumulation and gradient checkpointing work as usual. Global-norm
    clipping moves into the optimizer's step, the only place that sees the
    sparse gradients. ``save_model`` writes the increment (``increment.safetensors``
    + ``increment_config.json``), not the dense model.

    Args:
        sift_config: the :class:`SiftConfig` to attach with.
        base_model: name or path recorded in saved increments. Default: the
            model config's ``_name_or_path``.
        increment_metadata: extra facts stored with saved increments (e.g.
            ``{"task": "classification", "labels": [...]}``).
    """

    def __init__(self, *args, sift_config: SiftConfig, base_model: str | None = None,
                 increment_metadata: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        kind = str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
        if kind in _SHARDING:
            raise ConfigError(f"siftune.trainer.Trainer runs under plain data parallelism (DDP) only, not {kind}; "
                              "see docs/distributed.md")
        self.sift = attach(self.model, sift_config)
        # accelerate wraps the model in DistributedDataParallel after this. The engine's
        # ignore list keeps DDP off the targeted weights, whose selected entries the
        # engine exchanges; DDP averages the densely trained ones.
        self.sift.reduce_dense = self.accelerator.num_processes == 1
        if not self.sift.reduce_dense and not self.sift.dense:
            self.sift.detach()  # leave the model as it came
            raise ConfigError("under several processes accelerate wraps the model in DistributedDataParallel, which "
                              "refuses a model whose only trained weights are SIFT's (no dense_modules); train "
                              "with `siftune train` or your own loop instead, see docs/distributed.md")
        config = getattr(self.model, "config", None)
        self.base_model = base_model or getattr(config, "_name_or_path", None)
        self.increment_metadata = increment_metadata or {}

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            self.optimizer = self.sift.optimizer(
                lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
            )
        return self.optimizer

    def _clip_grad_norm(self, model):
        return None  # SiftAdamW.step clips: dense .grad alone would give the wrong norm

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    def increment(self):
        """The trained :class:`SparseIncrement`, with fp32 master values where kept."""
        # After train(), accelerate has wrapped our optimizer; its master copies live inside.
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        values = optimizer.master_values() if optimizer is not None else None
        increment = self.sift.increment(base_model=self.base_model, values=values)
        increment.metadata.update(self.increment_metadata)
        return increment

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.increment().save(output_dir)
