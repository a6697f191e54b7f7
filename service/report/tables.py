"""The sweep's tables (markdown): per method x group with the statistics over seeds (:mod:`service.report.stats`),
per trial, compute, and the console's: the table printed at the end of a sweep (from the report's trials) and
the progress line printed as trials end (:mod:`service.progress`). Nothing else keeps a summary.
"""
from __future__ import annotations

import statistics

from service.report.trials import Trial, _finite


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


def seed_scores(trials: list[Trial], value=lambda t: t.test) -> dict[str, dict[str, float | None]]:
    """``{method: {seed: score}}`` for the statistics over seeds (:mod:`service.report.stats`), methods best first,
    seeds in ascending order.

    A method with several trials at one seed (a sweep that also varies hyper-parameters) counts that seed
    once, with the mean of its trials' values; a seed none of whose trials has a value is None (missing)."""
    out: dict[str, dict[str, float | None]] = {}
    for m in method_order(trials):
        by_seed: dict[str, list] = {}
        for t in trials:
            if t.method == m:
                by_seed.setdefault(str(t.seed), []).append(value(t))
        out[m] = {seed: (ms[0] if (ms := mean_std(by_seed[seed])) else None)  # seeds in order: a bootstrap
                  for seed in sorted(by_seed, key=_seed_key)}                  # does not depend on read order
    return out


