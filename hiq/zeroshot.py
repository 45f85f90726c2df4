"""Zero-shot accuracy through EleutherAI's lm-eval (the optional extra ``hiq[eval]``) on bundled local data.

The five tasks of the paper's Table 2 are lm-eval task definitions in ``hiq/tasks/`` that read
``data/zeroshot/`` (no download). The model is handed to lm-eval in memory (``HFLM(pretrained=<model>)``),
so a quantized model is scored as it is, without an export round trip.

Protocol (lm-eval's multiple-choice defaults, ``data/zeroshot/README.md``): 0-shot, no system prompt; each
choice scored as the log-likelihood of its tokens given the task's standard prompt; ``acc`` = argmax of the
sum, ``acc_norm`` = argmax of the sum divided by the choice's length in bytes. The average is over each task's
usual headline metric (``REPORTED``: acc for PIQA, ARC-Easy and WinoGrande, acc_norm for ARC-Challenge and
HellaSwag); both metrics are kept per task.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

TASK_DIR = Path(__file__).parent / "tasks"
TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
REPORTED = {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
            "winogrande": "acc"}
PROTOCOL = ("0-shot lm-eval multiple choice on bundled local files (hiq/tasks); acc and acc_norm (byte-length "
            "normalised); average over acc (piqa, arc_easy, winogrande) and acc_norm (arc_challenge, hellaswag); "
            "HellaSwag query approximates lm-eval's (local copy lacks ctx_b capitalisation)")


def parse_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    """``"piqa,arc_easy"``, a list, or ``all`` -> validated task names in order (empty when None/"")."""
    if tasks is None:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else [t for item in tasks for t in str(item).split(",")]
    names = [t.strip() for t in items if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; choose from {', '.join(TASKS)} (or 'all')")
    return list(dict.fromkeys(names))


def check_limit(limit: int | float | None) -> int | float | None:
    if limit is not None and (limit <= 0 or (isinstance(limit, float) and limit > 1)):
        raise ValueError(f"limit={limit!r}: give a positive number of documents per task, a fraction in (0, 1], "
                         f"or null for all")
    return limit


def lm_eval_version() -> str:
    """lm-eval's version; a clear error naming the extra when it is not installed."""
    try:
        from importlib.metadata import version

        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ValueError("zero-shot tasks need EleutherAI's lm-eval: pip install 'hiq[eval]' "
                         "(or pip install 'lm-eval>=0.4.5,<0.5')") from err
    return version("lm_eval")


def evaluate_zeroshot(model, tokenizer, tasks: Iterable[str], limit: int | float | None = None,
                      batch_size: int = 16) -> dict:
    """Score ``model`` (in memory, on its current device) on ``tasks``; returns per-task metrics and the average.

    ``limit`` scores only the first N documents of each task (or a fraction); the result says so.
    """
    names = parse_tasks(list(tasks))
    if not names:
        raise ValueError("no zero-shot tasks given")
    check_limit(limit)
    version = lm_eval_version()
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):  # keep lm-eval's per-request INFO lines out of the run's output
        logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.time()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    from unittest import mock

    import lm_eval.evaluator

    # lm-eval records the git commit of the working directory by running `git describe`, whose "fatal: not a git
    # repository" lands on the run's stderr outside a checkout; hiq records lm-eval's version instead
    with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
        out = simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=0, limit=limit,
                              log_samples=False, bootstrap_iters=1000)  # acc stderr: closed form
    model.train(was_training)
    per_task = {}
    for name in names:
        res = out["results"][name]
        row = {"n": int(out["n-samples"][name]["effective"]), "reported": REPORTED[name]}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in res:
                row[metric] = float(res[f"{metric},none"])
                stderr = res.get(f"{metric}_stderr,none")
                row[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        per_task[name] = row
    average = sum(per_task[n][REPORTED[n]] for n in names) / len(names)
    return {"tasks": per_task, "average": average, "limit": limit, "lm_eval_version": version,
            "protocol": PROTOCOL, "seconds": round(time.time() - t0, 2)}


def format_zeroshot(result: dict) -> str:
    """One line: ``piqa acc 0.5500, ... | average 0.4200 (limit 20)``."""
    parts = [f"{n} {r['reported']} {r[r['reported']]:.4f}" for n, r in result["tasks"].items()]
    limit = f" (limit {result['limit']})" if result["limit"] is not None else ""
    return ", ".join(parts) + f" | average {result['average']:.4f}{limit}"
