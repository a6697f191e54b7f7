"""A report is a list of sections (:class:`Section`: its markdown, the files it wrote, its numbers), each built
from one setting's trials (:class:`Scope`). Here: the contract and the diagnostic sections, namely the best
SMEAR trial's specialisation heatmaps, learning curves (and the ST-Gumbel temperature), every routed method's
heatmaps with a one-figure specialisation summary (mutual information per block), and the sensitivity of the
score to each hyper-parameter a sweep varies; the score sections are :mod:`service.report.scores`. The numbers
come from :mod:`service.report.diagnostics`, the figures from :mod:`service.report.plots`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from service.refusal import first_line
from service.report.diagnostics import curve_band, sensitivity, specialisation, varied_params
from service.report.stats import default_reference
from service.report.tables import method_order
from service.report.trials import Trial, score_key

HEATMAP_ARTIFACT = "routing/heatmaps.json"


@dataclass
class Section:
    """One part of summary.md: its markdown lines, the files it wrote (figures, tables) and the numbers it shows."""
    markdown: list[str]
    files: list[Path] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Scope:
    """What a section reads: one setting's trials, where its files go and how they are named."""
    client: object          # the MlflowClient the trials were read with (metric histories, artifacts)
    trials: list[Trial]     # one setting's, at least one
    out_dir: Path
    suffix: str             # of every file name: "" for a sweep of one setting, else "_<setting>"
    name: str               # the sweep's, in figure titles
    reference: str          # the method every other is compared with
    interval: str = "t"     # the CI of a mean over seeds: "t" or "bootstrap"
    n_boot: int = 10_000    # bootstrap resamples
    tags: dict = field(default_factory=dict)  # the parent run's tags (what the launcher recorded: --until-decided)

    @property
    def primary(self) -> str:
        return self.trials[0].primary

    @property
    def kind(self) -> str:
        return self.trials[0].group_kind

    def order(self) -> list[str]:
        """The methods, best first (:func:`service.report.tables.method_order`)."""
        return method_order(self.trials)

    def path(self, stem: str, ext: str = ".png") -> Path:
        return self.out_dir / f"{stem}{self.suffix}{ext}"


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap_of(client, trial: Trial) -> dict:
    """The trial's routing/heatmaps.json (group x expert mean routing weight per block, on test)."""
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with tempfile.TemporaryDirectory() as d:
            if trial.artifact_uri:  # straight from the run's artifact root: no lookup of the run (2 per file)
                from mlflow.artifacts import download_artifacts

                local = download_artifacts(artifact_uri=f"{trial.artifact_uri.rstrip('/')}/{HEATMAP_ARTIFACT}",
                                           dst_path=d, tracking_uri=getattr(client, "tracking_uri", None))
            else:
                local = client.download_artifacts(trial.run_id, HEATMAP_ARTIFACT, d)
            return json.loads(Path(local).read_text())
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def tidy_heatmaps(fig, n_blocks: int, cols: int = 4) -> None:
    """routing_heatmaps with few groups: keep panel rows apart (taller figure, "expert" on the last row only)."""
    rows = max(1, math.ceil(n_blocks / cols))
    fig.set_figheight(max(fig.get_figheight(), 2.6 * rows + 0.6))
    for i, ax in enumerate(fig.axes[:rows * cols]):
        if i + cols < n_blocks:
            ax.set_xlabel("")


def heatmap_figure(heat: dict, trial: Trial, label: str, kind: str, path: Path) -> Path:
    """The trial's specialisation heatmaps (one panel per block, rows: groups, columns: experts) as a PNG."""
    from service.report.plots import routing_heatmaps

    fig = routing_heatmaps(heat, f"{label} {trial.run_name} (seed {trial.seed}): mean routing weight per {kind} "
                                 "x expert on test")
    tidy_heatmaps(fig, len(heat.get("blocks", {})))
    return save(fig, path)


def best_heatmaps(scope: Scope) -> Section:
    """The specialisation heatmaps of the paper's method's best trial (``default_reference``: smear)."""
    paper_method = default_reference()
    cands = [t for t in scope.trials if t.method == paper_method]
    if not cands:
        return Section([f"No specialisation heatmaps: no {paper_method} trial in this sweep.", ""])
    best = max(cands, key=score_key)
    try:
        p = heatmap_figure(heatmap_of(scope.client, best), best, f"best {paper_method} trial", scope.kind,
                           scope.path("heatmaps_best_smear"))
    except Exception as e:  # no artifact (failed trial, older record), unreadable JSON
        msg = first_line(e)
        return Section([f"No specialisation heatmaps: {HEATMAP_ARTIFACT} of {best.run_name} could not be "
                        f"read ({msg}).", ""], numbers={"best": best.run_name})
    score = "-" if best.test is None else f"{best.test * 100:.2f}"
    return Section([f"![specialisation of {best.run_name}]({p.name})", "",
                    f"`{p.name}`: specialisation of the best {paper_method} trial, `{best.run_name}` "
                    f"(test {scope.primary} x100 {score}): per routed block, the mean routing weight of each "
                    f"{scope.kind} (rows) on each expert (columns), on the test split.", ""],
                   [p], {"best": best.run_name})


def _history(client, trial: Trial, key: str) -> list[tuple[int, float]]:
    if trial.metric_keys is not None and key not in trial.metric_keys:
        return []  # the run never logged it (e.g. routing/temperature): no read
    try:
        return [(m.step, m.value) for m in client.get_metric_history(trial.run_id, key)]
    except Exception:  # a run without that metric, or an unreadable record: no curve
        return []


def _bands(scope: Scope, key: str) -> dict[str, list]:
    """Per method (best first), the band over its trials' histories of ``key``; methods without one left out."""
    bands = {m: curve_band([_history(scope.client, t, key) for t in scope.trials if t.method == m])
             for m in scope.order()}
    return {m: b for m, b in bands.items() if b}


