"""The hiq command line, over the Python API (hiq.api). This text is what hiq --help prints.

hiq fit       the method on a model (LightningCLI -> hiq.quantize): Fisher scores -> matrix M -> HiGHS ratios
              -> block reconstruction -> scale tuning -> export -> evaluation; artifacts in
              --trainer.default_root_dir.
hiq eval      load a causal LM, optionally quantize its block linears with RTN, report avg bits, perplexity on
              WikiText-2 and the C4 sample and zero-shot accuracy (hiq.evaluate), write the result as JSON.
              A packed hiq checkpoint scores as it is (--quant.method=none).
hiq export    RUN_DIR: the packed checkpoint (and compressed-tensors for single-width runs) of a finished run.
hiq generate  --model.path=DIR --prompt TEXT: the continuation a (quantized) model writes.

One vocabulary for all (the dataclasses of hiq.recipe): --model.path, --model.dtype, --quant.bits,
--quant.group_size, --evaluation.datasets, --evaluation.tasks; hiq fit adds --quant.bits_high, --data.*
(calibration), --ratios.*, --sensitivity.*, --reconstruction.*, --export.*, --plots.* and --trainer.*;
hiq eval adds --quant.method and --output. A YAML file with --config; --print_config shows the merged config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

from hiq.checks import launcher
from hiq.version import __version__

#: ``hiq fit``'s config sections besides model/data/trainer: section -> dataclass (in :mod:`hiq.recipe`).
FIT_SECTIONS = ("quant", "ratios", "sensitivity", "reconstruction", "export", "evaluation", "plots")


#: Sphinx markup in the docstrings the help text is built from (hiq's and Lightning's): ``:role:`target```,
#: ``` ``literal`` ```, ```text <url>`_`` links. ``~a.b.c`` shows as ``c``, as Sphinx renders it.
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`]+)`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<([^>]+)>`_{1,2}")
_RST_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)


def plain_text(text: str) -> str:
    """Docstring text as plain text for a terminal: Sphinx roles, literals and links unwrapped."""
    text = _RST_ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = _RST_LINK.sub(r"\1 (\2)", text)
    return _RST_LITERAL.sub(r"\1", text)


def _help_formatter():
    """jsonargparse's help formatter with the help and description text made plain before it is wrapped."""
    from jsonargparse import DefaultHelpFormatter

    class PlainHelpFormatter(DefaultHelpFormatter):
        def _split_lines(self, text, width):
            return super()._split_lines(plain_text(text), width)

        def _fill_text(self, text, width, indent):
            return super()._fill_text(plain_text(text), width, indent)

        def start_section(self, heading):  # argument group titles (a dataclass docstring's first line)
            super().start_section(plain_text(heading) if heading else heading)

    return PlainHelpFormatter


def summary_line(result: dict) -> str:
    """The flat part of a result (no nested dicts) as indented JSON: what ``hiq eval`` prints on stdout."""
    return json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
                       if not isinstance(v, dict)}, indent=2)


def build_eval_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from hiq.api import evaluate
    from hiq.recipe import EvaluationOptions, ModelOptions, RTNOptions

    parser = ArgumentParser(prog="hiq eval", description=evaluate.__doc__, default_env=False, **_parser_kwargs())
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with model/quant/evaluation keys")
    parser.add_class_arguments(ModelOptions, "model")
    parser.add_class_arguments(RTNOptions, "quant")
    parser.add_class_arguments(EvaluationOptions, "evaluation")
    parser.add_argument("--output", type=str | None, default=None,
                        help="JSON file to write (default runs/eval/<setting>-<time>.json)")
    return parser


def eval_main(argv: list[str]) -> int:
    from hiq.api import evaluate

    parser = build_eval_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate(cfg)
    output = init.output or Path("runs/eval") / (
        f"{init.quant.label().lower().replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    result = evaluate(init.model, evaluation=init.evaluation, quant=init.quant, output=output)
    result.pop("output", None)
    print(summary_line({**result, "output": str(output)}))
    return 0


def default_run_dir(config_paths: list, now: str | None = None) -> str:
    """``runs/<config folder>-<config name>-<YYYYmmdd-HHMMSS>``: one directory per run."""
    from hiq.checks import default_run_dir as named

    stem = Path(str(config_paths[-1])).stem if config_paths else "run"
    parent = Path(str(config_paths[-1])).parent.name if config_paths else ""
    return named(f"{parent}-{stem}" if parent and parent not in (".", "configs") else stem, now)


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


def _section_dict(cfg) -> dict:
    """A parsed config section (jsonargparse Namespace or dict) as a plain dict."""
    return cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg or {})


