"""LightningModules and DataModules.

``HiQPipeline`` holds the Hugging Face model being quantized; the stages of the method run as callbacks on
its ``Trainer.fit`` (:mod:`hiq.callbacks`), sharing one typed :class:`hiq.pipeline.Job` and the run directory
(``trainer.default_root_dir``). The outer fit has no optimisation loop of its own (``limit_train_batches=0``;
why: :mod:`hiq.pipeline`): each stage is a pass over calibration data, and block reconstruction runs its own
``Trainer.fit`` per block of :class:`hiq.blockfit.BlockReconstruction`.

``CalibrationData`` provides the calibration windows (paper: 128 x 2048 tokens of WikiText-2 train).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from hiq.checks import check_calibration_text, check_host_memory
from hiq.data import calibration_windows, load_text, tokenize_text
from hiq.model import load_model_and_tokenizer, parse_dtype, resolve_model_path
from hiq.offload import should_offload
from hiq.recipe import CalibrationOptions, ModelOptions


class HiQPipeline(L.LightningModule):
    """The model under quantization; the stages of the method are callbacks on its ``Trainer.fit``.

    Args:
        path: a save_pretrained directory, a hub id, or the bundled name ``tiny-llama``.
        dtype: dtype the model is loaded in (float32 on CPU; bfloat16/float16 on GPUs).
        trust_remote_code: let transformers run code shipped with a hub model (off by default).
        offload: keep the block weights in host memory and copy each to the device when it is used, in the stages
            that run the whole model (Fisher, tuning, evaluation; :mod:`hiq.offload`): for a model larger than the
            GPU. ``None`` (auto): when the weights take more than half the device's memory; never on the CPU.

    :meth:`from_model` wraps a model already in memory (the Python API). ``layout`` says where its quantizable
    linears are (:mod:`hiq.layouts`); ``job_for`` gives the stages their shared :class:`hiq.pipeline.Job`.
    """

    def __init__(self, path: str = "tiny-llama", dtype: str = "float32", trust_remote_code: bool = False,
                 offload: bool | None = None):
        super().__init__()
        ModelOptions(path, dtype, trust_remote_code, offload)  # validate before loading anything heavy
        self.save_hyperparameters()
        check_host_memory(resolve_model_path(path), parse_dtype(dtype).itemsize,
                          block_on_host=not torch.cuda.is_available())
        model, tokenizer = load_model_and_tokenizer(path, dtype, trust_remote_code)
        self._attach(model, tokenizer, path, offload)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, name: str | None = None,
                   offload: bool | None = None) -> HiQPipeline:
        """Wrap a Hugging Face causal LM already loaded (quantized in place by the fit)."""
        self = cls.__new__(cls)
        L.LightningModule.__init__(self)
        name = name or str(getattr(model, "name_or_path", "") or type(model).__name__)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.save_hyperparameters({"path": name, "dtype": dtype, "trust_remote_code": False, "offload": offload})
        model.eval()
        self._attach(model, tokenizer, name, offload)
        return self

    def _attach(self, model, tokenizer, name: str, offload: bool | None = None) -> None:
        from hiq.layouts import layout_for

        # Parameters keep requires_grad (DDP refuses to wrap a module without one); no stage runs a backward
        # through the DDP wrapper, so nothing is synchronised behind the stages' backs.
        self.offload, self.job = offload, None
        #: the model is not a submodule when its weights stay in host memory (``model.offload``): the Trainer moves
        #: its module to the device when the fit starts, which for a model larger than the GPU would be the end
        self.model_on_host = bool(offload) or (offload is None and torch.cuda.is_available()
                                               and should_offload(None, model, "cuda"))
        if self.model_on_host:
            object.__setattr__(self, "model", model)
        else:
            self.model = model
        self.tokenizer, self.model_name = tokenizer, name
        self.layout = layout_for(model)

    def job_for(self, trainer: L.Trainer, recipe):
        """The run's :class:`hiq.pipeline.Job` (made by the first stage of a fit, shared by the others)."""
        from hiq.pipeline import Job, Runtime

        if self.job is None or self.job.rt.trainer is not trainer:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "windows"):
                raise RuntimeError("the hiq stages need a CalibrationData datamodule "
                                   "(trainer.fit(..., datamodule=...))")
            windows = dm.windows(self.tokenizer, getattr(self.model.config, "max_position_embeddings", None))
            rt = Runtime.from_trainer(trainer, self.device)
            rt.offload = should_offload(self.offload, self.model, rt.device)
            self.job = Job(self.model, self.tokenizer, self.model_name, recipe, dm.options, windows, rt, self.layout)
        return self.job

    def training_step(self, batch, batch_idx):  # pragma: no cover - the outer fit runs no batches
        return None

    def configure_optimizers(self):
        return None


