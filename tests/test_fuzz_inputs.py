"""The input boundary's contract (service/inputs.py), searched with Hypothesis rather than listed case by case.

Hypothesis mutates valid declarations (values of every type, keys and their spellings, nesting, size, raw bytes
and encodings) and flag sets (values, combinations, the environment's tracking URI), and runs launch.py's own
``main`` on each as a dry run. The contract, asserted on every example: exit 0 (a valid dry run), or exit 2 with
exactly one line ``launch.py: error: ...`` that is a refusal, not an internal error; never a traceback, never
more than a few seconds, nothing written. The CI profile is fixed (derandomized, a few hundred examples, a few
minutes); ``make fuzz`` runs the long one (SMEAR_FUZZ_PROFILE=long).
"""
from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                          phases=[Phase.explicit, Phase.generate, Phase.shrink])
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=5_000, derandomize=False)
PROFILE = settings.get_profile(os.environ.get("SMEAR_FUZZ_PROFILE", "ci"))
SECONDS = 10.0  # an example's wall-time budget: the boundary answers in a few seconds, whatever the input

# valid declarations of each shape the schema has (grid, random, optuna, ASHA, another setting)
VALID = [
    {"description": "x", "base": {"steps": 2, "eval_every": 1, "data.resolution": 16},
     "grid": {"routing.method": ["smear", "tag"], "seed": [0, 1]}},
    {"description": "r", "base": {"steps": 4, "eval_every": 2}, "grid": {"seed": [0]}, "search": "random",
     "num_samples": 2, "space": {"lr": {"loguniform": [1e-4, 1e-2]}, "routing.method": {"choice": ["smear", "hash"]}}},
    {"description": "o", "base": {"steps": 4, "eval_every": 2}, "search": "optuna", "num_samples": 2,
     "grid": {"seed": [0, 1]}, "space": {"routing.gumbel_tau0": {"uniform": [0.5, 5.0]}}},
    {"description": "a", "base": {"steps": 9, "eval_every": 3}, "grid": {"seed": [0, 1]}, "scheduler": "asha",
     "asha": {"grace_period": 1}, "resources": {"cpu": 1, "gpu": 0}, "max_failures": 1},
    {"description": "t", "base": {"setting": "t5_glue", "t5.tasks": ["sst2"], "t5.val_holdout": 20, "steps": 2,
                                  "eval_every": 1}, "grid": {"routing.method": ["adapter"], "seed": [0]}},
]
KEYS = ["description", "base", "grid", "search", "space", "num_samples", "scheduler", "asha", "resources", "smoke",
        "max_failures", "max_concurrent_trials", "search_seed", "steps", "seed", "lr", "routing.method", "routing",
        "data.resolution", "data", "resolution", "setting", "num_workers", "use_gpu", "cpu", "gpu", "t5.tasks",
        "grace_period", "uniform", "loguniform", "choice", "randint", "Steps", "steps ", "routing.method.x", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 20),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 0.0, -1, 1e308, float("nan"), float("inf")]),
    st.text(max_size=12), st.sampled_from(["all", "smear", "smear*", "", "none", "yes", "1e-3", "~", "\x00"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.one_of(st.sampled_from(KEYS), scalars),
                                                                      inner, max_size=3)), max_leaves=12)


