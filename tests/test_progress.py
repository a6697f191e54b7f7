"""The console of a running sweep (service/progress.py): trials done / running / failed, the running mean per
method, elapsed time and ETA, device-hours; plain lines off a terminal, one live display on one."""
from __future__ import annotations

import io
import logging
import pickle
import sys

from service.report.tables import progress_line
from trainables.identity import SweepTrials


def test_progress_line_worked_by_hand():
    # smear: (.55 + .544) / 2 = .547 over 2 trials; adapter .540 over 1; tag has not reported yet
    line = progress_line(4, 6, {"smear": [0.55, 0.544], "adapter": [0.54], "tag": []})
    assert line == "progress: 4/6 done | smear 0.547 (2) adapter 0.540 (1) tag - (0)"
    assert progress_line(0, 3, {}) == "progress: 0/3 done"
    assert progress_line(1, 1, {"smear": [float("nan"), 0.25]}) == "progress: 1/1 done | smear 0.250 (1)"
    # with every field of the sweep's console: 75 s elapsed, ETA not known yet, 0.0125 device-hours
    line = progress_line(1, 6, {"smear": [0.5]}, failed=0, running=2, elapsed=75, eta=None, device_hours=0.0125)
    assert line == "progress: 1/6 done (0 failed), 2 running | smear 0.500 (1) | elapsed 1m15s, ETA -, device-hours 0.013"


class Clock:
    """A driver clock the test moves by hand (seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _tune_trials(n: int):
    from ray.tune.experiment import Trial as TuneTrial

    return [TuneTrial("f", config={"trial_index": i}, stub=True) for i in range(n)]  # n of 6 created so far


CONFIGS = [{"setting": "resnet_domainnet", "num_workers": 1, "routing": {"method": m}, "seed": s}
           for s in (0, 1) for m in ("smear", "tag", "adapter")]


def test_progress_callback_on_tune_trials(capsys):
    """The plain line (stdout not a terminal) on Ray Tune's own Trial objects, as Tune hands them to a callback."""
    from ray.tune.experiment import Trial as TuneTrial

    from service.progress import SweepProgress

    trials = _tune_trials(4)
    for i, v in [(0, 0.5), (1, 0.6), (2, 0.4), (3, 0.7)]:
        trials[i].update_last_result({"val/best_accuracy": v})
    trials[0].set_status(TuneTrial.TERMINATED)
    trials[2].set_status(TuneTrial.ERROR)
    cb = SweepProgress(total=6, metric="val/best_accuracy", trials=SweepTrials(CONFIGS, {}), clock=Clock())
    cb.on_trial_complete(0, trials, trials[1])      # trial 1 ends now: with 0 and 2, 3 of 6 are done
    # smear: trials 0 (.5) and 3 (.7, still running, has reported) -> .600 over 2; nothing timed (no clock moved)
    assert capsys.readouterr().out == ("progress: 3/6 done (1 failed), 0 running | smear 0.600 (2) tag 0.600 (1) "
                                       "adapter 0.400 (1) | elapsed 0s, ETA 0s, device-hours 0.000\n")


def test_progress_times_and_device_hours_worked_by_hand(capsys):
    """Four trials start at t=0; 0 ends at 30 min; 2 fails at 35 min, is retried at 40 min and fails for good
    at 45 min; 1 ends at 1 h; 3 still runs. Each trial holds half a GPU (resources.gpu 0.5)."""
    from ray.tune.experiment import Trial as TuneTrial

    from service.progress import SweepProgress

    clock, trials = Clock(), _tune_trials(4)
    cb = SweepProgress(total=6, metric="val/best_accuracy", trials=SweepTrials(CONFIGS, {"resnet_domainnet": {"cpu": 1, "gpu": 0.5}}),
                       clock=clock)
    cb.setup(total_num_samples=6)
    for t in trials:
        cb.on_trial_start(0, trials, t)
        t.set_status(TuneTrial.RUNNING)
    for i, v in [(0, 0.5), (1, 0.6), (2, 0.4), (3, 0.7)]:
        trials[i].update_last_result({"val/best_accuracy": v})
    clock.now = 1800
    cb.on_trial_complete(0, trials, trials[0])
    trials[0].set_status(TuneTrial.TERMINATED)
    clock.now = 2100                                # trial 2 failed and is retried: it holds nothing for 5 min
    cb.on_trial_recover(0, trials, trials[2])
    clock.now = 2400
    cb.on_trial_start(0, trials, trials[2])
    clock.now = 2700
    cb.on_trial_error(0, trials, trials[2])
    trials[2].set_status(TuneTrial.ERROR)
    clock.now = 3600
    cb.on_trial_complete(0, trials, trials[1])
    first, second, third = capsys.readouterr().out.splitlines()
    # t=30 min: 1 done, 3 others running; ETA 30 min / 1 ended x 5 left = 2h30m;
    # device-hours 0.5 GPU x (0.5 h + 3 x 0.5 h) = 1.000
    assert first == ("progress: 1/6 done (0 failed), 3 running | smear 0.600 (2) tag 0.600 (1) adapter 0.400 (1) | "
                     "elapsed 30m00s, ETA 2h30m, device-hours 1.000")
    assert second.startswith("progress: 2/6 done (1 failed), 2 running |")
    # t=1 h: trial 0 0.5 h, trial 1 1 h, trial 2 (35 + 5) min = 2/3 h, trial 3 1 h (running):
    # 0.5 x (0.5 + 1 + 2/3 + 1) = 1.583; ETA 1 h / 3 ended x 3 left = 1 h
    assert third == ("progress: 3/6 done (1 failed), 1 running | smear 0.600 (2) tag 0.600 (1) adapter 0.400 (1) | "
                     "elapsed 1h00m, ETA 1h00m, device-hours 1.583")


