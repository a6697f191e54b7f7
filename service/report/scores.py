"""The report's score sections of one setting (each a :class:`~service.report.sections.Section`): the method x
group table, the statistics over seeds (also as LaTeX and CSV), the seeds planned to detect the margin
(:mod:`service.sequential`), compute, one line per trial, and the score plots (per method; against FLOPs,
device-hours and wall time). The tables are :mod:`service.report.tables`, the statistics
:mod:`service.report.stats`, the figures :mod:`service.report.plots`.
"""
from __future__ import annotations

from service.report.sections import Scope, Section, save
from service.report.tables import column_statistics, compute_table, method_table, seed_scores, trial_table


def score_table(scope: Scope) -> Section:
    """The setting's heading and its method x group table: mean over seeds with its CI, ``*`` vs the reference."""
    t0, reference, interval, n_boot = scope.trials[0], scope.reference, scope.interval, scope.n_boot
    primary, kind, gm = t0.primary, t0.group_kind, t0.group_metric
    ci = ("± half-width of its 95% t-interval" if interval == "t"
          else f"[95% percentile-bootstrap interval, {n_boot:,} resamples]")
    return Section([f"## {t0.setting}: test {gm} per {kind} and overall {primary}", "",
                    f"Test metrics x100 of each trial's best-validation weights: mean over seeds {ci}, "
                    f"(n=) the seeds it rests on (one seed: no interval). `*`: the paired difference to "
                    f"`{reference}` in that column is significant (Holm-adjusted over the column's methods, "
                    f"p < 0.05; see the statistics below). Methods best first by {primary}; best mean in bold. "
                    f"`seeds` = trials with a test {primary} / trials.", "",
                    method_table(scope.trials, reference=reference, interval=interval, n_boot=n_boot), ""])


def seed_statistics(scope: Scope) -> Section:
    """The statistics over seeds (:mod:`service.report.stats`) of one setting's trials: per method the mean and
    its 95% CI (``scope.interval``: "t", or "bootstrap" with ``scope.n_boot`` resamples), against the reference
    the paired difference over shared seeds, its CI and a Holm-corrected test; the same table as LaTeX
    (booktabs) and CSV files."""
    from service.report.stats import format_markdown, to_csv, to_latex_booktabs

    primary, reference = scope.primary, scope.reference
    by_method, by_comparison = column_statistics(seed_scores(scope.trials), reference, scope.interval, scope.n_boot)
    summaries, comparisons = list(by_method.values()), list(by_comparison.values())
    if comparisons:
        intro = (f"Test {primary} (not x100) per method over its seeds, and each method minus `{reference}` over "
                 f"the seeds both have (paired t-test below 6 pairs, Wilcoxon signed-rank from 6; p-values "
                 f"Holm-corrected across the methods compared).")
    else:
        intro = f"Test {primary} per method over its seeds; no `{reference}` trial, so no paired comparison."
    files = []
    for path, text in ((scope.path("table", ".tex"), to_latex_booktabs(summaries, comparisons)),
                       (scope.path("table", ".csv"), to_csv(summaries, comparisons))):
        path.write_text(text)
        files.append(path)
    return Section([f"### Statistics over seeds (reference `{reference}`)", "", intro, "",
                    format_markdown(summaries, comparisons), "",
                    f"The same table: [`{files[0].name}`]({files[0].name}) (LaTeX, booktabs), "
                    f"[`{files[1].name}`]({files[1].name}) (CSV).", ""],
                   files, {"summaries": by_method, "comparisons": by_comparison})


def _rank_lines(scope: Scope, rt, figure) -> list[str]:
    """The rank test's markdown: Friedman's result, the CD diagram and the pairs that differ, or why not."""
    kind, n, note = scope.kind, len(rt.tasks), rt.note.replace("task", scope.kind)
    if rt.p_value is None:
        return [f"No Friedman test and no critical-difference diagram: {note}.", ""]
    differ = [f"`{p.a}` > `{p.b}` (Holm p {p.p_holm:.3f})" for p in rt.pairs if p.significant]
    return [f"Friedman test over the {n} {kind}s (each {kind}'s mean over seeds, {len(rt.ranks)} methods): "
            f"chi2 = {rt.statistic:.3f}, p = {rt.p_value:.4f}" + (f"; {note}." if note else "."), "",
            f"![critical-difference diagram]({figure.name})", "",
            f"`{figure.name}`: average rank over the {n} {kind}s (1 = best; Demsar 2006). A red bar joins methods "
            f"no two of which differ: Demsar's z-test of their average ranks, Holm-corrected over all "
            f"{len(rt.pairs)} pairs, p < {rt.alpha}, and only after the Friedman test rejects. The scale bar is "
            f"Nemenyi's critical difference ({rt.cd_nemenyi:.2f} ranks), for reference.", "",
            "Pairs that differ: " + (", ".join(differ) if differ else "none") + ".", ""]


