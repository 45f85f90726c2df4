"""Text sets for calibration and evaluation: bundled WikiText-2 and C4 sample, hub ids, the user's own files.

Every text set goes through :mod:`datasets` (local files are read with the ``text``/``json`` builders, so
``HF_DATASETS_OFFLINE=1`` is honoured and nothing touches the network for them).

Names a user can give (``dataset`` in configs):

``wikitext2``
    Bundled WikiText-2. ``test`` and ``validation`` are the official raw files; ``train`` is the official
    *tokens* variant (``wiki.train.tokens``, rare words shown as ``<unk>``): the raw train file is not
    bundled, so calibration on "wikitext2 train" here sees ``<unk>`` where the raw file has the word.
``c4``
    Bundled sample of 2,000 C4-en validation documents (not the standard ``c4-validation.00000`` shard,
    so numbers on it are *C4-sample* perplexities, not comparable with published C4 numbers). Split
    ``validation`` = documents 0-1099 (scored "c4-new" style: joined with one space), split ``train`` =
    documents 1100-1999 (disjoint, usable for calibration).
``<hub id>`` or ``<hub id>:<config>``
    Anything :func:`datasets.load_dataset` accepts (``wikitext:wikitext-2-raw-v1``), field ``text``.
    Needs a network or a filled cache.
``<path>``
    A ``.txt``/``.txt.gz`` file (each file one document) or ``.jsonl``/``.json``(``.gz``) file with a
    ``text`` field (one document per record); several paths may be joined with ``,``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("HIQ_DATA_DIR", REPO_ROOT / "data"))

BUNDLED = {
    "wikitext2": {
        "train": "wikitext2/wiki.train.tokens.gz",
        "validation": "wikitext2/wiki.valid.raw.gz",
        "test": "wikitext2/wiki.test.raw.gz",
    },
    "c4": {"validation": "c4/c4_validation_2k.jsonl.gz", "train": "c4/c4_validation_2k.jsonl.gz"},
}
C4_EVAL_DOCS = 1100  # "c4-new" protocol: the first 1,100 documents, joined with " "
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
JSON_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """Bad dataset name, split or content; the message says what was wrong and what is allowed."""


@dataclass(frozen=True)
class TextSet:
    """Rows of one split and the string the evaluation protocol tokenises (rows joined by ``joiner``)."""

    name: str
    split: str
    rows: tuple[str, ...]
    joiner: str
    note: str = ""

    @property
    def text(self) -> str:
        return self.joiner.join(self.rows)


def _bundled_path(rel: str) -> Path:
    path = DATA_DIR / rel
    if not path.is_file():
        raise DataError(
            f"bundled data file {path} is missing; set HIQ_DATA_DIR to the folder holding "
            f"wikitext2/ and c4/ (the repository's data/), or reinstall hiq from a full checkout"
        )
    return path


def _strip_compression(path: Path) -> str:
    name = path.name.lower()
    for comp in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    return name


@contextlib.contextmanager
def quiet_datasets():
    """No "Generating data split" progress bars for local files (reading them takes a moment, not minutes)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _load_local_files(paths: list[Path]) -> list[str]:
    import datasets

    kinds = set()
    for path in paths:
        if not path.is_file():
            raise DataError(f"dataset file {str(path)!r} does not exist")
        base = _strip_compression(path)
        if base.endswith(JSON_SUFFIXES):
            kinds.add("json")
        elif base.endswith(TEXT_SUFFIXES):
            kinds.add("text")
        else:
            raise DataError(
                f"dataset file {str(path)!r} has an unknown type; use .txt/.raw/.tokens (plain text) or "
                f".jsonl/.json with a 'text' field (optionally .gz)"
            )
    if len(kinds) > 1:
        raise DataError(f"dataset files {[str(p) for p in paths]} mix text and json; give one kind")
    files = [str(p) for p in paths]
    if kinds == {"json"}:
        with quiet_datasets():
            ds = datasets.load_dataset("json", data_files={"data": files}, split="data")
        if "text" not in ds.column_names:
            raise DataError(f"json dataset {files} has no 'text' field (fields: {ds.column_names})")
    else:
        with quiet_datasets():
            ds = datasets.load_dataset("text", data_files={"data": files}, split="data", sample_by="document")
    return list(ds["text"])


