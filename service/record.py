"""The sweep's parent run in MLflow: created (or found again on ``--resume`` / ``--extend``), given the
declaration and the trial list, ended with the sweep's status, and the report published to it. Child runs are
the tracker's (:mod:`service.tracking`). Every write after the parent run's creation goes through the sweep's
journal (:mod:`service.journal`) and its MLflow replica (:mod:`service.replica`), as the trials' do; a sweep
that ends with writes unsent says which runs lack what and how to send them (:meth:`ParentRun.incomplete`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from service.journal import PARENT, journal_path
from service.replica import Replica, get_or_create_experiment
from service.spaces import Sweep

EXIT_RECORD_INCOMPLETE = 4  # the sweep ended, but the tracking server has not got all of its record (--sync sends it)


class NoParentRun(LookupError):
    """``--resume`` of a sweep whose parent run is not in the tracking store (one line, exit 2)."""


@dataclass
class ParentRun:
    replica: Replica
    experiment_id: str
    run_id: str
    name: str
    storage: str

    @property
    def client(self) -> MlflowClient:
        return self.replica.client

    @classmethod
    def open(cls, uri: str, sweep: Sweep, name: str, *, storage: str, resume: bool,
             tags: dict[str, str]) -> "ParentRun":
        """The experiment ``smear-sweep/<declaration>`` and the sweep's parent run: a new one, or on resume the
        one tagged ``sweep=<name>``, set RUNNING again after the journal's unsent writes were sent
        (:meth:`~service.replica.Replica.sync`). The driver creates the store first: trials never race on its
        schema."""
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
        else:
            run_id = client.create_run(exp_id, run_name=name, tags={
                "sweep": name, "declaration": sweep.name, "search": sweep.search, "scheduler": sweep.scheduler,
                "mlflow.note.content": sweep.description, **tags}).info.run_id
        replica = Replica.at(journal_path(storage, name), uri, exp_id, run_id)
        parent = cls(replica, exp_id, run_id, name, storage)
        if resume:
            replica.sync()  # before anything new is written: what an earlier driver could not send goes first
        if not replica.journal.state(PARENT).opened:
            replica.write(PARENT, "open", run_id=run_id, experiment_id=exp_id, uri=uri, name=name)
        if resume:
            replica.write(PARENT, "start")
        else:
            parent.artifact("declaration.yaml", sweep.text)
            parent.artifact("trials.json", json.dumps([{"index": t.index, **t.overrides} for t in sweep.trials]))
        return parent

    @classmethod
    def attach(cls, uri: str, name: str, storage: str) -> "ParentRun":
        """The parent run of the sweep ``name`` as its journal in ``storage`` records it, to write to between two
        of its Tune experiments (``--until-decided``'s state): no reopening, its status stays what it is."""
        from service.journal import Journal

        header = Journal.at(journal_path(storage, name)).parent
        replica = Replica.at(journal_path(storage, name), uri, header["experiment_id"], header["run_id"])
        return cls(replica, header["experiment_id"], header["run_id"], name, storage)

    def tag(self, key: str, value: str) -> None:
        self.replica.write(PARENT, "tags", tags={key: value[:5000]})

    def artifact(self, path: str, text: str) -> None:
        self.replica.write(PARENT, "artifact", path=path, text=text)

    def finish(self, status: str, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> None:
        """End the parent run with ``status``; ``tags`` (e.g. ``sweep_error``: why the sweep ended) and
        ``metrics`` are written first, all through the journal. :meth:`publish` comes after."""
        if tags:
            self.replica.write(PARENT, "tags", tags={k: v[:5000] for k, v in tags.items()})
        if metrics:
            self.replica.write(PARENT, "metrics", step=0, ts=int(time.time() * 1000), final=True,
                               values={k: float(v) for k, v in metrics.items()})
        self.replica.write(PARENT, "end", status=status, end_time=int(time.time() * 1000), tags={})

    def publish(self, publisher, **data) -> bool:
        """The report, once the record is complete: its journal entry (``data``: what the report needs), sent
        after every earlier write (one queue, in order; none once the wait for a lost server is over), then
        ``publisher(data) -> bool`` writes it; returns whether the whole record is in MLflow."""
        self.replica.publisher = publisher
        self.replica.write(PARENT, "report", **data)
        return self.replica.flush()

    def incomplete(self) -> str:
        """The lines a sweep ends with when its record is not all in MLflow: which runs lack what, and the
        command that sends it (exit EXIT_RECORD_INCOMPLETE)."""
        return incomplete_note(self.replica, self.name, self.storage)


def incomplete_note(replica: Replica, name: str, storage: str, limit: int = 40) -> str:
    missing = replica.missing()
    trials = [(k, m) for k, m in missing.items() if k != PARENT]
    lines = [f"launch.py: sweep {name}: the MLflow record is incomplete (exit {EXIT_RECORD_INCOMPLETE}): "
             f"{replica.uri} did not take every write; {len(trials)} trial run(s) lack some:"]
    lines += [f"  {m.name} ({k}): {m.describe()}" for k, m in trials[:limit]]
    if len(trials) > limit:
        lines.append(f"  ... and {len(trials) - limit} more")
    if PARENT in missing:
        lines.append(f"  the parent run {name}: {missing[PARENT].describe()}")
    lines += [f"Nothing is lost: every write is in {replica.journal.path}. Once the server answers, send them with:",
              f"  python service/launch.py --sync --name {name} --storage {storage} --tracking-uri {replica.uri}"]
    return "\n".join(lines)


def experiment_name(sweep: Sweep) -> str:
    return f"smear-sweep/{sweep.name}"
