"""Write a pre-resized copy of a DomainNet root: the same layout and split files, smaller JPEGs.

    python -m smear.data.prepare SRC DST [--short-side 256] [--quality 90] [--workers N]

One-time and optional: a trial decodes a 256-pixel JPEG several times faster than DomainNet's originals
(BENCHMARKS.md, "DomainNet data path"), and the loader reads either root the same way. Training crops then
come from the reduced image: see docs/fidelity.md.

- SRC must pass the data check (``smear.data.check``, image headers) over every domain whose two split
  files it holds; DST must not exist, or be an empty folder. Otherwise: a one-line error, exit code 2,
  nothing written.
- Each image listed in SRC's split files becomes RGB as the loader sees it (``images.to_rgb``: alpha on
  white, 16-bit grey scaled), is scaled (Lanczos) so that its short side is ``--short-side`` (never
  enlarged) and written as a JPEG. A JPEG already small enough that torchvision decodes as is is copied
  byte for byte. A listed path that does not end in .jpg / .jpeg gets ``.jpg`` appended, in the file and in
  the split files; labels and line order are kept.
- The copy is built in a temporary folder next to DST and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from smear.data.domainnet import DOMAINS, DataError, parse_list
from smear.data.images import plain_format, to_rgb

_JPEG_SUFFIXES = (".jpg", ".jpeg")


def target_path(rel: str) -> str:
    """Where a listed image goes in the copy: the same path, ``.jpg`` appended unless it is one already."""
    return rel if rel.lower().endswith(_JPEG_SUFFIXES) else rel + ".jpg"


def shrink(src: str, dst: str, short_side: int, quality: int) -> bool:
    """Write ``src`` as an RGB JPEG whose short side is at most ``short_side``; True if it was resized."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f:
        head = f.read()
    with Image.open(src) as im:
        w, h = im.size
        scale = short_side / min(w, h)
        if scale >= 1 and plain_format(head) == "JPEG":
            shutil.copyfile(src, dst)
            return False
        size = (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else (w, h)
        if scale < 1 and im.format == "JPEG":
            im.draft("RGB", size)  # libjpeg's DCT scaling: decode at the smallest 1/2^k size still >= size
        rgb = to_rgb(im)
    if rgb.size != size:
        rgb = rgb.resize(size, Image.LANCZOS)
    rgb.save(dst, "JPEG", quality=quality)
    return scale < 1


def _shrink_all(pairs: list[tuple[str, str]], short_side: int, quality: int) -> int:
    """A process-pool work unit: :func:`shrink` each (src, dst); how many were resized."""
    resized = 0
    for s, d in pairs:
        try:
            resized += shrink(s, d, short_side, quality)
        except Exception as e:  # noqa: BLE001 - a file the header check passed but that does not decode
            detail = " ".join(str(e).split()) or "no message"
            raise DataError(f"image {s!r} cannot be converted ({type(e).__name__}: {detail})") from None
    return resized


def _domains(src: Path) -> list[str]:
    return [d for d in DOMAINS if (src / f"{d}_train.txt").is_file() and (src / f"{d}_test.txt").is_file()]


def check_arguments(src: Path, dst: Path, workers: int = 1) -> list[str]:
    """The domains to copy; a one-line ``DataError`` for a bad SRC or DST (nothing written yet)."""
    from smear.data.check import check_domainnet

    if not src.is_dir():
        raise DataError(f"SRC {str(src)!r} does not exist or is not a directory")
    domains = _domains(src)
    if not domains:
        raise DataError(f"SRC {str(src)!r} holds no <domain>_train.txt and <domain>_test.txt pair; "
                        f"valid domains: {', '.join(DOMAINS)}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError(f"DST {str(dst)!r} exists and is not an empty directory; give a new folder")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise DataError(f"DST {str(dst)!r} is inside SRC {str(src)!r}; give a folder outside it")
    parent = dst.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise DataError(f"DST {str(dst)!r} cannot be created: {str(parent)!r} is not writable")
    check_domainnet(src, domains, workers=workers)  # every line, label and image header: the launcher's check
    return domains


def prepare(src: str | Path, dst: str | Path, *, short_side: int = 256, quality: int = 90,
            workers: int | None = None) -> tuple[int, int]:
    """Write the copy (see the module doc); (images written, of which resized). Raises ``DataError``."""
    src, dst = Path(src), Path(dst)
    workers = max(1, workers or os.cpu_count() or 1)
    domains = check_arguments(src, dst, workers)
    parent = dst.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=parent))
    try:
        images: dict[str, str] = {}  # relative source path -> relative target path, each image once
        for d in domains:
            for which in ("train", "test"):
                name = f"{d}_{which}.txt"
                entries, _ = parse_list((src / name).read_bytes(), name)  # the check passed: no problems
                (tmp / name).write_text("".join(f"{target_path(p)} {label}\n" for _, p, label in entries))
                images.update((p, target_path(p)) for _, p, _ in entries)
        pairs = [(str(src / s), str(tmp / t)) for s, t in images.items()]
        size = max(1, min(256, -(-len(pairs) // workers)))
        chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
        if workers == 1 or len(chunks) <= 1:
            resized = sum(_shrink_all(c, short_side, quality) for c in chunks)
        else:  # spawn, as the data check: the caller may hold threads
            with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn")) as pool:
                resized = sum(pool.map(_shrink_all, chunks, [short_side] * len(chunks), [quality] * len(chunks)))
        if dst.exists():
            dst.rmdir()  # the empty folder the user gave
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(pairs), resized


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None, *, usage: str | None = None, epilog: str | None = None) -> int:
    """The command line (also ``smear-sweep data prepare``, whose --help passes its own ``usage`` and ``epilog``)."""
    ap = _Parser(prog="python -m smear.data.prepare", description=__doc__.splitlines()[0], usage=usage,
                 epilog=epilog or "example:\n  python -m smear.data.prepare /data/domainnet /data/domainnet-256\n",
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a DomainNet root (official layout)")
    ap.add_argument("dst", help="the copy to write (a new or empty folder)")
    ap.add_argument("--short-side", type=int, default=256, help="short side of the written images (default 256)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality, 1-95 (default 90)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: every CPU)")
    args = ap.parse_args(argv)
    for flag, value, low, high in (("--short-side", args.short_side, 8, None), ("--quality", args.quality, 1, 95),
                                   ("--workers", args.workers, 1, None)):
        if value is not None and (value < low or (high is not None and value > high)):
            ap.exit(2, f"{ap.prog}: error: {flag}={value} is out of range; valid: {low} to {high or 'any'}\n")
    try:
        n, resized = prepare(args.src, args.dst, short_side=args.short_side, quality=args.quality, workers=args.workers)
    except DataError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(f"wrote {n} images to {args.dst} ({resized} resized to short side {args.short_side})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
