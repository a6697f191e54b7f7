"""The sweep's parent run in MLflow: created (or found again on ``--resume``), given the declaration and
the trial list, and ended with the sweep's status. Child runs are the tracker's (:mod:`service.tracking`).
"""
from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from service.spaces import Sweep
from service.tracking import get_or_create_experiment


class NoParentRun(LookupError):
    """``--resume`` of a sweep whose parent run is not in the tracking store (one line, exit 2)."""


@dataclass
class ParentRun:
    client: MlflowClient
    experiment_id: str
    run_id: str
    name: str

    @classmethod
    def open(cls, uri: str, sweep: Sweep, name: str, *, resume: bool, tags: dict[str, str]) -> "ParentRun":
        """The experiment ``smear-sweep/<declaration>`` and the sweep's parent run: a new one, or on resume the
        one tagged ``sweep=<name>``, set RUNNING again. The driver creates the store first: trials never race
        on its schema."""
        client = MlflowClient(uri)
        artifact_root = None
        if uri.startswith("sqlite:"):
            from pathlib import Path

            artifact_root = str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
        exp_id = get_or_create_experiment(client, experiment_name(sweep), artifact_root)
        if resume:
            runs = client.search_runs([exp_id], filter_string=f"tags.sweep = '{name}' and tags.declaration != ''",
                                      max_results=5)
            parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
            if not parents:
                raise NoParentRun(f"sweep {name!r} has no parent run in experiment {experiment_name(sweep)!r} of {uri}")
            run_id = parents[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(exp_id, run_name=name, tags={
                "sweep": name, "declaration": sweep.name, "search": sweep.search, "scheduler": sweep.scheduler,
                "mlflow.note.content": sweep.description, **tags}).info.run_id
            client.log_text(run_id, sweep.text, "declaration.yaml")
            client.log_dict(run_id, [{"index": t.index, **t.overrides} for t in sweep.trials], "trials.json")
        return cls(client, exp_id, run_id, name)

    def finish(self, status: str, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> bool:
        """End the parent run with ``status``; ``tags`` (e.g. ``sweep_error``: why the sweep ended) are set
        first. A tracking store that fails here (down, full) is said in one line on stderr, never raised:
        the sweep's own outcome stands. Returns whether everything was written. Its summary.md is the report's
        (:func:`service.report.publish_report`, after this)."""
        import sys

        try:
            for k, v in (tags or {}).items():
                self.client.set_tag(self.run_id, k, v[:5000])
            for k, v in (metrics or {}).items():
                self.client.log_metric(self.run_id, k, v)
            self.client.set_terminated(self.run_id, status)
            return True
        except Exception as e:
            print(f"launch.py: the parent run {self.name!r} could not be ended {status} in MLflow "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})", file=sys.stderr)
            return False


def experiment_name(sweep: Sweep) -> str:
    return f"smear-sweep/{sweep.name}"
