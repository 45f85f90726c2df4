#!/usr/bin/env bash
# The 2-block LLaMA-2-7B-shaped slice fitted twice in a row, alone (issue 26): first with hiq.model.release_free_memory
# (glibc malloc_trim after loading, every stage and around every block fit) replaced by a no-op, then as shipped.
# Prints each run's wall time and peak RSS, and its stage seconds and peak from metrics.json. Random weights: cost and
# memory only. Results: benchmarks/results/shaped_7b_cpu.md ("Third pass").
#
#     bash benchmarks/heap_trim_side_by_side.sh          # about 10 min on 2 cores
set -euo pipefail
source "$(dirname "$0")/shaped_args.sh"
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/shaped}
SLICE=$OUT/llama-2-7b-2blk
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f "$SLICE/config.json" ] || "$PY" scripts/make_shaped_checkpoint.py llama-2-7b --blocks 2 --out "$SLICE"
NO_TRIM="import hiq.model as m, hiq.callbacks.stages as s; m.release_free_memory = s.release_free_memory = lambda: False"
for TAG in off on; do
  RUN=$OUT/trim-$TAG; rm -rf "$RUN"
  CANDIDATES="${CANDIDATES:-[0,0.05,0.2]}" shaped_fit_command "$SLICE" "$RUN"
  PATCH=""; [ "$TAG" = off ] && PATCH="$NO_TRIM"
  /usr/bin/time -f "heap trims $TAG: wall %e s, maxrss %M kB" "$PY" -c "$PATCH
import sys; from hiq.cli import main; sys.exit(main(sys.argv[1:]))" "${FIT[@]:4}" 2> "$RUN.log" || { tail "$RUN.log"; exit 1; }
  tail -1 "$RUN.log"
  "$PY" -c "import json; m = json.load(open('$RUN/metrics.json')); \
print('heap trims $TAG:', {k: round(v, 1) for k, v in m['stage_seconds'].items()}, m['memory'])"
done
