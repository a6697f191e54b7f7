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
    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        mat = blocks[name]
        im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=8)
        # group names on each row's first panel only: the others' would run into the panel to their left
        ax.set_yticks(range(len(groups)), groups if i % cols == 0 else [], fontsize=7)
        ax.set_xticks(range(len(mat[0]) if mat else 0))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("expert", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="mean routing weight")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def routing_heatmap_strip(heatmap: dict, title: str = ""):
    """:func:`routing_heatmaps` in one panel, for each trial's run (the replica draws one per trial): the blocks'
    group x expert matrices stacked top to bottom, the block names on the left, the groups' order (the rows of
    every block) below. One image and one set of labels: ~0.3 s at T5-base's 60 blocks, where a panel per block
    takes ~4 s (BENCHMARKS.md, "Scale"); the report keeps the panels for the trials it shows. Returns a Figure."""
    import numpy as np

    groups, blocks = heatmap["groups"], heatmap["blocks"]
    names = [b for b in blocks if blocks[b]]
    n_g = max(1, len(groups))
    mat = np.concatenate([np.asarray(blocks[b], dtype=float) for b in names]) if names else np.zeros((1, 1))
    fig, ax = plt.subplots(figsize=(4.5 + 0.2 * mat.shape[1], 1.4 + 0.1 * len(names) * max(1.0, n_g / 6)))
    im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_yticks([i * n_g + (n_g - 1) / 2 for i in range(len(names))], names, fontsize=6)
    for i in range(1, len(names)):
        ax.axhline(i * n_g - 0.5, color="white", lw=0.5)
    ax.set_xticks(range(mat.shape[1]))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel(f"expert\n(rows of each block, top to bottom: {', '.join(groups)})", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.5, label="mean routing weight")
    fig.subplots_adjust(left=0.3)  # the block names (a tight layout would cost as much as the drawing)
    if title:
        ax.set_title(title, fontsize=8)
    return fig


def score_per_method(scores: dict[str, list[float]], ylabel: str, title: str = ""):
    """One column per method (in the given order): a bar at the mean, one point per seed, a std whisker."""
    import statistics

    methods = list(scores)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(methods) + 1.5), 3.6))
    for i, m in enumerate(methods):
        vs = scores[m]
        mean = statistics.fmean(vs)
        sd = statistics.stdev(vs) if len(vs) > 1 else 0.0
        ax.bar(i, mean, width=0.6, color="C0", alpha=0.35, edgecolor="C0")
        ax.errorbar(i, mean, yerr=sd, color="C0", capsize=4, lw=1)
        offsets = [0.0] if len(vs) == 1 else [-0.18 + 0.36 * k / (len(vs) - 1) for k in range(len(vs))]
        ax.scatter([i + o for o in offsets], vs, color="C3", s=18, zorder=3, label="one seed" if i == 0 else None)
    ax.set_xticks(range(len(methods)), [f"{m}\n(n={len(scores[m])})" for m in methods], fontsize=8,
                  rotation=30 if len(methods) > 6 else 0)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if methods:
        ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def score_vs_cost(points: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str = ""):
    """Per method: its trials as faint points (cost, score), the mean with std error bars, labelled."""
    import statistics

    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for i, (m, pts) in enumerate(points.items()):
        color = f"C{i % 10}"
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.scatter(xs, ys, color=color, alpha=0.35, s=14)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        ax.errorbar(mx, my, xerr=statistics.stdev(xs) if len(xs) > 1 else 0.0,
                    yerr=statistics.stdev(ys) if len(ys) > 1 else 0.0, fmt="o", color=color, capsize=3, ms=6)
        ax.annotate(m, (mx, my), textcoords="offset points", xytext=(5, 4), fontsize=8, color=color)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, title)


