"""service/report/diagnostics.py on numbers worked by hand."""
from __future__ import annotations

import math

import pytest

from service.report.diagnostics import curve_band, mutual_information, sensitivity, specialisation, varied_params


def test_mutual_information_hand_worked():
    assert mutual_information([[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(math.log(2))   # one expert per group
    assert mutual_information([[0.5, 0.5], [0.5, 0.5]]) == pytest.approx(0.0)           # routing ignores the group
    # p(e|g) = [.75, .25], [.25, .75]; p(e) = [.5, .5]: I = .75 ln 1.5 + .25 ln .5 = 0.304099 - 0.173287 = 0.130812
    assert mutual_information([[0.75, 0.25], [0.25, 0.75]]) == pytest.approx(0.130812, abs=1e-6)
    # three groups, one shared expert: rows identical -> 0
    assert mutual_information([[0.2, 0.8]] * 3) == pytest.approx(0.0)


def test_specialisation_averages_trials_and_skips_single_expert_blocks():
    a = {"blocks": {"layer1.0": [[1.0, 0.0], [0.0, 1.0]], "dense": [[1.0], [1.0]]}}
    b = {"blocks": {"layer1.0": [[0.5, 0.5], [0.5, 0.5]]}}
    assert specialisation([a, b]) == pytest.approx({"layer1.0": math.log(2) / 2})


def test_curve_band_over_seeds():
    band = curve_band([[(10, 0.5), (20, 0.7)], [(10, 0.3), (20, 0.9), (30, 1.0)]])
    assert band == [(10, pytest.approx(0.4), 0.3, 0.5, 2), (20, pytest.approx(0.8), 0.7, 0.9, 2), (30, 1.0, 1.0, 1.0, 1)]


def test_varied_params_and_sensitivity_best_first():
    params = [{"seed": "0", "lr": "0.1", "routing.method": "smear"}, {"seed": "1", "lr": "0.01", "routing.method": "smear"}]
    assert varied_params(params) == ["lr"]
    rows = sensitivity([("0.1", "0", 0.50), ("0.1", "1", 0.52), ("0.1", "2", 0.54), ("0.01", "0", 0.60),
                        ("0.01", "1", 0.62), ("0.01", "2", 0.64), ("1.0", "0", 0.4)])
    assert [r["value"] for r in rows] == ["0.01", "0.1", "1.0"]
    # [0.60, 0.62, 0.64]: mean 0.62, sd 0.02, t_{.975,2} = 4.302653: half-width 0.049683
    assert rows[0]["mean"] == pytest.approx(0.62) and rows[0]["ci"][1] - 0.62 == pytest.approx(0.049683, abs=1e-6)
    assert rows[2]["n"] == 1 and rows[2]["ci"] == (None, None) and rows[2]["note"]
