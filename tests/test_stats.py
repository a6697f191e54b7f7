"""service/report/stats.py: intervals, paired tests and Holm's correction, against numbers worked by hand.

Closed forms of the two-sided Student t p-value used below (Abramowitz & Stegun 26.7.3/4, theta =
arctan(t / sqrt(df))):  df=1: p = 1 - (2/pi) theta;  df=2: p = 1 - t / sqrt(t^2 + 2);
df=4: p = 1 - sin(theta) (1 + cos(theta)^2 / 2).
"""
from __future__ import annotations

import csv
import io
import math

import pytest

from service.report.stats import (TTEST, WILCOXON, MethodSummary, PairedComparison, bootstrap_interval, compare,
                           format_markdown, holm, paired, summarize, t_interval, to_csv, to_latex_booktabs)

# smear:  0.50 0.52 0.54                      mean 0.52, sd 0.02
# good:   0.53 0.56 0.59   d = .03 .04 .05    significant (below)
# meh:    0.51 0.51 0.57   d = .01 -.01 .03   not significant (below)
SCORES = {"smear": {0: 0.50, 1: 0.52, 2: 0.54},
          "good": {0: 0.53, 1: 0.56, 2: 0.59},
          "meh": {0: 0.51, 1: 0.51, 2: 0.57}}
T975_2 = 4.302653  # t_{0.975, 2}, from a t table


def _by(items):
    return {x.method: x for x in items}


def test_t_interval_worked_by_hand():
    # mean 0.52; sd = sqrt((0.02^2 + 0 + 0.02^2) / 2) = 0.02; half-width 4.302653 * 0.02 / sqrt(3) = 0.049683
    lo, hi = t_interval([0.50, 0.52, 0.54])
    assert lo == pytest.approx(0.52 - 0.049683, abs=1e-6)
    assert hi == pytest.approx(0.52 + 0.049683, abs=1e-6)
    s = summarize("smear", SCORES["smear"])
    assert (s.n, s.interval, s.note) == (3, "t", "")
    assert s.mean == pytest.approx(0.52) and s.std == pytest.approx(0.02)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.470317, 0.569683), abs=1e-6)


def test_paired_difference_significant_and_not():
    summaries, comps = compare(SCORES)
    assert [s.method for s in summaries] == ["smear", "good", "meh"]
    assert [c.method for c in comps] == ["good", "meh"]
    good, meh = _by(comps)["good"], _by(comps)["meh"]
    # good - smear: d = .03 .04 .05, mean .04, sd .01, se = .01/sqrt(3) = 0.0057735, t = 6.928203 (= sqrt(48)), df 2
    # p = 1 - t/sqrt(t^2 + 2) = 1 - sqrt(48/50) = 0.020204; CI .04 +- 4.302653 * 0.0057735 = .04 +- 0.024841
    assert (good.reference, good.n_pairs, good.test) == ("smear", 3, TTEST)
    assert good.mean_diff == pytest.approx(0.04)
    assert (good.ci_low, good.ci_high) == pytest.approx((0.015159, 0.064841), abs=1e-6)
    assert good.p_value == pytest.approx(1 - math.sqrt(0.96), abs=1e-9)
    # meh - smear: d = .01 -.01 .03, mean .01, sd .02, se 0.011547, t = 0.866025 (= sqrt(3)/2), df 2
    # p = 1 - sqrt(0.75 / 2.75) = 0.477767; CI .01 +- 4.302653 * 0.011547 = .01 +- 0.049683 (contains 0)
    assert meh.mean_diff == pytest.approx(0.01)
    assert (meh.ci_low, meh.ci_high) == pytest.approx((-0.039683, 0.059683), abs=1e-6)
    assert meh.p_value == pytest.approx(1 - math.sqrt(0.75 / 2.75), abs=1e-9)
    # Holm over m = 2: sorted 0.020204, 0.477767 -> 2 * 0.020204 = 0.040408; max(0.040408, 1 * 0.477767)
    assert good.p_holm == pytest.approx(0.040408, abs=1e-6) and good.significant
    assert meh.p_holm == pytest.approx(0.477767, abs=1e-6) and not meh.significant


