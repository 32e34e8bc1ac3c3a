"""How a simulated step relates to an H200: the measured anchors, the roofline's one factor, and
where that factor is trusted.

``python bench/estimate_calibration.py`` simulates the anchors' set-ups and
prints how far off each is (docs/estimate.md, "How far to trust it").
"""
from __future__ import annotations

# H200 SXM datasheet: dense bf16 tensor-core FLOP/s, HBM3e bytes/s.
H200_FLOPS = 989e12
H200_BYTES_PER_S = 4.8e12
ROOFLINE = (H200_FLOPS, H200_BYTES_PER_S)
# Measured on one H200 (shared/ANCHORS.md; torch 2.11, transformers 5.17, peft 0.21): peak GiB and
# median step s of a Llama-shaped model, bf16, seq 2048, batch 1, rank 64, per gradient checkpointing.
ANCHORS = {
    ("llama-7b", "frozen", True): (14.02, 0.193),
    ("llama-7b", "full", True): (50.41, 0.272),
    ("llama-7b", "lora", True): (15.83, 0.394),
    ("llama-7b", "lora", False): (32.13, 0.254),
    ("llama-1b", "lora", True): (4.09, 0.287),
    ("llama-1b", "shira", True): (4.52, 0.246),
}
# The one factor from roofline seconds to H200 seconds, fitted on the 7B floor only
# (0.193 s measured / 0.11539 s roofline); bench/estimate_calibration.py fits it again.
STEP_SCALE = 1.6726
# The 7B floor's roofline seconds per kernel (0.11539 s over 4,339 kernels): below half of it a
# step is bound by kernel launches and Python, which a roofline does not see (at the 1B shape the
# factor makes LoRA 69% too fast), and no step time is stated.
FLOOR_S_PER_KERNEL = 0.11539 / 4339
MIN_WORK_PER_KERNEL = 0.5


def step_time(roofline: dict | None, setup, gpus: int, fsdp: bool = False) -> tuple[float | None, str]:
    """``(seconds on one H200, "")`` where the calibration holds, else ``(None, why not)``."""
    if fsdp:
        return None, "no step time under FSDP: the roofline has no model of communication"
    if gpus > 1:
        return None, ("no step time on several GPUs: the roofline has no model of communication (DDP's "
                      "all-reduce of the gradients, overlapped with the backward; SIFT's of its selected entries)")
    if setup.dtype == "float32":
        return None, "no step time in float32: the calibration is of bf16 tensor-core steps"
    if setup.quantize:
        return None, f"no step time on an {setup.quantize} base: no H200 anchor has a quantized base"
    if not roofline or not roofline.get("kernels"):
        return None, "no roofline was taken"
    per_kernel = roofline["roofline_s"] / roofline["kernels"]
    if per_kernel < MIN_WORK_PER_KERNEL * FLOOR_S_PER_KERNEL:
        return None, (f"no step time: {per_kernel * 1e6:.1f} us of roofline work a kernel, under half the "
                      f"7B floor's {FLOOR_S_PER_KERNEL * 1e6:.1f} us the factor was fitted on: the step is "
                      "bound by kernel launches, which a roofline does not see")
    return roofline["roofline_s"] * STEP_SCALE, ""
