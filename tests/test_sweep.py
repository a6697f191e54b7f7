"""Real sweeps through launch.py -> Ray Tune -> (Ray Train) -> train loop -> MLflow, on a local Ray."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO, TINY, child_runs, run_launch

pytestmark = pytest.mark.slow

DDP = """
description: two data-parallel trials through Ray Train, 2 CPU workers each, one after the other
base: {steps: 4, eval_every: 2, batch_size: 16, num_workers: 2, torch_threads: 1, data.resolution: 16,
       data.augment: none, data.domains: [real, sketch]}
grid: {routing.method: [smear], seed: [3, 4]}
resources: {cpu: 0.5}
max_concurrent_trials: 1
"""


def assert_trial_runs(tmp_path, methods: list[str], domains=("real", "sketch")):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent, children = child_runs(f"{tmp_path}/mlflow.db")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "t"
    assert sorted(r.data.tags["method"] for r in children) == sorted(methods)
    assert len({r.data.tags["trial_id"] for r in children}) == len(children)
    for r in children:
        assert r.info.status == "FINISHED", r.info
        for tag in ("sweep", "trial_id", "method", "seed", "setting", "git_commit"):
            assert r.data.tags.get(tag), tag
        m = r.data.metrics
        for key in ["train/loss", "val/accuracy", "test/accuracy",
                    *[f"val/{d}/accuracy" for d in domains], *[f"test/{d}/accuracy" for d in domains]]:
            assert key in m, (key, sorted(m))
        assert 0.0 <= m["test/accuracy"] <= 1.0
        assert r.data.params["routing.method"] == r.data.tags["method"]
        assert r.info.run_name.startswith(f"{r.data.tags['method']}-s{r.data.tags['seed']}-")
        # one value per evaluation step (2 and 4)
        assert [h.step for h in client.get_metric_history(r.info.run_id, "val/accuracy")] == [2, 4]
    return parent, children


def test_sweep_single_worker_trials(tmp_path, env_with_venv):
    proc = run_launch(tmp_path, env_with_venv, TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, children = assert_trial_runs(tmp_path, ["smear", "tag", "adapter"])
    out = proc.stdout
    assert "| method | seed | val accuracy (best) | test accuracy | status |" in out
    assert "mean +- std" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    # a progress line as each trial ends, the last with every method's mean over its one trial
    progress = [line for line in out.splitlines() if line.startswith("progress: ")]
    assert [p.split(" done")[0] for p in progress] == ["progress: 1/3", "progress: 2/3", "progress: 3/3"], progress
    best = {r.data.tags["method"]: r.data.metrics["val/best_accuracy"] for r in children}
    assert all(f"{m} {v:.3f} (1)" in progress[-1] for m, v in best.items()), (progress[-1], best)
    assert progress[-1].startswith("progress: 3/3 done (0 failed), 0 running | ") and "device-hours " in progress[-1]
    # the quiet console (stdout is a pipe here: plain lines): none of Ray Tune's trial tables or result tables,
    # so no routing heatmap (a nested list in each trial's final result) and no nested list at all
    both = out + proc.stderr
    assert "Trial status" not in both and "routing_heatmap" not in both and "[[" not in both, both[-3000:]


def test_verbose_brings_back_tunes_tables(tmp_path, env_with_venv):
    one = TINY.replace("[smear, tag, adapter]", "[smear]")
    proc = run_launch(tmp_path, env_with_venv, one, "--verbose")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Trial status" in proc.stdout and "routing_heatmap" in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("progress: ")][-1].startswith(
        "progress: 1/1 done (0 failed), 0 running | smear ")


def test_sweep_with_asha_early_stopping_closes_every_run(tmp_path, env_with_venv):
    """ASHA may stop a trial at a rung; the trial still ends FINISHED in MLflow with its metrics so far."""
    decl = TINY.replace("steps: 4, eval_every: 2", "steps: 6, eval_every: 1") + (
        "scheduler: asha\nasha: {grace_period: 1, reduction_factor: 2}\n")
    proc = run_launch(tmp_path, env_with_venv, decl.replace("max_concurrent_trials: 2", "max_concurrent_trials: 1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parent, children = child_runs(f"{tmp_path}/mlflow.db")
    assert parent.info.status == "FINISHED" and len(children) == 3
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for r in children:
        assert r.info.status == "FINISHED" and "val/accuracy" in r.data.metrics
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/accuracy")]
        # a trial ASHA let finish has its test score; one it stopped at a rung has fewer evaluations
        assert ("test/accuracy" in r.data.metrics) == (max(steps) == 6), (r.info.run_name, steps)


def test_sweep_data_parallel_trials_through_ray_train(tmp_path, env_with_venv):
    """Sequential TorchTrainer trials, with a stale ray_current_cluster where Ray looks for "the" cluster.

    Every `ray start` writes that file and `ray stop` leaves it. Before launch.py pinned the state API to
    its own instance, Ray Train's PlacementGroupCleaner then stalled each trial by 12 s and the second
    trial's workers never started (BENCHMARKS.md, "Ray Train start-up").
    """
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # nothing listens there
        proc = run_launch(tmp_path, {**env_with_venv, "RAY_TMPDIR": str(ray_tmp)}, DDP)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, runs = assert_trial_runs(tmp_path, ["smear", "smear"])
    assert sorted(r.data.tags["seed"] for r in runs) == ["3", "4"]
    assert {r.data.params["num_workers"] for r in runs} == {"2"}
    # the trial really ran through a TorchTrainer: Ray Train wrote its run under the sweep's storage
    assert len(list((tmp_path / "results" / "t" / "_train").glob("train-*"))) == 2


def test_t5_glue_smoke_sweep_reports_every_task(tmp_path, env_with_venv):
    """`launch.py --sweep t5-glue-smoke --smoke`: every routing method, all eight tasks' metrics in MLflow."""
    from smear.data.glue import TASKS
    from smear.metrics import TASK_METRICS
    from smear.routing import available_methods

    cmd = [sys.executable, str(REPO / "service" / "launch.py"), "--sweep", "t5-glue-smoke", "--smoke",
           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "results"), "--name", "t5"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_with_venv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parent, children = child_runs(f"{tmp_path}/mlflow.db", experiment="smear-sweep/t5-glue-smoke")
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["method"] for r in children) == available_methods()
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["setting"] == "t5_glue"
        for prefix in ("val", "test"):
            for task in TASKS:
                for m in TASK_METRICS[task]:
                    assert f"{prefix}/{task}/{m}" in r.data.metrics, (r.info.run_name, prefix, task, m)
            assert f"{prefix}/average" in r.data.metrics
    assert "| method | seed | val average (best) | test average | status |" in proc.stdout
