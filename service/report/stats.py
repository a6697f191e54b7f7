"""Reviewer-grade comparisons of routing methods over a few seeds: intervals, paired tests, Holm.

``compare(scores, reference)`` takes ``scores[method][seed] = score`` and returns

- one ``MethodSummary`` per method: n, mean, sample std (ddof=1) and a confidence interval of the mean,
  Student t by default or a percentile bootstrap over seeds (Efron & Tibshirani 1993, ch. 13);
- one ``PairedComparison`` per other method: the differences ``method - reference`` over the seeds both
  have, their mean and t-interval, a paired t-test (fewer than ``WILCOXON_FROM`` = 6 pairs) or a Wilcoxon
  signed-rank test (Wilcoxon 1945; zero differences dropped, scipy's default), and the p-values adjusted
  across the comparisons by Holm's step-down method (Holm 1979), ``significant`` when adjusted p < alpha.

Seeds pair by ``str(seed)``, so 3 and "3" are the same seed. None and non-finite scores count as missing
(failed trials), as in the report (service.report). Fewer than 2 seeds (pairs) give no interval (no test): the
fields are None and ``note`` says why. Differences are rounded to 12 decimal places, so float noise
neither breaks ties nor hides a zero. Differences that are all equal have zero variance: all 0 gives
p = 1 by definition (the test is not run); a nonzero constant leaves the t-test undefined (p None), while
the Wilcoxon test, which uses ranks only, stays defined and is run. Such p = None rows are not part of
the Holm family. ``format_markdown``, ``to_latex_booktabs`` and ``to_csv`` write the same main table.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats



def default_reference() -> str:
    """The method every other is compared with unless a report names one: the routing registry's default
    method (the paper's, ``smear.routing.DEFAULT_METHOD``)."""
    from smear.routing import DEFAULT_METHOD

    return DEFAULT_METHOD

WILCOXON_FROM = 6       # pairs from which the Wilcoxon signed-rank test replaces the paired t-test
TTEST, WILCOXON = "paired t", "Wilcoxon"
INTERVALS = ("t", "bootstrap")
_DECIMALS = 12          # differences are rounded to this many places: float noise (.53-.51 vs .56-.54) ties


@dataclass(frozen=True)
class MethodSummary:
    """One method over its seeds; ``std``/``ci_*`` are None below 2 seeds, ``mean`` None with none."""
    method: str
    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    note: str = ""
    interval: str = "t"
    level: float = 0.95


@dataclass(frozen=True)
class PairedComparison:
    """``method - reference`` over shared seeds; ``p_holm`` is Holm-adjusted across the comparisons."""
    method: str
    reference: str
    n_pairs: int
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    test: str | None
    p_value: float | None
    p_holm: float | None
    significant: bool
    note: str = ""
    alpha: float = 0.05
    level: float = 0.95


def _clean(method: str, scores: Mapping[Hashable, float | None]) -> dict[str, float]:
    """Seed (as str) -> finite float; None/NaN/inf dropped; two seeds with one str form are an error."""
    out: dict[str, float] = {}
    seen: dict[str, Hashable] = {}
    for seed, value in scores.items():
        if str(seed) in seen:
            raise ValueError(f"method {method!r}: seed {seed!r} given twice (as {seen[str(seed)]!r} and {seed!r})")
        seen[str(seed)] = seed
        try:
            x = math.nan if value is None else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"method {method!r}, seed {seed!r}: score {value!r} is not a number") from None
        if math.isfinite(x):
            out[str(seed)] = x
    return out


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student t-interval of the mean: mean +- t_{(1+level)/2, n-1} * s / sqrt(n), s with ddof=1."""
    x = np.asarray(values, dtype=float)
    half = stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def bootstrap_interval(values: Sequence[float], level: float = 0.95, n_boot: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean: resample the values with replacement ``n_boot`` times
    (numpy Generator seeded with ``seed``) and take the (1-level)/2 and (1+level)/2 quantiles."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(method: str, scores: Mapping[Hashable, float | None], interval: str = "t",
              level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> MethodSummary:
    """n, mean, std (ddof=1) and the ``interval`` ("t" or "bootstrap") confidence interval of the mean."""
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval {interval!r}; choose one of: {', '.join(INTERVALS)}")
    x = list(_clean(method, scores).values())
    n = len(x)
    if n < 2:
        note = "0 seeds: no data" if n == 0 else "1 seed: no interval"
        return MethodSummary(method, n, x[0] if n else None, None, None, None, note, interval, level)
    lo, hi = t_interval(x, level) if interval == "t" else bootstrap_interval(x, level, n_boot, seed)
    return MethodSummary(method, n, float(np.mean(x)), float(np.std(x, ddof=1)), lo, hi, "", interval, level)


def _pairs(method: str, scores: Mapping[Hashable, float | None], reference: str,
           ref_scores: Mapping[Hashable, float | None]):
    """The seeds both have (in ``scores``' order), both methods' clean scores, and the rounded differences."""
    a, b = _clean(method, scores), _clean(reference, ref_scores)
    shared = [s for s in a if s in b]
    return shared, a, b, np.round([a[s] - b[s] for s in shared], _DECIMALS)


def paired_differences(method: str, scores: Mapping[Hashable, float | None], reference: str,
                       ref_scores: Mapping[Hashable, float | None]) -> list[float]:
    """The differences ``method - reference`` over the seeds both have, in ``scores``' seed order, as the
    paired tests here see them (the input of :mod:`service.sequential`)."""
    return [float(v) for v in _pairs(method, scores, reference, ref_scores)[3]]


def paired(method: str, scores: Mapping[Hashable, float | None], reference: str,
           ref_scores: Mapping[Hashable, float | None], level: float = 0.95,
           alpha: float = 0.05) -> PairedComparison:
    """Differences ``method - reference`` over shared seeds: mean, t-interval, and a paired t-test
    (scipy.stats.ttest_rel) below ``WILCOXON_FROM`` pairs, else Wilcoxon signed-rank (scipy.stats.wilcoxon).
    ``p_holm``/``significant`` are left unset (None/False): ``compare`` fills them."""
    shared, a, b, d = _pairs(method, scores, reference, ref_scores)
    n = len(shared)
    base = dict(method=method, reference=reference, n_pairs=n, p_holm=None, significant=False,
                alpha=alpha, level=level)
    if n < 2:
        mean = float(d[0]) if n else None
        note = f"{n} shared seed{'' if n == 1 else 's'} with {reference}: no test"
        return PairedComparison(mean_diff=mean, ci_low=None, ci_high=None, test=None, p_value=None,
                                note=note, **base)
    lo, hi = t_interval(d, level)
    test = TTEST if n < WILCOXON_FROM else WILCOXON
    if not d.any():
        p, note = 1.0, f"all {n} differences 0: test not run, p = 1 by definition"
    elif np.ptp(d) == 0 and test == TTEST:
        p, note = None, f"all {n} differences equal ({d[0]:+.4g}): zero variance, t-test undefined, no p-value"
    elif test == TTEST:
        p, note = float(stats.ttest_rel([a[s] for s in shared], [b[s] for s in shared]).pvalue), ""
    else:
        p, note = float(stats.wilcoxon(d).pvalue), ""
    return PairedComparison(mean_diff=float(d.mean()), ci_low=lo, ci_high=hi, test=test, p_value=p,
                            note=note, **base)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjustment, in the input order: with p_(1) <= ... <= p_(m),
    adjusted p_(i) = min(1, max_{j <= i} (m - j + 1) * p_(j))."""
    m = len(p_values)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: p_values[k])):
        running = max(running, (m - rank) * p_values[i])
        out[i] = min(1.0, running)
    return out


