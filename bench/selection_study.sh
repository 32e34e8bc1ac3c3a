#!/bin/bash
# The selection study of docs/bench.md ("Rates chosen on validation"), as run on a 2-core CPU:
# task (a) at 300 steps; each method's rate from a grid on validation (seed 0), then seeds 1 and 2
# at the chosen rate for the finalists; the report picks rates by validation and prints test once.
#   bash bench/selection_study.sh        # about 5 hours on 2 idle cores (a MiniLM run: ~3 min, a SmolLM2 run ~3.5)
# Steps 1-4 ran the paper's |g| as the default score (their runs without --sift record score=grad);
# from step 5 on the default is |g w|, so the paper's selection is --sift score=grad.
set -e
R=bench/results/selection_study
B="siftune bench --task classification --steps 300 --threads 2 --results-dir $R"
S="--lr sift-fixed=1e-3 --dense-lr sift-fixed=2e-3"

# 1. seed 0, rates x1 and x2 of each method's base rate (SIFT 1e-3, head 2e-3; full 5e-5; LoRA 5e-4)
for sift in "score=grad" "budget=global score=grad" "score=grad_squared selection_batches=4" "score=grad_weight"; do
  $B --seeds 0 --lr-grid 1 2 --methods sift-fixed:0.001 sift-fixed:matched $S --sift $sift
done
$B --seeds 0 --lr-grid 1 2 --methods full lora --lr full=5e-5 lora=5e-4

# 2. where the best validation score sat at the grid's top: x4 too (seed 0)
$B --seeds 0 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift score=grad
$B --seeds 0 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift budget=global score=grad
$B --seeds 0 --methods lora:8 --lr lora=0.002
$B --seeds 0 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift score=grad_squared selection_batches=4
$B --seeds 0 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift score=grad_weight

# 3. finalists at their validation-chosen rate, seeds 1 and 2: per density the paper's selection and
#    the variant best on validation, full fine-tuning and LoRA
$B --seeds 1 2 --methods sift-fixed:0.001 --lr sift-fixed=0.002 --dense-lr sift-fixed=0.002 --sift score=grad
$B --seeds 1 2 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift budget=global score=grad
$B --seeds 1 2 --methods sift-fixed:matched --lr sift-fixed=0.001 --dense-lr sift-fixed=0.002 --sift score=grad
$B --seeds 1 2 --methods sift-fixed:matched --lr sift-fixed=0.001 --dense-lr sift-fixed=0.002 --sift score=grad_weight
$B --seeds 1 2 --methods full --lr full=5e-05
$B --seeds 1 2 --methods lora:8 --lr lora=0.001

# 4. time permitting: the 0.1% grad_weight on seeds 1 and 2; task (b) at LoRA's count (seed 0, the
#    table's rate 2e-4); 1% (seed 0, grid)
$B --seeds 1 2 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift score=grad_weight
C="siftune bench --task causal_lm --steps 40 --seeds 0 --threads 2 --results-dir $R --methods sift-fixed:matched --lr sift-fixed=2e-4"
$C --sift score=grad_weight
$C --sift score=grad
$C --sift budget=global score=grad
$B --seeds 0 --lr-grid 1 2 --methods sift-fixed:0.01 $S --sift score=grad
$B --seeds 0 --lr-grid 1 2 --methods sift-fixed:0.01 $S --sift score=grad_weight

# --- the default score is |g w| from here on ---
# 5. task (b) on its own grid (seed 0): x2 x4 x8 (x16 where x8 was best) of 2e-4 for SIFT's variants, LoRA x1-x32,
#    full x1-x8 of 2e-5; the window (g^2 over 4 micro-batches) at x4 x8
C="siftune bench --task causal_lm --steps 40 --seeds 0 --threads 1 --results-dir $R"
for lr in 4e-4 8e-4 1.6e-3 3.2e-3; do
  for sift in "score=grad" "budget=global score=grad" "score=grad_weight"; do
    $C --methods sift-fixed:matched --lr sift-fixed=$lr --sift $sift
  done
