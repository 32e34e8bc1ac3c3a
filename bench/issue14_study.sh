#!/bin/bash
# Issue 14's selection study as run on the 2-core CPU (docs/bench.md, "Study at 300 steps"):
# task (a) at 300 steps; each method's rate from a grid on validation (seed 0), then seeds 1 and 2
# at the chosen rate for the finalists; the report picks rates by validation and prints test once.
#   bash bench/issue14_study.sh        # about 2.5 hours on 2 idle cores (a MiniLM run: ~3 min)
set -e
R=bench/results/issue14_study
B="siftune bench --task classification --steps 300 --threads 2 --results-dir $R"
S="--lr sift-fixed=1e-3 --dense-lr sift-fixed=2e-3"

# 1. seed 0, rates x1 and x2 of each method's base rate (SIFT 1e-3, head 2e-3; full 5e-5; LoRA 5e-4)
for sift in "" "budget=global" "score=grad_squared selection_batches=4" "score=grad_weight"; do
  $B --seeds 0 --lr-grid 1 2 --methods sift-fixed:0.001 sift-fixed:matched $S ${sift:+--sift $sift}
done
$B --seeds 0 --lr-grid 1 2 --methods full lora --lr full=5e-5 lora=5e-4

# 2. where the best validation score sat at the grid's top: x4 too (seed 0)
$B --seeds 0 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002
$B --seeds 0 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift budget=global
$B --seeds 0 --methods lora:8 --lr lora=0.002
$B --seeds 0 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift score=grad_squared selection_batches=4
$B --seeds 0 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift score=grad_weight

# 3. finalists at their validation-chosen rate, seeds 1 and 2: per density the paper's selection and
#    the variant best on validation, full fine-tuning and LoRA
$B --seeds 1 2 --methods sift-fixed:0.001 --lr sift-fixed=0.002 --dense-lr sift-fixed=0.002
$B --seeds 1 2 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift budget=global
$B --seeds 1 2 --methods sift-fixed:matched --lr sift-fixed=0.001 --dense-lr sift-fixed=0.002
$B --seeds 1 2 --methods sift-fixed:matched --lr sift-fixed=0.001 --dense-lr sift-fixed=0.002 --sift score=grad_weight
$B --seeds 1 2 --methods full --lr full=5e-05
$B --seeds 1 2 --methods lora:8 --lr lora=0.001

# 4. time permitting: the 0.1% grad_weight on seeds 1 and 2; task (b) at LoRA's count (seed 0, the
#    table's rate 2e-4); 1% (seed 0, grid)
$B --seeds 1 2 --methods sift-fixed:0.001 --lr sift-fixed=0.004 --dense-lr sift-fixed=0.002 --sift score=grad_weight
C="siftune bench --task causal_lm --steps 40 --seeds 0 --threads 2 --results-dir $R --methods sift-fixed:matched --lr sift-fixed=2e-4"
$C --sift score=grad_weight
$C
$C --sift budget=global
$B --seeds 0 --lr-grid 1 2 --methods sift-fixed:0.01 $S
$B --seeds 0 --lr-grid 1 2 --methods sift-fixed:0.01 $S --sift score=grad_weight

siftune bench --report --results-dir $R
