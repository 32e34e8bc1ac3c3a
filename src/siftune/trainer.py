"""The public import path of the transformers Trainer integration (the code is in ``recipes/trainer.py``)."""
from .recipes.trainer import SiftMixin, Trainer

__all__ = ["SiftMixin", "Trainer"]
