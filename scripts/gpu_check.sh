#!/usr/bin/env bash
# One short, prepared check for a machine with one CUDA GPU (issue 26). Run from the repository root:
#
#     bash scripts/gpu_check.sh            # ~15-25 min on one H100 (most of it the 2-block fit)
#
# 1. the CUDA tests (tests/test_cuda.py: the whole fit on the GPU agrees with the CPU run);
# 2. a LLaMA-2-7B-shaped 2-block slice (random weights: cost and memory only, never quality) written by
#    scripts/make_shaped_checkpoint.py with LLaMA's 32,000-row vocabulary;
# 3. `hiq fit` on it with configs/llama-2-7b/w2.yaml at the paper's calibration size (128 x 2048 tokens) and
#    GPU_ITERS block-fit steps (default 200; the config's 5,000 would take hours on the slice alone), host RSS
#    sampled every second per stage (benchmarks/memory_profile.py), peak device memory per stage from metrics.json
#    (stage_peak_cuda_mb);
# 4. the same fit with --model.offload=true (block weights in host memory, one layer at a time on the device in
#    Fisher, tuning and evaluation: hiq.offload) at OFFLOAD_ITERS block-fit steps, its peak device memory per stage
#    beside step 3's (the bound a 70B run on one GPU relies on; skipped with OFFLOAD_ITERS=0);
# 5. results under benchmarks/results/gpu_check_<gpu>/ : the profile JSON, the run's log, metrics.json, nvidia-smi.
#
# Environment: GPU_ITERS (block-fit steps, 200), GPU_TUNE (tuning steps, 16), GPU_BLOCKS (2), OUT_ROOT (runs/gpu),
# OFFLOAD_ITERS (20).
set -euo pipefail

PY=${PY:-.venv/bin/python}
HIQ=${HIQ:-.venv/bin/hiq}
GPU_ITERS=${GPU_ITERS:-200}
GPU_TUNE=${GPU_TUNE:-16}
GPU_BLOCKS=${GPU_BLOCKS:-2}
OFFLOAD_ITERS=${OFFLOAD_ITERS:-20}
OUT_ROOT=${OUT_ROOT:-runs/gpu}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline

command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi; this script needs one CUDA GPU" >&2; exit 2; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')"
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
RESULTS=benchmarks/results/gpu_check_${GPU}
mkdir -p "$RESULTS" "$OUT_ROOT"
nvidia-smi > "$RESULTS/nvidia-smi.txt"
"$PY" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'lightning', lightning.__version__)" | tee "$RESULTS/versions.txt"

echo "== 1/4 CUDA tests" >&2
"$PY" -m pytest -q tests/test_cuda.py 2>&1 | tee "$RESULTS/test_cuda.txt" || echo "gpu_check: CUDA tests FAILED (see \
$RESULTS/test_cuda.txt); measuring anyway" >&2

echo "== 2/4 LLaMA-2-7B-shaped slice, $GPU_BLOCKS blocks (random weights)" >&2
SLICE=$OUT_ROOT/llama-2-7b-${GPU_BLOCKS}blk
[ -f "$SLICE/config.json" ] || "$PY" scripts/make_shaped_checkpoint.py llama-2-7b --blocks "$GPU_BLOCKS" \
    --vocab 32000 --out "$SLICE"

echo "== 3/4 hiq fit on the slice: 128 x 2048 calibration, $GPU_ITERS steps per block, $GPU_TUNE tuning steps" >&2
RUN=$OUT_ROOT/fit-7b-${GPU_BLOCKS}blk
rm -rf "$RUN"
"$PY" benchmarks/memory_profile.py --out "$RESULTS/fit_7b_${GPU_BLOCKS}blk.json" -- \
    "$HIQ" fit --config configs/llama-2-7b/w2.yaml --model.path="$SLICE" --trainer.default_root_dir="$RUN" \
    --trainer.accelerator=gpu --trainer.devices=1 --trainer.logger=false \
    --reconstruction.iterations="$GPU_ITERS" --reconstruction.tune_steps="$GPU_TUNE" \
    --evaluation.max_windows=8 --plots.enabled=false | tee "$RESULTS/fit_7b_${GPU_BLOCKS}blk_table.md"
cp "$RUN/metrics.json" "$RESULTS/metrics_7b_${GPU_BLOCKS}blk.json"
"$PY" - "$RUN/metrics.json" <<'EOF' | tee "$RESULTS/stages_7b_${GPU_BLOCKS}blk.md"
import json, sys
m = json.load(open(sys.argv[1]))
print("| stage | seconds | peak device memory (MiB) |\n|---|---:|---:|")
peaks = m.get("stage_peak_cuda_mb", {})
for stage, sec in m["stage_seconds"].items():
    print(f"| {stage} | {sec} | {peaks.get(stage.split('_')[0], '')} |")
print(f"\nprocess: {m['memory']}, device {m['device']}")
EOF
if [ "$OFFLOAD_ITERS" != 0 ]; then
    echo "== 4/4 the same fit with --model.offload=true, $OFFLOAD_ITERS steps per block" >&2
    RUN_OFF=$OUT_ROOT/fit-7b-${GPU_BLOCKS}blk-offload
    rm -rf "$RUN_OFF"
    "$PY" benchmarks/memory_profile.py --out "$RESULTS/fit_7b_${GPU_BLOCKS}blk_offload.json" -- \
        "$HIQ" fit --config configs/llama-2-7b/w2.yaml --model.path="$SLICE" --trainer.default_root_dir="$RUN_OFF" \
        --trainer.accelerator=gpu --trainer.devices=1 --trainer.logger=false --model.offload=true \
        --reconstruction.iterations="$OFFLOAD_ITERS" --reconstruction.tune_steps="$GPU_TUNE" \
        --evaluation.max_windows=8 --plots.enabled=false > /dev/null
    cp "$RUN_OFF/metrics.json" "$RESULTS/metrics_7b_${GPU_BLOCKS}blk_offload.json"
    "$PY" - "$RUN/metrics.json" "$RUN_OFF/metrics.json" <<'EOF' | tee "$RESULTS/offload_7b_${GPU_BLOCKS}blk.md"
import json, sys
plain, off = (json.load(open(p)).get("stage_peak_cuda_mb", {}) for p in sys.argv[1:3])
print("| stage | peak device MiB, model on the device | with --model.offload=true |\n|---|---:|---:|")
for stage in plain:
    print(f"| {stage} | {plain[stage]} | {off.get(stage, '')} |")
EOF
fi
echo "gpu_check: results in $RESULTS" >&2