def compare(scores: Mapping[str, Mapping[Hashable, float | None]], reference: str | None = None,
            alpha: float = 0.05, interval: str = "t", level: float = 0.95, n_boot: int = 10_000,
            seed: int = 0) -> tuple[list[MethodSummary], list[PairedComparison]]:
    """Summaries of every method (input order) and each other method against ``reference``, with the
    p-values Holm-adjusted across those comparisons that have one; ``significant`` = p_holm < alpha.
    The bootstrap of each method restarts from ``seed``, so a method's interval does not depend on the others.
    ``reference``: None = :func:`default_reference`."""
    reference = default_reference() if reference is None else reference
    if not scores:
        raise ValueError("no methods to compare: scores is empty")
    if reference not in scores:
        raise ValueError(f"unknown reference method {reference!r}; methods: {', '.join(map(str, scores))}")
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval {interval!r}; choose one of: {', '.join(INTERVALS)}")
    if not (0 < alpha < 1 and 0 < level < 1):
        raise ValueError(f"alpha and level must lie in (0, 1); got alpha={alpha}, level={level}")
    if interval == "bootstrap" and n_boot < 1:
        raise ValueError(f"n_boot must be at least 1; got {n_boot}")
    summaries = [summarize(m, s, interval, level, n_boot, seed) for m, s in scores.items()]
    comps = [paired(m, s, reference, scores[reference], level, alpha) for m, s in scores.items() if m != reference]
    tested = [i for i, c in enumerate(comps) if c.p_value is not None]
    for i, p in zip(tested, holm([comps[i].p_value for i in tested])):
        comps[i] = replace(comps[i], p_holm=p, significant=p < alpha)
    return summaries, comps


