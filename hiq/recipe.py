"""The recipe: every setting of a hiq run as typed dataclasses, one home for each knob.

``Recipe`` is the quantization setting proper — what the weights become: bit widths and grouping
(:class:`QuantOptions`), the ratio allocation (:class:`RatioOptions`: candidates, budget, solver), how M is
measured (:class:`SensitivityOptions`) and the per-block quantizer (:class:`ReconstructionOptions`). It is
printed into ``metrics.json`` and hashed into the resume keys of every artifact (:meth:`Recipe.key`, :func:`digest`).

The options of the run around it — the model (:class:`ModelOptions`), the calibration set
(:class:`CalibrationOptions`), export (:class:`ExportOptions`), evaluation (:class:`EvaluationOptions`) and
plots (:class:`PlotOptions`) — are dataclasses too. Their field names are the command line's vocabulary:
``hiq fit`` and ``hiq eval`` both read ``--model.path``, ``--quant.bits``, ``--quant.group_size``,
``--evaluation.datasets`` ...; a YAML config has one section per dataclass.

Every dataclass validates itself on construction, so a bad value fails before any model is loaded, with a
message naming the value and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from hiq.quant.grid import SUPPORTED_BITS, QuantSpec, setting_label

QUANTIZERS = ("adaround", "lwc", "signround")
LR_SCHEDULES = ("constant", "linear")
CLIP_INITS = ("minmax", "search")

#: Recipe fields added after runs were made with this version of the folder layout, each with the value that does
#: what those runs did: at that value a field is left out of the block keys, and a ``run.json`` written before the
#: field existed still matches, so a run resumes across the upgrade (:func:`hiq.checks.manifest_differences`).
LATER_FIELDS = {"reconstruction": {"clip_init": "minmax", "loss_trim": 0.0}}


def _as_before(section: str, name: str, value) -> bool:
    later = LATER_FIELDS.get(section, {})
    return name in later and later[name] == value


def as_before(dotted: str, value) -> bool:
    """Whether the recipe key ``dotted`` (``reconstruction.loss_trim``, or with a leading ``recipe.``) is a
    :data:`LATER_FIELDS` field at the value that behaves as before it existed."""
    parts = dotted.removeprefix("recipe.").split(".")
    return len(parts) == 2 and _as_before(parts[0], parts[1], value)
RATIO_MODES = ("optimal", "uniform", "fixed")


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise ValueError(f"{name}={value!r} must be positive")


@dataclass
class ModelOptions:
    """Which model to load.

    Args:
        path: a save_pretrained directory, a hub id, or the bundled name ``tiny-llama``.
        dtype: weights dtype while quantizing/evaluating (float32 on CPU; bfloat16/float16 on GPUs).
        trust_remote_code: let transformers run code shipped with a hub model (off by default).
        offload: keep the block weights in host memory and copy each to the device when it is used, in the stages
            that run the whole model (Fisher, tuning, evaluation; :mod:`hiq.offload`): for a model larger than the
            GPU. ``None`` (auto): when the weights take more than half the device's memory; never on the CPU.
            ``hiq fit`` only (``hiq eval`` scores on the CPU and ignores it).
    """

    path: str = "tiny-llama"
    dtype: str = "float32"
    trust_remote_code: bool = False
    offload: bool | None = None

    def __post_init__(self) -> None:
        from hiq.model import parse_dtype

        parse_dtype(self.dtype)


@dataclass
class QuantOptions:
    """Bit widths and grouping of the block linears (embeddings, norms and the LM head stay in full precision).

    Args:
        bits: b_N, bits of the normal columns (2, 3, 4 or 8); ``hiq eval``'s RTN uses it for every column.
        bits_high: b_H, bits of the high-impact columns; null = ``bits + 1`` (the paper's choice).
        group_size: input columns per scale/zero group (32, 64, 128) or null for one per output channel.
    """

    bits: int = 2
    bits_high: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        spec = QuantSpec(self.bits, self.group_size)  # validates bits and group size
        self.group_size = spec.group_size
        if self.bits_high is None:
            self.bits_high = self.bits + 1 if self.bits + 1 in SUPPORTED_BITS else self.bits
        if self.bits_high != self.bits:
            QuantSpec(self.bits_high, self.group_size)
        if self.bits_high < self.bits:
            raise ValueError(f"quant.bits_high={self.bits_high} is below quant.bits={self.bits}; b_H >= b_N")

    def label(self) -> str:
        """``W2/3 per-channel``, ``W3/4 g128``; ``W4 g128`` when both parts share one width."""
        return setting_label(self.bits, self.group_size, self.bits_high)


#: The paper's candidate ratios B (Section 4.1).
PAPER_CANDIDATES: tuple[float, ...] = (0.02, 0.05, 0.10, 0.15, 0.20)
#: The default: the paper's plus 0 (the whole layer at b_N) and larger ratios up to 1 (the whole layer at b_H), so
#: every budget from b_N to b_H is reachable and the MILP can give a layer none or all of the extra bit (README
#: "Wider candidate ratios").
DEFAULT_CANDIDATES: tuple[float, ...] = (0.0, *PAPER_CANDIDATES, 0.30, 0.50, 0.75, 1.00)


@dataclass
class RatioOptions:
    """The ratio allocation: candidate ratios, the average-bits budget and how the ratios are chosen.

    Args:
        candidates: candidate high-impact ratios B (default :data:`DEFAULT_CANDIDATES`; the paper's are
            :data:`PAPER_CANDIDATES`, 0.02-0.20).
        target_avg_bits: budget in average weight bits over all block linears (scale/zero overhead not
            included, as the papers print it); must lie in the range the candidates can reach.
        mode: ``optimal`` (the MILP of Eq. 9), ``uniform`` (largest single ratio within the budget) or
            ``fixed`` (``fixed_ratio`` for every layer).
        fixed_ratio: the ratio for ``fixed`` mode.
        time_limit: HiGHS time limit in seconds.
        mip_rel_gap: relative optimality gap at which HiGHS may stop (0 = prove optimality).
    """

    candidates: tuple[float, ...] = DEFAULT_CANDIDATES
    target_avg_bits: float = 2.1
    mode: str = "optimal"
    fixed_ratio: float | None = None
    time_limit: float = 300.0
    mip_rel_gap: float = 0.0

    def __post_init__(self) -> None:
        self.candidates = tuple(float(c) for c in self.candidates)
        if self.mode not in RATIO_MODES:
            raise ValueError(f"ratios.mode={self.mode!r} is not supported; choose one of {', '.join(RATIO_MODES)}")
        if self.mode == "fixed" and self.fixed_ratio is None:
            raise ValueError("ratios.mode='fixed' needs ratios.fixed_ratio (a number in [0, 1])")
        _positive("ratios.time_limit", self.time_limit)


#: How M's cross terms are measured (:mod:`hiq.sensitivity`); the first is the default.
SENSITIVITY_METHODS = ("gram", "pairs")


@dataclass
class SensitivityOptions:
    """How the matrix M is measured (paper Eq. 7-8).

    Args:
        nsamples: calibration windows per M evaluation (the first ones of the calibration set).
        fidelity_assignments: random per-layer assignments per block used to check how well δᵀMδ/2 predicts
            the measured block loss (Spearman rank correlation); 0 disables the check.
        fidelity_seed: seed of those assignments.
        method: ``gram`` (default): the cross-layer terms from the output changes of the single perturbations,
            35 block evaluations per LLaMA block at K=5; ``pairs``: one evaluation per pair, the paper's
            definition, 560 (:mod:`hiq.sensitivity`).
        enabled: measure M (off: only the ``uniform`` and ``fixed`` ratio modes can run).
        fisher_batch_size: calibration windows per forward/backward of the Fisher pass that ranks the columns
            (:mod:`hiq.impact`). The scores are the per-sample Fisher whatever its value (float rounding aside), so it
            is not part of any artifact key; larger is faster and holds that many windows' activations for the
            backward (1 for a 7B model at 2048 tokens on one GPU; 8 for the bundled model on a CPU).
    """

    nsamples: int = 16
    fidelity_assignments: int = 50
    fidelity_seed: int = 0
    method: str = "gram"
    enabled: bool = True
    fisher_batch_size: int = 1

    def __post_init__(self) -> None:
        if self.method not in SENSITIVITY_METHODS:
            raise ValueError(f"sensitivity.method={self.method!r}; choose gram (default) or pairs")
        if self.nsamples < 1:
            raise ValueError(f"sensitivity.nsamples={self.nsamples} must be at least 1")
        if self.fidelity_assignments < 0:
            raise ValueError(f"sensitivity.fidelity_assignments={self.fidelity_assignments} must be >= 0")
        if self.fisher_batch_size < 1:
            raise ValueError(f"sensitivity.fisher_batch_size={self.fisher_batch_size} must be at least 1")

    def fingerprint(self) -> dict:
        """The fields that change M (the Fisher pass's batch size changes only its speed)."""
        return {k: v for k, v in asdict(self).items() if k != "fisher_batch_size"}


@dataclass
class ReconstructionOptions:
    """The per-block quantizer and its fit. Defaults: the ``signround`` preset (learned rounding of every weight on
    both parts); :meth:`preset` ``("paper")`` gives the paper's AdaRound (high-impact) + LWC (normal), Eq. 10-13.

    Args:
        iterations: optimizer steps per block (paper: 5,000).
        batch_size: calibration windows per step, over all processes (divisible by their number).
        nsamples: calibration windows used (the first ones of the calibration set); null = all.
        lr_round: Adam learning rate of AdaRound's rounding variables V (paper: 1e-3).
        weight_decay_round: their weight decay (paper: 1e-5).
        lr_lwc: Adam learning rate of LWC's clipping logits (OmniQuant's default 1e-2), no weight decay.
        round_weight: λ of AdaRound's regulariser, for a loss summed over the hidden dimension and averaged
            over tokens (AdaRound's 0.01).
        warmup: share of the iterations before the regulariser starts.
        beta_start: exponent β (the paper's γ) of the regulariser at the end of the warm-up ...
        beta_end: ... annealed linearly to this value at the last step.
        high_quantizer: the high-impact columns' quantizer: ``signround`` (default: learned rounding of every weight
            + min/max clipping, signed-gradient steps), ``adaround`` (the paper) or ``lwc``.
        normal_quantizer: the normal columns' quantizer: ``signround`` (default), ``lwc`` (the paper) or
            ``adaround``.
            SignRound trains with its own optimizer, so it goes on both parts or on neither.
        lwc_init: initial clipping logits (OmniQuant: 4.0, σ(4) = 0.982).
        lr_signround: SignRound's step size; null = 1 / iterations (AutoRound's default).
        lr_schedule: ``linear`` (default: every learning rate decays linearly to 0) or ``constant`` (the paper).
        clip_init: where SignRound's clipping starts: ``minmax`` (the full range) or ``search`` (per row and group,
            the clipping factor in 1.0 .. 0.5 whose round-to-nearest grid has the least error weighted by the
            layer's mean squared input per channel, from one forward pass of the block; SignRound parts only).
        loss_trim: share of the largest squared output errors left out of each step's reconstruction loss (0 = none;
            AutoRound's ``enable_alg_ext`` leaves out 0.001); the best step of ``keep_best`` is judged on it too.
        keep_best: restore the parameters of the step with the lowest reconstruction loss (of its batch) at the end
            of each block's fit, as AutoRound does (it ignores AdaRound's regulariser). Off by default: with the
            learning rate decaying to 0 the last step's rounding reconstructs every block better, and the lowest
            batch loss mostly picks an easy batch; at W2 that measured clearly better, at W3 the perplexities
            were a little worse, so the W3 configs turn it on (three seeds each:
            benchmarks/results/levers_w2_tiny.md).
        gradient_clip_val: gradient norm clipping of the block fit (null = off); not applied to SignRound's signed
            steps, whose update sees only each gradient's sign, which clipping never changes.
        log_every_n_steps: logging interval of the block fits.
        seed: seed of the sample order.
        enabled: run the stage (off: the model stays in full precision).
        tune_steps: steps of end-to-end scale tuning after the last block (stage ``tuning``, :mod:`hiq.tuning`):
            every quantized layer's scales, codes and zero points fixed, fitted together to the full-precision
            model's next-token distributions on the calibration windows; 0 = off (the paper, and the ``paper``
            preset).
        tune_lr: its Adam learning rate on the log of each scale, decaying linearly to 0.
        tune_batch_size: calibration windows per tuning step, over all processes.
    """

    iterations: int = 5000
    batch_size: int = 1
    nsamples: int | None = None
    lr_round: float = 1e-3
    weight_decay_round: float = 1e-5
    lr_lwc: float = 1e-2
    round_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    high_quantizer: str = "signround"
    normal_quantizer: str = "signround"
    lwc_init: float = 4.0
    lr_signround: float | None = None
    lr_schedule: str = "linear"
    clip_init: str = "minmax"
    loss_trim: float = 0.0
    keep_best: bool = False
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 25
    seed: int = 0
    enabled: bool = True
    tune_steps: int = 64
    tune_lr: float = 1e-2
    tune_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"reconstruction.iterations={self.iterations} must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"reconstruction.batch_size={self.batch_size} must be at least 1")
        if self.nsamples is not None and self.nsamples < self.batch_size:
            raise ValueError(f"reconstruction.nsamples={self.nsamples} is smaller than "
                             f"reconstruction.batch_size={self.batch_size}")
        for part in ("high_quantizer", "normal_quantizer"):
            if getattr(self, part) not in QUANTIZERS:
                raise ValueError(f"reconstruction.{part}={getattr(self, part)!r}; choose one of "
                                 f"{', '.join(QUANTIZERS)}")
        if (self.high_quantizer == "signround") != (self.normal_quantizer == "signround"):
            raise ValueError(f"reconstruction.high_quantizer={self.high_quantizer!r} with normal_quantizer="
                             f"{self.normal_quantizer!r}: SignRound trains with signed-gradient steps, AdaRound/LWC "
                             f"with Adam; use signround for both parts or for neither")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"reconstruction.lr_schedule={self.lr_schedule!r}; choose one of "
                             f"{', '.join(LR_SCHEDULES)}")
        if self.clip_init not in CLIP_INITS:
            raise ValueError(f"reconstruction.clip_init={self.clip_init!r}; choose one of {', '.join(CLIP_INITS)}")
        if self.clip_init == "search" and self.high_quantizer != "signround":
            raise ValueError(f"reconstruction.clip_init='search' starts SignRound's clipping; with high_quantizer="
                             f"{self.high_quantizer!r} and normal_quantizer={self.normal_quantizer!r} use "
                             f"clip_init='minmax' (LWC has lwc_init, AdaRound keeps min-max)")
        if not 0.0 <= self.loss_trim < 0.5:
            raise ValueError(f"reconstruction.loss_trim={self.loss_trim} must be in [0, 0.5): the share of the "
                             f"largest squared errors left out of the loss (AutoRound's extension: 0.001)")
        _positive("reconstruction.lr_signround", self.lr_signround, allow_none=True)
        _positive("reconstruction.lr_round", self.lr_round)
        _positive("reconstruction.lr_lwc", self.lr_lwc)
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"reconstruction.warmup={self.warmup} must be in [0, 1)")
        if self.tune_steps < 0:
            raise ValueError(f"reconstruction.tune_steps={self.tune_steps} must be 0 (no end-to-end tuning) or more")
        _positive("reconstruction.tune_lr", self.tune_lr)
        if self.tune_batch_size < 1:
            raise ValueError(f"reconstruction.tune_batch_size={self.tune_batch_size} must be at least 1")

    @classmethod
    def preset(cls, name: str, **overrides) -> ReconstructionOptions:
        """``paper`` (AdaRound on the high-impact columns, LWC on the rest, Adam at constant lr, last iterate) or
        ``signround`` (learned rounding + clipping of every weight on both parts, signed-gradient steps at
        1/iterations decaying linearly to 0, the last step's rounding kept); ``overrides`` set any other field."""
        if name not in RECONSTRUCTION_PRESETS:
            raise ValueError(f"reconstruction preset {name!r}; choose one of {', '.join(RECONSTRUCTION_PRESETS)}")
        return cls(**{**RECONSTRUCTION_PRESETS[name], **overrides})

    def fingerprint(self) -> dict:
        """The fields that change a block's fit (logging cadence, the on/off switch and the end-to-end tuning after
        the last block do not: changing only ``tune_*`` keeps every block and reruns the tuning)."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("log_every_n_steps", "enabled") and not k.startswith("tune_")
                and not _as_before("reconstruction", k, v)}

    def tuning_fingerprint(self) -> dict:
        """The fields of the end-to-end scale tuning (with the sample-order seed)."""
        return {k: v for k, v in asdict(self).items() if k.startswith("tune_") or k == "seed"}


@dataclass
class Recipe:
    """The quantization setting: what a model's weights become. Printable, hashable, passed around whole.

    >>> Recipe(quant=QuantOptions(bits=2, group_size=128), ratios=RatioOptions(target_avg_bits=2.1)).label()
    'W2/3 g128'
    """

    quant: QuantOptions = field(default_factory=QuantOptions)
    ratios: RatioOptions = field(default_factory=RatioOptions)
    sensitivity: SensitivityOptions = field(default_factory=SensitivityOptions)
    reconstruction: ReconstructionOptions = field(default_factory=ReconstructionOptions)

    def __post_init__(self) -> None:
        for f in fields(self):  # accept plain dicts for any section (YAML, JSON, notebooks)
            value = getattr(self, f.name)
            if isinstance(value, dict):
                setattr(self, f.name, SECTIONS[f.name](**value))
        if self.ratios.mode == "optimal" and not self.sensitivity.enabled:
            raise ValueError("ratios.mode=optimal needs the matrix M: set sensitivity.enabled=true (or use "
                             "ratios.mode=uniform / fixed)")
        if self.ratios.mode in ("optimal", "uniform"):
            self._check_budget()

    def _check_budget(self) -> None:
        """The budget inside what the candidate ratios reach (:func:`hiq.solver.check_target`, the one rule)."""
        from hiq.solver import check_target

        check_target(self.ratios.target_avg_bits, self.ratios.candidates, self.quant.bits, self.quant.bits_high)

    def label(self) -> str:
        return self.quant.label()

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown recipe sections {sorted(unknown)}; expected {[f.name for f in fields(cls)]}")
        return cls(**data)

    def run_dict(self) -> dict:
        """What a run folder's ``run.json`` compares: the recipe without the logging cadence and the Fisher pass's
        batch size (neither changes the weights)."""
        out = self.to_dict()
        out["reconstruction"] = {k: v for k, v in out["reconstruction"].items() if k != "log_every_n_steps"}
        out["sensitivity"] = self.sensitivity.fingerprint()
        return out

    def key(self) -> str:
        """A short hash of the whole recipe (what ``metrics.json`` and the exported model record)."""
        return digest(self.to_dict())


@dataclass
class CalibrationOptions:
    """Calibration windows: seeded random windows of a training split (GPTQ/OmniQuant sampling).

    Args:
        dataset: ``wikitext2`` (bundled; its train split is the official <unk> tokens variant), ``c4``
            (bundled sample), a hub id, text/jsonl paths, or a ``.pt`` file of ready-made int64 ``(n, seqlen)``
            token windows (the first ``nsamples`` are used; split and seed do not apply).
        split: split to draw from.
        nsamples: number of windows (paper: 128).
        seqlen: tokens per window; null = min(2048, the model's context).
        seed: sampling seed.
    """

    dataset: str = "wikitext2"
    split: str = "train"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise ValueError(f"data.nsamples={self.nsamples} must be at least 1")
        _positive("data.seqlen", self.seqlen, allow_none=True)


@dataclass
class ExportOptions:
    """What the export stage writes (rank 0; each format its own directory in the run folder).

    Args:
        formats: any of ``packed`` (``packed/``: codes bit-packed at each part's width, fp16 scales, the deployable
            checkpoint, :mod:`hiq.packed`), ``dequantized`` (``model/``: float weights, loads anywhere) and
            ``compressed-tensors`` (``compressed-tensors/``: the ``pack-quantized`` layout vLLM and transformers
            load; runs whose every layer has one bit width only, :mod:`hiq.compressed`).
        dtype: dtype of ``model/`` (the dequantised weights); null = the dtype the source checkpoint stores (e.g.
            float16 for a float16 model quantized in float32). Unquantized tensors of the packed formats keep it too.
        enabled: run the export stage (off: write nothing).
    """

    formats: list[str] = field(default_factory=lambda: ["packed", "dequantized"])
    dtype: str | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.formats, str):
            self.formats = [f.strip() for f in self.formats.split(",") if f.strip()]
        self.formats = list(self.formats)
        bad = [f for f in self.formats if f not in EXPORT_FORMATS]
        if bad or not self.formats or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"export.formats={self.formats!r}; give one or more distinct of "
                             f"{', '.join(EXPORT_FORMATS)}")
        if self.dtype is not None:
            from hiq.model import parse_dtype

            parse_dtype(self.dtype)


#: Export formats and the run-folder directory each is written to.
#: ``hiq eval``'s quantization methods (:class:`RTNOptions`).
RTN_METHODS = ("none", "rtn")


@dataclass
class RTNOptions:
    """``hiq eval``'s quantization: none (full precision) or round-to-nearest of every block linear.

    Args:
        method: ``none`` (full precision) or ``rtn`` (round-to-nearest, min-max asymmetric grid).
        bits: weight bits, one of 2, 3, 4, 8.
        group_size: input columns per scale/zero group (32, 64, 128) or null for per output channel.
        avg_bits_convention: ``storage`` (fp16 scale + b-bit zero per group/row counted), ``weights_only`` or
            ``paper`` (the 19-bits-per-group figure the papers print); see :mod:`hiq.quant.bits`.
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int | None = None
    avg_bits_convention: str = "storage"

    def __post_init__(self) -> None:
        from hiq.quant.bits import CONVENTIONS

        if self.method not in RTN_METHODS:
            raise ValueError(f"quant.method={self.method!r} is not supported; choose one of {RTN_METHODS}")
        if self.avg_bits_convention not in CONVENTIONS + ("omniquant",):
            raise ValueError(f"quant.avg_bits_convention={self.avg_bits_convention!r}; choose one of {CONVENTIONS}")
        self.group_size = QuantSpec(self.bits, self.group_size).group_size

    def label(self) -> str:
        return "FP" if self.method == "none" else setting_label(self.bits, self.group_size, method=self.method)


EXPORT_FORMATS = {"packed": "packed", "dequantized": "model", "compressed-tensors": "compressed-tensors"}


@dataclass
class EvaluationOptions:
    """Perplexity (protocol in :mod:`hiq.perplexity`) and zero-shot accuracy (lm-eval, :mod:`hiq.zeroshot`).

    Args:
        datasets: text sets to score: ``wikitext2``, ``c4`` (bundled sample), a hub id or file paths.
        seqlen: window length in tokens; null = min(2048, the model's context).
        max_windows: score only the first N windows of each set (quick runs); null = all.
        batch_size: windows per forward pass.
        tasks: zero-shot tasks through lm-eval (needs ``hiq[eval]``): a list or comma-separated string from
            piqa, arc_easy, arc_challenge, hellaswag, winogrande, or ``all``; null = none.
        limit: score only the first N documents of each zero-shot task (or a fraction in (0, 1]); null = all.
        zeroshot_batch_size: lm-eval requests per forward pass.
        enabled: evaluate and write ``metrics.json`` (``hiq fit``; off: skip).
    """

    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "c4"])
    seqlen: int | None = None
    max_windows: int | None = None
    batch_size: int = 1
    tasks: list[str] | str | None = None
    limit: int | float | None = None
    zeroshot_batch_size: int = 16
    enabled: bool = True

    def __post_init__(self) -> None:
        from hiq.zeroshot import check_limit, parse_tasks

        self.datasets = list(self.datasets)
        self.tasks = parse_tasks(self.tasks)
        self.limit = check_limit(self.limit)
        if self.limit is not None and not self.tasks:
            raise ValueError(f"evaluation.limit={self.limit} applies to zero-shot tasks; give evaluation.tasks too "
                             f"(or drop evaluation.limit)")
        if self.enabled and not self.datasets and not self.tasks:
            raise ValueError("evaluation.datasets is empty and no evaluation.tasks; give at least one of "
                             "wikitext2, c4, a hub id, a file path, or zero-shot tasks")
        _positive("evaluation.batch_size", self.batch_size)


