"""Will a fine-tuning step fit, and what does it cost: simulated on fake tensors, without a GPU.

    from siftune.estimate import Setup, estimate, load_config
    result = estimate(load_config("llama-7b"), Setup("sift", density=0.05, gradient_checkpointing=True))
    result["peak_bytes"], result["parts"], result["step_s"]

The command is ``siftune estimate`` (:mod:`.command`); docs/estimate.md is the guide.
"""
from .extrapolate import estimate
from .fit import fit, parse_size
from .methods import METHODS, Setup
from .shapes import LLAMA_SHAPES, load_config

__all__ = ["estimate", "fit", "parse_size", "Setup", "METHODS", "LLAMA_SHAPES", "load_config"]
