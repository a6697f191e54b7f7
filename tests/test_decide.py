"""launch.py --until-decided (service/decide.py): rounds of seeds for the undecided comparisons only, decided by
the real service/sequential.py; the boundary's refusals; the report's section from the recorded state; one real
sweep end to end (slow)."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from service.decide import STOP_DECIDED, STOP_LAST_LOOK, LoopState, advance, decisions_from_tags
from service.report.trials import Trial
from tests.helpers import child_runs, launch_args, run_launch


def _trials(rng, seeds, methods, effects, sd=0.004, hours=0.5) -> list[Trial]:
    """One trial per (method, seed): the reference's score per seed shared, each method's effect plus noise."""
    out = []
    for s in seeds:
        base = 0.6 + rng.normal(0, 0.02)
        for m in methods:
            out.append(Trial(m, str(s), run_name=f"{m}-s{s}", test=base + effects[m] + rng.normal(0, sd),
                             compute={"train_hours": hours}))
    return out


def _loop(effects, max_seeds=12, first=3, max_hours=None, seed=0, sd=0.004):
    """The loop's logic without Ray: each round's trials made up for exactly the round's methods and seeds."""
    rng = np.random.default_rng(seed)
    state = LoopState("ref", 0.01, max_seeds)
    trials = _trials(rng, range(first), list(effects), effects, sd)
    rounds = []
    while True:
        nxt, found = advance(state, trials, max_hours)
        if nxt is None:
            return state, found, rounds, trials
        rounds.append(nxt)
        trials += _trials(rng, nxt.seeds, nxt.methods, effects, sd)


def test_rounds_add_seeds_only_to_the_undecided_comparisons_and_the_reference():
    state, found, rounds, trials = _loop({"ref": 0.0, "big": 0.08, "same": 0.0, "small": 0.012})
    assert found["big"].verdict == "better" and found["same"].verdict in ("equivalent", "undecided")
    assert all(r.methods[0] == "ref" for r in rounds)         # the reference at every new seed, paired
    for m, d in found.items():                                 # a decided comparison gets no seed after its look
        assert all(m not in r.methods for r in rounds if d.decided_at and r.look > d.decided_at)
    seeds = [s for r in rounds for s in r.seeds]
    assert seeds == list(range(3, 3 + len(seeds)))            # new seeds, in order, none run twice
    assert state.design[0] == 3 and state.design[-1] <= 12 and state.look == len(rounds) + 1
    assert [r.look for r in rounds] == list(range(2, state.look + 1))
    for m, d in found.items():                                  # each comparison has the seeds of its looks
        assert d.n == state.design[(d.decided_at or state.look) - 1]
        assert sum(t.method == m for t in trials) == d.n
    assert sum(t.method == "ref" for t in trials) == state.design[state.look - 1]
    assert state.stopped == (STOP_DECIDED if all(d.verdict != "undecided" for d in found.values()) else STOP_LAST_LOOK)
    assert set(state.fixed) == {"big", "same", "small"} and all(n >= 2 for n in state.fixed.values())


def test_the_design_is_the_plan_capped_by_max_seeds_and_ends_at_its_last_look():
    state, found, rounds, _ = _loop({"ref": 0.0, "noisy": 0.0}, max_seeds=5, seed=3, sd=0.03)
    assert state.design[-1] <= 5 and state.design[0] == 3
    if any(d.verdict == "undecided" for d in found.values()):
        assert state.stopped == STOP_LAST_LOOK and state.look == len(state.design)


def test_device_hours_cap_stops_before_a_round_that_would_pass_it():
    # 3 seeds x 2 methods x 0.5 h = 3 h spent; the next round's 2 methods x k seeds x 0.5 h would pass 3.5
    state, found, rounds, _ = _loop({"ref": 0.0, "noisy": 0.0}, max_hours=3.5, seed=1, sd=0.03)
    assert rounds == [] and state.stopped.startswith("--max-device-hours 3.5: 3 spent")
    assert state.device_hours == pytest.approx(3.0)


