"""The durable record's guarantee, searched with Hypothesis (service/journal.py, service/replica.py): whatever
part of a sweep's writes reached MLflow before its server was lost (any prefix, with the answer of any write
lost on the way: applied but not marked, or applied and sent again), a sync from the journal by a new driver
leaves MLflow with exactly the record an unfaulted sweep leaves (runs, statuses, end times, params, tags,
every metric step once, artifacts), under the same run ids, and a second sync sends nothing.

The store is a real sqlite MLflow store; each example is its own pair of parent runs (the faulted sweep and its
unfaulted twin) in one experiment.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from mlflow.tracking import MlflowClient

from service.journal import PARENT, Journal
from service.replica import MARKER, Replica

settings.register_profile("journal-ci", max_examples=40, derandomize=True, deadline=None, print_blob=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("journal-long", parent=settings.get_profile("journal-ci"), max_examples=500,
                          derandomize=False)
PROFILE = settings.get_profile("journal-long" if os.environ.get("SMEAR_FUZZ_PROFILE") == "long" else "journal-ci")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("journal")
    uri = f"sqlite:///{root}/m.db"
    client = MlflowClient(uri)
    return root, uri, client, client.create_experiment("journal", artifact_location=str(root / "artifacts"))


# -- a sweep's history of writes, abstract (rendered once per parent run) --------------------------------------
_trial_events = st.lists(st.one_of(
    st.tuples(st.just("metrics"), st.integers(1, 3), st.floats(-1e6, 1e6, allow_nan=False)),
    st.tuples(st.just("tags"), st.sampled_from(["a", "b"]), st.text("xyz", min_size=1, max_size=3)),
    st.tuples(st.just("end"), st.sampled_from(["FINISHED", "FAILED", "KILLED"]), st.none()),
    st.tuples(st.just("start"), st.none(), st.none()),
    st.tuples(st.just("artifact"), st.sampled_from(["x.txt", "y.txt"]), st.text("ab", max_size=5)),
), max_size=8)


@st.composite
def histories(draw):
    """A sweep's writes in the order the driver made them: trials interleaved, then the parent's end."""
    n = draw(st.integers(1, 3))
    per_trial = [draw(_trial_events) for _ in range(n)]
    queues = [[("open", None, None)] + evs for evs in per_trial]
    order, clock = [], 1_700_000_000_000
    while any(queues):
        i = draw(st.sampled_from([j for j, q in enumerate(queues) if q]))
        clock += 1000
        order.append((f"t_{i:05d}", queues[i].pop(0), clock))
    order += [(PARENT, ("tags", "sweep_error", "x"), clock + 1), (PARENT, ("end", "FINISHED", None), clock + 2)]
    return order


def render(history, path, parent_id: str, uri: str, exp: str) -> Journal:
    """The journal launch.py and the tracker would write for ``history`` (the same entry kinds and data)."""
    Replica.forget(path)
    path.unlink(missing_ok=True)
    j = Journal.at(path)
    j.append(PARENT, "open", run_id=parent_id, experiment_id=exp, uri=uri, name="s")
    steps: dict[str, int] = {}
    for key, (op, a, b), ts in history:
        if op == "open":
            j.append(key, "open", run_name=f"run-{key}", tags={"mlflow.parentRunId": parent_id, "trial_id": key,
                                                                 "sweep": "s"},
                     params={"seed": key[-1], "lr": "0.1"}, config={"seed": int(key[-1])})
        elif op == "metrics":
            steps[key] = steps.get(key, 0) + a
            j.append(key, "metrics", step=steps[key], ts=ts, final=False, values={"val/acc": b, "train/loss": -b})
        elif op == "tags":
            j.append(key, "tags", tags={a: b})
        elif op == "end":
            j.append(key, "end", status=a, end_time=ts, tags={"error": "boom"} if a == "FAILED" else {})
        elif op == "start":
            j.append(key, "start", attempt="2")
        elif op == "artifact":
            j.append(key, "artifact", path=a, text=b)
    return j


def record(client: MlflowClient, exp: str, parent_id: str) -> dict:
    """The MLflow record of one sweep, without what differs by construction (run ids, the bookkeeping mark)."""
    runs = {r.data.tags["trial_id"]: r for r in client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)}
    runs[PARENT] = client.get_run(parent_id)
    out = {}
    for key, r in runs.items():
        history = {k: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(r.info.run_id, k))
                   for k in r.data.metrics}
        tags = {k: v for k, v in r.data.tags.items() if k not in (MARKER, "mlflow.parentRunId")}
        files = sorted((a.path, a.file_size) for a in client.list_artifacts(r.info.run_id))
        out[key] = (r.info.status, r.info.end_time if r.info.status != "RUNNING" else None, r.data.params, tags,
                    history, files)
    return out


def _parent(client, exp) -> str:
    return client.create_run(exp, run_name="s", tags={"sweep": "s"}).info.run_id


@PROFILE
@given(history=histories(), cut=st.floats(0, 1), lost=st.lists(st.floats(0, 1, exclude_max=True), max_size=4),
       twice=st.booleans())
def test_a_sync_after_any_loss_gives_the_unfaulted_record(store, history, cut, lost, twice):
    root, uri, client, exp = store
    # the unfaulted sweep: every write sent as it was made
    twin = _parent(client, exp)
    ref = Replica.at(render(history, root / "twin.jsonl", twin, uri, exp).path, uri, exp, twin)
    for e in ref.journal.entries():
        ref.apply(e)
    expected = record(client, exp, twin)

    # the faulted sweep: its server took the first `cut` of its writes, then was lost for good; on the way,
    # the answers of the writes in `lost` never came back (applied, but their mark not written)
    parent = _parent(client, exp)
    path = render(history, root / "sweep.jsonl", parent, uri, exp).path
    live = Replica.at(path, uri, exp, parent)
    entries = list(live.journal.entries())
    sent = entries[:round(cut * len(entries))]
    lost = {int(x * len(sent)) for x in lost}                        # which of the sent writes lost their answer
    for i, e in enumerate(sent):
        before = client.get_run(live.run_ids[e.key]).data.tags.get(MARKER) if e.key in live.run_ids else None
        live.apply(e)
        if i in lost and before is not None:
            client.set_tag(live.run_ids[e.key], MARKER, before)      # the mark's write was lost
            if twice and e.op == "metrics":
                live._unsure.add(e.key)                              # the driver retries the write it is unsure of
                live.apply(e)
    ids_before = dict(live.run_ids)

    Replica.forget(path)                                             # the sync is a new process: nothing in memory
    replica = Replica.at(path, uri, exp, parent)
    replica.sync()
    assert replica.missing() == {} and not replica.refused
    assert record(client, exp, parent) == expected
    assert {k: v for k, v in replica.run_ids.items() if k in ids_before} == ids_before  # the same run ids
    Replica.forget(path)
    assert Replica.at(path, uri, exp, parent).sync() == 0             # idempotent: nothing is sent twice


def test_a_line_cut_short_by_a_killed_driver_is_skipped_and_the_next_entry_starts_its_own(tmp_path):
    path = tmp_path / "record.jsonl"
    j = Journal.at(path)
    j.append("t_1", "open", run_name="r", tags={}, params={}, config={})
    j.durable()
    Journal.forget(path)
    with open(path, "a") as f:
        f.write('{"key":"t_1","op":"metrics","n":2,"da')               # the driver died mid-line
    j = Journal.at(path)
    assert [e.n for e in j.entries()] == [1] and j.state("t_1").n == 1
    j.append("t_1", "end", status="FINISHED", end_time=1, tags={})
    Journal.forget(path)
    assert [(e.op, e.n) for e in Journal.at(path).entries()] == [("open", 1), ("end", 2)]
    assert Journal.at(path).state("t_1").status == "FINISHED"
    Journal.forget(path)


def test_the_fold_knows_steps_status_and_errors_without_mlflow(tmp_path):
    j = Journal.at(tmp_path / "record.jsonl")
    j.append("t_1", "open", run_name="r1", tags={}, params={}, config={})
    for step in (10, 20):
        j.append("t_1", "metrics", step=step, ts=step, final=False, values={"val/acc": step / 100})
    j.append("t_1", "metrics", step=20, ts=30, final=True, values={"test/acc": 0.5})
    j.append("t_1", "end", status="FINISHED", end_time=40, tags={})
    j.append("t_2", "open", run_name="r2", tags={}, params={}, config={})
    j.append("t_2", "end", status="FAILED", end_time=40, tags={"error": "Traceback\n  x\nValueError: bad lr\n"})
    Journal.forget(tmp_path / "record.jsonl")
    j = Journal.at(tmp_path / "record.jsonl")
    assert (j.state("t_1").last_step, j.state("t_1").status, j.state("t_1").name) == (20, "FINISHED", "r1")
    assert (j.state("t_2").status, j.state("t_2").error) == ("FAILED", "ValueError: bad lr")
    assert j.final_metrics() == {"t_1": {"val/acc": 0.2, "test/acc": 0.5}}
    Journal.forget(tmp_path / "record.jsonl")


_VALID_JOURNAL = (
    '{"key":"parent","op":"open","n":1,"data":{"run_id":"abc","experiment_id":"1","uri":"sqlite:///m.db","name":"s"}}\n'
    '{"key":"t_1","op":"open","n":1,"data":{"run_name":"r","tags":{},"params":{},"config":{}}}\n'
    '{"key":"t_1","op":"metrics","n":2,"data":{"step":10,"ts":5,"final":false,"values":{"val/acc":0.5}}}\n'
    '{"key":"t_1","op":"end","n":3,"data":{"status":"FAILED","end_time":6,"tags":{"error":"x"}}}\n').encode()


@settings(PROFILE, max_examples=200, phases=[Phase.explicit, Phase.generate, Phase.shrink])
@given(at=st.integers(0, len(_VALID_JOURNAL)), cut=st.integers(0, 40), insert=st.binary(max_size=40),
       json_line=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                              lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.sampled_from(
                                                          ["key", "op", "n", "data", "step", "ts", "values", "status",
                                                           "end_time", "tags", "error", "run_id"]), inner, max_size=5)),
                              max_leaves=10))
def test_a_damaged_journal_is_read_without_error_and_sync_refuses_it_in_one_line(tmp_path_factory, at, cut, insert,
                                                                                 json_line):
    """Whatever the journal's bytes (cut, spliced, a JSON line of any shape), reading it never raises and keeps only
    entries the driver could have written; ``--sync`` of it is a valid start or one clean refusal, exit 2."""
    import json

    from service.inputs import boundary
    from service.journal import OPS

    folder = tmp_path_factory.mktemp("damaged")
    path = folder / "s" / "record.jsonl"
    path.parent.mkdir()
    data = _VALID_JOURNAL[:at] + insert + _VALID_JOURNAL[at + cut:] + json.dumps(json_line).encode() + b"\n"
    path.write_bytes(data)
    j = Journal(path)
    for e in j.entries():
        assert e.op in OPS and isinstance(e.key, str) and e.n >= 1 and isinstance(e.data, dict)
    err = __import__("io").StringIO()
    with __import__("contextlib").redirect_stderr(err):
        try:
            result = boundary(["--sync", "--name", "s", "--storage", str(folder), "--tracking-uri",
                               f"sqlite:///{folder}/absent.db"])
        except SystemExit as e:
            result = e.code
    assert result == 2, result                                   # no store there: refused, whatever the journal
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("launch.py: error: ") and "internal error" not in lines[0], lines
    assert sorted(p.name for p in folder.rglob("*")) == ["record.jsonl", "s"]  # nothing written


def test_a_journal_on_a_full_disk_leaves_the_writes_to_mlflow_and_says_so(store, tmp_path):
    """The journal lives in the sweep's storage; when that storage is full (here /dev/full: every write is ENOSPC),
    no write raises: the sweep's end (exit 3, service/storage_guard.py) still ends its runs in MLflow, and the
    record's summary says the journal could not be written."""
    _, uri, client, exp = store
    path = tmp_path / "record.jsonl"
    path.symlink_to("/dev/full")
    parent = _parent(client, exp)
    replica = Replica.at(path, uri, exp, parent)
    replica.write(PARENT, "open", run_id=parent, experiment_id=exp, uri=uri, name="s")
    replica.write("t_1", "open", run_name="r", tags={"mlflow.parentRunId": parent, "trial_id": "t_1"}, params={},
                  config={})
    replica.write("t_1", "metrics", step=1, ts=1, final=False, values={"val/acc": 0.5})
    replica.write("t_1", "end", status="FAILED", end_time=2, tags={})
    assert replica.flush(timeout=60)
    assert replica.journal.broken and "No space left on device" in replica.journal.broken
    (run,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert run.info.status == "FAILED" and run.data.metrics == {"val/acc": 0.5}
    assert "could not be written: No space left on device" in replica.summary()
    Replica.forget(path)
