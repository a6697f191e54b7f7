"""Every shipped search space resolves (``--dry-run``), states what the issue asks of it, and its smoke variant runs."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from service.launch import main
from service.spaces import available_sweeps, load_sweep
from smear.routing import available_methods
from tests.helpers import REPO
from tests.helpers import child_runs

SWEEPS = available_sweeps()


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("name", SWEEPS)
def test_every_space_resolves_in_a_dry_run(name, smoke, tmp_path, offline_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--sweep", name, "--dry-run", *(["--smoke"] if smoke else [])]) == 0
    out = capsys.readouterr().out
    sweep = load_sweep(name, smoke=smoke)
    if sweep.search == "optuna":
        assert f"optuna (TPE), {sweep.num_trials} trials" in out
    else:
        assert f"sweep {name!r}: {len(sweep.trials)} trials" in out
        assert out.count("\n  [") == len(sweep.trials)
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def _seeds(sweep) -> set[int]:
    return {t.config["seed"] for t in sweep.trials}


@pytest.mark.parametrize("name,setting", [("resnet-domainnet", "resnet_domainnet"), ("t5-glue", "t5_glue")])
def test_paper_grids_are_every_method_times_three_seeds_at_reference_settings(name, setting):
    sweep = load_sweep(name)
    assert {t.config["setting"] for t in sweep.trials} == {setting}
    for method in available_methods():
        seeds = {t.config["seed"] for t in sweep.trials if t.config["routing"]["method"] == method}
        assert len(seeds) >= 3, (method, seeds)
    assert all(set(t.overrides) == {"routing.method", "seed"} for t in sweep.trials)  # nothing else moved


def _values(sweep, key: str) -> set:
    return {t.overrides[key] for t in sweep.trials}


def test_gumbel_anneal_varies_temperature_rate_schedule_and_interval_over_seeds():
    sweep = load_sweep("gumbel-anneal")
    assert {t.config["routing"]["method"] for t in sweep.trials} == {"st_gumbel"}
    assert len(_values(sweep, "routing.gumbel_tau0")) >= 3
    assert len(_values(sweep, "routing.gumbel_anneal_rate")) >= 3
    assert _values(sweep, "routing.gumbel_schedule") == {"compounding", "exponential"}
    assert "routing.gumbel_update_every" in sweep.trials[0].overrides
    assert len(_seeds(sweep)) >= 3


def test_dselect_entropy_weight_spans_a_log_range_over_seeds():
    sweep = load_sweep("dselect-entropy")
    weights = sorted(_values(sweep, "routing.dselect_entropy_weight"))
    assert {t.config["routing"]["method"] for t in sweep.trials} == {"dselect_k"}
    assert len(weights) >= 3 and math.log10(weights[-1] / weights[0]) >= 2  # at least two decades
    assert len(_seeds(sweep)) >= 3


def test_reinforce_weights_varies_alpha_beta_gamma():
    sweep = load_sweep("reinforce-weights")
    assert {t.config["routing"]["method"] for t in sweep.trials} == {"reinforce"}
    for key in ("routing.reinforce_w_pg", "routing.reinforce_w_ent", "routing.reinforce_w_value"):
        assert len(_values(sweep, key)) == len(sweep.trials) // len(_seeds(sweep)), key  # a new draw per sample
    assert len(_seeds(sweep)) >= 3


def test_gumbel_optuna_searches_temperature_and_rate_on_log_scales_over_seeds():
    sweep = load_sweep("gumbel-optuna")
    assert sweep.search == "optuna"
    assert sweep.space["routing.gumbel_tau0"].kind == "loguniform"
    assert sweep.space["routing.gumbel_anneal_rate"].kind == "loguniform"
    assert "seed" not in sweep.space and len(sweep.seeds) >= 3  # every point runs on every seed
    assert sweep.num_trials == sweep.num_samples * len(sweep.seeds)


# The research sweeps' smoke variants, run as a laptop user would: their declared resources are GPU
# trials (cpu 4, gpu 0.25), so the flags give each trial one CPU; random / Optuna sweeps get 2 samples.
SMOKE_RUNS = ["dselect-entropy", "gumbel-anneal", "gumbel-optuna", "reinforce-weights", "resnet-domainnet"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOKE_RUNS)
def test_smoke_variant_runs_end_to_end(name, tmp_path, env_with_venv):
    sweep = load_sweep(name, smoke=True)
    samples = ["--num-samples", "2"] if sweep.search != "grid" else []
    cmd = [sys.executable, str(REPO / "service" / "launch.py"), "--sweep", name, "--smoke", "--name", "s",
           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "results"),
           "--cpus-per-trial", "1", "--gpus-per-trial", "0", *samples]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_with_venv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = load_sweep(name, smoke=True, num_samples=2 if samples else None).num_trials
    parent, children = child_runs(f"{tmp_path}/mlflow.db", experiment=f"smear-sweep/{name}")
    assert parent.info.status == "FINISHED"
    assert len(children) == expected and all(r.info.status == "FINISHED" for r in children), \
        [(r.info.run_name, r.info.status) for r in children]
    assert (tmp_path / "results" / "s" / "report" / "summary.md").is_file()
    if sweep.seeds:  # Optuna with grid.seed: each suggested point ran once on every seed
        points: dict[tuple, list[int]] = {}
        for r in children:
            point = tuple(r.data.params[k] for k in sorted(sweep.space))
            points.setdefault(point, []).append(int(r.data.params["seed"]))
        assert len(points) == 2 and all(sorted(v) == sorted(sweep.seeds) for v in points.values()), points


def _tune_order(sweep, tmp_path) -> list[dict]:
    """The trial configs in the order Ray Tune creates (and, FIFO, starts) them for the sweep's param space."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import BasicVariantGenerator

    from service.spaces import param_space

    gen = BasicVariantGenerator()
    gen.add_configurations([Experiment("order", run=lambda config: None, config=param_space(sweep),
                                       storage_path=str(tmp_path))])
    out = []
    while (t := gen.next_trial()) is not None:
        out.append(sweep.identity().config(t.config))
    return out


def test_grid_runs_seed_major_so_early_results_cover_every_method(tmp_path, offline_data, monkeypatch, capsys):
    """The default sweep lists routing.method before seed; Tune still starts every method at seed 0 first."""
    sweep = load_sweep("default")
    order = [(c["seed"], c["routing"]["method"]) for c in _tune_order(sweep, tmp_path)]
    assert order == [(0, "smear"), (0, "tag"), (0, "adapter"), (1, "smear"), (1, "tag"), (1, "adapter")]
    # a grid over a hyper-parameter and seeds: all of it at seed 0, then at seed 1, ...; the samples of a
    # random search likewise
    gumbel = _tune_order(load_sweep("gumbel-anneal"), tmp_path)
    seeds = [c["seed"] for c in gumbel]
    assert seeds == sorted(seeds) and len(gumbel) == 3 * seeds.count(0)
    reinforce = [c["seed"] for c in _tune_order(load_sweep("reinforce-weights"), tmp_path)]
    assert reinforce == [0] * 8 + [1] * 8 + [2] * 8
    # --dry-run lists the trials in that order, each with the declaration's key order
    monkeypatch.chdir(tmp_path)
    assert main(["--sweep", "default", "--dry-run"]) == 0
    listed = [line.split("]", 1)[1].split()[:2] for line in capsys.readouterr().out.splitlines() if "  [" in line]
    assert listed == [[f"routing.method={m}", f"seed={s}"] for s, m in order]
