"""Shared fixtures: offline by construction, the bundled trained tiny LLaMA, real bundled text."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise RuntimeError(f"test tried to reach the network: {address!r}")


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Every test runs with outbound connections refused: hiq must work offline."""
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the bundled trained model, float32, eval mode. Do not modify: use ``tiny_copy``."""
    from hiq.model import load_model_and_tokenizer

    return load_model_and_tokenizer("tiny-llama")


@pytest.fixture()
def tiny_copy(tiny):
    import copy

    model, tokenizer = tiny
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def wikitext_test_ids(tiny):
    from hiq.data import load_text, tokenize_text

    return tokenize_text(tiny[1], load_text("wikitext2", "test"))
