"""Cross-task aggregates of routing methods: the setting's mean over its tasks (or domains), the interquartile
mean and the probability of improvement over a reference method, each with a stratified bootstrap interval over
seeds, and a Friedman test over tasks with Holm-corrected post-hoc tests for a critical-difference diagram.

The input is ``scores[method][task][seed] = score`` (higher is better). None and non-finite scores count as
missing (failed trials), as everywhere in the report; seeds pair by ``str(seed)`` (:mod:`service.report.stats`).
A method enters the aggregates only with at least one score on every task: an average over other tasks than
the others' would not compare; :func:`aggregates` lists the methods left out and the tasks they miss.

- **mean over tasks**: the mean over tasks of each task's mean over seeds, every task weighted equally. This is
  how the paper averages T5-GLUE's tasks (``test/average``); for ResNet-DomainNet it is the mean over the
  domains, which the pooled test accuracy over all test images (``test/accuracy``) is not.
- **IQM**, the interquartile mean (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice",
  sec. 4.3): the mean of the middle 50% of all the method's (task, seed) scores pooled,
  ``scipy.stats.trim_mean(x, 0.25)``, robust to one outlying seed or task.
- **P(method > reference)**, the probability of improvement (Agarwal et al. 2021, sec. 4.4): per task the
  Mann-Whitney U statistic over the two methods' seeds divided by n m, i.e. P(x > y) + P(x = y) / 2 for a seed
  x of the method and a seed y of the reference drawn at random; then its mean over tasks. 0.5: no difference.
- **intervals**: the stratified percentile bootstrap of Agarwal et al. 2021 (sec. 4.1): seeds are resampled with
  replacement within each task, each task independently (so tasks never mix), by ``scipy.stats.bootstrap`` with
  one sample per task (``paired=False``); for P(X > Y) the method's and the reference's seeds are resampled
  independently too. A task with fewer than 2 seeds gives no interval (``note`` says which).
- **ranks** (Demsar 2006, "Statistical comparisons of classifiers over multiple data sets", sec. 3.2.2): per
  task the methods' mean-over-seeds scores are ranked (1 = best, ties share the mean rank); the Friedman test
  over the tasks (``scipy.stats.friedmanchisquare``: at least 3 methods; at least 2 tasks here); post hoc, every
  pair's z = (R_i - R_j) / sqrt(k (k + 1) / (6 N)) with a two-sided normal p-value, Holm-corrected over the
  k (k - 1) / 2 pairs (``statsmodels`` ``multipletests(method="holm")``; all pairs: Garcia & Herrera 2008).
  As Demsar prescribes, no pair differs unless the Friedman test rejects first. The cliques (runs of methods,
  in rank order, no two of which differ) are the CD diagram's bars; Nemenyi's critical difference
  q_alpha sqrt(k (k + 1) / (6 N)) is given for reference.

The table is written as ``aggregate.tex`` (booktabs) and ``aggregate.csv`` next to ``table.tex``/``table.csv``:
its rows carry other quantities (one per method over all tasks, not one metric's statistics over seeds), so it
is its own table, as in a paper's aggregate table beside its per-task one.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from service.report.stats import _DECIMALS, _LATEX, _MD, _clean

Scores = Mapping[str, Mapping[str, Mapping[Hashable, "float | None"]]]   # method -> task -> seed -> score


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap interval (None when there is no interval; ``note`` says why)."""
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    note: str = ""


@dataclass(frozen=True)
class MethodAggregate:
    """One method over every task: its seed counts per task and the three aggregates."""
    method: str
    seeds: tuple[int, ...]              # per task, in task order
    mean: Estimate                      # mean over tasks of the mean over seeds
    iqm: Estimate
    p_improve: Estimate | None          # P(method > reference); None for the reference or without one
    rank: float | None = None           # average rank over tasks (RankTest), None without a rank test


@dataclass(frozen=True)
class PairTest:
    """Demsar's z-test of two methods' average ranks; ``p_holm`` Holm-adjusted over all pairs."""
    a: str
    b: str
    z: float
    p_value: float
    p_holm: float
    significant: bool                   # p_holm < alpha and the Friedman test rejected


