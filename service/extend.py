"""More seeds for a finished sweep (``launch.py --extend --name RUN --seeds 3,4``).

The declaration's grid at the new seeds runs as one more Ray Tune experiment, ``<RUN>-extend-<seeds>``,
under the same storage, and its trials' MLflow runs are children of the sweep's parent run (tagged
``extension=<that name>``). The sweep's finished trials are not touched: their Tune experiment is not
restored, their MLflow runs are not reopened, none re-runs. The report reads the parent run's children
back from MLflow, so it covers every seed. The parent run remembers each extension in a tag
``extend.<name>`` (``running``, then ``done``): an interrupted extension continues with the same
``--extend`` command (its Tune experiment is restored, like ``--resume``).

Everything is checked before anything starts; a bad request is one ConfigError line (exit 2).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from service.spaces import METHOD_KEY, Sweep
from smear.configs import ConfigError

FINISHED = ("FINISHED", "FAILED")  # a sweep that ran to its end (FAILED: some of its trials failed)
RUNNING, DONE = "running", "done"


def parse_seeds(text: str) -> list[int]:
    """``"3,4"`` -> [3, 4]: distinct integers >= 0, else ValueError naming the bad value."""
    seeds = []
    for part in text.split(","):
        try:
            seed = int(part.strip())
        except ValueError:
            raise ValueError(f"--seeds={text!r}: {part.strip()!r} is not an integer; valid: comma-separated "
                             "integers >= 0, e.g. 3,4") from None
        if seed < 0 or seed in seeds:
            raise ValueError(f"--seeds={text!r}: {seed} is {'negative' if seed < 0 else 'given twice'}; valid: "
                             "distinct integers >= 0, e.g. 3,4")
        seeds.append(seed)
    return seeds


def extension_name(name: str, seeds: list[int]) -> str:
    """The extension's Tune experiment (a folder under the storage), e.g. ``t-extend-3-4``."""
    return f"{name}-extend-{'-'.join(map(str, seeds))}"


@dataclass
class Extension:
    name: str          # the sweep's run name: its MLflow parent run (tag sweep=<name>)
    experiment: str    # the extension's Tune experiment name
    seeds: list[int]
    resume: bool       # an interrupted run of this extension: restore its Tune experiment

    @property
    def tag(self) -> str:
        return f"extend.{self.experiment}"

    def start(self, parent, sweep: Sweep) -> None:
        """Mark the extension running on the parent run and record its trial list next to the sweep's."""
        parent.tag(self.tag, RUNNING)
        parent.artifact(f"trials-{self.experiment}.json",
                        json.dumps([{"index": t.index, **t.overrides} for t in sweep.trials]))

    def done(self, parent) -> None:
        parent.tag(self.tag, DONE)


def _points(overrides: list[dict]) -> set[str]:
    """The trials' overrides without the seed, in a comparable form (what an extension must repeat)."""
    return {json.dumps({k: v for k, v in o.items() if k not in ("seed", "index")}, sort_keys=True)
            for o in json.loads(json.dumps(overrides))}


def _recorded_trials(client, run_id: str) -> list[dict] | None:
    """The parent run's trials.json (the trial list the sweep ran), or None if it has none."""
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with tempfile.TemporaryDirectory() as d:
            return json.loads(Path(client.download_artifacts(run_id, "trials.json", d)).read_text())
    except Exception:
        return None
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def plan(uri: str, storage: str, name: str, sweep: Sweep, smoke: bool, seeds: list[int],
         methods: list[str] | None = None) -> Extension:
    """Check that ``name`` is a finished sweep of this declaration that lacks every one of ``seeds``, and say
    how to run the extension. ``methods``: the sweep was loaded with that method filter (``--until-decided``'s
    rounds), so its trials repeat the recorded ones of those methods. Reads the MLflow store, writes nothing;
    ConfigError (one line) otherwise."""
    from service.record import experiment_name
    from service.report.trials import ReportError, find_sweep, open_store
    from service.runner import can_resume

    try:
        client = open_store(uri)
        parent, _ = find_sweep(client, name, experiment_name(sweep))
    except ReportError as e:
        raise ConfigError(f"no sweep {name!r} to extend: {e}") from None
    tags, run_id = parent.data.tags, parent.info.run_id
    if tags.get("smoke", str(smoke)) != str(smoke):
        flag = "with" if tags["smoke"] == "True" else "without"
        raise ConfigError(f"sweep {name!r} ran {flag} --smoke; valid: --extend {flag} --smoke, like the sweep")
    experiment = extension_name(name, seeds)
    state = tags.get(f"extend.{experiment}")
    if state != RUNNING and parent.info.status not in FINISHED:
        raise ConfigError(f"sweep {name!r} is {parent.info.status}, not finished; valid: a finished sweep "
                          f"(continue this one first with --resume)")
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                  max_results=50_000)
    present = sorted({int(s) for r in children if (s := r.data.tags.get("seed", "")).isdigit()
                      and not (state == RUNNING and r.data.tags.get("extension") == experiment)})
    if clash := [s for s in seeds if s in present]:
        raise ConfigError(f"--seeds: seed {clash[0]} is already in sweep {name!r} (seeds "
                          f"{', '.join(map(str, present))}); valid: seeds it does not have")
    recorded = _recorded_trials(client, run_id)
    if recorded is not None and methods is not None:
        recorded = [o for o in recorded if o.get(METHOD_KEY) in methods]
    now = [t.overrides for t in sweep.trials]
    if recorded is not None and _points(recorded) != _points(now):
        raise ConfigError(f"declaration {sweep.name!r} now resolves to other trials than sweep {name!r} ran "
                          f"({len(_points(recorded))} settings then, {len(_points(now))} now, seeds aside); valid: "
                          "the declaration and flags (--smoke, --num-samples) the sweep ran with")
    return Extension(name, experiment, list(seeds), resume=state == RUNNING and can_resume(storage, experiment))
