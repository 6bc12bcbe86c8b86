#!/usr/bin/env bash
# The SmolLM2 offsite table, fifth pass (experiments/offsite/RESULTS.md, "Fifth pass"): the fourth pass's best
# distillation (2+8+2, hidden + next-token KL weight 1, lr 1e-3) run twice as long (800 steps), then the plug-in
# refined on the coordinator before export: the teacher is the geometric mixture of the plug-in and the tuned
# emulator (--refine-emulator-weight 0.3, chosen on the validation split by mixture_sweep.py), and it writes the
# texts itself (--refine-text generated: 640 texts of 48 tokens from a document start; no client data). Scored
# exactly as run_smollm2_lr.sh (same 320 training and 200 validation glosses, adapter lr 1e-3), whose
# references (zero-shot, full-model LoRA) this pass reuses; seed 1 draws another order and 200 other glosses.
# CPU only, one thread per process; on 2 quiet cores the build is ~45 min, an evaluate line with refinement ~15.
set -euo pipefail
cd "$(dirname "$0")/../.."
. experiments/offsite/smollm2_common.sh   # PY, CACHE, DATA, E, COMMON
OUT=${OUT:-experiments/offsite/smollm2-refine}
mkdir -p "$CACHE" "$OUT"

[ -f "$CACHE/emu-kl-d800/config.json" ] || \
  $E build --model smollm2 --output-dir "$CACHE/emu-kl-d800" --adapter-layers 2 --keep 8 --distill-data bbcnews \
    --distill-steps 800 --distill-lr 1e-3 --distill-batch-size 8 --max-length 64 --threads 1 \
    --checkpoint-dir "$CACHE/ckpt-kl-d800" --distill-kl-weight 1
# the mixture weight: perplexity of the mixture teacher itself on the validation glosses, w = 0.1 ... 0.4
for seed in 0 1; do
  $PY experiments/offsite/mixture_sweep.py --emulator "$CACHE/emu-kl-d800" --seed $seed --json "$OUT/mixture-sweep-seed$seed.json"
done
REFINE="--refine-steps 160 --refine-lr 3e-4 --refine-temperature 1 --refine-emulator-weight 0.3
        --refine-text generated --refine-generated-texts 640"
for seed in 0 1; do
  $E evaluate $COMMON --seed $seed --emulator "$CACHE/emu-kl-d800" --rows emulator_untuned emulator_alone plug_in \
    --adapter-lr 1e-3 $REFINE --json "$OUT/kl-d800-refined-seed$seed.json"
done