@dataclass(frozen=True)
class RankTest:
    """Friedman over tasks with post-hoc pair tests; fields None/empty when not run (``note`` says why)."""
    tasks: list[str]
    ranks: dict[str, float] = field(default_factory=dict)     # method -> average rank, best first
    statistic: float | None = None
    p_value: float | None = None
    pairs: list[PairTest] = field(default_factory=list)
    cliques: list[list[str]] = field(default_factory=list)    # the CD diagram's bars, best first
    cd_nemenyi: float | None = None
    alpha: float = 0.05
    note: str = ""


def iqm(values) -> float:
    """Interquartile mean: the mean of the values left after cutting 25% from each end (scipy's trim_mean)."""
    return float(stats.trim_mean(np.asarray(values, dtype=float), 0.25))


def _poi(xs, ys, axis: int = -1):
    """Mean over tasks of P(x > y) + P(x = y) / 2; xs[k], ys[k]: task k's seeds (last axis; vectorised)."""
    per_task = []
    for x, y in zip(xs, ys):
        x, y = np.moveaxis(x, axis, -1)[..., :, None], np.moveaxis(y, axis, -1)[..., None, :]
        per_task.append((x > y).mean(axis=(-2, -1)) + 0.5 * (x == y).mean(axis=(-2, -1)))
    return np.mean(per_task, axis=0)


def probability_of_improvement(x: Mapping[str, list[float]], y: Mapping[str, list[float]]) -> float:
    """P(X > Y) of method X over method Y, averaged over the tasks of ``x`` (task -> seeds' scores, both)."""
    tasks = list(x)
    return float(_poi([np.asarray(x[t], float) for t in tasks], [np.asarray(y[t], float) for t in tasks]))


def _mean_over_tasks(*samples, axis: int = -1):
    return np.mean([s.mean(axis=axis) for s in samples], axis=0)


def _iqm_pooled(*samples, axis: int = -1):
    return stats.trim_mean(np.concatenate([np.moveaxis(s, axis, -1) for s in samples], axis=-1), 0.25, axis=-1)


def stratified_bootstrap(samples: list, statistic, level: float = 0.95, n_boot: int = 10_000,
                         seed: int = 0) -> tuple[float | None, float | None, str]:
    """Percentile interval of ``statistic(*samples, axis=-1)`` (vectorised) over resamples that draw each sample
    (a task's seeds) with replacement on its own: (low, high, "") or (None, None, why) when a sample has fewer
    than 2 values. ``scipy.stats.bootstrap`` with ``paired=False`` resamples each sample independently."""
    if any(len(s) < 2 for s in samples):
        return None, None, "1 seed in some task: no interval"
    res = stats.bootstrap([np.asarray(s, float) for s in samples], statistic, n_resamples=n_boot,
                          vectorized=True, paired=False, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high), ""


def _estimate(samples: list, statistic, level: float, n_boot: int, seed: int) -> Estimate:
    value = float(statistic(*[np.asarray(s, float) for s in samples]))
    return Estimate(value, *stratified_bootstrap(samples, statistic, level, n_boot, seed))


def clean(scores: Scores) -> tuple[list[str], dict[str, dict[str, list[float]]], dict[str, list[str]]]:
    """(tasks in first-seen order, the methods with a score on every task -> task -> its seeds' scores in the
    input's order, the methods left out -> the tasks they miss). Scores are rounded to ``_DECIMALS`` places, as
    in :mod:`service.report.stats`, so float noise (a mean of several trials at one seed) breaks no tie."""
    tasks = list(dict.fromkeys(t for per_task in scores.values() for t in per_task))
    kept, left_out = {}, {}
    for m, per_task in scores.items():
        vals = {t: [round(v, _DECIMALS) for v in _clean(f"{m}/{t}", per_task.get(t, {})).values()] for t in tasks}
        missing = [t for t in tasks if not vals[t]]
        if missing:
            left_out[m] = missing
        else:
            kept[m] = vals
    return tasks, kept, left_out


