#!/usr/bin/env bash
# Host memory and time per stage of `hiq fit` on LLaMA-2-7B-shaped slices (random weights: cost and memory only),
# issue 26; the figures of benchmarks/results/shaped_7b_cpu.md.
#
#     bash benchmarks/shaped_memory.sh 2          # the 2-block slice (about 4 min alone on 2 cores)
#     bash benchmarks/shaped_memory.sh 4          # the 4-block slice
#     HIQ_SRC=/tmp/hiq-base bash benchmarks/shaped_memory.sh 2 base   # another checkout's hiq (e.g. before a fix)
#
# The fit's options: benchmarks/shaped_args.sh (CANDIDATES="[0,0.05,0.2]": M on 3 candidate ratios instead of 10);
# EXTRA="--model.offload=true": more options for it.
set -euo pipefail
source "$(dirname "$0")/shaped_args.sh"
BLOCKS=${1:-2}
TAG=${2:-after}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/shaped}
SLICE=$OUT/llama-2-7b-${BLOCKS}blk
RUN=$OUT/fit-${BLOCKS}blk-$TAG
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f "$SLICE/config.json" ] || "$PY" scripts/make_shaped_checkpoint.py llama-2-7b --blocks "$BLOCKS" --out "$SLICE"
if [ -n "${HIQ_SRC:-}" ]; then export PYTHONPATH=$HIQ_SRC HIQ_DATA_DIR=$PWD/data; fi
rm -rf "$RUN"
# shellcheck disable=SC2086  # EXTRA: more options, split on spaces
shaped_fit_command "$SLICE" "$RUN" ${EXTRA:-}
"$PY" benchmarks/memory_profile.py --every 1 --out "$OUT/profile-${BLOCKS}blk-$TAG.json" -- "${FIT[@]}"
