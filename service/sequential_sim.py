"""Monte-Carlo sweeps of the group-sequential procedure (:mod:`service.sequential`), vectorised: the error rates
and seed counts that tests/test_sequential.py checks and benchmarks/sequential.py reports (docs/seeds.md).

A simulated sweep has one reference and m methods, each run on the design's maximum seeds: per seed the
reference scores r ~ N(0, sd^2 / 2) and method j scores a_j ~ N(mu_j, sd^2 / 2), independently, so the paired
differences a_j - r ~ N(mu_j, sd^2), correlated 0.5 between comparisons (they share the reference), as in a
real sweep. The differences of all sweeps go through :func:`service.sequential.decide_arrays`, the code path
of :func:`service.sequential.decide`, up to the last look; a comparison's seeds are the count at the look of
its verdict (the maximum when undecided), a sweep's the most over its comparisons (seeds run until every
comparison is decided).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.sequential import VERDICTS, Design, decide_arrays


@dataclass(frozen=True)
class Simulation:
    """Simulated sweeps of one design: each comparison's verdict (codes of VERDICTS) and its look (0: none)."""
    design: Design
    true_differences: tuple[float, ...]
    sd: float
    verdicts: np.ndarray        # (S, m) int
    decided_at: np.ndarray      # (S, m) 1-based look, 0 = undecided after the last look

    @property
    def sweeps(self) -> int:
        return len(self.verdicts)

    def rate(self, *verdicts: str, per: str = "sweep") -> tuple[float, float]:
        """The fraction of sweeps with any comparison (``per="sweep"``), or of comparisons (``"comparison"``),
        given one of ``verdicts``, and its Monte-Carlo standard error sqrt(p (1 - p) / count)."""
        hit = np.isin(self.verdicts, [VERDICTS.index(v) for v in verdicts])
        if per == "sweep":
            hit = hit.any(1)
        elif per != "comparison":
            raise ValueError(f"per must be 'sweep' or 'comparison'; got {per!r}")
        p = float(hit.mean())
        return p, math.sqrt(p * (1 - p) / hit.size)

    @property
    def seeds(self) -> np.ndarray:
        """(S, m): the paired seeds each comparison used, up to its verdict."""
        counts = np.array(self.design.seeds)
        return np.where(self.decided_at > 0, counts[np.maximum(self.decided_at, 1) - 1], counts[-1])

    @property
    def sweep_seeds(self) -> np.ndarray:
        """(S,): the seeds each sweep ran, until its last comparison was decided."""
        return self.seeds.max(1)


def simulate(design: Design, true_differences: Sequence[float], sd: float, sweeps: int = 2000,
             seed: int = 0) -> Simulation:
    """``sweeps`` sweeps of ``len(true_differences)`` comparisons whose paired differences have means
    ``true_differences`` and SD ``sd`` (numpy Generator seeded with ``seed``)."""
    if sweeps < 1 or not sd > 0 or not true_differences:
        raise ValueError(f"need sweeps >= 1, sd > 0 and at least one comparison; got {sweeps}, {sd}, "
                         f"{list(true_differences)}")
    rng = np.random.default_rng(seed)
    mu = np.asarray(true_differences, dtype=float)
    n, half = design.seeds[-1], sd / math.sqrt(2.0)
    reference = rng.normal(0.0, half, (sweeps, 1, n))
    methods = rng.normal(mu[None, :, None], half, (sweeps, len(mu), n))
    code, at, *_ = decide_arrays(methods - reference, design.looks, design)
    return Simulation(design, tuple(float(v) for v in mu), float(sd), code, at)
