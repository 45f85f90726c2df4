"""The ``hiq`` command line.

``hiq fit``   the method on a model (LightningCLI): Fisher scores -> matrix M -> HiGHS ratios -> hybrid
              block reconstruction -> export -> evaluation; each stage a callback with its own config
              section (``--reconstruction.iterations=...``), artifacts in ``--trainer.default_root_dir``.
``hiq eval``  load a causal LM, optionally quantize its block linears (RTN for now), report avg bits and
              perplexity on WikiText-2 and the C4 sample, and write the result as JSON.

Options follow LightningCLI conventions (jsonargparse): nested keys ``--model.path``, ``--quant.bits``,
``--eval.datasets``, a YAML file with ``--config``, and ``--print_config`` to show the merged config.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hiq import __version__

QUANT_METHODS = ("none", "rtn")


@dataclass
class ModelOptions:
    """Which model to load.

    Args:
        path: a save_pretrained directory, a hub id, or the bundled name ``tiny-llama``.
        dtype: weights dtype while evaluating (float32, bfloat16, float16).
        trust_remote_code: let transformers run code shipped with a hub model (off by default).
    """

    path: str = "tiny-llama"
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class QuantOptions:
    """How to quantize the block linears (embeddings, norms and LM head stay in full precision).

    Args:
        method: ``none`` (full precision) or ``rtn`` (round-to-nearest, min-max asymmetric grid).
        bits: weight bits, one of 2, 3, 4, 8.
        group_size: input columns per scale/zero group (32, 64, 128) or null for per output channel.
        avg_bits_convention: ``storage`` (fp16 scale + b-bit zero per group/row counted),
            ``weights_only`` or ``paper`` (the 19-bits-per-group figure the papers print); see hiq.quant.bits.
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int | None = None
    avg_bits_convention: str = "storage"


@dataclass
class EvalOptions:
    """Perplexity evaluation (protocol in hiq.evaluate).

    Args:
        datasets: text sets to score: ``wikitext2``, ``c4`` (bundled sample), a hub id or file paths.
        seqlen: window length in tokens; null = min(2048, the model's context).
        max_windows: score only the first N windows of each set (quick runs); null = all.
        batch_size: windows per forward pass.
        zeroshot_batch_size: lm-eval requests per forward pass for ``--tasks``.
    """

    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "c4"])
    seqlen: int | None = None
    max_windows: int | None = None
    batch_size: int = 1
    zeroshot_batch_size: int = 16


def setting_label(quant: QuantOptions) -> str:
    if quant.method == "none":
        return "FP"
    gs = "per-channel" if quant.group_size in (None, 0, -1) else f"g{quant.group_size}"
    return f"{quant.method.upper()} W{quant.bits} {gs}"