@dataclass
class PlotOptions:
    """Figure 1/2 analogs in ``<run>/plots`` (Fisher score per channel, chosen ratio per layer).

    Args:
        enabled: draw the plots (off: skip).
    """

    enabled: bool = True


RECONSTRUCTION_PRESETS = {
    "paper": {"high_quantizer": "adaround", "normal_quantizer": "lwc", "lr_schedule": "constant",
              "clip_init": "minmax", "loss_trim": 0.0, "keep_best": False, "tune_steps": 0},
    "signround": {"high_quantizer": "signround", "normal_quantizer": "signround", "lr_schedule": "linear",
                  "clip_init": "minmax", "loss_trim": 0.0, "keep_best": False, "tune_steps": 64, "tune_lr": 1e-2},
}

#: The sections of a :class:`Recipe` (what is quantized, how): section -> dataclass.
SECTIONS = {"quant": QuantOptions, "ratios": RatioOptions, "sensitivity": SensitivityOptions,
            "reconstruction": ReconstructionOptions}
#: What a fit writes besides its artifacts: section -> dataclass.
OUTPUT_SECTIONS = {"export": ExportOptions, "evaluation": EvaluationOptions, "plots": PlotOptions}
#: Every section of a ``hiq fit`` config, in the order of the configs under ``configs/`` (the one list the CLI,
#: :class:`hiq.FitConfig` and the recipe read).
CONFIG_SECTIONS = ("model", "data", *SECTIONS, *OUTPUT_SECTIONS, "trainer", "seed_everything")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def digest(payload) -> str:
    """sha256 (16 hex digits) of a JSON-serialisable payload, keys sorted: the one hashing rule of hiq."""
    return hashlib.sha256(json.dumps(_jsonable(payload), sort_keys=True, default=str).encode()).hexdigest()[:16]