def test_holm_worked_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01 = 0.03, 2*0.03 = 0.06, 1*0.04 = 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # 2*0.5 = 1.0, 1*0.6 -> running max 1.0, 1.0; capped at 1
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
    assert holm([0.02]) == pytest.approx([0.02]) and holm([]) == []


def test_holm_changes_significance_in_compare():
    # good alone: p = 0.020204 < 0.05; with two more methods of p = 0.020204 (same scores), m = 3:
    # sorted all 0.020204 -> 3 * 0.020204 = 0.060612 for all: none significant after Holm.
    scores = {"smear": SCORES["smear"], "a": SCORES["good"], "b": SCORES["good"], "c": SCORES["good"]}
    _, comps = compare(scores)
    assert all(c.p_value == pytest.approx(0.020204, abs=1e-6) for c in comps)
    assert all(c.p_holm == pytest.approx(0.060612, abs=1e-6) and not c.significant for c in comps)
    # the same at alpha = 0.10: all significant
    assert all(c.significant for c in compare(scores, alpha=0.10)[1])


def test_wilcoxon_from_six_pairs_t_test_below():
    ref = {i: 0.5 for i in range(6)}
    # 6 pairs, d = .01 .02 .03 .04 .05 -.06: ranks 1..6, W- = 6. Subsets of {1..6} with rank sum <= 6:
    # {}, {1}, {2}, {3}, {1,2}, {4}, {1,3}, {5}, {1,4}, {2,3}, {6}, {1,5}, {2,4}, {1,2,3} = 14 of 2^6 = 64,
    # two-sided p = 2 * 14/64 = 0.4375 (exact)
    d6 = [0.01, 0.02, 0.03, 0.04, 0.05, -0.06]
    c6 = paired("m", {i: 0.5 + d for i, d in enumerate(d6)}, "smear", ref)
    assert (c6.test, c6.n_pairs) == (WILCOXON, 6)
    assert c6.p_value == pytest.approx(0.4375)
    # 5 pairs, d = .01 .02 .03 .04 .05: mean .03, sd = sqrt(10e-4 / 4) = 0.0158114, se = 0.0070711,
    # t = 3 sqrt(2) = 4.242641, df 4: tan(theta) = t/2, cos^2 = 1/5.5, sin = sqrt(4.5/5.5) = 0.904534,
    # p = 1 - 0.904534 * (1 + 0.181818/2) = 0.013236
    c5 = paired("m", {i: 0.5 + d for i, d in enumerate(d6[:5])}, "smear", ref)
    assert (c5.test, c5.n_pairs) == (TTEST, 5)
    assert c5.p_value == pytest.approx(0.013236, abs=1e-6)


def test_one_seed_and_no_seed_reported_as_such():
    scores = {**SCORES, "solo": {0: 0.60}, "failed": {0: None, 1: float("nan")}}
    summaries, comps = compare(scores)
    solo, failed = _by(summaries)["solo"], _by(summaries)["failed"]
    assert (solo.n, solo.mean, solo.std, solo.ci_low, solo.ci_high) == (1, 0.60, None, None, None)
    assert solo.note == "1 seed: no interval"
    assert (failed.n, failed.mean, failed.note) == (0, None, "0 seeds: no data")
    c = _by(comps)["solo"]
    assert (c.n_pairs, c.p_value, c.p_holm, c.significant, c.test) == (1, None, None, False, None)
    assert c.mean_diff == pytest.approx(0.10) and c.note == "1 shared seed with smear: no test"
    assert _by(comps)["failed"].note == "0 shared seeds with smear: no test"
    # no p-value -> not in the Holm family: good and meh still have m = 2 (see above)
    assert _by(comps)["good"].p_holm == pytest.approx(0.040408, abs=1e-6)


