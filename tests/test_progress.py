"""The console progress line of a running sweep: trials done, and the running mean per method."""
from __future__ import annotations

from service.tables import progress_line
from trainables.identity import SweepTrials


def test_progress_line_worked_by_hand():
    # smear: (.55 + .544) / 2 = .547 over 2 trials; adapter .540 over 1; tag has not reported yet
    line = progress_line(4, 6, {"smear": [0.55, 0.544], "adapter": [0.54], "tag": []})
    assert line == "progress: 4/6 done | smear 0.547 (2) adapter 0.540 (1) tag - (0)"
    assert progress_line(0, 3, {}) == "progress: 0/3 done"
    assert progress_line(1, 1, {"smear": [float("nan"), 0.25]}) == "progress: 1/1 done | smear 0.250 (1)"


def test_progress_callback_on_tune_trials(capsys):
    """service.runner.ProgressLine on Ray Tune's own Trial objects, as Tune hands them to a callback."""
    from ray.tune.experiment import Trial as TuneTrial

    from service.runner import ProgressLine

    configs = [{"routing": {"method": m}, "seed": s} for s in (0, 1) for m in ("smear", "tag", "adapter")]
    trials = [TuneTrial("f", config={"trial_index": i}, stub=True) for i in range(4)]  # 4 of 6 created so far
    for i, v in [(0, 0.5), (1, 0.6), (2, 0.4), (3, 0.7)]:
        trials[i].update_last_result({"val/best_accuracy": v})
    trials[0].set_status(TuneTrial.TERMINATED)
    trials[2].set_status(TuneTrial.ERROR)
    cb = ProgressLine(total=6, metric="val/best_accuracy", trials=SweepTrials(configs, {}))
    cb.on_trial_complete(0, trials, trials[1])      # trial 1 ends now: with 0 and 2, 3 of 6 are done
    # smear: trials 0 (.5) and 3 (.7, still running, has reported) -> .600 over 2
    assert capsys.readouterr().out == "progress: 3/6 done | smear 0.600 (2) tag 0.600 (1) adapter 0.400 (1)\n"
