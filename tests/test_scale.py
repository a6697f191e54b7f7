"""A quick profile of benchmarks/scale.py: 20 simulated trials through bare Tune and through the service, in one
process. Both complete every trial; the service's record has one MLflow run per trial with every evaluation step
once; the figures it measures are finite. No timing ratio is asserted (a shared machine's are noise)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_scale_benchmark_runs_both_modes_and_measures(tmp_path, env_with_venv):
    out = tmp_path / "scale.json"
    env = {**env_with_venv, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env_with_venv.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--trials", "20", "--cpus", "4", "--evals", "2",
                           "--sleep", "0.2", "--dir", str(tmp_path / "run"), "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["trials"] == 20
    for mode in ("bare", "service"):
        assert r[mode]["completed"] == 20 and r[mode]["errors"] == 0, r[mode]
        for k in ("fit_s", "wall_s", "peak_rss_mb", "snapshot_total_s", "report_block_max_p99_s"):
            assert math.isfinite(r[mode][k]) and r[mode][k] >= 0, (mode, k, r[mode][k])
        assert r[mode]["snapshots"] >= 1
    s = r["service"]
    assert s["check"] == {"child_runs": 20, "finished_runs": 20, "runs_with_every_step_once": 20, "expected": 20}
    assert s["record_complete"] and s["report_ok"], s
    assert s["lag_samples"] == 20 * 3 + 1  # two evaluations and the final report per trial; the parent's wall time
    for k in ("lag_p50_s", "lag_p99_s", "report_s", "store_mb", "rows_per_s", "flush_s"):
        assert math.isfinite(s[k]) and s[k] >= 0, (k, s[k])
    assert s["lag_p50_s"] <= s["lag_p99_s"]
    assert s["rows"]["runs"] == 21 and s["rows"]["metrics"] > 0  # the parent run and one per trial
    for k in ("ratio_fit", "ratio_record", "ratio_wall"):
        assert math.isfinite(r[k]) and r[k] > 0
