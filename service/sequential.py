"""Group-sequential comparisons of routing methods with a reference over seeds: when to stop adding seeds.

A :class:`Design` plans K looks at increasing seed counts ``seeds = (n_1 < ... < n_K)``. At each look every
comparison's paired differences (method - reference, one per seed, in the order the seeds were run; look k
uses the first n_k) are tested, and :func:`decide` gives each comparison one :data:`VERDICTS`:

- ``better`` / ``worse``: the two-sided superiority test has crossed its boundary, Holm-adjusted;
- ``equivalent``: the difference lies within the declared margin ``delta`` (two one-sided tests, TOST,
  Schuirmann 1987, each a one-sided group-sequential test at ``alpha``), Holm-adjusted;
- ``undecided``: neither, so far. A verdict, once reached, is kept at later looks; when both tests decide at
  the same look, superiority wins.

The error across the looks is spent by the Lan & DeMets (1983) O'Brien-Fleming-type function
alpha(t) = 2 - 2 Phi(z_{alpha/2} / sqrt(t)) at the information fractions t_k = n_k / n_K (the boundaries and
their numerics: :mod:`service.spending`; Jennison & Turnbull 2000).

Small seed counts (the variance is estimated): each look's t statistic, T_k with n_k - 1 degrees of
freedom, is compared with the normal boundary at the same nominal significance level, i.e. converted to the
z with the same tail probability, z_k = Phi^-1(F_{t, n_k-1}(T_k)): the "significance level approach" of
Jennison & Turnbull 2000, §3.8, which keeps each look's marginal level exact; the joint error it leaves is
measured by simulation (:mod:`service.sequential_sim`, docs/seeds.md).

Several comparisons: at each look, Holm's step-down (Holm 1979; ``statsmodels.stats.multitest.multipletests``)
runs on each comparison's repeated p-value (Jennison & Turnbull 2000, §9.2: the smallest level whose design
would have stopped by this look, :func:`service.spending.repeated_p`), once for the superiority family and once
for the equivalence family (TOST's repeated p-value is the larger of its two one-sided ones). Holm on these
p-values is the sequentially rejective procedure whose intersection tests are group-sequential Bonferroni
tests (Maurer & Bretz 2013, Stat Biopharm Res 5(4)), so each family's error is controlled at ``alpha`` across
comparisons and looks.

Planning (:func:`plan_seeds`): from a pilot's paired differences, the seeds a fixed design needs to detect
``delta`` with 80% power (paired t-test, ``statsmodels.stats.power.TTestPower``, at alpha / comparisons: Holm's
first step) and the maximum and expected seeds of the group-sequential design of the same power
(inflation factor, Jennison & Turnbull 2000, §2.5, computed numerically).

The launcher's loop (one look per call)::

    design = Design.even(plan.sequential, looks=4, first=pilot_seeds)
    decisions = decide(differences_by_method, look, design)   # look = 1, 2, ...
    target = next_seeds(decisions, look, design)              # None: stop; else run seeds up to this count
"""
from __future__ import annotations

import gc
import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from scipy.special import ndtr, ndtri, stdtr

from service import spending

DEFAULT_DELTA = 0.01    # the margin and the difference to detect: 1 point of a test metric in [0, 1] (x100 in
                        # the report); the one default of every design, plan and report section
ALPHA = 0.05            # family-wise level of each family (superiority; equivalence)
POWER = 0.8             # the planned power to detect DEFAULT_DELTA
DEFAULT_LOOKS = 4
MIN_SEEDS = 3           # pairs at the first look: a t statistic with at least 2 degrees of freedom
BETTER, WORSE, EQUIVALENT, UNDECIDED = "better", "worse", "equivalent", "undecided"
VERDICTS = (UNDECIDED, BETTER, WORSE, EQUIVALENT)     # the codes 0..3 of the arrays of decide_arrays
_DECIMALS = 12          # differences rounded as in service.report.stats: a constant difference has zero variance


