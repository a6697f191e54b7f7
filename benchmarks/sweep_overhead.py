"""Per-trial start-up overhead of a sweep and the cost of its MLflow logging.

    python -m benchmarks.sweep_overhead [--trials N] [--steps S] [--json PATH]

Runs the same N tiny ResNet trials (digits stand-in, 16 px, 1 thread) three ways, one trial at a time:
  plain   -- the train loop called N times in one process (no Ray, no MLflow): the work itself
  tune    -- launch.py: each trial a Ray Tune function trainable, logged to MLflow (sqlite)
  train   -- launch.py with num_workers=2: each trial fits a Ray Train TorchTrainer (2 CPU workers)
Per-trial overhead = (sweep wall - plain wall) / N, where sweep wall is the Tuner.fit() time the driver
logs (sweep/wall_s; it excludes starting Ray once). A trial's own time is Tune's time_total_s (the wall
time of the trial function, which includes waiting for the driver to take each report), against the
plain loop's time per trial. Logging cost = the tracker's time inside MLflow calls (sweep/tracking_s) as
a fraction of the sweep's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BASE = {"steps": 20, "eval_every": 10, "batch_size": 16, "torch_threads": 1, "data.resolution": 16,
        "data.augment": "none", "data.domains": ["real", "sketch"], "routing.method": "smear"}


def declaration(trials: int, steps: int, workers: int) -> str:
    import yaml

    base = {**BASE, "steps": steps, "eval_every": max(1, steps // 2), "num_workers": workers}
    return yaml.safe_dump({"description": "overhead benchmark", "base": base, "grid": {"seed": list(range(trials))},
                           "resources": {"cpu": 1 if workers == 1 else 0.5}, "max_concurrent_trials": 1})


def plain(trials: int, steps: int) -> float:
    from smear.configs import unflatten
    from trainables.loop import LocalSession, train_loop

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for seed in range(trials):
            train_loop(unflatten({**BASE, "steps": steps, "eval_every": max(1, steps // 2), "seed": seed}),
                       LocalSession(f"{d}/{seed}"))
    return time.perf_counter() - t0


def sweep(trials: int, steps: int, workers: int) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as d:
        Path(d, "space.yaml").write_text(declaration(trials, steps, workers))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "service" / "launch.py"), "--sweep", f"{d}/space.yaml",
                               "--tracking-uri", f"sqlite:///{d}/m.db", "--storage", f"{d}/r", "--name", "b"],
                              cwd=d, capture_output=True, text=True)
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        trial_s = [json.loads(f.read_text().splitlines()[-1])["time_total_s"]  # each trial's own wall time
                   for f in Path(d, "r", "b").glob("*/result.json")]
        client = MlflowClient(f"sqlite:///{d}/m.db")
        parent = [r for r in client.search_runs([client.get_experiment_by_name("smear-sweep/space").experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags][0]
        return {"fit_s": parent.data.metrics["sweep/wall_s"], "tracking_s": parent.data.metrics["sweep/tracking_s"],
                "process_s": total, "trial_s": sum(trial_s) / len(trial_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-train", action="store_true", help="skip the TorchTrainer variant")
    a = ap.parse_args()
    from smear.data import offline_digits_domainnet

    offline_digits_domainnet()
    out: dict = {"machine": f"{platform.node()} {os.cpu_count()} cpus", "trials": a.trials, "steps": a.steps}
    out["plain_s"] = plain(a.trials, a.steps)
    out["plain_trial_s"] = out["plain_s"] / a.trials
    for name, workers in (("tune", 1), ("train", 2)):
        if name == "train" and a.skip_train:
            continue
        r = sweep(a.trials, a.steps, workers)
        r["per_trial_overhead_s"] = (r["fit_s"] - out["plain_s"]) / a.trials
        r["ratio_to_plain"] = r["fit_s"] / out["plain_s"]
        r["tracking_fraction"] = r["tracking_s"] / r["fit_s"]
        out[name] = r
    print(json.dumps(out, indent=2))
    print("\n| run | wall (s) | ratio to plain | per-trial overhead (s) | trial's own time (s) | MLflow time / wall |")
    print("|---|---|---|---|---|---|")
    print(f"| plain loop | {out['plain_s']:.1f} | 1.00 | - | {out['plain_trial_s']:.2f} | - |")
    for name in ("tune", "train"):
        if name in out:
            r = out[name]
            print(f"| {name} | {r['fit_s']:.1f} | {r['ratio_to_plain']:.2f} | {r['per_trial_overhead_s']:.1f} | "
                  f"{r['trial_s']:.2f} | {r['tracking_fraction']:.1%} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
