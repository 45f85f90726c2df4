#!/usr/bin/env bash
# Host memory and time per stage of `hiq fit` on LLaMA-2-7B-shaped slices (random weights: cost and memory only),
# issue 26; the figures of benchmarks/results/shaped_7b_cpu.md.
#
#     bash benchmarks/shaped_memory.sh 2          # the 2-block slice (about 4 min alone on 2 cores)
#     bash benchmarks/shaped_memory.sh 4          # the 4-block slice
#     HIQ_SRC=/tmp/hiq-base bash benchmarks/shaped_memory.sh 2 base   # another checkout's hiq (e.g. before a fix)
#
# Calibration: 4 windows x 128 tokens, 2 steps per block, 2 tuning steps, evaluation on 4 windows of 128 tokens;
# CANDIDATES="[0,0.05,0.2]" measures M on 3 candidate ratios instead of the config's 10 (a third of its time).
set -euo pipefail
BLOCKS=${1:-2}
TAG=${2:-after}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/shaped}
SLICE=$OUT/llama-2-7b-${BLOCKS}blk
RUN=$OUT/fit-${BLOCKS}blk-$TAG
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f "$SLICE/config.json" ] || "$PY" scripts/make_shaped_checkpoint.py llama-2-7b --blocks "$BLOCKS" --out "$SLICE"
# -P: no current folder on sys.path, so PYTHONPATH=$HIQ_SRC (when given) decides which hiq runs
if [ -n "${HIQ_SRC:-}" ]; then export PYTHONPATH=$HIQ_SRC HIQ_DATA_DIR=$PWD/data; fi
rm -rf "$RUN"
"$PY" benchmarks/memory_profile.py --every 1 --out "$OUT/profile-${BLOCKS}blk-$TAG.json" -- \
    "$PY" -P -m hiq fit --config configs/tiny/w2.yaml --model.path="$SLICE" --model.dtype=bfloat16 \
    --trainer.default_root_dir="$RUN" --trainer.logger=false --data.nsamples=4 --data.seqlen=128 \
    --ratios.candidates="${CANDIDATES:-[0,0.02,0.05,0.10,0.15,0.20,0.30,0.50,0.75,1.00]}" \
    --sensitivity.nsamples=4 --reconstruction.iterations=2 --reconstruction.batch_size=4 \
    --reconstruction.tune_steps=2 --reconstruction.tune_batch_size=4 \
    --evaluation.seqlen=128 --evaluation.max_windows=4 --evaluation.batch_size=4 --plots.enabled=false
