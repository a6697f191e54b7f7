"""service/report/aggregate.py: cross-task aggregates (mean over tasks, IQM, P(> reference)) with stratified bootstrap
intervals, the Friedman test with Holm post-hoc tests, and the report section built from them."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from service.report.aggregate import (aggregates, cliques, clean, iqm, probability_of_improvement, rank_test,
                                      stratified_bootstrap, PairTest, _mean_over_tasks)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(table: dict[str, dict[str, list]]) -> dict:
    """method -> task -> [score per seed] as the module's input, method -> task -> seed -> score."""
    return {m: {t: dict(enumerate(v)) for t, v in per_task.items()} for m, per_task in table.items()}


# --- the point estimates, by hand ------------------------------------------------------------------------

def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm(np.arange(1, 9)) == 4.5                         # 1..8: cut 2 each end, mean(3, 4, 5, 6)
    assert iqm([1, 2, 3, 4, 100]) == 3.0                       # int(0.25 * 5) = 1 cut each end: mean(2, 3, 4)
    assert iqm([0.3, 0.7]) == 0.5                              # nothing cut below 4 values: the mean


def test_probability_of_improvement_is_the_mann_whitney_estimate():
    # x = .6 .5 .4, y = .5 .3: the 6 pairs (x, y): > > = > < >  ->  (1 + 1 + .5 + 1 + 0 + 1) / 6 = .75
    x, y = [0.6, 0.5, 0.4], [0.5, 0.3]
    assert probability_of_improvement({"a": x}, {"a": y}) == pytest.approx(0.75)
    assert stats.mannwhitneyu(x, y).statistic / (3 * 2) == pytest.approx(0.75)
    # two tasks: the mean of the tasks' estimates; task b: x always below y -> 0
    assert probability_of_improvement({"a": x, "b": [0.1]}, {"a": y, "b": [0.2, 0.3]}) == pytest.approx(0.375)
    assert probability_of_improvement({"a": y}, {"a": x}) == pytest.approx(0.25)   # P(Y > X) = 1 - P(X > Y)


def test_mean_over_tasks_weighs_every_task_equally():
    # task a: seeds .5 .7 (mean .6), task b: one seed .2: (.6 + .2) / 2 = .4, not the pooled mean .4667
    rows, _, _ = aggregates(_scores({"m": {"a": [0.5, 0.7], "b": [0.2]}}), None)
    assert rows[0].mean.value == pytest.approx(0.4) and rows[0].seeds == (2, 1)
    assert float(_mean_over_tasks(np.array([0.5, 0.7]), np.array([0.2]))) == pytest.approx(0.4)


# --- the stratified bootstrap ---------------------------------------------------------------------------

def test_resampling_is_stratified_by_task():
    """Every resample of task k holds only task k's seeds: tasks never mix."""
    seen = []

    def statistic(*samples, axis=-1):
        seen.append([np.unique(s) for s in samples])
        return _mean_over_tasks(*samples, axis=axis)

    lo, hi, note = stratified_bootstrap([[0.0, 1.0], [10.0, 11.0, 12.0]], statistic, n_boot=500)
    assert seen and note == ""
    for a, b in seen:
        assert set(a) <= {0.0, 1.0} and set(b) <= {10.0, 11.0, 12.0}
    # the mean of the two tasks' means can only lie in [(0 + 10) / 2, (1 + 12) / 2]
    assert 5.0 <= lo < hi <= 6.5


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_seeds():
    spread = np.array([-0.02, 0.0, 0.02])
    few = {"m": {"a": list(0.5 + spread), "b": list(0.7 + spread)}}
    many = {"m": {"a": list(0.5 + np.tile(spread, 10)), "b": list(0.7 + np.tile(spread, 10))}}   # same spread, 30
    (f,), _, _ = aggregates(_scores(few), None, n_boot=2000)
    (g,), _, _ = aggregates(_scores(many), None, n_boot=2000)
    for est in (f.mean, f.iqm, g.mean, g.iqm):
        assert est.ci_low <= est.value <= est.ci_high and est.note == ""
    assert f.mean.value == pytest.approx(0.6) and g.mean.value == pytest.approx(0.6)
    assert (g.mean.ci_high - g.mean.ci_low) < 0.5 * (f.mean.ci_high - f.mean.ci_low)
    assert (g.iqm.ci_high - g.iqm.ci_low) < (f.iqm.ci_high - f.iqm.ci_low)


