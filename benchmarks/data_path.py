"""Images/s per core of the DomainNet training data path: PIL (as before issue 13) against torchvision.

    python -m benchmarks.data_path [--images N] [--min-side A] [--max-side B] [--repeats R] [--json PATH]

Generates a root in DomainNet's layout (one domain, ``real``) with N JPEGs of a random size between A and B
pixels a side (DomainNet's originals are a few hundred pixels), quality 90, smooth structure plus noise,
and its pre-resized copy (``python -m smear.data.prepare``, short side 256). Then, in this one process
with one torch thread, it times the training transform (RandomResizedCrop(224) + flip + ImageNet
normalisation) of every image, batched by 128, for:

- ``pil``: the path before issue 13: PIL decode, ``to_rgb``, torchvision's PIL transforms (crop, flip,
  ToTensor, Normalize), torch's default collate;
- ``workers``: ``DomainNetDataset(decode_on="workers")`` (``decode_jpeg`` and the crop on uint8), its
  collate, and ``to_model_input`` on the CPU (the flip and normalisation a GPU trial does on the GPU,
  counted here);
- ``device``: ``decode_on="device"``: the reader returns bytes, and ``to_model_input`` decodes the batch
  with one ``decode_jpeg`` call and crops (on the CPU here; on a GPU this work leaves the CPU);
- the same paths on the pre-resized copy (``+256``).

Time is this process's CPU time (``time.process_time``): images per CPU-second is images/s per core, and
it holds on a machine shared with other work, where wall time would not. Each repeat runs every variant
once, interleaved; the best repeat of each is reported, with its ratio to ``pil`` on the original images.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smear.data import pipeline
from smear.data.domainnet import DomainNetDataset
from smear.data.images import to_rgb
from smear.data.prepare import prepare

BATCH, RES = 128, 224


def generate(root: Path, n: int, lo: int, hi: int) -> float:
    """``n`` JPEGs under ``root/real/c<k>/``, listed in real_train.txt (and 20 in real_test.txt); mean KB."""
    rng = np.random.default_rng(0)
    lines, sizes = [], []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
        coarse = rng.normal(size=(h // 16 + 1, w // 16 + 1, 3))
        img = np.kron(coarse, np.ones((16, 16, 1)))[:h, :w] * 50 + 128 + rng.normal(scale=12, size=(h, w, 3))
        rel = f"real/c{i % 10}/img{i:05d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        (root / rel).write_bytes(buf.getvalue())
        sizes.append(len(buf.getvalue()))
        lines.append(f"{rel} {i % 10}\n")
    (root / "real_train.txt").write_text("".join(lines))
    (root / "real_test.txt").write_text("".join(lines[:20]))   # every class: the check counts on it
    return float(np.mean(sizes)) / 1e3


def _batches(n: int) -> list[range]:
    return [range(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]


def run_pil(root: Path, files: list[str]) -> int:
    """The path as it was: PIL + to_rgb + torchvision's PIL transforms, default collate."""
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(RES), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD)])
    for batch in _batches(len(files)):
        items = []
        for i in batch:
            with Image.open(root / files[i]) as im:
                items.append(tf(to_rgb(im)))
        x = torch.utils.data.default_collate(items)
        assert x.shape[1:] == (3, RES, RES)
    return len(files)


def run_new(ds: DomainNetDataset, draws: list[int]) -> int:
    """The dataset's items, its collate and the device-side finish, all in this process on the CPU."""
    coll = pipeline.collate if ds.decode_on == "workers" else pipeline.collate_raw
    for batch in _batches(len(ds)):
        images, _, _, _, d = coll([ds[(i, draws[i])] for i in batch])
        x = pipeline.to_model_input(images, d, "cpu", RES, "paper")
        assert x.shape[1:] == (3, RES, RES) and x.dtype == torch.float32
    return len(ds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--min-side", type=int, default=400)
    ap.add_argument("--max-side", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src, small = Path(tmp) / "src", Path(tmp) / "small"
        kb = generate(src, args.images, args.min_side, args.max_side)
        t0 = time.perf_counter()
        prepare(src, small, workers=1)
        prep_s = time.perf_counter() - t0
        print(f"{args.images} JPEGs of {args.min_side}-{args.max_side} px, mean {kb:.0f} KB; "
              f"pre-resized copy written in {prep_s:.1f} s ({args.images / prep_s:.0f} images/s, 1 process)")
        datasets = {f"{name}{tag}": DomainNetDataset(root, ["real"], "train", resolution=RES, augment="paper",
                                                     decode_on=name)
                    for tag, root in (("", src), ("+256", small)) for name in ("workers", "device")}
        n = len(datasets["workers"])
        sampler = pipeline.DrawSampler(range(n), n, seed=0)
        draws = [d for _, d in sampler]
        files = {"": [r.path for r in datasets["workers"].records], "+256": [r.path for r in datasets["workers+256"].records]}
        variants = {"pil": lambda: run_pil(src, files[""]), "pil+256": lambda: run_pil(small, files["+256"]),
                    **{k: (lambda ds=ds: run_new(ds, draws)) for k, ds in datasets.items()}}
        for f in variants.values():   # warm-up: imports, first-call allocations, the page cache
            f()
        best = {k: float("inf") for k in variants}
        for _ in range(args.repeats):
            for k, f in variants.items():
                t = time.process_time()
                count = f()
                best[k] = min(best[k], time.process_time() - t)
    rates = {k: count / s for k, s in best.items()}
    print(f"\n{'path':<14}{'images/s (1 core)':>20}{'x pil':>8}")
    for k, r in rates.items():
        print(f"{k:<14}{r:>20.0f}{r / rates['pil']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": args.images, "sides": [args.min_side, args.max_side],
                                               "mean_kb": kb, "images_per_s": rates, "machine": platform.processor(),
                                               "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
