"""Bad input exits 2 with one line naming the bad value, before anything starts, writing nothing."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

GOOD = """
description: x
base: {steps: 2, eval_every: 1, data.resolution: 16}
grid: {routing.method: [smear], seed: [0]}
"""

CASES = [
    # (declaration text or None, extra CLI args, expected fragment of the one-line message)
    (None, ["--sweep", "no-such-sweep"], "unknown sweep 'no-such-sweep'; valid: default"),
    (GOOD.replace("[smear]", "[smear, moe]"), [], "routing.method='moe' is not valid; valid: adamix, adapter"),
    (GOOD, ["--data-root", "/definitely/not/here"], "data root '/definitely/not/here' does not exist"),
    (GOOD.replace("steps: 2", "steps: -1"), [], "steps=-1 is out of range; must be >= 1"),
    (GOOD.replace("steps: 2", "stepz: 2"), [], "unknown key 'stepz'; valid keys:"),
    (GOOD + "schedule: asha\n", [], "unknown key 'schedule'; valid keys: description"),
    (GOOD.replace("seed: [0]", "seed: 0"), [], "grid.seed must be a non-empty list"),
    (GOOD + "resources: {tpu: 1}\n", [], "unknown resource 'tpu'; valid: cpu, gpu"),
    (GOOD.replace("data.resolution: 16", "data.domains: [photos]"), [], "unknown domain 'photos'; valid: clipart"),
    (GOOD.replace("data.resolution: 16", "data.augment: heavy"), [], "data.augment='heavy' is not valid; valid: paper, none"),
    (GOOD.replace("data.resolution: 16", "pretrained: yes"), [], "pretrained=True has the wrong type"),
    (GOOD + "resources: {cpu: 1, gpu: 0.5}\n".replace("}", "}") and GOOD.replace("steps: 2", "num_workers: 2, steps: 2") + "resources: {cpu: 1, gpu: 0.5}\n",
     [], "resources.gpu=0.5 is fractional with num_workers=2"),
    ("grid: [1, 2]\n", [], "'grid' must be a mapping"),
    ("base: {steps: 1\n", [], "not valid YAML"),
    (GOOD, ["--frobnicate"], "unrecognized arguments: --frobnicate"),
]


@pytest.mark.parametrize("decl,args,expected", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path, env_with_venv, decl, args, expected):
    cmd = [sys.executable, str(REPO / "service" / "launch.py"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
           "--storage", str(tmp_path / "results")]
    if decl is not None:
        (tmp_path / "space.yaml").write_text(textwrap.dedent(decl))
        cmd += ["--sweep", str(tmp_path / "space.yaml")]
    proc = subprocess.run(cmd + args, cwd=tmp_path, env=env_with_venv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in lines[0], lines[0]
    # nothing written: no MLflow store, no results
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "results").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_dry_run_prints_trials_and_writes_nothing(tmp_path, env_with_venv):
    proc = subprocess.run([sys.executable, str(REPO / "service" / "launch.py"), "--dry-run"], cwd=tmp_path,
                          env=env_with_venv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sweep 'default': 6 trials" in proc.stdout
    assert proc.stdout.count("routing.method=") == 6
    assert list(tmp_path.iterdir()) == []