def cross_task_aggregates(scope: Scope) -> Section:
    """Per method over the setting's tasks (domains): the mean over them, the IQM and P(> reference), each with a
    stratified bootstrap interval over seeds, and the Friedman test with a CD diagram
    (:mod:`service.report.aggregate`); the table also as ``aggregate.tex`` and ``aggregate.csv``."""
    from service.report.aggregate import aggregates, format_markdown, to_csv, to_latex_booktabs
    from service.report.plots import cd_diagram
    from service.report.tables import task_scores

    kind, reference = scope.kind, scope.reference
    title = [f"### Aggregates over {kind}s (reference `{reference}`)", ""]
    rows, rt, left_out = aggregates(task_scores(scope.trials), reference, n_boot=scope.n_boot)
    if not rows:
        return Section(title + [f"No aggregates over {kind}s: no method has a test score on every {kind}.", ""],
                       numbers={"left_out": left_out})
    tasks = ", ".join(f"`{t}`" for t in rt.tasks)
    equal = [abs(t.test - sum(t.groups.values()) / len(t.groups)) < 1e-6 for t in scope.trials
             if t.test is not None and set(rt.tasks) <= set(t.groups)]
    same = ("" if not equal else f": the setting's test {scope.primary}" if all(equal) else
            f"; not the overall test {scope.primary} above, which is not the plain mean of the {kind}s' scores")
    lines = title + [
        f"Per method over its {len(rt.tasks)} {kind}{'s' * (len(rt.tasks) > 1)} ({tasks}), test {scope.trials[0].group_metric} x100: the mean "
        f"over {kind}s of each {kind}'s mean over seeds ({kind}s weighted equally{same}); the IQM, the mean of "
        f"the middle 50% of all ({kind}, seed) scores; P(> `{reference}`), the probability that a seed of the "
        f"method beats a seed of `{reference}` on a {kind} (ties count half; mean over {kind}s, 0.5 = no "
        f"difference; Agarwal et al. 2021). Intervals: 95% stratified percentile bootstrap, {scope.n_boot:,} "
        f"resamples of the seeds within each {kind}; none when a {kind} has a single seed. Average rank: over "
        f"{kind}s, 1 = best.", "", format_markdown(rows, reference, kind=kind), ""]
    by_note: dict[str, dict[str, None]] = {}
    for r, e in [(r, e) for r in rows for e in (r.mean, r.iqm, r.p_improve) if e and e.note]:
        by_note.setdefault(e.note.replace("task", kind), {})[r.method] = None
    notes = {f"{note} ({', '.join(ms)})": None for note, ms in by_note.items()}
    notes.update({f"{m}: left out, no test score on {', '.join(ts) if len(ts) < len(rt.tasks) else f'any {kind}'}":
                  None for m, ts in left_out.items()})
    if not any(r.method == reference for r in rows):
        notes[f"no P(> `{reference}`): `{reference}` is not among the methods with a test score on every {kind}"] = None
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    files = []
    for path, text in ((scope.path("aggregate", ".tex"), to_latex_booktabs(rows, reference, kind=kind)),
                       (scope.path("aggregate", ".csv"), to_csv(rows, reference))):
        path.write_text(text)
        files.append(path)
    figure = None
    if rt.p_value is not None:
        figure = save(cd_diagram(rt.ranks, rt.cliques, rt.cd_nemenyi, f"{scope.name}: average rank over "
                                 f"{len(rt.tasks)} {kind}s (Friedman p = {rt.p_value:.3g})"), scope.path("cd_diagram"))
        files.append(figure)
    lines += _rank_lines(scope, rt, figure)
    lines += [f"The same table: [`{files[0].name}`]({files[0].name}) (LaTeX, booktabs), "
              f"[`{files[1].name}`]({files[1].name}) (CSV, not x100).", ""]
    return Section(lines, files, {"aggregates": {r.method: r for r in rows}, "rank_test": rt, "left_out": left_out})