@dataclass(frozen=True)
class Design:
    """K looks at cumulative paired-seed counts ``seeds``; ``alpha`` for each family; margin ``delta``."""
    seeds: tuple[int, ...]
    alpha: float = ALPHA
    delta: float = DEFAULT_DELTA

    def __post_init__(self):
        seeds = tuple(self.seeds)
        if (not seeds or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in seeds)
                or seeds[0] < 2 or any(b <= a for a, b in zip(seeds, seeds[1:]))):
            raise ValueError(f"seeds must be strictly increasing integers from at least 2; got {self.seeds!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1); got {self.alpha}")
        if not (self.delta > 0 and math.isfinite(self.delta)):
            raise ValueError(f"delta (the margin) must be a positive number; got {self.delta}")
        object.__setattr__(self, "seeds", tuple(int(n) for n in seeds))

    @classmethod
    def even(cls, max_seeds: int, looks: int = DEFAULT_LOOKS, first: int = MIN_SEEDS, alpha: float = ALPHA,
             delta: float = DEFAULT_DELTA) -> "Design":
        """``looks`` looks evenly spaced up to ``max_seeds`` (each ceil(max_seeds k / K)), the first at least
        ``first``; looks that would repeat a seed count are dropped, so a small ``max_seeds`` has fewer."""
        if looks < 1 or max_seeds < max(first, 2):
            raise ValueError(f"need looks >= 1 and max_seeds >= first >= 2; got {looks}, {max_seeds}, {first}")
        counts = [max(first, math.ceil(max_seeds * k / looks)) for k in range(1, looks + 1)]
        return cls(tuple(sorted(set(counts))), alpha, delta)

    @property
    def looks(self) -> int:
        return len(self.seeds)

    @property
    def fractions(self) -> np.ndarray:
        return np.array(self.seeds, dtype=float) / self.seeds[-1]

    @cached_property
    def bounds(self) -> np.ndarray:
        """The two-sided superiority boundaries on |z| at each look (level ``alpha``)."""
        return spending.spending_bounds(self.fractions, [self.alpha], two_sided=True)[0]

    @cached_property
    def equivalence_bounds(self) -> np.ndarray:
        """Each one-sided test of TOST: its boundaries on z at each look (level ``alpha``)."""
        return spending.spending_bounds(self.fractions, [self.alpha], two_sided=False)[0]

    @property
    def nominal(self) -> np.ndarray:
        """The nominal two-sided significance level of each look's superiority boundary: 2 Phi(-c_k)."""
        return 2 * ndtr(-self.bounds)


@dataclass(frozen=True)
class Decision:
    """One comparison (``method`` - reference) at a look."""
    method: str
    verdict: str                # one of VERDICTS
    decided_at: int | None      # the look (1-based) of the verdict; None while undecided
    n: int                      # paired differences at this look
    mean: float | None          # their mean
    p_superiority: float        # repeated p-value of the two-sided test, the least over the looks so far
    p_superiority_holm: float   # Holm-adjusted across the comparisons at this look
    p_equivalence: float        # TOST's repeated p-value: the larger of its two one-sided ones
    p_equivalence_holm: float
    note: str = ""


def _t_to_z(t, df):
    """The z with the t statistic's tail probability (Jennison & Turnbull 2000, §3.8): Phi^-1(F_t,df(t))."""
    return -ndtri(stdtr(df, -t))


def statistics(d: np.ndarray, design: Design) -> dict[str, np.ndarray]:
    """Per look, from differences ``d`` (..., N) in seed order (NaN: missing): pairs ``n``, ``mean``, ``se``, and the
    z-converted t statistics of superiority (mean / se) and of TOST's two tests ((mean + delta) / se and
    (delta - mean) / se), each (..., K). Fewer than 2 pairs or zero variance: z = 0 (no evidence)."""
    d = np.round(np.asarray(d, dtype=float), _DECIMALS)
    out = {k: np.zeros(d.shape[:-1] + (design.looks,)) for k in ("n", "mean", "se", "z", "z_low", "z_high")}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k, n_k in enumerate(design.seeds):
            x = d[..., :n_k]
            n = np.isfinite(x).sum(-1)
            mean = np.nansum(x, -1) / np.maximum(n, 1)
            var = np.nansum((x - mean[..., None]) ** 2, -1) / np.maximum(n - 1, 1)
            se = np.sqrt(var / np.maximum(n, 1))
            ok, df = (n >= 2) & (se > 0), np.maximum(n - 1, 1)
            for key, num in (("z", mean), ("z_low", mean + design.delta), ("z_high", design.delta - mean)):
                out[key][..., k] = np.where(ok, _t_to_z(num / np.where(ok, se, 1.0), df), 0.0)
            out["n"][..., k], out["mean"][..., k], out["se"][..., k] = n, np.where(n > 0, mean, np.nan), se
    return out


def repeated_p_values(stats: dict[str, np.ndarray], design: Design) -> tuple[np.ndarray, np.ndarray]:
    """The superiority and equivalence repeated p-values (..., K), each the least so far over the looks."""
    t = design.fractions
    p_sup, p_low, p_high = (np.empty_like(stats["z"]) for _ in range(3))
    for k in range(design.looks):
        p_sup[..., k] = spending.repeated_p(stats["z"][..., k], k, t, two_sided=True)
        p_low[..., k] = spending.repeated_p(stats["z_low"][..., k], k, t, two_sided=False)
        p_high[..., k] = spending.repeated_p(stats["z_high"][..., k], k, t, two_sided=False)
    least = lambda p: np.minimum.accumulate(p, axis=-1)  # noqa: E731
    return least(p_sup), np.maximum(least(p_low), least(p_high))


