"""Bad input exits 2 with one line naming the bad value, before anything starts, writing nothing."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO, tmpfs

GOOD = """
description: x
base: {steps: 2, eval_every: 1, data.resolution: 16}
grid: {routing.method: [smear], seed: [0]}
"""

# the "billion laughs" shape: nine levels of ten aliases each (1e9 leaves if expanded)
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))

def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEAD = f"http://127.0.0.1:{_closed_port()}"
# Every case runs as on a machine without network and with empty weight caches (see _offline_env).
OFFLINE_ENV = {"TORCH_HOME": "empty-torch-home", "HF_HOME": "empty-hf-home", "HF_HUB_CACHE": "empty-hf-home/hub",
               "HTTPS_PROXY": DEAD, "HTTP_PROXY": DEAD, "https_proxy": DEAD, "http_proxy": DEAD,
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
RANDOM = "search: random\nspace: {lr: {loguniform: [0.0001, 0.01]}}\n"
T5 = "setting: t5_glue, t5.tasks: [sst2], t5.val_holdout: 20"

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
    (GOOD + "search: bayes\n", [], "search='bayes' is not valid; valid: grid, random, optuna"),
    (GOOD + "scheduler: hyperband\n", [], "scheduler='hyperband' is not valid; valid: fifo, asha"),
    (GOOD + "search: random\n", [], "search: random needs a 'space' of distributions"),
    (GOOD + "space: {lr: {loguniform: [0.1, 0.01]}}\nsearch: random\n", [], "space.lr.loguniform must be [low, high] with low < high"),
    (GOOD + "space: {lr: {normal: [0, 1]}}\nsearch: random\n", [], "space.lr={'normal': [0, 1]} must be one of"),
    (GOOD + "space: {lr: {uniform: [0.1, 1]}}\n", [], "'space' needs search: random or optuna"),
    (GOOD + "space: {lr: {uniform: [0.1, 1]}}\nsearch: optuna\n", [], "search: optuna cannot be combined with a grid"),
    (GOOD + "space: {routing.gumbel_tau0: {choice: [1.0, -2.0]}}\nsearch: random\n", [], "routing.gumbel_tau0=-2.0 is out of range"),
    (GOOD + "asha: {grace: 2}\n", [], "unknown asha key 'grace'; valid: grace_period"),
    (GOOD + "scheduler: asha\nasha: {grace_period: 9}\n", [], "asha.grace_period=9 exceeds max_t=3 evaluations; valid: 1 to 3"),
    (GOOD + "num_samples: 0\n", [], "num_samples=0 must be an integer >= 1"),
    (GOOD + "max_failures: -1\n", [], "max_failures=-1 must be an integer >= 0"),
    (GOOD, ["--cpus-per-trial", "-1"], "--cpus-per-trial=-1.0 must be >= 0"),
    (GOOD, ["--num-samples", "0"], "--num-samples=0 must be >= 1"),
    (GOOD, ["--resume"], "--resume needs --name"),
    (GOOD.replace("[smear]", "[adaptive_gating]").replace("data.resolution: 16", "setting: t5_glue, routing.adaptive_granularity: token"),
     [], "routing.adaptive_granularity='token' is not valid in T5 decoder blocks"),
    (GOOD.replace("data.resolution: 16", "setting: t5_glue, t5.tasks: [rte, wnli]"), [], "t5.tasks has unknown task 'wnli'"),
    (GOOD.replace("data.resolution: 16", "setting: vit_imagenet"), [], "setting='vit_imagenet' is not valid; valid: resnet_domainnet, t5_glue"),
    # issue 12: accepted and silently changed or ignored before; now refused
    (GOOD, ["--name", "../elsewhere"], "--name='../elsewhere' is not a safe run name; valid: one path component"),
    (GOOD, ["--name", "a/b"], "--name='a/b' is not a safe run name"),
    (GOOD, ["--name", "x", "--resume", "--dry-run"], "--dry-run and --resume cannot be combined"),
    (GOOD, ["--storage", ""], "--storage='' is empty; valid: a path or a URI"),
    (GOOD, ["--tracking-uri", " "], "--tracking-uri=' ' is empty"),
    (GOOD, ["--tracking-uri", "ftp://host/x"], "--tracking-uri='ftp://host/x' has an unknown scheme 'ftp'; valid: sqlite, http"),
    (GOOD, ["--storage", "nfs://share/x"], "--storage='nfs://share/x' has an unknown scheme 'nfs'; valid: s3, gs"),
    (GOOD.replace("seed: [0]", "seed: [0, 0]"), [], "grid.seed has 0 twice; valid: distinct values"),
    (GOOD + "num_samples: 4\n", [], "num_samples=4 needs search: random or optuna (search is grid"),
    (GOOD.replace("eval_every: 1", "eval_every: 5"), [], "eval_every=5 exceeds steps=2; valid: 1 to 2"),
    (GOOD.replace("[smear]", "[top_k]").replace("steps: 2", "steps: 2, routing.top_k: 9"), [],
     "routing.top_k=9 exceeds routing.num_experts=6; valid: 1 to 6"),
    (GOOD.replace("[smear]", "[st_gumbel]").replace("steps: 2", "steps: 2, routing.gumbel_tau_min: 20.0"), [],
     "routing.gumbel_tau_min=20.0 exceeds routing.gumbel_tau0=10.0"),
    (GOOD + "description: again\n", [], "key 'description' is written twice (lines 2 and 5); valid: each key once"),
    (GOOD.replace("eval_every: 1", "eval_every: 1, eval_every: 5"), [], "key 'eval_every' is written twice"),
    ("", [], "the declaration is empty"),
    (ALIAS_BOMB, [], "expands to more than 100,000 YAML nodes"),
    # config fields: ranges, finiteness, lists without repeats, widths
    (GOOD.replace("[smear]", "[st_gumbel]").replace("steps: 2", "steps: 2, routing.gumbel_anneal_rate: 2.0"), [],
     "routing.gumbel_anneal_rate=2.0 is out of range; must be <= 1.0"),
    (GOOD.replace("steps: 2", "steps: 2, lr: .nan"), [], "lr=nan is not a finite number; valid: a finite number"),
    (GOOD.replace("steps: 2", "steps: 2, lr: .inf"), [], "lr=inf is not a finite number"),
    (GOOD + "resources: {cpu: .inf}\n", [], "resources.cpu=inf is not a finite number"),
    (GOOD.replace("seed: [0]", "seed: [18446744073709551616]"), [],
     "seed=18446744073709551616 is out of range; must be <= 4294967295"),
    (GOOD.replace("seed: [0]", "seed: [-1]"), [], "seed=-1 is out of range; must be >= 0"),
    (GOOD.replace("steps: 2", "steps: 2, routing.rank: 100"), [],
     "routing.rank=100 exceeds the narrowest routing block's width 64 (ResNet-18 layer1); valid: 1 to 64"),
    (GOOD.replace("data.resolution: 16", T5 + ", t5.d_model: 16"), [],
     "routing.rank=24 exceeds the blocks' width t5.d_model=16; valid: 1 to 16"),
    (GOOD.replace("data.resolution: 16", "data.domains: [real, sketch, real]"), [],
     "data.domains has 'real' twice; valid: each domain once"),
    (GOOD.replace("data.resolution: 16", "setting: t5_glue, t5.tasks: [sst2, cola, sst2]"), [],
     "t5.tasks has 'sst2' twice; valid: each task once"),
    # the declaration: what varies, what is fixed, how many trials
    ("description: x\nbase: {steps: 2, eval_every: 1}\n", [],
     "grid is empty: the sweep would be one trial at the default seed; valid: list the seeds"),
    (GOOD.replace("grid: {routing.method: [smear], seed: [0]}", "grid: {}"), [], "grid is empty"),
    (GOOD.replace("steps: 2", "steps: 2, seed: 3"), [], "base.seed is overridden by grid.seed; valid: set it in one place"),
    (GOOD.replace("steps: 2", "steps: 2, lr: 0.1") + RANDOM, [], "base.lr is overridden by space.lr; valid: set it in one place"),
    (GOOD.replace("seed: [0]", "seed: [0], lr: [0.1]") + RANDOM, [], "grid.lr is overridden by space.lr"),
    (GOOD + "smoke_grid: {steps: [1, 2]}\n", [], "base.steps is overridden by smoke_grid.steps"),
    (GOOD + "max_concurrent_trials: 0\n", [],
     "max_concurrent_trials=0 must be an integer >= 1; leave it out for as many as the cluster fits"),
    (GOOD.replace("seed: [0]", f"seed: {list(range(101))}, lr: {[round(0.001 * (i + 1), 3) for i in range(100)]}"), [],
     "resolves to 10,100 trials (1 routing.method x 101 seed x 100 lr); valid: at most 10,000"),
    (GOOD + RANDOM + "num_samples: 20000\n", [], "resolves to 20,000 trials (1 routing.method x 1 seed x 20000 samples)"),
    (GOOD.replace("seed: [0]", "seed: [0, 1]") + "smoke: {seed: 5}\n", ["--smoke"],
     "trials 0 and 1 are identical (routing.method=smear seed=1 resolves like routing.method=smear seed=0)"),
    (GOOD + "search: random\nspace: {lr: {choice: [0.01]}}\nnum_samples: 2\n", [], "trials 0 and 1 are identical"),
    (GOOD + "search: random\nspace: {lr: {uniform: [0.1, .inf]}}\n", [], "lr=inf is not a finite number"),
    # flags: values and combinations that would be ignored
    (GOOD, ["--max-concurrent-trials", "0"], "--max-concurrent-trials=0 must be >= 1"),
    (GOOD, ["--num-samples", "4"], "--num-samples=4 needs search: random or optuna (the declaration's search is grid"),
    (GOOD, ["--name", "x", "--resume", "--max-concurrent-trials", "2"],
     "--max-concurrent-trials=2 cannot be combined with --resume"),
    # this machine and its services (after the declaration and the data, before Ray or MLflow)
    (GOOD, ["--storage", "space.yaml"], "--storage='space.yaml': "),
    (GOOD, ["--storage", "space.yaml/results"], "--storage='space.yaml/results' cannot be created: "),
    (GOOD, ["--tracking-uri", "sqlite:///space.yaml/m.db"], "/space.yaml/m.db': "),
    (GOOD, ["--tracking-uri", "sqlite:///."], "names a folder; valid: sqlite:///PATH/TO/FILE.db"),
    (GOOD, ["--tracking-uri", DEAD], f"tracking URI '{DEAD}' does not answer within 3 s"),
    (GOOD + "resources: {gpu: 99}\n", [], "a trial asks for cpu=1, gpu=99, but this machine has cpu="),
    (GOOD + "resources: {cpu: 999}\n", [], "a trial asks for cpu=999, gpu=0, but this machine has cpu="),
    (GOOD.replace("steps: 2", "num_workers: 2, steps: 2, batch_size: 8") + "resources: {cpu: 600}\n", [],
     "a trial asks for cpu=1200.01, gpu=0 (2 workers), but this machine has"),
    (GOOD.replace("data.resolution: 16", "data.resolution: 16, pretrained: imagenet"), [],
     "pretrained='imagenet' needs "),
    (GOOD.replace("data.resolution: 16", T5 + ", t5.model: google/t5-v1_1-base, routing.rank: 24"), [],
     "t5.model='google/t5-v1_1-base' is neither a local folder nor in the Hugging Face cache"),
    (GOOD.replace("data.resolution: 16", T5 + ", t5.tokenizer: google/t5-v1_1-base"), [],
     "t5.tokenizer='google/t5-v1_1-base' is neither a local folder nor in the Hugging Face cache"),
    # issue 14: --extend
    (GOOD, ["--extend", "--seeds", "1"], "--extend needs --name, the run name of the finished sweep"),
    (GOOD, ["--extend", "--name", "t"], "--extend needs --seeds, the new seeds (e.g. --seeds 3,4)"),
    (GOOD, ["--name", "t", "--seeds", "1"], "--seeds needs --extend"),
    (GOOD, ["--extend", "--name", "t", "--seeds", "1", "--resume"], "--extend and --resume cannot be combined"),
    (GOOD, ["--extend", "--name", "t", "--seeds", "1", "--dry-run"], "--extend and --dry-run cannot be combined"),
    (GOOD, ["--extend", "--name", "t", "--seeds", "1,x"], "--seeds='1,x': 'x' is not an integer; valid: comma"),
    (GOOD, ["--extend", "--name", "t", "--seeds", "2,2"], "--seeds='2,2': 2 is given twice; valid: distinct"),
    (GOOD, ["--extend", "--name", "t", "--seeds", "-1"], "--seeds='-1': -1 is negative"),
    (GOOD, ["--extend", "--name", "nope", "--seeds", "1"], "no sweep 'nope' to extend: no MLflow store at"),
    (GOOD.replace("routing.method: [smear], ", "") + "search: optuna\nspace: {lr: {loguniform: [0.001, 0.1]}}\n",
     ["--extend", "--name", "t", "--seeds", "1"], "--seeds (--extend) needs search: grid or random"),
    # issue 13: --estimate
    (GOOD, ["--estimate"], "--estimate needs --dry-run"),
    (GOOD, ["--dry-run", "--estimate", "--price-per-gpu-hour", "-1"], "--price-per-gpu-hour=-1.0 is not valid; valid: a price >= 0"),
    (GOOD, ["--dry-run", "--estimate", "--price-per-gpu-hour", "nan"], "--price-per-gpu-hour=nan is not valid"),
    (GOOD, ["--dry-run", "--price-per-gpu-hour", "2"], "--price-per-gpu-hour needs --estimate"),
    (GOOD, ["--dry-run", "--estimate", "--calibration-steps", "0"], "--calibration-steps=0 is not valid; valid: >= 1"),
    (GOOD, ["--dry-run", "--estimate", "--calibration-batch", "0"], "--calibration-batch=0 is not valid; valid: >= 1"),
    (GOOD.replace("data.resolution: 16", "setting: t5_glue, t5.model: acme/t5-huge"), ["--dry-run", "--estimate"],
     "t5.model='acme/t5-huge': its shape is unknown offline"),
]


def _args(tmp_path, decl, args):
    argv = ["--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--storage", str(tmp_path / "results")]
    if decl is not None:
        (tmp_path / "space.yaml").write_text(textwrap.dedent(decl))
        argv += ["--sweep", str(tmp_path / "space.yaml")]
    return argv + args


def _offline_env(tmp_path) -> dict[str, str]:
    """No network (proxies that refuse), empty torch hub and Hugging Face caches (folders that do not exist)."""
    return {k: str(tmp_path / v) if not v.startswith("http") and "," not in v else v for k, v in OFFLINE_ENV.items()}


def _nothing_written(tmp_path):
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "results").exists()
    assert not (tmp_path / "mlflow.db").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"space.yaml"}  # no cache folder, no store, nothing


@pytest.mark.parametrize("decl,args,expected", CASES, ids=[c[2].replace(DEAD, "DEAD")[:40] for c in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path, offline_data, monkeypatch, capsys, decl, args, expected):
    """In-process (fast): the same main() as the command line."""
    from service.launch import main

    monkeypatch.chdir(tmp_path)
    for k, v in _offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    try:
        rc = main(_args(tmp_path, decl, args))
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    _nothing_written(tmp_path)


PROCESS_CASES = [CASES[0], next(c for c in CASES if c[1] == ["--resume"]),
                 # issue 12: the checks of this machine and its services, as a user meets them
                 next(c for c in CASES if c[1] == ["--tracking-uri", DEAD]),
                 next(c for c in CASES if "pretrained: imagenet" in (c[0] or ""))]


@pytest.mark.parametrize("decl,args,expected", PROCESS_CASES,
                         ids=["config-error", "flag-error", "tracking-server", "weights-cache"])
def test_bad_input_as_a_process(tmp_path, env_with_venv, decl, args, expected):
    """One real process per exit path (a bad declaration or value; a bad flag combination, argparse's; a
    check of this machine: tracking server, weights cache): exit code 2, one line on stderr, no
    traceback. The in-process battery above covers the cases themselves."""
    cmd = [sys.executable, str(REPO / "service" / "launch.py"), *_args(tmp_path, decl, args)]
    env = {**env_with_venv, **_offline_env(tmp_path)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and expected in lines[0], proc.stderr
    _nothing_written(tmp_path)


def test_dry_run_prints_trials_and_writes_nothing(tmp_path, env_with_venv):
    proc = subprocess.run([sys.executable, str(REPO / "service" / "launch.py"), "--dry-run"], cwd=tmp_path,
                          env=env_with_venv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sweep 'default': 6 trials" in proc.stdout
    assert proc.stdout.count("routing.method=") == 6
    assert list(tmp_path.iterdir()) == []


def test_weights_in_the_local_caches_are_accepted(tmp_path, monkeypatch):
    """The weights check looks where the loaders will: a file in torch hub's cache, a local model folder
    (whose config.json also gives the width the rank is checked against); only a miss is refused."""
    import torch.hub

    from smear.backbones.resnet import check_imagenet_weights, imagenet_weights
    from smear.configs import ConfigError, to_dict
    from trainables.settings import make_config
    from trainables.settings import get_setting

    for k, v in _offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    url, path = imagenet_weights()
    assert path.parent.parent == __import__("pathlib").Path(torch.hub.get_dir())  # $TORCH_HOME/hub/checkpoints
    with pytest.raises(ConfigError, match="pretrained='imagenet' needs .*resnet18-"):
        check_imagenet_weights()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    check_imagenet_weights()

    folder = tmp_path / "t5-local"
    folder.mkdir()
    (folder / "config.json").write_text('{"d_model": 32}')
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "spiece.model").write_bytes(b"")

    def cfg(rank):
        return to_dict(make_config({"setting": "t5_glue", "t5": {"model": str(folder), "tokenizer": str(folder)},
                                    "routing": {"rank": rank}}))

    t5 = get_setting("t5_glue")
    t5.check_reachable([cfg(24)])
    with pytest.raises(ConfigError, match="routing.rank=48 exceeds the blocks' width d_model=32 of t5.model="):
        t5.check_reachable([cfg(24), cfg(48)])
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="t5.model='.*t5-local' is a folder without config.json and one of model.safetensors"):
        t5.check_reachable([cfg(24)])


def test_printed_continue_command_carries_the_flags_that_shape_the_trials(tmp_path):
    """The --resume / --extend command printed at the start names --smoke, --num-samples and --data-root when
    given: without them a resume would load other trials (the smoke budget, another sample count, data)."""
    import shlex

    from service.inputs import parse_args
    from service.launch import _same_trials

    args = parse_args(["--smoke", "--num-samples", "3", "--data-root", str(tmp_path), "--name", "r"])
    again = parse_args(shlex.split(_same_trials(args)) + ["--name", "r", "--resume"])
    assert (again.smoke, again.num_samples, again.data_root) == (True, 3, str(tmp_path.resolve()))
    assert _same_trials(parse_args([])) == ""


@pytest.mark.parametrize("flag", ["--storage", "--tracking-uri"])
def test_storage_or_store_on_a_read_only_disk_is_refused(tmp_path, offline_data, monkeypatch, capsys, flag):
    """A read-only file system (root can write anywhere else, so permissions alone cannot show this here):
    exit 2, one line naming the value, nothing written."""
    from service.launch import main

    with tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
        monkeypatch.chdir(tmp_path)
        for k, v in _offline_env(tmp_path).items():
            monkeypatch.setenv(k, v)
        value = str(disk / "results") if flag == "--storage" else f"sqlite:///{disk}/store/m.db"
        rc = main(_args(tmp_path, GOOD, [flag, value]))
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert f"{value!r} cannot be written: a read-only file system in {disk}" in lines[0], lines[0]
        assert list(disk.iterdir()) == []
    disk.rmdir()
    _nothing_written(tmp_path)
