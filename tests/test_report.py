"""service/report/: the sweep report (table, plots) read back from MLflow, on hand-made and real records."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.report import write_report
from service.report.tables import console_table, mean_std, method_table
from service.report.trials import Trial, trial_from_run
from tests.helpers import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("scores.png", "score_vs_cost.png", "heatmaps_best_smear.png")


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) >= min_bytes, f"{path}: only {len(data)} bytes"


def run_report(*args: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    """``python -m service.report ARGS`` as a process (``cwd`` None: the repository root)."""
    return subprocess.run([sys.executable, "-m", "service.report", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd or REPO)


def _table_rows(md: str) -> list[list[str]]:
    """Cells of the first markdown table in ``md`` (header, separator, body)."""
    rows, started = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif started:
            break
    return rows


# --- the table logic, on hand-made rows --------------------------------------------------------------

def test_method_table_resnet_mean_ci_order_and_missing_values():
    trials = [
        Trial("smear", "0", test=0.60, groups={"real": 0.70, "sketch": 0.50}, group_order=["real", "sketch"]),
        Trial("smear", "1", test=0.64, groups={"real": 0.74, "sketch": 0.54}, group_order=["real", "sketch"]),
        Trial("tag", "0", test=0.70, groups={"real": 0.80, "sketch": 0.60}, group_order=["real", "sketch"]),
        Trial("tag", "1", status="FAILED"),                       # failed trial: no metrics at all
        Trial("adapter", "0", test=0.50, groups={"real": 0.55}),  # a group metric missing
        Trial("hash", "0", status="FAILED"),                      # a method with no value at all
    ]
    rows = _table_rows(method_table(trials))
    assert rows[0] == ["method", "seeds", "real", "sketch", "accuracy (overall)"]
    body = {r[0]: r for r in rows[2:]}
    # best first by the mean overall test accuracy; a method without any value last
    assert [r[0] for r in rows[2:]] == ["tag", "smear", "adapter", "hash"]
    # smear: sd of (.70, .74) = .028284; 95% t half-width t_{.975,1} s / sqrt(2) = 12.706205 * .02 = .254124
    assert body["smear"][1:] == ["2/2", "72.00 ± 25.41 (n=2)", "52.00 ± 25.41 (n=2)", "62.00 ± 25.41 (n=2)"]
    # one seed: the value and no interval (and no paired test: one shared seed with smear, so no *)
    assert body["tag"][1:] == ["1/2", "**80.00** (n=1: no CI)", "**60.00** (n=1: no CI)", "**70.00** (n=1: no CI)"]
    assert body["adapter"][1:] == ["1/1", "55.00 (n=1: no CI)", "-", "50.00 (n=1: no CI)"]
    assert body["hash"][1:] == ["0/1", "-", "-", "-"]


def test_method_table_t5_columns_are_tasks_and_average():
    trials = [Trial(m, s, setting="t5_glue", primary="average", group_metric="score", group_kind="task", test=v,
                    groups={"rte": v - 0.1, "cola": v + 0.1}, group_order=["rte", "cola"]) for m, s, v in
              [("smear", "0", 0.5), ("smear", "1", 0.7), ("adapter", "0", 0.4)]]
    rows = _table_rows(method_table(trials))
    assert rows[0] == ["method", "seeds", "rte", "cola", "average (overall)"]
    assert [r[0] for r in rows[2:]] == ["smear", "adapter"]
    assert rows[2][-1] == "**60.00 ± 127.06** (n=2)"       # 12.706205 * .141421 / sqrt(2) = 1.2706


def _paired_trials() -> list[Trial]:
    """Three methods x seeds 0-2. Overall (and real = overall + .1): tag - smear = +.03, +.04, +.05 (paired t
    p = .020204) and adapter - smear = +.01, -.01, +.03 (p = .477767), worked in tests/test_stats.py; Holm
    over the two: .040408 and .477767, so tag is significant, adapter is not. Sketch swaps the two: adapter's
    differences are +.03, +.04, +.05 and tag's +.01, -.01, +.03."""
    overall = {"smear": (.50, .52, .54), "tag": (.53, .56, .59), "adapter": (.51, .51, .57)}
    sketch = {"smear": (.40, .42, .44), "tag": (.41, .41, .47), "adapter": (.43, .46, .49)}
    return [Trial(m, str(s), test=overall[m][s], groups={"real": overall[m][s] + .1, "sketch": sketch[m][s]},
                  group_order=["real", "sketch"]) for m in overall for s in range(3)]


