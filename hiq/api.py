"""The Python API: ``hiq.quantize`` (the method on a model) and ``hiq.evaluate`` (score a model). The CLI and the
benchmarks call these.

>>> import hiq
>>> result = hiq.quantize("tiny-llama", recipe=hiq.Recipe(quant=hiq.QuantOptions(bits=2)),
...                       calibration=hiq.CalibrationOptions(nsamples=16), run_dir="runs/notebook")  # doctest: +SKIP
>>> result.avg_bits, result.ratios["model.layers.0.self_attn.q_proj"]                           # doctest: +SKIP
>>> hiq.evaluate(result.model, result.tokenizer)["wikitext2_ppl"]                               # doctest: +SKIP
"""

from __future__ import annotations

import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hiq.checks import (
    check_model_dir,
    check_offload_processes,
    check_trainer,
    check_windows,
    check_writable,
    claim_run_folder,
    default_run_dir,
)
from hiq.recipe import (
    CalibrationOptions,
    EvaluationOptions,
    ExportOptions,
    ModelOptions,
    PlotOptions,
    Recipe,
    RTNOptions,
)
from hiq.version import __version__

#: The outer fit of the method: no batches of its own (see :mod:`hiq.pipeline`), no checkpoints, no summary.
TRAINER_DEFAULTS = {"limit_train_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False,
                    "enable_model_summary": False}


@dataclass
class QuantizeResult:
    """What :func:`quantize` produced: the model (quantized in place, dequantised weights), its ratios and bits.

    Attributes:
        model, tokenizer: the quantized model (on CPU) and its tokenizer.
        recipe: the recipe it was quantized with.
        run_dir: the run directory (artifacts; rerunning with it resumes).
        ratios: ``{full module name: high-impact ratio}``.
        avg_bits: parameter-weighted code bits of the block linears actually written (overhead excluded).
        avg_bits_storage: the same with an fp16 scale and a b-bit zero per row and group counted.
        blocks: per block: reconstruction loss before (RTN) and after, seconds, bits.
        metrics: ``metrics.json`` when evaluation ran, else None.
        model_dir: the dequantised checkpoint (``model/``) when that export ran, else None.
        exports: ``{format: directory}`` of every checkpoint the export wrote (``packed``, ``dequantized``,
            ``compressed-tensors``).
    """

    model: Any
    tokenizer: Any
    recipe: Recipe
    run_dir: Path
    ratios: dict[str, float] = field(default_factory=dict)
    avg_bits: float | None = None
    avg_bits_storage: float | None = None
    blocks: list[dict] = field(default_factory=list)
    metrics: dict | None = None
    model_dir: str | None = None
    exports: dict[str, str] = field(default_factory=dict)


