"""The report's diagnostic sections: learning curves (and the ST-Gumbel temperature), every routed method's
specialisation heatmaps, a one-figure specialisation summary (mutual information per block), and the
sensitivity of the score to each hyper-parameter a sweep varies. Each returns summary.md lines and the
files it wrote; the numbers come from :mod:`service.report.diagnostics`, the figures from :mod:`service.report.plots`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from service.report.diagnostics import curve_band, sensitivity, specialisation, varied_params
from service.report.trials import Trial, score_key

HEATMAP_ARTIFACT = "routing/heatmaps.json"


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


def _history(client, trial: Trial, key: str) -> list[tuple[int, float]]:
    try:
        return [(m.step, m.value) for m in client.get_metric_history(trial.run_id, key)]
    except Exception:  # a run without that metric, or an unreadable record: no curve
        return []


def learning_curves(client, ts: list[Trial], order: list[str], out_dir: Path, suffix: str, name: str):
    from service.report.plots import learning_curves as plot

    primary = ts[0].primary
    bands = {m: curve_band([_history(client, t, f"val/{primary}") for t in ts if t.method == m]) for m in order}
    bands = {m: b for m, b in bands.items() if b}
    if not bands:
        return [f"No learning curves: no trial logged val/{primary}.", ""], []
    p = save(plot(bands, f"validation {primary}", f"{name}: validation {primary} over training"),
             out_dir / f"learning_curves{suffix}.png")
    lines = [f"![learning curves]({p.name})", "",
             f"`{p.name}`: validation {primary} at each evaluation; line = mean over the method's seeds "
             f"(n in the legend), band = their range.", ""]
    files = [p]
    temps = {m: curve_band([_history(client, t, "routing/temperature") for t in ts if t.method == m]) for m in order}
    temps = {m: b for m, b in temps.items() if b}
    if temps:
        p = save(plot(temps, "temperature", f"{name}: routing temperature over training"),
                 out_dir / f"temperature{suffix}.png")
        lines += [f"![temperature]({p.name})", "",
                  f"`{p.name}`: the ST-Gumbel temperature at each evaluation (the reference's compounding "
                  "anneal), mean over seeds.", ""]
        files.append(p)
    return lines, files


def routing_diagnostics(client, ts: list[Trial], order: list[str], out_dir: Path, suffix: str, name: str):
    """Every routed method: its best trial's heatmaps, and the specialisation summary over all its trials."""
    from service.report.plots import specialisation_lines

    kind, primary = ts[0].group_kind, ts[0].primary
    lines, files, mi = [], [], {}
    for m in order:
        heats = []
        for t in [t for t in ts if t.method == m]:
            try:
                heats.append((t, heatmap_of(client, t)))
            except Exception:  # failed trial, older record: not part of the summary
                continue
        routed = [(t, h) for t, h in heats if any(mat and len(mat[0]) > 1 for mat in h.get("blocks", {}).values())]
        if not routed:
            continue
        mi[m] = specialisation([h for _, h in routed])
        best, heat = max(routed, key=lambda th: score_key(th[0]))
        p = heatmap_figure(heat, best, f"{m}: best trial", kind, out_dir / f"heatmaps_{m}{suffix}.png")
        files.append(p)
        score = "-" if best.test is None else f"{best.test * 100:.2f}"
        lines += [f"- `{p.name}`: {m}, best trial `{best.run_name}` (test {primary} x100 {score})"]
    if not mi:
        return ["No routing diagnostics: no routed trial has a heatmap.", ""], files
    p = save(specialisation_lines(mi, f"{name}: how much each block's routing depends on the {kind}"),
             out_dir / f"specialisation{suffix}.png")
    files.append(p)
    table = ["| method | mean I(" + kind + "; expert) over blocks, nats | most specialised block |", "|---|---|---|"]
    for m, v in sorted(mi.items(), key=lambda kv: -sum(kv[1].values()) / max(len(kv[1]), 1)):
        top = max(v, key=v.get)
        table.append(f"| {m} | {sum(v.values()) / len(v):.3f} | {top} ({v[top]:.3f}) |")
    n_groups = len(ts[0].group_order) or 2
    head = [f"![specialisation]({p.name})", "",
            f"`{p.name}`: per routed block (x, in model order) and method, the mutual information between the "
            f"{kind} and the expert, I = sum_g p(g) sum_e p(e|g) ln(p(e|g) / p(e)), from the test-split heatmaps "
            f"({kind}s weighted equally; mean over the method's trials). 0: routing ignores the {kind}; "
            f"ln(min({kind}s, experts)) = {math.log(n_groups):.2f} nats or less at most: one expert per {kind}.", "",
            *table, "", "Heatmaps of each routed method's best trial (rows: " + kind + "s, columns: experts):", ""]
    return head + lines + [""], files


def sensitivity_section(ts: list[Trial], out_dir: Path, suffix: str, name: str):
    """Score against each hyper-parameter the sweep varies (seed and method aside), per method."""
    from service.report.plots import sensitivity_plot

    primary = ts[0].primary
    keys = varied_params([t.params for t in ts], ignore=("seed", "routing.method"))
    lines, files = [], []
    for key in keys:
        points = [(t.params.get(key, "?"), t.seed, t.test) for t in ts]
        rows = sensitivity(points)
        safe = key.replace("/", "_").replace(".", "_")
        p = save(sensitivity_plot(key, rows, [(v, s) for v, _, s in points], f"test {primary}",
                                  f"{name}: test {primary} vs {key}"), out_dir / f"sensitivity_{safe}{suffix}.png")
        files.append(p)
        best = rows[0]
        ci = ("no interval (" + best["note"] + ")" if best["ci"][0] is None
              else f"95% CI [{best['ci'][0]:.4f}, {best['ci'][1]:.4f}]")
        lines += [f"![{key}]({p.name})", "",
                  f"`{p.name}`: test {primary} per value of `{key}` (points: seeds; marker: mean with its 95% "
                  f"t-interval). Best: `{key}={best['value']}`, mean {best['mean']:.4f} over {best['n']} seeds, "
                  f"{ci}.", ""]
    return (["### Sensitivity", "", *lines] if lines else []), files