@contextmanager
def _holm_gc():
    """statsmodels' Holm (stats/multitest.py, 0.15) calls gc.collect() on every call: tens of ms in a process
    holding many objects. Freezing the heap first (gc.freeze) lets it scan only the new ones. Left alone when
    the caller has frozen objects of its own."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _holm(p: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Holm's rejections and adjusted p-values of one family (statsmodels). A family none of whose p-values
    is at most alpha rejects nothing (adjusted p >= raw p), so statsmodels is not called for it."""
    from statsmodels.stats.multitest import multipletests

    if p.min() > alpha:
        return np.zeros(len(p), bool), np.minimum(1.0, p * len(p))  # the values are not used for decisions
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method="holm")
    return reject, adjusted


def decide_arrays(d: np.ndarray, look: int, design: Design):
    """:func:`decide` on arrays: differences ``d`` (S, m, N) of S independent sweeps of m comparisons.
    Returns (verdict codes (S, m) indexing VERDICTS, decided_at (S, m) 1-based look or 0, statistics,
    superiority and equivalence repeated p-values (S, m, K)) after looks 1..``look``."""
    if not 1 <= look <= design.looks:
        raise ValueError(f"look must be 1..{design.looks}; got {look}")
    stats = statistics(d, design)
    p_sup, p_eq = repeated_p_values(stats, design)
    S, m = d.shape[:2]
    code, at = np.zeros((S, m), int), np.zeros((S, m), int)
    with _holm_gc():
        for k in range(look):
            for s in np.flatnonzero((code == 0).any(1) & ((p_sup[:, :, k].min(1) <= design.alpha)
                                                          | (p_eq[:, :, k].min(1) <= design.alpha))):
                sup, eq = _holm(p_sup[s, :, k], design.alpha)[0], _holm(p_eq[s, :, k], design.alpha)[0]
                new = code[s] == 0
                direction = np.where(stats["mean"][s, :, k] > 0, 1, 2)
                code[s] = np.where(new & sup, direction, np.where(new & eq, 3, code[s]))
                at[s] = np.where(new & (sup | eq), k + 1, at[s])
    return code, at, stats, p_sup, p_eq


def decide(differences_by_method: Mapping[str, Sequence[float]], look: int, design: Design) -> dict[str, Decision]:
    """Each comparison's :class:`Decision` at ``look`` (1-based): ``differences_by_method[method]`` = the paired
    differences method - reference, in the order the seeds were run; look k reads the first
    ``design.seeds[k-1]``. A method with fewer (failed seeds) is tested on what it has, with the planned
    fractions; one with more than the look's count is an error (a look or design mismatch)."""
    if not differences_by_method:
        raise ValueError("no comparisons: differences_by_method is empty")
    if not 1 <= look <= design.looks:
        raise ValueError(f"look must be 1..{design.looks}; got {look}")
    n_look = design.seeds[look - 1]
    rows = []
    for method, diffs in differences_by_method.items():
        x = np.asarray(list(diffs), dtype=float)
        if not np.isfinite(x).all():
            raise ValueError(f"method {method!r}: differences must be finite numbers (drop failed seeds)")
        if len(x) > n_look:
            raise ValueError(f"method {method!r}: {len(x)} differences, but look {look} uses {n_look} seeds "
                             f"(design seeds {list(design.seeds)})")
        rows.append(x)
    d = np.full((1, len(rows), n_look), np.nan)
    for j, x in enumerate(rows):
        d[0, j, :len(x)] = x
    code, at, stats, p_sup, p_eq = decide_arrays(d, look, design)
    k = look - 1
    with _holm_gc():
        holm_sup, holm_eq = _holm(p_sup[0, :, k], 1.0)[1], _holm(p_eq[0, :, k], 1.0)[1]
    out = {}
    for j, method in enumerate(differences_by_method):
        n = int(stats["n"][0, j, k])
        note = "" if n == n_look else f"{n} of the look's {n_look} pairs"
        if n >= 2 and stats["se"][0, j, k] == 0:
            note = "; ".join(x for x in (note, "zero variance: no test") if x)
        out[method] = Decision(method, VERDICTS[code[0, j]], int(at[0, j]) or None, n,
                               None if n == 0 else float(stats["mean"][0, j, k]), float(p_sup[0, j, k]),
                               float(holm_sup[j]), float(p_eq[0, j, k]), float(holm_eq[j]), note)
    return out