def test_the_interval_is_scipys_stratified_bootstrap_and_reproducible():
    samples = [[0.5, 0.52, 0.57], [0.3, 0.31, 0.36, 0.4]]
    ours = stratified_bootstrap(samples, _mean_over_tasks, n_boot=999, seed=3)
    ref = stats.bootstrap([np.array(s) for s in samples], _mean_over_tasks, n_resamples=999, vectorized=True,
                          paired=False, method="percentile", rng=np.random.default_rng(3)).confidence_interval
    assert ours == (pytest.approx(ref.low), pytest.approx(ref.high), "")
    assert stratified_bootstrap(samples, _mean_over_tasks, n_boot=999, seed=3) == ours


def test_probability_of_improvement_interval():
    table = {"ref": {"a": [0.50, 0.52, 0.54], "b": [0.30, 0.32, 0.34]},
             "up": {"a": [0.53, 0.56, 0.59], "b": [0.33, 0.35, 0.31]}}
    rows, _, _ = aggregates(_scores(table), "ref", n_boot=2000)
    by = {r.method: r for r in rows}
    assert by["ref"].p_improve is None                           # the reference against itself: nothing
    # task a: .53 .56 .59 vs .50 .52 .54: 8 of 9 pairs above, .53 < .54 -> 8/9; task b: .33 .35 .31 vs .30 .32
    # .34: .33 > .30 .32, .35 > all 3, .31 > .30 -> 6/9; mean 7/9
    p = by["up"].p_improve
    assert p.value == pytest.approx(7 / 9) and 0 <= p.ci_low <= p.value <= p.ci_high <= 1


def test_one_seed_gives_no_interval():
    rows, _, _ = aggregates(_scores({"m": {"a": [0.5, 0.6], "b": [0.4]}, "r": {"a": [0.5], "b": [0.4]}}), "r")
    for r in rows:
        assert r.mean.value is not None and r.mean.ci_low is None and r.mean.ci_high is None
        assert r.mean.note == r.iqm.note == "1 seed in some task: no interval"
    # P(m > r): task a: .5 = .5 (half), .6 > .5 -> .75; task b: .4 = .4 -> .5; mean .625
    assert rows[0].p_improve.value == pytest.approx(0.625) and rows[0].p_improve.ci_low is None


# --- the rank test over tasks ---------------------------------------------------------------------------

def test_friedman_on_a_small_table_and_holm_via_statsmodels():
    # ranks per task (A B C): 1 2 3 | 2 1 3 | 1 3 2 | 1 2 3 -> R = 1.25, 2.00, 2.75
    # chi2_F = 12 N / (k (k+1)) [sum R^2 - k (k+1)^2 / 4] = 4 [13.125 - 12] = 4.5; p = exp(-4.5 / 2) = .105399
    table = {"A": [0.9, 0.8, 0.9, 0.9], "B": [0.8, 0.9, 0.7, 0.8], "C": [0.7, 0.7, 0.8, 0.6]}
    tasks = ["t1", "t2", "t3", "t4"]
    rt = rank_test({m: dict(zip(tasks, v)) for m, v in table.items()}, tasks)
    assert rt.ranks == {"A": 1.25, "B": 2.0, "C": 2.75}
    assert rt.statistic == pytest.approx(4.5) and rt.p_value == pytest.approx(math.exp(-2.25))
    assert rt.p_value == pytest.approx(stats.friedmanchisquare(*table.values()).pvalue)
    # post hoc: se = sqrt(k (k+1) / (6 N)) = sqrt(.5); z(A,B) = -.75 / se = -1.0607, z(A,C) = -2.1213, z(B,C) = z(A,B)
    assert [(p.a, p.b) for p in rt.pairs] == [("A", "B"), ("A", "C"), ("B", "C")]
    assert [p.z for p in rt.pairs] == pytest.approx([-0.75 / math.sqrt(0.5), -1.5 / math.sqrt(0.5), -0.75 / math.sqrt(0.5)])
    raw = [p.p_value for p in rt.pairs]
    assert raw == pytest.approx([0.288844, 0.033895, 0.288844], abs=1e-6)
    # Holm: .033895 x 3 = .101685, then max(.288844 x 2, .101686) = .577689 for both others
    assert [p.p_holm for p in rt.pairs] == pytest.approx(list(multipletests(raw, method="holm")[1]))
    assert [p.p_holm for p in rt.pairs] == pytest.approx([0.577689, 0.101685, 0.577689], abs=1e-6)
    # Friedman does not reject at .05: no pair differs, one bar joins all three (Demsar 2006)
    assert not any(p.significant for p in rt.pairs) and rt.cliques == [["A", "B", "C"]] and "Friedman p" in rt.note
    assert rt.cd_nemenyi == pytest.approx(2.343701 * math.sqrt(0.5), abs=1e-5)    # Demsar's Table 5: q = 2.344