def _paths(tree, prefix=()):
    """Every key path of a nested declaration (mappings and lists)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


@st.composite
def declarations(draw) -> bytes:
    """A valid declaration, then a few mutations of its tree, then (sometimes) of its bytes."""
    import copy

    tree = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        paths = list(_paths(tree))
        op = draw(st.sampled_from(["set", "set", "delete", "add", "respell"]))
        path = draw(st.sampled_from(paths)) if paths else ()
        parent = tree
        for p in path[:-1]:
            parent = parent[p]
        if op == "add" or not path:
            target = parent if isinstance(parent, dict) and path else tree
            target[draw(st.one_of(st.sampled_from(KEYS), scalars))] = draw(values)
        elif op == "set":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict) and isinstance(path[-1], str):  # respell: dotted <-> nested, case
            key, value = path[-1], parent.pop(path[-1])
            if "." in key:
                head, tail = key.split(".", 1)
                parent[head] = {tail: value}
            else:
                parent[draw(st.sampled_from([key.upper(), f"{key}.x", f"x.{key}", key + " "]))] = value
    try:
        text = yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)
    except yaml.YAMLError:
        text = repr(tree)
    data = text.encode()
    corrupt = draw(st.sampled_from(["none"] * 6 + ["bytes", "truncate", "utf16", "nest", "tab", "bom"]))
    if corrupt == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    elif corrupt == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif corrupt == "utf16":
        data = text.encode("utf-16")
    elif corrupt == "nest":
        depth = draw(st.sampled_from([50, 2_000, 20_000]))
        data += b"deep: " + b"[" * depth + b"]" * depth + b"\n"
    elif corrupt == "tab":
        data = data.replace(b"  ", b"\t", 1)
    elif corrupt == "bom":
        data = b"\xef\xbb\xbf" + data
    return data


flag_text = st.one_of(st.text(max_size=20), st.sampled_from(
    ["", " ", "nan", "inf", "-1", "0", "1e400", "x" * 300, "../up", "a/b", "s3://", "sqlite:///", "http://[::1",
     "postgresql://u@127.0.0.1:1/db", "ftp://x", "file:///nonexistent/x", "2,2", "3,x", "-0", "1_000"]))
FLAGS = ["--name", "--storage", "--tracking-uri", "--cpus-per-trial", "--gpus-per-trial", "--num-samples",
         "--max-concurrent-trials", "--seeds", "--data-root", "--sweep", "--calibration-steps", "--price-per-gpu-hour"]
SWITCHES = ["--smoke", "--resume", "--extend", "--estimate", "--verbose", "--check-images", "--no-system-metrics",
            "--frobnicate"]


@st.composite
def flag_sets(draw) -> tuple[list[str], str | None]:
    """Flags (values of every kind, any combination; always a dry run) and an MLFLOW_TRACKING_URI or none."""
    argv = ["--dry-run"]
    for flag in draw(st.lists(st.sampled_from(FLAGS), max_size=3, unique=True)):
        argv += [flag, draw(flag_text)]
    argv += draw(st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True))
    return argv, draw(st.one_of(st.none(), flag_text))


def _captured(folder: Path, env_uri: str | None, main, argv: list[str]) -> tuple[int, str, str, float]:
    """``main(argv)`` in ``folder`` (its working directory) with MLFLOW_TRACKING_URI = ``env_uri`` (None: unset):
    (exit code, stdout, stderr, seconds); argparse's refusals are SystemExit."""
    out, err = io.StringIO(), io.StringIO()
    was = os.environ.pop("MLFLOW_TRACKING_URI", None)
    if env_uri is not None and "\x00" not in env_uri:
        os.environ["MLFLOW_TRACKING_URI"] = env_uri
    cwd, t0 = os.getcwd(), time.monotonic()
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse's refusals
                rc = e.code
    finally:
        os.chdir(cwd)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if was is not None:
            os.environ["MLFLOW_TRACKING_URI"] = was
    return rc, out.getvalue(), err.getvalue(), time.monotonic() - t0


def _run(folder: Path, declaration: bytes | None, argv: list[str], env_uri: str | None) -> tuple[int, str, float]:
    """launch.py's main in ``folder``, its declaration written there first."""
    from service.launch import main

    if declaration is not None:
        (folder / "space.yaml").write_bytes(declaration)
        argv = ["--sweep", str(folder / "space.yaml"), *argv]
    rc, out, err, seconds = _captured(folder, env_uri, main, argv)
    return rc, out + "\n" + err, seconds


def _check_contract(folder: Path, rc: int, output: str, seconds: float) -> None:
    lines = [line for line in output.splitlines() if line.startswith("launch.py: error:")]
    assert "Traceback" not in output, output[-3000:]
    assert rc in (0, 2), (rc, output[-3000:])
    if rc == 2:
        assert len(lines) == 1 and len([x for x in output.splitlines() if x.strip()]) == 1, output[-3000:]
        assert "internal error" not in lines[0], lines[0]
    else:
        assert not lines, output[-3000:]
    assert seconds < SECONDS, (seconds, output[-2000:])
    assert {p.name for p in folder.iterdir()} <= {"space.yaml"}, sorted(p.name for p in folder.iterdir())


