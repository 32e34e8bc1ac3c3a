"""``siftune train --report-to tensorboard``: training and held-out metrics by optimizer step.

Tags follow the transformers Trainer's, so runs of both read alike in one
TensorBoard: ``train/loss``, ``train/learning_rate``, ``train/grad_norm``,
``train/skipped_steps`` and ``eval/<metric>``. The held-out metrics before
training are logged at step 0, those after it at the last step. The gradient
norm is the optimizer's global norm before clipping; with
``update_in_backward`` the optimizer sees only the dense modules' gradients,
so none is logged.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ConfigError

def check_installed() -> None:
    """ConfigError saying what to install when the tensorboard package is missing (found without importing it)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("report_to tensorboard needs the tensorboard package; pip install siftune[tensorboard]")


class TensorBoard:
    """An event file in ``folder`` that a run, or a resumed run, writes its metrics to.

    A fresh run (``resumed_at`` 0) first deletes the event files of earlier runs
    in ``folder``, as it deletes their checkpoints, so their curves do not mix.
    A run resumed at step N drops what the interrupted run logged after step N.
    """

    def __init__(self, folder: Path, resumed_at: int = 0):
        check_installed()
        from torch.utils.tensorboard import SummaryWriter

        if not resumed_at:
            for old in Path(folder).glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(folder), purge_step=resumed_at + 1 if resumed_at else None)

    def train_step(self, step: int, loss: float, learning_rate: float, grad_norm: float | None,
                   skipped_steps: int) -> None:
        """One optimizer step's scalars; ``grad_norm`` None when the optimizer has no global norm."""
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/learning_rate", learning_rate, step)
        if grad_norm is not None:
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
        self.writer.add_scalar("train/skipped_steps", skipped_steps, step)

    def held_out(self, step: int, metrics: dict) -> None:
        """The held-out metrics (accuracy, or loss and perplexity); counts of examples are left out."""
        for name, value in metrics.items():
            if isinstance(value, float):
                self.writer.add_scalar(f"eval/{name}", value, step)

    def close(self) -> None:
        self.writer.close()
