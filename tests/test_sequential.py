"""The group-sequential comparisons (service/sequential.py, service/spending.py): the boundaries against published
numbers and an independent integration (scipy's multivariate normal), the t conversion and repeated p-values
against scipy's t-test, Holm's recycling, the decision API, the seed plan against the noncentral t, and the
procedure's error rates and seed counts by simulation (service/sequential_sim.py; docs/seeds.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from service import sequential as seq
from service import spending
from service.sequential_sim import simulate


def _corr(t):
    """Corr(Z_i, Z_j) = sqrt(t_i / t_j), i <= j (Jennison & Turnbull 2000, §3.1)."""
    t = np.asarray(t)
    return np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))


def _mvn(mean, cov):
    return stats.multivariate_normal(mean, cov, abseps=1e-7, releps=1e-7, maxpts=2_000_000)


def test_spending_function_by_hand():
    # 2 - 2 Phi(1.959964 / sqrt(0.25)) = erfc(3.919928 / sqrt 2) = 8.86e-5; all of alpha at t = 1
    assert spending.obf_spending(0.25, 0.05) == pytest.approx(math.erfc(1.959964 / 0.5 / math.sqrt(2)), rel=1e-5)
    assert spending.obf_spending(1.0, 0.05) == pytest.approx(0.05, rel=1e-12)
    assert np.all(np.diff(spending.obf_spending(np.linspace(0.1, 1, 10), 0.05)) > 0)


def test_one_look_is_the_fixed_test_and_the_first_look_is_closed_form():
    assert spending.spending_bounds([1.0], [0.05], two_sided=True)[0, 0] == pytest.approx(1.959964, abs=1e-5)
    assert spending.spending_bounds([1.0], [0.05], two_sided=False)[0, 0] == pytest.approx(1.644854, abs=1e-5)
    t = [0.3, 0.55, 0.8, 1.0]   # look 1: P(|Z_1| >= c) = alpha(t_1)  =>  c = z_{alpha/2} / sqrt(t_1)
    assert spending.spending_bounds(t, [0.05], two_sided=True)[0, 0] == pytest.approx(1.959964 / math.sqrt(0.3), abs=1e-5)


def test_published_one_sided_boundaries():
    # Lan-DeMets O'Brien-Fleming type, one-sided 0.025, 5 equally spaced looks (rpact / gsDesign sfLDOF):
    # 4.877, 3.357, 2.680, 2.290, 2.031
    bounds = spending.spending_bounds(np.arange(1, 6) / 5, [0.025], two_sided=False)[0]
    np.testing.assert_allclose(bounds, [4.877, 3.357, 2.680, 2.290, 2.031], atol=6e-4)


@pytest.mark.parametrize("looks, published", [(2, 0.083), (3, 0.107), (4, 0.126), (5, 0.142), (10, 0.193)])
def test_repeated_testing_at_the_nominal_level(looks, published):
    # Armitage, McPherson & Rowe (1969); Jennison & Turnbull 2000, Table 1.1: |Z_k| >= 1.96 at K equal looks
    t = np.arange(1, looks + 1) / looks
    assert spending.power(t, np.full(looks, 1.959964), 0.0, two_sided=True)[0] == pytest.approx(published, abs=6e-4)


@pytest.mark.parametrize("two_sided", [True, False])
def test_boundaries_spend_alpha_under_the_multivariate_normal(two_sided):
    """An independent integration (Genz, scipy): P(no crossing by look k) = 1 - alpha(t_k), at uneven looks."""
    t = np.array([0.3, 0.55, 0.8, 1.0])
    bounds = spending.spending_bounds(t, [0.05], two_sided=two_sided)[0]
    cov = _corr(t)
    for k in range(1, len(t) + 1):
        mvn = _mvn(np.zeros(k), cov[:k, :k])
        lower = -bounds[:k] if two_sided else np.full(k, -np.inf)
        stay = mvn.cdf(bounds[:k], lower_limit=lower)
        assert 1 - stay == pytest.approx(spending.obf_spending(t[k - 1], 0.05), abs=2e-5)


def test_power_and_expected_information_under_a_drift_match_the_multivariate_normal():
    t = np.array([0.25, 0.5, 0.75, 1.0])
    bounds = spending.spending_bounds(t, [0.05], two_sided=True)[0]
    theta, cov = 2.8, _corr(t)
    stay = [1.0] + [_mvn(theta * np.sqrt(t[:k]), cov[:k, :k]).cdf(bounds[:k], lower_limit=-bounds[:k])
                    for k in range(1, 5)]
    assert spending.power(t, bounds, theta, two_sided=True)[0] == pytest.approx(1 - stay[4], abs=2e-5)
    stop = -np.diff(stay)                                      # P(stop at look k), k < K
    expected = (t[:3] * stop[:3]).sum() + stay[3]              # the last look's fraction is 1
    assert spending.expected_fraction(t, bounds, theta, two_sided=True) == pytest.approx(expected, abs=2e-5)


def test_inflation_factor():
    assert seq.inflation(1, 0.05)[0] == pytest.approx(1.0, abs=1e-6)
    factor, fraction = seq.inflation(4, 0.05)
    assert 1.0 < factor < 1.1 and 0.5 < fraction < 1.0     # O'Brien-Fleming: a small premium, stops early


def test_repeated_p_values_invert_the_boundaries():
    t = np.array([0.25, 0.5, 0.75, 1.0])
    for level in (0.05, 0.01, 0.05 / 3):
        bounds = spending.spending_bounds(t, [level], two_sided=True)[0]
        for k in range(4):
            assert spending.repeated_p(bounds[k], k, t, two_sided=True) == pytest.approx(level, rel=2e-3)
    z = np.linspace(0, 6, 50)
    assert np.all(np.diff(spending.repeated_p(z, 1, t, two_sided=True)) <= 0)
    assert spending.repeated_p(0.0, 0, t, two_sided=True) == 1.0


def test_one_look_gives_the_paired_t_test_p_value():
    rng = np.random.default_rng(3)
    design = seq.Design((6,))
    for _ in range(5):
        d = rng.normal(0.004, 0.01, 6)
        got = seq.decide({"m": d.tolist()}, 1, design)["m"].p_superiority
        assert got == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue, rel=2e-3)


def test_statistics_by_hand():
    # d = 0.01, 0.03, 0.02: mean 0.02, sd 0.01, se 0.01 / sqrt 3, T = 2 sqrt 3 = 3.464 on 2 df
    design = seq.Design((3,), delta=0.01)
    s = seq.statistics(np.array([[0.01, 0.03, 0.02]]), design)
    assert s["mean"][0, 0] == pytest.approx(0.02) and s["se"][0, 0] == pytest.approx(0.01 / math.sqrt(3))
    assert s["z"][0, 0] == pytest.approx(stats.norm.ppf(stats.t.cdf(2 * math.sqrt(3), 2)), rel=1e-9)
    # TOST: (mean + delta) / se = 3 sqrt 3, (delta - mean) / se = -sqrt 3
    assert s["z_low"][0, 0] == pytest.approx(stats.norm.ppf(stats.t.cdf(3 * math.sqrt(3), 2)), rel=1e-9)
    assert s["z_high"][0, 0] == pytest.approx(stats.norm.ppf(stats.t.cdf(-math.sqrt(3), 2)), rel=1e-9)


def test_holm_recycles_alpha_across_comparisons():
    """One look (a t-test): 'moderate' has p in (alpha/2, alpha]. Beside a clear winner Holm tests it at alpha
    (rejected); beside a null comparison, at alpha / 2 (not rejected)."""
    design = seq.Design((8,))
    base = np.array([1.0, -0.6, 0.4, 1.3, -0.2, 0.9, 0.1, 0.7])
    shift = next(s for s in np.linspace(0, 1, 2001)
                 if 0.03 < stats.ttest_1samp(base + s, 0).pvalue <= 0.045)
    moderate = (base + shift).tolist()
    clear = (base + 5).tolist()
    null = (base - base.mean()).tolist()
    with_clear = seq.decide({"clear": clear, "moderate": moderate}, 1, design)
    assert with_clear["clear"].verdict == seq.BETTER and with_clear["moderate"].verdict == seq.BETTER
    with_null = seq.decide({"null": null, "moderate": moderate}, 1, design)
    assert with_null["moderate"].verdict == seq.UNDECIDED
    p = with_null["moderate"].p_superiority        # Holm with two: 2 p_(1), then max(that, p_(2))
    assert with_null["moderate"].p_superiority_holm == pytest.approx(min(1.0, 2 * p))


def test_decide_verdicts_are_kept_and_next_seeds_follows():
    design = seq.Design((3, 6, 9), delta=0.01)
    rng = np.random.default_rng(0)
    diffs = {"up": (0.05 + rng.normal(0, 0.002, 9)).tolist(), "down": (-0.05 + rng.normal(0, 0.002, 9)).tolist(),
             "same": rng.normal(0, 0.001, 9).tolist(), "noisy": rng.normal(0, 0.05, 9).tolist()}
    at = {k: seq.decide({m: v[:n] for m, v in diffs.items()}, k + 1, design) for k, n in enumerate(design.seeds)}
    final = at[2]
    assert final["up"].verdict == seq.BETTER and final["down"].verdict == seq.WORSE
    assert final["same"].verdict == seq.EQUIVALENT and final["noisy"].verdict == seq.UNDECIDED
    for m, dec in final.items():               # a verdict, once reached, stays with the look it was reached at
        if dec.decided_at:
            assert all(at[k][m].verdict == dec.verdict for k in range(dec.decided_at - 1, 3))
            assert all(at[k][m].verdict == seq.UNDECIDED for k in range(dec.decided_at - 1))
    assert seq.next_seeds(at[0], 1, design) == 6 and seq.next_seeds(final, 3, design) is None
    decided = {m: d for m, d in final.items() if m != "noisy"}
    assert seq.next_seeds(decided, 2, design) is None


def test_decide_refuses_what_it_cannot_read():
    design = seq.Design((3, 6))
    with pytest.raises(ValueError, match="look must be 1..2"):
        seq.decide({"m": [0.1, 0.2, 0.3]}, 3, design)
    with pytest.raises(ValueError, match="look 1 uses 3 seeds"):
        seq.decide({"m": [0.1, 0.2, 0.3, 0.4]}, 1, design)
    with pytest.raises(ValueError, match="finite"):
        seq.decide({"m": [0.1, float("nan"), 0.3]}, 1, design)
    with pytest.raises(ValueError, match="empty"):
        seq.decide({}, 1, design)
    few = seq.decide({"m": [0.1, 0.2], "z": [0.0, 0.0, 0.0]}, 1, design)
    assert few["m"].n == 2 and "2 of the look's 3" in few["m"].note
    assert few["z"].verdict == seq.UNDECIDED and "zero variance" in few["z"].note


def test_design_validation_and_even_looks():
    assert seq.Design.even(12, looks=4).seeds == (3, 6, 9, 12)
    assert seq.Design.even(5, looks=4).seeds == (3, 4, 5)          # repeated counts dropped
    for bad in [(1, 4), (4, 4), (5, 3), ()]:
        with pytest.raises(ValueError, match="strictly increasing"):
            seq.Design(bad)
    with pytest.raises(ValueError, match="delta"):
        seq.Design((3, 6), delta=0.0)


def _t_power(n: int, effect: float, alpha: float) -> float:
    """Two-sided paired t-test power at n pairs from the noncentral t (scipy), independent of statsmodels."""
    crit, nc = stats.t.ppf(1 - alpha / 2, n - 1), effect * math.sqrt(n)
    return stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)


@pytest.mark.parametrize("sd", [0.006, 0.01, 0.02])
def test_plan_seeds_reaches_the_power_with_the_fewest_seeds(sd):
    rng = np.random.default_rng(1)
    pilot = rng.normal(0, 1, 5)
    pilot = pilot / pilot.std(ddof=1) * sd                        # a pilot whose SD is exactly sd
    plan = seq.plan_seeds({"a": pilot.tolist(), "b": pilot.tolist()}, delta=0.01)["a"]
    assert plan.sd == pytest.approx(sd) and plan.pilot == 5
    level = 0.05 / 2                                              # two comparisons: Holm's first step
    assert _t_power(plan.fixed, 0.01 / sd, level) >= 0.8 > _t_power(plan.fixed - 1, 0.01 / sd, level)
    assert plan.fixed <= plan.sequential and plan.expected < plan.sequential


@pytest.mark.parametrize("sd", [1e-4, 0.001, 0.003, 0.05])
def test_fixed_seeds_is_the_fewest_that_reach_the_power(sd):
    """Large effects too, where statsmodels' solver fails (below 2 pairs) or lands on too few pairs."""
    n = seq.fixed_seeds(sd, 0.01, 0.05)
    assert _t_power(n, 0.01 / sd, 0.05) >= 0.8
    assert n == 2 or _t_power(n - 1, 0.01 / sd, 0.05) < 0.8