def test_method_table_marks_significant_differences_per_group_holm_within_the_column():
    rows = _table_rows(method_table(_paired_trials()))
    body = {r[0]: r for r in rows[2:]}
    assert rows[0] == ["method", "seeds", "real", "sketch", "accuracy (overall)"]
    # smear overall: mean .52, sd .02, half-width 4.302653 * .02 / sqrt(3) = .049683
    assert body["smear"][1:] == ["3/3", "62.00 ± 4.97 (n=3)", "42.00 ± 4.97 (n=3)", "52.00 ± 4.97 (n=3)"]
    # tag overall: mean .56, sd .03, half-width 4.302653 * .03 / sqrt(3) = .074524; significant in real and overall
    assert body["tag"][2] == "**66.00 ± 7.45** (n=3)*" and body["tag"][4] == "**56.00 ± 7.45** (n=3)*"
    # tag sketch: mean .43, sd .034641, half-width .086053: not significant (Holm p .4778)
    assert body["tag"][3] == "43.00 ± 8.61 (n=3)"
    # adapter: significant in sketch only (mean .46, sd .03), not in real / overall (mean .53, sd .034641)
    assert body["adapter"][1:] == ["3/3", "63.00 ± 8.61 (n=3)", "**46.00 ± 7.45** (n=3)*", "53.00 ± 8.61 (n=3)"]
    # against tag instead: smear's differences are the negatives (p .020204); adapter - tag: -.02, -.05, -.02
    # (t = -3, p = .095466); Holm: .040408 and .095466, so smear is marked, adapter not, the reference never
    body = {r[0]: r for r in _table_rows(method_table(_paired_trials(), reference="tag"))[2:]}
    assert body["smear"][4] == "52.00 ± 4.97 (n=3)*" and body["adapter"][4] == "53.00 ± 8.61 (n=3)"
    assert body["tag"][4] == "**56.00 ± 7.45** (n=3)"


def test_method_table_bootstrap_interval_and_several_trials_per_seed():
    from service.report.stats import bootstrap_interval

    trials = _paired_trials()
    # a second hyper-parameter setting of tag at seed 0 (.55 next to .53): seed 0 counts once, as their mean .54
    trials.append(Trial("tag", "0", test=.55, groups={"real": .65, "sketch": .41}, group_order=["real", "sketch"]))
    body = {r[0]: r for r in _table_rows(method_table(trials, interval="bootstrap", n_boot=2000))[2:]}
    lo, hi = bootstrap_interval([.54, .56, .59], n_boot=2000)
    assert body["tag"][1] == "4/4"
    assert body["tag"][4] == f"**{(.54 + .56 + .59) / 3 * 100:.2f} [{lo * 100:.2f}, {hi * 100:.2f}]** (n=3)*"


