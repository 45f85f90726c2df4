"""Damage each kind of artifact in a finished run folder (truncate / zero / flip bytes / edit), change the model
in place, change the config in the same folder; rerun ``hiq fit`` each time and record what happened.

    python benchmarks/corruption_matrix.py --out benchmarks/results/corruption_matrix.md

"Same result" means the rerun's ``metrics.json`` quality fields and every byte of ``model/`` and ``packed/`` equal
the undamaged run's. The recipe is the reduced tiny one of ``benchmarks/fault_injection.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_injection import CONFIG, emit, fit, summary  # noqa: E402

KINDS = {
    "fisher.safetensors": "fisher.safetensors",
    "sensitivity/block_03": "sensitivity/block_03.safetensors",
    "blocks/block_03": "blocks/block_03.safetensors",
    "eval/wikitext2.json": "eval/wikitext2.json",
    "model/model.safetensors": "model/model.safetensors",
    "packed/model.safetensors": "packed/model.safetensors",
    "packed/config.json": "packed/config.json",
}
DAMAGES = ("truncate", "zero", "flip")


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "zero":
        data = bytearray(len(data))
    elif how == "flip":  # bytes in the middle of the file (tensor data; for JSON, inside a value)
        for k in range(4):
            data[len(data) // 2 + k] ^= 0x01
    elif how == "edit":  # a plausible hand edit of a JSON number
        obj = json.loads(data)
        obj["ppl"] = 1.2345
        data = bytearray(json.dumps(obj, indent=2).encode())
    path.write_bytes(bytes(data))


def notice(log: str, run: Path) -> str:
    """The rerun's line about the damage (or the first error line), without progress bars or the run's path."""
    for line in log.replace("\r", "\n").splitlines():
        if any(w in line for w in ("damaged", "cannot be reused", "another model", "error:")):
            line = line[line.index("[hiq]"):] if "[hiq]" in line else line
            return line.replace(f"{run}/", "").replace(str(run), "RUN").replace("|", "/").strip()[:150]
    return "(no notice)"


def rerun(config: Path, run: Path, log: Path, *extra: str) -> tuple[int, float, str]:
    t = time.time()
    rc = fit(config, run, log, *extra).wait()
    return rc, time.time() - t, log.read_text(errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hiq-corrupt-"))
    work.mkdir(parents=True, exist_ok=True)

    # the model is a copy in the work dir, so it can be changed in place later
    from hiq.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny-llama")
    model_dir = work / "tiny-copy"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"]["path"] = str(model_dir)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    rc, seconds, _ = rerun(config, ref, work / "reference.log")
    if rc:
        sys.exit(f"reference run failed; see {work / 'reference.log'}")
    ref_quality, ref_files = summary(ref)
    print(f"reference: {seconds:.0f}s, ppl {ref_quality['wikitext2_ppl']:.4f}", flush=True)

    rows = []
    for kind, rel in KINDS.items():
        for how in DAMAGES + (("edit",) if rel.endswith("wikitext2.json") else ()):
            run = work / f"{kind.replace('/', '_')}-{how}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(ref, run)
            damage(run / rel, how)
            rc, secs, log = rerun(config, run, work / f"{run.name}.log")
            same = "-"
            if rc == 0:
                quality, files = summary(run)
                same = "yes" if (quality == ref_quality and files == ref_files) else "NO"
            rows.append((kind, how, rc, f"{secs:.0f}", notice(log, run), same))
            print(rows[-1], flush=True)

    # the model changed in place at the same path: every stage recomputed, a new fingerprint, another result
    run = work / "model-changed"
    shutil.copytree(ref, run)
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(model_dir)
    rc, secs, log = rerun(config, run, work / "model-changed.log")
    quality = summary(run)[0] if rc == 0 else {}
    changed = quality.get("model_fingerprint") != ref_quality["model_fingerprint"]
    rows.append(("model changed in place", "down_proj x1.5", rc, f"{secs:.0f}", notice(log, run),
                 f"recomputed: fingerprint {'new' if changed else 'SAME'}, ppl {ref_quality['wikitext2_ppl']:.2f} -> "
                 f"{quality.get('wikitext2_ppl', float('nan')):.2f}"))
    print(rows[-1], flush=True)

    # another recipe in the same folder: refused, then replaced with --overwrite
    rc, secs, log = rerun(config, run, work / "config-changed.log", "--reconstruction.iterations=20")
    rows.append(("config changed, same folder", "iterations 40 -> 20", rc, f"{secs:.0f}", notice(log, run),
                 "refused, folder untouched" if rc == 2 else "NOT refused"))
    rc, secs, log = rerun(config, run, work / "config-overwrite.log", "--reconstruction.iterations=20",
                          "--overwrite=true")
    rows.append(("config changed + --overwrite", "iterations 40 -> 20", rc, f"{secs:.0f}",
                 next((line for line in log.splitlines() if "--overwrite" in line), "(no notice)")[:150],
                 "new run written" if rc == 0 else "failed"))
    print(rows[-2:], flush=True)

    lines = ["Corruption matrix: `python benchmarks/corruption_matrix.py` (reduced tiny recipe; each case a copy of "
             "one finished run, damaged, then `hiq fit` rerun on it)", "",
             "| artifact | damage | rerun exit | rerun s | what the rerun said | same result as undamaged |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | `{e}` | {f} |" for a, b, c, d, e, f in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