def test_plan_seeds_says_when_the_pilot_cannot_tell():
    plans = seq.plan_seeds({"one": [0.01], "flat": [0.01, 0.01, 0.01]})
    assert plans["one"].fixed is None and "no SD" in plans["one"].note
    assert plans["flat"].fixed is None and "zero variance" in plans["flat"].note


# ---------------------------------------------------------------------------------------------------
# simulation: 2,000 sweeps of three comparisons each (the benchmark runs more: benchmarks/sequential.py)

SWEEPS, M, DELTA = 2000, 3, 0.01


def _within(rate: tuple[float, float], bound: float) -> bool:
    p, se = rate
    return p <= bound + 3 * max(se, math.sqrt(bound * (1 - bound) / SWEEPS))


@pytest.fixture(scope="module")
def planned():
    """The design a pilot of SD = delta plans for three comparisons, and the fixed design of the same power."""
    level = seq.ALPHA / M
    fixed = seq.fixed_seeds(DELTA, DELTA, level)
    return seq.Design.even(math.ceil(seq.inflation(seq.DEFAULT_LOOKS, level)[0] * fixed)), fixed


@pytest.mark.parametrize("sd", [DELTA, 5 * DELTA])   # 5 delta: equivalence is out of reach, so no look stops for it
def test_simulated_false_positive_rate_under_the_null(planned, sd):
    sim = simulate(planned[0], [0.0] * M, sd, SWEEPS, seed=11)
    assert _within(sim.rate(seq.BETTER, seq.WORSE), seq.ALPHA)


