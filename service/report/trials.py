"""A sweep's trials read back from MLflow: the store (checked before use), the parent run by its sweep name,
and one :class:`Trial` per child run. A setting's metric names come from each run's own tags
(``Setting.record_tags``): no copy here.

Imports stay light (mlflow only; no ray, torch or trainables).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from service.refusal import first_line

EXPERIMENT_PREFIX = "smear-sweep/"


class ReportError(Exception):
    """Bad input (no such sweep, unreadable store): one line, exit code 2."""


@dataclass
class Trial:
    """One child run, reduced to what the report needs. Missing values are None."""
    method: str
    seed: str
    run_name: str = ""
    run_id: str = ""
    status: str = "FINISHED"
    setting: str = "?"                   # the run's setting tag (or param)
    primary: str = "accuracy"            # the setting's metric names travel with each run (its tags)
    group_metric: str = "accuracy"       # test/<group>/<group_metric>
    group_kind: str = "group"            # what a group is: domain, task
    test: float | None = None            # overall test metric (test/accuracy or test/average)
    val_best: float | None = None        # val/best_<primary>
    groups: dict[str, float] = field(default_factory=dict)   # group -> test/<group>/<metric>
    group_order: list[str] = field(default_factory=list)
    wall_s: float | None = None          # MLflow run end_time - start_time
    params: dict[str, str] = field(default_factory=dict)     # the trial's flattened config, as logged
    compute: dict[str, float] = field(default_factory=dict)  # compute/* metrics (trainables.accounting, loop)
    artifact_uri: str = ""               # the run's artifact root: its files are read without a lookup of the run
    metric_keys: frozenset[str] | None = None  # the metrics the run has (None: not known): no history read of others


def open_store(tracking_uri: str):
    """An MlflowClient of a store that exists and answers; else ReportError (one line). A missing sqlite file
    is not created (MLflow would create an empty store). Shared with launch.py --extend (service/extend.py)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():  # MLflow would create an empty store here: say it is missing instead
            raise ReportError(f"no MLflow store at {db} (tracking URI {tracking_uri})")
    try:
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    except ReportError:
        raise
    except Exception as e:
        first = first_line(e)
        raise ReportError(f"cannot read the MLflow store {tracking_uri!r}: {first}") from None
    return client


def _quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _search_all(client, experiment_ids: list[str], filter_string: str = "") -> list:
    from mlflow.entities import ViewType

    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, order_by=["attributes.start_time DESC"], page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _experiments(client, experiment: str | None) -> list:
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments() if e.name.startswith(EXPERIMENT_PREFIX))
            raise ReportError(f"experiment {experiment!r} not found; experiments: {', '.join(names) or 'none'}")
        return [exp]
    return [e for e in client.search_experiments() if e.name.startswith(EXPERIMENT_PREFIX)]


def _is_parent(run) -> bool:
    return "mlflow.parentRunId" not in run.data.tags and "sweep" in run.data.tags


def find_sweep(client, sweep: str, experiment: str | None = None):
    """(parent run, experiment) of the sweep named ``sweep``; the newest if several share the name."""
    exps = _experiments(client, experiment)
    ids = [e.experiment_id for e in exps]
    parents = [r for r in _search_all(client, ids, f"tags.sweep = {_quote(sweep)}") if _is_parent(r)] if ids else []
    if not parents:
        found: list[str] = []
        for r in (_search_all(client, ids) if ids else []):
            if _is_parent(r) and r.data.tags["sweep"] not in found:
                found.append(r.data.tags["sweep"])
        shown = ", ".join(found[:20]) + (f", ... ({len(found)} in all)" if len(found) > 20 else "")
        where = f"experiment {experiment!r}" if experiment else f"experiments {EXPERIMENT_PREFIX}*"
        raise ReportError(f"sweep {sweep!r} not found in {where}; sweeps found: {shown or 'none'}")
    parent = parents[0]  # newest first
    return parent, next(e for e in exps if e.experiment_id == parent.info.experiment_id)


def _infer_primary(metrics: dict[str, float]) -> str:
    """A run recorded without the setting's tags: its primary metric is the one with a ``val/best_`` record."""
    return next((k[len("val/best_"):] for k in sorted(metrics) if k.startswith("val/best_")), "accuracy")


def trial_from_run(run) -> Trial:
    """One child run -> Trial. The setting's metric names come from the run's own tags (``primary_metric``,
    ``group_metric``, ``group_kind``, ``groups``: ``Setting.record_tags``), so the report keeps no copy."""
    tags, metrics, info = run.data.tags, run.data.metrics, run.info
    setting = tags.get("setting") or run.data.params.get("setting") or "?"
    primary = tags.get("primary_metric") or _infer_primary(metrics)
    gmetric = tags.get("group_metric") or primary
    groups = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "test" and parts[2] == gmetric and _finite(value):
            groups[parts[1]] = value
    order = [g for g in tags.get("groups", "").split(",") if g in groups]
    order += sorted(g for g in groups if g not in order)
    wall = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    return Trial(method=tags.get("method") or run.data.params.get("routing.method") or "?",
                 seed=tags.get("seed") or run.data.params.get("seed") or "?",
                 run_name=info.run_name or "", run_id=info.run_id, status=info.status, setting=setting,
                 primary=primary, group_metric=gmetric, group_kind=tags.get("group_kind") or "group",
                 test=_num(metrics.get(f"test/{primary}")), val_best=_num(metrics.get(f"val/best_{primary}")),
                 groups=groups, group_order=order, wall_s=wall, params=dict(run.data.params),
                 compute={k[len("compute/"):]: v for k, v in metrics.items() if k.startswith("compute/") and _finite(v)},
                 artifact_uri=info.artifact_uri or "", metric_keys=frozenset(metrics))


def read_trials(client, parent) -> list[Trial]:
    children = _search_all(client, [parent.info.experiment_id],
                           f"tags.mlflow.parentRunId = {_quote(parent.info.run_id)}")
    return [trial_from_run(r) for r in children]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _num(v) -> float | None:
    return float(v) if _finite(v) else None


def score_key(trial: Trial) -> tuple[bool, float]:
    """Sort key of "the best trial": one with an overall test metric before one without, then the higher."""
    return trial.test is not None, trial.test or 0.0