def test_console_table_is_the_reports_trials():
    """The table printed at the end of a sweep, from the trials the report read back: method x seed (seeds in
    numeric order), then mean +- std per method, best test mean first; a failed run is ERROR, its values "-"."""
    trials = [Trial("tag", "10", test=0.70, val_best=0.72), Trial("tag", "2", test=0.60, val_best=0.62),
              Trial("smear", "0", test=0.64, val_best=0.66), Trial("adapter", "0", status="FAILED")]
    assert console_table(trials).splitlines() == [
        "| method | seed | val accuracy (best) | test accuracy | status |", "|---|---|---|---|---|",
        "| adapter | 0 | - | - | ERROR |",
        "| smear | 0 | 0.6600 | 0.6400 | OK |",
        "| tag | 2 | 0.6200 | 0.6000 | OK |",
        "| tag | 10 | 0.7200 | 0.7000 | OK |",
        "",
        "| method | trials | val accuracy mean +- std | test accuracy mean +- std |", "|---|---|---|---|",
        "| tag | 2 | 0.6700 +- 0.0707 | 0.6500 +- 0.0707 |",        # sd of (.60, .70) = .070711
        "| smear | 1 | 0.6600 +- 0.0000 | 0.6400 +- 0.0000 |",
        "| adapter | 1 | - | - |"]
    t5 = [Trial("smear", "0", setting="t5_glue", primary="average", test=0.5, val_best=0.5)]
    two = console_table(trials + t5)                               # one table pair per setting, titled
    assert two.startswith("?:\n\n| method | seed | val accuracy (best)") and "\n\nt5_glue:\n\n| method | seed | " \
        "val average (best) | test average | status |" in two


def test_mean_std_ignores_missing_and_non_finite():
    assert mean_std([None, float("nan")]) is None
    assert mean_std([0.5]) == (0.5, 0.0, 1)
    m, s, n = mean_std([0.2, None, 0.4, float("inf")])
    assert (round(m, 6), round(s, 6), n) == (0.3, 0.141421, 2)


def test_metric_names_travel_with_the_run_tags(tmp_path):
    """The report keeps no copy of a setting's metric names: each trial run carries them (Setting.record_tags)."""
    from trainables.settings import make_config
    from trainables.settings import available_settings, get_setting
    from smear.configs import to_dict

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.create_experiment("smear-sweep/x", artifact_location=str(tmp_path / "a"))
    for name in available_settings():
        setting, cfg = get_setting(name), to_dict(make_config({"setting": name}))
        tags = setting.record_tags(cfg)
        assert tags["primary_metric"] == setting.primary_metric and tags["groups"].split(",") == setting.groups_of(cfg)
        run = client.create_run(exp, tags={**tags, "method": "smear", "seed": "0"})
        first, last = setting.groups_of(cfg)[0], setting.groups_of(cfg)[-1]
        for k, v in {f"test/{setting.primary_metric}": 0.5, f"test/{last}/{setting.group_metric}": 0.25,
                     f"test/{first}/{setting.group_metric}": 0.75}.items():
            client.log_metric(run.info.run_id, k, v)
        t = trial_from_run(client.get_run(run.info.run_id))
        assert (t.setting, t.primary, t.group_metric, t.group_kind) == (
            name, setting.primary_metric, setting.group_metric, setting.group_kind)
        assert t.test == 0.5 and t.group_order == [first, last]                        # the setting's order


# --- write_report on a hand-made MLflow record (no Ray) ----------------------------------------------

def _fake_sweep(db: Path, sweep: str = "fake", methods=(("smear", 0, 0.6), ("tag", 0, 0.7), ("adapter", 0, None)),
                heatmap: bool = True) -> str:
    """A parent run and one child per (method, seed, test accuracy or None = failed), like launch.py's."""
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("smear-sweep/space")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        "smear-sweep/space", artifact_location=str(db.parent / "mlartifacts"),
        tags={"mlflow.experimentKind": "custom_model_development"})
    parent = client.create_run(exp_id, run_name=sweep, tags={"sweep": sweep, "declaration": "space",
                                                             "git_commit": "abc", "smoke": "True"})
    pid = parent.info.run_id
    for i, (method, seed, acc) in enumerate(methods):
        run = client.create_run(exp_id, run_name=f"{method}-s{seed}-x_{i:05d}", tags={
            "mlflow.parentRunId": pid, "sweep": sweep, "trial_id": f"x_{i:05d}", "method": method,
            "seed": str(seed), "setting": "resnet_domainnet", "git_commit": "abc"})
        rid = run.info.run_id
        client.log_param(rid, "data.domains", "['real', 'sketch']")
        if acc is None:
            client.set_terminated(rid, "FAILED")
            continue
        for k, v in {"test/accuracy": acc, "test/real/accuracy": acc + 0.1, "test/sketch/accuracy": acc - 0.1,
                     "val/best_accuracy": acc, "compute/flops_per_example": 2e9 * (1 + i),
                     "compute/params_trainable": 1000.0 * (1 + i), "compute/train_hours": 0.5}.items():
            client.log_metric(rid, k, v, step=4)
        client.log_metric(rid, "val/accuracy", acc - 0.05, step=2)                     # a learning curve
        client.log_metric(rid, "val/accuracy", acc, step=4)
        if method == "smear" and heatmap:
            client.log_dict(rid, {"groups": ["real", "sketch"],
                                  "blocks": {f"layer{b}.0": [[0.7, 0.1, 0.2], [0.1, 0.8, 0.1]] for b in (1, 2, 3, 4, 5)}},
                            "routing/heatmaps.json")
        client.set_terminated(rid, "FINISHED")
    client.set_terminated(pid, "FAILED")
    return pid


