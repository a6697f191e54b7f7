"""The one identity of a sweep's trials: Tune's config of a trial -> its resolved config (typed) and what it asks
of Ray. The driver resolves every trial through :class:`SweepTrials` (the runner, the tracker, the progress
display, the summary) and hands the same object to the trainable; nothing else resolves a trial.

Grid and random sweeps: Tune's config is ``{TRIAL_KEY: index}`` into the configs the driver resolved from the
declaration (Tune's tables and folder names stay short); Optuna: Tune's config is the trial's config itself.

Its imports (the settings, torch) wait until a trial is typed: a process that only unpickles the identity (a
trial process before it trains; benchmarks/scale.py's simulated trials) does not pay for them (measured: ~9 s,
and 0.35 GB of RSS a process against 0.21 GB; BENCHMARKS.md, "Scale").
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainables.config import TrainConfig
    from trainables.resources import TrialResources

TRIAL_KEY = "trial_index"


class SweepTrials:
    """``configs``: the resolved config dicts a trial index refers to (None for Optuna); ``resources``: setting ->
    {cpu, gpu} per worker (the declaration's, with the flags' overrides)."""

    def __init__(self, configs: list[dict[str, Any]] | None, resources: dict[str, dict[str, float]]):
        self.configs, self.resources = configs, resources
        self._typed: dict[int, TrainConfig] = {}

    def __getstate__(self) -> dict[str, Any]:  # the typed cache is rebuilt where it is used
        return {"configs": self.configs, "resources": self.resources}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["configs"], state["resources"])

    def config(self, tune_config: dict[str, Any]) -> dict[str, Any]:
        """The trial's resolved config dict (what is logged and checkpointed)."""
        if TRIAL_KEY in tune_config:
            assert self.configs is not None, "a trial index needs the sweep's resolved configs"
            return self.configs[tune_config[TRIAL_KEY]]
        return tune_config

    def typed(self, tune_config: dict[str, Any]) -> TrainConfig:
        """The trial's typed config (built once per trial index)."""
        from trainables.settings import make_config

        index = tune_config.get(TRIAL_KEY)
        if index is None:
            return make_config(tune_config)
        if index not in self._typed:
            self._typed[index] = make_config(self.config(tune_config))
        return self._typed[index]

    def resources_of(self, tune_config: dict[str, Any]) -> TrialResources:
        """What the trial asks of Ray: its setting's per-worker resources, shaped by its own ``num_workers``."""
        from trainables.resources import TrialResources

        cfg = self.typed(tune_config)
        return TrialResources.of(cfg, self.resources.get(cfg.setting, {}))

    def method(self, tune_config: dict[str, Any]) -> str:
        return self.config(tune_config)["routing"]["method"]

    def run_name(self, tune_config: dict[str, Any], trial_id: str) -> str:
        return run_name(self.config(tune_config), trial_id)


def run_name(config: dict[str, Any], trial_id: str) -> str:
    """Readable, deterministic: method, seed, then the trial id (e.g. ``smear-s0-a1b2c_00000``): Tune's trial name
    and folder, and the MLflow run's name. ``config``: a resolved trial config."""
    return f"{config['routing']['method']}-s{config['seed']}-{trial_id}"