def test_the_state_round_trips_through_the_parent_run_tags_and_the_report_shows_it(tmp_path):
    from dataclasses import asdict

    from service.decide import DECISION_TAG, STATE_TAG
    from service.report import scores
    from service.report.sections import Scope

    state, found, rounds, trials = _loop({"ref": 0.0, "big": 0.08, "same": 0.0})
    tags = {STATE_TAG: state.to_json(),
            **{f"{DECISION_TAG}{m}": json.dumps({**asdict(d), "seeds": d.n}) for m, d in found.items()}}
    assert LoopState.from_tags(tags) == state and decisions_from_tags(tags)["big"]["verdict"] == "better"
    text = "\n".join(scores.sequential_decisions(Scope(None, trials, tmp_path, "", "s", "ref", tags=tags)).markdown)
    assert "### Seeds until decided (reference `ref`)" in text
    assert f"looks at {', '.join(map(str, state.design))} seeds" in text and f"stopped: {state.stopped}" in text
    big = found["big"]
    assert f"| big | better | {big.decided_at} | {big.n} | {state.fixed['big']} |" in text
    assert scores.sequential_decisions(Scope(None, trials, tmp_path, "", "s", "ref")).markdown == []


DECL = """
description: x
base: {steps: 2, eval_every: 1, data.resolution: 16}
grid: {routing.method: [smear, tag, hash], seed: [0, 1, 2]}
"""


def test_a_round_is_the_grid_of_its_methods_at_its_seeds(tmp_path):
    """The one trial builder (service/spaces.py) with the round's method filter: only those methods, the new
    seeds, everything else as the declaration says."""
    from service.spaces import load_sweep

    (tmp_path / "space.yaml").write_text(textwrap.dedent(DECL))
    sweep = load_sweep(str(tmp_path / "space.yaml"), seeds=[3, 4], methods=["smear", "hash"])
    assert [(t.overrides["routing.method"], t.overrides["seed"]) for t in sweep.trials] == [
        ("smear", 3), ("hash", 3), ("smear", 4), ("hash", 4)]
    assert [t.index for t in sweep.trials] == [0, 1, 2, 3] and all(t.config["steps"] == 2 for t in sweep.trials)


def _refused(tmp_path, capsys, decl: str, *args: str, name: str | None = "t") -> str:
    from service.launch import main

    capsys.readouterr()
    try:
        rc = main(launch_args(tmp_path, decl, *args, name=name))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("launch.py: error: ") and "valid" in err, err
    assert "internal error" not in err and {p.name for p in tmp_path.iterdir()} == {"space.yaml"}, err
    return err


@pytest.mark.parametrize("decl,args,expected", [
    (DECL, ["--resume"], "--until-decided and --resume cannot be combined"),
    (DECL, ["--extend", "--seeds", "3"], "--until-decided and --extend cannot be combined"),
    (DECL, ["--delta", "nan"], "--delta=nan must be a finite number > 0"),
    (DECL, ["--delta", "-0.1"], "--delta=-0.1 must be a finite number > 0"),
    (DECL, ["--max-device-hours", "inf"], "--max-device-hours=inf must be a finite number > 0"),
    (DECL, ["--initial-seeds", "5", "--max-seeds", "4"], "--max-seeds=4 is smaller than --initial-seeds=5"),
    (DECL, ["--max-seeds", "2"], "--max-seeds=2 is too few; valid: an integer from 3 to 10,000"),
    (DECL, ["--initial-seeds", "100000000", "--max-seeds", "100000001"], "--initial-seeds=100000000 is too many"),
    (DECL.replace("[0, 1, 2]", "[0, 1, 2, 3, 4]"), ["--max-seeds", "4"], "look 1 has 5 seeds (0, 1, 2, 3, 4)"),
    (DECL.replace("[0, 1, 2]", "[0, 1]"), [], "look 1 has 2 seeds (0, 1); valid: 3 to --max-seeds=20"),
    (DECL.replace(", seed: [0, 1, 2]", ""), [], "--until-decided needs seed and routing.method in the declaration's grid"),
    (DECL.replace("[smear, tag, hash]", "[smear]"), [], "the grid's smear is one method"),
    (DECL.replace("[smear, tag, hash]", "[tag, hash]"), [], "the grid's tag, hash lacks it"),
    (DECL, ["--reference", "moe"], "--reference='moe'"),
], ids=["resume", "extend", "nan-delta", "negative-delta", "inf-hours", "max-below-initial", "max-too-few", "initial-too-many",
        "grid-over-max", "too-few-seeds", "no-seed-grid", "one-method", "no-reference", "unknown-reference"])
