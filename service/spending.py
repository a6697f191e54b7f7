"""Group-sequential boundaries from an alpha-spending function, computed by recursive numerical integration.

Spending (Lan & DeMets 1983, Biometrika 70(3):659-663, the O'Brien-Fleming-type function of their eq. 2)::

    alpha(t) = 2 - 2 Phi(z_{alpha/2} / sqrt(t)),   t = information fraction in (0, 1],  alpha(1) = alpha

``alpha(t_k) - alpha(t_{k-1})`` is the error spent at look k. The same function spends a one-sided level too
(gsDesign's ``sfLDOF``): a two-sided boundary crosses on |Z_k|, a one-sided one on Z_k.

Joint law (Jennison & Turnbull 2000, *Group Sequential Methods with Applications to Clinical Trials*, §3.1,
the canonical joint distribution): the z statistics Z_1..Z_K of the looks are multivariate normal with
Corr(Z_i, Z_j) = sqrt(t_i / t_j) for i <= j and E Z_k = theta sqrt(t_k) (theta = E Z at t = 1, the drift).
Equivalently the B-values S_k = sqrt(t_k) Z_k (Lan & Wittes 1988) have independent increments
S_k - S_{k-1} ~ N(theta (t_k - t_{k-1}), t_k - t_{k-1}).

Method: the recursive numerical integration of Armitage, McPherson & Rowe (1969), as in Jennison & Turnbull
2000, ch. 19: the sub-density of S_k on the continuation region (no boundary crossed so far) is carried from
look to look by a Gaussian convolution, each integral by Simpson's rule on a uniform grid of ``GRID`` points;
look k's boundary solves P(no crossing before k, crossing at k) = alpha(t_k) - alpha(t_{k-1}) by bisection.
The probabilities are checked against scipy's multivariate normal (Genz) integration in tests/test_sequential.py.
Everything is vectorised over a leading axis of levels (for a table of boundaries) or drifts.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import ndtr, ndtri

GRID = 101              # Simpson points per look (odd); boundaries agree with 401 points to 1e-6
_WIDTH = 9.0            # the grid covers the drift's mean +- 9 sd of S_k (mass outside ~1e-19)
_BISECT = 60            # bisection steps for a boundary: the bracket shrinks by 2^-60
TABLE_LEVELS = np.geomspace(1e-6, 0.99, 240)   # the levels of the repeated p-value tables (see repeated_p)


def obf_spending(t, alpha: float) -> np.ndarray:
    """Lan & DeMets (1983) O'Brien-Fleming-type spending: the error spent by information fraction ``t``."""
    t = np.asarray(t, dtype=float)
    return 2.0 * ndtr(ndtri(alpha / 2.0) / np.sqrt(t))     # = 2 - 2 Phi(z_{alpha/2} / sqrt t), no cancellation