def next_seeds(decisions: Mapping[str, Decision], look: int, design: Design) -> int | None:
    """The paired seeds the next look needs (``design.seeds[look]``, a cumulative count), or None: every
    comparison is decided, or ``look`` was the last."""
    if look >= design.looks or all(d.verdict != UNDECIDED for d in decisions.values()):
        return None
    return design.seeds[look]


# ---------------------------------------------------------------------------------------------------
# planning: seeds to detect delta at the planned power


@dataclass(frozen=True)
class SeedPlan:
    """One comparison's planned seeds, from a pilot's paired differences; None when the pilot cannot tell."""
    method: str
    pilot: int                  # pairs in the pilot
    sd: float | None            # SD (ddof=1) of the pilot's differences
    fixed: int | None           # fixed design: paired t-test at alpha / comparisons, power POWER at delta
    sequential: int | None      # the group-sequential design of the same power: its maximum seeds
    expected: float | None      # ... and its expected seeds when the true difference is delta (normal theory)
    delta: float = DEFAULT_DELTA
    note: str = ""


@lru_cache(maxsize=32)
def inflation(looks: int, alpha: float, power: float = POWER) -> tuple[float, float]:
    """(inflation factor, expected fraction) of the K-look design at equally spaced fractions: the ratio of
    its maximum information to the fixed design's at the same power (Jennison & Turnbull 2000, §2.5; drift
    solved numerically, :func:`service.spending.drift_for_power`), and E[information at stop] / maximum at
    that drift."""
    t = np.arange(1, looks + 1) / looks
    bounds = spending.spending_bounds(t, [alpha], two_sided=True)[0]
    one = spending.spending_bounds([1.0], [alpha], two_sided=True)[0]
    theta = spending.drift_for_power(t, bounds, power, two_sided=True)
    fixed = spending.drift_for_power([1.0], one, power, two_sided=True)
    return (theta / fixed) ** 2, spending.expected_fraction(t, bounds, theta, two_sided=True)


def t_power(n: int, effect: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at n pairs and standardised difference ``effect`` (noncentral t,
    noncentrality effect sqrt(n), n - 1 degrees of freedom): the quantity TTestPower computes, from scipy,
    which stays finite at large noncentrality where statsmodels 0.15 returns NaN."""
    from scipy.stats import nct, t

    crit, nc = t.ppf(1 - alpha / 2, n - 1), effect * math.sqrt(n)
    return float(nct.sf(crit, n - 1, nc) + nct.cdf(-crit, n - 1, nc))


def fixed_seeds(sd: float, delta: float = DEFAULT_DELTA, alpha: float = ALPHA, power: float = POWER) -> int:
    """The fewest pairs (at least 2) with which a fixed-size paired t-test reaches ``power`` at true difference
    ``delta``: statsmodels' ``TTestPower.solve_power`` as the start, :func:`t_power` to settle the integer
    (the solver fails or undershoots below 2 pairs, i.e. for large effects)."""
    import warnings

    from statsmodels.stats.power import TTestPower
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    effect = delta / sd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = float(np.squeeze(TTestPower().solve_power(effect_size=effect, alpha=alpha, power=power,
                                                          alternative="two-sided")))
    n = max(2, math.ceil(start)) if math.isfinite(start) else 2
    while t_power(n, effect, alpha) < power:
        n += 1
    while n > 2 and t_power(n - 1, effect, alpha) >= power:
        n -= 1
    return n


def plan_seeds(pilot: Mapping[str, Sequence[float]], delta: float = DEFAULT_DELTA, alpha: float = ALPHA,
               power: float = POWER, looks: int = DEFAULT_LOOKS, comparisons: int | None = None) -> dict[str, SeedPlan]:
    """Per comparison, from its pilot differences (method - reference): the seeds to detect ``delta`` with
    ``power``. The level is alpha / ``comparisons`` (default: as many as ``pilot`` has), the first step of Holm,
    so the plan holds for every comparison. The SD is the pilot's point estimate: a pilot of few seeds gives a
    rough plan (docs/seeds.md)."""
    m = comparisons or len(pilot)
    level = alpha / max(m, 1)
    factor, fraction = inflation(looks, level, power)
    out = {}
    for method, diffs in pilot.items():
        x = np.round(np.asarray([v for v in diffs if v is not None and math.isfinite(v)], float), _DECIMALS)
        sd = float(x.std(ddof=1)) if len(x) >= 2 else None
        if sd is None or sd == 0:
            why = f"{len(x)} pair{'' if len(x) == 1 else 's'}: no SD" if sd is None else "zero variance: no plan"
            out[method] = SeedPlan(method, len(x), sd, None, None, None, delta, why)
            continue
        fixed = fixed_seeds(sd, delta, level, power)
        seq = max(fixed, math.ceil(factor * fixed))
        out[method] = SeedPlan(method, len(x), sd, fixed, seq, fraction * seq, delta)
    return out
