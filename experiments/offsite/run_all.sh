#!/usr/bin/env bash
# Rerun every offsite experiment in RESULTS.md (appends to results.jsonl), then
# `python experiments/offsite/summarize.py` prints the table.
# CPU-only, one thread per run; each line is ~10-20 CPU-minutes on MiniLM.
# Distilled emulators are cached under $CACHE so adapter variants reuse them.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/work/venv/bin/python}
CACHE=${CACHE:-/tmp/fedsite-offsite-cache}
R="$PY experiments/offsite/run_minilm.py"

# --- run (numbers in RESULTS.md) ---------------------------------------------
# the paper's recipe on a 6-block model: 1+1 adapter, 2 of 4 middle blocks kept
$R --tag emu-1+1-keep2-nodistill --adapter-layers 1 --keep 2 \
   --rows emulator_alone plug_in adapter_on_full
$R --tag emu-2+2-keep1-nodistill --adapter-layers 2 --keep 1 --rows emulator_alone plug_in
$R --tag emu-1+1-keep2-distill600 --adapter-layers 1 --keep 2 --distill-steps 600 \
   --emulator-cache "$CACHE/1+1-keep2-d600" --rows emulator_alone plug_in
# higher learning rates (adapter 5e-4, head 5e-3)
$R --tag emu-1+1-keep2-nodistill-lr5e-4-head5e-3 --adapter-layers 1 --keep 2 \
   --adapter-lr 5e-4 --head-lr 5e-3 --rows emulator_alone plug_in
$R --tag emu-1+1-keep2-distill600-lr5e-4-head5e-3 --adapter-layers 1 --keep 2 --distill-steps 600 \
   --emulator-cache "$CACHE/1+1-keep2-d600" --adapter-lr 5e-4 --head-lr 5e-3 \
   --rows emulator_alone plug_in
# LoRA (r=16, every linear layer) on the adapter blocks instead of training them fully
$R --tag emu-1+1-keep2-nodistill-adapterlora16-lr1e-3-head5e-3 --adapter-layers 1 --keep 2 \
   --adapter-lora-r 16 --adapter-lora-targets all-linear --adapter-lr 1e-3 --head-lr 5e-3 \
   --rows emulator_alone plug_in
# plug-in's ceiling: the same adapter blocks + head trained directly on the full model
$R --tag emu-1+1-lr5e-4-head5e-3-onfull --adapter-layers 1 --keep 2 --adapter-lr 5e-4 \
   --head-lr 5e-3 --rows adapter_on_full

# same-trainer references: full fine-tuning, the linear probe, full-model LoRA
$R --tag baselines-ft1e-4-head5e-3 --rows full_ft linear_probe --ft-lr 1e-4 --head-lr 5e-3 --probe-lr 5e-3
$R --tag baselines-lora-r8-lr1e-3-head5e-3 --rows full_lora --lora-lr 1e-3 --head-lr 5e-3 --threads 2
# a bigger adapter (2+2) with the one kept middle block distilled
$R --tag emu-2+2-keep1-distill600-lr5e-4-head5e-3 --adapter-layers 2 --keep 1 --distill-steps 600 \
   --emulator-cache "$CACHE/2+2-keep1-d600" --adapter-lr 5e-4 --head-lr 5e-3 \
   --rows emulator_alone plug_in adapter_on_full
# less compression: 3 of 4 middle blocks kept
$R --tag emu-1+1-keep3-distill600-lr5e-4-head5e-3 --adapter-layers 1 --keep 3 --distill-steps 600 \
   --emulator-cache "$CACHE/1+1-keep3-d600" --adapter-lr 5e-4 --head-lr 5e-3 --rows emulator_alone plug_in
# longer distillation at a higher distillation lr
$R --tag emu-1+1-keep2-distill1500-dlr3e-4-lr5e-4-head5e-3 --adapter-layers 1 --keep 2 --distill-steps 1500 \
   --distill-lr 3e-4 --emulator-cache "$CACHE/1+1-keep2-d1500-lr3e-4" --adapter-lr 5e-4 --head-lr 5e-3 \
   --rows emulator_alone plug_in
# 2+2 at a lower adapter lr (four blocks train; 5e-4 is too much for them even on the full model)
$R --tag emu-2+2-keep1-distill600-lr2e-4-head5e-3 --adapter-layers 2 --keep 1 --distill-steps 600 \
   --emulator-cache "$CACHE/2+2-keep1-d600" --adapter-lr 2e-4 --head-lr 5e-3 \
   --rows emulator_alone plug_in adapter_on_full

# a second seed (head init, batch order; the same distilled emulator) for the best recipe
$R --tag emu-1+1-keep3-distill600-lr5e-4-head5e-3-seed1 --seed 1 --adapter-layers 1 --keep 3 --distill-steps 600 \
   --emulator-cache "$CACHE/1+1-keep3-d600" --adapter-lr 5e-4 --head-lr 5e-3 --rows emulator_alone plug_in

