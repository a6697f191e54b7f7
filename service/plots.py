"""Figures of the MLflow record and the reports (matplotlib, headless)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def routing_heatmaps(heatmap: dict, title: str = ""):
    """One panel per block: group (task or domain) x expert, mean routing weight. Returns a Figure."""
    groups, blocks = heatmap["groups"], heatmap["blocks"]
    names = list(blocks)
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.35 * len(groups) * rows + 1.2 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        mat = blocks[name]
        im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=8)
        ax.set_yticks(range(len(groups)), groups, fontsize=7)
        ax.set_xticks(range(len(mat[0]) if mat else 0))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("expert", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="mean routing weight")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