def test_write_report_on_hand_made_record_with_a_failed_trial(tmp_path):
    db = tmp_path / "mlflow.db"
    pid = _fake_sweep(db)
    summary = write_report(f"sqlite:///{db}", "fake", tmp_path / "results")
    assert summary == tmp_path / "results" / "fake" / "report" / "summary.md"
    text = summary.read_text()
    rows = {r[0]: r for r in _table_rows(text)[2:]}
    assert rows["tag"][1:] == ["1/1", "**80.00** (n=1: no CI)", "**60.00** (n=1: no CI)", "**70.00** (n=1: no CI)"]
    assert rows["adapter"][1:] == ["0/1", "-", "-", "-"]
    assert "1 not finished" in text and "1 without a test metric" in text
    for png in PLOTS:
        assert_png(summary.parent / png)
        assert f"]({png})" in text
    logged = {a.path for a in MlflowClient(f"sqlite:///{db}").list_artifacts(pid, "report")}
    new_plots = ("learning_curves.png", "heatmaps_smear.png", "specialisation.png", "score_vs_flops.png",
                 "score_vs_hours.png")
    compute = {r[0]: r for r in _table_rows(text[text.index("### Compute"):])[2:]}
    assert compute["smear"][1] == "1,000" and compute["smear"][3] == "2" and compute["tag"][3] == "4"   # GFLOPs
    assert "Training time of the whole sweep: 1 device-hours" in text                  # two finished trials
    assert logged == {f"report/{f}" for f in ("summary.md", "table.tex", "table.csv", "aggregate.tex", "aggregate.csv",
                                              *PLOTS, *new_plots)}   # two complete methods: no CD diagram
    for png in new_plots:
        assert_png(summary.parent / png) and f"]({png})" in text
    # the hand-made heatmap, rows real [.7, .1, .2] and sketch [.1, .8, .1]: p(e) = [.4, .45, .15],
    # I = .5 (.7 ln 1.75 + .1 ln .2222 + .2 ln 1.3333) + .5 (.1 ln .25 + .8 ln 1.7778 + .1 ln .6667)
    #   = .5 (0.298859 + 0.281116) = 0.289988 nats in every block
    assert "| smear | 0.290 | layer1.0 (0.290) |" in text[text.index("### Routing diagnostics"):]
    # the statistics over seeds: one seed each here, so no interval and no test, and the report says so
    assert "### Statistics over seeds (reference `smear`)" in text
    assert "1 seed" in text and "\\toprule" in (summary.parent / "table.tex").read_text()
    csv_rows = (summary.parent / "table.csv").read_text().splitlines()
    assert csv_rows[0].startswith("method") and {r.split(",")[0] for r in csv_rows[1:]} >= {"smear", "tag"}


