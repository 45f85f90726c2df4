# The `hiq fit` of the LLaMA-2-7B-shaped slice measurements (sourced by benchmarks/shaped_memory.sh and
# benchmarks/shaped_resume.sh): `shaped_fit_command SLICE RUN [more options]` sets the array FIT to it; random
# weights, cost and memory only. Calibration: 4 windows x 128 tokens, 2 steps per block, 2 tuning steps,
# evaluation on 4 windows of 128 tokens; CANDIDATES="[0,0.05,0.2]" measures M on 3 candidate ratios instead of the
# config's 10 (a third of its time). -P: no current folder on sys.path, so PYTHONPATH=$HIQ_SRC (when given)
# decides which hiq runs.
shaped_fit_command() {
    FIT=("$PY" -P -m hiq fit --config configs/tiny/w2.yaml --model.path="$1" --model.dtype=bfloat16
         --trainer.default_root_dir="$2" --trainer.logger=false --data.nsamples=4 --data.seqlen=128
         --ratios.candidates="${CANDIDATES:-[0,0.02,0.05,0.10,0.15,0.20,0.30,0.50,0.75,1.00]}"
         --sensitivity.nsamples=4 --reconstruction.iterations=2 --reconstruction.batch_size=4
         --reconstruction.tune_steps=2 --reconstruction.tune_batch_size=4
         --evaluation.seqlen=128 --evaluation.max_windows=4 --evaluation.batch_size=4 --plots.enabled=false
         "${@:3}")
}
