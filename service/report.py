"""The report of a finished sweep, read back from MLflow: the paper-style table and three plots.

    python service/report.py SWEEP_RUN_NAME [--tracking-uri URI] [--storage DIR] [--experiment NAME]

Finds the sweep's parent run (tag ``sweep=<name>``, in the experiments ``smear-sweep/*`` unless
``--experiment`` names one), reads its child runs (one per trial) and writes under
``<storage>/<sweep>/report/``:

- ``summary.md``: method x domain (ResNet-DomainNet: test accuracy per domain) or method x task
  (T5-GLUE: test score per task), plus the overall primary metric, mean +- std over seeds (x100),
  methods best first; then one line per trial;
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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

EXIT_BAD_INPUT = 2
EXPERIMENT_PREFIX = "smear-sweep/"
SMEAR = "smear"
HEATMAP_ARTIFACT = "routing/heatmaps.json"


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
    setting: str = "resnet_domainnet"
    primary: str = "accuracy"            # the setting's metric names travel with each run (its tags)
    group_metric: str = "accuracy"       # test/<group>/<group_metric>
    group_kind: str = "group"            # what a group is: domain, task
    test: float | None = None            # overall test metric (test/accuracy or test/average)
    val_best: float | None = None        # val/best_<primary>
    groups: dict[str, float] = field(default_factory=dict)   # group -> test/<group>/<metric>
    group_order: list[str] = field(default_factory=list)
    wall_s: float | None = None          # MLflow run end_time - start_time


# ---------------------------------------------------------------------------------------------------
# reading MLflow

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
                 groups=groups, group_order=order, wall_s=wall)


def read_trials(client, parent) -> list[Trial]:
    children = _search_all(client, [parent.info.experiment_id],
                           f"tags.mlflow.parentRunId = {_quote(parent.info.run_id)}")
    return [trial_from_run(r) for r in children]


# ---------------------------------------------------------------------------------------------------
# the table

def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _num(v) -> float | None:
    return float(v) if _finite(v) else None


def mean_std(values) -> tuple[float, float, int] | None:
    """Mean and sample standard deviation (0 for one value) of the values that are not None."""
    vs = [v for v in values if _finite(v)]
    if not vs:
        return None
    return statistics.fmean(vs), (statistics.stdev(vs) if len(vs) > 1 else 0.0), len(vs)


def _seed_key(seed: str):
    return (0, int(seed), "") if str(seed).lstrip("-").isdigit() else (1, 0, str(seed))


def method_order(trials: list[Trial]) -> list[str]:
    """Methods best first by mean overall test metric; methods with no value last (by name)."""
    by: dict[str, list[float | None]] = {}
    for t in trials:
        by.setdefault(t.method, []).append(t.test)

    def key(m):
        ms = mean_std(by[m])
        return (ms is None, -(ms[0] if ms else 0.0), m)
    return sorted(by, key=key)


def groups_of(trials: list[Trial]) -> list[str]:
    out: list[str] = []
    for t in trials:
        for g in t.group_order or sorted(t.groups):
            if g not in out:
                out.append(g)
    return out


def _cell(ms, scale: float, best: bool = False) -> str:
    if ms is None:
        return "-"
    s = f"{ms[0] * scale:.2f} +- {ms[1] * scale:.2f}"
    return f"**{s}**" if best else s


def method_table(trials: list[Trial], scale: float = 100.0) -> str:
    """Markdown: one row per method (best first), one column per domain/task, then the primary metric.

    Cells are test metrics x ``scale``, mean +- std over the seeds that have a value; the best mean of each
    column is bold; "seeds" counts trials with an overall value out of all the method's trials.
    """
    primary = trials[0].primary if trials else "accuracy"
    groups = groups_of(trials)
    methods = method_order(trials)
    cols: list[tuple[str, dict[str, object]]] = []
    for g in groups:
        cols.append((g, {m: mean_std([t.groups.get(g) for t in trials if t.method == m]) for m in methods}))
    cols.append((f"{primary} (overall)", {m: mean_std([t.test for t in trials if t.method == m]) for m in methods}))
    best = {name: max((ms[0] for ms in vals.values() if ms), default=None) for name, vals in cols}
    head = ["method", "seeds", *[name for name, _ in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        ts = [t for t in trials if t.method == m]
        n_ok = sum(t.test is not None for t in ts)
        cells = [m, f"{n_ok}/{len(ts)}"]
        for name, vals in cols:
            ms = vals[m]
            cells.append(_cell(ms, scale, best=ms is not None and len(methods) > 1 and ms[0] == best[name]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def console_table(rows: list[dict], metric: str = "accuracy") -> str:
    """The sweep's end-of-run table from Tune's results (printed and logged as the parent run's summary.md):
    method x seed -> val and test score, then mean +- std per method (markdown). ``rows``: dicts with
    method, seed, val, test, status."""
    lines = [f"| method | seed | val {metric} (best) | test {metric} | status |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"])):
        lines.append(f"| {r['method']} | {r['seed']} | {_fmt(r.get('val'))} | {_fmt(r.get('test'))} | {r['status']} |")
    lines += ["", f"| method | trials | val {metric} mean +- std | test {metric} mean +- std |", "|---|---|---|---|"]
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    test_means = {m: (mean_std([r.get("test") for r in rs]) or (float("-inf"),))[0] for m, rs in by_method.items()}
    order = sorted(by_method, key=lambda m: -test_means[m])
    for m in order:
        rs = by_method[m]
        lines.append(f"| {m} | {len(rs)} | {_ms([r.get('val') for r in rs])} | {_ms([r.get('test') for r in rs])} |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _ms(vs) -> str:
    stats = mean_std(vs)
    return "-" if stats is None else f"{stats[0]:.4f} +- {stats[1]:.4f}"


def trial_table(trials: list[Trial], scale: float = 100.0) -> str:
    primary = trials[0].primary if trials else "accuracy"
    order = {m: i for i, m in enumerate(method_order(trials))}
    lines = [f"| method | seed | run | status | val best {primary} | test {primary} | wall s |", "|---|---|---|---|---|---|---|"]
    for t in sorted(trials, key=lambda t: (order[t.method], _seed_key(t.seed))):
        f = lambda v: "-" if v is None else f"{v * scale:.2f}"  # noqa: E731
        wall = "-" if t.wall_s is None else f"{t.wall_s:.1f}"
        lines.append(f"| {t.method} | {t.seed} | {t.run_name} | {t.status} | {f(t.val_best)} | {f(t.test)} | {wall} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# the plots (service.plots)

def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def best_trial(trials: list[Trial], method: str = SMEAR) -> Trial | None:
    """The trial of ``method`` with the best overall test metric (else any of its trials; else None)."""
    cands = [t for t in trials if t.method == method]
    if not cands:
        return None
    return max(cands, key=lambda t: (t.test is not None, t.test or 0.0))


def _tidy_heatmaps(fig, n_blocks: int, cols: int = 4) -> None:
    """routing_heatmaps with few groups: keep panel rows apart (taller figure, "expert" on the last row only)."""
    rows = max(1, math.ceil(n_blocks / cols))
    fig.set_figheight(max(fig.get_figheight(), 2.6 * rows + 0.6))
    for i, ax in enumerate(fig.axes[:rows * cols]):
        if i + cols < n_blocks:
            ax.set_xlabel("")


def _heatmap(client, trial: Trial) -> dict:
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with tempfile.TemporaryDirectory() as d:
            local = client.download_artifacts(trial.run_id, HEATMAP_ARTIFACT, d)
            return json.loads(Path(local).read_text())
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


# ---------------------------------------------------------------------------------------------------
# the report

def _settings(trials: list[Trial]) -> list[str]:
    out: list[str] = []
    for t in trials:
        if t.setting not in out:
            out.append(t.setting)
    return out


def build_report(client, parent, experiment, trials: list[Trial], out_dir: Path) -> tuple[str, list[Path]]:
    """Write the plots into ``out_dir``; return summary.md's text and the files written."""
    from service.plots import score_per_method, score_vs_cost, routing_heatmaps

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
        lines += [f"## {setting}: test {gm} per {kind} and overall {primary}", "",
                  f"Test metrics x100 of each trial's best-validation weights, mean +- std over seeds "
                  f"(sample std; 0 for one seed); methods best first by {primary}; best mean in bold. "
                  f"`seeds` = trials with a test {primary} / trials.", "",
                  method_table(ts), "", "### Trials", "", trial_table(ts), ""]
        lines += ["### Plots", ""]
        scored = [t for t in ts if t.test is not None]
        if scored:
            order = [m for m in method_order(ts) if any(t.method == m for t in scored)]
            per_method = {m: [t.test for t in scored if t.method == m] for m in order}
            p = _save(score_per_method(per_method, f"test {primary}", f"{name}: test {primary} per method"),
                      out_dir / f"scores{suffix}.png")
            files.append(p)
            lines += [f"![test {primary} per method]({p.name})", "",
                      f"`{p.name}`: test {primary} per method, one point per seed, bar = mean.", ""]
            timed = [t for t in scored if t.wall_s is not None]
            if timed:
                pts = {m: [(t.wall_s, t.test) for t in timed if t.method == m] for m in order}
                pts = {m: v for m, v in pts.items() if v}
                p = _save(score_vs_cost(pts, "trial wall time (s) = MLflow run end - start", f"test {primary}",
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
        best = best_trial(ts)
        if best is None:
            lines += [f"No specialisation heatmaps: no {SMEAR} trial in this sweep.", ""]
        else:
            try:
                heat = _heatmap(client, best)
                fig = routing_heatmaps(heat, f"best {SMEAR} trial {best.run_name} (seed {best.seed}): "
                                             f"mean routing weight per {kind} x expert on test")
                _tidy_heatmaps(fig, len(heat.get("blocks", {})))
                p = _save(fig, out_dir / f"heatmaps_best_smear{suffix}.png")
                files.append(p)
                score = "-" if best.test is None else f"{best.test * 100:.2f}"
                lines += [f"![specialisation of {best.run_name}]({p.name})", "",
                          f"`{p.name}`: specialisation of the best {SMEAR} trial, `{best.run_name}` "
                          f"(test {primary} x100 {score}): per routed block, the mean routing weight of each "
                          f"{kind} (rows) on each expert (columns), on the test split.", ""]
            except Exception as e:  # no artifact (failed trial, older record), unreadable JSON
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                lines += [f"No specialisation heatmaps: {HEATMAP_ARTIFACT} of {best.run_name} could not be "
                          f"read ({msg}).", ""]
    return "\n".join(lines), files


def _client(tracking_uri: str):
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
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ReportError(f"cannot read the MLflow store {tracking_uri!r}: {first}") from None
    return client


def write_report(tracking_uri: str, sweep_run_name: str, storage: str | Path, experiment: str | None = None) -> Path:
    """Write ``<storage>/<sweep>/report/summary.md`` and its plots, log them to the parent run under
    ``report/``, return summary.md's path. Raises ReportError if the sweep or the store is not found."""
    client = _client(tracking_uri)
    parent, exp = find_sweep(client, sweep_run_name, experiment)
    trials = read_trials(client, parent)
    out_dir = Path(storage).resolve() / sweep_run_name / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    text, files = build_report(client, parent, exp, trials, out_dir)
    summary = out_dir / "summary.md"
    summary.write_text(text)
    for f in [summary, *files]:
        client.log_artifact(parent.info.run_id, str(f), "report")
    return summary


def resolve_tracking_uri(arg: str | None) -> str:
    """``arg``, else $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db; a relative sqlite path made absolute
    (trials chdir into their folders: a relative path would land there). Shared with launch.py."""
    uri = arg or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"report.py: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="the sweep's run name (launch.py --name; tag sweep=<name> on its parent run)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///$PWD/mlflow.db)")
    p.add_argument("--storage", default="results", help="the sweep's storage; the report goes to <storage>/<sweep>/report")
    p.add_argument("--experiment", default=None, help="the experiment to look in (default: every smear-sweep/* experiment)")
    args = p.parse_args(argv)
    # an unreachable server: fail in seconds with one line, not after minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    try:
        path = write_report(resolve_tracking_uri(args.tracking_uri), args.sweep, args.storage, args.experiment)
    except ReportError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(path.read_text())
    print(f"report: {path} (also logged to the parent run under report/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
