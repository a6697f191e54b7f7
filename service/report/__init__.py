"""The report of a finished sweep, read back from MLflow: the paper-style tables and plots, and the parent run's
summary.md (the only summary of a sweep).

    python -m service.report SWEEP_RUN_NAME [--tracking-uri URI] [--storage DIR] [--experiment NAME]
                             [--reference METHOD] [--ci t|bootstrap] [--n-boot N]
    smear-sweep report SWEEP_RUN_NAME [FLAGS]          (the same)

Finds the sweep's parent run (tag ``sweep=<name>``, in the experiments ``smear-sweep/*`` unless
``--experiment`` names one), reads its child runs (one per trial: :mod:`service.report.trials`) and writes
under ``<storage>/<sweep>/report/``:

- ``summary.md``: method x domain (ResNet-DomainNet: test accuracy per domain) or method x task
  (T5-GLUE: test score per task), plus the overall primary metric, each cell the mean over seeds (x100)
  with its 95% CI and seed count, ``*`` where the paired difference to ``--reference`` is significant
  (Holm within the column), methods best first; the statistics over seeds (:mod:`service.report.stats`:
  95% CIs, Student t or with ``--ci bootstrap`` a percentile bootstrap over seeds; the paired difference
  to ``--reference``, default smear, with a Holm-corrected paired test); the seeds planned to detect
  ``service.sequential.DEFAULT_DELTA`` with 80% power (:mod:`service.sequential`); compute; one line per trial;
- ``table.tex`` (booktabs) and ``table.csv``: the statistics table, paper-ready;
- ``aggregate.tex``, ``aggregate.csv`` and ``cd_diagram.png``: the aggregates over the domains or tasks
  (:mod:`service.report.aggregate`: the mean over them, the IQM and P(> reference), each with a stratified
  bootstrap interval over seeds; the Friedman test over them and its critical-difference diagram);
- ``scores.png``, ``score_vs_{flops,hours,cost}.png``: the overall test metric per method, and against
  each trial's measured cost and wall time (MLflow run end - start);
- ``heatmaps_best_smear.png``, ``heatmaps_<method>.png``, ``specialisation.png``, ``learning_curves.png``,
  ``sensitivity_<param>.png``: the diagnostic sections (:mod:`service.report.sections`).

A report is a list of sections, each one :class:`~service.report.sections.Section` (its markdown, files and
numbers): :func:`build_report` puts them in order. All of it is also logged to the parent run under
``report/``, and summary.md as the parent run's own ``summary.md``. :func:`publish_report` is the same as a
function and returns the :class:`Report` with the trials it read; :func:`write_report` returns summary.md's
path; :func:`end_of_sweep` is what launch.py calls at the end of a sweep (the report, then its trials' table). Failed trials and missing metrics show as "-" and
are left out of means. A sweep that is not found, or a store that cannot be read, exits with code 2 and a
one-line message.

Imports stay light (mlflow, matplotlib, scipy; no ray, torch or trainables).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from service.report import scores
from service.report.sections import Scope, Section, best_heatmaps, learning_curves, routing_diagnostics
from service.report.sections import sensitivity_section
from service.report.stats import default_reference
from service.report.tables import console_table
from service.report.trials import ReportError, Trial, find_sweep, open_store, read_trials
from service.uris import resolve_tracking_uri

EXIT_BAD_INPUT = 2

# the sections of each setting, in summary.md's order
SECTIONS = (scores.score_table, scores.seed_statistics, scores.cross_task_aggregates, scores.planned_seeds,
            scores.sequential_decisions, scores.compute, scores.trial_list, scores.score_plots, best_heatmaps, learning_curves,
            routing_diagnostics, sensitivity_section)


@dataclass
class Report:
    """A sweep's report: its sections in order, and the trials they were built from (as read back from MLflow)."""
    sections: list[Section]
    trials: list[Trial]
    path: Path | None = None   # summary.md, once written

    @property
    def text(self) -> str:
        return "\n".join(line for s in self.sections for line in s.markdown)

    @property
    def files(self) -> list[Path]:
        return [f for s in self.sections for f in s.files]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def header(parent, experiment, trials: list[Trial]) -> Section:
    """The sweep: its run, declaration and code, how many trials finished, what the launcher recorded on the
    parent run (description, wall time, why it failed, what a tracking outage cost), when this was written."""
    tags, metrics, info = parent.data.tags, parent.data.metrics, parent.info
    n_fail = sum(t.status != "FINISHED" for t in trials)
    n_missing = sum(t.test is None for t in trials)
    lines = [f"# Sweep report: {tags.get('sweep', info.run_name)}", "",
             f"- experiment `{experiment.name}`, parent run `{info.run_name}` ({info.run_id}), status {info.status}",
             f"- declaration `{tags.get('declaration', '?')}`, smoke {tags.get('smoke', '?')}, "
             f"git commit `{tags.get('git_commit', '?')}`"]
    if tags.get("mlflow.note.content"):
        lines.append(f"- description: {_one_line(tags['mlflow.note.content'])}")
    lines.append(f"- {len(trials)} trials: {len(trials) - n_fail} finished, {n_fail} not finished"
                 + (f"; {n_missing} without a test metric (left out of the means)" if n_missing else ""))
    for prefix, what in (("sweep/", "the sweep"), ("sweep/extend_", "its latest extension")):
        if f"{prefix}wall_s" in metrics:
            lines.append(f"- wall time of {what}: {metrics[f'{prefix}wall_s']:.0f} s (the tracker's time in "
                         f"MLflow calls: {metrics.get(f'{prefix}tracking_s', 0.0):.1f} s)")
    lines += [f"- tag `{key}`: {_one_line(tags[key])}" for key in ("sweep_error", "tracking_note") if tags.get(key)]
    lines += [f"- generated {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    if not trials:
        lines += ["No trial runs were found under this sweep's parent run.", ""]
    return Section(lines, numbers={"trials": len(trials), "not_finished": n_fail, "without_test": n_missing})


def build_report(client, parent, experiment, trials: list[Trial], out_dir: Path, reference: str | None = None,
                 interval: str = "t", n_boot: int = 10_000) -> Report:
    """The report's sections: the header, then each setting's :data:`SECTIONS` (their files written into
    ``out_dir``, suffixed with the setting when the sweep has several). ``reference``: None =
    :func:`service.report.stats.default_reference`."""
    settings = list(dict.fromkeys(t.setting for t in trials))
    sections = [header(parent, experiment, trials)]
    for setting in settings:
        scope = Scope(client, [t for t in trials if t.setting == setting], out_dir,
                      "" if len(settings) == 1 else f"_{setting}", parent.data.tags.get("sweep", parent.info.run_name),
                      reference or default_reference(), interval, n_boot, parent.data.tags)
        sections += [section(scope) for section in SECTIONS]
    return Report(sections, trials)


def publish_report(tracking_uri: str, sweep_run_name: str, storage: str | Path, experiment: str | None = None,
                   reference: str | None = None, interval: str = "t", n_boot: int = 10_000,
                   summary_names: tuple[str, ...] = ("summary.md",)) -> Report:
    """Write ``<storage>/<sweep>/report/summary.md`` and its files, log them to the parent run under
    ``report/`` and summary.md as each of ``summary_names`` at the parent run's root; return the Report.
    Raises ReportError if the sweep or the store is not found, or if ``reference`` (default: smear, when the
    sweep has it) is not a method of the sweep."""
    client = open_store(tracking_uri)
    parent, exp = find_sweep(client, sweep_run_name, experiment)
    trials = read_trials(client, parent)
    methods = sorted({t.method for t in trials})
    if reference is not None and reference not in methods:
        raise ReportError(f"--reference={reference!r} is not a method of sweep {sweep_run_name!r}; valid: "
                          f"{', '.join(methods) or 'none (no trial runs)'}")
    out_dir = Path(storage).resolve() / sweep_run_name / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(client, parent, exp, trials, out_dir, reference, interval, n_boot)
    report.path = out_dir / "summary.md"
    report.path.write_text(report.text)
    for f in [report.path, *report.files]:
        client.log_artifact(parent.info.run_id, str(f), "report")
    for name in summary_names:
        client.log_text(parent.info.run_id, report.text, name)
    return report


def write_report(tracking_uri: str, sweep_run_name: str, storage: str | Path, experiment: str | None = None,
                 reference: str | None = None, interval: str = "t", n_boot: int = 10_000) -> Path:
    """:func:`publish_report`, returning summary.md's path."""
    return publish_report(tracking_uri, sweep_run_name, storage, experiment, reference, interval, n_boot).path


def end_of_sweep(tracking_uri: str, sweep_run_name: str, storage: str | Path, experiment: str,
                 extension: str | None = None) -> tuple[bool, str]:
    """The report at the end of a sweep (launch.py, and its --sync of a sweep that ended with writes unsent):
    published (an extension's summary.md also as ``summary-<extension>.md``) and the table of its trials printed
    (:func:`service.report.tables.console_table`). A report that cannot be built (e.g. the tracking server is
    down) never fails the sweep. Returns whether it was written, and the line that says where it is, or that it
    was not written and how to retry."""
    names = ("summary.md", f"summary-{extension}.md") if extension else ("summary.md",)
    try:
        report = publish_report(tracking_uri, sweep_run_name, storage, experiment, summary_names=names)
    except Exception as e:  # a report failure never fails the sweep
        return False, (f"\nReport not written ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                       f"retry with: python -m service.report {sweep_run_name} --tracking-uri {tracking_uri} "
                       f"--storage {storage}")
    print(console_table(report.trials))
    return True, f"\nReport: {report.path}"


def sync_first(tracking_uri: str, sweep_run_name: str, storage: str | Path) -> int:
    """Before a report is read from MLflow: what the sweep's journal holds and the store lacks (a sweep that
    ended with its tracking server lost) is sent first (:meth:`service.replica.Replica.sync`, all but the
    journal's own report entry: this report is written next). Only when the journal's store is this one;
    returns how many writes were sent."""
    from service.journal import Journal, journal_path

    path = journal_path(str(storage), sweep_run_name)
    try:
        if not path.is_file():
            return 0
    except OSError:  # a path the file system cannot even look up (a name too long): no journal there
        return 0
    header = Journal.at(path).parent
    if header.get("uri") != tracking_uri or not header.get("run_id"):
        return 0
    from service.replica import Replica

    sent = Replica.at(path, tracking_uri, header["experiment_id"], header["run_id"]).sync()
    if sent:
        print(f"report.py: {sent} write(s) of the sweep's journal {path} sent to {tracking_uri} first", file=sys.stderr)
    return sent


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"report.py: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


EXAMPLES = """examples:
  python -m service.report default-20261201-101500            # the sweep launch.py ran as --name
  python -m service.report t5-try --ci bootstrap --reference adapter --storage /mnt/shared/results
"""


def main(argv: list[str] | None = None, *, usage: str | None = None, epilog: str | None = None) -> int:
    """The report's command line: ``python -m service.report``, also ``smear-sweep report``, whose --help passes
    its own ``usage`` and ``epilog`` (service/cli.py)."""
    from service.report.stats import INTERVALS

    p = _Parser(prog="python -m service.report", description=__doc__.splitlines()[0], usage=usage,
                epilog=EXAMPLES if epilog is None else epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="the sweep's run name (launch.py --name; tag sweep=<name> on its parent run)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///$PWD/mlflow.db)")
    p.add_argument("--storage", default="results", help="the sweep's storage; the report goes to <storage>/<sweep>/report")
    p.add_argument("--experiment", default=None, help="the experiment to look in (default: every smear-sweep/* experiment)")
    p.add_argument("--reference", default=None, help="the method every other is compared with, seed by seed "
                                                      "(default: the routing default method, smear.routing.DEFAULT_METHOD)")
    p.add_argument("--ci", choices=INTERVALS, default="t",
                   help="confidence interval of a method's mean over seeds: t (Student) or bootstrap (percentile, "
                        "resampling the seeds)")
    p.add_argument("--n-boot", type=int, default=10_000,
                   help="bootstrap resamples (with --ci bootstrap; always for the aggregates over tasks)")
    args = p.parse_args(argv)
    if args.n_boot < 1:
        p.error(f"--n-boot={args.n_boot} must be >= 1")
    # an unreachable server: fail in seconds with one line, not after minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    from service.refusal import internal_error, refuse

    try:  # total, as the launcher's boundary: a refusal is one line, never a traceback
        sync_first(resolve_tracking_uri(args.tracking_uri), args.sweep, args.storage)
        path = write_report(resolve_tracking_uri(args.tracking_uri), args.sweep, args.storage, args.experiment,
                            reference=args.reference, interval=args.ci, n_boot=args.n_boot)
    except ReportError as e:
        return refuse(str(e), "report.py")
    except Exception as e:  # noqa: BLE001 - the contract: one line naming what was being read
        from smear.configs import ConfigError  # (imports torch: only here, on a refusal)

        if isinstance(e, ConfigError):  # a URI of the environment refused by service/uris.py
            return refuse(str(e), "report.py")
        return internal_error(e, f"the sweep {args.sweep!r} in {args.tracking_uri or 'the default store'}", "report.py")
    print(path.read_text())
    print(f"report: {path} (also logged to the parent run under report/)")
    return 0

