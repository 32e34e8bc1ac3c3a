#!/bin/bash
# The density sweep: quality against trainable count for SIFT's selections, random components, LoRA
# at several ranks and full fine-tuning, every rate chosen on validation (docs/selection.md).
#   bash bench/sweep.sh PART...      # parts below; records merge into bench/results/sweep/<task>.json
#   bash bench/sweep.sh b-balanced a-balanced a-new-matched a-open & bash bench/sweep.sh a-cross a-new-low b-new a-rest &
#   siftune bench --report --results-dir bench/results/sweep          # tables and chosen rates
#   python bench/sweep_figures.py                                     # the figures
# Task (a): MiniLM-L6 on Rotten Tomatoes, 300 steps; task (b): SmolLM2-135M on chatterbot, 40 steps.
# A cell whose record is already in the folder is skipped, so a part can be rerun after a stop, and the
# earlier study's records with the same settings (copied from bench/results/selection_study) are not rerun.
# One torch thread a run (the 2-core machine is shared); about 3 minutes a run on (a) when idle.
set -u
# Peak memory compares across the sweep's records only with the same allocator behaviour: they were
# measured without the engine's heap trim (siftune.core.heap), so the sweep keeps it off.
export SIFTUNE_TRIM_HEAP=${SIFTUNE_TRIM_HEAP:-0}
R=${SWEEP_DIR:-bench/results/sweep}
PY=${PYTHON:-python}

have() {  # TASK STEPS SEED METHOD[:SETTING] LR [FIELD=VALUE ...]: is the record there?
  "$PY" "$(dirname "$0")/sweep_records.py" have "$R" "$@"
}

cell() {  # TASK STEPS SEED METHOD[:SETTING] LR [FIELD=VALUE ...]: run it unless its record is there (FIELD: a SIFT
  # option, or dense_lr for the head's rate)
  local task=$1 steps=$2 seed=$3 token=$4 lr=$5; shift 5
  if have "$task" "$steps" "$seed" "$token" "$lr" "$@"; then
    echo "have: $task $token lr $lr seed $seed $*"
    return
  fi
  # dense_lr=RATE is the head's rate; the other fields are SIFT options.
  local field options=() head=()
  for field in "$@"; do
    case $field in
      dense_lr=*) head=(--dense-lr "${token%%:*}=${field#dense_lr=}") ;;
      *) options+=("$field") ;;
    esac
  done
  # Into a folder of its own, then merged under a lock: two parts may run at once.
  local own
  own=$(mktemp -d)
  siftune bench --task "$task" --steps "$steps" --seeds "$seed" --threads 1 --results-dir "$own" \
    --methods "$token" --lr "${token%%:*}=$lr" "${head[@]}" ${options[0]:+--sift "${options[@]}"} &&
  [ -f "$own/$task.json" ] && flock "$R/.lock" "$PY" -c "import json, sys; from pathlib import Path
from siftune.bench.runner import merge_records
merge_records(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))" "$R/$task.json" "$own/$task.json"
  rm -rf "$own"
}

best_lr() {  # TASK STEPS METHOD[:SETTING] [FIELD=VALUE ...]: seed 0's rate with the best validation score
  "$PY" "$(dirname "$0")/sweep_records.py" best "$R" "$@"
}

seeds_at_best() {  # TASK STEPS METHOD[:SETTING] [FIELD=VALUE ...]: seeds 1 and 2 at seed 0's best rate
  local task=$1 steps=$2 token=$3 lr; shift 3
  lr=$(best_lr "$task" "$steps" "$token" "$@")
  [ -n "$lr" ] || { echo "no seed-0 record of $task $token $*"; return; }
  cell "$task" "$steps" 1 "$token" "$lr" "$@"; cell "$task" "$steps" 2 "$token" "$lr" "$@"
}

seeds_at_head() {  # TASK STEPS METHOD[:SETTING] LR [FIELD=VALUE ...]: seeds 1 and 2 at LR with the head at the rate
  # seed 0's validation chose among the head rates that ran at LR
  local task=$1 steps=$2 token=$3 lr=$4 head; shift 4
  head=$("$PY" "$(dirname "$0")/sweep_records.py" best-head "$R" "$task" "$steps" "$token" "$lr" "$@")
  [ -n "$head" ] || { echo "no seed-0 record of $task $token at $lr $*"; return; }
  cell "$task" "$steps" 1 "$token" "$lr" "$@" dense_lr="$head"; cell "$task" "$steps" 2 "$token" "$lr" "$@" dense_lr="$head"
}

grid() {  # TASK STEPS METHOD[:SETTING] LR... -- [FIELD=VALUE ...]: seed 0 at each rate, then while the best rate
  # is at an edge of the grid one rate beyond it (twice at most), so that the chosen rate lies inside
  local task=$1 steps=$2 token=$3 rates=() lr next; shift 3
  while [ "$1" != "--" ]; do rates+=("$1"); shift; done
  shift
  for lr in "${rates[@]}"; do cell "$task" "$steps" 0 "$token" "$lr" "$@"; done
  for _ in 1 2; do
    next=$("$PY" "$(dirname "$0")/sweep_records.py" beyond "$R" "$task" "$steps" "$token" "$@")
    [ -n "$next" ] || break
    cell "$task" "$steps" 0 "$token" "$next" "$@"
  done
}

off_rate() {  # TASK STEPS METHOD[:SETTING] [FIELD=VALUE ...]: seed 0 at a quarter and at four times seed 0's best rate
  local task=$1 steps=$2 token=$3 lr; shift 3
  lr=$(best_lr "$task" "$steps" "$token" "$@")
  [ -n "$lr" ] || { echo "no seed-0 record of $task $token $*"; return; }
  cell "$task" "$steps" 0 "$token" "$("$PY" -c "import sys; print(f'{float(sys.argv[1]) / 4:g}')" "$lr")" "$@"
  cell "$task" "$steps" 0 "$token" "$("$PY" -c "import sys; print(f'{float(sys.argv[1]) * 4:g}')" "$lr")" "$@"
}

INC=bench/results/sweep_increments  # the increments select_from reads (a-from-*), named by the repository's root
FROM=(selection=balanced line_cap=1 step_scale=input "select_from=$INC/sift-fixed-0.01-lr0.004-seed{seed}")
FROM_B=(selection=balanced line_cap=1 step_scale=input "select_from=$INC/sift-fixed-0.01-lr0.0128-seed{seed}")
FROM_LOW=(selection=balanced line_cap=1 step_scale=input "select_from=$INC/sift-fixed-0.001-lr0.032-seed{seed}")
source_run() {  # TASK STEPS LR SEED [DENSITY [HEAD]]: SiftConfig's default at DENSITY (1%) and LR (the head at HEAD,
  # else the task's default), its increment saved into $INC for select_from
  local task=$1 steps=$2 lr=$3 seed=$4 density=${5:-0.01} head=()
  [ -n "${6:-}" ] && head=(--dense-lr "sift-fixed=$6")
  [ -f "$INC/sift-fixed-$density-lr$(printf %g "$lr")-seed$seed/increment.safetensors" ] && return
  siftune bench --task "$task" --steps "$steps" --seeds "$seed" --threads 1 --results-dir "$INC" \
    --methods "sift-fixed:$density" --lr "sift-fixed=$lr" "${head[@]}" --save-increments "$INC" \
    --sift selection=balanced line_cap=1 step_scale=input
}
a() { cell classification 300 0 "$@"; }  # task (a), seed 0
b() { cell causal_lm 40 0 "$@"; }        # task (b), seed 0