def learning_curves(scope: Scope) -> Section:
    """Validation score over training per method (mean and range over seeds), and the routing temperature."""
    from service.report.plots import learning_curves as plot

    primary, name = scope.primary, scope.name
    lines = ["### Learning curves", ""]
    bands = _bands(scope, f"val/{primary}")
    if not bands:
        return Section(lines + [f"No learning curves: no trial logged val/{primary}.", ""])
    p = save(plot(bands, f"validation {primary}", f"{name}: validation {primary} over training"),
             scope.path("learning_curves"))
    lines += [f"![learning curves]({p.name})", "",
              f"`{p.name}`: validation {primary} at each evaluation; line = mean over the method's seeds "
              f"(n in the legend), band = their range.", ""]
    files = [p]
    temps = _bands(scope, "routing/temperature")
    if temps:
        p = save(plot(temps, "temperature", f"{name}: routing temperature over training"), scope.path("temperature"))
        lines += [f"![temperature]({p.name})", "",
                  f"`{p.name}`: the ST-Gumbel temperature at each evaluation (the reference's compounding "
                  "anneal), mean over seeds.", ""]
        files.append(p)
    return Section(lines, files, {"curves": bands, "temperature": temps})


def _routed(scope: Scope, method: str) -> list[tuple[Trial, dict]]:
    """The method's trials whose heatmap has a block with more than one expert, with that heatmap."""
    heats = []
    for t in [t for t in scope.trials if t.method == method]:
        try:
            heats.append((t, heatmap_of(scope.client, t)))
        except Exception:  # failed trial, older record: not part of the summary
            continue
    return [(t, h) for t, h in heats if any(mat and len(mat[0]) > 1 for mat in h.get("blocks", {}).values())]


def _specialisation_head(scope: Scope, mi: dict[str, dict[str, float]], figure: Path) -> list[str]:
    kind = scope.kind
    table = ["| method | mean I(" + kind + "; expert) over blocks, nats | most specialised block |", "|---|---|---|"]
    for m, v in sorted(mi.items(), key=lambda kv: -sum(kv[1].values()) / max(len(kv[1]), 1)):
        top = max(v, key=v.get)
        table.append(f"| {m} | {sum(v.values()) / len(v):.3f} | {top} ({v[top]:.3f}) |")
    n_groups = len(scope.trials[0].group_order) or 2
    return [f"![specialisation]({figure.name})", "",
            f"`{figure.name}`: per routed block (x, in model order) and method, the mutual information between the "
            f"{kind} and the expert, I = sum_g p(g) sum_e p(e|g) ln(p(e|g) / p(e)), from the test-split heatmaps "
            f"({kind}s weighted equally; mean over the method's trials). 0: routing ignores the {kind}; "
            f"ln(min({kind}s, experts)) = {math.log(n_groups):.2f} nats or less at most: one expert per {kind}.", "",
            *table, "", "Heatmaps of each routed method's best trial (rows: " + kind + "s, columns: experts):", ""]


def routing_diagnostics(scope: Scope) -> Section:
    """Every routed method: its best trial's heatmaps, and the specialisation summary over all its trials."""
    from service.report.plots import specialisation_lines

    lines, files, mi = [], [], {}
    for m in scope.order():
        routed = _routed(scope, m)
        if not routed:
            continue
        mi[m] = specialisation([h for _, h in routed])
        best, heat = max(routed, key=lambda th: score_key(th[0]))
        p = heatmap_figure(heat, best, f"{m}: best trial", scope.kind, scope.path(f"heatmaps_{m}"))
        files.append(p)
        score = "-" if best.test is None else f"{best.test * 100:.2f}"
        lines += [f"- `{p.name}`: {m}, best trial `{best.run_name}` (test {scope.primary} x100 {score})"]
    title = ["### Routing diagnostics of every routed method", ""]
    if not mi:
        return Section(title + ["No routing diagnostics: no routed trial has a heatmap.", ""], files)
    p = save(specialisation_lines(mi, f"{scope.name}: how much each block's routing depends on the {scope.kind}"),
             scope.path("specialisation"))
    return Section(title + _specialisation_head(scope, mi, p) + lines + [""], [*files, p], {"mutual_information": mi})


def sensitivity_section(scope: Scope) -> Section:
    """Score against each hyper-parameter the sweep varies (seed and method aside), per method."""
    from service.report.plots import sensitivity_plot

    ts, primary = scope.trials, scope.primary
    lines, files, numbers = [], [], {}
    for key in varied_params([t.params for t in ts], ignore=("seed", "routing.method")):
        points = [(t.params.get(key, "?"), t.seed, t.test) for t in ts]
        rows = numbers[key] = sensitivity(points)
        safe = key.replace("/", "_").replace(".", "_")
        p = save(sensitivity_plot(key, rows, [(v, s) for v, _, s in points], f"test {primary}",
                                  f"{scope.name}: test {primary} vs {key}"), scope.path(f"sensitivity_{safe}"))
        files.append(p)
        best = rows[0]
        ci = ("no interval (" + best["note"] + ")" if best["ci"][0] is None
              else f"95% CI [{best['ci'][0]:.4f}, {best['ci'][1]:.4f}]")
        lines += [f"![{key}]({p.name})", "",
                  f"`{p.name}`: test {primary} per value of `{key}` (points: seeds; marker: mean with its 95% "
                  f"t-interval). Best: `{key}={best['value']}`, mean {best['mean']:.4f} over {best['n']} seeds, "
                  f"{ci}.", ""]
    return Section(["### Sensitivity", "", *lines] if lines else [], files, {"sensitivity": numbers})
