"""The ``smear-sweep`` command: one subcommand per thing users do, each delegating to the one entry point that
owns its flags (``service/launch.py``, ``service.report``, ``smear.data.prepare``).

    smear-sweep run [FLAGS]                  python service/launch.py [FLAGS]
    smear-sweep resume NAME [FLAGS]          python service/launch.py --resume --name NAME [FLAGS]
    smear-sweep extend NAME --seeds S [...]  python service/launch.py --extend --name NAME --seeds S [...]
    smear-sweep sync NAME [FLAGS]            python service/launch.py --sync --name NAME [FLAGS]
    smear-sweep estimate [FLAGS]             python service/launch.py --dry-run --estimate [FLAGS]
    smear-sweep report NAME [FLAGS]          python -m service.report NAME [FLAGS]
    smear-sweep data prepare SRC DST [...]   python -m smear.data.prepare SRC DST [...]
    smear-sweep data check [ROOT] [FLAGS]    python service/launch.py --dry-run --check-images [--data-root ROOT] [FLAGS]

This module defines no flag of its own: each command's flags, defaults, checks and refusals are those of the
entry point it calls (a bad value: that entry point's one line, exit 2, nothing written), and its --help is
that entry point's, with the command's usage and examples. ``python -m service.cli`` is the same command
before the package is reinstalled (the ``smear-sweep`` script comes with ``pip install -e .``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

EXIT_BAD_INPUT = 2
PROG = "smear-sweep"


@dataclass(frozen=True)
class Command:
    name: str                                   # "run", or "data check"
    summary: str                                # one line, for smear-sweep --help
    usage: str                                  # the usage line of its --help
    examples: str                               # its --help's epilog
    run: Callable[[list[str], str, str], int]   # (the command's arguments, usage, epilog) -> exit code


def _launch(prefix: list[str], positional: str | None = None):
    """launch.py's main with ``prefix`` flags first; ``positional``: the flag the first argument is the value
    of, when it is not a flag itself (``resume NAME`` -> ``--name NAME``)."""
    def run(args: list[str], usage: str, epilog: str) -> int:
        from service.launch import main

        if positional and args and not args[0].startswith("-"):
            args = [positional, args[0], *args[1:]]
        return main([*prefix, *args], usage=usage, epilog=epilog)
    return run


def _report(args: list[str], usage: str, epilog: str) -> int:
    from service.report import main

    return main(args, usage=usage, epilog=epilog)


def _prepare(args: list[str], usage: str, epilog: str) -> int:
    from smear.data.prepare import main

    return main(args, usage=usage, epilog=epilog)


def _examples(*lines: str) -> str:
    return "examples:\n" + "".join(f"  {PROG} {line}\n" for line in lines)


COMMANDS = [
    Command("run", "run a sweep (default: the default declaration)",
            f"{PROG} run [--sweep NAME|PATH] [--smoke] [--dry-run] [launch.py flags below]",
            _examples("run                                   # smear, tag, adapter x 2 seeds, ~3 min on 2 CPUs",
                      "run --smoke                           # every method, tiny budget",
                      "run --sweep t5-glue-smoke --smoke --name t5-try",
                      "run --dry-run --sweep resnet-domainnet   # validate and list the trials, start nothing",
                      "run --verbose                         # with Ray Tune's own trial tables")
            + "\nsame as: python service/launch.py [FLAGS]\n",
            _launch([])),
    Command("resume", "continue a sweep whose driver died (same --storage)",
            f"{PROG} resume NAME [--storage DIR] [--smoke] [launch.py flags below]",
            _examples("resume default-20261201-101500",
                      "resume t5-try --sweep t5-glue-smoke --smoke --storage /mnt/shared/results")
            + "\nsame as: python service/launch.py --resume --name NAME [FLAGS]\n"
              "Use the flags the sweep printed when it started (its 'continue with:' line).\n",
            _launch(["--resume"], positional="--name")),
    Command("sync", "send the tracking server what it lacks of a sweep's record (after exit 4)",
            f"{PROG} sync NAME [--storage DIR] [--tracking-uri URI]",
            _examples("sync default-20261201-101500",
                      "sync t5-try --storage /mnt/shared/results --tracking-uri http://head:5000")
            + "\nsame as: python service/launch.py --sync --name NAME [FLAGS]\n"
              "The sweep printed this command when it ended with writes unsent; a second run sends nothing.\n",
            _launch(["--sync"], positional="--name")),
    Command("extend", "add seeds to a finished sweep (same parent run)",
            f"{PROG} extend NAME --seeds S[,S...] [--sweep NAME|PATH] [launch.py flags below]",
            _examples("extend default-20261201-101500 --seeds 2,3",
                      "extend t5-try --seeds 3 --sweep t5-glue-smoke --smoke")
            + "\nsame as: python service/launch.py --extend --name NAME --seeds S [FLAGS]\n",
            _launch(["--extend"], positional="--name")),
    Command("estimate", "projected device-hours and cost of a sweep (calibrates, starts nothing)",
            f"{PROG} estimate [--sweep NAME|PATH] [--price-per-gpu-hour USD] [launch.py flags below]",
            _examples("estimate --sweep resnet-domainnet --price-per-gpu-hour 1.01",
                      "estimate --sweep t5-glue --calibration-steps 2 --calibration-batch 8")
            + "\nsame as: python service/launch.py --dry-run --estimate [FLAGS]\n",
            _launch(["--dry-run", "--estimate"])),
    Command("report", "write the report of a finished sweep (from MLflow)",
            f"{PROG} report NAME [--tracking-uri URI] [--storage DIR] [report flags below]",
            _examples("report default-20261201-101500",
                      "report t5-try --ci bootstrap --reference adapter --storage /mnt/shared/results")
            + "\nsame as: python -m service.report NAME [FLAGS]\n",
            _report),
    Command("data prepare", "write a pre-resized copy of a DomainNet root (faster trials)",
            f"{PROG} data prepare SRC DST [--short-side 256] [--quality 90] [--workers N]",
            _examples("data prepare /data/domainnet /data/domainnet-256",
                      "data prepare /data/domainnet /data/domainnet-320 --short-side 320 --workers 8")
            + "\nsame as: python -m smear.data.prepare SRC DST [FLAGS]\n",
            _prepare),
    Command("data check", "check a sweep's data: every split line, path, label, and every image decoded",
            f"{PROG} data check [ROOT] [--sweep NAME|PATH] [launch.py flags below]",
            _examples("data check /data/domainnet --sweep resnet-domainnet",
                      "data check --sweep default            # the offline stand-in (generated if missing)")
            + "\nsame as: python service/launch.py --dry-run --check-images [--data-root ROOT] [FLAGS]\n",
            _launch(["--dry-run", "--check-images"], positional="--data-root")),
]
BY_NAME = {c.name: c for c in COMMANDS}


def overview() -> str:
    """smear-sweep --help."""
    width = max(len(c.name) for c in COMMANDS)
    rows = "".join(f"  {c.name:<{width}}  {c.summary}\n" for c in COMMANDS)
    return (f"usage: {PROG} COMMAND [ARGS]   ({PROG} COMMAND --help: its flags and examples)\n\n"
            f"Sweeps of mixture-of-experts routing methods on Ray Tune, tracked in MLflow.\n\ncommands:\n{rows}\n"
            + _examples("run", "run --sweep t5-glue-smoke --smoke", "resume default-20261201-101500",
                        "report default-20261201-101500", "estimate --sweep resnet-domainnet"))


def _refuse(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(overview(), end="")
        return 0
    words = list(dict.fromkeys(c.name.split()[0] for c in COMMANDS))
    if not argv:
        return _refuse(f"a command is needed; valid: {', '.join(words)} ({PROG} --help: what each does)")
    group = [c.name for c in COMMANDS if c.name.startswith(f"{argv[0]} ")]
    if group:  # "data": a second word names the command
        if argv[1:2] in (["-h"], ["--help"]):
            print(overview(), end="")
            return 0
        name, rest = " ".join(argv[:2]), argv[2:]
        if len(argv) < 2:
            return _refuse(f"{argv[0]!r} needs a command; valid: {', '.join(group)}")
        if name not in BY_NAME:
            return _refuse(f"unknown command {name!r}; valid: {', '.join(group)}")
    else:
        name, rest = argv[0], argv[1:]
        if name not in BY_NAME:
            return _refuse(f"unknown command {name!r}; valid: {', '.join(words)}")
    cmd = BY_NAME[name]
    return cmd.run(rest, cmd.usage, cmd.examples)


if __name__ == "__main__":
    raise SystemExit(main())
