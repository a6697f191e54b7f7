"""The ``smear-sweep`` command (service/cli.py): each subcommand delegates to the one entry point that owns its
flags, so its refusals are that entry point's own line (exit 2, nothing written), and its --help shows examples."""
from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib

import pytest

from service import cli
from tests.helpers import REPO

NAMES = [c.name for c in cli.COMMANDS]


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse: --help, a bad flag
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("name", NAMES)
def test_each_command_help_shows_its_usage_and_an_example(capsys, name):
    rc, out, err = _run(capsys, *name.split(), "--help")
    assert rc == 0 and not err, err
    assert out.startswith(f"usage: smear-sweep {name}"), out[:200]
    examples = out.split("examples:\n", 1)[1]
    assert examples.startswith(f"  smear-sweep {name}"), examples[:200]
    assert "same as: python " in out           # the entry point it delegates to


def test_overview_lists_every_command(capsys):
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0 and all(f"  {n} " in out for n in NAMES) and "examples:" in out


@pytest.mark.parametrize("argv,line", [
    ([], "smear-sweep: error: a command is needed; valid: run, resume, sync, extend, estimate, report, data"),
    (["frob"], "smear-sweep: error: unknown command 'frob'; valid: run, resume, sync, extend, estimate, report, data"),
    (["data"], "smear-sweep: error: 'data' needs a command; valid: data prepare, data check"),
    (["data", "verify"], "smear-sweep: error: unknown command 'data verify'; valid: data prepare, data check"),
])
def test_unknown_command_is_one_line(capsys, argv, line):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and not out and err.startswith(line) and len(err.splitlines()) == 1, err


def test_run_dry_run_resolves_the_default_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, "run", "--dry-run")
    assert rc == 0, err
    assert "sweep 'default': 6 trials" in out and out.count("routing.method=") == 6
    assert list(tmp_path.iterdir()) == []


def _bad(capsys, tmp_path, monkeypatch, entry, argv) -> str:
    monkeypatch.chdir(tmp_path)
    try:
        rc = entry(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []        # nothing written
    return err


STORE = ["--tracking-uri", "sqlite:////nonexistent-dir/m.db", "--storage", "/nonexistent-dir/results"]
# (smear-sweep arguments, the same through the entry point it delegates to, a fragment of the one line)
SAME = [
    (["run", "--cpus-per-trial", "-1"], ["--cpus-per-trial", "-1"], "--cpus-per-trial=-1.0 must be >= 0"),
    (["run", "--sweep", "no-such-sweep"], ["--sweep", "no-such-sweep"], "unknown sweep 'no-such-sweep'; valid: default"),
    (["resume"], ["--resume"], "--resume needs --name"),
    (["resume", "r", "--max-concurrent-trials", "2"], ["--resume", "--name", "r", "--max-concurrent-trials", "2"],
     "--max-concurrent-trials=2 cannot be combined with --resume"),
    (["resume", "r", "--verbose"], ["--resume", "--name", "r", "--verbose"], "--verbose cannot be combined with --resume"),
    (["extend", "r"], ["--extend", "--name", "r"], "--extend needs --seeds"),
    (["extend", "r", "--seeds", "x"], ["--extend", "--name", "r", "--seeds", "x"], "argument --seeds"),
    (["estimate", "--calibration-steps", "0"], ["--dry-run", "--estimate", "--calibration-steps", "0"],
     "--calibration-steps=0 is not valid; valid: >= 1"),
    (["data", "check", "/definitely/not/here"], ["--dry-run", "--check-images", "--data-root", "/definitely/not/here"],
     "data root '/definitely/not/here' does not exist"),
]


@pytest.mark.parametrize("argv,launch_argv,expected", SAME, ids=[" ".join(c[0])[:40] for c in SAME])
def test_a_refusal_through_the_command_is_launch_pys_own_line(tmp_path, monkeypatch, offline_data, capsys, argv,
                                                              launch_argv, expected):
    from service.launch import main

    via_cli = _bad(capsys, tmp_path, monkeypatch, cli.main, [*argv, *STORE])
    direct = _bad(capsys, tmp_path, monkeypatch, main, [*launch_argv, *STORE])
    assert via_cli == direct and expected in via_cli, (via_cli, direct)
    assert via_cli.startswith("launch.py: error: ")


def test_report_and_data_prepare_refusals_are_their_own_lines(tmp_path, monkeypatch, capsys):
    from service.report import main as report
    from smear.data.prepare import main as prepare

    line = _bad(capsys, tmp_path, monkeypatch, cli.main, ["report", "sweep", "--n-boot", "0"])
    assert line == _bad(capsys, tmp_path, monkeypatch, report, ["sweep", "--n-boot", "0"])
    assert line == "report.py: error: --n-boot=0 must be >= 1\n"
    line = _bad(capsys, tmp_path, monkeypatch, cli.main, ["data", "prepare", "/nowhere", str(tmp_path / "x"),
                                                          "--quality", "0"])
    assert line == _bad(capsys, tmp_path, monkeypatch, prepare, ["/nowhere", str(tmp_path / "x"), "--quality", "0"])
    assert line == "python -m smear.data.prepare: error: --quality=0 is out of range; valid: 1 to 95\n"
    line = _bad(capsys, tmp_path, monkeypatch, cli.main, ["data", "prepare", "/nowhere"])   # argparse's own, one line
    assert line.startswith("python -m smear.data.prepare: error: the following arguments are required: dst")


def test_the_console_script_names_this_main():
    """`pip install -e .` makes `smear-sweep` call service.cli:main (before a reinstall: python -m service.cli)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["smear-sweep"].split(":")
    assert getattr(importlib.import_module(module), func) is cli.main


def test_python_m_service_cli_as_a_process(tmp_path, env_with_venv):
    """The command as a user meets it: a dry run of the default sweep, then a bad value (one line, exit 2,
    the same line as launch.py's, nothing written)."""
    cmd = [sys.executable, "-m", "service.cli"]
    proc = subprocess.run([*cmd, "run", "--dry-run"], cwd=tmp_path, env=env_with_venv, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "sweep 'default': 6 trials" in proc.stdout, proc.stderr
    bad = subprocess.run([*cmd, "run", "--num-samples", "0"], cwd=tmp_path, env=env_with_venv, capture_output=True,
                         text=True, timeout=120)
    same = subprocess.run([sys.executable, str(REPO / "service" / "launch.py"), "--num-samples", "0"], cwd=tmp_path,
                          env=env_with_venv, capture_output=True, text=True, timeout=120)
    assert bad.returncode == same.returncode == 2 and bad.stderr == same.stderr, (bad.stderr, same.stderr)
    assert bad.stderr == "launch.py: error: --num-samples=0 must be >= 1\n"
    assert list(tmp_path.iterdir()) == []
