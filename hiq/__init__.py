"""hiq: layer-wise high-impact parameter ratio optimization for post-training quantization of LLMs.

The Python API (:mod:`hiq.api`)::

    import hiq
    result = hiq.quantize("tiny-llama", recipe=hiq.Recipe(), calibration="wikitext2", run_dir="runs/x")
    hiq.evaluate(result.model, result.tokenizer)
"""

from hiq.api import QuantizeResult, evaluate, quantize
from hiq.layouts import ModelLayout, register_layout
from hiq.packed import register as _register_packed
from hiq.recipe import (
    CalibrationOptions,
    EvaluationOptions,
    ExportOptions,
    ModelOptions,
    PlotOptions,
    QuantOptions,
    RatioOptions,
    Recipe,
    ReconstructionOptions,
    RTNOptions,
    SensitivityOptions,
)
from hiq.version import __version__

_register_packed()  # AutoModelForCausalLM.from_pretrained loads packed hiq checkpoints (hiq.packed)

__all__ = [
    "__version__",
    "CalibrationOptions",
    "EvaluationOptions",
    "ExportOptions",
    "ModelLayout",
    "ModelOptions",
    "PlotOptions",
    "QuantOptions",
    "QuantizeResult",
    "RTNOptions",
    "RatioOptions",
    "Recipe",
    "ReconstructionOptions",
    "SensitivityOptions",
    "evaluate",
    "quantize",
    "register_layout",
]
