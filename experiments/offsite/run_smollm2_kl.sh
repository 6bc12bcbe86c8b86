#!/usr/bin/env bash
# The SmolLM2 offsite table, fourth pass (experiments/offsite/RESULTS.md, "Fourth pass"): what the
# distillation objective does to the plug-in. The second pass's layout (2+8+2, 400 steps on BBC News,
# batch 8 x 64 tokens) distilled with
#   --distill-hidden-metric channel  the hidden error scaled per channel instead of per token (SmolLM2's
#                                    residual has one massive-activation channel with ~95 % of the energy)
#   --distill-kl-weight 1            KL(full || emulator) of the next-token distributions added
#   --distill-lr 1e-3                a higher distillation rate (the 3e-4 loss had flattened at 0.23)
# and scored exactly as run_smollm2_lr.sh (same 320 training and 200 validation glosses, adapter lr
# chosen on the validation split), whose references (zero-shot, full-model LoRA) this pass reuses.
# CPU only, one thread per process; on 2 quiet cores a build is 10-25 min, an evaluate line 2-6 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
. experiments/offsite/smollm2_common.sh   # PY, CACHE, DATA, E, COMMON
OUT=${OUT:-experiments/offsite/smollm2-kl}
mkdir -p "$CACHE" "$OUT"

build() {  # NAME LR extra build flags...
  local name=$1 lr=$2; shift 2
  [ -f "$CACHE/emu-$name/config.json" ] || \
    $E build --model smollm2 --output-dir "$CACHE/emu-$name" --adapter-layers 2 --keep 8 --distill-data bbcnews \
      --distill-steps 400 --distill-lr "$lr" --distill-batch-size 8 --max-length 64 --threads 1 \
      --checkpoint-dir "$CACHE/ckpt-$name" "$@"
}
score() {  # NAME ADAPTER_LR
  $E evaluate $COMMON --emulator "$CACHE/emu-$1" --rows emulator_untuned emulator_alone plug_in \
    --adapter-lr "$2" --json "$OUT/$1-$2.json"
}

build channel 3e-4 --distill-hidden-metric channel; score channel 1e-3
build kl 3e-4 --distill-kl-weight 1;               score kl 1e-3; score kl 3e-3
build lr1e-3 1e-3;                                 score lr1e-3 1e-3
build kl-lr1e-3 1e-3 --distill-kl-weight 1;        score kl-lr1e-3 1e-3
build kl3 3e-4 --distill-kl-weight 3;              score kl3 1e-3
# the best emulator at seed 1: another training order and another 200 validation glosses
$E evaluate $COMMON --seed 1 --emulator "$CACHE/emu-kl-lr1e-3" --rows emulator_untuned emulator_alone plug_in \
  --adapter-lr 1e-3 --json "$OUT/seed1-kl-lr1e-3-1e-3.json"
