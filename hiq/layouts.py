"""Declarative per-architecture layouts: which modules are the blocks, which linears get quantized, which share
an input, what to skip — keyed by full module names (``model.layers.3.self_attn.q_proj``), the names every
other tool uses, so ``ratios.json`` and ``fisher.safetensors`` can be handed to them as they are.

A layout is looked up by the model's ``config.model_type`` in :data:`LAYOUTS`; a model type that is not listed
gets the generic discovery of :mod:`hiq.model` (the outermost ``ModuleList`` of ``num_hidden_layers`` blocks;
every ``nn.Linear`` inside a block, in the order a probe forward calls them). Add an architecture with
:func:`register_layout`.

Entries of ``linears`` are names inside one block, in execution order; ``*`` stands for every index of a
``ModuleList`` (MoE experts: ``mlp.experts.*.gate_proj``). ``skip`` lists names (same pattern rules) that stay
in full precision, such as an MoE router.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn


@dataclass
class LayerInfo:
    """One quantized linear layer as the ratio solver sees it (:mod:`hiq.solver`).

    Attributes:
        name: unique name (e.g. ``"model.layers.0.self_attn.q_proj"``); the key in ``ratios.json``.
        block: index of its transformer block, ``0 <= block < len(M_blocks)``.
        n_params: number of weights (``out_features * in_features``), > 0.

    Layers are listed in a fixed order; the layers of block ``b`` appear in the same order as the
    rows of block ``b``'s matrix (``l_local * K + m``).
    """

    name: str
    block: int
    n_params: int


@dataclass(frozen=True)
class ModelLayout:
    """Where the quantizable linears of one architecture are.

    Args:
        model_type: ``config.model_type`` this layout is for (``"generic"`` for discovery).
        blocks: dotted path of the ``ModuleList`` of transformer blocks; None = discover.
        linears: linears inside a block, in execution order (``*`` = every index); None = discover.
        skip: names inside a block left in full precision (``*`` patterns allowed).
    """

    model_type: str
    blocks: str | None = None
    linears: tuple[str, ...] | None = None
    skip: tuple[str, ...] = field(default_factory=tuple)

    # -- blocks ----------------------------------------------------------------------------------------------

    def blocks_path(self, model: nn.Module) -> str:
        if self.blocks is not None:
            return self.blocks
        from hiq.model import find_blocks

        target = find_blocks(model)
        return next(name for name, mod in model.named_modules() if mod is target)

    def blocks_of(self, model: nn.Module) -> nn.ModuleList:
        """The transformer blocks."""
        path = self.blocks_path(model)
        try:
            blocks = model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"layout {self.model_type!r}: {type(model).__name__} has no module {path!r}; "
                             f"fix hiq.layouts.LAYOUTS[{self.model_type!r}].blocks") from err
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"layout {self.model_type!r}: {path!r} is not a non-empty ModuleList")
        return blocks

    # -- linears ---------------------------------------------------------------------------------------------

    def block_linears(self, block: nn.Module) -> list[tuple[str, nn.Linear]]:
        """``(name inside the block, linear)`` in execution order, skipped names removed."""
        if self.linears is None:
            from hiq.model import block_linears

            found = block_linears(block)
        else:
            modules = dict(block.named_modules())
            found = []
            for entry in self.linears:
                names = sorted((n for n in modules if fnmatch.fnmatchcase(n, entry)), key=_natural) \
                    if "*" in entry else [entry]
                for name in names:
                    mod = modules.get(name)
                    if not isinstance(mod, nn.Linear):
                        raise ValueError(f"layout {self.model_type!r}: block has no nn.Linear {name!r} "
                                         f"(found {type(mod).__name__ if mod is not None else 'nothing'}); fix "
                                         f"hiq.layouts.LAYOUTS[{self.model_type!r}].linears")
                    found.append((name, mod))
        return [(n, m) for n, m in found if not any(fnmatch.fnmatchcase(n, s) for s in self.skip)]

    def linears_of(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        """``(full module name, linear)`` of every quantized linear of every block, block by block."""
        path = self.blocks_path(model)
        return [(f"{path}.{i}.{name}", lin) for i, block in enumerate(self.blocks_of(model))
                for name, lin in self.block_linears(block)]

    def layer_infos(self, model: nn.Module):
        """Solver view (:class:`LayerInfo`): full name, block index, parameter count, in order."""
        path = self.blocks_path(model)
        return [LayerInfo(f"{path}.{i}.{name}", i, lin.weight.numel())
                for i, block in enumerate(self.blocks_of(model)) for name, lin in self.block_linears(block)]

    def full_name(self, model: nn.Module, block: int, name: str) -> str:
        return f"{self.blocks_path(model)}.{block}.{name}"

    def block_part(self, values: dict, model: nn.Module, block: int) -> dict:
        """``{name inside block b: value}`` from a dict keyed by full module names (scores, ratios)."""
        prefix = f"{self.blocks_path(model)}.{block}."
        return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


_LLAMA_LIKE = ModelLayout(
    "llama", blocks="model.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

LAYOUTS: dict[str, ModelLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": ModelLayout("mistral", _LLAMA_LIKE.blocks, _LLAMA_LIKE.linears),
    "qwen2": ModelLayout("qwen2", _LLAMA_LIKE.blocks, _LLAMA_LIKE.linears),
    "qwen3": ModelLayout("qwen3", _LLAMA_LIKE.blocks, _LLAMA_LIKE.linears),
    "gemma": ModelLayout("gemma", _LLAMA_LIKE.blocks, _LLAMA_LIKE.linears),
    "opt": ModelLayout(
        "opt", blocks="model.decoder.layers",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    ),
    "phi3": ModelLayout(  # fused q/k/v and gate/up: one linear each
        "phi3", blocks="model.layers",
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    ),
    "mixtral": ModelLayout(  # MoE: every expert's linears; the router stays in full precision
        "mixtral", blocks="model.layers",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w3", "block_sparse_moe.experts.*.w2"),
        skip=("block_sparse_moe.gate",),
    ),
}


def register_layout(layout: ModelLayout) -> None:
    """Declare (or replace) the layout of ``layout.model_type``."""
    LAYOUTS[layout.model_type] = layout


def layout_for(model: nn.Module) -> ModelLayout:
    """The declared layout of the model's ``config.model_type``, else generic discovery."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return LAYOUTS.get(model_type) or ModelLayout(model_type or "generic")
