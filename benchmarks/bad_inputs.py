"""Run ``hiq fit`` / ``hiq eval`` with the user mistakes a new user makes and print, per case, the exit code, the
time to fail, the lines printed and the message, and whether it failed before the model loaded.

    python benchmarks/bad_inputs.py --out benchmarks/results/bad_inputs.md

Each case is a fresh process (so its time includes Python + torch + Lightning imports, about 8 s here). "Before
the model loads" is read from the output: ``hiq fit`` prints ``[hiq] run directory`` only after every check has
passed, ``hiq eval`` prints ``[hiq eval] <setting> on <model>`` only after its checks, just before loading.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_injection import CONFIG, emit  # noqa: E402


def cases(work: Path) -> list[tuple[str, list[str]]]:
    from hiq.model import BUNDLED_MODELS

    tiny = BUNDLED_MODELS["tiny-llama"]
    only_config = work / "only-config"
    only_config.mkdir(exist_ok=True)
    shutil.copy(tiny / "config.json", only_config)
    no_tok = work / "no-tokenizer"
    if not no_tok.exists():
        shutil.copytree(tiny, no_tok)
        for f in no_tok.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                f.unlink()
    (work / "empty.txt").write_text("")
    (work / "short.txt").write_text("Just a few words of calibration text.\n")
    (work / "medium.txt").write_text("A sentence of calibration text that repeats. " * 30)  # < 8 x 64 tokens
    (work / "bad.yaml").write_text("quant: {bits: 2\n")
    (work / "a-file").write_text("x")
    import torch

    torch.save(torch.zeros(4, 64, dtype=torch.long), work / "few-windows.pt")  # the config: 8 windows of 64 tokens
    torch.save(torch.full((8, 64), 10**6, dtype=torch.long), work / "foreign-windows.pt")
    other = work / "other-run"
    if not (other / "run.json").exists():  # the same config but 20 steps per block
        from dataclasses import asdict

        from hiq.checks import prepare_run_folder, run_manifest
        from hiq.recipe import CalibrationOptions, Recipe

        recipe = Recipe.from_dict({k: CONFIG[k] for k in ("quant", "ratios", "sensitivity", "reconstruction")})
        recipe.reconstruction.iterations = 20
        prepare_run_folder(other, run_manifest("tiny-llama", recipe.run_dict(), asdict(CalibrationOptions(
            **CONFIG["data"]))))
    fit = ["fit", "--config", str(work / "config.yaml")]
    run = f"--trainer.default_root_dir={work / 'run'}"
    ev = ["eval", "--model.path=tiny-llama", "--evaluation.max_windows=2"]
    return [
        ("option typo (prefix of a real option)", [*fit, run, "--reconstruction.iteration=10"]),
        ("unknown option", [*fit, run, "--quant.bitz=2"]),
        ("value of the wrong type", [*fit, run, "--quant.bits=two"]),
        ("unsupported bit width", [*fit, run, "--quant.bits=5"]),
        ("budget above the reachable range", [*fit, run, "--ratios.target_avg_bits=2.5"]),
        ("budget below the reachable range", [*fit, run, "--ratios.target_avg_bits=1.5"]),
        ("batch larger than the windows", [*fit, run, "--reconstruction.batch_size=64"]),
        ("batch not divisible by the processes", [*fit, run, "--trainer.devices=3"]),
        ("CUDA asked for, no GPU", [*fit, run, "--trainer.accelerator=cuda"]),
        ("data.nsamples=0", [*fit, run, "--data.nsamples=0"]),
        ("sensitivity.nsamples > data.nsamples", [*fit, run, "--sensitivity.nsamples=64"]),
        ("calibration file missing", [*fit, run, f"--data.dataset={work / 'missing.txt'}"]),
        ("calibration file empty", [*fit, run, f"--data.dataset={work / 'empty.txt'}"]),
        ("calibration text shorter than seqlen", [*fit, run, f"--data.dataset={work / 'short.txt'}"]),
        ("calibration text < nsamples x seqlen", [*fit, run, f"--data.dataset={work / 'medium.txt'}"]),
        ("data.seqlen beyond the model's context", [*fit, run, "--data.seqlen=4096"]),
        ("windows file missing", [*fit, run, f"--data.dataset={work / 'missing.pt'}"]),
        ("windows file with fewer windows than nsamples", [*fit, run, f"--data.dataset={work / 'few-windows.pt'}"]),
        ("windows file of another tokenizer", [*fit, run, f"--data.dataset={work / 'foreign-windows.pt'}"]),
        ("model path missing", [*fit, run, "--model.path=./no/such/model"]),
        ("model folder with only config.json", [*fit, run, f"--model.path={only_config}"]),
        ("model folder without tokenizer", [*fit, run, f"--model.path={no_tok}"]),
        ("evaluation dataset unknown", [*fit, run, "--evaluation.datasets=[wikitext3]"]),
        ("zero-shot task unknown", [*fit, run, "--evaluation.tasks=piqaa"]),
        ("config file missing", ["fit", "--config", str(work / "nope.yaml"), run]),
        ("config file not valid YAML", ["fit", "--config", str(work / "bad.yaml"), run]),
        ("run folder holds another run", [*fit, f"--trainer.default_root_dir={other}"]),
        ("run folder path is under a file", [*fit, f"--trainer.default_root_dir={work / 'a-file' / 'run'}"]),
        ("eval --output is a directory", [*ev, f"--output={work}"]),
        ("eval --output under a file", [*ev, f"--output={work / 'a-file' / 'r.json'}"]),
        ("eval unknown method", [*ev, "--quant.method=gptq"]),
        ("eval model folder with only config.json", ["eval", f"--model.path={only_config}"]),
        ("eval unknown dataset", [*ev, "--evaluation.datasets=[wikitext3]"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hiq-bad-"))
    cfg = {**CONFIG, "evaluation": {"datasets": ["wikitext2"], "max_windows": 2}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for name, argv in cases(work):
        t = time.time()
        proc = subprocess.run([sys.executable, "-m", "hiq", *argv], capture_output=True, text=True, env=env,
                              timeout=600)
        secs = time.time() - t
        out = (proc.stdout + proc.stderr).strip().splitlines()
        errors = [line for line in out if ": error:" in line]
        early = not any(line.startswith(("[hiq] run directory", "[hiq eval] ")) and "error" not in line
                        for line in out)
        tb = any(line.startswith("Traceback") for line in out)
        message = (errors[0] if errors else (out[-1] if out else "")).replace("|", "/")
        rows.append((name, proc.returncode, secs, len(out), "yes" if early else "no", "yes" if tb else "no",
                     message[:220]))
        print(rows[-1], flush=True)
    lines = ["Bad inputs: `python benchmarks/bad_inputs.py` (each a fresh process; time includes ~8 s of imports)",
             "", "| case | exit | s | lines | before model load | traceback | message |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c:.1f} | {d} | {e} | {f} | `{g}` |" for a, b, c, d, e, f, g in rows]
    emit(lines, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