def planned_seeds(scope: Scope) -> Section:
    """Per comparison with the reference, the seeds to detect the margin with 80% power (:mod:`service.sequential`),
    this sweep's paired differences taken as the pilot: a fixed design, and the group-sequential one of the same
    power (its maximum, and its expected seeds when the true difference is the margin)."""
    from service.report.stats import paired_differences
    from service.sequential import ALPHA, DEFAULT_DELTA, DEFAULT_LOOKS, POWER, plan_seeds

    scores, reference = seed_scores(scope.trials), scope.reference
    others = [m for m in scores if m != reference]
    if reference not in scores or not others:
        return Section([])
    plans = plan_seeds({m: paired_differences(m, scores[m], reference, scores[reference]) for m in others})
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows = [f"| {p.method} | {p.pilot} | {num(p.sd, '.4f')} | {num(p.fixed, 'd')} | {num(p.sequential, 'd')} | "
            f"{num(p.expected, '.1f')} | {p.note} |" for p in plans.values()]
    return Section([f"### Planned seeds (reference `{reference}`)", "",
                    f"Seeds (paired with `{reference}`) to detect a difference of delta = {DEFAULT_DELTA:g} in test "
                    f"{scope.primary} (not x100) with {POWER:.0%} power, the SD of each method's differences over "
                    f"this sweep's seeds taken as the truth: a paired t-test at alpha = {ALPHA:g} / {len(others)} "
                    f"(Holm's first step), and the group-sequential design of the same power over {DEFAULT_LOOKS} "
                    f"looks (Lan-DeMets O'Brien-Fleming spending; expected seeds when the true difference is delta; "
                    f"docs/seeds.md). A pilot of few seeds gives a rough SD, so a rough plan.", "",
                    "| method | pairs | SD of differences | fixed design | sequential: at most | sequential: expected "
                    "| note |", "|---|---:|---:|---:|---:|---:|---|", *rows, ""], numbers={"planned_seeds": plans})


def sequential_decisions(scope: Scope) -> Section:
    """``--until-decided`` (service/decide.py), as recorded on the parent run: each comparison's decision, the look
    it came at, the seeds it took, and the seeds the fixed design of the same power (look 1 as the pilot) would
    have taken. Nothing for a sweep that ran no such loop."""
    from service.decide import LoopState, decisions_from_tags

    state = LoopState.from_tags(scope.tags)
    if state is None or state.design is None:
        return Section([])
    found, ref, looks = decisions_from_tags(scope.tags), state.reference, state.design
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows = [f"| {m} | {d['verdict']} | {num(d['decided_at'], 'd')} | {d['seeds']} | {num(state.fixed.get(m), 'd')} | "
            f"{num(d['mean'], '+.4f')} | {d['p_superiority_holm']:.3g} | {d['p_equivalence_holm']:.3g} | {d['note']} |"
            for m, d in found.items()]
    spent = state.design[state.look - 1] + sum(d["seeds"] for d in found.values())
    fixed = [n for n in state.fixed.values() if n is not None]
    vs = (f"; a fixed design of the same power: {max(fixed)} seeds for each of the {len(found) + 1} methods, "
          f"{max(fixed) * (len(found) + 1)}" if len(fixed) == len(found) else "")
    status = f"stopped: {state.stopped}" if state.stopped else "still running"
    return Section([f"### Seeds until decided (reference `{ref}`)", "",
                    f"`--until-decided`: looks at {', '.join(map(str, looks))} seeds (paired with `{ref}`), "
                    f"{state.look} done, {status}. Each comparison stops at its verdict (two-sided superiority, or "
                    f"equivalence within delta = {state.delta:g} by TOST; alpha = {state.alpha:g} per family, "
                    f"Lan-DeMets O'Brien-Fleming spending, Holm across comparisons; docs/seeds.md); undecided ones "
                    f"got the next look's seeds. `fixed design`: the seeds a paired t-test of the same power needs, "
                    f"look 1's differences as the pilot; a comparison the budget (`--max-seeds`, `--max-device-hours`) "
                    f"left undecided had less power than that. Training device-hours so far: "
                    f"{state.device_hours:.3g}.", "",
                    "| method | decision | at look | seeds | fixed design | mean difference | Holm p (superiority) | "
                    "Holm p (equivalence) | note |", "|---|---|---:|---:|---:|---:|---:|---:|---|", *rows, "",
                    f"Seeds run (method x seed): {spent}{vs}.", ""],
                   numbers={"decisions": found, "state": state})


