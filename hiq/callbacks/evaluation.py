"""The last two stages of ``hiq fit``: export the quantized model, evaluate it, write ``metrics.json``.

Both run on rank 0 only (the other ranks wait at a barrier) and reuse their results when the quantized
model they would see is the one they already saw (same fingerprint of the reconstruction).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from hiq import __version__
from hiq.artifacts import load_json, peak_memory_mb, save_json
from hiq.callbacks.stages import _log, _run_dir


def quantization_fingerprint(pl_module) -> str:
    """What the weights are: the model plus, if blocks were reconstructed, every block's settings and result."""
    payload = {"model": pl_module.hparams.model_path, "blocks": pl_module.artifacts.get("block_metas")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def setting_label(pl_module) -> str:
    hp = pl_module.hparams
    if "reconstruction" not in pl_module.artifacts:
        return "FP"
    gs = "per-channel" if hp.group_size is None else f"g{hp.group_size}"
    return f"W{hp.bits_low}/{hp.bits_high} {gs}"


class ExportCallback(L.Callback):
    """Write ``model/``: a dequantised checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads.

    The integer codes, scales, zeros and column permutations stay in ``blocks/block_XX.pt``; ``model/hiq.json``
    records the setting, the ratios and the fingerprint of the weights.

    Args:
        dtype: dtype of the saved weights; null = the dtype the model was quantized in.
        enabled: write ``model/`` (off: skip).
    """

    def __init__(self, dtype: str | None = None, enabled: bool = True):
        self.dtype, self.enabled = dtype, enabled

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self.enabled:
            return
        from hiq.model import parse_dtype

        target = _run_dir(trainer).model
        fingerprint = quantization_fingerprint(pl_module)
        if trainer.is_global_zero:
            marker = target / "hiq.json"
            if marker.is_file() and load_json(marker).get("fingerprint") == fingerprint:
                rank_zero_info(f"[hiq] export reused: {target}")
            else:
                t0 = time.time()
                tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                model = pl_module.model
                dtype = parse_dtype(self.dtype) if self.dtype else next(model.parameters()).dtype
                original = next(model.parameters()).dtype
                model.to(dtype)
                try:
                    model.save_pretrained(tmp)
                finally:
                    model.to(original)
                pl_module.tokenizer.save_pretrained(tmp)
                solution = pl_module.artifacts.get("ratios")
                save_json(tmp / "hiq.json", {
                    "fingerprint": fingerprint, "setting": setting_label(pl_module),
                    "hparams": dict(pl_module.hparams), "dtype": str(dtype).removeprefix("torch."),
                    "ratios": solution.ratios if solution is not None else None,
                    "note": "weights are dequantised; integer codes, scales, zeros and permutations are in "
                            "../blocks/block_XX.pt"})
                if target.exists():
                    old = target.with_name(f".{target.name}.old-{os.getpid()}")
                    os.replace(target, old)
                    os.replace(tmp, target)
                    shutil.rmtree(old)
                else:
                    os.replace(tmp, target)
                pl_module.artifacts.setdefault("timings", {})["export"] = time.time() - t0
                rank_zero_info(f"[hiq] exported {target} ({dtype})")
        pl_module.artifacts["model_dir"] = str(target)
        trainer.strategy.barrier("export")


class EvaluationCallback(L.Callback):
    """Perplexity of the (quantized) model on each dataset, then ``metrics.json``.

    Args:
        datasets: ``wikitext2``, ``c4`` (bundled sample), hub ids or text files.
        seqlen: window length; null = min(2048, the model's context).
        max_windows: score only the first N windows of each set (quick runs); null = all.
        batch_size: windows per forward pass.
        tasks: zero-shot tasks through lm-eval (needs ``hiq[eval]``): a list or comma-separated string from
            piqa, arc_easy, arc_challenge, hellaswag, winogrande, or ``all``; null = none.
        limit: score only the first N documents of each zero-shot task (or a fraction in (0, 1]); null = all.
        zeroshot_batch_size: lm-eval requests per forward pass.
        enabled: evaluate and write ``metrics.json`` (off: skip).
    """

    def __init__(self, datasets: list[str] | None = None, seqlen: int | None = None, max_windows: int | None = None,
                 batch_size: int = 1, tasks: list[str] | str | None = None, limit: int | float | None = None,
                 zeroshot_batch_size: int = 16, enabled: bool = True):
        from hiq.zeroshot import check_limit, parse_tasks

        self.enabled = enabled
        self.datasets = list(datasets) if datasets is not None else ["wikitext2", "c4"]
        if not self.datasets:
            raise ValueError("datasets is empty; give at least one of wikitext2, c4, a hub id or a file path")
        self.seqlen, self.max_windows, self.batch_size = seqlen, max_windows, batch_size
        self.tasks = parse_tasks(tasks)
        self.limit = check_limit(limit)
        self.zeroshot_batch_size = zeroshot_batch_size

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        from hiq.data import load_text
        from hiq.evaluate import EVAL_SETS
        from hiq.zeroshot import lm_eval_version

        for name in (self.datasets if self.enabled else []):  # a typo fails before any heavy stage
            load_text(name, EVAL_SETS.get(name, "test"))
        if self.enabled and self.tasks:
            lm_eval_version()  # so does a missing hiq[eval] extra

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self.enabled:
            return
        run = _run_dir(trainer)
        if trainer.is_global_zero:
            self._evaluate(trainer, pl_module, run)
        trainer.strategy.barrier("evaluation")

    def _evaluate(self, trainer, pl_module, run) -> None:
        from hiq.evaluate import evaluate_dataset

        fingerprint = quantization_fingerprint(pl_module)
        settings = {"seqlen": self.seqlen, "max_windows": self.max_windows, "fingerprint": fingerprint}
        pl_module.model.to(pl_module.device)
        results, eval_seconds = {}, 0.0
        for name in self.datasets:
            key = name if name in ("wikitext2", "c4") else (Path(name).stem or name)
            path = run.evaluation(key)
            saved = load_json(path) if path.is_file() else None
            if saved is not None and saved.get("settings") == settings:
                rank_zero_info(f"[hiq] {name}: ppl {saved['ppl']:.3f} (reused {path})")
            else:
                res = evaluate_dataset(pl_module.model, pl_module.tokenizer, name, seqlen=self.seqlen,
                                       max_windows=self.max_windows, batch_size=self.batch_size,
                                       progress=trainer.is_global_zero)
                saved = {"dataset": name, "split": res.split, "ppl": res.ppl, "windows": res.windows,
                         "tokens_scored": res.tokens_scored, "seconds": round(res.seconds, 2), "note": res.note,
                         "settings": settings}
                save_json(path, saved)
                rank_zero_info(f"[hiq] {name} ({res.split}): ppl {res.ppl:.3f} [{res.windows} windows, "
                               f"{res.seconds:.1f}s]")
            results[key] = saved
            eval_seconds += saved["seconds"]
        zeroshot = self._zeroshot(pl_module, run, fingerprint) if self.tasks else None
        if zeroshot is not None:
            eval_seconds += zeroshot["seconds"]
        pl_module.artifacts.setdefault("timings", {})["evaluation"] = eval_seconds
        metrics = build_metrics(trainer, pl_module, results, zeroshot)
        save_json(run.metrics, metrics)
        logged = {f"eval/{k}_ppl": v["ppl"] for k, v in results.items()}
        if zeroshot is not None:
            logged.update({f"eval/{n}_{r['reported']}": r[r["reported"]] for n, r in zeroshot["tasks"].items()})
            logged["eval/zeroshot_avg"] = zeroshot["average"]
        _log(trainer, logged)
        summary = ", ".join(f"{k} ppl {v['ppl']:.3f}" for k, v in results.items())
        if zeroshot is not None:
            summary += f", zero-shot average {zeroshot['average']:.4f}"
        rank_zero_info(f"[hiq] {metrics['setting']} at {metrics['avg_bits']:.4f} avg bits: {summary} -> {run.metrics}")

    def _zeroshot(self, pl_module, run, fingerprint: str) -> dict:
        """lm-eval on the in-memory model; each task's result is kept in eval/zeroshot_<task>.json and reused
        while the quantized weights (fingerprint), the limit and the lm-eval version stay the same."""
        from hiq.zeroshot import PROTOCOL, REPORTED, evaluate_zeroshot, format_zeroshot, lm_eval_version

        settings = {"limit": self.limit, "fingerprint": fingerprint, "lm_eval_version": lm_eval_version()}
        saved, missing = {}, []
        for task in self.tasks:
            path = run.evaluation(f"zeroshot_{task}")
            prev = load_json(path) if path.is_file() else None
            if prev is not None and prev.get("settings") == settings:
                saved[task] = prev
            else:
                missing.append(task)
        if missing:
            res = evaluate_zeroshot(pl_module.model, pl_module.tokenizer, missing, limit=self.limit,
                                    batch_size=self.zeroshot_batch_size)
            for task in missing:
                saved[task] = {**res["tasks"][task], "seconds": res["seconds"] / len(missing), "settings": settings}
                save_json(run.evaluation(f"zeroshot_{task}"), saved[task])
        per_task = {t: {k: v for k, v in saved[t].items() if k not in ("settings", "seconds")} for t in self.tasks}
        result = {"tasks": per_task, "average": sum(per_task[t][REPORTED[t]] for t in self.tasks) / len(self.tasks),
                  "limit": self.limit, "lm_eval_version": settings["lm_eval_version"], "protocol": PROTOCOL,
                  "seconds": round(sum(saved[t]["seconds"] for t in self.tasks), 2)}
        rank_zero_info(f"[hiq] zero-shot: {format_zeroshot(result)}" + ("" if missing else " (reused)"))
        return result


def device_label(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``: where the run's stages computed."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def build_metrics(trainer, pl_module, results: dict, zeroshot: dict | None = None) -> dict:
    """``metrics.json``: avg bits (two conventions), perplexities, stage timings, settings and versions."""
    hp = pl_module.hparams
    summary = pl_module.artifacts.get("reconstruction")
    solution = pl_module.artifacts.get("ratios")
    if summary:
        params = sum(r["params"] for r in summary)
        avg_bits = sum(r["weight_bits"] for r in summary) / params
        avg_bits_storage = sum(r["storage_bits"] for r in summary) / params
        convention = "weights only (codes), as the papers print per-channel rows"
    else:
        from hiq.cli import stored_dtype

        stored = stored_dtype(hp.model_path, hp.trust_remote_code) or next(pl_module.model.parameters()).dtype
        avg_bits = avg_bits_storage = float(torch.finfo(stored).bits)
        convention = "stored dtype width"
    metrics = {
        "setting": setting_label(pl_module),
        "model": hp.model_path,
        "avg_bits": avg_bits,
        "avg_bits_convention": convention,
        "avg_bits_storage": avg_bits_storage,
        "target_avg_bits": hp.target_avg_bits if summary else None,
        "ratio_mode": solution.mode if solution is not None else None,
    }
    for key, res in results.items():
        metrics[f"{key}_ppl"] = res["ppl"]
    if zeroshot is not None:
        metrics["zeroshot_avg"] = zeroshot["average"]
        metrics["zeroshot"] = {k: v for k, v in zeroshot.items() if k != "seconds"}
    timings = pl_module.artifacts.get("timings", {})
    metrics["stage_seconds"] = {k: round(v, 2) for k, v in timings.items()}
    metrics["eval"] = {k: {f: v[f] for f in ("split", "windows", "tokens_scored", "seconds", "note")}
                       for k, v in results.items()}
    if summary:
        metrics["blocks"] = [{k: r[k] for k in ("block", "loss_rtn", "loss_final", "seconds")} for r in summary]
    metrics["hparams"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(hp).items()}
    metrics["run_dir"] = str(trainer.default_root_dir)
    if "model_dir" in pl_module.artifacts:
        metrics["model_dir"] = pl_module.artifacts["model_dir"]
    metrics["world_size"] = trainer.world_size
    metrics["device"] = device_label(pl_module.device)
    metrics["memory"] = peak_memory_mb()  # of this run's process; a resumed run reports its own peak
    metrics["versions"] = {"hiq": __version__, "torch": torch.__version__, "lightning": L.__version__,
                           "python": platform.python_version()}
    return metrics
