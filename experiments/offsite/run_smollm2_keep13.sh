#!/usr/bin/env bash
# The SmolLM2 offsite table, sixth pass (experiments/offsite/RESULTS.md, "Sixth pass"): the fifth pass's
# distillation (hidden + next-token KL weight 1, lr 1e-3, 800 steps of 8 x 64 BBC tokens) on the paper's
# compression, half the middle kept (2+13+2: 13 of the 26 middle blocks, the layout the Offsite-Tuning paper
# uses), instead of 2+8+2. Scored exactly as run_smollm2_refine.sh (same 320 training and 200 validation glosses,
# adapter lr 1e-3; seed 1 draws another order and 200 other glosses), whose references (zero-shot, full-model
# LoRA) this pass reuses. The mixture weight of the refinement teacher is read off seed 0's sweep.
# CPU only; on 2 cores the build took 36 min at two threads, an evaluate line with refinement ~55 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
. experiments/offsite/smollm2_common.sh   # PY, CACHE, DATA, E, COMMON
OUT=${OUT:-experiments/offsite/smollm2-keep13}
mkdir -p "$CACHE" "$OUT"

[ -f "$CACHE/emu-k13-d800/config.json" ] || \
  $E build --model smollm2 --output-dir "$CACHE/emu-k13-d800" --adapter-layers 2 --keep 13 --distill-data bbcnews \
    --distill-steps 800 --distill-lr 1e-3 --distill-batch-size 8 --max-length 64 --threads 2 \
    --checkpoint-dir "$CACHE/ckpt-k13-d800" --distill-kl-weight 1
for seed in 0 1; do
  $PY experiments/offsite/mixture_sweep.py --emulator "$CACHE/emu-k13-d800" --seed $seed \
    --weights 0.2 0.3 0.4 0.5 --json "$OUT/mixture-sweep-seed$seed.json"
done
REFINE="--refine-steps 160 --refine-lr 3e-4 --refine-temperature 1 --refine-emulator-weight ${WEIGHT:-0.3}
        --refine-text generated --refine-generated-texts 640"
for seed in 0 1; do
  $E evaluate $COMMON --seed $seed --emulator "$CACHE/emu-k13-d800" --rows emulator_untuned emulator_alone plug_in \
    --adapter-lr 1e-3 $REFINE --json "$OUT/k13-d800-refined-seed$seed.json"
done