def test_pairing_uses_shared_seeds_only():
    # seed 0 only in smear, seed 7 only in "other": pairs on seeds 1, 2: d = .03, .04, mean .035,
    # sd = .01/sqrt(2) = 0.0070711, se = sd/sqrt(2) = 0.005, t = 7, df 1: p = 1 - (2/pi) arctan(7) = 0.090334
    scores = {"smear": SCORES["smear"], "other": {1: 0.55, 2: 0.58, 7: 0.99}}
    summaries, (c,) = compare(scores)
    assert c.n_pairs == 2 and c.mean_diff == pytest.approx(0.035)
    assert c.p_value == pytest.approx(1 - 2 / math.pi * math.atan(7), abs=1e-9)
    # the summary of "other" still uses all three of its seeds: (0.55 + 0.58 + 0.99) / 3 = 0.706667
    assert _by(summaries)["other"].n == 3
    assert _by(summaries)["other"].mean == pytest.approx(0.706667, abs=1e-6)
    # seeds pair by str(seed): "1" and 1 are one seed
    assert paired("m", {1: 0.55, 2: 0.58}, "smear", {"1": 0.52, "2": 0.54}).n_pairs == 2


def test_zero_variance_differences():
    ref = {i: 0.50 + 0.01 * i for i in range(6)}
    # all differences 0: test not run, p = 1 by definition (and Holm over m = 1 leaves it 1)
    (c0,) = compare({"smear": ref, "same": dict(ref)})[1]
    assert (c0.mean_diff, c0.p_value, c0.p_holm, c0.significant) == (0.0, 1.0, 1.0, False)
    assert "p = 1 by definition" in c0.note
    # 3 pairs all +0.01 (float noise aside): sd 0 -> t-test undefined, no p-value, out of the Holm family
    three = {i: ref[i] for i in range(3)}
    const = {i: v + 0.01 for i, v in three.items()}
    good = {i: v + (0.03, 0.04, 0.05)[i] for i, v in three.items()}
    _, comps = compare({"smear": three, "const": const, "good": good})
    c3 = _by(comps)["const"]
    assert (c3.test, c3.p_value, c3.p_holm, c3.significant) == (TTEST, None, None, False)
    assert "zero variance, t-test undefined" in c3.note
    assert (c3.ci_low, c3.ci_high) == pytest.approx((0.01, 0.01))
    # good alone in the family (m = 1): p_holm = p = 0.020204, not doubled
    assert _by(comps)["good"].p_holm == pytest.approx(0.020204, abs=1e-6)
    # 6 pairs all +0.01: Wilcoxon is defined on ranks: W- = 0 only for the all-plus signs, p = 2 * 1/64 = 0.03125
    c6 = paired("const", {i: v + 0.01 for i, v in ref.items()}, "smear", ref)
    assert (c6.test, c6.note) == (WILCOXON, "") and c6.p_value == pytest.approx(0.03125)


def test_bootstrap_deterministic_and_contains_mean():
    x = [0.50, 0.52, 0.54, 0.61, 0.47]
    a, b = bootstrap_interval(x, seed=3), bootstrap_interval(x, seed=3)
    assert a == b
    # 10000 draws of 5 values pin the quantiles to the same points whatever the seed; 50 draws do not
    assert bootstrap_interval(x, n_boot=50, seed=4) != bootstrap_interval(x, n_boot=50, seed=3)
    assert min(x) <= a[0] < sum(x) / len(x) < a[1] <= max(x)
    # two values 0 and 1: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles of 10000 draws are 0 and 1
    assert bootstrap_interval([0.0, 1.0], seed=0) == (0.0, 1.0)
    summaries, _ = compare(SCORES, interval="bootstrap", seed=3)
    again, _ = compare({"good": SCORES["good"], "smear": SCORES["smear"]}, interval="bootstrap", seed=3)
    s = _by(summaries)["smear"]
    assert s.interval == "bootstrap" and s.ci_low < s.mean < s.ci_high
    assert _by(again)["smear"] == s  # each method's bootstrap restarts from the seed: order does not matter