done
$C --methods lora:8 --lr-grid 1 2 4 8 16 32 --lr lora=2e-4
$C --methods full --lr-grid 1 2 4 8 --lr full=2e-5
$C --methods sift-fixed:matched --lr-grid 4 8 --lr sift-fixed=2e-4 --sift score=grad_squared selection_batches=4
# 6. task (b) finalists on seeds 1 and 2 at their validation-chosen rate: the paper's, the best variant
$C --seeds 1 2 --methods sift-fixed:matched --lr sift-fixed=1.6e-3 --sift score=grad
$C --seeds 1 2 --methods sift-fixed:matched --lr sift-fixed=1.6e-3 --sift score=grad_weight
# 7. task (a): 1% on seeds 1 and 2; SHiRA and random on the grid at LoRA's count, then seeds 1 and 2;
#    one rate above the grid's top where the best sat there (0.1%: x8)
B="siftune bench --task classification --steps 300 --threads 1 --results-dir $R"
$B --seeds 1 2 --methods sift-fixed:0.01 --lr sift-fixed=0.001 --dense-lr sift-fixed=0.002 --sift score=grad_weight
$B --seeds 1 2 --methods sift-fixed:0.01 --lr sift-fixed=0.001 --dense-lr sift-fixed=0.002 --sift score=grad
$B --seeds 0 --lr-grid 1 2 4 --methods shira:8 --lr shira=5e-4
$B --seeds 0 --lr-grid 1 2 4 --methods random:matched --lr random=1e-3 --dense-lr random=2e-3
$B --seeds 1 2 --methods shira:8 --lr shira=1e-3
$B --seeds 1 2 --methods random:matched --lr random=2e-3 --dense-lr random=2e-3
for sift in "budget=global score=grad" "score=grad_squared selection_batches=4" "score=grad_weight"; do
  $B --seeds 0 --methods sift-fixed:0.001 --lr sift-fixed=0.008 --dense-lr sift-fixed=0.002 --sift $sift
done
$B --seeds 1 2 --methods sift-fixed:0.001 --lr sift-fixed=0.008 --dense-lr sift-fixed=0.002 --sift score=grad_weight

# 8. task (b): full above its grid's top; LoRA seeds 1, 2; SHiRA and random on the grid, then seeds 1, 2 of
#    full, SHiRA and random at their chosen rates; task (a): SHiRA's seeds at 2e-3, 1% global/window grid,
#    0.1% at x16
C="siftune bench --task causal_lm --steps 40 --threads 1 --results-dir $R"
$C --seeds 0 --methods full --lr full=3.2e-4
$C --seeds 1 2 --methods lora:8 --lr lora=3.2e-3
$B --seeds 1 2 --methods shira:8 --lr shira=2e-3
$C --seeds 0 --methods shira:8 --lr-grid 1 2 4 8 --lr shira=1.6e-3
$C --seeds 0 --methods random:matched --lr-grid 1 2 4 8 --lr random=8e-4
$C --seeds 1 2 --methods full --lr full=1.6e-4
$C --seeds 1 2 --methods shira:8 --lr shira=6.4e-3
$C --seeds 1 2 --methods random:matched --lr random=6.4e-3
S="--lr sift-fixed=1e-3 --dense-lr sift-fixed=2e-3"
$B --seeds 0 --lr-grid 1 2 4 --methods sift-fixed:0.01 $S --sift budget=global score=grad
$B --seeds 0 --lr-grid 1 2 4 --methods sift-fixed:0.01 $S --sift score=grad_squared selection_batches=4
for sift in "score=grad_weight" "budget=global score=grad"; do
  $B --seeds 0 --methods sift-fixed:0.001 --lr sift-fixed=0.016 --dense-lr sift-fixed=0.002 --sift $sift
done
# The fixed-rate table's SIFT rows with the default score: python bench/run.py --part main300 lr300 causal40 main lr extra
# (the SIFT methods only; docs/bench.md, "At fixed rates")

siftune bench --report --results-dir $R