def _simpson(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, GRID points from lo to hi and their composite Simpson weights: (A, GRID) each."""
    u = np.linspace(0.0, 1.0, GRID)
    coef = np.ones(GRID)
    coef[1:-1:2], coef[2:-1:2] = 4.0, 2.0
    span = (hi - lo)[:, None]
    return lo[:, None] + span * u, span / (GRID - 1) / 3.0 * coef


def _check_fractions(t) -> np.ndarray:
    t = np.asarray(t, dtype=float)
    if t.ndim != 1 or not len(t) or t[0] <= 0 or abs(t[-1] - 1.0) > 1e-12 or np.any(np.diff(t) <= 0):
        raise ValueError(f"information fractions must increase strictly from above 0 to 1; got {t.tolist()}")
    return t


def propagate(t, theta, *, two_sided: bool, spend=None, bounds=None):
    """Walk the looks at fractions ``t`` (K,) for drifts ``theta`` (A,): either solve each look's boundary for
    the error ``spend`` (A, K) to spend there, or use the given z ``bounds`` (A, K) (inf: no stop at that look).
    Returns (bounds, upper, lower): the z boundaries and the probabilities (A, K) of first crossing at each
    look above (Z_k >= c_k) and below (Z_k <= -c_k; zero for a one-sided design)."""
    t = _check_fractions(t)
    theta = np.atleast_1d(np.asarray(theta, dtype=float))
    A, K = len(theta), len(t)
    out_b, out_up, out_low = np.empty((A, K)), np.zeros((A, K)), np.zeros((A, K))
    x, fw = np.zeros((A, 1)), np.ones((A, 1))       # S_0 = 0 with probability 1: points, density x weight
    prev = 0.0
    for k in range(K):
        step, root = t[k] - prev, np.sqrt(t[k])
        sd, shift = np.sqrt(step), theta[:, None] * step

        def cross(c):   # (A,) boundaries -> (A,) P(cross above), P(cross below) at look k
            edge = (c * root)[:, None]
            up = (fw * ndtr((x + shift - edge) / sd)).sum(1)
            low = (fw * ndtr((-edge - x - shift) / sd)).sum(1) if two_sided else np.zeros(A)
            return up, low

        if spend is not None:
            target = np.asarray(spend, dtype=float)[:, k]
            spent = np.asarray(spend, dtype=float)[:, :k + 1].sum(1)
            half = 2.0 if two_sided else 1.0
            # brackets: P(|Z_k| >= c) - spent before <= crossing(c) <= P(|Z_k| >= c)
            lo_c = -ndtri(np.clip(spent / half, 1e-300, 0.5))
            hi_c = -ndtri(np.clip(target / half, 1e-300, 0.5))
            for _ in range(_BISECT):
                mid = 0.5 * (lo_c + hi_c)
                up, low = cross(mid)
                above = up + low > target      # crossing decreases in c: too much spent -> raise c
                lo_c, hi_c = np.where(above, mid, lo_c), np.where(above, hi_c, mid)
            c = np.where(target > 0, 0.5 * (lo_c + hi_c), np.inf)
        else:
            c = np.asarray(bounds, dtype=float)[:, k]
        out_b[:, k] = c
        out_up[:, k], out_low[:, k] = cross(c)
        if k == K - 1:
            break
        centre, reach = theta * t[k], _WIDTH * root
        lo = np.maximum(-c * root if two_sided else -np.inf, centre - reach)
        hi = np.minimum(c * root, centre + reach)
        hi = np.maximum(hi, lo + 1e-12)               # an (almost) empty continuation region
        xn, wn = _simpson(lo, hi)
        dens = np.empty_like(xn)
        for a in range(A):                            # the Gaussian convolution, one row at a time (memory)
            z = (xn[a][:, None] - x[a][None, :] - shift[a]) / sd
            dens[a] = (np.exp(-0.5 * z * z) * fw[a][None, :]).sum(1) / (sd * np.sqrt(2 * np.pi))
        x, fw, prev = xn, dens * wn, t[k]
    return out_b, out_up, out_low


def spending_bounds(t, alphas, *, two_sided: bool) -> np.ndarray:
    """The z boundaries (A, K) of the O'Brien-Fleming-type design at each level of ``alphas`` (A,)."""
    t = _check_fractions(t)
    alphas = np.atleast_1d(np.asarray(alphas, dtype=float))
    cum = obf_spending(t[None, :], alphas[:, None])
    spend = np.diff(np.concatenate([np.zeros((len(alphas), 1)), cum], axis=1), axis=1)
    return propagate(t, np.zeros(len(alphas)), two_sided=two_sided, spend=np.maximum(spend, 0.0))[0]


@lru_cache(maxsize=64)
def _table(t: tuple[float, ...], two_sided: bool) -> np.ndarray:
    return spending_bounds(np.array(t), TABLE_LEVELS, two_sided=two_sided)


def repeated_p(z, look: int, t, *, two_sided: bool) -> np.ndarray:
    """Repeated p-values (Jennison & Turnbull 2000, §9.2): for the z statistic(s) ``z`` at look ``look``
    (0-based), the smallest level at which the design's boundary at that look is crossed (|z| for a
    two-sided design). Its minimum over the looks so far is at most u exactly when the design of level u has
    stopped by then, so it is a valid p-value for Holm. Interpolated (log level, linear in z) in a table of
    ``TABLE_LEVELS``; clipped to [1e-6, 1]."""
    table = _table(tuple(float(v) for v in t), two_sided)[:, look]      # decreasing in the level
    z = np.abs(z) if two_sided else np.asarray(z, dtype=float)
    logp = np.interp(z, table[::-1], np.log(TABLE_LEVELS[::-1]))
    return np.where(z < table[-1], 1.0, np.exp(logp))


def power(t, bounds, theta, *, two_sided: bool) -> np.ndarray:
    """P(the design with z ``bounds`` (K,) stops at any look) under drift(s) ``theta``; a two-sided design
    counts both boundaries."""
    theta = np.atleast_1d(np.asarray(theta, dtype=float))
    _, up, low = propagate(t, theta, two_sided=two_sided, bounds=np.tile(bounds, (len(theta), 1)))
    return (up + low).sum(1)


def drift_for_power(t, bounds, target: float, *, two_sided: bool) -> float:
    """The drift theta (E Z at t = 1) at which the design reaches power ``target`` (bisection, 1e-10)."""
    lo, hi = 0.0, 12.0
    while hi - lo > 1e-10:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if power(t, bounds, mid, two_sided=two_sided)[0] < target else (lo, mid)
    return 0.5 * (lo + hi)


def expected_fraction(t, bounds, theta: float, *, two_sided: bool) -> float:
    """E[information at stopping] / maximum information under drift ``theta``: sum_k t_k P(stop at k),
    with the last look taken whatever happens."""
    t = _check_fractions(t)
    _, up, low = propagate(t, [theta], two_sided=two_sided, bounds=np.asarray(bounds, dtype=float)[None, :])
    stop = (up + low)[0]
    return float((t[:-1] * stop[:-1]).sum() + (1.0 - stop[:-1].sum()))