# ---------------------------------------------------------------------------------------------------
# the main table: one row per method (summaries' order); markdown, LaTeX (booktabs) and CSV

_MD = {"pm": "±", "star": "*", "lt": "<", "none": "-", "esc": lambda s: s.replace("|", "\\|")}
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX = {"pm": r"$\pm$", "star": r"$^{*}$", "lt": "$<$", "none": "--",
          "esc": lambda s: "".join(_TEX.get(ch, ch) for ch in s)}


def _cells(summaries: Sequence[MethodSummary], comparisons: Sequence[PairedComparison], digits: int,
           style: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of formatted cells shared by markdown and LaTeX (``style``: symbols, escaping)."""
    esc, pm, none = style["esc"], style["pm"], style["none"]
    num = lambda v, sign=False: none if v is None else f"{v:{'+' if sign else ''}.{digits}f}"  # noqa: E731
    pv = lambda p: none if p is None else (style["lt"] + "0.001" if p < 0.001 else f"{p:.3f}")  # noqa: E731
    level = esc(f"{100 * (summaries[0].level if summaries else 0.95):g}% CI")
    ref = esc(comparisons[0].reference if comparisons else default_reference())
    head = ["method", "seeds", f"mean {pm} sd", level, "pairs", f"diff vs {ref}", f"{level} (diff)", "test", "p",
            esc("p (Holm)")]
    by = {c.method: c for c in comparisons}
    rows = []
    for s in summaries:
        ci = none if s.ci_low is None else f"[{num(s.ci_low)}, {num(s.ci_high)}]"
        row = [esc(s.method), str(s.n), num(s.mean) if s.std is None else f"{num(s.mean)} {pm} {num(s.std)}", ci]
        c = by.get(s.method)
        if c is None:
            rows.append(row + ["", "(reference)", "", "", "", ""])
            continue
        diff = num(c.mean_diff, True) + (style["star"] if c.significant else "")
        dci = none if c.ci_low is None else f"[{num(c.ci_low, True)}, {num(c.ci_high, True)}]"
        rows.append(row + [str(c.n_pairs), diff, dci, none if c.test is None else esc(c.test), pv(c.p_value),
                           pv(c.p_holm)])
    return head, rows


def _notes(summaries: Sequence[MethodSummary], comparisons: Sequence[PairedComparison]) -> list[str]:
    return [f"{x.method}: {x.note}" for x in [*summaries, *comparisons] if x.note]


def format_markdown(summaries: Sequence[MethodSummary], comparisons: Sequence[PairedComparison],
                    digits: int = 4) -> str:
    """Markdown table; ``*`` marks a difference whose Holm-adjusted p is below alpha; notes follow."""
    head, rows = _cells(summaries, comparisons, digits, _MD)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    alpha = comparisons[0].alpha if comparisons else 0.05
    interval = summaries[0].interval if summaries else "t"
    lines += ["", f"seeds / pairs: how many seeds each mean / difference rests on; CI of the mean: {interval}; "
              f"CI of the difference: t; `*`: Holm-adjusted p < {alpha} (Holm 1979)."]
    lines += [f"- {n}" for n in _notes(summaries, comparisons)]
    return "\n".join(lines)


def to_latex_booktabs(summaries: Sequence[MethodSummary], comparisons: Sequence[PairedComparison],
                      digits: int = 4) -> str:
    """The same table as a booktabs tabular (\\toprule, \\midrule, \\bottomrule); ``$^{*}$`` marks significance."""
    head, rows = _cells(summaries, comparisons, digits, _LATEX)
    lines = [r"\begin{tabular}{lrllrrllrr}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    lines += [" & ".join(row) + r" \\" for row in rows]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])


def to_csv(summaries: Sequence[MethodSummary], comparisons: Sequence[PairedComparison]) -> str:
    """The same rows with raw numbers (full precision, empty when missing), one column per quantity."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "seeds", "mean", "std", "ci_low", "ci_high", "pairs", "mean_diff", "diff_ci_low",
                "diff_ci_high", "test", "p_value", "p_holm", "significant", "note"])
    by = {c.method: c for c in comparisons}
    for s in summaries:
        c = by.get(s.method)
        right = [None] * 8 if c is None else [c.n_pairs, c.mean_diff, c.ci_low, c.ci_high, c.test, c.p_value,
                                               c.p_holm, c.significant]
        note = "; ".join(n for n in (s.note, "reference" if c is None else c.note) if n)
        w.writerow(["" if v is None else v for v in [s.method, s.n, s.mean, s.std, s.ci_low, s.ci_high, *right, note]])
    return buf.getvalue()