def run_eval(
    model: ModelOptions, quant: QuantOptions, eval: EvalOptions, output: str | None = None,
    tasks: str | list[str] | None = None, limit: float | None = None,
) -> dict:
    """Validate everything cheap first, then load, quantize, evaluate, write JSON; returns the result.

    ``tasks`` (``piqa,arc_easy,arc_challenge,hellaswag,winogrande`` or ``all``) adds lm-eval zero-shot
    accuracy (needs ``hiq[eval]``); ``limit`` scores only the first N documents of each task.
    """
    import torch

    from hiq.artifacts import peak_memory_mb, save_json
    from hiq.data import load_text
    from hiq.evaluate import EVAL_SETS, evaluate_dataset
    from hiq.model import load_model_and_tokenizer, parse_dtype, resolve_model_path
    from hiq.quant.bits import CONVENTIONS, average_bits
    from hiq.quant.grid import QuantSpec
    from hiq.quant.rtn import model_average_bits, quantize_model_rtn

    t0 = time.time()
    if quant.method not in QUANT_METHODS:
        raise ValueError(f"quant.method={quant.method!r} is not supported; choose one of {QUANT_METHODS}")
    if quant.avg_bits_convention not in CONVENTIONS + ("omniquant",):
        raise ValueError(f"quant.avg_bits_convention={quant.avg_bits_convention!r}; choose one of {CONVENTIONS}")
    spec = QuantSpec(quant.bits, quant.group_size) if quant.method != "none" else None
    parse_dtype(model.dtype)
    resolve_model_path(model.path)
    from hiq.zeroshot import check_limit, evaluate_zeroshot, format_zeroshot, lm_eval_version, parse_tasks

    task_names = parse_tasks(tasks)
    check_limit(limit)
    if task_names:
        lm_eval_version()  # a missing extra fails here, before the model loads
    elif limit is not None:
        raise ValueError(f"--limit={limit} applies to zero-shot tasks; give --tasks too (or drop --limit)")
    if not eval.datasets and not task_names:
        raise ValueError("eval.datasets is empty and no --tasks; give at least one of wikitext2, c4, a hub id, "
                         "a file path, or zero-shot tasks")
    for name in eval.datasets:
        load_text(name, EVAL_SETS.get(name, "test"))
    label = setting_label(quant)
    out_path = Path(output) if output else Path("runs/eval") / (
        f"{label.lower().replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )

    print(f"[hiq eval] {label} on {model.path}", file=sys.stderr)
    lm, tokenizer = load_model_and_tokenizer(model.path, model.dtype, model.trust_remote_code)
    records = []
    if spec is not None:
        records = quantize_model_rtn(lm, spec, convention=quant.avg_bits_convention)
        avg_bits = model_average_bits(records)
    else:  # the checkpoint's own storage width (the bundled model is stored in fp16, evaluated in fp32)
        stored = stored_dtype(model.path, model.trust_remote_code) or parse_dtype(model.dtype)
        avg_bits = float(torch.finfo(stored).bits)
    result: dict = {
        "setting": label,
        "method": quant.method,
        "bits": quant.bits if spec else None,
        "group_size": spec.group_size if spec else None,
        "avg_bits": avg_bits,
        "avg_bits_convention": quant.avg_bits_convention if spec else "stored dtype width",
        "avg_bits_paper": (
            average_bits(spec.bits, spec.group_size, convention="paper") if spec else None
        ),
        "quantized_layers": len(records),
        "model": model.path,
        "dtype": model.dtype,
    }
    for name in eval.datasets:
        res = evaluate_dataset(
            lm, tokenizer, name, seqlen=eval.seqlen, max_windows=eval.max_windows, batch_size=eval.batch_size
        )
        key = name if name in ("wikitext2", "c4") else Path(name).stem or name
        result[f"{key}_ppl"] = res.ppl
        result[f"{key}_eval"] = {"split": res.split, "windows": res.windows, "tokens_scored": res.tokens_scored,
                                 "seconds": round(res.seconds, 2), "note": res.note}
        result["seqlen"] = res.tokens_scored // res.windows + 1
        print(f"[hiq eval] {name} ({res.split}) ppl {res.ppl:.3f}  [{res.windows} windows, {res.seconds:.1f}s]",
              file=sys.stderr)
    if task_names:
        print(f"[hiq eval] zero-shot {','.join(task_names)}" + (f" (limit {limit})" if limit else ""),
              file=sys.stderr)
        zs = evaluate_zeroshot(lm, tokenizer, task_names, limit=limit, batch_size=eval.zeroshot_batch_size)
        result["zeroshot"] = zs
        result["zeroshot_avg"] = zs["average"]
        print(f"[hiq eval] zero-shot: {format_zeroshot(zs)} [{zs['seconds']:.1f}s]", file=sys.stderr)
    result["wall_time_s"] = round(time.time() - t0, 2)
    result["memory"] = peak_memory_mb()
    result["versions"] = {"hiq": __version__, "torch": torch.__version__, "python": platform.python_version()}
    result["config"] = {"model": asdict(model), "quant": asdict(quant), "eval": asdict(eval), "tasks": task_names,
                        "limit": limit}
    save_json(out_path, result)
    result["output"] = str(out_path)
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
               if not isinstance(v, dict)}
    print(json.dumps(summary, indent=2))
    return result