def test_markdown_table_cells():
    md = format_markdown(*compare({**SCORES, "solo": {0: 0.60}}))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["method"][:5] == ["seeds", "mean ± sd", "95% CI", "pairs", "diff vs smear"]
    assert rows["smear"][:4] == ["3", "0.5200 ± 0.0200", "[0.4703, 0.5697]", ""]
    assert rows["smear"][4] == "(reference)"
    assert rows["good"] == ["3", "0.5600 ± 0.0300", "[0.4855, 0.6345]", "3", "+0.0400*", "[+0.0152, +0.0648]",
                            TTEST, "0.020", "0.040"]
    assert rows["meh"][4] == "+0.0100" and rows["meh"][7:] == ["0.478", "0.478"]  # no star
    assert rows["solo"] == ["1", "0.6000", "-", "1", "+0.1000", "-", "-", "-", "-"]
    assert "Holm-adjusted p < 0.05" in md and "- solo: 1 seed: no interval" in md


def test_latex_booktabs_and_csv():
    scores = {"smear": SCORES["smear"], "top_k": SCORES["good"], "meh": SCORES["meh"]}
    summaries, comps = compare(scores)
    tex = to_latex_booktabs(summaries, comps)
    lines = tex.splitlines()
    assert lines[0].startswith(r"\begin{tabular}") and lines[-1] == r"\end{tabular}"
    assert [lines[1], lines[3], lines[-2]] == [r"\toprule", r"\midrule", r"\bottomrule"]
    assert r"top\_k & 3 & 0.5600 $\pm$ 0.0300 & [0.4855, 0.6345] & 3 & +0.0400$^{*}$ & " in tex
    assert r"95\% CI" in tex and "top_k" not in tex
    assert len(lines) == 2 + 1 + 1 + 3 + 2  # begin, toprule, header, midrule, 3 rows, bottomrule, end
    rows = list(csv.DictReader(io.StringIO(to_csv(summaries, comps))))
    assert [r["method"] for r in rows] == ["smear", "top_k", "meh"]
    top = rows[1]
    assert (top["seeds"], top["pairs"], top["test"], top["significant"]) == ("3", "3", TTEST, "True")
    assert float(top["mean_diff"]) == pytest.approx(0.04)
    assert float(top["p_holm"]) == pytest.approx(0.040408, abs=1e-6)
    assert rows[0]["note"] == "reference" and rows[0]["p_value"] == ""
    assert rows[2]["significant"] == "False"


def test_bad_input_one_line_errors():
    with pytest.raises(ValueError, match=r"^unknown reference method 'smaer'; methods: smear, good, meh$"):
        compare(SCORES, reference="smaer")
    with pytest.raises(ValueError, match=r"^unknown interval 'bca'; choose one of: t, bootstrap$"):
        compare(SCORES, interval="bca")
    with pytest.raises(ValueError, match="alpha and level must lie in"):
        compare(SCORES, alpha=1.5)
    with pytest.raises(ValueError, match="scores is empty"):
        compare({})
    with pytest.raises(ValueError, match=r"^method 'smear': seed '1' given twice \(as 1 and '1'\)$"):
        compare({"smear": {1: 0.5, "1": 0.6}})
    with pytest.raises(ValueError, match=r"^method 'meh', seed 2: score 'n/a' is not a number$"):
        compare({**SCORES, "meh": {2: "n/a"}})
    with pytest.raises(ValueError, match="unknown interval 'bca'"):
        summarize("smear", SCORES["smear"], interval="bca")


def test_dataclass_fields_as_documented():
    assert list(MethodSummary.__dataclass_fields__)[:7] == ["method", "n", "mean", "std", "ci_low", "ci_high", "note"]
    assert list(PairedComparison.__dataclass_fields__)[:11] == [
        "method", "reference", "n_pairs", "mean_diff", "ci_low", "ci_high", "test", "p_value", "p_holm",
        "significant", "note"]
