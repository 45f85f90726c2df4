"""Weights in host memory, one layer at a time on the device: the stages that run the whole model (Fisher, the
end-to-end tuning, evaluation) on a model larger than the device (``model.offload``).

M and the block fits already hold one block on the device. Fisher (a backward through every block), the tuning (a
backward through every block's scaled codes) and the evaluation (a forward through every block) otherwise put the
whole model on the device: LLaMA-2-70B's 138 GB of bf16 weights do not fit one 80 GB GPU. With offloading, the
block linears' weights stay in host memory and each is copied to the device when it is used — in the forward, and
again in the backward, which saves the *host* tensor, never the device copy — so the device holds the embedding,
the head, the norms, the activations and one layer's weight at a time. The price is the copies: every block weight
crosses the bus once per forward and once per backward (70B at ~25 GB/s: ~6 s per forward, ~11 s per
forward+backward of one batch).

``offload=None`` (``auto``) offloads on a CUDA device when the weights take more than :data:`AUTO_FRACTION` of its
memory; ``True`` offloads on any device (on the CPU it is the same code path with nothing to copy: what the tests
run); ``False`` never.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from hiq.model import LOW_PRECISION, linear

#: ``offload=None`` offloads when the model's weights take more than this share of the device's memory (the rest
#: is for activations, the Fisher accumulators, the tuning's optimizer state and the teacher's logits)
AUTO_FRACTION = 0.5


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def should_offload(option: bool | None, model: nn.Module, device: torch.device | str) -> bool:
    """Whether the whole-model stages keep the block weights in host memory (see the module doc)."""
    device = torch.device(device)
    if device.type != "cuda":
        return bool(option)
    total, need = torch.cuda.get_device_properties(device).total_memory, model_bytes(model)
    if option is False and need > total:
        raise ValueError(f"the model's weights take {need / 2**30:.1f} GiB, more than the {total / 2**30:.1f} GiB of "
                         f"{device}: Fisher, tuning and evaluation would run out of device memory; set "
                         f"--model.offload=true (or leave it unset: auto) to keep the block weights in host memory")
    return bool(option) if option is not None else need > AUTO_FRACTION * total


class _HostWeightLinear(torch.autograd.Function):
    """``linear(x, weight, bias)`` with ``weight`` in host memory: copied to ``x``'s device for the product, and
    again in the backward; the graph keeps the host tensor only. No gradient for ``weight`` (it is frozen in every
    stage that offloads); ``bias`` (small) lives on the device."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return linear(x, weight.to(x.device, non_blocking=True), bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        w = weight.to(grad.device, non_blocking=True)
        if grad.device.type == "cpu" and w.dtype in LOW_PRECISION:  # as hiq.model.linear: float32 on CPUs
            gx = (grad.float() @ w.float()).to(grad.dtype)
        else:
            gx = grad @ w.to(grad.dtype)
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return gx, None, gb


def _host_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _HostWeightLinear.apply(x, self._hiq_host_weight, self.bias)


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str, host_linears: Iterable[nn.Linear] = ()) -> Iterator[None]:
    """While active, ``model`` is on ``device``, except the weights of ``host_linears``, which stay in host memory
    and are copied to the device at each use (see the module doc); the linears' ``weight`` is then an empty tensor
    of its dtype. On exit every weight is back in place and the model on the CPU, where the stages keep it."""
    linears = [lin for lin in host_linears if "forward" not in lin.__dict__]
    for lin in linears:
        lin._hiq_host_weight = lin.weight.data.to("cpu")
        lin.weight.data = torch.empty(0, dtype=lin.weight.dtype)
        lin.forward = types.MethodType(_host_forward, lin)
    try:
        model.to(device)
        yield
    finally:
        model.to("cpu")
        for lin in linears:
            lin.__dict__.pop("forward", None)
            lin.weight.data = lin.__dict__.pop("_hiq_host_weight")