def test_bad_input_is_refused_in_the_boundary(tmp_path, offline_data, monkeypatch, capsys, decl, args, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in _refused(tmp_path, capsys, decl, "--until-decided", *args)


def test_the_loop_flags_need_until_decided_and_a_name(tmp_path, offline_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "--max-seeds needs --until-decided" in _refused(tmp_path, capsys, DECL, "--max-seeds", "6")
    assert "--until-decided needs --name" in _refused(tmp_path, capsys, DECL, "--until-decided", name=None)


def test_a_dry_run_lists_look_one(tmp_path, offline_data, monkeypatch, capsys):
    from service.launch import main

    monkeypatch.chdir(tmp_path)
    assert main(launch_args(tmp_path, DECL, "--until-decided", "--initial-seeds", "4", "--dry-run")) == 0
    assert "12 trials" in capsys.readouterr().out


TINY = """
description: two methods until decided
base: {steps: 2, eval_every: 2, batch_size: 8, torch_threads: 1, data.resolution: 16, data.augment: none,
       data.domains: [real, sketch]}
grid: {routing.method: [smear, tag], seed: [0, 1, 2]}
resources: {cpu: 1}
max_concurrent_trials: 2
"""


@pytest.mark.slow
def test_until_decided_runs_rounds_under_one_parent_until_decided_or_the_budget(tmp_path, env_with_venv):
    from mlflow.tracking import MlflowClient

    proc = run_launch(tmp_path, env_with_venv, TINY, "--until-decided", "--max-seeds", "4", timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    db = f"{tmp_path}/mlflow.db"
    parent, children = child_runs(db)
    state = LoopState.from_tags(parent.data.tags)
    found = decisions_from_tags(parent.data.tags)
    assert state.stopped in (STOP_DECIDED, STOP_LAST_LOOK) and state.design[0] == 3 and state.design[-1] <= 4
    assert set(found) == {"tag"} and parent.info.status == "FINISHED"
    assert (found["tag"]["verdict"] != "undecided") == (state.stopped == STOP_DECIDED)
    seeds = sorted({int(r.data.tags["seed"]) for r in children})
    assert seeds == list(range(state.design[state.look - 1]))           # every round's trials, one parent run
    assert len(children) == 2 * len(seeds) and all(r.info.status == "FINISHED" for r in children)
    for r in state.rounds:                                             # each round: an extension, done
        assert parent.data.tags[f"extend.t-extend-{'-'.join(map(str, r['seeds']))}"] == "done"
    assert f"until-decided: look {state.look} of {len(state.design)}" in proc.stdout
    text = (tmp_path / "results" / "t" / "report" / "summary.md").read_text()
    assert "### Seeds until decided (reference `smear`)" in text and f"stopped: {state.stopped}" in text
    assert f"| tag | {found['tag']['verdict']} |" in text and f"{state.look} done" in text
    summary = MlflowClient(f"sqlite:///{db}").download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))
    assert "### Seeds until decided" in open(summary).read()
    # the same command again: the loop is over, nothing new runs; the report shows the same decisions
    again = run_launch(tmp_path, env_with_venv, TINY, "--until-decided", "--max-seeds", "4", timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert len(child_runs(db)[1]) == len(children)


def _score(method: str, seed: int) -> float:
    """A made-up test score per (method, seed): the same whichever driver or round runs it."""
    rng = np.random.default_rng(1000 * seed + sum(map(ord, method)))
    effect = {"smear": 0.0, "tag": 0.2, "hash": 0.0}[method]
    return 0.5 + 0.01 * seed % 0.03 + effect + rng.normal(0, 0.03)


def _fake_round(uri, storage, interrupt_at: list[int]):
    """launch.run_sweep without Ray: the round's trials recorded as child runs of the parent run, the extension
    tagged as run_sweep tags it; ``interrupt_at``: the round numbers (by first seed) a Ctrl-C ends."""
    from service.record import ParentRun

    def run_round(inputs) -> int:
        ext, sweep = inputs.extension, inputs.sweep
        parent = ParentRun.open(uri, sweep, "t", storage=storage, resume=ext is not None, tags={"smoke": "False"})
        if ext is not None:
            ext.start(parent, sweep)
            if ext.seeds[0] in interrupt_at:
                interrupt_at.remove(ext.seeds[0])
                parent.finish("KILLED")
                parent.replica.flush()
                raise KeyboardInterrupt
        client = parent.client
        for t in sweep.trials:
            m, s = t.overrides["routing.method"], t.overrides["seed"]
            run = client.create_run(parent.experiment_id, run_name=f"{m}-s{s}", tags={
                "mlflow.parentRunId": parent.run_id, "method": m, "seed": str(s)})
            client.log_metric(run.info.run_id, "test/accuracy", _score(m, s))
            client.log_metric(run.info.run_id, "compute/train_hours", 0.01)
            client.set_terminated(run.info.run_id, "FINISHED")
        if ext is not None:
            ext.done(parent)
        parent.finish("FINISHED")
        parent.replica.flush()
        return 0
    return run_round


def _until_decided(tmp_path, decl: str, *extra: str, interrupt_at=()):
    """decide.run as launch.py runs it, with the fake round, in one fresh 'driver' per call."""
    from service import decide
    from service.inputs import Inputs, parse_args, round_inputs
    from service.journal import journal_path
    from service.replica import Replica
    from service.spaces import load_sweep

    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "results")
    Replica.forget(journal_path(storage, "t"))
    args = parse_args(launch_args(tmp_path, decl, "--until-decided", *extra))
    sweep = load_sweep(args.sweep)
    loop = decide.plan_loop(args, sweep, uri, storage)
    inputs = Inputs(args, sweep, uri, storage, None, loop, decide.again_flags(args))
    return decide.run(inputs, _fake_round(uri, storage, list(interrupt_at)), round_inputs, lambda parent: 0)


LOOP = DECL.replace("[0, 1, 2]", "[0, 1, 2, 3]")


def test_an_interrupted_loop_continues_with_the_same_command_to_the_same_end(tmp_path, offline_data, monkeypatch):
    from mlflow.tracking import MlflowClient

    results = {}
    for run, cut in (("whole", ()), ("cut", (4,))):
        folder = tmp_path / run
        folder.mkdir()
        monkeypatch.chdir(folder)
        if cut:
            with pytest.raises(KeyboardInterrupt):
                _until_decided(folder, LOOP, "--max-seeds", "8", interrupt_at=cut)
            assert LoopState.from_tags(child_runs(f"{folder}/mlflow.db")[0].data.tags).look == 1
        assert _until_decided(folder, LOOP, "--max-seeds", "8") == 0
        parent, children = child_runs(f"{folder}/mlflow.db")
        state = LoopState.from_tags(parent.data.tags)
        runs = sorted((r.data.tags["method"], int(r.data.tags["seed"])) for r in children)
        assert len(runs) == len(set(runs))                      # no trial twice, the interrupted round's included
        results[run] = (state, decisions_from_tags(parent.data.tags), runs)
        assert _until_decided(folder, LOOP, "--max-seeds", "8") == 0   # over: nothing more runs
        assert len(child_runs(f"{folder}/mlflow.db")[1]) == len(children)
        assert MlflowClient(f"sqlite:///{folder}/mlflow.db").get_run(parent.info.run_id).data.tags[
            "decide.state"] == parent.data.tags["decide.state"]
    (state, found, runs), again = results["whole"], results["cut"]
    assert again == (state, found, runs) and state.look >= 2 and state.stopped
    assert found["tag"]["verdict"] == "better" and state.design[0] == 4
    at = found["tag"]["decided_at"]                            # no seed for tag after its decision
    assert {s for m, s in runs if m == "tag"} == set(range(state.design[at - 1]))
    assert {s for m, s in runs if m == "smear"} == set(range(state.design[state.look - 1]))


def test_a_recorded_loop_refuses_other_flags(tmp_path, offline_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _until_decided(tmp_path, LOOP, "--max-seeds", "8") == 0
    err = _refused_with_record(tmp_path, capsys, LOOP, "--until-decided", "--max-seeds", "8", "--delta", "0.02")
    assert "loop ran with --reference smear --delta 0.01 --max-seeds 8, not smear 0.02 8" in err


def _refused_with_record(tmp_path, capsys, decl, *args) -> str:
    from service.launch import main

    db = tmp_path / "mlflow.db"
    before = db.stat().st_mtime_ns
    capsys.readouterr()
    try:
        rc = main(launch_args(tmp_path, decl, *args))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "valid" in err and db.stat().st_mtime_ns == before, err
    return err
