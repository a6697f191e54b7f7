"""Optuna over hyper-parameters with every point run once per seed (Tune's Repeater, the seed as the repeat).

Tune cannot combine ``grid_search`` with OptunaSearch. Putting the seed in Optuna's space would let TPE
"tune" the seed, favouring lucky ones. So an Optuna declaration lists its seeds in ``grid.seed`` instead.
Each configuration TPE suggests then runs once per seed, and TPE is told the mean of the objective over
them.
"""
from __future__ import annotations

from ray.tune.search import Repeater, Searcher
from ray.tune.search.repeater import TRIAL_INDEX


class SeedRepeater(Repeater):
    """Repeat each suggestion ``len(seeds)`` times, trial ``i`` of a group with ``seed = seeds[i]``."""

    def __init__(self, searcher: Searcher, seeds: list[int]):
        super().__init__(searcher, repeat=len(seeds), set_index=True)
        self.seeds = list(seeds)  # in Repeater.get_state(): restored with the sweep

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if isinstance(config, dict) and TRIAL_INDEX in config:
            index = config[TRIAL_INDEX]
            config = {k: v for k, v in config.items() if k != TRIAL_INDEX}
            config["seed"] = self.seeds[index]
        return config
