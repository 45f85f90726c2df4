"""Load a Hugging Face causal LM and find its transformer blocks and their linear layers, generically."""

from __future__ import annotations

import contextlib
import functools
import re
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

BUNDLED_DIR = Path(__file__).resolve().parent / "assets"
BUNDLED_MODELS = {"tiny-llama": BUNDLED_DIR / "tiny-llama"}
DEFAULT_MODEL = "tiny-llama"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(ValueError):
    """The model could not be found or loaded; the message names the path and what to do."""


def resolve_model_path(name_or_path: str) -> str:
    """Bundled short names map to their directory; existing paths stay; hub ids pass through.

    A string that looks like a filesystem path (``./x``, ``/x``, ``~/x``, or containing more than one
    ``/``) and does not exist is an error here, before anything is downloaded or loaded.
    """
    if name_or_path in BUNDLED_MODELS:
        path = BUNDLED_MODELS[name_or_path]
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"bundled model {name_or_path!r} is missing at {path}; reinstall hiq")
        return str(path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model path {str(path)!r} exists but has no config.json; point to a directory written by "
                f"save_pretrained"
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or not _HUB_ID.match(name_or_path):
        raise ModelLoadError(
            f"model path {name_or_path!r} does not exist; give a save_pretrained directory, a hub id "
            f"(e.g. meta-llama/Llama-2-7b-hf) or a bundled name ({', '.join(BUNDLED_MODELS)})"
        )
    return name_or_path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _quant_method(resolved: str) -> str | None:
    """``quant_method`` of a local checkpoint's ``quantization_config`` (None: none, or not a local directory)."""
    import json

    config = Path(resolved) / "config.json"
    if not config.is_file():
        return None
    try:
        qc = json.loads(config.read_text()).get("quantization_config")
    except ValueError as err:
        raise ModelLoadError(f"{config}: not valid JSON ({err})") from None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` in eval mode on CPU (blocks move to a device later)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model_path(name_or_path)
    torch_dtype = parse_dtype(dtype)
    extra = {}
    if _quant_method(resolved) == "compressed-tensors":
        # hiq's compressed-tensors export (asymmetric, packed zero points) loads through transformers decompressed
        # to float weights; its compressed path expects unpacked zero points (see docs on deployment)
        from transformers import CompressedTensorsConfig

        extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            resolved, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
    except OSError as err:
        raise ModelLoadError(
            f"could not load model {name_or_path!r} ({err}). Offline (HF_HUB_OFFLINE=1) only local "
            f"directories and cached hub ids load; bundled: {', '.join(BUNDLED_MODELS)}"
        ) from err
    model.eval()
    own_weights(model)
    release_free_memory()  # what loading and the copies above freed
    record_execution_order(model)
    return model, tokenizer


@torch.no_grad()
def own_weights(model: nn.Module) -> int:
    """Copy every parameter and buffer that lives in memory the process does not own (pages of a memory-mapped
    safetensors shard, as a checkpoint loaded in its own dtype is) into ordinary memory, one tensor at a time;
    returns the bytes copied.

    Without it a 7B-shaped run held the model twice by its end: each fitted block's weights are new memory while
    the shard pages of the weights they replaced stay mapped (a shard's mapping is released only when every tensor
    of it is), 0.27 GiB of RSS per 4096-wide block (issue 26). After the copy the model is counted once, as memory
    the process owns; the transient is one tensor (the shard pages already read are clean and dropped with the
    mapping). Tensors that own their memory (a checkpoint converted to another dtype at load) are left alone.
    """
    copied = 0
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is None or t.untyped_storage().resizable():
                    continue
                t.data = t.data.clone()
                copied += t.numel() * t.element_size()
    return copied


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is another (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the operating system (glibc ``malloc_trim(0)``; a no-op elsewhere);
    True when some were released.

    PyTorch's CPU tensors come from ``malloc``. Buffers below glibc's mmap threshold (which rises to 32 MiB once a
    large buffer was freed) live in the heap, and when they are freed glibc keeps the pages for reuse instead of
    returning them. On the 7B-shaped slice (issue 26) that was 0.8 GiB held after loading alone and about 1 GiB after
    each block fit, on top of what the next stage needed. hiq calls this after loading, after every stage and
    around every block fit."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ``ModuleList`` with ``config.num_hidden_layers`` entries.

    Works for LLaMA/Mistral/Qwen2 (``model.layers``), OPT (``model.decoder.layers``), GPT-2 style
    (``transformer.h``) without a per-architecture table.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    if not candidates:
        raise ValueError(f"could not find the transformer blocks of {type(model).__name__}: no ModuleList "
                         f"of num_hidden_layers={n_layers} modules")
    # The outermost such list (shortest name) is the block stack; nested lists are inside blocks.
    return min(candidates, key=lambda item: item[0].count("."))[1]


def block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers inside one block, in execution order when :func:`record_execution_order` ran
    (models from :func:`load_model_and_tokenizer` have it), else in registration order. LLaMA: q,k,v,o,gate,
    up,down either way; OPT registers k,v,q but runs q first."""
    linears = [(name, mod) for name, mod in block.named_modules() if isinstance(mod, nn.Linear)]
    order = getattr(block, "_hiq_linear_order", None)
    if order is not None and sorted(order) == sorted(n for n, _ in linears):
        rank = {name: i for i, name in enumerate(order)}
        linears.sort(key=lambda item: rank[item[0]])
    return linears


@torch.no_grad()
def record_execution_order(model: nn.Module, n_tokens: int = 2) -> None:
    """Run the model once on a few tokens and store, on every block, the order its linears are first called."""
    blocks = find_blocks(model)
    calls: dict[int, list[str]] = {i: [] for i in range(len(blocks))}
    handles = []
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                def hook(module, args, i=i, name=name):
                    if name not in calls[i]:
                        calls[i].append(name)
                handles.append(mod.register_forward_pre_hook(hook))
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, n_tokens, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for i, block in enumerate(blocks):
        block._hiq_linear_order = calls[i]


def all_block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(block_index.name, linear)`` for every linear of every block; embeddings and head are excluded."""
    return [
        (f"{i}.{name}", lin) for i, block in enumerate(find_blocks(model)) for name, lin in block_linears(block)
    ]


# ----------------------------------------------------------------------------------------------------------
# Block capture and replay


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded; nothing after it runs."""


def to_device(obj, device: torch.device | str):
    """Move tensors inside nested tuples/lists/dicts to ``device``; other objects are returned as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


class BlockInputs:
    """The inputs of one block for every calibration batch: hidden states plus every other argument.

    ``hidden[i]`` is batch i's hidden states (CPU); ``kwargs_for(i)`` its keyword arguments (attention mask,
    position ids, ``position_embeddings``...). Keyword arguments identical across batches are stored once.
    """

    def __init__(self, hidden: list[torch.Tensor], kwargs: list[dict], kwargs_index: list[int]):
        self.hidden = hidden
        self._kwargs = kwargs
        self._index = kwargs_index

    def __len__(self) -> int:
        return len(self.hidden)

    def kwargs_for(self, i: int) -> dict:
        return self._kwargs[self._index[i]]

    def shared_kwargs(self) -> dict | None:
        """The keyword arguments when every batch has the same ones (equal-length windows), else None."""
        return self._kwargs[0] if len(set(self._index)) == 1 else None

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """Same keyword arguments, new hidden states (a block's outputs become the next block's inputs)."""
        if len(hidden) != len(self.hidden):
            raise ValueError(f"expected {len(self.hidden)} hidden-state batches, got {len(hidden)}")
        return BlockInputs(hidden, self._kwargs, self._index)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 1, device: torch.device | str | None = None
) -> BlockInputs:
    """Run the model up to its first block for each batch of ``windows`` and record that call's arguments.

    The hook records positional hidden states and *every* keyword argument, so a replay sees exactly what
    the model's own forward passed (4-D masks, ``position_embeddings``...). Results are kept on CPU.
    """
    block0 = find_blocks(model)[0]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict] = []
    index: list[int] = []
    seen: dict = {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:
            raise RuntimeError(f"{type(module).__name__} got {len(args)} positional arguments; only the hidden "
                               f"states are expected positionally")
        seen["hidden"] = h.detach().to("cpu")
        seen["kwargs"] = to_device({k: v for k, v in kwargs.items() if k != "hidden_states"}, "cpu")
        raise _StopForward

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            try:
                model(batch, use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - the hook always fires for a decoder-only model
                raise RuntimeError("the first transformer block was never called")
            hidden.append(seen["hidden"])
            for j, known in enumerate(kwargs_list):
                if _same(known, seen["kwargs"]):
                    index.append(j)
                    break
            else:
                kwargs_list.append(seen["kwargs"])
                index.append(len(kwargs_list) - 1)
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs_list, index)


def run_block(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device | str | None = None
) -> torch.Tensor:
    """One block's forward on cached inputs; the output comes back on the input's device."""
    device = torch.device(device) if device is not None else next(block.parameters()).device
    out = block(hidden.to(device), **to_device(kwargs, device))
    if isinstance(out, tuple):  # older transformers and some architectures return (hidden, ...)
        out = out[0]
    return out.to(hidden.device)


@torch.no_grad()
def block_outputs(
    block: nn.Module, inputs: BlockInputs, device: torch.device | str | None = None
) -> list[torch.Tensor]:
    """``run_block`` over every cached batch."""
    return [run_block(block, h, inputs.kwargs_for(i), device) for i, h in enumerate(inputs.hidden)]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape and bytes) of ``model`` as it is in memory.

    This is what the run folder's artifacts are keyed on, so a model changed in place at the same path is never
    mistaken for the one a run was computed from. Tensors are hashed on a thread pool (hashlib releases the GIL):
    about 1 GB/s per core, e.g. 14 s on one core for a 7B model in fp16.
    """
    import hashlib
    import os
    from concurrent.futures import ThreadPoolExecutor

    def one(item: tuple[str, torch.Tensor]) -> bytes:
        name, t = item
        h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        t = t.detach().cpu().contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        return h.digest()

    items = list(model.state_dict(keep_vars=False).items())
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(one, items))
    return hashlib.sha256(b"".join(digests)).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------------
# Low-precision linears on CPUs: computed in float32


LOW_PRECISION = (torch.bfloat16, torch.float16)


class _Float32Linear(torch.autograd.Function):
    """``F.linear`` of bf16/fp16 tensors computed in float32 (forward and backward), results in the inputs' dtype.
    Only the low-precision inputs are saved for the backward (no float32 copy of the weight outlives a call)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        out = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g @ weight.float()).to(x.dtype)
        flat = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = (flat.T @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = flat.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, except bf16/fp16 on the CPU, which is computed in float32 and rounded back.

    Why: PyTorch's CPU kernels for bf16 matrix products without AVX-512 fall back to plain loops. On the 2-core AMD
    EPYC (AVX2) of benchmarks/results/shaped_7b_cpu.md a (128 x 4096) x (4096 x 4096) product ran at 9.8 GFLOP/s in
    bf16 as ``F.linear`` and 0.2 GFLOP/s as the backward's ``grad @ W``, against 53-57 GFLOP/s in float32: the Fisher
    pass over a 7B-shaped 2-block slice had not finished after 13 minutes. On GPUs nothing changes."""
    if x.device.type == "cpu" and weight.dtype in LOW_PRECISION:
        return _Float32Linear.apply(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def _float32_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


@contextlib.contextmanager
def float32_cpu_linears(module: nn.Module) -> Iterator[None]:
    """While active, every ``nn.Linear`` of ``module`` with bf16/fp16 weights on the CPU computes through
    :func:`linear` (float32 arithmetic, same dtypes in and out); elsewhere nothing changes."""
    patched = [lin for lin in module.modules() if type(lin) is nn.Linear and lin.weight.dtype in LOW_PRECISION
               and lin.weight.device.type == "cpu" and "forward" not in lin.__dict__]
    for lin in patched:
        lin.forward = types.MethodType(_float32_forward, lin)
    try:
        yield
    finally:
        for lin in patched:
            lin.__dict__.pop("forward", None)
