"""Start-up cost of one sweep trial: a Tune function trainable against one that fits a Ray Train TorchTrainer.

    python -m benchmarks.trial_startup [--trials N] [--json PATH]

Every variant runs in a fresh process with its own local Ray. Each runs N trials one at a time through
the product's trial function (trainables.ray_trainable.trial). The config is a 1-step tiny ResNet, so the
time measured is start-up and tear-down, not training:
  function      num_workers=1: the train loop runs inside the Tune trial's own process (launch.py's settings)
  train-before  num_workers=2 with Ray's defaults, as session 1 shipped it:
                a new trial process per trial, the Train controller polling every 2 s
  train         num_workers=2 as launch.py runs it now: trial processes reused (reuse_actors),
                0.25 s controller polls, and the state API pinned to this instance (service.runner.start_local_ray)
Reported per variant: wall time per trial (Tuner.fit wall / N). For Ray Train variants, also where the
time goes, from Ray Train's controller logs: controller start, worker actors, train context, teardown.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONFIG = {"steps": 1, "eval_every": 1, "batch_size": 16, "torch_threads": 1, "data.resolution": 16,
          "data.augment": "none", "data.domains": ["real", "sketch"], "routing.method": "smear"}
VARIANTS = {  # name: (num_workers, launch.py's Ray settings?)
    "function": (1, True),
    "train-before": (2, False),
    "train": (2, True),
}
CONTROLLER_STEPS = {  # Ray Train controller log line -> seconds it reports
    "worker_actors_s": r"worker actors created in ([\d.]+)s",
    "train_context_s": r"Train context initialized on workers in ([\d.]+)s",
    "worker_group_start_s": r"Worker group startup completed in ([\d.]+)s total",
}


def run_variant(name: str, trials: int) -> dict:
    """Child process: a fresh local Ray, ``trials`` trials of one variant, one at a time."""
    import ray
    from ray import tune

    from service.runner import start_local_ray
    from smear.configs import unflatten
    from trainables.identity import TRIAL_KEY, SweepTrials
    from trainables.ray_trainable import trial

    workers, product_settings = VARIANTS[name]
    if product_settings:
        start_local_ray(num_cpus=2)
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "2.0"  # Ray's default, which the trial would lower
        ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    configs = [unflatten({**CONFIG, "num_workers": workers, "seed": s}) for s in range(trials)]
    cpus = 1 if workers == 1 else 0.5
    trials = SweepTrials(configs, {"resnet_domainnet": {"cpu": cpus, "gpu": 0.0}})
    trainable = tune.with_resources(tune.with_parameters(trial, trials=trials),
                                    trials.resources_of({TRIAL_KEY: 0}).placement_group())
    storage = Path(os.environ["BENCH_TMP"]) / name
    tuner = tune.Tuner(trainable, param_space={TRIAL_KEY: tune.grid_search(list(range(trials)))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=product_settings),
                       run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))
    t0 = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - t0
    assert results.num_errors == 0, [r.error for r in results if r.error]
    out = {"variant": name, "trials": trials, "fit_s": wall, "per_trial_s": wall / trials}
    out.update(controller_breakdown(ray._private.worker._global_node.get_session_dir_path()))
    ray.shutdown()
    return out


def controller_breakdown(session_dir: str) -> dict:
    """Mean seconds per Ray Train run, from the JSON lines of its controller's system log."""
    runs = []
    for path in sorted(glob.glob(f"{session_dir}/logs/train/ray-train-sys-controller-*.log")):
        lines = [json.loads(line) for line in open(path) if line.strip()]
        if not lines:
            continue
        stamp = {i: datetime.strptime(d["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp() for i, d in enumerate(lines)}
        run = {k: float(m.group(1)) for d in lines for k, rx in CONTROLLER_STEPS.items()
               if (m := re.search(rx, d["message"]))}
        launched = next((stamp[i] for i, d in enumerate(lines) if "Started training worker group" in d["message"]), None)
        down = next((stamp[i] for i, d in enumerate(lines) if "Worker group shutdown successful" in d["message"]), None)
        if launched and down:
            run["train_fn_to_shutdown_s"] = down - launched  # 1 step of training + noticing that it ended
        run["controller_log_span_s"] = stamp[len(lines) - 1] - stamp[0]
        runs.append(run)
    if not runs:
        return {}
    keys = sorted({k for r in runs for k in r})
    return {"controller_runs": len(runs), **{k: sum(r.get(k, 0.0) for r in runs) / len(runs) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args()
    if a.variant:
        print("RESULT " + json.dumps(run_variant(a.variant, a.trials)), flush=True)
        return
    import tempfile

    from smear.data import offline_digits_domainnet

    offline_digits_domainnet()
    out = {"machine": f"{platform.node()} {os.cpu_count()} cpus", "variants": []}
    for name in VARIANTS:
        with tempfile.TemporaryDirectory() as d:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.trial_startup", "--variant", name,
                                   "--trials", str(a.trials)],
                                  cwd=REPO, env={**os.environ, "BENCH_TMP": d}, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out["variants"].append(json.loads(line.removeprefix("RESULT ")))
    print(json.dumps(out, indent=2))
    base = out["variants"][0]["per_trial_s"]
    print("\n| variant | wall per trial (s) | vs function | worker group start (s) | worker actors (s) "
          "| train context (s) | train fn start -> shutdown (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in out["variants"]:
        cells = [f"{v[k]:.2f}" if k in v else "-" for k in
                 ("worker_group_start_s", "worker_actors_s", "train_context_s", "train_fn_to_shutdown_s")]
        print(f"| {v['variant']} | {v['per_trial_s']:.2f} | {v['per_trial_s'] / base:.2f} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
