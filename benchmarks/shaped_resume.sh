#!/usr/bin/env bash
# A killed `hiq fit` on the LLaMA-2-7B-shaped slice resumes (issue 26): the fit of benchmarks/shaped_memory.sh is
# killed with SIGKILL as soon as block KILL_AT's fit starts, rerun with the same command, and its metrics.json
# compared with the uninterrupted run's (benchmarks/shaped_memory.sh 2 <tag>, which must exist).
#
#     CANDIDATES="[0,0.05,0.2]" bash benchmarks/shaped_memory.sh 2 after      # the uninterrupted reference
#     CANDIDATES="[0,0.05,0.2]" bash benchmarks/shaped_resume.sh 2 after      # kill in block 2, resume, compare
set -euo pipefail
source "$(dirname "$0")/shaped_args.sh"
BLOCKS=${1:-2}
REF_TAG=${2:-after}
KILL_AT=${KILL_AT:-2}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/shaped}
SLICE=$OUT/llama-2-7b-${BLOCKS}blk
RUN=$OUT/fit-${BLOCKS}blk-resume
REF=$OUT/fit-${BLOCKS}blk-$REF_TAG
LOG=$OUT/resume-${BLOCKS}blk.log
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f "$REF/metrics.json" ] || { echo "shaped_resume: no reference run $REF (run benchmarks/shaped_memory.sh first)" >&2; exit 2; }
if [ -n "${HIQ_SRC:-}" ]; then export PYTHONPATH=$HIQ_SRC HIQ_DATA_DIR=$PWD/data; fi
shaped_fit_command "$SLICE" "$RUN"
fit() { "${FIT[@]}"; }
rm -rf "$RUN"
fit > "$LOG.1" 2>&1 &
PID=$!
# block KILL_AT's fit has started once the files of the blocks before it exist (the log cannot tell: tqdm's bars
# end in a carriage return, and stderr reaches the file only at the next newline)
until [ "$(ls "$RUN"/blocks/block_*.safetensors 2>/dev/null | wc -l)" -ge $((KILL_AT - 1)) ] && \
        grep -q "Reconstruction" "$LOG.1" 2>/dev/null; do
    kill -0 "$PID" 2>/dev/null || { echo "shaped_resume: the fit ended before block $KILL_AT" >&2; exit 1; }
    sleep 1
done
sleep "${KILL_AFTER:-20}"  # into block KILL_AT's fit (its RTN loss and a few steps: ~60 s per block here)
kill -9 "$PID"; wait "$PID" 2>/dev/null || true
echo "killed in block $KILL_AT's fit; left: $(ls "$RUN" | tr '\n' ' '); blocks/: $(ls "$RUN/blocks" | tr '\n' ' ')" >&2
T0=$(date +%s)
fit > "$LOG.2" 2>&1
echo "resumed run: $(( $(date +%s) - T0 )) s; reused: $(grep -o 'reused[^\[]*' "$LOG.2" | head -5 | tr '\n' ';')" >&2
grep -E "Fisher scores reused|M: reused|block [0-9]+: reused|sensitivity.*reused" "$LOG.2" >&2 || true
"$PY" - "$REF/metrics.json" "$RUN/metrics.json" <<'PYEOF'
import json, sys
ref, got = (json.load(open(p)) for p in sys.argv[1:3])
keys = ["wikitext2_ppl", "c4_ppl", "avg_bits", "weights_key"]
for k in keys:
    print(f"{k}: uninterrupted {ref.get(k)} | killed and resumed {got.get(k)}")
blocks = [(b["loss_rtn"], b["loss_final"]) for b in ref["blocks"]], [(b["loss_rtn"], b["loss_final"]) for b in got["blocks"]]
print("block losses equal:", blocks[0] == blocks[1], "| tuning KL", ref["tuning"]["kl_after"], got["tuning"]["kl_after"])
same = all(ref.get(k) == got.get(k) for k in keys) and blocks[0] == blocks[1]
print("same result:", same)
sys.exit(0 if same else 1)
PYEOF