def test_the_parent_runs_summary_is_the_report(tmp_path):
    """publish_report logs summary.md as the parent run's own summary.md (and under any other name asked for, as
    an extension does); its header carries what the launcher recorded on the parent run."""
    from service.report import publish_report

    db = tmp_path / "mlflow.db"
    pid = _fake_sweep(db, heatmap=False)
    client = MlflowClient(f"sqlite:///{db}")
    client.set_tag(pid, "mlflow.note.content", "two methods,\n one seed")
    client.set_tag(pid, "sweep_error", "ValueError: boom")
    for key, value in (("sweep/wall_s", 61.4), ("sweep/tracking_s", 1.26)):
        client.log_metric(pid, key, value)
    report = publish_report(f"sqlite:///{db}", "fake", tmp_path / "results", summary_names=("summary.md", "s-x.md"))
    assert report.path.read_text() == report.text and {t.method for t in report.trials} == {"smear", "tag", "adapter"}
    for name in ("summary.md", "s-x.md"):
        assert Path(client.download_artifacts(pid, name, str(tmp_path))).read_text() == report.text
    assert "- description: two methods, one seed\n" in report.text
    assert "- wall time of the sweep: 61 s (the tracker's time in MLflow calls: 1.3 s)\n" in report.text
    assert "- tag `sweep_error`: ValueError: boom\n" in report.text
    assert report.files == [f for s in report.sections for f in s.files] and report.path not in report.files


def test_end_of_sweep_prints_the_reports_trials_or_how_to_retry(tmp_path, capsys):
    """What launch.py calls at the end of a sweep: the report, its trials' table on the console, the line saying
    where the report is; a store that cannot be read is no failure, only a line with the command to retry."""
    from service.report import end_of_sweep

    db = tmp_path / "mlflow.db"
    pid = _fake_sweep(db, heatmap=False)
    ok, line = end_of_sweep(f"sqlite:///{db}", "fake", tmp_path / "results", "smear-sweep/space",
                            extension="fake-extend-1")
    assert ok and line == f"\nReport: {tmp_path / 'results' / 'fake' / 'report' / 'summary.md'}"
    out = capsys.readouterr().out
    assert "| method | seed | val accuracy (best) | test accuracy | status |\n" in out and "| adapter | 0 | - | - | ERROR |" in out
    assert "| tag | 1 | 0.7000 +- 0.0000 | 0.7000 +- 0.0000 |" in out
    root = {a.path for a in MlflowClient(f"sqlite:///{db}").list_artifacts(pid)}
    assert {"summary.md", "summary-fake-extend-1.md", "report"} <= root
    missing = f"sqlite:///{tmp_path}/missing.db"
    ok, line = end_of_sweep(missing, "fake", tmp_path / "r2", "smear-sweep/space")
    assert not ok and line.startswith("\nReport not written (ReportError: no MLflow store at ") and line.endswith(
        f"retry with: python -m service.report fake --tracking-uri {missing} --storage {tmp_path / 'r2'}")
    assert capsys.readouterr().out == "" and not (tmp_path / "r2").exists()


def test_report_statistics_over_seeds_mark_a_real_difference(tmp_path):
    db = tmp_path / "mlflow.db"
    # tag beats smear by 0.03, 0.04, 0.05 on seeds 0-2 (paired t: p = 0.0202, worked in tests/test_stats.py);
    # adapter differs by +0.01, -0.01, +0.03 (p = 0.4778): Holm over the two p-values -> 0.0404 and 0.4778
    methods = [("smear", 0, 0.50), ("smear", 1, 0.52), ("smear", 2, 0.54),
               ("tag", 0, 0.53), ("tag", 1, 0.56), ("tag", 2, 0.59),
               ("adapter", 0, 0.51), ("adapter", 1, 0.51), ("adapter", 2, 0.57)]
    _fake_sweep(db, "stats", methods=methods, heatmap=False)
    text = write_report(f"sqlite:///{db}", "stats", tmp_path / "results").read_text()
    section = text[text.index("### Statistics over seeds"):text.index("### Trials")]
    rows = {r[0]: r for r in _table_rows(section)[2:]}
    assert "*" in " ".join(rows["tag"]) and "*" not in " ".join(rows["adapter"])
    assert rows["tag"][-1] == "0.040" and rows["adapter"][-1] == "0.478"                 # Holm-adjusted p
    report = write_report(f"sqlite:///{db}", "stats", tmp_path / "r2", reference="tag").read_text()
    assert "### Statistics over seeds (reference `tag`)" in report