def compute(scope: Scope) -> Section:
    """What one trial of each method costs; nothing when no trial logged compute metrics."""
    cost = compute_table(scope.trials)
    if not cost:
        return Section([])
    return Section(["### Compute", "", "What one trial of each method costs (mean over its trials; FLOPs measured "
                    "with torch's FlopCounterMode on one real training step, forward + backward; AdaMix counts its "
                    "two passes).", "", cost, ""])


def trial_list(scope: Scope) -> Section:
    return Section(["### Trials", "", trial_table(scope.trials), ""])


# the cost axes of the score-vs-cost plots: (file key, axis label, compute metric, its unit in that metric)
COSTS = (("flops", "training GFLOPs per example (one step: forward + backward)", "flops_per_example", 1e9),
         ("hours", "device-hours of training per trial (evaluation and start-up left out)", "train_hours", 1.0))


def _points(scored, order: list[str], pick) -> dict[str, list[tuple[float, float]]]:
    """Per method (in ``order``) its trials' (cost, score) points; methods without one left out."""
    pts = {m: [(pick(t), t.test) for t in scored if t.method == m] for m in order}
    return {m: v for m, v in pts.items() if v}


def _cost_plots(scope: Scope, scored, order: list[str]) -> Section:
    """Score against each measured cost (FLOPs, device-hours), then against each trial's wall time."""
    from service.report.plots import score_vs_cost

    primary, name, lines, files = scope.primary, scope.name, [], []
    for key, axis, metric, unit in COSTS:
        what = [t for t in scored if metric in t.compute]
        if not what:
            continue
        pts = _points(what, order, lambda t: t.compute[metric] / unit)
        p = save(score_vs_cost(pts, axis, f"test {primary}", f"{name}: test {primary} vs {axis.split(' (')[0]}"),
                 scope.path(f"score_vs_{key}"))
        files.append(p)
        lines += [f"![test {primary} vs {key}]({p.name})", "",
                  f"`{p.name}`: cost = {axis}, measured in each trial (trainables/accounting.py, "
                  "the train loop's clock). Error bars: std over seeds.", ""]
    timed = [t for t in scored if t.wall_s is not None]
    if not timed:
        return Section(lines + ["No score-vs-cost plot: no trial has both a start and an end time.", ""], files)
    p = save(score_vs_cost(_points(timed, order, lambda t: t.wall_s), "trial wall time (s) = MLflow run end - start",
                           f"test {primary}", f"{name}: test {primary} vs trial wall time"), scope.path("score_vs_cost"))
    return Section(lines + [f"![test {primary} vs wall time]({p.name})", "",
                            f"`{p.name}`: cost = each trial's wall time (its MLflow run's end - start), which "
                            "includes start-up and evaluation and depends on what else ran at the same time on "
                            "the machine; not a FLOP or parameter count. Error bars: std over seeds.", ""],
                   [*files, p])


def score_plots(scope: Scope) -> Section:
    """The overall test score per method (a point per seed, the mean as a bar), then against its cost."""
    from service.report.plots import score_per_method

    primary, lines = scope.primary, ["### Plots", ""]
    scored = [t for t in scope.trials if t.test is not None]
    if not scored:
        return Section(lines + [f"No score plots: no trial has a test {primary}.", ""])
    order = [m for m in scope.order() if any(t.method == m for t in scored)]
    per_method = {m: [t.test for t in scored if t.method == m] for m in order}
    p = save(score_per_method(per_method, f"test {primary}", f"{scope.name}: test {primary} per method"),
             scope.path("scores"))
    costs = _cost_plots(scope, scored, order)
    return Section(lines + [f"![test {primary} per method]({p.name})", "",
                            f"`{p.name}`: test {primary} per method, one point per seed, bar = mean.", "",
                            *costs.markdown], [p, *costs.files], {"scores": per_method})
