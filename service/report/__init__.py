"""The report of a finished sweep, read back from MLflow: the paper-style table and three plots.

    python -m service.report SWEEP_RUN_NAME [--tracking-uri URI] [--storage DIR] [--experiment NAME]
                              [--reference METHOD] [--ci t|bootstrap] [--n-boot N]

Finds the sweep's parent run (tag ``sweep=<name>``, in the experiments ``smear-sweep/*`` unless
``--experiment`` names one), reads its child runs (one per trial) and writes under
``<storage>/<sweep>/report/``:

- ``summary.md``: method x domain (ResNet-DomainNet: test accuracy per domain) or method x task
  (T5-GLUE: test score per task), plus the overall primary metric, each cell the mean over seeds (x100)
  with its 95% CI and seed count, ``*`` where the paired difference to ``--reference`` is significant
  (Holm within the column), methods best first; the statistics over seeds (``service.report.stats``: 95% CIs,
  Student t or with ``--ci bootstrap`` a percentile bootstrap over seeds; the paired difference to
  ``--reference``, default smear, with a Holm-corrected paired test); then one line per trial;
- ``table.tex`` (booktabs) and ``table.csv``: the statistics table, paper-ready;
- ``scores.png``: the overall test metric per method, one point per seed and the mean as a bar;
- ``score_vs_cost.png``: the same score against the trials' wall time (MLflow run end - start);
- ``heatmaps_best_smear.png``: the routing specialisation heatmaps of the best SMEAR trial.

All of it is also logged to the parent run under ``report/``. ``write_report(...)`` is the same as a
function (launch.py calls it at the end of a sweep). Failed trials and missing metrics show as "-" and
are left out of means. A sweep that is not found, or a store that cannot be read, exits with code 2 and
a one-line message.

Imports stay light (mlflow, matplotlib; no ray, torch or trainables).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from service.report.sections import (
    HEATMAP_ARTIFACT, heatmap_figure, heatmap_of, learning_curves, routing_diagnostics, save, sensitivity_section,
)
from service.report.tables import (
    column_statistics, compute_table, method_order, method_table, seed_scores, trial_table,
)
from service.report.stats import default_reference
from service.report.trials import ReportError, Trial, find_sweep, open_store, read_trials, score_key
from service.uris import resolve_tracking_uri

EXIT_BAD_INPUT = 2


# ---------------------------------------------------------------------------------------------------
# the plots (service.report.plots)

def best_trial(trials: list[Trial], method: str) -> Trial | None:
    """The trial of ``method`` with the best overall test metric (else any of its trials; else None)."""
    cands = [t for t in trials if t.method == method]
    if not cands:
        return None
    return max(cands, key=score_key)


# ---------------------------------------------------------------------------------------------------
# the report

def _settings(trials: list[Trial]) -> list[str]:
    out: list[str] = []
    for t in trials:
        if t.setting not in out:
            out.append(t.setting)
    return out


def seed_statistics(ts: list[Trial], reference: str, out_dir: Path, suffix: str, interval: str = "t",
                    n_boot: int = 10_000) -> tuple[list[str], list[Path]]:
    """The statistics over seeds (service.report.stats) of one setting's trials: per method the mean and its 95%
    CI (``interval``: "t" or "bootstrap" with ``n_boot`` resamples), against ``reference`` the paired
    difference over shared seeds, its CI and a Holm-corrected test; markdown lines for summary.md, and the
    same table as LaTeX (booktabs) and CSV files."""
    from service.report.stats import format_markdown, to_csv, to_latex_booktabs

    primary = ts[0].primary
    by_method, by_comparison = column_statistics(seed_scores(ts), reference, interval, n_boot)
    summaries, comparisons = list(by_method.values()), list(by_comparison.values())
    if comparisons:
        intro = (f"Test {primary} (not x100) per method over its seeds, and each method minus `{reference}` over "
                 f"the seeds both have (paired t-test below 6 pairs, Wilcoxon signed-rank from 6; p-values "
                 f"Holm-corrected across the methods compared).")
    else:
        intro = f"Test {primary} per method over its seeds; no `{reference}` trial, so no paired comparison."
    files = []
    for name, text in ((f"table{suffix}.tex", to_latex_booktabs(summaries, comparisons)),
                       (f"table{suffix}.csv", to_csv(summaries, comparisons))):
        (out_dir / name).write_text(text)
        files.append(out_dir / name)
    lines = [f"### Statistics over seeds (reference `{reference}`)", "", intro, "",
             format_markdown(summaries, comparisons), "",
             f"The same table: [`{files[0].name}`]({files[0].name}) (LaTeX, booktabs), "
             f"[`{files[1].name}`]({files[1].name}) (CSV).", ""]
    return lines, files


def build_report(client, parent, experiment, trials: list[Trial], out_dir: Path,
                 reference: str | None = None, interval: str = "t", n_boot: int = 10_000) -> tuple[str, list[Path]]:
    """Write the plots and tables into ``out_dir``; return summary.md's text and the files written.
    ``reference``: None = ``service.report.stats.default_reference``."""
    from service.report.plots import score_per_method, score_vs_cost

    reference = reference or default_reference()

    tags = parent.data.tags
    name = tags.get("sweep", parent.info.run_name)
    n_fail = sum(t.status != "FINISHED" for t in trials)
    n_missing = sum(t.test is None for t in trials)
    settings = _settings(trials)
    lines = [f"# Sweep report: {name}", "",
             f"- experiment `{experiment.name}`, parent run `{parent.info.run_name}` ({parent.info.run_id}), "
             f"status {parent.info.status}",
             f"- declaration `{tags.get('declaration', '?')}`, smoke {tags.get('smoke', '?')}, "
             f"git commit `{tags.get('git_commit', '?')}`",
             f"- {len(trials)} trials: {len(trials) - n_fail} finished, {n_fail} not finished"
             + (f"; {n_missing} without a test metric (left out of the means)" if n_missing else ""),
             f"- generated {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    files: list[Path] = []
    if not trials:
        lines += ["No trial runs were found under this sweep's parent run.", ""]
    for setting in settings:
        ts = [t for t in trials if t.setting == setting]
        if not ts:
            continue
        primary, kind, gm = ts[0].primary, ts[0].group_kind, ts[0].group_metric
        suffix = "" if len(settings) == 1 else f"_{setting}"
        ci = ("± half-width of its 95% t-interval" if interval == "t"
              else f"[95% percentile-bootstrap interval, {n_boot:,} resamples]")
        lines += [f"## {setting}: test {gm} per {kind} and overall {primary}", "",
                  f"Test metrics x100 of each trial's best-validation weights: mean over seeds {ci}, "
                  f"(n=) the seeds it rests on (one seed: no interval). `*`: the paired difference to "
                  f"`{reference}` in that column is significant (Holm-adjusted over the column's methods, "
                  f"p < 0.05; see the statistics below). Methods best first by {primary}; best mean in bold. "
                  f"`seeds` = trials with a test {primary} / trials.", "",
                  method_table(ts, reference=reference, interval=interval, n_boot=n_boot), ""]
        stat_lines, stat_files = seed_statistics(ts, reference, out_dir, suffix, interval, n_boot)
        lines += stat_lines
        if cost := compute_table(ts):
            lines += ["### Compute", "", "What one trial of each method costs (mean over its trials; FLOPs measured with "
                      "torch's FlopCounterMode on one real training step, forward + backward; AdaMix counts its two "
                      "passes).", "", cost, ""]
        lines += ["### Trials", "", trial_table(ts), ""]
        files += stat_files
        lines += ["### Plots", ""]
        scored = [t for t in ts if t.test is not None]
        if scored:
            order = [m for m in method_order(ts) if any(t.method == m for t in scored)]
            per_method = {m: [t.test for t in scored if t.method == m] for m in order}
            p = save(score_per_method(per_method, f"test {primary}", f"{name}: test {primary} per method"),
                      out_dir / f"scores{suffix}.png")
            files.append(p)
            lines += [f"![test {primary} per method]({p.name})", "",
                      f"`{p.name}`: test {primary} per method, one point per seed, bar = mean.", ""]
            costed = [t for t in scored if "flops_per_example" in t.compute]
            hours = [t for t in scored if "train_hours" in t.compute]
            for key, axis, what, pick in (
                    ("flops", "training GFLOPs per example (one step: forward + backward)", costed,
                     lambda t: t.compute["flops_per_example"] / 1e9),
                    ("hours", "device-hours of training per trial (evaluation and start-up left out)", hours,
                     lambda t: t.compute["train_hours"])):
                if not what:
                    continue
                pts = {m: [(pick(t), t.test) for t in what if t.method == m] for m in order}
                pts = {m: v for m, v in pts.items() if v}
                p = save(score_vs_cost(pts, axis, f"test {primary}", f"{name}: test {primary} vs {axis.split(' (')[0]}"),
                         out_dir / f"score_vs_{key}{suffix}.png")
                files.append(p)
                lines += [f"![test {primary} vs {key}]({p.name})", "",
                          f"`{p.name}`: cost = {axis}, measured in each trial (trainables/accounting.py, "
                          "the train loop's clock). Error bars: std over seeds.", ""]
            timed = [t for t in scored if t.wall_s is not None]
            if timed:
                pts = {m: [(t.wall_s, t.test) for t in timed if t.method == m] for m in order}
                pts = {m: v for m, v in pts.items() if v}
                p = save(score_vs_cost(pts, "trial wall time (s) = MLflow run end - start", f"test {primary}",
                                        f"{name}: test {primary} vs trial wall time"),
                          out_dir / f"score_vs_cost{suffix}.png")
                files.append(p)
                lines += [f"![test {primary} vs wall time]({p.name})", "",
                          f"`{p.name}`: cost = each trial's wall time (its MLflow run's end - start), which "
                          "includes start-up and evaluation and depends on what else ran at the same time on "
                          "the machine; not a FLOP or parameter count. Error bars: std over seeds.", ""]
            else:
                lines += ["No score-vs-cost plot: no trial has both a start and an end time.", ""]
        else:
            lines += [f"No score plots: no trial has a test {primary}.", ""]
        paper_method = default_reference()  # the paper's method: its best trial's specialisation is shown
        best = best_trial(ts, paper_method)
        if best is None:
            lines += [f"No specialisation heatmaps: no {paper_method} trial in this sweep.", ""]
        else:
            try:
                p = heatmap_figure(heatmap_of(client, best), best, f"best {paper_method} trial", kind,
                                   out_dir / f"heatmaps_best_smear{suffix}.png")
                files.append(p)
                score = "-" if best.test is None else f"{best.test * 100:.2f}"
                lines += [f"![specialisation of {best.run_name}]({p.name})", "",
                          f"`{p.name}`: specialisation of the best {paper_method} trial, `{best.run_name}` "
                          f"(test {primary} x100 {score}): per routed block, the mean routing weight of each "
                          f"{kind} (rows) on each expert (columns), on the test split.", ""]
            except Exception as e:  # no artifact (failed trial, older record), unreadable JSON
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                lines += [f"No specialisation heatmaps: {HEATMAP_ARTIFACT} of {best.run_name} could not be "
                          f"read ({msg}).", ""]
        order = method_order(ts)
        lines += ["### Learning curves", ""]
        more, more_files = learning_curves(client, ts, order, out_dir, suffix, name)
        lines += more
        files += more_files
        lines += ["### Routing diagnostics of every routed method", ""]
        more, more_files = routing_diagnostics(client, ts, order, out_dir, suffix, name)
        lines += more
        files += more_files
        more, more_files = sensitivity_section(ts, out_dir, suffix, name)
        lines += more
        files += more_files
    return "\n".join(lines), files


def write_report(tracking_uri: str, sweep_run_name: str, storage: str | Path, experiment: str | None = None,
                 reference: str | None = None, interval: str = "t", n_boot: int = 10_000) -> Path:
    """Write ``<storage>/<sweep>/report/summary.md`` and its plots, log them to the parent run under
    ``report/``, return summary.md's path. Raises ReportError if the sweep or the store is not found, or if
    ``reference`` (default: smear, when the sweep has it) is not a method of the sweep."""
    client = open_store(tracking_uri)
    parent, exp = find_sweep(client, sweep_run_name, experiment)
    trials = read_trials(client, parent)
    methods = sorted({t.method for t in trials})
    if reference is not None and reference not in methods:
        raise ReportError(f"--reference={reference!r} is not a method of sweep {sweep_run_name!r}; valid: "
                          f"{', '.join(methods) or 'none (no trial runs)'}")
    out_dir = Path(storage).resolve() / sweep_run_name / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    text, files = build_report(client, parent, exp, trials, out_dir, reference=reference or default_reference(),
                               interval=interval, n_boot=n_boot)
    summary = out_dir / "summary.md"
    summary.write_text(text)
    for f in [summary, *files]:
        client.log_artifact(parent.info.run_id, str(f), "report")
    return summary


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

    p = _Parser(prog="python -m service.report", description=__doc__.splitlines()[0], usage=usage, epilog=EXAMPLES if epilog is None else epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="the sweep's run name (launch.py --name; tag sweep=<name> on its parent run)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///$PWD/mlflow.db)")
    p.add_argument("--storage", default="results", help="the sweep's storage; the report goes to <storage>/<sweep>/report")
    p.add_argument("--experiment", default=None, help="the experiment to look in (default: every smear-sweep/* experiment)")
    p.add_argument("--reference", default=None, help="the method every other is compared with, seed by seed "
                                                      "(default: the routing default method, smear.routing.DEFAULT_METHOD)")
    p.add_argument("--ci", choices=INTERVALS, default="t",
                   help="confidence interval of a method's mean over seeds: t (Student) or bootstrap (percentile, "
                        "resampling the seeds)")
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples (with --ci bootstrap)")
    args = p.parse_args(argv)
    if args.n_boot < 1:
        p.error(f"--n-boot={args.n_boot} must be >= 1")
    # an unreachable server: fail in seconds with one line, not after minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    try:
        path = write_report(resolve_tracking_uri(args.tracking_uri), args.sweep, args.storage, args.experiment,
                            reference=args.reference, interval=args.ci, n_boot=args.n_boot)
    except ReportError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(path.read_text())
    print(f"report: {path} (also logged to the parent run under report/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