def test_simulated_equivalence_error_at_the_margin(planned):
    sim = simulate(planned[0], [DELTA] * M, DELTA, SWEEPS, seed=12)
    assert _within(sim.rate(seq.EQUIVALENT), seq.ALPHA)
    assert sim.rate(seq.EQUIVALENT)[0] > 0                 # the test is not vacuous: it does declare some


def test_simulated_sweeps_decide_with_fewer_seeds_than_the_fixed_design(planned):
    design, fixed = planned
    sim = simulate(design, [DELTA] * M, DELTA, SWEEPS, seed=13)
    power, se = sim.rate(seq.BETTER, per="comparison")
    assert power >= seq.POWER - 3 * se                   # the same power as the fixed design...
    assert sim.seeds.mean() < fixed                       # ... with fewer seeds per comparison on average


def test_the_simulator_runs_decide():
    design = seq.Design((3, 6))
    sim = simulate(design, [0.0, 0.02], 0.01, sweeps=4, seed=2)
    rng = np.random.default_rng(2)                        # the simulator's draws, in its order
    ref, methods = rng.normal(0, 0.01 / math.sqrt(2), (4, 1, 6)), rng.normal([[[0.0], [0.02]]], 0.01 / math.sqrt(2), (4, 2, 6))
    for s in range(4):
        d = seq.decide({"a": (methods[s, 0] - ref[s, 0]).tolist(), "b": (methods[s, 1] - ref[s, 0]).tolist()}, 2, design)
        assert [seq.VERDICTS.index(d[m].verdict) for m in "ab"] == sim.verdicts[s].tolist()