def rank_test(means: Mapping[str, Mapping[str, float]], tasks: list[str], alpha: float = 0.05) -> RankTest:
    """Friedman test over ``tasks`` of the methods' mean-over-seeds scores (``means[method][task]``), Demsar's
    post-hoc z-tests of every pair with Holm's correction, the CD diagram's cliques and Nemenyi's CD."""
    from statsmodels.stats.multitest import multipletests

    methods, k, n = list(means), len(means), len(tasks)
    if n < 2:
        return RankTest(tasks, alpha=alpha, note=f"{n} task{'' if n == 1 else 's'}: no ranks over tasks "
                                                 "(the Friedman test needs at least 2)")
    if k < 3:
        return RankTest(tasks, alpha=alpha, note=f"{k} method{'' if k == 1 else 's'} with a score on every task:"
                                                 " the Friedman test needs at least 3")
    table = np.round([[means[m][t] for m in methods] for t in tasks], _DECIMALS)       # (N tasks, k methods)
    ranks = np.mean([stats.rankdata(-row) for row in table], axis=0)                    # 1 = best
    order = sorted(range(k), key=lambda i: (ranks[i], methods[i]))
    avg = {methods[i]: float(ranks[i]) for i in order}
    if all(np.ptp(row) == 0 for row in table):
        return RankTest(tasks, avg, alpha=alpha, cliques=[[methods[i] for i in order]],
                        note="every task ties all methods: the Friedman statistic is undefined")
    stat, p = stats.friedmanchisquare(*table.T)
    se = math.sqrt(k * (k + 1) / (6 * n))
    ij = [(a, b) for x, a in enumerate(order) for b in order[x + 1:]]
    z = np.array([(ranks[a] - ranks[b]) / se for a, b in ij])
    p_pair = 2 * stats.norm.sf(np.abs(z))
    reject, p_holm, _, _ = multipletests(p_pair, alpha=alpha, method="holm")
    friedman = p < alpha
    pairs = [PairTest(methods[a], methods[b], float(zz), float(pp), float(ph), bool(r and friedman))
             for (a, b), zz, pp, ph, r in zip(ij, z, p_pair, p_holm, reject)]
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    note = "" if friedman else f"Friedman p >= {alpha}: no pair is tested as different (Demsar 2006)"
    return RankTest(tasks, avg, float(stat), float(p), pairs, cliques(list(avg), pairs), float(q * se), alpha, note)


def cliques(ranked: list[str], pairs: list[PairTest]) -> list[list[str]]:
    """Maximal runs of consecutive methods (in rank order) no two of which differ significantly, longer than
    one: the bars of a CD diagram."""
    differ = {frozenset((p.a, p.b)) for p in pairs if p.significant}
    out, reach = [], -1
    for i in range(len(ranked)):
        j = i
        while j + 1 < len(ranked) and not any(frozenset((ranked[h], ranked[j + 1])) in differ
                                              for h in range(i, j + 1)):
            j += 1
        if j > i and j > reach:
            out.append(ranked[i:j + 1])
            reach = j
    return out


def aggregates(scores: Scores, reference: str | None, level: float = 0.95, n_boot: int = 10_000,
               alpha: float = 0.05, seed: int = 0) -> tuple[list[MethodAggregate], RankTest, dict[str, list[str]]]:
    """Every complete method's aggregates (input order; P(> ``reference``) for all but the reference, when it
    is complete), the rank test over tasks, and the methods left out with the tasks they miss. Each bootstrap
    restarts from ``seed``, so a method's interval does not depend on the others."""
    if not (0 < level < 1 and 0 < alpha < 1) or n_boot < 1:
        raise ValueError(f"level and alpha must lie in (0, 1) and n_boot be >= 1; got {level}, {alpha}, {n_boot}")
    tasks, kept, left_out = clean(scores)
    if not tasks:
        return [], RankTest([], alpha=alpha, note="no task has a score"), {m: [] for m in scores}
    ref = kept.get(reference) if reference is not None else None
    ranks = rank_test({m: {t: float(np.mean(v[t])) for t in tasks} for m, v in kept.items()}, tasks, alpha)
    out = []
    for m, v in kept.items():
        samples = [v[t] for t in tasks]
        poi = None
        if ref is not None and m != reference:
            poi = _estimate(samples + [ref[t] for t in tasks],
                            lambda *s, axis=-1: _poi(s[:len(tasks)], s[len(tasks):], axis), level, n_boot, seed)
        out.append(MethodAggregate(m, tuple(len(s) for s in samples),
                                   _estimate(samples, _mean_over_tasks, level, n_boot, seed),
                                   _estimate(samples, _iqm_pooled, level, n_boot, seed), poi, ranks.ranks.get(m)))
    return out, ranks, left_out