def task_scores(trials: list[Trial]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{method: {group: {seed: score}}}`` of the per-domain / per-task test scores, for the cross-task
    aggregates (:mod:`service.report.aggregate`): :func:`seed_scores` of each group, groups in the setting's order."""
    per_group = {g: seed_scores(trials, lambda t, g=g: t.groups.get(g)) for g in groups_of(trials)}
    return {m: {g: per_group[g][m] for g in per_group} for m in method_order(trials)}


def column_statistics(scores: dict[str, dict[str, float | None]], reference: str, interval: str = "t",
                      n_boot: int = 10_000):
    """One column of the method table: (summaries by method, paired comparisons with ``reference`` by method;
    Holm over the methods of this column). No comparison when ``reference`` has no trial here."""
    from service.report.stats import compare, summarize

    if reference in scores:
        summaries, comparisons = compare(scores, reference=reference, interval=interval, n_boot=n_boot)
    else:
        summaries, comparisons = [summarize(m, v, interval, n_boot=n_boot) for m, v in scores.items()], []
    return {s.method: s for s in summaries}, {c.method: c for c in comparisons}


def _stat_cell(s, c, scale: float, best: bool) -> str:
    """mean ± CI half-width (t) or mean [low, high] (bootstrap), then (n=seeds); ``*``: significant vs the
    reference; one seed: its value and "no CI"."""
    if s is None or s.mean is None:
        return "-"
    if s.n < 2:
        num, n = f"{s.mean * scale:.2f}", "(n=1: no CI)"
    elif s.interval == "t":
        num, n = f"{s.mean * scale:.2f} ± {(s.ci_high - s.mean) * scale:.2f}", f"(n={s.n})"
    else:
        num, n = f"{s.mean * scale:.2f} [{s.ci_low * scale:.2f}, {s.ci_high * scale:.2f}]", f"(n={s.n})"
    return f"{f'**{num}**' if best else num} {n}{'*' if c is not None and c.significant else ''}"


def method_table(trials: list[Trial], scale: float = 100.0, reference: str | None = None, interval: str = "t",
                 n_boot: int = 10_000) -> str:
    """Markdown: one row per method (best first), one column per domain/task, then the primary metric.

    Each cell: the test metric x ``scale``, mean over the seeds that have a value with the half-width of its
    95% confidence interval (``interval`` "t", or "bootstrap": the interval itself), and n = those seeds
    (:mod:`service.report.stats`). ``*`` marks a method whose paired difference to ``reference`` in that column is
    significant (Holm-adjusted over the column's methods, p < 0.05; None: ``service.report.stats.default_reference``).
    One seed: its value, "no CI". The best mean of each column is bold; "seeds" counts trials with an overall
    value out of all the method's trials.
    """
    if reference is None:
        from service.report.stats import default_reference

        reference = default_reference()
    primary = trials[0].primary if trials else "accuracy"
    groups = groups_of(trials)
    methods = method_order(trials)
    cols = [(g, seed_scores(trials, lambda t, g=g: t.groups.get(g))) for g in groups]
    cols.append((f"{primary} (overall)", seed_scores(trials)))
    head = ["method", "seeds", *[name for name, _ in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stats = [column_statistics(scores, reference, interval, n_boot) for _, scores in cols]
    best = [max((s.mean for s in summ.values() if s.mean is not None), default=None) for summ, _ in stats]
    for m in methods:
        ts = [t for t in trials if t.method == m]
        cells = [m, f"{sum(t.test is not None for t in ts)}/{len(ts)}"]
        for (summ, comp), top in zip(stats, best):
            s = summ.get(m)
            cells.append(_stat_cell(s, comp.get(m), scale,
                                    best=s is not None and s.mean is not None and len(methods) > 1 and s.mean == top))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def progress_line(done: int, total: int, scores: dict[str, list[float]], digits: int = 3, *,
                  failed: int | None = None, running: int | None = None, elapsed: float | None = None,
                  eta: float | None = None, device_hours: float | None = None) -> str:
    """The console line printed when a trial ends: trials done out of the sweep's, then per method (in the
    given order) the running mean of its reported values and how many trials it rests on (``-`` for none),
    e.g. ``progress: 4/6 done | smear 0.547 (2) adapter 0.540 (1) tag - (0)``. Given ``failed`` and ``running``
    (trials), ``elapsed`` and ``eta`` (seconds; ``eta`` None: not known yet) and ``device_hours``, the line
    carries them too (:mod:`service.progress` defines each), e.g. ``progress: 4/6 done (1 failed), 2 running |
    smear 0.547 (2) ... | elapsed 1m05s, ETA 33s, device-hours 0.036``."""
    parts = []
    for m, vs in scores.items():
        ms = mean_std(vs)
        parts.append(f"{m} {'-' if ms is None else f'{ms[0]:.{digits}f}'} ({0 if ms is None else ms[2]})")
    head = f"progress: {done}/{total} done"
    if failed is not None:
        head += f" ({failed} failed)"
    if running is not None:
        head += f", {running} running"
    line = head + (" | " + " ".join(parts) if parts else "")
    times = [f"elapsed {duration(elapsed)}", f"ETA {duration(eta)}"] if elapsed is not None else []
    if device_hours is not None:
        times.append(f"device-hours {device_hours:.3f}")
    return line + (" | " + ", ".join(times) if times else "")


def duration(seconds: float | None) -> str:
    """``45s``, ``3m05s``, ``2h03m``; ``-`` for None (not known)."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


CONSOLE_STATUS = {"FINISHED": "OK", "FAILED": "ERROR"}  # a run's MLflow status, as the console says it


def console_table(trials: list[Trial]) -> str:
    """The table printed at the end of a sweep, from the report's read-back of MLflow (markdown): method x seed
    -> best val and test score and status (OK: its run FINISHED, ERROR: FAILED, else the run's status), then
    mean +- std per method, best test mean first; one such pair per setting (titled when the sweep has several)."""
    settings = list(dict.fromkeys(t.setting for t in trials))
    if len(settings) <= 1:
        return _console_table(trials, trials[0].primary if trials else "accuracy")
    return "\n\n".join(f"{setting}:\n\n" + _console_table(ts, ts[0].primary)
                        for setting in settings if (ts := [t for t in trials if t.setting == setting]))


def _console_table(trials: list[Trial], metric: str) -> str:
    lines = [f"| method | seed | val {metric} (best) | test {metric} | status |", "|---|---|---|---|---|"]
    for t in sorted(trials, key=lambda t: (t.method, _seed_key(t.seed))):
        lines.append(f"| {t.method} | {t.seed} | {_fmt(t.val_best)} | {_fmt(t.test)} | "
                     f"{CONSOLE_STATUS.get(t.status, t.status)} |")
    lines += ["", f"| method | trials | val {metric} mean +- std | test {metric} mean +- std |", "|---|---|---|---|"]
    for m in method_order(trials):
        ts = [t for t in trials if t.method == m]
        lines.append(f"| {m} | {len(ts)} | {_ms([t.val_best for t in ts])} | {_ms([t.test for t in ts])} |")
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


def device_hours(trials: list[Trial]) -> float:
    """The trials' training device-hours: the sum of their ``compute/train_hours`` (trainables/names.py), the
    compute table's total and ``--max-device-hours``' meter (service/decide.py)."""
    return sum(t.compute.get("train_hours", 0.0) for t in trials)


def compute_table(trials: list[Trial]) -> str:
    """Markdown: per method (best first), what one trial costs: trainable / total parameters, GFLOPs per example
    of one training step (whole model and routing blocks), seconds per step and training hours (mean over its
    trials), then the sweep's total training hours. Empty when no trial logged compute metrics."""
    if not any(t.compute for t in trials):
        return ""
    cols = [("trainable params", "params_trainable", 1.0, "{:,.0f}"), ("total params", "params_total", 1.0, "{:,.0f}"),
            ("GFLOPs / example", "flops_per_example", 1e-9, "{:.4g}"),
            ("routing GFLOPs / example", "routing_flops_per_example", 1e-9, "{:.4g}"),
            ("s / step", "seconds_per_step", 1.0, "{:.3g}"), ("train hours / trial", "train_hours", 1.0, "{:.3g}")]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for m in method_order(trials):
        ts = [t for t in trials if t.method == m]
        cells = []
        for _, key, scale, fmt in cols:
            ms = mean_std([t.compute.get(key) for t in ts])
            cells.append("-" if ms is None else fmt.format(ms[0] * scale))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Training time of the whole sweep: {device_hours(trials):.3g} device-hours (x GPUs per trial on a GPU cluster; "
                  "evaluation and start-up left out)."]
    return "\n".join(lines)