def quantize(
    model,
    tokenizer=None,
    recipe: Recipe | dict | None = None,
    calibration: CalibrationOptions | str | dict | torch.Tensor | None = None,
    run_dir: str | Path | None = None,
    *,
    export: ExportOptions | None = None,
    evaluation: EvaluationOptions | None = None,
    plots: PlotOptions | None = None,
    trainer=None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> QuantizeResult:
    """Quantize ``model`` with ``recipe``: Fisher -> M -> ratios -> per-block fits (-> export -> evaluation).

    Args:
        model: a path, hub id or ``tiny-llama``; :class:`ModelOptions`; or a loaded Hugging Face causal LM
            (quantized in place; give its ``tokenizer``).
        tokenizer: the tokenizer of a loaded model (loaded from the path otherwise).
        recipe: :class:`Recipe` (or a dict of its sections); default ``Recipe()``.
        calibration: :class:`CalibrationOptions`, a dataset name, or ``(nsamples, seqlen)`` token windows.
        run_dir: where the artifacts go; a rerun with the same folder resumes. Default ``runs/<setting>-<time>``.
        export: write ``model/`` (a ``from_pretrained`` checkpoint); default off.
        evaluation: perplexity / zero-shot after quantizing, written to ``metrics.json``; default off.
        plots: Figure 1/2 analogs in ``plots/``; default off.
        trainer: a ``lightning.Trainer`` to run the outer fit on (its callbacks get the stages), or a dict of
            ``Trainer`` arguments (``{"accelerator": "cuda", "devices": 2, "strategy": "ddp"}``).
        dtype: dtype to load a model given by path in.
        overwrite: ``run_dir`` may hold another run (other model, recipe or calibration): remove its artifacts
            instead of refusing. A folder holding this same run is always resumed.

    Inputs are checked before the model loads (paths, budget, batch sizes, devices) and the calibration text
    before the first forward pass; a mistake raises ``ValueError`` naming the value and the fix.
    """
    import lightning as L

    from hiq.callbacks import method_callbacks
    from hiq.modules import as_calibration, as_pipeline

    recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else (recipe or Recipe())
    if isinstance(trainer, L.Trainer):
        world_size = trainer.world_size
    else:
        kwargs = {**TRAINER_DEFAULTS, "logger": False, **(trainer or {})}
        world_size = check_trainer(kwargs)
    if evaluation is not None:
        from hiq.perplexity import check_evaluation

        check_evaluation(evaluation)
    if isinstance(model, str | Path | ModelOptions):
        check_model_dir(model.path if isinstance(model, ModelOptions) else str(model))
    pipeline = as_pipeline(model, tokenizer, dtype)
    check_offload_processes(pipeline.model_on_host, world_size)  # auto included: known once the model is loaded
    data = as_calibration(calibration, pipeline.model_name)
    check_windows(recipe, data.options.nsamples, world_size)
    data.windows(pipeline.tokenizer, getattr(pipeline.model.config, "max_position_embeddings", None))
    callbacks = method_callbacks(recipe, export, evaluation, plots)
    if isinstance(trainer, L.Trainer):
        if run_dir is not None and Path(trainer.default_root_dir) != Path(run_dir):
            raise ValueError(f"run_dir={str(run_dir)!r} differs from the trainer's default_root_dir "
                             f"{trainer.default_root_dir!r}; give one of them")
        trainer.callbacks.extend(callbacks)
    else:
        kwargs["default_root_dir"] = str(run_dir or default_run_dir(recipe.label().lower().replace(" ", "-")
                                                                    .replace("/", "")))
        trainer = L.Trainer(callbacks=callbacks, **kwargs)
    claim_run_folder(trainer.default_root_dir, pipeline.model_name, recipe, data.options, overwrite)
    for logger in trainer.loggers:  # the run config of W&B (CSVLogger: hparams.yaml): what metrics.json names so
        logger.log_hyperparams({"recipe": recipe.to_dict(), "recipe_key": recipe.key(),
                                "calibration": asdict(data.options)})
    with warnings.catch_warnings():
        # the outer fit has no optimizer and runs no batches by design (hiq.pipeline); the block fits run max_steps
        for message in (r".*configure_optimizers.* returned .None.", r".*max_epochs.* was not set",
                        r".*number of training batches .* is smaller than the logging interval",
                        r".*module\(s\) in eval mode at the start of training", r".*does not have many workers"):
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(pipeline, datamodule=data)
    job = pipeline.job
    state = job.state
    result = QuantizeResult(pipeline.model, pipeline.tokenizer, recipe, Path(trainer.default_root_dir),
                            ratios=state.ratios.ratios if state.ratios is not None else {}, blocks=state.blocks or [],
                            metrics=state.metrics, model_dir=state.model_dir,
                            exports=dict(state.exports))
    if state.blocks:
        from hiq.pipeline import blocks_average_bits

        result.avg_bits, result.avg_bits_storage = blocks_average_bits(state.blocks)
    return result


def evaluate(
    model,
    tokenizer=None,
    evaluation: EvaluationOptions | None = None,
    quant: RTNOptions | None = None,
    output: str | Path | None = None,
    *,
    dtype: str = "float32",
) -> dict:
    """Perplexity (and zero-shot accuracy) of a model, optionally after RTN; returns the result (and writes it).

    Args:
        model: a path, hub id or ``tiny-llama``; :class:`ModelOptions`; or a loaded causal LM (with ``tokenizer``).
        evaluation: datasets, window length, zero-shot tasks (:class:`EvaluationOptions`); default WikiText-2 + C4.
        quant: ``RTNOptions(method="rtn", bits=..., group_size=...)`` to quantize every block linear in place
            first; None = score the model as it is.
        output: JSON file to write the result to (None = do not write).

    Everything cheap is validated (model path, datasets, tasks, lm-eval present) before the model loads.
    """
    from hiq.artifacts import peak_memory_mb, save_json
    from hiq.evaluation import perplexities, zeroshot
    from hiq.model import _quant_method, load_model_and_tokenizer, resolve_model_path
    from hiq.packed import packed_average_bits
    from hiq.perplexity import check_evaluation
    from hiq.quant.bits import average_bits, average_bits_over_layers, stored_width

    t0 = time.time()
    evaluation = evaluation or EvaluationOptions()
    quant = quant or RTNOptions(method="none")
    if isinstance(model, str | Path):
        model = ModelOptions(str(model), dtype)
    if isinstance(model, ModelOptions):
        method = _quant_method(resolve_model_path(model.path))
        if method and quant.method != "none":
            raise ValueError(f"{model.path} is already quantized ({method}); score it as it is with "
                             f"--quant.method=none")
    check_evaluation(evaluation)
    if isinstance(model, ModelOptions):
        check_model_dir(model.path)
    if output is not None:
        check_writable(output, "output", directory=False)
    label = quant.label()
    name = model.path if isinstance(model, ModelOptions) else str(getattr(model, "name_or_path", "") or "model")
    print(f"[hiq eval] {label} on {name}", file=sys.stderr)
    if isinstance(model, ModelOptions):
        model, tokenizer = load_model_and_tokenizer(model.path, model.dtype, model.trust_remote_code)
    elif tokenizer is None:
        raise ValueError("evaluate(model=<a loaded model>) needs its tokenizer: evaluate(model, tokenizer, ...)")
    records = []
    if quant.method == "rtn":
        from hiq.quant.grid import QuantSpec
        from hiq.quant.rtn import quantize_model_rtn

        records = quantize_model_rtn(model, QuantSpec(quant.bits, quant.group_size),
                                     convention=quant.avg_bits_convention)
        avg_bits = average_bits_over_layers([(r.numel, r.avg_bits) for r in records])
    packed = packed_average_bits(model)
    if packed is not None:
        avg_bits = packed[0]
    elif not records:
        avg_bits = stored_width(model)
    result: dict = {
        "setting": label,
        "method": quant.method,
        "bits": quant.bits if records else None,
        "group_size": quant.group_size if records else None,
        "avg_bits": avg_bits,
        "avg_bits_convention": quant.avg_bits_convention if records else (
            "hiq packed: code bits" if packed else "stored dtype width"),
        **({"avg_bits_storage": packed[1]} if packed else {}),
        "avg_bits_paper": average_bits(quant.bits, quant.group_size, convention="paper") if records else None,
        "quantized_layers": len(records) if packed is None else packed[2],
        "model": name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "eval": {},
    }
    scored = perplexities(model, tokenizer, evaluation, float32_linears=False, prefix="[hiq eval]")
    for key, res in scored.items():
        result[f"{key}_ppl"] = res["ppl"]
        result["eval"][key] = {k: v for k, v in res.items() if k not in ("dataset", "ppl")}
        result["seqlen"] = res["tokens_scored"] // res["windows"] + 1
    if evaluation.tasks:
        zs = zeroshot(model, tokenizer, evaluation, prefix="[hiq eval]")
        result["zeroshot"], result["zeroshot_avg"] = zs, zs["average"]
    result["wall_time_s"] = round(time.time() - t0, 2)
    result["memory"] = peak_memory_mb()
    result["versions"] = {"hiq": __version__, "torch": torch.__version__, "python": platform.python_version()}
    result["config"] = {"quant": asdict(quant), "evaluation": asdict(evaluation)}
    if output is not None:
        save_json(output, result)
        result["output"] = str(output)
    return result


def export_run(run_dir: str | Path, formats: tuple[str, ...] | list[str] = ("packed",),
               output: str | Path | None = None, model: str | None = None) -> dict[str, str]:
    """Write checkpoints of a finished ``hiq fit`` run from its ``blocks/`` (no recomputation): ``hiq export``.

    Args:
        run_dir: the run directory (its ``metrics.json`` names the source model; its ``blocks/`` hold the codes).
        formats: ``packed`` and/or ``compressed-tensors`` (see :class:`ExportOptions`).
        output: directory of the first format (default ``<run_dir>/<format dir>``); further formats go beside it.
        model: the source model (path, hub id or bundled name) when ``metrics.json`` is missing or moved.

    Returns ``{format: directory}``. The blocks must be the run's own: their keys are checked against
    ``metrics.json``'s ``weights_key``.
    """
    from hiq.artifacts import RunDir, load_json
    from hiq.export import finished_weights, write_checkpoint
    from hiq.model import load_model_and_tokenizer, model_fingerprint
    from hiq.recipe import EXPORT_FORMATS

    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise FileNotFoundError(f"run directory {run.root} does not exist")
    bad = [f for f in formats if f not in EXPORT_FORMATS or f == "dequantized"]
    if bad or not formats:
        raise ValueError(f"formats={list(formats)!r}; hiq export writes packed and/or compressed-tensors (the "
                         f"dequantised model/ is written by hiq fit)")
    metrics = load_json(run.metrics) if run.metrics.is_file() else {}
    source = model or metrics.get("model")
    if not source:
        raise ValueError(f"{run.metrics} is missing, so the source model is unknown; pass it (--model.path=...)")
    if not sorted((run.root / "blocks").glob("block_*.safetensors")):
        raise FileNotFoundError(f"{run.root / 'blocks'} holds no block_XX.safetensors; the run did not reconstruct "
                                f"any block")
    fp_model, tokenizer = load_model_and_tokenizer(source, metrics.get("model_dtype", "float32"))
    fingerprint = model_fingerprint(fp_model)  # of the weights in the dtype the run loaded them in
    if metrics.get("model_fingerprint") not in (None, fingerprint):
        raise ValueError(f"the model at {source} is not the one the run quantized (weights fingerprint {fingerprint} "
                         f"!= {metrics['model_fingerprint']} in {run.metrics}); pass the run's model "
                         f"(--model.path=...) or rerun hiq fit")
    records, weights_key = finished_weights(run, fp_model, source, fingerprint, metrics)
    meta = {"setting": metrics.get("setting"), "recipe": metrics.get("recipe"), "source_model": source,
            "weights_key": weights_key, "run_dir": str(run.root)}
    written: dict[str, str] = {}
    for i, fmt in enumerate(formats):
        target = Path(output) if (output and i == 0) else (
            Path(output).parent / EXPORT_FORMATS[fmt] if output else run.root / EXPORT_FORMATS[fmt])
        write_checkpoint(fmt, fp_model, records, target, tokenizer, meta)
        written[fmt] = str(target)
    return written


def generate(model: str | ModelOptions, prompt: str, max_new_tokens: int = 40, do_sample: bool = False,
             seed: int = 0) -> str:
    """The continuation a (quantized) model writes for ``prompt`` (greedy unless ``do_sample``): ``hiq generate``."""
    from hiq.model import load_model_and_tokenizer

    options = model if isinstance(model, ModelOptions) else ModelOptions(str(model), "float32")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; give at least 1")
    lm, tokenizer = load_model_and_tokenizer(options.path, options.dtype, options.trust_remote_code)
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@dataclass
class FitConfig:
    """A ``hiq fit`` YAML config as the API's dataclasses, so scripts run a config without the command line.

    >>> cfg = FitConfig.load("configs/tiny/w2.yaml", **{"ratios.mode": "uniform", "sensitivity.enabled": False})
    >>> cfg.run("runs/w2-uniform")  # doctest: +SKIP   (same as hiq fit --config ... --ratios.mode=uniform ...)
    """

    model: ModelOptions
    data: CalibrationOptions
    recipe: Recipe
    export: ExportOptions
    evaluation: EvaluationOptions
    plots: PlotOptions
    trainer: dict = field(default_factory=dict)
    seed_everything: int = 0

    @classmethod
    def load(cls, path: str | Path, **overrides) -> FitConfig:
        """Read ``path``; ``overrides`` are ``"section.key": value`` pairs (``hiq fit``'s ``--section.key=value``)."""
        import yaml

        from hiq.recipe import CONFIG_SECTIONS, OUTPUT_SECTIONS, SECTIONS

        raw = yaml.safe_load(Path(path).read_text()) or {}
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if not key and section != "seed_everything":
                raise ValueError(f"override {dotted!r} must be section.key (e.g. ratios.mode)")
            if section == "seed_everything":
                raw[section] = value
            else:
                raw.setdefault(section, {})[key] = value
        unknown = set(raw) - set(CONFIG_SECTIONS)
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected {', '.join(CONFIG_SECTIONS)}")
        seed = raw.get("seed_everything", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{path}: seed_everything={seed!r}; give an integer")
        section = {name: dict(raw.get(name) or {}) for name in CONFIG_SECTIONS if name != "seed_everything"}
        trainer = {k: v for k, v in section["trainer"].items() if k in ("accelerator", "devices", "strategy")}
        outputs = {name: cls_(**section[name]) for name, cls_ in OUTPUT_SECTIONS.items()}
        return cls(ModelOptions(**section["model"]), CalibrationOptions(**section["data"]),
                   Recipe(**{k: section[k] for k in SECTIONS}), **outputs, trainer=trainer, seed_everything=seed)

    def run(self, run_dir: str | Path, **trainer) -> QuantizeResult:
        """:func:`quantize` with every section of this config (no logger unless ``logger=...`` is given)."""
        import lightning as L

        L.seed_everything(self.seed_everything, verbose=False)  # as hiq fit does
        return quantize(self.model, recipe=self.recipe, calibration=self.data, run_dir=run_dir, export=self.export,
                        evaluation=self.evaluation, plots=self.plots, trainer={**self.trainer, **trainer})