def test_report_sensitivity_to_a_varied_hyper_parameter(tmp_path):
    db = tmp_path / "mlflow.db"
    lrs = {0: "0.001", 1: "0.01"}
    methods = [("smear", seed, 0.5 + 0.1 * (seed % 2) + 0.01 * (seed // 2)) for seed in range(6)]
    pid = _fake_sweep(db, "sens", methods=methods, heatmap=False)
    client = MlflowClient(f"sqlite:///{db}")
    for run in client.search_runs([client.get_run(pid).info.experiment_id], f"tags.mlflow.parentRunId = '{pid}'"):
        seed = int(run.data.tags["seed"])
        client.log_param(run.info.run_id, "lr", lrs[seed % 2])           # three seeds per learning rate
    text = write_report(f"sqlite:///{db}", "sens", tmp_path / "results").read_text()
    # lr 0.01: seeds 1, 3, 5 -> 0.60, 0.61, 0.62: mean 0.61, sd 0.01, half-width 4.302653 * 0.01 / sqrt(3) = 0.0248
    assert "Best: `lr=0.01`, mean 0.6100 over 3 seeds, 95% CI [0.5852, 0.6348]" in text
    assert_png(tmp_path / "results" / "sens" / "report" / "sensitivity_lr.png")


def test_write_report_without_smear_trial_or_heatmap_says_why(tmp_path):
    db = tmp_path / "mlflow.db"
    _fake_sweep(db, "no-smear", methods=(("tag", 0, 0.7), ("tag", 1, 0.6)))
    _fake_sweep(db, "no-heat", heatmap=False)
    text = write_report(f"sqlite:///{db}", "no-smear", tmp_path).read_text()
    assert "No specialisation heatmaps: no smear trial" in text
    assert not (tmp_path / "no-smear" / "report" / "heatmaps_best_smear.png").exists()
    text = write_report(f"sqlite:///{db}", "no-heat", tmp_path, experiment="smear-sweep/space").read_text()
    assert "No specialisation heatmaps: routing/heatmaps.json of smear-s0-x_00000 could not be read" in text


def test_cli_sweep_not_found_exits_2_with_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    _fake_sweep(db, "first")
    _fake_sweep(db, "second")
    proc = run_report("nope", "--tracking-uri", f"sqlite:///{db}", "--storage", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'nope' not found" in lines[0] and "first" in lines[0] and "second" in lines[0]
    assert not (tmp_path / "nope").exists()
    # a store that does not exist (MLflow would silently create an empty one): exit 2, nothing created
    proc = run_report("first", "--tracking-uri", f"sqlite:///{tmp_path}/missing.db")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no MLflow store" in proc.stderr and not (tmp_path / "missing.db").exists()
    proc = run_report("first", "--tracking-uri", "bogus://nowhere")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- a real sweep through launch.py, then the report --------------------------------------------------

@pytest.mark.slow
def test_report_of_a_real_sweep(tmp_path, env_with_venv):
    from tests.helpers import TINY, run_launch

    proc = run_launch(tmp_path, env_with_venv, TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = run_report("t", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "results"),
                      env=env_with_venv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = tmp_path / "results" / "t" / "report"
    text = (report / "summary.md").read_text()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("smear-sweep/space")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3

    rows = _table_rows(text)
    assert rows[0] == ["method", "seeds", "real", "sketch", "accuracy (overall)"]
    table = rows[2:5]
    # one row per method, best first, each cell = the trial's test metric x100 (one seed: std 0)
    expect = sorted(children, key=lambda r: (-r.data.metrics["test/accuracy"], r.data.tags["method"]))
    assert [r[0] for r in table] == [r.data.tags["method"] for r in expect]
    for row, run in zip(table, expect):
        m = run.data.metrics
        assert row[1] == "1/1"
        cells = [c.replace("**", "") for c in row[2:]]
        assert cells == [f"{100 * m[k]:.2f} (n=1: no CI)"
                         for k in ("test/real/accuracy", "test/sketch/accuracy", "test/accuracy")], (row, m)
    for run in children:
        assert run.info.run_name in text  # the per-trial table

    for png in PLOTS:
        assert_png(report / png)
    smear = next(r for r in children if r.data.tags["method"] == "smear")
    assert f"best smear trial, `{smear.info.run_name}`" in text
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    every = ("summary.md", "table.tex", "table.csv", "aggregate.tex", "aggregate.csv", "learning_curves.png", "specialisation.png", *PLOTS,
             "heatmaps_smear.png", "heatmaps_tag.png",                 # every routed method's heatmaps
             "score_vs_flops.png", "score_vs_hours.png")               # cost = measured FLOPs and device-hours
    # 3 methods over 2 domains: a Friedman test and its CD diagram, unless the tiny runs tie on every domain
    cd = ("cd_diagram.png",) if "](cd_diagram.png)" in text else ()
    assert cd or "every task ties all methods" in text.replace("domain", "task")
    assert logged == {f"report/{f}" for f in (*every, *cd)}, logged
    for png in ("learning_curves.png", "specialisation.png", "heatmaps_smear.png", "heatmaps_tag.png"):
        assert_png(report / png)
    assert "### Statistics over seeds (reference `smear`)" in text and "### Learning curves" in text
    assert "### Compute" in text and "routing GFLOPs / example" in text


def test_cli_bootstrap_interval_and_reference(tmp_path, capsys):
    """The report's --ci bootstrap --n-boot N --reference METHOD; an unknown reference or N < 1: exit 2, one line."""
    from service.report import main
    from service.report.stats import bootstrap_interval

    db = tmp_path / "mlflow.db"
    _fake_sweep(db, "boot", methods=[("smear", 0, 0.50), ("smear", 1, 0.52), ("smear", 2, 0.54),
                                     ("tag", 0, 0.53), ("tag", 1, 0.56), ("tag", 2, 0.59)], heatmap=False)
    common = ["--tracking-uri", f"sqlite:///{db}", "--storage", str(tmp_path / "r")]
    assert main(["boot", *common, "--ci", "bootstrap", "--n-boot", "500", "--reference", "tag"]) == 0
    text = (tmp_path / "r" / "boot" / "report" / "summary.md").read_text()
    assert "[95% percentile-bootstrap interval, 500 resamples]" in text and "reference `tag`" in text
    lo, hi = bootstrap_interval([0.50, 0.52, 0.54], n_boot=500)                 # smear, resampled with seed 0
    rows = {r[0]: r for r in _table_rows(text)[2:]}
    assert rows["smear"][-1] == f"52.00 [{lo * 100:.2f}, {hi * 100:.2f}] (n=3)*"  # vs tag: p .0202 (one test)
    assert rows["tag"][-1].startswith("**56.00 [") and not rows["tag"][-1].endswith("*")
    csv = (tmp_path / "r" / "boot" / "report" / "table.csv").read_text().splitlines()
    smear = next(r for r in csv if r.startswith("smear,")).split(",")
    assert [float(v) for v in smear[4:6]] == pytest.approx([lo, hi])
    capsys.readouterr()
    for bad, expected in ((["--reference", "smaer"], "--reference='smaer' is not a method of sweep 'boot'; "
                                                    "valid: smear, tag"),
                          (["--n-boot", "0"], "--n-boot=0 must be >= 1"),
                          (["--ci", "normal"], "argument --ci: invalid choice: 'normal'")):
        try:
            rc = main(["boot", *common, *bad])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and expected in err, err
