"""The console of a running sweep: one live display on a terminal, one plain line per trial end elsewhere.

:class:`SweepProgress` is a Ray Tune callback. Both forms show the same fields:

- trials done (finished or failed) of the sweep's, how many of them failed, how many run now;
- per method, the running mean of the primary validation metric over the trials that have reported it so far,
  finished or still running (:func:`service.report.tables.progress_line`);
- elapsed: wall time since this driver started the sweep (a resumed sweep counts from its resume);
- ETA: elapsed / trials ended in this run x trials left: the sweep's own pace so far (``-`` until one ends);
- device-hours: the sum over trials of the device share a trial holds times the wall time it has held it,
  from Tune starting the trial to its end (or now), as the driver sees it. A trial's device share is the one
  ``--estimate`` bills (:func:`trainables.resources.device_share`): ``resources.gpu`` x its workers (0.25 = a
  quarter of a GPU), or 1 for a CPU-only trial (then the "device" is the trial's CPUs).

On a terminal (``sys.stdout.isatty()``) the display is a `rich <https://rich.readthedocs.io>`_ live panel,
redrawn in place about once a second. Elsewhere (CI, a pipe, ``ray job logs``) it prints one line per trial
end, e.g. ``progress: 4/6 done (0 failed), 2 running | smear 0.547 (2) tag 0.540 (1) adapter 0.521 (1) |
elapsed 1m05s, ETA 33s, device-hours 0.036``.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

from ray.tune import Callback

from service.report.tables import duration, mean_std, progress_line
from trainables.identity import SweepTrials

REFRESH_S = 1.0  # the live display's redraw interval


class SweepProgress(Callback):
    """The sweep's progress display (module docstring: its fields and what each means).

    ``total``: the sweep's number of trials; ``metric``: the result key to average per method (the primary
    validation metric); ``trials``: the sweep's trial identity (``trainables.identity.SweepTrials``: each trial's
    method and resources; a setting without resources there holds a device share of 1);
    ``live``: True for the live display, False for plain lines, None: live when stdout is a terminal;
    ``console``: the rich console of the live display (default: one on stdout).
    """

    def __init__(self, total: int, metric: str, trials: SweepTrials, *, live: bool | None = None,
                 console=None, clock=time.monotonic):
        self.total, self.metric, self.trials = total, metric, trials
        self._live_wanted, self._console, self._clock = live, console, clock
        self._reset()

    def _reset(self) -> None:
        self._t0: float | None = None
        self._held: dict[str, float] = {}     # trial id -> seconds held by its ended attempts
        self._since: dict[str, float] = {}    # trial id -> when its current attempt started
        self._shares: dict[str, float] = {}
        self._ended = 0                       # trials ended in this run (the ETA's pace)
        self._trials: list = []
        self._live = None
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []  # log handlers moved onto the display
        self._drawn = 0.0

    # Tune pickles the callbacks with the sweep (tuner.pkl) and restores them on --resume: keep plain data only
    def __getstate__(self) -> dict:
        return {"total": self.total, "metric": self.metric, "trials": self.trials}

    def __setstate__(self, state: dict) -> None:  # also a pickled service.runner.ProgressLine (total, metric, configs)
        self.total, self.metric = state["total"], state["metric"]
        self.trials = state.get("trials") or SweepTrials(state.get("configs"), state.get("resources") or {})
        self._live_wanted, self._console, self._clock = None, None, time.monotonic
        self._reset()

    # ---- what the display shows

    def snapshot(self, trials: list, ending=None, failing: bool = False) -> dict[str, Any]:
        """The display's fields now, over Tune's ``trials``; ``ending``: the trial that ends at this call (Tune
        sets its status after the callbacks), ``failing``: whether it ends in error."""
        now = self._clock()
        t0 = self._t0 if self._t0 is not None else now
        done = sum(t.is_finished() or t is ending for t in trials)
        failed = sum((t.status == t.ERROR and t is not ending) or (t is ending and failing) for t in trials)
        running = sum(t.status == t.RUNNING and t is not ending for t in trials)
        scores: dict[str, list[float]] = {}
        for t in trials:
            values = scores.setdefault(self.trials.method(t.config), [])
            v = (t.last_result or {}).get(self.metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.append(float(v))
        total = max(self.total, len(trials))
        elapsed = now - t0
        eta = elapsed / self._ended * (total - done) if self._ended else None
        seconds = sum(self._share(t) * (self._held.get(t.trial_id, 0.0) + (now - self._since[t.trial_id]
                                                                            if t.trial_id in self._since else 0.0))
                      for t in trials)
        return {"done": done, "total": total, "failed": failed, "running": running, "scores": scores,
                "elapsed": elapsed, "eta": eta, "device_hours": seconds / 3600}

    def line(self, trials: list, ending=None, failing: bool = False) -> str:
        """The plain line (:func:`service.report.tables.progress_line` with every field)."""
        s = self.snapshot(trials, ending, failing)
        return progress_line(s["done"], s["total"], s["scores"], failed=s["failed"], running=s["running"],
                             elapsed=s["elapsed"], eta=s["eta"], device_hours=s["device_hours"])

    def renderable(self, trials: list, ending=None, failing: bool = False):
        """The live display's panel (rich): a bar of trials done, the counts and times, a table per method."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        s = self.snapshot(trials, ending, failing)
        head = Table.grid(padding=(0, 1))
        head.add_row(ProgressBar(total=s["total"] or 1, completed=s["done"], width=30),
                     f"{s['done']}/{s['total']} done ({s['failed']} failed), {s['running']} running")
        head.add_row("", f"elapsed {duration(s['elapsed'])}, ETA {duration(s['eta'])}, "
                         f"device-hours {s['device_hours']:.3f}")
        methods = Table(box=None, padding=(0, 2), show_edge=False)
        methods.add_column("method")
        methods.add_column(f"{self.metric} (mean)", justify="right")
        methods.add_column("trials", justify="right")
        for m, vs in s["scores"].items():
            ms = mean_std(vs)
            methods.add_row(m, "-" if ms is None else f"{ms[0]:.3f}", str(0 if ms is None else ms[2]))
        return Group(head, methods)

    def _share(self, trial) -> float:
        if trial.trial_id not in self._shares:
            self._shares[trial.trial_id] = self.trials.resources_of(trial.config).device_share
        return self._shares[trial.trial_id]

    # ---- Tune's hooks

    def setup(self, **info):
        self._t0 = self._clock()

    def on_step_end(self, iteration, trials, **info):
        self._trials = trials
        if self._is_live() and self._clock() - self._drawn >= REFRESH_S:
            self._draw(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._since[trial.trial_id] = self._clock()

    def on_trial_recover(self, iteration, trials, trial, **info):  # failed, will retry: its attempt has ended
        self._stop_clock(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trials, trial, failing=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trials, trial, failing=True)

    def on_experiment_end(self, trials, **info):
        if self._live is not None:
            self._draw(trials)
        self.close()

    def _end(self, trials, trial, failing: bool) -> None:
        self._stop_clock(trial)
        self._ended += 1
        if self._is_live():
            self._draw(trials, trial, failing)
        else:
            print(self.line(trials, trial, failing), flush=True)

    def _stop_clock(self, trial) -> None:
        start = self._since.pop(trial.trial_id, None)
        if start is not None:
            self._held[trial.trial_id] = self._held.get(trial.trial_id, 0.0) + self._clock() - start

    # ---- the live display

    def _is_live(self) -> bool:
        if self._live_wanted is None:
            self._live_wanted = bool(self._console.is_terminal) if self._console is not None else sys.stdout.isatty()
        return self._live_wanted

    def _draw(self, trials, ending=None, failing: bool = False) -> None:
        from rich.live import Live

        if self._live is None:
            # no refresh thread: Tune's own loop redraws it (on_step_end), so the display reads Tune's trials
            # only from Tune's thread. What is printed meanwhile goes above it: print() through rich's
            # redirection of sys.stdout / sys.stderr, log records (Ray's, MLflow's) through their handlers, which
            # hold the streams they were made with, pointed at the redirected ones while the display lasts
            streams = {id(sys.stdout): "stdout", id(sys.stderr): "stderr", id(sys.__stdout__): "stdout",
                       id(sys.__stderr__): "stderr"}
            self._live = Live(console=self._console, auto_refresh=False, transient=False)
            self._live.start()
            self._handlers = [(h, h.setStream(getattr(sys, streams[id(h.stream)])))
                              for h in _stream_handlers() if id(h.stream) in streams]
            _OPEN.append(self)
        self._live.update(self.renderable(trials, ending, failing), refresh=True)
        self._drawn = self._clock()

    def close(self) -> None:
        """Stop the live display (its last state stays on screen); a no-op for plain lines."""
        if self._live is not None:
            for h, stream in self._handlers:
                h.setStream(stream)
            self._handlers = []
            self._live.stop()
            self._live = None
        if self in _OPEN:
            _OPEN.remove(self)


_OPEN: list[SweepProgress] = []  # live displays not yet stopped (close_displays, when a sweep ends abnormally)


def _stream_handlers() -> list[logging.StreamHandler]:
    """Every console handler of every logger (file handlers left out)."""
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    found = {id(h): h for lg in loggers for h in lg.handlers
             if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)}
    return list(found.values())


def close_displays() -> None:
    """Stop every live display still open: a sweep interrupted or failed before Tune's experiment end."""
    for p in list(_OPEN):
        p.close()