# distillation with the middle's input perturbed (same noise in teacher and student), 2 of 4 kept
for noise in 0.2 0.5 1.0 2.0; do
  $R --tag emu-1+1-keep2-distill600-noise$noise-lr5e-4-head5e-3 --adapter-layers 1 --keep 2 --distill-steps 600 \
     --distill-input-noise $noise --emulator-cache "$CACHE/1+1-keep2-d600-noise$noise" --adapter-lr 5e-4 \
     --head-lr 5e-3 --rows emulator_alone plug_in
done
# a second seed for none vs 1.0
for noise in 0 1.0; do
  $R --seed 1 --tag emu-1+1-keep2-distill600-noise$noise-lr5e-4-head5e-3-seed1 --adapter-layers 1 --keep 2 \
     --distill-steps 600 --distill-input-noise $noise --emulator-cache "$CACHE/1+1-keep2-d600-noise$noise-seed1" \
     --adapter-lr 5e-4 --head-lr 5e-3 --rows emulator_alone plug_in
done
# ... and on the best recipe (3 of 4 kept)
$R --tag emu-1+1-keep3-distill600-noise1.0-lr5e-4-head5e-3 --adapter-layers 1 --keep 3 --distill-steps 600 \
   --distill-input-noise 1.0 --emulator-cache "$CACHE/1+1-keep3-d600-noise1.0" --adapter-lr 5e-4 --head-lr 5e-3 \
   --rows emulator_alone plug_in
# the "segments" objective (every kept block matched to the end of the run it replaces)
$R --tag emu-1+1-keep2-distill600-segments-lr5e-4-head5e-3 --adapter-layers 1 --keep 2 --distill-steps 600 \
   --distill-objective segments --emulator-cache "$CACHE/1+1-keep2-d600-segments" --adapter-lr 5e-4 \
   --head-lr 5e-3 --rows emulator_alone plug_in
# a third seed for the best recipe
$R --seed 2 --tag emu-1+1-keep3-distill600-lr5e-4-head5e-3-seed2 --adapter-layers 1 --keep 3 --distill-steps 600 \
   --emulator-cache "$CACHE/1+1-keep3-d600" --adapter-lr 5e-4 --head-lr 5e-3 --rows emulator_alone plug_in
# input noise on the 2+2 layout
$R --tag emu-2+2-keep1-distill600-noise1.0-lr2e-4-head5e-3 --adapter-layers 2 --keep 1 --distill-steps 600 \
   --distill-input-noise 1.0 --emulator-cache "$CACHE/2+2-keep1-d600-noise1.0" --adapter-lr 2e-4 --head-lr 5e-3 \
   --rows emulator_alone plug_in
# strong compression (1 of 4 kept), long distillation with noise: does a weaker emulator leave room for plug-in?
$R --tag emu-1+1-keep1-distill1500-dlr3e-4-noise1.0-lr5e-4-head5e-3 --adapter-layers 1 --keep 1 \
   --distill-steps 1500 --distill-lr 3e-4 --distill-input-noise 1.0 \
   --emulator-cache "$CACHE/1+1-keep1-d1500-lr3e-4-noise1.0" --adapter-lr 5e-4 --head-lr 5e-3 --rows emulator_alone plug_in
# plug-in refinement on the public text (the tuned emulator as teacher), from one tuned adapter each
$R --tag refine-1+1-keep2-distill600-lr5e-4-head5e-3 --adapter-layers 1 --keep 2 --distill-steps 600 \
   --emulator-cache "$CACHE/1+1-keep2-d600" --adapter-lr 5e-4 --head-lr 5e-3 --refine-steps 150 400
$R --tag refine-1+1-keep3-distill600-lr5e-4-head5e-3 --adapter-layers 1 --keep 3 --distill-steps 600 \
   --emulator-cache "$CACHE/1+1-keep3-d600" --adapter-lr 5e-4 --head-lr 5e-3 --refine-steps 150 400
$R --seed 1 --tag refine-1+1-keep3-distill600-lr5e-4-head5e-3-seed1 --adapter-layers 1 --keep 3 --distill-steps 600 \
   --emulator-cache "$CACHE/1+1-keep3-d600" --adapter-lr 5e-4 --head-lr 5e-3 --refine-steps 150 400
$R --tag refine-1+1-keep1-distill1500-dlr3e-4-noise1.0-lr5e-4-head5e-3 --adapter-layers 1 --keep 1 \
   --distill-steps 1500 --distill-lr 3e-4 --distill-input-noise 1.0 \
   --emulator-cache "$CACHE/1+1-keep1-d1500-lr3e-4-noise1.0" --adapter-lr 5e-4 --head-lr 5e-3 --refine-steps 150
# layer sharing instead of layer drop (CRaSh), before training: hidden distance only
$PY experiments/offsite/sharing_distance.py

# --- planned, not run for lack of CPU (see RESULTS.md) ------------------------
# $R --tag baselines-ft2e-4 --rows full_ft --ft-lr 2e-4 --head-lr 5e-3
