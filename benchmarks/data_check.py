"""Time the up-front DomainNet check (smear.data.check.check_domainnet) on a generated root.

    python -m benchmarks.data_check [--images N] [--root DIR] [--decode header|full] [--workers W]
                                    [--cold] [--pil-sample M] [--keep] [--json PATH]

Generates a root in DomainNet's layout with N lines in all. The 12 split files get DomainNet's own
proportions: 586,575 lines over clipart, infograph, painting, quickdraw, real and sketch, train and test.
Each line points at its own small JPEG under ``<domain>/<class>/``, using 345 classes. The files are
real, not links. They are copies of 64 distinct noise JPEGs of ``--pixels`` (56x40 by default, about
2.5 KB each, 2.7 GB for 600k), and one in eight carries a 5 KB ICC profile, so that its header runs
past the first read. A root already generated for the
same N under DIR is reused. Without ``--root``, the root goes in a temporary folder and is deleted
afterwards unless ``--keep`` is given.

It then runs the check once and prints images/s and the projected time for 600,000 images.
``--cold`` first evicts the root's files from the page cache with posix_fadvise(DONTNEED): it touches
only these files, never the system's whole cache, so the files are read from disk. ``--pil-sample M``
also times PIL's own header check (``Image.open`` and reading size and mode) on M files, to compare.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from smear.data.check import check_domainnet

# DomainNet (cleaned) list sizes: domain -> (train, test)
DOMAINNET_LINES = {"clipart": (33525, 14604), "infograph": (36023, 15582), "painting": (50416, 21850),
                   "quickdraw": (120750, 51750), "real": (120906, 52041), "sketch": (48212, 20916)}
CLASSES = 345
MARKER = "BENCH_ROOT_OK"


def _jpegs(width: int, height: int, n: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=70, **({"icc_profile": bytes(5000)} if i % 8 == 0 else {}))
        out.append(buf.getvalue())
    return out


def generate(root: Path, n: int, width: int, height: int) -> float:
    """Write the root (skipped if already there for these n and pixels); returns seconds spent."""
    marker = root / MARKER
    if marker.exists() and marker.read_text().strip() == f"{n} {width}x{height}":
        return 0.0
    start = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    total = sum(a + b for a, b in DOMAINNET_LINES.values())
    pool = _jpegs(width, height)
    written = 0
    counts = [(d, s, c) for d, (tr, te) in DOMAINNET_LINES.items() for s, c in (("train", tr), ("test", te))]
    for li, (domain, split, count) in enumerate(counts):
        k = n - written if li == len(counts) - 1 else round(n * count / total)
        lines = []
        for i in range(k):
            c = i * CLASSES // k                      # sorted by class, like the official lists
            rel = f"{domain}/class_{c:03d}/{domain}_{c:03d}_{split}_{i:06d}.jpg"
            lines.append(f"{rel} {c}\n")
            path = root / rel
            if i == 0 or c != (i - 1) * CLASSES // k:
                path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, pool[(written + i) % len(pool)])
            os.close(fd)
        (root / f"{domain}_{split}.txt").write_text("".join(lines))
        written += k
    marker.write_text(f"{n} {width}x{height}\n")
    return time.perf_counter() - start


def evict(root: Path) -> float:
    """Drop the root's files from the page cache (these files only); returns seconds spent."""
    start = time.perf_counter()
    os.sync()
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    return time.perf_counter() - start


def mean_file_kb(root: Path, m: int = 2000) -> float:
    """Mean size of the first m files of clipart_train.txt, in KB."""
    lines = (root / "clipart_train.txt").read_text().splitlines()[:m]
    return sum((root / line.rsplit(None, 1)[0]).stat().st_size for line in lines) / len(lines) / 1024


def pil_header_rate(root: Path, m: int) -> float:
    """Images/s of PIL's own header check (open, size, mode) on the first m files of the lists."""
    paths = []
    for f in sorted(root.glob("*_train.txt")):
        paths += [str(root / line.rsplit(None, 1)[0]) for line in f.read_text().splitlines()[:m - len(paths)]]
    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im.size, im.mode  # noqa: B018
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600_000, help="lines (= image files) in all (default 600000)")
    ap.add_argument("--pixels", default="56x40", help="WxH of the noise JPEGs (56x40: ~2.5 KB; 200x150: ~27 KB)")
    ap.add_argument("--root", type=Path, help="where to generate (reused if already generated for --images)")
    ap.add_argument("--decode", choices=("header", "full"), default="header")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="evict the root's files from the page cache first")
    ap.add_argument("--pil-sample", type=int, default=0, help="also time PIL's header check on this many files")
    ap.add_argument("--keep", action="store_true", help="keep a temporary root")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    temporary = args.root is None
    root = args.root or Path(tempfile.mkdtemp(prefix="smear-data-check-")) / "domainnet"
    try:
        width, height = (int(v) for v in args.pixels.split("x"))
        gen_s = generate(root, args.images, width, height)
        print(f"root {root}: {args.images} lines, generated in {gen_s:.1f} s" if gen_s else f"root {root}: reused")
        evict_s = evict(root) if args.cold else 0.0
        if args.cold:
            print(f"evicted from the page cache in {evict_s:.1f} s")
        load = os.getloadavg()[0]
        summary = check_domainnet(root, tuple(DOMAINNET_LINES), decode=args.decode, workers=args.workers)
        rate = summary.images / summary.seconds
        result = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} nproc={os.cpu_count()} {platform.processor() or platform.machine()}",
            "python": platform.python_version(), "pillow": Image.__version__,
            "images": summary.images, "pixels": args.pixels,
            "mean_file_kb": round(mean_file_kb(root), 1),
            "decode": args.decode, "workers": args.workers, "cold": args.cold,
            "seconds": round(summary.seconds, 2), "images_per_s": round(rate),
            "projected_s_600k": round(600_000 / rate, 1), "formats": summary.formats,
            "num_classes": summary.num_classes, "load_avg_1min_before": load,
        }
        print(f"check_domainnet(decode={args.decode!r}, workers={args.workers}{', cold cache' if args.cold else ''}): "
              f"{summary.images} images in {summary.seconds:.2f} s = {rate:,.0f} images/s; "
              f"projected for 600,000 images: {600_000 / rate:.1f} s")
        if args.pil_sample:
            pil = pil_header_rate(root, args.pil_sample)
            result["pil_header_images_per_s"] = round(pil)
            print(f"PIL Image.open + size/mode on {args.pil_sample} files: {pil:,.0f} images/s; "
                  f"projected for 600,000 images: {600_000 / pil:.1f} s")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        if temporary and not args.keep:
            shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