def test_post_hoc_cliques_after_a_rejecting_friedman_test():
    # A > B > C on all 10 tasks: R = 1, 2, 3; chi2 = 10 [14 - 12] = 20, p = exp(-10); se = sqrt(12 / 60)
    tasks = [f"t{i}" for i in range(10)]
    rt = rank_test({m: {t: v + 0.01 * i for i, t in enumerate(tasks)} for m, v in (("A", .9), ("B", .8), ("C", .7))},
                   tasks)
    assert rt.statistic == pytest.approx(20.0) and rt.p_value == pytest.approx(math.exp(-10))
    # z(A,B) = z(B,C) = -2.2361, p = .025347; z(A,C) = -4.4721, p = 7.74e-6; Holm: 2.3e-5, then .050694 twice
    assert [p.p_holm for p in rt.pairs] == pytest.approx([0.050694, 2.3228e-5, 0.050694], rel=1e-3)
    assert [p.significant for p in rt.pairs] == [False, True, False]
    assert rt.cliques == [["A", "B"], ["B", "C"]] and rt.note == ""


def test_cliques_are_maximal_runs_without_a_significant_pair():
    def pair(a, b, sig):
        return PairTest(a, b, 0.0, 0.01, 0.01, sig)
    ranked = ["a", "b", "c", "d"]
    assert cliques(ranked, []) == [ranked]
    assert cliques(ranked, [pair("a", "d", True)]) == [["a", "b", "c"], ["b", "c", "d"]]
    assert cliques(ranked, [pair("a", "b", True), pair("b", "c", True), pair("c", "d", True)]) == []
    assert cliques(ranked, [pair("a", "c", True), pair("a", "d", True)]) == [["a", "b"], ["b", "c", "d"]]


@pytest.mark.parametrize("means, tasks, note", [
    ({"A": {"t": 0.5}, "B": {"t": 0.4}, "C": {"t": 0.3}}, ["t"], "1 task: no ranks over tasks"),
    ({"A": {"t": 0.5, "u": 0.1}, "B": {"t": 0.4, "u": 0.2}}, ["t", "u"], "2 methods with a score on every task"),
    ({"A": {"t": 0.5, "u": 0.1}}, ["t", "u"], "1 method with a score"),
])
def test_no_rank_test_for_one_task_or_fewer_than_three_methods(means, tasks, note):
    rt = rank_test(means, tasks)
    assert rt.p_value is None and rt.pairs == [] and rt.cliques == [] and note in rt.note


def test_ties_share_the_mean_rank_and_float_noise_ties():
    # task t: A .3 and B .1 + .2 (= .30000000000000004) tie at 1.5, C 3; task u: C 1, B 2, A 3
    rt = rank_test({"A": {"t": 0.3, "u": 0.1}, "B": {"t": 0.1 + 0.2, "u": 0.2}, "C": {"t": 0.1, "u": 0.3}}, ["t", "u"])
    assert rt.ranks == {"B": 1.75, "C": 2.0, "A": 2.25} and rt.p_value is not None


def test_all_tied_tasks_give_no_friedman_statistic():
    rt = rank_test({m: {"t": 0.5, "u": 0.2} for m in "ABC"}, ["t", "u"])
    assert rt.p_value is None and rt.ranks == {"A": 2.0, "B": 2.0, "C": 2.0} and "ties all methods" in rt.note


# --- missing data ----------------------------------------------------------------------------------------

def test_failed_trials_are_left_out_and_incomplete_methods_listed():
    table = {"A": {"t": [0.5, None, 0.6], "u": [0.4, float("nan"), 0.5]},     # a failed seed: dropped
             "B": {"t": [0.5, 0.5], "u": [None, None]},                           # no score on u: left out
             "C": {"t": [None], "u": [None]}}                                     # failed everywhere
    tasks, kept, left_out = clean(_scores(table))
    assert tasks == ["t", "u"] and kept == {"A": {"t": [0.5, 0.6], "u": [0.4, 0.5]}}
    assert left_out == {"B": ["u"], "C": ["t", "u"]}
    rows, rt, left = aggregates(_scores(table), "B")
    assert [r.method for r in rows] == ["A"] and rows[0].p_improve is None and left == left_out   # no reference
    assert "1 method" in rt.note and aggregates({"A": {}}, "A")[0] == []                          # no task at all


# --- the report section, from fake trials ----------------------------------------------------------------