def learning_curves(bands: dict[str, list[tuple[int, float, float, float, int]]], ylabel: str, title: str = "",
                    xlabel: str = "training step"):
    """Per method: the mean over seeds at each evaluated step (line) and the range over seeds (band)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (m, band) in enumerate(bands.items()):
        if not band:
            continue
        color = f"C{i % 10}"
        steps = [b[0] for b in band]
        n = max(b[4] for b in band)
        ax.plot(steps, [b[1] for b in band], color=color, lw=1.6, label=f"{m} (n={n})")
        ax.fill_between(steps, [b[2] for b in band], [b[3] for b in band], color=color, alpha=0.15, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, title, len(bands))


def specialisation_lines(mi: dict[str, dict[str, float]], title: str = ""):
    """Per method, per routed block (x, in model order): the mutual information between group and expert."""
    fig, ax = plt.subplots(figsize=(max(5.6, 0.45 * max((len(v) for v in mi.values()), default=1) + 2), 4.0))
    blocks: list[str] = []
    for v in mi.values():
        blocks += [b for b in v if b not in blocks]
    for i, (m, v) in enumerate(mi.items()):
        xs = [blocks.index(b) for b in v]
        ax.plot(xs, list(v.values()), marker="o", ms=3, lw=1.2, color=f"C{i % 10}", label=m)
    ax.set_xticks(range(len(blocks)), blocks, rotation=60, fontsize=6, ha="right")
    ax.set_ylabel("I(group; expert), nats")
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("routing block")
    return _finish(fig, ax, title, len(mi))


def _finish(fig, ax, title: str, n_series: int = 0):
    """Grid, a legend (when there are series; two columns past six), the title, tight layout."""
    ax.grid(alpha=0.3)
    if n_series:
        ax.legend(fontsize=7, ncol=2 if n_series > 6 else 1)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def sensitivity_plot(param: str, rows: list[dict], points: list[tuple[str, float]], ylabel: str, title: str = ""):
    """Score against one varied hyper-parameter: each seed as a point, the mean with its 95% CI per value."""
    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    values = sorted({r["value"] for r in rows}, key=key)
    by = {r["value"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(values) + 2), 3.8))
    xs = range(len(values))
    for x, v in zip(xs, values):
        r = by[v]
        ys = [s for val, s in points if val == v and s is not None]
        ax.scatter([x] * len(ys), ys, color="C3", s=14, alpha=0.6, zorder=3)
        if r["mean"] is not None:
            lo, hi = r["ci"]
            err = [[r["mean"] - lo], [hi - r["mean"]]] if lo is not None else None
            ax.errorbar(x, r["mean"], yerr=err, fmt="o", color="C0", capsize=4, ms=6)
    ax.set_xticks(list(xs), values, fontsize=8, rotation=30 if len(values) > 5 else 0)
    ax.set_xlabel(param)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, title)


def cd_diagram(ranks: dict[str, float], cliques: list[list[str]], cd: float | None = None, title: str = ""):
    """Critical-difference diagram (Demsar 2006, sec. 3.2.4, Fig. 1-2): the methods' average ranks on an axis
    (1 = best, left), each method's name joined to its rank, the better half on the left, the rest on the
    right; a thick bar under the axis joins each clique of methods no two of which differ significantly;
    ``cd`` (Nemenyi's critical difference) drawn as a scale bar above the axis. Drawn by hand: no maintained
    CD-diagram package (scikit-posthocs, autorank, Orange) is a dependency here. Returns a Figure."""
    methods = sorted(ranks, key=lambda m: (ranks[m], m))
    k, half = len(methods), (len(methods) + 1) // 2
    lines_y = [-(0.55 + 0.22 * len(cliques) + 0.38 * row) for row in range(max(half, k - half))]
    fig, ax = plt.subplots(figsize=(7.0, 1.4 + 0.3 * (len(lines_y) + len(cliques))))
    ax.set_xlim(1, max(k, 2))
    ax.set_ylim(lines_y[-1] - 0.3, 0.9)
    ax.axis("off")
    ax.plot([1, max(k, 2)], [0, 0], color="k", lw=1)
    for r in range(1, max(k, 2) + 1):
        ax.plot([r, r], [0, 0.1], color="k", lw=1)
        ax.text(r, 0.16, str(r), ha="center", va="bottom", fontsize=8)
    for r in [r + 0.5 for r in range(1, max(k, 2))]:
        ax.plot([r, r], [0, 0.05], color="k", lw=0.6)
    if cd is not None:
        ax.plot([1, 1 + cd], [0.62, 0.62], color="k", lw=1.5)
        for x in (1, 1 + cd):
            ax.plot([x, x], [0.57, 0.67], color="k", lw=1.5)
        ax.text(1 + cd / 2, 0.7, f"CD (Nemenyi) = {cd:.2f}", ha="center", va="bottom", fontsize=7)
    for i, m in enumerate(methods):
        left = i < half
        y = lines_y[i if left else k - 1 - i]
        edge = 1 - 0.04 * k if left else max(k, 2) + 0.04 * k
        ax.plot([ranks[m], ranks[m], edge], [0, y, y], color="k", lw=0.8, clip_on=False)
        ax.text(edge - 0.02 * k if left else edge + 0.02 * k, y, f"{m} ({ranks[m]:.2f})",
                ha="right" if left else "left", va="center", fontsize=8, clip_on=False)
    for j, group in enumerate(cliques):
        y = -(0.3 + 0.22 * j)
        ax.plot([ranks[group[0]] - 0.03, ranks[group[-1]] + 0.03], [y, y], color="C3", lw=3.5,
                solid_capstyle="round")
    if title:
        ax.set_title(title, fontsize=10)
    return fig