def validate_fit_config(cfg) -> dict:
    """Every check that needs no model weights, before LightningCLI loads the model: the model folder, the recipe
    (budget inside the reachable range), batch sizes against windows and processes, devices, evaluation datasets,
    the run folder (one run per folder) and the calibration text (tokenised here; the windows are returned and
    reused). Raises ``ValueError`` naming the value and the fix."""
    import hiq.recipe as R
    from hiq.checks import check_model_dir, check_offload_processes, check_trainer, claim_run_folder, model_context
    from hiq.checks import check_windows as _check_windows
    from hiq.modules import CalibrationData
    from hiq.perplexity import check_evaluation

    sections = {name: cls(**_section_dict(cfg.get(name))) for name, cls in _fit_classes().items()}
    recipe = R.Recipe(**{k: sections[k] for k in ("quant", "ratios", "sensitivity", "reconstruction")})
    evaluation = sections["evaluation"]
    check_evaluation(evaluation)
    world_size = check_trainer(_section_dict(cfg.trainer))
    check_offload_processes(bool(cfg.model.get("offload")), world_size)  # before the model loads
    resolved = check_model_dir(cfg.model.path)
    data = CalibrationData(**{k: v for k, v in _section_dict(cfg.data).items() if k != "tokenizer_path"},
                           tokenizer_path=cfg.model.path)
    _check_windows(recipe, data.options.nsamples, world_size)
    claim = (cfg.trainer.default_root_dir, cfg.model.path, recipe, data.options, bool(cfg.get("overwrite")))
    claim_run_folder(*claim, check_only=True)  # the cheap check first; run.json is written once all passed
    windows = data.windows(max_context=model_context(resolved))
    claim_run_folder(*claim)
    return {"windows": windows, "options": data.options}


def _fit_classes() -> dict:
    """``hiq fit``'s recipe/output sections and their dataclasses (:mod:`hiq.recipe`), in FIT_SECTIONS order."""
    import hiq.recipe as R

    classes = {"quant": R.QuantOptions, "ratios": R.RatioOptions, "sensitivity": R.SensitivityOptions,
               "reconstruction": R.ReconstructionOptions, "export": R.ExportOptions,
               "evaluation": R.EvaluationOptions, "plots": R.PlotOptions}
    assert tuple(classes) == FIT_SECTIONS
    return classes


def user_error(cmd: str, err: BaseException) -> int:
    """Print a user's mistake as one line (once per run: DDP children stay silent); exit code 2."""
    if launcher():
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"hiq {cmd}: error: {message}", file=sys.stderr)
    return 2


#: What a user's mistake raises (a bug raises anything else and keeps its traceback).
USER_ERRORS: tuple = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _parser_kwargs() -> dict:
    """Parse errors raise (printed as one line) instead of printing the whole usage; no option prefixes
    (``--reconstruction.iteration`` is a typo, not ``iterations``); help as plain text."""
    return {"exit_on_error": False, "allow_abbrev": False, "formatter_class": _help_formatter()}