#: ``data.dataset`` ending in this is a file of ready-made token windows (:func:`load_windows_file`)
WINDOWS_SUFFIX = ".pt"


def load_windows_file(opts, vocab_size: int, max_context: int | None = None) -> torch.Tensor:
    """The first ``data.nsamples`` rows of a ``torch.save``-d int64 ``(n, seqlen)`` tensor of token ids: calibrating
    on exactly the windows another tool was given (``benchmarks/peer_table.py`` writes them). ``data.seed`` and
    ``data.split`` do not apply; ``data.seqlen``, when set, must equal the file's window length."""
    path = Path(opts.dataset).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.dataset={opts.dataset!r}: no such windows file (a torch.save-d int64 "
                                f"(nsamples, seqlen) tensor of token ids)")
    try:
        windows = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle of something else, a truncated file, ...
        raise ValueError(f"data.dataset={opts.dataset!r} could not be read as a tensor of token windows "
                         f"({type(err).__name__}: {err})") from err
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        what = (f"a {tuple(windows.shape)} {windows.dtype} tensor" if isinstance(windows, torch.Tensor)
                else type(windows).__name__)
        raise ValueError(f"data.dataset={opts.dataset!r} holds {what}; expected an int64 (nsamples, seqlen) tensor")
    n, length = windows.shape
    if n < opts.nsamples:
        raise ValueError(f"data.dataset={opts.dataset!r} holds {n} windows, fewer than data.nsamples="
                         f"{opts.nsamples}; lower data.nsamples to at most {n}")
    if opts.seqlen is not None and opts.seqlen != length:
        raise ValueError(f"data.seqlen={opts.seqlen} but the windows in {opts.dataset!r} are {length} tokens long; "
                         f"set data.seqlen to {length} or null")
    if max_context is not None and length > max_context:
        raise ValueError(f"the windows in {opts.dataset!r} are {length} tokens long, beyond the model's context "
                         f"({max_context})")
    if n and (int(windows.min()) < 0 or int(windows.max()) >= vocab_size):
        raise ValueError(f"data.dataset={opts.dataset!r} holds token ids in [{int(windows.min())}, "
                         f"{int(windows.max())}], outside the tokenizer's vocabulary of {vocab_size}; were the "
                         f"windows made with another tokenizer?")
    return windows[: opts.nsamples].contiguous()


