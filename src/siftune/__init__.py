"""siftune: sparse increment fine-tuning (SIFT) of pretrained models.

    import siftune
    engine = siftune.attach(model, density=0.01, dense_modules=["classifier"])
    optimizer = engine.optimizer(lr=1e-4)
    ...  # loss.backward(); optimizer.step(); optimizer.zero_grad()
    engine.increment(base_model="path/or/name").save("out/")
"""
from .config import SiftConfig
from .core.engine import SiftEngine, attach
from .errors import (CheckpointError, ConfigError, DataError, DistributedError, IncrementError, ModelLoadError,
                     NonFiniteGradientError, SiftError, TargetError, WriteError)
from .artifacts.increment import SparseIncrement, TensorDelta
from .core.optim import SiftAdamW
from .core.reference import ReferenceSift

__version__ = "0.1.0"

__all__ = [
    "SiftConfig", "SiftEngine", "attach", "SiftAdamW", "SparseIncrement", "TensorDelta", "ReferenceSift",
    "SiftError", "ConfigError", "TargetError", "IncrementError", "DataError", "ModelLoadError",
    "NonFiniteGradientError", "CheckpointError", "WriteError", "DistributedError",
]