def test_the_report_section_plans_seeds_from_the_sweeps_differences(tmp_path):
    from service.report import SECTIONS, scores
    from service.report.sections import Scope
    from service.report.trials import Trial

    ref = [0.60, 0.62, 0.61, 0.63, 0.59]
    gain = [0.012, 0.004, 0.015, 0.009, 0.006]
    trials = [Trial("ref", str(s), test=v) for s, v in enumerate(ref)]
    trials += [Trial("a", str(s), test=v + g) for s, (v, g) in enumerate(zip(ref, gain))]
    trials += [Trial("b", "0", test=0.6), Trial("b", "1", status="FAILED")]        # one pair: no plan
    section = scores.planned_seeds(Scope(None, trials, tmp_path, "", "sweep", "ref"))
    plans = section.numbers["planned_seeds"]
    assert plans["a"].sd == pytest.approx(np.std(gain, ddof=1)) and plans["a"].pilot == 5
    assert plans["a"].fixed == seq.plan_seeds({"a": gain, "b": [0.0]})["a"].fixed   # two comparisons: alpha / 2
    assert plans["b"].fixed is None
    table = [line for line in section.markdown if line.startswith("| a |") or line.startswith("| b |")]
    assert len(table) == 2 and f"| {plans['a'].fixed} |" in table[0]
    assert scores.planned_seeds in SECTIONS
    alone = scores.planned_seeds(Scope(None, trials[:5], tmp_path, "", "sweep", "ref"))
    assert alone.markdown == []                                                    # nothing to compare