@pytest.fixture
def fuzz_env(offline_data, tmp_path_factory, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path_factory


@PROFILE
@given(declaration=declarations(), flags=flag_sets())
def test_any_declaration_and_flags_get_a_dry_run_or_one_clean_refusal(fuzz_env, declaration, flags):
    folder = fuzz_env.mktemp("fuzz")
    argv, env_uri = flags
    rc, output, seconds = _run(folder, declaration, argv, env_uri)
    _check_contract(folder, rc, output, seconds)


@PROFILE
@given(declaration=declarations())
def test_any_declaration_alone_gets_a_dry_run_or_one_clean_refusal(fuzz_env, declaration):
    folder = fuzz_env.mktemp("fuzz")
    rc, output, seconds = _run(folder, declaration, ["--dry-run"], None)
    _check_contract(folder, rc, output, seconds)


LOOP_FLAGS = ["--initial-seeds", "--max-seeds", "--max-device-hours", "--delta", "--reference", "--name", "--seeds"]
LOOP_SWITCHES = ["--resume", "--extend", "--sync", "--smoke", "--frobnicate"]
LOOP_VALID = {"description": "d", "base": {"steps": 2, "eval_every": 1, "data.resolution": 16},
              "grid": {"routing.method": ["smear", "tag"], "seed": [0, 1, 2]}}


@st.composite
def loop_flag_sets(draw) -> list[str]:
    """--until-decided's flags (service/decide.py): values of every kind, any combination; always a dry run."""
    argv = ["--dry-run", "--until-decided"]
    for flag in draw(st.lists(st.sampled_from(LOOP_FLAGS), max_size=3, unique=True)):
        argv += [flag, draw(st.one_of(flag_text, st.sampled_from(["3", "4", "20", "0.5", "1e-9", "smear", "tag"])))]
    return argv + draw(st.lists(st.sampled_from(LOOP_SWITCHES), max_size=1))


@PROFILE
@given(declaration=st.one_of(st.just(yaml.safe_dump(LOOP_VALID).encode()), declarations()), flags=loop_flag_sets())
def test_any_until_decided_flags_get_a_dry_run_or_one_clean_refusal(fuzz_env, declaration, flags):
    folder = fuzz_env.mktemp("fuzz-loop")
    rc, output, seconds = _run(folder, declaration, flags, None)
    _check_contract(folder, rc, output, seconds)


def test_the_valid_declarations_pass_the_contract_as_valid(fuzz_env):
    """The fuzz starts from valid declarations: each one is a clean dry run (the contract has teeth both ways)."""
    for tree in VALID:
        folder = fuzz_env.mktemp("valid")
        rc, output, _ = _run(folder, yaml.safe_dump(tree).encode(), ["--dry-run"], None)
        assert rc == 0, output[-2000:]


REPORT_FLAGS = ["--tracking-uri", "--storage", "--experiment", "--reference", "--ci", "--n-boot"]


@st.composite
def report_argv(draw) -> tuple[list[str], str | None]:
    """report.py's command line: a sweep name or none, any of its flags with values of every kind."""
    argv = [draw(flag_text)] if draw(st.booleans()) else []
    for flag in draw(st.lists(st.sampled_from(REPORT_FLAGS), max_size=3, unique=True)):
        argv += [flag, draw(flag_text)]
    return argv, draw(st.one_of(st.none(), flag_text))


@PROFILE
@given(flags=report_argv())
def test_any_report_command_line_gets_a_report_or_one_clean_refusal(fuzz_env, flags):
    """The report's command line keeps the same contract (service/report: a refusal is one line, exit 2)."""
    from service.report import main

    folder, (argv, env_uri) = fuzz_env.mktemp("fuzz-report"), flags
    rc, out, err, seconds = _captured(folder, env_uri, main, argv)
    output = out + err
    assert "Traceback" not in output and rc == 2, (rc, output[-3000:])  # no store here: never a report
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("report.py: error: ") and "internal error" not in lines[0], lines
    assert seconds < SECONDS
    assert not list(folder.iterdir()), sorted(p.name for p in folder.iterdir())
