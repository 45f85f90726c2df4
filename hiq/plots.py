"""Figures of the paper, drawn from a run's artifacts: PNG files in ``<run>/plots``, sent to the logger.

* ``fisher_channels.png`` (Figure 1 analog): per-input-channel Fisher score of a few layers, channels sorted
  by score, log scale — how concentrated the impact is.
* ``ratios_by_layer.png`` (Figure 2 analog): chosen high-impact ratio per layer type (q, k, v, o, gate, up,
  down...) per block.
"""

from __future__ import annotations

from pathlib import Path


def _layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1].replace("_proj", "")


def plot_fisher(scores: dict, path: Path, layers: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = layers or _spread(list(scores))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        s = scores[name].double()
        ax.plot(sorted(s.tolist(), reverse=True), label=f"{name} (max/median {float(s.max() / s.median()):.0f}x)")
    ax.set_yscale("log")
    ax.set_xlabel("input channel (sorted by score)")
    ax.set_ylabel("mean Fisher information")
    ax.set_title("Impact score per input channel")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _spread(names: list[str], n: int = 4) -> list[str]:
    """A few layers from across the model: first, last and evenly in between."""
    if len(names) <= n:
        return names
    step = (len(names) - 1) / (n - 1)
    return [names[round(i * step)] for i in range(n)]


def plot_ratios(layers: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(_layer_type(x["name"]) for x in layers))
    blocks = sorted({x["block"] for x in layers})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(types)
    for t_idx, t in enumerate(types):
        ratio = {x["block"]: x["ratio"] for x in layers if _layer_type(x["name"]) == t}
        ax.bar([b + (t_idx - (len(types) - 1) / 2) * width for b in blocks], [ratio.get(b, 0.0) for b in blocks],
               width=width, label=t)
    ax.set_xlabel("block")
    ax.set_ylabel("high-impact ratio")
    ax.set_xticks(blocks)
    ax.set_title("Chosen ratio per layer type per block")
    ax.set_ylim(0, max(x["ratio"] for x in layers) * 1.25 or 1.0)
    ax.legend(ncol=len(types), fontsize=7, loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_images(logger, files: list[Path]) -> None:
    """Send the PNG files to the run's logger where it takes images (W&B, Neptune, TensorBoard)."""
    for f in files:
        if logger is not None and hasattr(logger, "log_image"):  # W&B, Neptune...
            logger.log_image(key=f"plots/{f.stem}", images=[str(f)])
        elif logger is not None and hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            import numpy as np
            from matplotlib.image import imread

            logger.experiment.add_image(f"plots/{f.stem}", np.asarray(imread(f))[..., :3], dataformats="HWC")