# ---------------------------------------------------------------------------------------------------
# the table: one row per method; markdown, LaTeX (booktabs) and CSV

def _cells(rows: list[MethodAggregate], reference: str | None, scale: float, level: float, kind: str,
           style: dict) -> tuple[list, list]:
    esc, none, gt = style["esc"], style["none"], style.get("gt", ">")
    ci = esc(f"[{100 * level:g}% CI]")

    def est(e: Estimate | None, s: float, digits: int) -> str:
        if e is None or e.value is None:
            return none
        ci = "" if e.ci_low is None else f" [{e.ci_low * s:.{digits}f}, {e.ci_high * s:.{digits}f}]"
        return f"{e.value * s:.{digits}f}{ci}"

    head = ["method", f"seeds/{esc(kind)}", f"mean over {esc(kind)}s {ci}", f"IQM {ci}",
            f"P({gt} {esc(reference or 'reference')}) {ci}", "avg. rank"]
    body = []
    for r in rows:
        seeds = str(r.seeds[0]) if len(set(r.seeds)) == 1 else f"{min(r.seeds)}-{max(r.seeds)}"
        poi = "(reference)" if r.method == reference else est(r.p_improve, 1.0, 3)
        body.append([esc(r.method), seeds, est(r.mean, scale, 2), est(r.iqm, scale, 2), poi,
                     none if r.rank is None else f"{r.rank:.2f}"])
    return head, body


def format_markdown(rows: list[MethodAggregate], reference: str | None, scale: float = 100.0,
                    level: float = 0.95, kind: str = "task") -> str:
    """Markdown: mean over tasks and IQM x ``scale``, P(> reference) as a probability, each [its interval];
    ``kind``: what a task is called in the header (domain, task)."""
    head, body = _cells(rows, reference, scale, level, kind, _MD)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *["| " + " | ".join(r) + " |" for r in body]])


def to_latex_booktabs(rows: list[MethodAggregate], reference: str | None, scale: float = 100.0,
                      level: float = 0.95, kind: str = "task") -> str:
    """The same table as a booktabs tabular."""
    head, body = _cells(rows, reference, scale, level, kind, {**_LATEX, "gt": "$>$"})
    return "\n".join([r"\begin{tabular}{lrlllr}", r"\toprule", " & ".join(head) + r" \\", r"\midrule",
                      *[" & ".join(r) + r" \\" for r in body], r"\bottomrule", r"\end{tabular}"])


def to_csv(rows: list[MethodAggregate], reference: str | None) -> str:
    """The same rows with raw numbers (not x100, full precision, empty when missing)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "seeds_per_task", "mean", "mean_ci_low", "mean_ci_high", "iqm", "iqm_ci_low",
                "iqm_ci_high", "reference", "p_improve", "p_improve_ci_low", "p_improve_ci_high", "avg_rank", "note"])
    for r in rows:
        p = r.p_improve or Estimate(None)
        notes = "; ".join(dict.fromkeys(e.note for e in (r.mean, r.iqm, p) if e.note))
        w.writerow(["" if v is None else v for v in
                    [r.method, " ".join(map(str, r.seeds)), r.mean.value, r.mean.ci_low, r.mean.ci_high, r.iqm.value,
                     r.iqm.ci_low, r.iqm.ci_high, reference, p.value, p.ci_low, p.ci_high, r.rank, notes]])
    return buf.getvalue()