def _glue_like(methods=("smear", "tag", "adapter", "hash"), tasks=("rte", "cola", "mrpc"), seeds=3, kind="task",
               pooled: bool = False):
    from service.report.trials import Trial

    trials = []
    for i, m in enumerate(methods):
        for s in range(seeds):
            g = {t: 0.5 + 0.05 * i + 0.02 * k + 0.01 * ((s * (k + 1)) % 3) for k, t in enumerate(tasks)}
            test = sum(g.values()) / len(g) + (0.01 if pooled else 0.0)
            trials.append(Trial(m, str(s), setting="demo", primary="average", group_metric="score", group_kind=kind,
                                test=test, groups=g, group_order=list(tasks)))
    return trials + [Trial(methods[0], str(seeds), status="FAILED", setting="demo", group_kind=kind)]


def _section(trials, tmp_path, reference="smear"):
    from service.report.scores import cross_task_aggregates
    from service.report.sections import Scope

    return cross_task_aggregates(Scope(None, trials, tmp_path, "", "demo", reference, n_boot=1000))


def test_the_section_writes_its_table_files_and_cd_diagram(tmp_path):
    from service.report import SECTIONS
    from service.report.scores import cross_task_aggregates

    assert cross_task_aggregates in SECTIONS
    sec = _section(_glue_like(), tmp_path)
    text = "\n".join(sec.markdown)
    assert text.startswith("### Aggregates over tasks (reference `smear`)")
    assert "(`rte`, `cola`, `mrpc`)" in text and "the setting's test average" in text
    assert "| method | seeds/task | mean over tasks [95% CI] | IQM [95% CI] | P(> smear) [95% CI] | avg. rank |" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
            if line.startswith("| ")}
    assert "| (reference) | 4.00 |" in rows["smear"] and rows["hash"].endswith("| 1.000 [1.000, 1.000] | 1.00 |")
    # hash, task k = 0 1 2: .65 + .02 k + the seeds' offsets .01 (s (k+1) mod 3): 0 1 2 | 0 2 1 | 0 0 0, task means
    # .66 .68 .69 -> mean over tasks .676667; IQM of the 9 pooled scores, 2 cut each end: .67 .67 .68 .69 .69 -> .68
    assert rows["hash"].startswith("| hash | 3 | 67.67 [") and "] | 68.00 [" in rows["hash"]
    assert "Friedman test over the 3 tasks" in text and "](cd_diagram.png)" in text
    assert {p.name for p in sec.files} == {"aggregate.tex", "aggregate.csv", "cd_diagram.png"}
    png = (tmp_path / "cd_diagram.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    tex = (tmp_path / "aggregate.tex").read_text()
    assert r"\toprule" in tex and r"P($>$ smear)" in tex and r"[95\% CI]" in tex and tex.count(r"\\") == 5
    csv = (tmp_path / "aggregate.csv").read_text().splitlines()
    assert csv[0].startswith("method,seeds_per_task,mean,") and len(csv) == 5
    hash_row = next(r for r in csv if r.startswith("hash,")).split(",")
    assert hash_row[1] == "3 3 3" and float(hash_row[2]) == pytest.approx(0.676667)
    assert sec.numbers["aggregates"]["hash"].mean.value == pytest.approx(0.676667)
    assert sec.numbers["rank_test"].ranks == {"hash": 1.0, "adapter": 2.0, "tag": 3.0, "smear": 4.0}


def test_the_section_says_why_without_friedman_or_intervals(tmp_path):
    # one domain, one seed, an overall score that is not the mean over domains
    sec = _section(_glue_like(tasks=("real",), seeds=1, kind="domain", pooled=True), tmp_path)
    text = "\n".join(sec.markdown)
    assert "### Aggregates over domains" in text and "which is not the plain mean of the domains' scores" in text
    assert "No Friedman test and no critical-difference diagram: 1 domain: no ranks over domains" in text
    assert "- 1 seed in some domain: no interval (hash, adapter, tag, smear)" in text
    assert "| method | seeds/domain | mean over domains [95% CI] |" in text
    assert not (tmp_path / "cd_diagram.png").exists() and (tmp_path / "aggregate.csv").stat().st_size > 0
    # a single method, and a reference that is not in the sweep
    sec = _section(_glue_like(methods=("tag",)), tmp_path, reference="smear")
    text = "\n".join(sec.markdown)
    assert "no P(> `smear`)" in text and "1 method with a score on every task: the Friedman test needs at least 3" in text
    # no method with a score on every task
    from service.report.trials import Trial
    sec = _section([Trial("tag", "0", status="FAILED", group_kind="task")], tmp_path)
    assert sec.markdown[2] == "No aggregates over tasks: no method has a test score on every task." and not sec.files
