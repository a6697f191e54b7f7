"""The one-line refusal of bad input, shared by the launcher's input boundary (``service/inputs.py``) and the
report's command line: ``<prog>: error: <where> <value>: <reason>; valid: <choices>`` on stderr, exit code 2.
Torch-free and light, so the report imports it too."""
from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2


def one_line(message: str) -> str:
    """A refusal is one line: line breaks inside a value are shown escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception in a few words: the first line of its message (at most ``limit`` characters), else its type."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def refuse(message: str, prog: str = "launch.py") -> int:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def internal_error(error: BaseException, reading: str, prog: str = "launch.py") -> int:
    """An exception no check expected while reading ``reading``: a bug of the boundary, named in one line."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return refuse(f"internal error while reading {reading}: {type(error).__name__}: {first}; valid: an input of the "
                  "kinds above (this is a bug of the input checks, please report it)", prog)