def fit_main(argv: list[str]) -> int:
    """``hiq fit``: LightningCLI builds the model, calibration data and Trainer; :func:`hiq.quantize` runs them."""
    from lightning.pytorch.cli import LightningCLI

    import hiq.recipe as R
    from hiq.api import TRAINER_DEFAULTS, quantize
    from hiq.modules import CalibrationData, HiQPipeline

    sections = _fit_classes()
    prepared: dict = {}
    # Lightning's per-run info lines ("Seed set to 0", "GPU available: False", "TPU available", a logging-service
    # tip) and the tensorboardX notice of its default CSV logger say nothing about this run; hiq prints its own
    for name in ("lightning.fabric.utilities.seed", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*`tensorboardX` has been removed as a dependency.*")

    class HiQCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("model.path", "data.tokenizer_path")
            for key, cls in sections.items():  # one config section per recipe dataclass
                parser.add_class_arguments(cls, key)
            parser.add_argument("--overwrite", type=bool, default=False,
                                help="the run directory may hold another run: remove its artifacts instead of "
                                     "refusing (the same run is always resumed)")

        def before_instantiate_classes(self):
            cfg = self.config
            if not cfg.trainer.get("default_root_dir"):
                # DDP children re-run this command later: they must land in the parent's directory
                cfg.trainer.default_root_dir = os.environ.get("HIQ_RUN_DIR") or default_run_dir(
                    cfg.get("config") or [])
            run_dir = str(cfg.trainer.default_root_dir)
            prepared.update(validate_fit_config(cfg))  # before the model loads
            os.environ["HIQ_RUN_DIR"] = run_dir
            _wandb_into_run_dir(cfg.trainer, run_dir)
            if launcher():
                print(f"[hiq] run directory: {run_dir}", file=sys.stderr)

    # DDP children re-run this process's command line (``hiq fit ...``) and arrive here again
    with warnings.catch_warnings():  # args=argv is this command line minus "fit", not a second one
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = HiQCLI(HiQPipeline, CalibrationData, args=argv, run=False, trainer_defaults=TRAINER_DEFAULTS,
                     save_config_kwargs={"overwrite": True}, seed_everything_default=0,
                     parser_kwargs={**_parser_kwargs(), "prog": "hiq fit", "description": fit_main.__doc__})
    init = cli.config_init
    if prepared.get("options") == cli.datamodule.options:
        cli.datamodule.use_windows(prepared["windows"])
    recipe = R.Recipe(quant=init.quant, ratios=init.ratios, sensitivity=init.sensitivity,
                      reconstruction=init.reconstruction)
    quantize(cli.model, recipe=recipe, calibration=cli.datamodule, export=init.export,
             evaluation=init.evaluation, plots=init.plots, trainer=cli.trainer, overwrite=init.overwrite)
    return 0


def export_main(argv: list[str]) -> int:
    """``hiq export RUN_DIR``: packed (and compressed-tensors) checkpoints of a finished run."""
    from jsonargparse import ArgumentParser

    from hiq.api import export_run

    parser = ArgumentParser(prog="hiq export", description=export_run.__doc__, default_env=False,
                            **_parser_kwargs())
    parser.add_argument("run_dir", type=str, help="a hiq fit run directory")
    parser.add_argument("--formats", type=list[str], default=["packed"],
                        help="packed and/or compressed-tensors (single-width runs)")
    parser.add_argument("--output", type=str | None, default=None, help="directory of the first format")
    parser.add_argument("--model.path", type=str | None, default=None,
                        help="source model when the run's metrics.json does not name it")
    cfg = parser.parse_args(argv)
    written = export_run(cfg.run_dir, cfg.formats, cfg.output, cfg.model.path)
    from hiq.export import dir_megabytes

    for fmt, path in written.items():
        print(f"{fmt}: {path} ({dir_megabytes(Path(path)):.2f} MB)")
    return 0


def generate_main(argv: list[str]) -> int:
    """``hiq generate --model.path=DIR --prompt TEXT``: what a (quantized) model writes."""
    from jsonargparse import ArgumentParser

    from hiq.api import generate
    from hiq.recipe import ModelOptions

    parser = ArgumentParser(prog="hiq generate", description=generate.__doc__, default_env=False,
                            **_parser_kwargs())
    parser.add_class_arguments(ModelOptions, "model")
    parser.add_argument("--prompt", type=str, required=True, help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--do_sample", type=bool, default=False)
    parser.add_argument("--seed", type=int, default=0)
    cfg = parser.parse_args(argv)
    init = parser.instantiate(cfg)
    text = generate(init.model, cfg.prompt, cfg.max_new_tokens, cfg.do_sample, cfg.seed)
    print(cfg.prompt + text)
    return 0


COMMANDS = {"eval": eval_main, "export": export_main, "fit": fit_main, "generate": generate_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: hiq {{{','.join(COMMANDS)}}} [--config FILE] [--key.sub VALUE ...]  (hiq CMD --help)\n")
        print(plain_text(__doc__.strip()))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"hiq {__version__}")
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"hiq: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from jsonargparse import ArgumentError

    try:
        return COMMANDS[cmd](argv[1:])
    except ArgumentError as err:
        return user_error(cmd, f"{err} (hiq {cmd} --help lists the options)")
    except USER_ERRORS as err:
        return user_error(cmd, err)
    except FloatingPointError as err:  # the model or the fit went non-finite: said once, exit 1, no traceback
        if launcher():
            print(f"hiq {cmd}: stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