def test_the_estimate_plans_seeds_from_a_finished_pilot_sweep(tmp_path):
    """--dry-run --estimate --name PILOT: the seeds each comparison with the reference needs (service.sequential's
    plan of the pilot's paired differences), those still to run, and their device-hours at the bill's rate."""
    from mlflow.tracking import MlflowClient

    from service.estimate import Bill, Row, seed_plan
    from service.report.stats import paired_differences
    from tests.test_report import _fake_sweep

    db = tmp_path / "mlflow.db"
    accs = {"smear": [0.60, 0.62, 0.61], "tag": [0.58, 0.61, 0.57]}
    _fake_sweep(db, "pilot", [(m, s, a) for m, v in accs.items() for s, a in enumerate(v)], heatmap=False)
    MlflowClient(f"sqlite:///{db}")  # the store exists
    bill = Bill("space", "cpu", "test", 3, "", None, rows=[
        Row("resnet_domainnet", m, 3, [100] * 3, steps_per_s=100 / 3600, data_wait=0.0, gpu=1.0, workers=1, packed=1)
        for m in accs])                                                # 1 device-hour per trial
    lines = seed_plan(bill, f"sqlite:///{db}", "pilot", "smear-sweep/space")
    plan = seq.plan_seeds({"tag": paired_differences("tag", dict(enumerate(accs["tag"])), "smear",
                                                     dict(enumerate(accs["smear"])))})["tag"]
    (row,) = [line for line in lines if line.startswith("| tag |")]
    more = plan.fixed - 3
    assert row.startswith(f"| tag | 3 | {plan.sd:.4f} | {plan.fixed} | {plan.sequential} / ") and f"| {more} |" in row
    assert lines[-1].startswith(f"device-hours for every comparison to reach its fixed design: {2 * more:.4g}"), lines
    assert seed_plan(bill, f"sqlite:///{db}", "absent", "smear-sweep/space")[0].startswith(
        "note: no seed plan from --name 'absent': ")