@functools.lru_cache(maxsize=16)
def load_text(name: str, split: str = "test") -> TextSet:
    """Load one split of a named, hub or local text set (see the module docstring)."""
    split = SPLIT_ALIASES.get(split, split)
    if name in BUNDLED:
        splits = BUNDLED[name]
        if split not in splits:
            raise DataError(f"dataset {name!r} has no split {split!r}; choose one of {sorted(splits)}")
        path = _bundled_path(splits[split])
        if name == "wikitext2":
            import datasets

            with quiet_datasets():
                ds = datasets.load_dataset(
                    "text", data_files={split: str(path)}, split=split, keep_linebreaks=True
                )
            # The HF "wikitext" rows: each line with its "\n", blank lines as "", as the hub dataset stores them.
            rows = tuple(r if r.strip() else "" for r in ds["text"])
            note = "official <unk> tokens variant (raw train not bundled)" if split == "train" else ""
            text_set = TextSet(name, split, rows, "\n\n", note)
        else:  # c4 sample
            docs = _load_local_files([path])
            docs = docs[:C4_EVAL_DOCS] if split == "validation" else docs[C4_EVAL_DOCS:]
            note = "local 2k-document C4-en validation sample, not the standard shard"
            text_set = TextSet(name, split, tuple(docs), " ", note)
    elif _looks_like_path(name):
        paths = [Path(p).expanduser() for p in name.split(",") if p]
        text_set = TextSet(name, split, tuple(_load_local_files(paths)), "\n\n", "local files")
    else:
        text_set = _load_hub(name, split)
    if not any(r.strip() for r in text_set.rows):
        raise DataError(f"dataset {name!r} split {split!r} holds no text (0 non-empty rows)")
    return text_set


def _looks_like_path(name: str) -> bool:
    first = name.split(",")[0]
    return (
        first.startswith((".", "/", "~"))
        or Path(first).expanduser().exists()
        or _strip_compression(Path(first)).endswith(TEXT_SUFFIXES + JSON_SUFFIXES)
    )


def _load_hub(name: str, split: str) -> TextSet:
    import datasets

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as err:  # datasets raises many types; say what was asked and what is bundled
        raise DataError(
            f"could not load dataset {name!r} split {split!r} from the hub ({type(err).__name__}: {err}). "
            f"Bundled names: {sorted(BUNDLED)}; or pass a path to .txt/.jsonl files"
        ) from err
    if "text" not in ds.column_names:
        raise DataError(f"hub dataset {name!r} has no 'text' field (fields: {ds.column_names})")
    rows = tuple(r if r.strip() else "" for r in ds["text"])
    return TextSet(name, split, rows, "\n\n", "hub")


def tokenize_text(tokenizer, text_set: TextSet) -> torch.Tensor:
    """Tokenise the joined text once (one BOS at the start, as the protocol does); 1-D int64 tensor."""
    return tokenizer(text_set.text, return_tensors="pt", verbose=False)["input_ids"][0]


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[i*seqlen, (i+1)*seqlen)``; the short tail is dropped. (n, seqlen)."""
    if seqlen < 2:
        raise DataError(f"seqlen={seqlen} is too short; it must be at least 2 tokens")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random ``seqlen`` windows of a token stream, GPTQ/OmniQuant style, seeded. (n, seqlen)."""
    if nsamples < 1:
        raise DataError(f"nsamples={nsamples} must be at least 1")
    if ids.numel() <= seqlen + 1:
        raise DataError(f"calibration text has {ids.numel()} tokens; it needs more than seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])