def stored_dtype(path: str, trust_remote_code: bool = False):
    """The dtype a checkpoint's config says its weights are stored in (None if it does not say)."""
    import torch
    from transformers import AutoConfig

    from hiq.model import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    dtype = getattr(cfg, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def build_eval_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="hiq eval", description=run_eval.__doc__, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with model/quant/eval keys")
    parser.add_class_arguments(ModelOptions, "model")
    parser.add_class_arguments(QuantOptions, "quant")
    parser.add_class_arguments(EvalOptions, "eval")
    parser.add_argument("--output", type=str | None, default=None,
                        help="JSON file to write (default runs/eval/<setting>-<time>.json)")
    parser.add_argument("--tasks", type=str | None, default=None,
                        help="zero-shot tasks through lm-eval (needs hiq[eval]): comma-separated from piqa, arc_easy, "
                             "arc_challenge, hellaswag, winogrande, or 'all'")
    parser.add_argument("--limit", type=int | float | None, default=None,
                        help="score only the first N documents of each zero-shot task (or a fraction in (0, 1])")
    return parser


def eval_main(argv: list[str]) -> int:
    parser = build_eval_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    try:
        run_eval(init.model, init.quant, init.eval, init.output, init.tasks, init.limit)
    except (ValueError, FileNotFoundError) as err:
        print(f"hiq eval: error: {err}", file=sys.stderr)
        return 2
    return 0


def default_run_dir(config_paths: list, now: str | None = None) -> str:
    """``runs/<config name>-<YYYYmmdd-HHMMSS>``: one directory per run."""
    stem = Path(str(config_paths[-1])).stem if config_paths else "run"
    parent = Path(str(config_paths[-1])).parent.name if config_paths else ""
    name = f"{parent}-{stem}" if parent and parent not in (".", "configs") else stem
    return str(Path("runs") / f"{name}-{now or time.strftime('%Y%m%d-%H%M%S')}")


def _wandb_into_run_dir(trainer_cfg, run_dir: str) -> None:
    """A WandbLogger without ``save_dir`` writes into the run directory; wandb's own dirs go there too."""
    loggers = trainer_cfg.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = str(getattr(logger, "class_path", "") or "")
        if class_path.endswith("WandbLogger"):
            init = logger.init_args
            if init.get("save_dir") in (None, "", ".") and not init.get("dir"):  # "." is WandbLogger's default
                init.save_dir = run_dir
            if not init.get("name"):
                init.name = Path(run_dir).name
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
                os.environ.setdefault(var, str(Path(run_dir) / "wandb"))


def stage_callbacks() -> dict:
    """Config section -> callback class, in the order the stages run (all inside the outer ``Trainer.fit``)."""
    from hiq import callbacks as cb

    return {"fisher": cb.FisherCallback, "sensitivity": cb.SensitivityCallback, "ratios": cb.RatioSolverCallback,
            "plots": cb.PlotCallback, "reconstruction": cb.ReconstructionCallback, "export": cb.ExportCallback,
            "evaluation": cb.EvaluationCallback}


def fit_main(argv: list[str]) -> int:
    """``hiq fit``: LightningCLI over HiQPipeline + CalibrationData; the stages are callbacks in the config."""
    from lightning.pytorch.cli import LightningCLI

    from hiq.modules import CalibrationData, HiQPipeline

    class HiQCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("model.model_path", "data.tokenizer_path")
            # every stage is a callback with its own config section (--reconstruction.iterations=...), run in
            # this order; sweeps and the command line override any key of any stage
            for key, callback in stage_callbacks().items():
                parser.add_lightning_class_args(callback, key)

        def before_instantiate_classes(self):
            cfg = self.config[self.subcommand]
            if not cfg.trainer.get("default_root_dir"):
                # DDP children re-run this command later: they must land in the parent's directory
                cfg.trainer.default_root_dir = os.environ.get("HIQ_RUN_DIR") or default_run_dir(
                    cfg.get("config") or [])
            run_dir = str(cfg.trainer.default_root_dir)
            os.environ["HIQ_RUN_DIR"] = run_dir
            _wandb_into_run_dir(cfg.trainer, run_dir)
            print(f"[hiq] run directory: {run_dir}", file=sys.stderr)

    HiQCLI(
        HiQPipeline,
        CalibrationData,
        # from the console script, LightningCLI reads sys.argv itself (DDP children re-run that command line)
        args=None if sys.argv[1:] == ["fit", *argv] else ["fit", *argv],
        trainer_defaults={"limit_train_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False,
                          "enable_model_summary": False},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )
    return 0


COMMANDS = {"eval": eval_main, "fit": fit_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\nusage: hiq {{{','.join(COMMANDS)}}} [--config FILE] [--key.sub VALUE ...]  (hiq CMD --help)")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"hiq {__version__}")
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"hiq: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[cmd](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
