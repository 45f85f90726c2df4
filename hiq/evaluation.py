"""Scoring a model: perplexity per dataset (:mod:`hiq.perplexity`) and zero-shot accuracy (:mod:`hiq.zeroshot`),
one path for ``hiq fit``'s evaluation stage and for ``hiq eval`` / :func:`hiq.evaluate`.

Both callers run the same loop; they differ only in what they keep: the fit's evaluation stage passes a
:class:`Store` over ``eval/<name>.json`` in the run directory (a kept result is reused while the weights and the
settings stay), ``hiq eval`` none.
"""

from __future__ import annotations

import contextlib

from hiq.schedules import info


class Store:
    """Where results are kept: ``get(name, parts)`` is the kept result of ``name`` computed under ``parts`` (the
    settings it depends on) or None; ``put(name, parts, result)`` keeps it and returns what is kept. This one keeps
    nothing."""

    def get(self, name: str, parts: dict) -> dict | None:
        return None

    def put(self, name: str, parts: dict, result: dict) -> dict:
        return result


def perplexities(model, tokenizer, options, store: Store | None = None, *, float32_linears: bool = True,
                 progress: bool = False, prefix: str = "[hiq]") -> dict[str, dict]:
    """``{dataset key: result}`` (:meth:`hiq.perplexity.PerplexityResult.to_dict`) for each of
    ``options.datasets`` (:class:`hiq.recipe.EvaluationOptions`). ``float32_linears``: bf16/fp16 linears on a CPU
    compute in float32 (:func:`hiq.model.float32_cpu_linears`; what the fit's stages do)."""
    from hiq.model import float32_cpu_linears
    from hiq.perplexity import dataset_key, evaluate_dataset

    store = store or Store()
    results = {}
    for name in options.datasets:
        key, parts = dataset_key(name), {"dataset": name, "seqlen": options.seqlen, "max_windows": options.max_windows}
        kept = store.get(key, parts)
        if kept is not None:
            info(f"{prefix} {name}: ppl {kept['ppl']:.3f} (reused)")
        else:
            with float32_cpu_linears(model) if float32_linears else contextlib.nullcontext():
                res = evaluate_dataset(model, tokenizer, name, seqlen=options.seqlen, max_windows=options.max_windows,
                                       batch_size=options.batch_size, progress=progress)
            info(f"{prefix} {name} ({res.split}): ppl {res.ppl:.3f} [{res.windows} windows, {res.seconds:.1f}s]")
            kept = store.put(key, parts, res.to_dict())
        results[key] = kept
    return results


def zeroshot(model, tokenizer, options, store: Store | None = None, prefix: str = "[hiq]") -> dict:
    """lm-eval on the in-memory model for ``options.tasks``: per task its metrics, their average, the limit, the
    lm-eval version, the protocol and the seconds. Each task's result is kept on its own (``zeroshot_<task>``);
    the tasks without a kept result are scored together in one lm-eval call."""
    from hiq.zeroshot import PROTOCOL, REPORTED, evaluate_zeroshot, format_zeroshot, lm_eval_version

    store = store or Store()
    tasks, version = list(options.tasks), lm_eval_version()
    parts = {"limit": options.limit, "lm_eval_version": version}
    kept = {task: store.get(f"zeroshot_{task}", parts) for task in tasks}
    missing = [task for task in tasks if kept[task] is None]
    if missing:
        limit = f" (limit {options.limit})" if options.limit else ""
        info(f"{prefix} zero-shot {','.join(missing)}{limit}")
        res = evaluate_zeroshot(model, tokenizer, missing, limit=options.limit, batch_size=options.zeroshot_batch_size)
        for task in missing:
            kept[task] = store.put(f"zeroshot_{task}", parts,
                                   {**res["tasks"][task], "seconds": res["seconds"] / len(missing)})
    per_task = {t: {k: v for k, v in kept[t].items() if k not in ("key", "seconds", "checksum")} for t in tasks}
    result = {"tasks": per_task, "average": sum(per_task[t][REPORTED[t]] for t in tasks) / len(tasks),
              "limit": options.limit, "lm_eval_version": version, "protocol": PROTOCOL,
              "seconds": round(sum(kept[t]["seconds"] for t in tasks), 2)}
    info(f"{prefix} zero-shot: {format_zeroshot(result)} [{result['seconds']:.1f}s]" + ("" if missing else " (reused)"))
    return result
