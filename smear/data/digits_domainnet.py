"""Write a small dataset in DomainNet's official layout from scikit-learn's bundled handwritten digits.

Layout (same as DomainNet): ``ROOT/<domain>/<class>/<file>.png`` and ``ROOT/<domain>_train.txt`` /
``ROOT/<domain>_test.txt`` with lines ``<domain>/<class>/<file>.png <label>``. The 1,797 8x8 digits are
shuffled once and dealt into six disjoint parts, one per DomainNet domain name; each domain renders its
digits with a deterministic, visibly different style (so tag routing has real domains to route on).
Within a domain 75% of images are listed as the official train list and 25% as the test list.

    python -m smear.data.digits_domainnet ROOT [--size 32]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MARKER = "DIGITS_DOMAINNET_OK"  # written last: a root without it is incomplete


def _digit(img8: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """8x8 digit in [0, 16] -> (size, size) float in [0, 1], with a small random rotation and shift."""
    im = Image.fromarray((img8 / 16.0 * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    im = im.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR,
                   translate=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))))
    return np.asarray(im, dtype=np.float32) / 255.0


def _hue(rng: np.random.Generator) -> np.ndarray:
    return np.array(rng.choice([[230, 40, 40], [40, 120, 230], [30, 170, 60], [240, 160, 20], [150, 50, 200]]), np.float32) / 255


def render(domain: str, d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One domain's style: d (h, w) in [0, 1] -> RGB uint8 (h, w, 3)."""
    h, w = d.shape
    a = d[..., None]
    if domain == "real":          # grey digit on a dark, slightly noisy photo-like background
        bg = 0.15 + 0.05 * rng.standard_normal((h, w, 1))
        out = bg * (1 - a) + (0.7 + 0.3 * a) * a
        out = np.repeat(out, 3, -1)
    elif domain == "clipart":     # flat saturated colour on white
        out = (1 - a) * 1.0 + a * _hue(rng)
    elif domain == "infograph":   # colour digit over a striped, coloured chart background
        stripes = ((np.arange(w)[None, :] // 4) % 2).astype(np.float32)[..., None]
        bg = 0.85 - 0.25 * stripes * _hue(rng)[None, None, :]
        out = bg * (1 - a) + a * 0.1
    elif domain == "painting":    # blurred, textured brush strokes on canvas colour
        blurred = np.asarray(Image.fromarray((d * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)), np.float32)[..., None] / 255
        canvas = np.array([0.93, 0.86, 0.7], np.float32) + 0.08 * rng.standard_normal((h, w, 3))
        out = canvas * (1 - blurred) + blurred * _hue(rng) * 0.8
    elif domain == "quickdraw":   # thin binary black stroke on white
        edge = d > 0.5
        out = np.repeat(np.where(edge, 0.0, 1.0)[..., None], 3, -1)
    elif domain == "sketch":      # pencil outline: gradient magnitude, dark on light grey
        gy, gx = np.gradient(d)
        mag = np.clip(np.hypot(gx, gy) * 4, 0, 1)[..., None]
        out = 0.9 * (1 - mag) + 0.2 * mag + 0.03 * rng.standard_normal((h, w, 1))
        out = np.repeat(out, 3, -1)
    else:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def is_complete(root: str | os.PathLike) -> bool:
    return (Path(root) / MARKER).exists()


def write_digits_domainnet(root: str | os.PathLike, *, size: int = 32, test_fraction: float = 0.25) -> Path:
    """Write the dataset under ``root`` (atomically: built in a temp folder, then renamed). Idempotent."""
    from sklearn.datasets import load_digits

    root = Path(root).resolve()
    if is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-domainnet-", dir=root.parent))
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    parts = np.array_split(order, len(DOMAINS))
    for di, (domain, idx) in enumerate(zip(DOMAINS, parts)):
        rng = np.random.default_rng(1000 + di)
        lines = []
        for i in idx:
            label = int(digits.target[i])
            rel = f"{domain}/{CLASS_NAMES[label]}/{domain}_{i:04d}.png"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render(domain, _digit(digits.images[i], size, rng), rng)).save(tmp / rel)
            lines.append(f"{rel} {label}")
        perm = np.random.default_rng(2000 + di).permutation(len(lines))
        n_test = int(round(len(lines) * test_fraction))
        test, train = sorted(perm[:n_test]), sorted(perm[n_test:])
        (tmp / f"{domain}_train.txt").write_text("".join(lines[j] + "\n" for j in train))
        (tmp / f"{domain}_test.txt").write_text("".join(lines[j] + "\n" for j in test))
    (tmp / MARKER).write_text(f"size={size}\n")
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    print(write_digits_domainnet(args.root, size=args.size))


if __name__ == "__main__":
    main()
