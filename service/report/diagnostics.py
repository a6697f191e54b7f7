"""What the report computes from a sweep's records beyond the score tables: routing specialisation per block
(mutual information between group and expert), learning curves over seeds, and the sensitivity of the score
to each hyper-parameter a declaration varies. Pure functions on plain data; the report reads MLflow.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from service.report.stats import summarize


def mutual_information(heatmap: Sequence[Sequence[float]]) -> float:
    """I(group; expert) in nats of one block's group x expert mean-routing matrix (rows: groups).

    Each row is p(expert | group) (the mean routing weight of the group's examples; rows sum to 1) and the
    groups are weighted equally, p(g) = 1/G (the heatmap keeps no per-group counts; the offline data and
    DomainNet's validation/test splits per domain are of similar sizes). p(e) = mean_g p(e | g);
    I = sum_g p(g) sum_e p(e|g) ln(p(e|g) / p(e)). 0 = the routing ignores the group; ln(min(G, E)) at most
    (one expert per group).
    """
    rows = [[max(float(v), 0.0) for v in r] for r in heatmap]
    rows = [[v / s for v in r] if (s := sum(r)) > 0 else r for r in rows]
    g = len(rows)
    if g == 0 or not rows[0]:
        return 0.0
    p_e = [sum(r[e] for r in rows) / g for e in range(len(rows[0]))]
    return sum(v * math.log(v / p_e[e]) for r in rows for e, v in enumerate(r) if v > 0) / g


def specialisation(heatmaps: Sequence[Mapping]) -> dict[str, float]:
    """Mean over trials of each block's mutual information (``heatmaps``: the trials' routing/heatmaps.json)."""
    per_block: dict[str, list[float]] = {}
    for h in heatmaps:
        for block, mat in h.get("blocks", {}).items():
            if mat and len(mat[0]) > 1:  # one expert (the dense adapters): nothing to specialise
                per_block.setdefault(block, []).append(mutual_information(mat))
    return {b: statistics.fmean(v) for b, v in per_block.items()}


def curve_band(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float, float, float, int]]:
    """Seeds' curves (step, value) -> per step: (step, mean, min, max, n) over the seeds that logged it."""
    by_step: dict[int, list[float]] = {}
    for c in curves:
        for step, v in c:
            if math.isfinite(v):
                by_step.setdefault(int(step), []).append(float(v))
    return [(s, statistics.fmean(v), min(v), max(v), len(v)) for s, v in sorted(by_step.items())]


def varied_params(params: Sequence[Mapping[str, str]], ignore: Sequence[str] = ("seed",)) -> list[str]:
    """The config keys whose value differs between trials (a sweep's hyper-parameters), ``ignore`` aside."""
    keys = sorted({k for p in params for k in p})
    return [k for k in keys if k not in ignore and len({p.get(k) for p in params}) > 1]


def sensitivity(points: Sequence[tuple[str, str, float | None]]) -> list[dict]:
    """Per value of one hyper-parameter: points are (value, seed, score) -> rows with the value, n, mean, std
    and 95% t-interval over seeds (service.report.stats), best mean first in ``rows[0]`` (ties: input order)."""
    by_value: dict[str, dict[str, float | None]] = {}
    for value, seed, score in points:
        by_value.setdefault(value, {})[seed] = score
    rows = []
    for value, scores in by_value.items():
        s = summarize(value, scores)
        rows.append({"value": value, "n": s.n, "mean": s.mean, "std": s.std, "ci": (s.ci_low, s.ci_high),
                     "note": s.note})
    return sorted(rows, key=lambda r: (r["mean"] is None, -(r["mean"] or 0.0)))
