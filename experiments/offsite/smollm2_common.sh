# Sourced by run_smollm2_lr.sh, run_smollm2_noise.sh and run_smollm2_kl.sh (the passes after the first), from
# the repository root: one definition of what every row shares, so the passes' rows compare. PY and CACHE may
# be set from outside.
PY=${PY:-.venv/bin/python}
CACHE=${CACHE:-/tmp/fedsite-smollm2-cache}   # distilled emulators, reused across passes
DATA=coordinator/examples/data
E="$PY -m emulator"
# the same 320 training and 200 validation glosses (never the test split), length, batch and epoch for every row
COMMON="--model smollm2 --task causal-lm --data $DATA/wordnet_supersense.train.jsonl.gz
        --eval-data $DATA/wordnet_supersense.validation.jsonl.gz --train-examples 320 --eval-examples 200
        --max-length 48 --batch-size 16 --epochs 1 --threads 1 --samples 2"