def test_live_display_on_a_terminal():
    """On a terminal: one rich live panel with the same fields, redrawn in place; stdout, stderr and the log
    handlers point back where they were once it stops."""
    from ray.tune.experiment import Trial as TuneTrial
    from rich.console import Console

    from service.progress import SweepProgress

    clock, trials = Clock(), _tune_trials(4)
    screen = Console(file=io.StringIO(), force_terminal=True, width=100, color_system=None)
    cb = SweepProgress(total=6, metric="val/best_accuracy", trials=SweepTrials(CONFIGS, {}), console=screen, clock=clock)
    cb.setup(total_num_samples=6)
    for i, v in [(0, 0.5), (1, 0.6), (2, 0.4), (3, 0.7)]:
        trials[i].update_last_result({"val/best_accuracy": v})
        cb.on_trial_start(0, trials, trials[i])
        trials[i].set_status(TuneTrial.RUNNING)
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("tests.progress").addHandler(handler)
    stdout, stderr = sys.stdout, sys.stderr
    try:
        clock.now = 90
        cb.on_trial_complete(0, trials, trials[0])
        trials[0].set_status(TuneTrial.TERMINATED)
        assert sys.stdout is not stdout and handler.stream is not stderr  # printed output goes above the panel
        print("a line printed meanwhile")
        clock.now = 120
        cb.on_step_end(0, trials)
        cb.on_experiment_end(trials)
    finally:
        logging.getLogger("tests.progress").removeHandler(handler)
    assert sys.stdout is stdout and sys.stderr is stderr and handler.stream is stderr
    shown = screen.file.getvalue()
    assert "a line printed meanwhile" in shown
    assert "progress:" not in shown                  # no plain lines on a terminal
    text = _render(cb.renderable(trials))            # the last state, as the panel shows it
    assert "1/6 done (0 failed), 3 running" in text
    assert "elapsed 2m00s, ETA 10m00s, device-hours 0.125" in text  # 2 min / 1 x 5; (1.5 + 3 x 2) min / 60
    rows = [line.split() for line in text.splitlines()]
    assert ["smear", "0.600", "2"] in rows and ["tag", "0.600", "1"] in rows and ["adapter", "0.400", "1"] in rows


def _render(renderable) -> str:
    from rich.console import Console

    c = Console(file=io.StringIO(), width=100, color_system=None, record=True)
    c.print(renderable)
    return c.export_text()


def test_progress_callback_pickles_as_plain_data():
    """Tune pickles callbacks with the sweep (tuner.pkl) and restores them on --resume: no display, no clock
    state; and a sweep started before this display pickled a service.runner.ProgressLine of three fields."""
    from service.progress import SweepProgress
    from service.runner import ProgressLine

    resources = {"resnet_domainnet": {"cpu": 1, "gpu": 0.5}}
    cb = SweepProgress(6, "val/best_accuracy", SweepTrials(CONFIGS, resources), live=True)
    back = pickle.loads(pickle.dumps(cb))
    assert (back.total, back.metric, back.trials.configs, back.trials.resources) == (6, "val/best_accuracy", CONFIGS,
                                                                                     resources)
    old = ProgressLine.__new__(ProgressLine)
    old.__setstate__({"total": 6, "metric": "val/best_accuracy", "configs": CONFIGS})
    assert old.trials.resources == {} and old.line(_tune_trials(2)).startswith("progress: 0/6 done (0 failed), 0 running")
