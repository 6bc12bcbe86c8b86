#!/usr/bin/env bash
# The SmolLM2 offsite table, third pass (experiments/offsite/RESULTS.md, "Input-noise distillation"):
# the second pass's chosen layout (2+8+2, 400 distillation steps on BBC News, adapter lr chosen on the
# validation split) distilled with the middle's input perturbed (--distill-input-noise sigma: the same
# Gaussian noise, sigma x the per-token rms, on the first middle block's input in teacher and student),
# which on MiniLM moved the plug-in towards full fine-tuning. Same 320 training and 200 validation
# glosses as run_smollm2_lr.sh, whose references (zero-shot, full-model LoRA by lr) this pass reuses.
# CPU only, one thread per process; on 2 quiet cores a build is ~15 min, an evaluate line 2-6 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
. experiments/offsite/smollm2_common.sh   # PY, CACHE, DATA, E, COMMON
OUT=${OUT:-experiments/offsite/smollm2-noise}
SIGMAS=${SIGMAS:-"1.0 0.1"}
mkdir -p "$CACHE" "$OUT"
for sigma in $SIGMAS; do
  EMU="$CACHE/emu-keep8-d400-noise$sigma"
  [ -f "$EMU/config.json" ] || \
    $E build --model smollm2 --output-dir "$EMU" --adapter-layers 2 --keep 8 --distill-data bbcnews \
      --distill-steps 400 --distill-lr 3e-4 --distill-batch-size 8 --max-length 64 --threads 1 \
      --distill-input-noise "$sigma" --checkpoint-dir "$CACHE/ckpt-keep8-d400-noise$sigma"
  for lr in ${LRS:-1e-3}; do
    $E evaluate $COMMON --emulator "$EMU" --rows emulator_untuned emulator_alone plug_in --adapter-lr $lr \
      --json "$OUT/keep8-noise$sigma-$lr.json"
  done
done