class CalibrationData(L.LightningDataModule):
    """Seeded random windows of a training split (GPTQ/OmniQuant sampling); see :class:`hiq.recipe.CalibrationOptions`.

    Args:
        dataset: ``wikitext2`` (bundled; its train split is the official <unk> tokens variant), ``c4``
            (bundled sample, documents 1100-1999), a hub id, text/jsonl paths, or a ``.pt`` file of ready-made
            int64 ``(n, seqlen)`` token windows (the first ``nsamples`` are used; split and seed do not apply).
        split: split to draw from.
        nsamples: number of windows (paper: 128).
        seqlen: tokens per window; null = min(2048, the model's context).
        seed: sampling seed.
        tokenizer_path: tokenizer to use (linked to the model path by ``hiq fit``).
    """

    def __init__(self, dataset: str = "wikitext2", split: str = "train", nsamples: int = 128,
                 seqlen: int | None = None, seed: int = 0, tokenizer_path: str = "tiny-llama"):
        super().__init__()
        self.options = CalibrationOptions(dataset, split, nsamples, seqlen, seed)  # validates
        self.save_hyperparameters()
        self._windows: torch.Tensor | None = None

    @classmethod
    def from_windows(cls, windows: torch.Tensor, name: str = "windows") -> CalibrationData:
        """Calibration on token windows the caller made: ``(nsamples, seqlen)`` int64."""
        if windows.dim() != 2 or windows.dtype != torch.long:
            raise ValueError(f"calibration windows must be a (nsamples, seqlen) int64 tensor, got "
                             f"{tuple(windows.shape)} {windows.dtype}")
        data = cls(dataset=name, split="given", nsamples=windows.shape[0], seqlen=windows.shape[1])
        data._windows = windows
        return data

    def windows(self, tokenizer=None, max_context: int | None = None) -> torch.Tensor:
        """All calibration windows, (nsamples, seqlen) int64; identical on every rank."""
        if self._windows is None:
            if tokenizer is None:
                from transformers import AutoTokenizer

                from hiq.model import resolve_model_path

                tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.hparams.tokenizer_path))
            opts = self.options
            if opts.dataset.endswith(WINDOWS_SUFFIX):
                self._windows = load_windows_file(opts, len(tokenizer), max_context)
                return self._windows
            seqlen = opts.seqlen or min(2048, max_context or 2048)
            if max_context is not None and seqlen > max_context:
                raise ValueError(f"data.seqlen={seqlen} exceeds the model's context ({max_context})")
            ids = tokenize_text(tokenizer, load_text(opts.dataset, opts.split))
            check_calibration_text(ids.numel(), opts.nsamples, seqlen, opts.dataset)
            self._windows = calibration_windows(ids, opts.nsamples, seqlen, opts.seed)
        return self._windows

    def use_windows(self, windows: torch.Tensor) -> None:
        """Windows already made from these options (``hiq fit`` makes them while it validates its inputs)."""
        self._windows = windows

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.windows()), batch_size=1)


def as_pipeline(model, tokenizer, dtype: str) -> HiQPipeline:
    """What :func:`hiq.quantize` was given as the model, as a :class:`HiQPipeline`."""
    if isinstance(model, HiQPipeline):
        return model
    if isinstance(model, ModelOptions):
        return HiQPipeline(model.path, model.dtype, model.trust_remote_code, model.offload)
    if isinstance(model, str | Path):
        return HiQPipeline(str(model), dtype)
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("quantize(model=<a loaded model>) needs its tokenizer: quantize(model, tokenizer, ...)")
        return HiQPipeline.from_model(model, tokenizer)
    raise TypeError(f"model must be a path/hub id, ModelOptions, a loaded causal LM or HiQPipeline; got "
                    f"{type(model).__name__}")


def as_calibration(calibration, tokenizer_path: str) -> CalibrationData:
    """What :func:`hiq.quantize` was given as calibration, as a :class:`CalibrationData`."""
    if isinstance(calibration, CalibrationData):
        return calibration
    if isinstance(calibration, torch.Tensor):
        return CalibrationData.from_windows(calibration)
    if calibration is None:
        calibration = CalibrationOptions()
    elif isinstance(calibration, str):
        calibration = CalibrationOptions(dataset=calibration)
    elif isinstance(calibration, dict):
        calibration = CalibrationOptions(**calibration)
    if not isinstance(calibration, CalibrationOptions):
        raise TypeError(f"calibration must be a dataset name, CalibrationOptions, a dict or a (n, seqlen) token "
                        f"tensor; got {type(calibration).__name__}")
    return CalibrationData(**asdict(calibration), tokenizer_path=tokenizer_path)
