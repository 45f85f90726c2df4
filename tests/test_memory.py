"""Host memory: the fit's peak estimated from the checkpoint's shapes, and a model too large refused before it
loads (hiq.checks.check_host_memory)."""

import pytest

from hiq.checks import FIT_BASE_BYTES, FIT_BYTES_PER_BLOCK_WEIGHT, UserError, check_host_memory, estimate_fit_memory
from hiq.model import resolve_model_path


def test_fit_memory_estimate_follows_the_checkpoint_shapes(tiny):
    model, _ = tiny
    folder = resolve_model_path("tiny-llama")
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    est = estimate_fit_memory(folder, 4, block_on_host=True)
    assert est["model_bytes"] == 4 * params and est["block_weights"] == block
    assert est["peak_bytes"] == 4 * params + FIT_BYTES_PER_BLOCK_WEIGHT * block + FIT_BASE_BYTES
    assert estimate_fit_memory(folder, 2, block_on_host=False)["peak_bytes"] == 2 * params + FIT_BASE_BYTES
    assert estimate_fit_memory("meta-llama/Llama-2-7b-hf", 2) is None  # a hub id: nothing to read, no estimate


def test_a_model_too_large_for_the_host_is_refused_before_loading(tiny, monkeypatch):
    folder = resolve_model_path("tiny-llama")
    need = estimate_fit_memory(folder, 4)["peak_bytes"]
    check_host_memory(folder, 4, True, available=need)  # exactly enough: passes
    with pytest.raises(UserError, match=r"needs about 1\.0 GiB of host memory.*0\.5 GiB is available.*bfloat16"):
        check_host_memory(folder, 4, True, available=2**29)
    monkeypatch.setenv("HIQ_SKIP_MEMORY_CHECK", "1")
    check_host_memory(folder, 4, True, available=0)