for part in "$@"; do
  case $part in
    # Task (a) where the ranking was open: random components at 0.1% on a grid with validation (the
    # earlier 0.1% runs had none), LoRA r=1 and r=2 (0.39% and 0.78% of the components), |g w| at
    # LoRA's count above 2e-3 (it tied at 1e-3 and 2e-3), full fine-tuning around its tie.
    a-open)
      a random:0.001 8e-3; a random:0.001 2e-3; a random:0.001 3.2e-2
      a sift-fixed:matched 4e-3
      a lora:1 1e-3; a lora:2 1e-3; a lora:1 2e-3; a lora:2 2e-3; a lora:1 4e-3; a lora:2 4e-3
      a full 2e-4; a full 2.5e-5
      ;;
    # Task (a), the rest of the densities: 1%, 0.01%, 10%, LoRA r=32.
    a-rest)
      a random:0.01 2e-3; a random:0.01 4e-3; a random:0.01 8e-3
      a sift-fixed:0.01 5e-4
      a sift-fixed:0.0001 8e-3; a sift-fixed:0.0001 3.2e-2; a random:0.0001 8e-3; a random:0.0001 3.2e-2
      a sift-fixed:0.1 5e-4; a sift-fixed:0.1 1e-3; a random:0.1 1e-3; a random:0.1 2e-3
      a lora:32 5e-4; a lora:32 1e-3; a lora:32 2e-3
      a sift-fixed:matched 5e-4
      ;;
    # Task (a): random components above 8e-3 at 0.1% (its best so far, the grid's top) and at 1%, where
    # the gradient's lead at 0.1% and random's at LoRA's count meet.
    a-cross)
      a random:0.001 1.6e-2; a random:0.01 4e-3; a random:0.001 3.2e-2; a random:0.01 2e-3
      ;;
    # The new selections on task (a): at LoRA's count (x1 and x2 of 1e-3, where |g w| peaked), at 0.1%
    # (8e-3 and 4e-3, |g w|'s best two there); grow and drop refreshing every 50 steps.
    a-new-matched)
      a sift-fixed:matched 1e-3 selection=balanced; a sift-fixed:matched 1e-3 selection=mixed
      a sift-fixed:matched 2e-3 selection=balanced; a sift-fixed:matched 2e-3 selection=mixed
      a sift-periodic:matched 1e-3 selection=grow_drop refresh_every=50
      ;;
    a-new-low)
      a sift-fixed:0.001 8e-3 selection=balanced; a sift-fixed:0.001 8e-3 selection=mixed
      a sift-fixed:0.001 4e-3 selection=balanced; a sift-fixed:0.001 4e-3 selection=mixed
      a sift-periodic:0.001 8e-3 selection=grow_drop refresh_every=50
      ;;
    # Task (b) at LoRA's count, 40 steps: the new selections at |g w|'s chosen 1.6e-3 and x2.
    b-new)
      b sift-fixed:matched 1.6e-3 selection=balanced; b sift-fixed:matched 1.6e-3 selection=mixed
      b sift-fixed:matched 3.2e-3 selection=balanced; b sift-fixed:matched 3.2e-3 selection=mixed
      ;;
    # balanced, the best new selection on (a)'s seed 0 (validation 80.9 at LoRA's count, level with random
    # components; 76.6 at 0.1%): task (b) at LoRA's count, then (a)'s grid closed below and above, then seeds
    b-balanced)
      b sift-fixed:matched 1.6e-3 selection=balanced; b sift-fixed:matched 3.2e-3 selection=balanced
      b sift-fixed:matched 8e-4 selection=balanced
      ;;
    a-balanced)
      a sift-fixed:matched 5e-4 selection=balanced; a sift-fixed:matched 2e-3 selection=balanced
      a sift-fixed:0.001 1.6e-2 selection=balanced; a sift-fixed:0.001 4e-3 selection=balanced
      for seed in 1 2; do
        cell classification 300 $seed sift-fixed:matched 1e-3 selection=balanced
        cell classification 300 $seed random:0.001 8e-3
      done
      ;;
    # Task (a), interleaved: where the gradient's choice could still pay (random components above 1.6e-2
    # at 0.1%, the grid's top; 0.01%, 1,068 components) and structured SIFT (rows' seeds at LoRA's count,
    # where seed 0 was level with random components; rows and columns at 1%; rows below 1e-3).
    a-low)
      a random:0.001 3.2e-2; a sift-fixed:0.0001 8e-3; a random:0.0001 3.2e-2
      cell classification 300 1 sift-rows:matched 1e-3
      a sift-rows:0.01 1e-3
      cell classification 300 2 sift-rows:matched 1e-3
      a sift-fixed:0.0001 3.2e-2; a sift-columns:0.01 1e-3; a sift-rows:matched 5e-4; a random:0.0001 1.28e-1
      a sift-rows:0.01 2e-3
      ;;
    # Structured SIFT on task (a) above the rates run.
    a-structured)
      a sift-rows:matched 4e-3; a sift-columns:matched 4e-3; a sift-columns:0.01 2e-3
      ;;
    # Task (a): LoRA at r = 1, 2 and 32 for the LoRA line, random components at 1%, balanced's grid.
    a-lines)
      a lora:1 2e-3; a lora:2 2e-3; a lora:32 1e-3; a lora:1 4e-3; a lora:2 1e-3; a lora:32 5e-4
      a random:0.01 2e-3; a random:0.01 4e-3
      a sift-fixed:matched 2e-3 selection=balanced; a sift-fixed:matched 5e-4 selection=balanced
      ;;
    # Structured SIFT on task (b) at LoRA's count, about |g w|'s chosen 1.6e-3; random components above
    # their best so far (6.4e-3, the grid's top); balanced above 1.6e-3 (random's best rates are higher).
    b-structured)
      b sift-rows:matched 3.2e-3; b sift-columns:matched 3.2e-3; b sift-rows:matched 1.6e-3
      b sift-columns:matched 1.6e-3; b random:matched 1.28e-2
      b sift-rows:matched 6.4e-3; b sift-columns:matched 6.4e-3
      b sift-fixed:matched 3.2e-3 selection=balanced; b sift-fixed:matched 6.4e-3 selection=balanced
      ;;
    # Task (b): rows' grid around 3.2e-3 (its first cell, 1.083 validation, ahead of |g w|'s best), random
    # components above their grid's top, columns below.
    b-rows)
      b sift-rows:matched 6.4e-3; b sift-rows:matched 1.6e-3; b random:matched 1.28e-2; b sift-columns:matched 1.6e-3
      ;;
    # The finalists' seeds and the cells still deciding a ranking, in order of what they decide.
    # Task (a): rows at LoRA's count (seed 0 level with random components), random components above
    # 3.2e-2 at 0.1% (the grid's top, ahead of |g w|), balanced at random's rates, 0.01%, 1%.
    a-final)
      a random:0.0001 3.2e-2
      cell classification 300 1 sift-rows:matched 1e-3
      cell classification 300 2 sift-rows:matched 1e-3
      a random:0.001 6.4e-2; a sift-fixed:0.001 1.6e-2 selection=balanced
      a sift-rows:0.01 1e-3; a sift-columns:0.01 1e-3; a sift-fixed:0.0001 3.2e-2; a random:0.0001 1.28e-1
      a sift-rows:matched 5e-4
      ;;
    # Task (b): rows at 3.2e-3 (their grid closed: 1.6e-3 1.128, 3.2e-3 1.083, 6.4e-3 1.145 validation).
    b-final)
      b random:matched 1.28e-2
      cell causal_lm 40 1 sift-rows:matched 3.2e-3
      cell causal_lm 40 2 sift-rows:matched 3.2e-3
      b sift-fixed:matched 3.2e-3 selection=balanced; b sift-columns:matched 1.6e-3
      ;;
    # balanced above the rates run: like random components it gains with the rate (0.1% on (a): 8e-3 76.6,
    # 1.6e-2 78.6 validation; (b): 1.6e-3 1.160, 3.2e-3 1.083).
    a-balanced-up)
      a sift-fixed:0.001 3.2e-2 selection=balanced; a sift-fixed:matched 2e-3 selection=balanced
      a sift-fixed:matched 4e-3 selection=balanced
      ;;
    b-balanced-up)
      b sift-fixed:matched 6.4e-3 selection=balanced
      ;;
    # Seeds 1 and 2 of balanced at 0.1% on (a), its chosen 3.2e-2 (two parts: they run side by side).
    a-balanced-s1) cell classification 300 1 sift-fixed:0.001 3.2e-2 selection=balanced ;;
    a-balanced-s2) cell classification 300 2 sift-fixed:0.001 3.2e-2 selection=balanced ;;
    # Structured SIFT at 1% beside |g w|, random components and balanced (task (a)'s grids below and above
    # 1e-3, where rows and columns ran; balanced at 0.01% and 1%, where it has not run), then task (b) at 1%
    # (0.43 of LoRA r=8's count there) about each method's chosen rate at LoRA's count and twice it.
    a-1pct)
      a sift-fixed:0.0001 3.2e-2 selection=balanced; a sift-rows:0.01 2e-3
      a sift-fixed:0.01 1e-3 selection=balanced; a sift-rows:0.01 4e-3; a random:0.01 2e-3
      a sift-columns:0.01 5e-4
      cell classification 300 1 sift-rows:0.01 2e-3
      cell classification 300 2 sift-rows:0.01 2e-3
      a random:0.01 4e-3; a sift-rows:matched 5e-4; a random:0.01 8e-3
      a sift-fixed:0.01 2e-3 selection=balanced; a sift-columns:0.01 2.5e-4
      ;;
    b-1pct)
      b sift-rows:0.01 3.2e-3; b sift-fixed:0.01 1.6e-3; b random:0.01 6.4e-3; b sift-columns:0.01 1.6e-3
      b sift-rows:0.01 6.4e-3; b sift-fixed:0.01 3.2e-3
      ;;
    # Rows at 1% on (b) above 6.4e-3 (the grid's top, 1.111 validation), then seeds 1 and 2 at the best rate.
    b-1pct-rows)
      b sift-rows:0.01 1.28e-2
      seeds_at_best causal_lm 40 sift-rows:0.01
      ;;
    b-1pct-more)
      b random:0.01 1.28e-2; b sift-columns:0.01 3.2e-3
      ;;
    b-1pct-gw)
      b sift-fixed:0.01 6.4e-3
      ;;
    # The comparators' seeds at 1% (random components lead |g w| on (a)'s validation there), balanced
    # above 2e-3 at 1% on (a) (its grid's top, 80.2 validation).
    a-1pct-seeds)
      a sift-fixed:0.01 4e-3 selection=balanced
      seeds_at_best classification 300 random:0.01
      ;;
    b-1pct-seeds)
      seeds_at_best causal_lm 40 random:0.01
      seeds_at_best causal_lm 40 sift-fixed:0.01
      ;;
    # Task (b), in the order its cells decide a ranking: columns below their grid's bottom at 1%, mixed (half by
    # |g w|, half random: random components lead the top-k there) at LoRA's count, |g w| from 4 micro-batches,
    # then the 1% grids' open ends, balanced's seeds, and a 160-step check of the ranking at LoRA's count,
    # each method at its 40-step rate.
    b-open2)
      seeds_at_best causal_lm 40 sift-fixed:0.01
      b sift-columns:0.01 8e-4
      b sift-fixed:matched 3.2e-3 selection=mixed; b sift-fixed:matched 6.4e-3 selection=mixed
      b sift-fixed:matched 1.6e-3 selection_batches=4; b sift-fixed:matched 3.2e-3 selection_batches=4
      b sift-fixed:0.01 6.4e-3 selection=balanced; b random:0.01 2.56e-2
      seeds_at_best causal_lm 40 sift-fixed:matched selection=balanced
      b sift-fixed:0.01 1.28e-2 selection=balanced
      seeds_at_best causal_lm 40 sift-fixed:0.01 selection=balanced
      cell causal_lm 160 0 lora:8 3.2e-3; cell causal_lm 160 0 random:matched 6.4e-3
      cell causal_lm 160 0 sift-fixed:matched 1.6e-3; cell causal_lm 160 0 sift-rows:matched 3.2e-3
      ;;
    # Task (a) at 10%: |g w| and random components about their 1% rates and below (rates fall with density
    # above 1%), balanced at |g w|'s.
    a-10pct)
      a sift-fixed:0.1 5e-4; a random:0.1 1e-3; a sift-fixed:0.1 1e-3; a random:0.1 2e-3
      a sift-fixed:0.1 5e-4 selection=balanced; a sift-fixed:0.1 2.5e-4; a random:0.1 5e-4
      ;;
    # Task (a), the open cells in the order they decide something: random components at 0.01% above their
    # grid's top, grow and drop and mixed (not run on (a) yet), |g w| at 0.01% between its two rates, the
    # LoRA line, random components' seeds at 0.1%, balanced above its grid's top at 1%.
    a-open3)
      a random:0.0001 2.56e-1
      a sift-periodic:matched 1e-3 selection=grow_drop refresh_every=50; a sift-fixed:matched 1e-3 selection=mixed
      a sift-fixed:0.0001 6.4e-2
      a lora:2 2e-3; a lora:32 1e-3; a lora:1 4e-3; a lora:32 5e-4
      seeds_at_best classification 300 random:0.001
      a sift-fixed:0.01 8e-3 selection=balanced; a lora:2 4e-3; a random:0.0001 6.4e-2
      a sift-fixed:matched 2e-3 selection=mixed
      ;;
    # grow and drop, at LoRA's count: on (a) its first cell (1e-3, refreshing every 50 steps) led |g w| and
    # matched random components on seed 0's validation (80.6) and test (81.75): its grid and seeds; on (b)
    # refreshing every 10 of the 40 steps, at |g w|'s chosen rate and twice it.
    a-grow)
      a sift-periodic:matched 2e-3 selection=grow_drop refresh_every=50
      a sift-periodic:matched 5e-4 selection=grow_drop refresh_every=50
      seeds_at_best classification 300 sift-periodic:matched selection=grow_drop refresh_every=50
      ;;
    b-grow)
      b sift-periodic:matched 1.6e-3 selection=grow_drop refresh_every=10
      b sift-periodic:matched 3.2e-3 selection=grow_drop refresh_every=10
      ;;
    # Balanced at its tightest cap (line_cap=1: no row or column above its fair share, the spread of random
    # components with the choice by score) where balanced at the default cap came closest: LoRA's count on
    # both tasks and 0.1% on (a); on (b) first balanced's seeds at LoRA's count.
    a-cap)
      a sift-fixed:matched 1e-3 selection=balanced line_cap=1; a sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1
      a sift-fixed:matched 2e-3 selection=balanced line_cap=1
      ;;
    b-cap)
      seeds_at_best causal_lm 40 sift-fixed:matched selection=balanced
      b sift-fixed:matched 3.2e-3 selection=balanced line_cap=1; b sift-fixed:matched 6.4e-3 selection=balanced line_cap=1
      ;;
    # Task (a) at 10%, where the first cells left the grids open: |g w| below 5e-4 (5e-4 80.3, 1e-3 80.2), random
    # components above 2e-3 (1e-3 80.1, 2e-3 80.7).
    a-10pct2)
      a sift-fixed:0.1 2.5e-4; a random:0.1 4e-3; a sift-fixed:0.1 1e-3 selection=balanced
      ;;
    # LoRA r=32 on (a), about r=8's rate and below (LoRA's rate falls as its rank grows).
    a-lora32)
      a lora:32 1e-3; a lora:32 5e-4; a lora:32 2e-3
      ;;
    # LoRA r=32 below 5e-4 (1e-3 collapses to the majority class).
    a-lora32-low)
      a lora:32 2.5e-4; a lora:32 1.25e-4
      ;;
    # Task (b) at 160 steps, each method at its 40-step rate: does the ranking at LoRA's count hold on a longer run?
    b-160)
      cell causal_lm 160 0 random:matched 6.4e-3; cell causal_lm 160 0 sift-fixed:matched 1.6e-3
      cell causal_lm 160 0 lora:8 3.2e-3; cell causal_lm 160 0 sift-rows:matched 3.2e-3
      ;;
    # Task (b) at 0.1%, where on (a) the gradient's choice stopped losing to random components: |g w|, random
    # components and balanced, each about (a)'s chosen rate at 0.1% scaled as (b)'s rates were at 1%.
    b-0.1pct)
      b sift-fixed:0.001 1.6e-2; b random:0.001 3.2e-2; b sift-fixed:0.001 3.2e-2 selection=balanced
      b sift-fixed:0.001 8e-3; b random:0.001 6.4e-2; b sift-fixed:0.001 1.6e-2 selection=balanced
      b sift-fixed:0.001 3.2e-2
      ;;
    # mixed on (a) at LoRA's count (1e-3: 80.8 validation, 81.45 test on seed 0, near random components'
    # 81.53 over three seeds): its grid and seeds; balanced at line_cap=1 above its grid's top and its seeds;
    # then line_cap=1 on (b).
    a-mixed-cap)
      a sift-fixed:matched 2e-3 selection=mixed
      seeds_at_best classification 300 sift-fixed:matched selection=mixed
      a sift-fixed:matched 4e-3 selection=balanced line_cap=1
      seeds_at_best classification 300 sift-fixed:matched selection=balanced line_cap=1
      b sift-fixed:matched 3.2e-3 selection=balanced line_cap=1; b sift-fixed:matched 6.4e-3 selection=balanced line_cap=1
      ;;
    # Rows' and columns' grids at LoRA's count below their best rates, the grids' bottoms (rows (a) 1e-3: 81.0,
    # columns (a) 1e-3: 79.2, (b) 1.6e-3: 1.134).
    a-lines-low)
      a sift-rows:matched 5e-4; a sift-columns:matched 5e-4
      ;;
    b-columns-low)
      b sift-columns:matched 8e-4
      ;;
    # LoRA's line on (b): r=1, 2 and 32 about r=8's 3.2e-3, scaled as on (a) (r=1 and 2 at twice r=8's rate, r=32
    # at a quarter).
    b-lora-ranks)
      b lora:32 1.6e-3; b lora:2 6.4e-3; b lora:1 6.4e-3; b lora:32 8e-4
      ;;
    # Task (b) at 0.1% after its first cells (balanced 3.2e-2: 1.262 against |g w|'s 1.349 and random components'
    # 1.355): balanced above that, its seeds and random components', and balanced at 1% (not run on (b) yet).
    b-0.1pct-more)
      b sift-fixed:0.001 6.4e-2 selection=balanced
      seeds_at_best causal_lm 40 sift-fixed:0.001 selection=balanced
      b sift-fixed:0.01 6.4e-3 selection=balanced
      ;;
    b-0.1pct-seeds)
      seeds_at_best causal_lm 40 random:0.001
      b sift-fixed:0.01 1.28e-2 selection=balanced
      ;;
    # Task (a) at 0.1%, the target's density (within a point of LoRA r=8's 80.50 on test): balanced at line_cap=1
    # (3.2e-2: 78.8, test 79.45) and at the default cap (3.2e-2: 78.7, the grid's top) on both sides, then seeds.
    a-cap-0.1)
      a sift-fixed:0.001 6.4e-2 selection=balanced line_cap=1; a sift-fixed:0.001 1.6e-2 selection=balanced line_cap=1
      a sift-fixed:0.001 6.4e-2 selection=balanced
      seeds_at_best classification 300 sift-fixed:0.001 selection=balanced line_cap=1
      ;;
    # Task (b) at 0.1%, the grids' open ends after the first cells: random components above 6.4e-2 (1.175; 3.2e-2:
    # 1.355), |g w| below 8e-3 (1.320; 1.6e-2: 1.349).
    b-0.1pct-ends)
      b random:0.001 1.28e-1; b sift-fixed:0.001 4e-3
      ;;
    # balanced at line_cap=1 on (b) at LoRA's count (6.4e-3: 1.063, ahead of random components' 1.070 on validation):
    # its seeds.
    b-cap-seeds)
      seeds_at_best causal_lm 40 sift-fixed:matched selection=balanced line_cap=1
      ;;
    # balanced at line_cap=1 on (b) at LoRA's count above its grid's top (6.4e-3: 1.063), seeds at the best rate,
    # then the 160-step check of the ranking for it and for rows, each at its 40-step rate.
    b-cap-top)
      b sift-fixed:matched 1.28e-2 selection=balanced line_cap=1
      seeds_at_best causal_lm 40 sift-fixed:matched selection=balanced line_cap=1
      ;;
    b-160-cap)
      cell causal_lm 160 0 sift-fixed:matched "$(best_lr causal_lm 40 sift-fixed:matched selection=balanced line_cap=1)" \
        selection=balanced line_cap=1
      cell causal_lm 160 0 sift-rows:matched 3.2e-3
      ;;
    # Task (b) at the sweep's end densities: 0.01% (|g w| at the rule's cap and twice it, random components at
    # four times those, balanced at line_cap=1 at twice the cap) and 10% (rates at and below 2.3%'s).
    b-0.01pct)
      b sift-fixed:0.0001 3.2e-2; b random:0.0001 1.28e-1; b sift-fixed:0.0001 6.4e-2 selection=balanced line_cap=1
      b sift-fixed:0.0001 6.4e-2; b random:0.0001 2.56e-1
      ;;
    b-10pct)
      b sift-fixed:0.1 1.6e-3; b random:0.1 6.4e-3; b sift-fixed:0.1 3.2e-3 selection=balanced line_cap=1
      b sift-fixed:0.1 8e-4; b random:0.1 3.2e-3
      ;;
    # The grids' open ends that can move a chosen rate: columns on (a) below 5e-4, random components on (b) above
    # 1.28e-1 at 0.1% and above 1.28e-2 at 1%, LoRA r=32 on (b) above 1.6e-3.
    open-ends)
      a sift-columns:matched 2.5e-4; b random:0.001 2.56e-1; b random:0.01 2.56e-2; b lora:32 3.2e-3
      ;;
    # balanced at line_cap=1 on (a) at 0.1%: 1.6e-2 and 3.2e-2 tied on validation (78.8) and the seeds ran at
    # 3.2e-2; a tie goes to the lower rate (the report's rule), so seeds 1 and 2 at 1.6e-2 too.
    a-cap-0.1-seeds)
      seeds_at_best classification 300 sift-fixed:0.001 selection=balanced line_cap=1
      ;;
    # LoRA r=1 and r=2 on (b) at a second rate each, above 6.4e-3 (small ranks took twice r=8's rate on (a)).
    b-lora-open)
      b lora:1 1.28e-2; b lora:2 1.28e-2
      ;;
    # balanced at line_cap=1, the best SIFT option at LoRA's count, with other scores and windows: the paper's |g|,
    # and |g w| summed over 4 micro-batches (on (b) 32 examples instead of 8), each at its line_cap=1 rate.
    cap-variants)
      b sift-fixed:matched 6.4e-3 selection=balanced line_cap=1 score=grad
      a sift-fixed:matched 2e-3 selection=balanced line_cap=1 score=grad
      b sift-fixed:matched 6.4e-3 selection=balanced line_cap=1 selection_batches=4
      ;;
    # Task (b) at 0.01% after its first cells (random components 2.56e-1: 1.515, the grid's top, ahead of |g w|'s
    # 1.637 at 3.2e-2 with 6.4e-2 worse, balanced at line_cap=1 1.655 at 6.4e-2): each grid's open end.
    b-0.01pct-ends)
      b random:0.0001 5.12e-1; b sift-fixed:0.0001 1.6e-2
      b sift-fixed:0.0001 1.28e-1 selection=balanced line_cap=1; b sift-fixed:0.0001 3.2e-2 selection=balanced line_cap=1
      ;;
    # LoRA r=1 and r=2 on (a) at a second and third rate each (2e-3 only so far: r=1 81.0, r=2 79.3).
    a-lora-small)
      a lora:1 4e-3; a lora:2 4e-3; a lora:1 1e-3; a lora:2 1e-3
      ;;
    # Task (b) at 10% after its first cells, each best at its grid's bottom (|g w| 8e-4: 1.075, random components
    # 3.2e-3: 1.058, balanced at line_cap=1 3.2e-3: 1.090): a rate below each.
    b-10pct-ends)
      b random:0.1 1.6e-3; b sift-fixed:0.1 4e-4; b sift-fixed:0.1 1.6e-3 selection=balanced line_cap=1
      ;;
    # Grids open at an end that bears on a ranking or on the rate rule: |g w| on (a) at 0.01% above 3.2e-2 (the
    # rule's cap), balanced above its grids' tops at 1% on (a) and at 1% and 0.1% on (b).
    open-tops2)
      a sift-fixed:0.0001 6.4e-2; a sift-fixed:0.01 8e-3 selection=balanced
      b sift-fixed:0.01 2.56e-2 selection=balanced; b sift-fixed:0.001 1.28e-1 selection=balanced
      ;;
    # Random components on (b) at 0.01% above 5.12e-1 (1.353; 2.56e-1: 1.515).
    b-0.01pct-random)
      b random:0.0001 1.024
      ;;
    # Task (b) at 10%, random components and balanced at line_cap=1 tied near their grids' bottom (1.052 and 1.049 at
    # 1.6e-3): a rate below each, then seeds 1 and 2 at each one's best.
    b-10pct-random)
      b random:0.1 8e-4
      seeds_at_best causal_lm 40 random:0.1
      ;;
    b-10pct-cap)
      b sift-fixed:0.1 8e-4 selection=balanced line_cap=1
      seeds_at_best causal_lm 40 sift-fixed:0.1 selection=balanced line_cap=1
      ;;
    # balanced at line_cap=1 on (b) at 0.1% (the default cap's best 6.4e-2: 1.202, random components' 1.28e-1:
    # 1.147) and at 0.01% above its grid's top (1.28e-1: 1.578).
    b-cap-low)
      b sift-fixed:0.001 6.4e-2 selection=balanced line_cap=1; b sift-fixed:0.001 1.28e-1 selection=balanced line_cap=1
      b sift-fixed:0.0001 2.56e-1 selection=balanced line_cap=1
      ;;
    # How forgiving each method is off its rate: at LoRA's count, every finalist at a quarter and at four times its
    # chosen rate (summary.md's "test at lr/4" and "test at 4 lr").
    forgive-a)
      a random:matched 5e-4; a random:matched 8e-3; a sift-fixed:matched 2.5e-4; a sift-fixed:matched 4e-3
      a sift-fixed:matched 5e-4 selection=balanced line_cap=1; a sift-fixed:matched 8e-3 selection=balanced line_cap=1
      a lora:8 2.5e-4; a lora:8 4e-3; a full 1.25e-5; a full 2e-4
      a sift-rows:matched 2.5e-4; a sift-rows:matched 4e-3; a sift-fixed:matched 2.5e-4 selection=balanced
      ;;
    forgive-b)
      b random:matched 2.56e-2; b sift-fixed:matched 6.4e-3; b lora:8 1.28e-2; b full 6.4e-4
      b sift-fixed:matched 1.6e-3 selection=balanced line_cap=1; b sift-fixed:matched 2.56e-2 selection=balanced line_cap=1
      b sift-rows:matched 8e-4; b sift-rows:matched 1.28e-2
      ;;
    # Task (a) at 0.01%, the one density where the top-k led random components (71.1 against 69.1 on validation,
    # seed 0): seeds 1 and 2 of each at its chosen rate.
    a-0.01pct-seeds)
      seeds_at_best classification 300 sift-fixed:0.0001
      seeds_at_best classification 300 random:0.0001
      ;;
    # Task (a) at 0.1%, where balanced (78.53 +- 1.05 on test over three seeds) leads random components on seed 0
    # (78.00): seeds 1 and 2 of random components at their chosen rate.
    a-0.1pct-random-seeds)
      seeds_at_best classification 300 random:0.001
      ;;
    # Task (a) at 10% (random components 80.7, |g w| and balanced 80.3 on seed 0's validation) and LoRA r=32: seeds
    # 1 and 2 at each one's chosen rate.
    a-10pct-seeds)
      seeds_at_best classification 300 random:0.1
      seeds_at_best classification 300 sift-fixed:0.1
      ;;
    a-10pct-seeds2)
      seeds_at_best classification 300 sift-fixed:0.1 selection=balanced
      seeds_at_best classification 300 lora:32
      ;;
    # Task (a) at 10%, the cell where balanced and the top-k lead random components over three seeds: a rate below
    # each one's grid's bottom (balanced 5e-4, the top-k 2.5e-4).
    a-10pct-low)
      a sift-fixed:0.1 2.5e-4 selection=balanced
      ;;
    a-10pct-low2)
      a sift-fixed:0.1 1.25e-4
      ;;
    # balanced at 10% on (a) tied at 2.5e-4 and 5e-4 (80.3): seeds 1 and 2 at the lower rate, the tie's choice.
    a-10pct-bal-s1)
      cell classification 300 1 sift-fixed:0.1 2.5e-4 selection=balanced
      ;;
    a-10pct-bal-s2)
      cell classification 300 2 sift-fixed:0.1 2.5e-4 selection=balanced
      ;;
    # The choice from more data, made before training (select_first=1: SiftEngine.select on 16 micro-batches of
    # its own, then the usual steps): the squared gradient summed per micro-batch (an empirical Fisher diagonal,
    # the FISH mask's score) or |g w| of the summed gradient, for balanced at line_cap=1 and the top-k, at LoRA's
    # count, each at its one-batch chosen rate first.
    b-window-cap)
      b sift-fixed:matched 6.4e-3 selection=balanced line_cap=1 score=grad_squared selection_batches=16 select_first=1
      b sift-fixed:matched 6.4e-3 selection=balanced line_cap=1 selection_batches=16 select_first=1
      ;;
    b-window-topk)
      b sift-fixed:matched 1.6e-3 score=grad_squared selection_batches=16 select_first=1
      b sift-fixed:matched 1.6e-3 selection_batches=16 select_first=1
      ;;
    a-window-cap)
      a sift-fixed:matched 2e-3 selection=balanced line_cap=1 score=grad_squared selection_batches=16 select_first=1
      a sift-fixed:matched 2e-3 selection=balanced line_cap=1 selection_batches=16 select_first=1
      ;;
    # The one seed-0-only entry of the README's table at LoRA's count: grow and drop on (b), seeds 1 and 2.
    b-grow-seeds)
      seeds_at_best causal_lm 40 sift-periodic:matched selection=grow_drop refresh_every=10
      ;;
    b-window-topk-rates)
      b sift-fixed:matched 3.2e-3 selection_batches=16 select_first=1; b sift-fixed:matched 8e-4 selection_batches=16 select_first=1
      ;;
    a-window-topk)
      a sift-fixed:matched 1e-3 score=grad_squared selection_batches=16 select_first=1
      a sift-fixed:matched 1e-3 selection_batches=16 select_first=1
      ;;
    # Grids left open: balanced at 0.01% on (a) ran at the top-k's rate only (68.1 at 3.2e-2), where balanced wants
    # up to 4 times the top-k's rate elsewhere; line_cap=1 on (b) at 1% (not run) and below 6.4e-2 at 0.1% (its best,
    # the grid's bottom).
    a-0.01pct-bal)
      a sift-fixed:0.0001 6.4e-2 selection=balanced; a sift-fixed:0.0001 6.4e-2 selection=balanced line_cap=1
      a sift-fixed:0.0001 1.28e-1 selection=balanced
      ;;
    # Grids whose best rate was still at an edge: one rate beyond it each.
    a-edges)
      a sift-fixed:0.01 5e-4; a sift-fixed:matched 5e-4 selection=mixed; a lora:2 5e-4
      a sift-fixed:0.001 8e-3 selection=balanced line_cap=1; a sift-fixed:0.1 1.25e-4 selection=balanced
      ;;
    b-edges-1)
      b lora:2 3.2e-3; b lora:1 3.2e-3; b sift-fixed:0.01 2.56e-2 selection=balanced line_cap=1
      b sift-fixed:matched 1.6e-3 selection=mixed
      ;;
    b-edges-2)
      b sift-periodic:matched 8e-4 selection=grow_drop refresh_every=10; b sift-fixed:matched 8e-4 selection_batches=4
      ;;
    # Whole rows drawn at random (S2FT's choice; the step of structured rows), at LoRA's count, about the rates of
    # rows by score and of random components.
    a-random-rows)
      a random-rows:matched 1e-3; a random-rows:matched 2e-3; a random-rows:matched 4e-3
      ;;
    b-random-rows)
      b random-rows:matched 3.2e-3; b random-rows:matched 6.4e-3; b random-rows:matched 1.28e-2
      ;;
    a-random-rows-seeds)
      seeds_at_best classification 300 random-rows:matched
      ;;
    b-random-rows-seeds)
      seeds_at_best causal_lm 40 random-rows:matched
      ;;
    a-0.01pct-bal-seeds)
      seeds_at_best classification 300 sift-fixed:0.0001 selection=balanced
      ;;
    # The gradient's signal-to-noise ratio, |sum g| / sqrt(sum g^2) over 16 micro-batches chosen before training
    # (score=grad_snr): scale-free, so it does not pile onto the columns of large input features. At LoRA's count,
    # about random components' rates (it spreads as they do), the middle rate first.
    a-snr)
      a sift-fixed:matched 2e-3 score=grad_snr selection_batches=16 select_first=1
      a sift-fixed:matched 1e-3 score=grad_snr selection_batches=16 select_first=1
      a sift-fixed:matched 4e-3 score=grad_snr selection_batches=16 select_first=1
      ;;
    b-snr)
      b sift-fixed:matched 6.4e-3 score=grad_snr selection_batches=16 select_first=1
      b sift-fixed:matched 3.2e-3 score=grad_snr selection_batches=16 select_first=1
      b sift-fixed:matched 1.28e-2 score=grad_snr selection_batches=16 select_first=1
      ;;
    # The signal-to-noise ratio under balanced's tightest cap (no row or column over its fair share), the closest
    # gradient option to random components, at random components' rate first.
    a-snr-cap)
      a sift-fixed:matched 2e-3 selection=balanced line_cap=1 score=grad_snr selection_batches=16 select_first=1
      a sift-fixed:matched 1e-3 selection=balanced line_cap=1 score=grad_snr selection_batches=16 select_first=1
      ;;
    b-snr-cap)
      b sift-fixed:matched 6.4e-3 selection=balanced line_cap=1 score=grad_snr selection_batches=16 select_first=1
      ;;
    # The signal-to-noise grids' best was at their lower edge: one rate below each.
    a-snr-edge)
      a sift-fixed:matched 5e-4 score=grad_snr selection_batches=16 select_first=1
      ;;
    b-snr-edge)
      b sift-fixed:matched 1.6e-3 score=grad_snr selection_batches=16 select_first=1
      ;;
    b-snr-seeds)
      seeds_at_best causal_lm 40 sift-fixed:matched score=grad_snr selection_batches=16 select_first=1
      ;;
    a-snr-seeds)
      seeds_at_best classification 300 sift-fixed:matched score=grad_snr selection_batches=16 select_first=1
      ;;
    # The choices from 16 micro-batches before training on (a), at rates beyond their one-batch option's.
    a-window-rates)
      a sift-fixed:matched 2e-3 selection_batches=16 select_first=1
      a sift-fixed:matched 1e-3 selection=balanced line_cap=1 selection_batches=16 select_first=1
      a sift-fixed:matched 5e-4 selection_batches=16 select_first=1
      a sift-fixed:matched 4e-3 selection=balanced line_cap=1 selection_batches=16 select_first=1
      ;;
    # The rest of the 16-micro-batch choices' grids: balanced at line_cap=1 below its best on (a), the Fisher ranking
    # on (a), and on (b) each choice about its one-batch option's rate.
    a-window-rates-2)
      a sift-fixed:matched 5e-4 selection=balanced line_cap=1 selection_batches=16 select_first=1
      a sift-fixed:matched 5e-4 score=grad_squared selection_batches=16 select_first=1
      a sift-fixed:matched 2e-3 score=grad_squared selection_batches=16 select_first=1
      a sift-fixed:matched 1e-3 selection=balanced line_cap=1 score=grad_squared selection_batches=16 select_first=1
      a sift-fixed:matched 4e-3 selection=balanced line_cap=1 score=grad_squared selection_batches=16 select_first=1
      ;;
    b-window-rates-2)
      b sift-fixed:matched 3.2e-3 selection=balanced line_cap=1 selection_batches=16 select_first=1
      b sift-fixed:matched 1.28e-2 selection=balanced line_cap=1 selection_batches=16 select_first=1
      b sift-fixed:matched 8e-4 score=grad_squared selection_batches=16 select_first=1
      b sift-fixed:matched 3.2e-3 score=grad_squared selection_batches=16 select_first=1
      b sift-fixed:matched 3.2e-3 selection=balanced line_cap=1 score=grad_squared selection_batches=16 select_first=1
      b sift-fixed:matched 1.28e-2 selection=balanced line_cap=1 score=grad_squared selection_batches=16 select_first=1
      ;;
    # (b) at 0.01%: seeds 1 and 2 for random components and balanced at line_cap=1 at their seed-0 rates.
    b-0.01pct-seeds)
      seeds_at_best causal_lm 40 random:0.0001
      seeds_at_best causal_lm 40 sift-fixed:0.0001 selection=balanced line_cap=1
      ;;
    # Balanced at line_cap=1 by the Fisher ranking from 16 micro-batches on (a): best at its grid's low edge (1e-3,
    # level with random components on validation), one rate below it, then seeds 1 and 2 at the best.
    a-cap-fisher)
      a sift-fixed:matched 5e-4 selection=balanced line_cap=1 score=grad_squared selection_batches=16 select_first=1
      seeds_at_best classification 300 sift-fixed:matched selection=balanced line_cap=1 score=grad_squared \
        selection_batches=16 select_first=1
      ;;
    # Below the low edge of two 16-micro-batch grids on (b): the top-k and balanced at line_cap=1, both by the Fisher
    # ranking; then seeds 1 and 2 at 0.01% for the top-k.
    b-fisher-edge)
      b sift-fixed:matched 4e-4 score=grad_squared selection_batches=16 select_first=1
      b sift-fixed:matched 1.6e-3 selection=balanced line_cap=1 score=grad_squared selection_batches=16 select_first=1
      ;;
    b-0.01pct-topk-seeds)
      seeds_at_best causal_lm 40 sift-fixed:0.0001
      ;;
    # Beyond the one rate of three choices under balanced's tightest cap: by |g|, from 4 micro-batches, and by the
    # signal-to-noise ratio (both tasks).
    b-cap-rates)
      b sift-fixed:matched 3.2e-3 selection=balanced line_cap=1 score=grad
      b sift-fixed:matched 1.28e-2 selection=balanced line_cap=1 score=grad
      ;;
    b-snr-cap-rates)
      b sift-fixed:matched 3.2e-3 selection=balanced line_cap=1 score=grad_snr selection_batches=16 select_first=1
      b sift-fixed:matched 1.28e-2 selection=balanced line_cap=1 score=grad_snr selection_batches=16 select_first=1
      b sift-fixed:matched 3.2e-3 selection=balanced line_cap=1 selection_batches=4
      ;;
    a-snr-cap-rates)
      a sift-fixed:matched 4e-3 selection=balanced line_cap=1 score=grad_snr selection_batches=16 select_first=1
      ;;
    # The last open grid (balanced at line_cap=1 from 4 micro-batches, best at its top so far), then the
    # 160-step check on seeds 1 and 2 for the three that led it on seed 0, each at its 40-step rate.
    b-cap4-top)
      b sift-fixed:matched 1.28e-2 selection=balanced line_cap=1 selection_batches=4
      ;;
    b-160-seeds)
      for seed in 1 2; do
        cell causal_lm 160 $seed random:matched 6.4e-3
        cell causal_lm 160 $seed sift-fixed:matched 6.4e-3 selection=balanced line_cap=1
        cell causal_lm 160 $seed lora:8 3.2e-3
      done
      ;;
    b-160-rates-a)  # 160 steps, seed 0: each method at half and twice its 40-step rate
      cell causal_lm 160 0 random:matched 3.2e-3; cell causal_lm 160 0 random:matched 1.28e-2
      cell causal_lm 160 0 lora:8 1.6e-3
      ;;
    b-160-rates-b)
      cell causal_lm 160 0 lora:8 6.4e-3
      cell causal_lm 160 0 sift-fixed:matched 3.2e-3 selection=balanced line_cap=1
      cell causal_lm 160 0 sift-fixed:matched 1.28e-2 selection=balanced line_cap=1
      ;;
    # Steps scaled by each input feature's size (step_scale=input) at LoRA r=8's count: balanced at
    # line_cap=1, random components and the top-k, each around its own best rate without the scaling.
    # Balanced's seeds 1 and 2 run first, at the rate a first grid (the same steps, outside the sweep) chose.
    b-input)
      b sift-fixed:matched 6.4e-3 selection=balanced line_cap=1 step_scale=input
      for seed in 1 2; do
        cell causal_lm 40 $seed sift-fixed:matched 6.4e-3 selection=balanced line_cap=1 step_scale=input
      done
      b random:matched 6.4e-3 step_scale=input; b random:matched 1.28e-2 step_scale=input
      b random:matched 2.56e-2 step_scale=input
      seeds_at_best causal_lm 40 random:matched step_scale=input
      b sift-fixed:matched 3.2e-3 selection=balanced line_cap=1 step_scale=input
      b sift-fixed:matched 1.28e-2 selection=balanced line_cap=1 step_scale=input
      ;;
    a-input-low)  # 0.1% on (a), where the target is one point of LoRA r=8
      a sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input; a random:0.001 3.2e-2 step_scale=input
      a sift-fixed:0.001 1.6e-2 selection=balanced line_cap=1 step_scale=input; a random:0.001 6.4e-2 step_scale=input
      a sift-fixed:0.001 6.4e-2 selection=balanced line_cap=1 step_scale=input; a random:0.001 1.6e-2 step_scale=input
      ;;
    a-input-low-bal)  # balanced's grid at 0.1% first, then its seeds
      a sift-fixed:0.001 1.6e-2 selection=balanced line_cap=1 step_scale=input
      a sift-fixed:0.001 6.4e-2 selection=balanced line_cap=1 step_scale=input
      ;;
    a-input-low-seeds)
      seeds_at_best classification 300 sift-fixed:0.001 selection=balanced line_cap=1 step_scale=input
      ;;
    a-input-low-seed2)  # seed 2 alone, to run beside a-input-low-seeds' seed 1
      cell classification 300 2 sift-fixed:0.001 "$(best_lr classification 300 sift-fixed:0.001 selection=balanced \
        line_cap=1 step_scale=input)" selection=balanced line_cap=1 step_scale=input
      ;;
    # The head first (select_after=N: the new classification head trains alone for N steps, then the selection
    # window opens, so the body's gradient reaches it through a trained head, not a random one), on (a), at LoRA's
    # count and at 0.1%, each at its own best rate without the wait; random components with the same wait
    # separate the head's head start from the choice.
    a-after-1)
      a sift-fixed:matched 2e-3 selection=balanced line_cap=1 step_scale=input select_after=30
      a sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input select_after=30
      a sift-fixed:matched 1e-3 select_after=30
      ;;
    a-after-2)
      a random:matched 2e-3 select_after=30
      a sift-fixed:matched 2e-3 selection=balanced line_cap=1 step_scale=input select_after=60
      a sift-fixed:0.001 8e-3 select_after=30
      ;;
    # The best validation at 0.1% on (a) so far (balanced at line_cap=1, scaled, after 30 steps of the head: 79.5):
    # its seeds 1 and 2 (one part each, to run side by side) and the rate below it.
    a-after-low-s1)
      cell classification 300 1 sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input select_after=30
      ;;
    a-after-low-s2)
      cell classification 300 2 sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input select_after=30
      ;;
    a-after-low-grid)
      a sift-fixed:0.001 1.6e-2 selection=balanced line_cap=1 step_scale=input select_after=30
      ;;
    a-after-low-top)
      a sift-fixed:0.001 6.4e-2 selection=balanced line_cap=1 step_scale=input select_after=30
      ;;
    # More seeds (a-more-seeds-3, a-more-seeds-4, ...) at LoRA r=8's count on (a), each method at its chosen rate:
    # whether random components' lead over the gradient's best choices (within the spread of three seeds) holds on
    # more. Their records are kept apart from the sweep's three-seed protocol:
    # SWEEP_DIR=bench/results/sweep_more_seeds bash bench/sweep.sh a-more-seeds-5
    a-more-seeds-[0-9]*)
      seed=${part#a-more-seeds-}
      cell classification 300 "$seed" random:matched 2e-3
      cell classification 300 "$seed" sift-fixed:matched 2e-3 selection=balanced line_cap=1 step_scale=input
      cell classification 300 "$seed" sift-fixed:matched 2e-3 selection=balanced line_cap=1
      cell classification 300 "$seed" lora:8 1e-3
      ;;
    # LoRA r=8 at 160 steps on (b): below its best rate so far (1.6e-3, the lower edge of its grid), then seeds 1
    # and 2 at the rate seed 0's validation chooses.
    b-160-lora-low)
      cell causal_lm 160 0 lora:8 8e-4
      seeds_at_best causal_lm 160 lora:8
      ;;
    # 0.1% on (a), where the choice matters most: balanced at line_cap=1 with scaled steps, chosen before training
    # from 16 micro-batches, by |g w| and by the Fisher ranking, about its one-batch rate (3.2e-2).
    a-low-window)
      for score in grad_weight grad_squared; do
        a sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input score=$score selection_batches=16 \
          select_first=1
      done
      for score in grad_weight grad_squared; do
        a sift-fixed:0.001 1.6e-2 selection=balanced line_cap=1 step_scale=input score=$score selection_batches=16 \
          select_first=1
      done
      ;;
    a-low-window-more)  # the |g w| choice from 16 micro-batches: above its best rate, then seeds 1 and 2
      a sift-fixed:0.001 6.4e-2 selection=balanced line_cap=1 step_scale=input score=grad_weight selection_batches=16 \
        select_first=1
      seeds_at_best classification 300 sift-fixed:0.001 selection=balanced line_cap=1 step_scale=input \
        score=grad_weight selection_batches=16 select_first=1
      ;;
    # More seeds at 0.1% on (a) (a-low-more-seeds-3, ...): balanced at line_cap=1 with scaled steps and random
    # components, each at seed 0's chosen rate (3.2e-2 both), beside LoRA r=8's seeds from a-more-seeds-N.
    # Kept apart like a-more-seeds-N: SWEEP_DIR=bench/results/sweep_more_seeds bash bench/sweep.sh a-low-more-seeds-3
    a-low-more-seeds-[0-9]*)
      seed=${part#a-low-more-seeds-}
      cell classification 300 "$seed" sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input
      cell classification 300 "$seed" random:0.001 3.2e-2
      ;;
    # 0.1% on (a): the rate grid at steps of sqrt(2) about the chosen rates of balanced at line_cap=1 with scaled
    # steps (3.2e-2; 1.6e-2 and 6.4e-2 were 1.0 and 2.4 lower on validation) and of LoRA r=8 (1e-3; 2e-3 fell to
    # the majority class), then seeds 1 and 2 at the rate seed 0's validation chooses.
    a-low-fine-1)
      a sift-fixed:0.001 4.5e-2 selection=balanced line_cap=1 step_scale=input; a lora:8 1.4e-3
      ;;
    a-low-fine-2)
      a lora:8 7e-4; a sift-fixed:0.001 2.3e-2 selection=balanced line_cap=1 step_scale=input
      ;;
    a-low-fine-seeds-1)
      seeds_at_best classification 300 sift-fixed:0.001 selection=balanced line_cap=1 step_scale=input
      ;;
    a-low-fine-seeds-2)
      seeds_at_best classification 300 lora:8
      ;;
    # Balanced at line_cap=1 with scaled steps at the densities other than LoRA's count (and 0.1% on (a)):
    # b-scaled-1 runs (b) at 1%, a-scaled-10 (a) at 10%, ... Seed 0's grid about balanced at line_cap=1's unscaled
    # rate there, closed, then seeds 1 and 2 at its best rate.
    [ab]-scaled-*)
      case $part in
        b-scaled-0.01) at="causal_lm 40 sift-fixed:0.0001" rates="6.4e-2 1.28e-1 2.56e-1" ;;
        b-scaled-0.1) at="causal_lm 40 sift-fixed:0.001" rates="3.2e-2 6.4e-2 1.28e-1" ;;
        b-scaled-1) at="causal_lm 40 sift-fixed:0.01" rates="6.4e-3 1.28e-2 2.56e-2" ;;
        b-scaled-10) at="causal_lm 40 sift-fixed:0.1" rates="8e-4 1.6e-3 3.2e-3" ;;
        a-scaled-0.01) at="classification 300 sift-fixed:0.0001" rates="3.2e-2 6.4e-2 1.28e-1" ;;
        a-scaled-1) at="classification 300 sift-fixed:0.01" rates="2e-3 4e-3 8e-3" ;;
        a-scaled-10) at="classification 300 sift-fixed:0.1" rates="2.5e-4 5e-4 1e-3" ;;
        *) echo "unknown part: $part (b-scaled-0.01, -0.1, -1, -10; a-scaled-0.01, -1, -10)" >&2; exit 2 ;;
      esac
      # shellcheck disable=SC2086  # $at and $rates are lists of words
      grid $at $rates -- selection=balanced line_cap=1 step_scale=input
      # shellcheck disable=SC2086
      seeds_at_best $at selection=balanced line_cap=1 step_scale=input
      ;;
    # The head's rate at 0.1% on (a): SIFT's cells train the classifier at 2e-3 whatever the rate of the components,
    # LoRA's at its adapter's rate. Seed 0 of balanced at line_cap=1 with scaled steps (3.2e-2) and of LoRA r=8
    # (1e-3) at other head rates.
    a-head-sift)
      for head in 5e-4 1e-3 4e-3 8e-3; do
        a sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input dense_lr=$head
      done
      ;;
    a-head-lora)
      for head in 2.5e-4 5e-4 2e-3 4e-3; do a lora:8 1e-3 dense_lr=$head; done
      ;;
    # Seed 0's validation at 0.1% chose the head at 4e-3 for balanced (5e-4 78.3, 1e-3 78.4, 2e-3 79.0, 4e-3 80.6,
    # 8e-3 79.5) and kept LoRA's tied to its rate (2.5e-4 79.9, 5e-4 79.3, 1e-3 80.4, 2e-3 56.3, 4e-3 80.1). Then:
    # seeds 1 and 2 there; the components' rate at steps of sqrt(2) about 3.2e-2 with the head at 4e-3; random
    # components at 0.1% with the head at 4e-3 and 8e-3.
    a-head-low-seeds)
      for seed in 1 2; do
        cell classification 300 "$seed" sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input \
          dense_lr=4e-3
      done
      ;;
    a-head-low-lr)
      for lr in 2.3e-2 4.5e-2; do
        a sift-fixed:0.001 "$lr" selection=balanced line_cap=1 step_scale=input dense_lr=4e-3
      done
      ;;
    a-head-low-random)
      a random:0.001 3.2e-2 dense_lr=4e-3; a random:0.001 3.2e-2 dense_lr=8e-3
      ;;
    # At LoRA's count on (a): balanced at line_cap=1 with scaled steps and random components, each at its chosen
    # rate (2e-3), with the head at 4e-3 and 8e-3 (a-head-sift's trend at 0.1%).
    a-head-matched)
      for head in 4e-3 8e-3; do
        a sift-fixed:matched 2e-3 selection=balanced line_cap=1 step_scale=input dense_lr=$head
        a random:matched 2e-3 dense_lr=$head
      done
      ;;
    # Seeds 1 and 2 of balanced at line_cap=1 with scaled steps and random components at LoRA's count on (a), with
    # the head at the rate seed 0's validation chose among 2e-3, 4e-3 and 8e-3.
    a-head-matched-seeds)
      seeds_at_head classification 300 sift-fixed:matched 2e-3 selection=balanced line_cap=1 step_scale=input
      seeds_at_head classification 300 random:matched 2e-3
      ;;
    # The head's grid at LoRA's count closed above 8e-3 (the best for both on seed 0's validation), then seeds 1
    # and 2 at the head rate chosen (none run again where it stays 8e-3).
    a-head-matched-edge)
      a sift-fixed:matched 2e-3 selection=balanced line_cap=1 step_scale=input dense_lr=1.6e-2
      a random:matched 2e-3 dense_lr=1.6e-2
      seeds_at_head classification 300 sift-fixed:matched 2e-3 selection=balanced line_cap=1 step_scale=input
      seeds_at_head classification 300 random:matched 2e-3
      ;;
    # Random components at 0.1% on (a): seeds 1 and 2 with the head at the rate seed 0's validation chose.
    a-head-low-random-seeds)
      seeds_at_head classification 300 random:0.001 3.2e-2
      ;;
    # More seeds at 0.1% on (a) with the head at 4e-3, the head rate seed 0's validation chose for both (as
    # a-low-more-seeds-N): balanced at line_cap=1 with scaled steps (a-head-low-more-seeds-3, ...) and random
    # components (a-head-low-random-more-seeds-3, ...).
    a-head-low-more-seeds-[0-9]*)
      cell classification 300 "${part#a-head-low-more-seeds-}" sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 \
        step_scale=input dense_lr=4e-3
      ;;
    # More seeds at LoRA's count on (a) with the head at 8e-3, the head rate seed 0's validation chose for both
    # balanced at line_cap=1 with scaled steps and random components (a-head-more-seeds-3, ...).
    a-head-more-seeds-[0-9]*)
      seed=${part#a-head-more-seeds-}
      cell classification 300 "$seed" sift-fixed:matched 2e-3 selection=balanced line_cap=1 step_scale=input \
        dense_lr=8e-3
      cell classification 300 "$seed" random:matched 2e-3 dense_lr=8e-3
      ;;
    a-head-low-random-more-seeds-[0-9]*)
      cell classification 300 "${part#a-head-low-random-more-seeds-}" random:0.001 3.2e-2 dense_lr=4e-3
      ;;
    # The head first at 0.1% on (a) with the head at 4e-3: balanced at line_cap=1 with scaled steps, the selection
    # made after the head trained alone for 30 or 60 steps (a-after-low ran it with the head at 2e-3).
    a-head-after-low)
      a sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input select_after=30 dense_lr=4e-3
      a sift-fixed:0.001 4.5e-2 selection=balanced line_cap=1 step_scale=input select_after=30 dense_lr=4e-3
      a sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input select_after=60 dense_lr=4e-3
      ;;
    # SiftConfig's default (balanced at line_cap=1 with scaled steps) at 160 steps on (b), beside random components,
    # LoRA r=8 and balanced unscaled (b-160*): seed 0 at its 40-step rate and the rates either side, seeds 1 and 2
    # at the 40-step rate, which every 160-step grid of balanced and random components chose.
    b-160-default-a)
      cell causal_lm 160 0 sift-fixed:matched 6.4e-3 selection=balanced line_cap=1 step_scale=input
      cell causal_lm 160 1 sift-fixed:matched 6.4e-3 selection=balanced line_cap=1 step_scale=input
      ;;
    b-160-default-low)  # b-160-default-b's last cell, to run beside it
      cell causal_lm 160 0 sift-fixed:matched 3.2e-3 selection=balanced line_cap=1 step_scale=input
      ;;
    b-160-default-b)
      cell causal_lm 160 2 sift-fixed:matched 6.4e-3 selection=balanced line_cap=1 step_scale=input
      cell causal_lm 160 0 sift-fixed:matched 1.28e-2 selection=balanced line_cap=1 step_scale=input
      cell causal_lm 160 0 sift-fixed:matched 3.2e-3 selection=balanced line_cap=1 step_scale=input
      ;;
    # A choice from a trained run (SiftConfig.select_from) at 0.1% on (a): SiftConfig's default at 1% and its
    # chosen rate (4e-3) trains seed N and saves its increment into bench/results/sweep_increments
    # (a-from-source-N); the 0.1% run of the same seed ranks its components by that run's change, with the head at
    # 4e-3 (a-from-grid: seed 0's grid; a-from-seeds: seeds 1 and 2 at its best rate).
    a-from-source-[0-9]*)
      source_run classification 300 4e-3 "${part#a-from-source-}"
      ;;
    a-from-grid)
      grid classification 300 sift-fixed:0.001 1.6e-2 3.2e-2 6.4e-2 -- "${FROM[@]}" dense_lr=4e-3
      ;;
    a-from-seeds)
      seeds_at_best classification 300 sift-fixed:0.001 "${FROM[@]}" dense_lr=4e-3
      ;;
    # The same at 0.01% on (a), from the default's 0.1% run at its chosen rate (3.2e-2, the head at 4e-3): the source
    # of seed N (a-from-low-source-N), seed 0's grid about half the default's chosen 1.28e-1 (a-from-low-grid), seeds
    # 1 and 2 at its best (a-from-low-seeds), each with the head at the task's default.
    a-from-low-source-[0-9]*)
      source_run classification 300 3.2e-2 "${part#a-from-low-source-}" 0.001 4e-3
      ;;
    a-from-low-grid)
      grid classification 300 sift-fixed:0.0001 3.2e-2 6.4e-2 1.28e-1 -- "${FROM_LOW[@]}"
      ;;
    a-from-low-seeds)
      seeds_at_best classification 300 sift-fixed:0.0001 "${FROM_LOW[@]}"
      ;;
    # More seeds of it (as a-head-low-more-seeds-N, with SWEEP_DIR=bench/results/sweep_more_seeds): seed N's 1% run,
    # then its 0.1% run at the rate seed 0's validation chose (3.2e-2, the head at 4e-3).
    a-from-more-seeds-[0-9]*)
      seed=${part#a-from-more-seeds-}
      source_run classification 300 4e-3 "$seed"
      cell classification 300 "$seed" sift-fixed:0.001 3.2e-2 "${FROM[@]}" dense_lr=4e-3
      ;;
    # Off its chosen rate (a quarter and four times it), as the sweep's tables show every finalist: (a) at 8e-3 and
    # 1.28e-1, (b) at 8e-3 (its four times, 1.28e-1, ran in b-from-grid).
    from-forgiveness)
      a sift-fixed:0.001 8e-3 "${FROM[@]}" dense_lr=4e-3
      a sift-fixed:0.001 1.28e-1 "${FROM[@]}" dense_lr=4e-3
      b sift-fixed:0.001 8e-3 "${FROM_B[@]}"
      ;;
    # SiftConfig's default off its chosen rate at LoRA's count (a quarter and four times it): (a) at 5e-4 and 8e-3
    # with the head at its chosen 8e-3 (a-default-forgiveness), (b) at 1.6e-3 and 2.56e-2 (b-default-forgiveness).
    a-default-forgiveness)
      for lr in 5e-4 8e-3; do
        a sift-fixed:matched "$lr" selection=balanced line_cap=1 step_scale=input dense_lr=8e-3
      done
      ;;
    b-default-forgiveness)
      for lr in 1.6e-3 2.56e-2; do
        b sift-fixed:matched "$lr" selection=balanced line_cap=1 step_scale=input
      done
      ;;
    # At 0.1% on (a), SiftConfig's default and random components off their chosen rate (3.2e-2, the head at 4e-3)
    a-low-forgiveness-default)
      for lr in 8e-3 1.28e-1; do a sift-fixed:0.001 "$lr" selection=balanced line_cap=1 step_scale=input dense_lr=4e-3; done
      ;;
    a-low-forgiveness-random)
      for lr in 8e-3 1.28e-1; do a random:0.001 "$lr" dense_lr=4e-3; done
      ;;
    # Each headline row off its chosen rate (a quarter and four times seed 0's best): SiftConfig's default and random
    # components at each density, LoRA at r=1, 2 and 32. a-forgiveness-default, -random, -lora; the same with b-.
    [ab]-forgiveness-default|[ab]-forgiveness-random|[ab]-forgiveness-lora|b-forgiveness-lora-[0-9]*)
      case ${part%%-*} in
        a) at="classification 300" densities="0.0001 0.01 0.1" ;;
        b) at="causal_lm 40" densities="0.0001 0.001 0.01 0.1" ;;
      esac
      case $part in
        *-default) for d in $densities; do
            # shellcheck disable=SC2086  # $at is two words
            off_rate $at "sift-fixed:$d" selection=balanced line_cap=1 step_scale=input
          done ;;
        *-random) for d in $densities; do
            # shellcheck disable=SC2086
            off_rate $at "random:$d"
          done ;;
        *-lora) for r in 1 2 32; do
            # shellcheck disable=SC2086
            off_rate $at "lora:$r"
          done ;;
        b-forgiveness-lora-*)  # one rank of b-forgiveness-lora, to run side by side
          off_rate causal_lm 40 "lora:${part#b-forgiveness-lora-}" ;;
      esac
      ;;
    # The same on (b) at 0.1%: SiftConfig's default at 1% and its chosen rate (1.28e-2) trains seed N and saves its
    # increment (b-from-source-N); the 0.1% run ranks by its change (b-from-grid, b-from-seeds).
    b-from-source-[0-9]*)
      source_run causal_lm 40 1.28e-2 "${part#b-from-source-}"
      ;;
    b-from-grid)
      grid causal_lm 40 sift-fixed:0.001 6.4e-2 1.28e-1 2.56e-1 -- "${FROM_B[@]}"
      ;;
    b-from-seeds)
      seeds_at_best causal_lm 40 sift-fixed:0.001 "${FROM_B[@]}"
      ;;
    # A wider selection narrowed in the run (SiftConfig.shrink_after) at 0.1% on (a): ten times the count for the
    # first 30, 100 or 200 steps, at the default's rate and head rate there.
    a-shrink)
      for after in 30 100 200; do
        a sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1 step_scale=input shrink_after=$after dense_lr=4e-3
      done
      ;;
    b-input-topk)
      b sift-fixed:matched 3.2e-3 step_scale=input; b sift-fixed:matched 6.4e-3 step_scale=input
      b sift-fixed:matched 1.6e-3 step_scale=input
      ;;
    b-input-topk-1)  # b-input-topk in two parts, to run side by side
      b sift-fixed:matched 3.2e-3 step_scale=input; b sift-fixed:matched 1.6e-3 step_scale=input
      ;;
    b-input-topk-2)
      b sift-fixed:matched 6.4e-3 step_scale=input
      ;;
    b-input-topk-top)  # the grid's best was at its top (6.4e-3)
      b sift-fixed:matched 1.28e-2 step_scale=input
      ;;
    a-input)
      a sift-fixed:matched 2e-3 selection=balanced line_cap=1 step_scale=input; a random:matched 2e-3 step_scale=input
      a sift-fixed:matched 1e-3 selection=balanced line_cap=1 step_scale=input; a random:matched 4e-3 step_scale=input
      a sift-fixed:matched 4e-3 selection=balanced line_cap=1 step_scale=input; a random:matched 1e-3 step_scale=input
      ;;
    a-input-topk)
      a sift-fixed:matched 1e-3 step_scale=input; a sift-fixed:matched 2e-3 step_scale=input
      a sift-fixed:matched 5e-4 step_scale=input
      ;;
    b-input-seeds)
      seeds_at_best causal_lm 40 sift-fixed:matched selection=balanced line_cap=1 step_scale=input
      seeds_at_best causal_lm 40 random:matched step_scale=input
      ;;
    a-input-seeds)
      seeds_at_best classification 300 sift-fixed:matched selection=balanced line_cap=1 step_scale=input
      seeds_at_best classification 300 random:matched step_scale=input
      ;;
    b-cap-open)
      b sift-fixed:0.01 1.28e-2 selection=balanced line_cap=1; b sift-fixed:0.001 3.2e-2 selection=balanced line_cap=1
      b sift-fixed:0.01 6.4e-3 selection=balanced line_cap=1
      ;;
    *) echo "unknown part $part ($(grep -oE '^    [a-z0-9-]+\)' "$0" | tr -d ' )' | paste -sd, | sed 's/,/, /g'))" >&2; exit 2 ;;
  esac
done
