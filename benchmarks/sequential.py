"""Error rates and seed counts of the group-sequential comparisons (service/sequential.py), by simulated sweeps.

    python -m benchmarks.sequential [--sweeps N] [--seed S] [--looks K] [--json PATH]

For each case (SD of the paired differences in units of the margin delta; m comparisons with one reference)
the fixed design is the paired t-test's seed count for 80% power at delta (alpha / m, TTestPower) and the
sequential design is ``Design.even(ceil(inflation x fixed), looks)``, what ``plan_seeds`` plans from a pilot
of that SD. Each design runs N simulated sweeps (service/sequential_sim.py) under:

  null        true difference 0 for every method: false positives = sweeps with any better / worse
  null, 5 sd  the same with 5x the planned SD, so that no look stops for equivalence
  margin      true difference delta: false equivalence = sweeps with any "equivalent"
  delta       true difference delta: power per comparison, mean seeds per comparison and per sweep

Every rate is given with its Monte-Carlo standard error sqrt(p (1 - p) / N). The seeds ratio is the
sequential design's mean seeds per comparison / the fixed design's seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

from service import sequential as seq
from service.sequential_sim import simulate

CASES = ((1.0, 1), (1.0, 3), (2.0, 1), (2.0, 3))   # (SD / delta, comparisons)


def run_case(sd_in_delta: float, m: int, sweeps: int, seed: int, looks: int) -> dict:
    delta, level = seq.DEFAULT_DELTA, seq.ALPHA / m
    sd = sd_in_delta * delta
    fixed = seq.fixed_seeds(sd, delta, level)
    factor, fraction = seq.inflation(looks, level)
    design = seq.Design.even(math.ceil(factor * fixed), looks)
    out = {"sd_over_delta": sd_in_delta, "comparisons": m, "fixed_seeds": fixed, "inflation": factor,
           "design_seeds": list(design.seeds), "normal_theory_expected_seeds": fraction * design.seeds[-1]}
    t0 = time.perf_counter()
    for name, mu, scale, key in (("null", 0.0, 1.0, (seq.BETTER, seq.WORSE)),
                                 ("null_5sd", 0.0, 5.0, (seq.BETTER, seq.WORSE)),
                                 ("margin", delta, 1.0, (seq.EQUIVALENT,))):
        out[name] = simulate(design, [mu] * m, sd * scale, sweeps, seed + len(out)).rate(*key)
    alt = simulate(design, [delta] * m, sd, sweeps, seed + 99)
    out["power"] = alt.rate(seq.BETTER, per="comparison")
    out["seeds_per_comparison"] = float(alt.seeds.mean())
    out["seeds_per_sweep"] = float(alt.sweep_seeds.mean())
    out["ratio"] = out["seeds_per_comparison"] / fixed
    out["sweep_ratio"] = out["seeds_per_sweep"] / fixed
    one = seq.Design((fixed,))
    out["fixed_power"] = simulate(one, [delta] * m, sd, sweeps, seed + 7).rate(seq.BETTER, per="comparison")
    out["fixed_null"] = simulate(one, [0.0] * m, sd, sweeps, seed + 8).rate(seq.BETTER, seq.WORSE)
    out["seconds"] = time.perf_counter() - t0
    return out


def _pm(rate) -> str:
    return f"{rate[0]:.4f} ± {rate[1]:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", type=int, default=20_000, help="simulated sweeps per design and scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--looks", type=int, default=seq.DEFAULT_LOOKS)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = [run_case(s, m, a.sweeps, a.seed + 1000 * i, a.looks) for i, (s, m) in enumerate(CASES)]
    meta = {"machine": platform.node(), "python": platform.python_version(), "sweeps": a.sweeps, "seed": a.seed,
            "looks": a.looks, "alpha": seq.ALPHA, "power": seq.POWER, "delta": seq.DEFAULT_DELTA}
    print(f"{a.sweeps:,} sweeps per scenario; ± = Monte-Carlo standard error\n")
    print("| SD/delta | m | fixed seeds | sequential looks | false pos. (null) | false pos. (null, 5 SD) | "
          "false equiv. (margin) | power seq. / fixed | seeds per comparison | ratio seq./fixed | "
          "seeds per sweep | sweep ratio |")
    print("|---:|---:|---:|---|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sd_over_delta']:g} | {r['comparisons']} | {r['fixed_seeds']} | "
              f"{', '.join(map(str, r['design_seeds']))} | {_pm(r['null'])} | {_pm(r['null_5sd'])} | "
              f"{_pm(r['margin'])} | {r['power'][0]:.3f} / {r['fixed_power'][0]:.3f} | "
              f"{r['seeds_per_comparison']:.2f} | {r['ratio']:.3f} | {r['seeds_per_sweep']:.2f} | "
              f"{r['sweep_ratio']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "cases": rows}, indent=2))


if __name__ == "__main__":
    main()
