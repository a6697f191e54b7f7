"""The image data path: file bytes -> uint8 pixels -> crop -> (on the model's device) flip + normalise.

Two places can decode (``decode_on``):
- ``workers``: the loader workers read each file, decode it with torchvision (``decode_jpeg`` /
  ``decode_image``; PIL and ``smear.data.images.to_rgb`` for files those would not convert the same, see
  ``plain_format``) and crop or resize it on uint8 (:func:`resize_crop`). A batch is one uint8 tensor.
- ``device``: the workers only read bytes (a JPEG) or decode the rare other file to full pixels; the model's
  device decodes the batch's JPEGs in one call (nvJPEG on a GPU, :func:`decode_batch`), then crops.
Either way :func:`to_model_input` ends on the device: horizontal flip, float, ImageNet normalisation.

The training augmentation is the paper's (methods.md section 2): RandomResizedCrop(resolution) with the
default scale (0.08, 1) and ratio (3/4, 4/3), then a horizontal flip with probability 1/2; evaluation is
Resize(256/224 x resolution) + CenterCrop(resolution). Resizes are antialiased bilinear.

Randomness: each example of a training epoch gets a *draw* (a non-negative int63), a function of the trial
seed, the epoch and the example's index only (:class:`DrawSampler`): its lowest bit is the flip, the rest
seeds its crop (:func:`crop_box`). So the augmentation depends neither on the number of loader workers nor
on where decoding runs, and a resumed trial sees the same crops. ``NO_DRAW`` (-1) means "deterministic
transform" (evaluation, or ``augment: none``).
"""
from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Sampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from smear.data.images import plain_format, to_rgb

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults, which the paper uses
NO_DRAW = -1
DRAW_HIGH = 2 ** 62      # draws are uniform in [0, DRAW_HIGH)


# ----------------------------------------------------------------------------------------- worker side

def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor (what ``decode_jpeg`` takes)."""
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def decode(data: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 RGB of an image file's bytes, equal to ``to_rgb`` of the file up to the JPEG decoder.

    Plain JPEGs go through ``decode_jpeg``, plain PNGs through ``decode_image``; everything else, and a JPEG
    libjpeg-turbo refuses, through PIL and ``to_rgb`` (alpha on white, 16-bit grey scaled, grey to RGB).
    """
    fmt = plain_format(data.numpy())
    if fmt == "JPEG":
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError:  # e.g. a damaged file PIL still reads: PIL has the last word, as in the data check
            pass
    elif fmt == "PNG":
        return decode_image(data, mode=ImageReadMode.RGB)
    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        rgb = np.asarray(to_rgb(im))                                                    # (H, W, 3)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def crop_box(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of RandomResizedCrop: an area fraction in CROP_SCALE and a log-uniform aspect ratio
    in CROP_RATIO, ten tries; then the centred crop of the whole image with the ratio clamped to the range."""
    area = height * width
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(lo, hi))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize_crop(img: torch.Tensor, draw: int, resolution: int, augment: str) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, resolution, resolution) uint8, on the image's device.

    A draw (>= 0): the random resized crop it seeds. NO_DRAW: Resize(256/224 x) + CenterCrop (``paper``) or a
    square resize (``none``).
    """
    r = resolution
    if draw >= 0:
        top, left, h, w = crop_box(img.shape[-2], img.shape[-1], random.Random(draw >> 1))
        return TF.resized_crop(img, top, left, h, w, [r, r], antialias=True)
    if augment == "paper":
        return TF.center_crop(TF.resize(img, [round(r * 256 / 224)], antialias=True), [r, r])
    return TF.resize(img, [r, r], antialias=True)


def collate(items: Sequence[tuple[torch.Tensor, int, int, int, int]]) -> tuple:
    """Items ``(crop, label, domain, example id, draw)`` (decoded and cropped by the workers) ->
    ``(images (b, 3, r, r) uint8, labels, domains, ids, draws)``."""
    return (torch.stack([it[0] for it in items]), *_columns(items))


def collate_raw(items: Sequence[tuple[torch.Tensor, int, int, int, int]]) -> tuple:
    """Items ``(bytes or full pixels, label, ...)`` (decoding on the device) -> ``(list of the per-item
    tensors, labels, domains, ids, draws)``, for :func:`to_model_input` to decode and crop on the device."""
    return ([it[0] for it in items], *_columns(items))


def _columns(items: Sequence[tuple]) -> tuple[torch.Tensor, ...]:
    """(labels, domains, example ids, draws), each (b,) int64."""
    return tuple(torch.tensor([it[k] for it in items], dtype=torch.long) for k in range(1, 5))


# ----------------------------------------------------------------------------------------- device side

def decode_batch(items: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Per item a (3, H, W) uint8 tensor on ``device``: the byte tensors (plain JPEGs) decoded in one batched
    ``decode_jpeg`` call there (nvJPEG on a GPU), pixel tensors (files the workers decoded) moved."""
    out: list[torch.Tensor | None] = [x.to(device, non_blocking=True) if x.dim() == 3 else None for x in items]
    raw = [i for i, x in enumerate(items) if x.dim() == 1]
    if raw:
        try:
            decoded = decode_jpeg([items[i] for i in raw], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one file the batched decoder refuses: each on the CPU, PIL as the last word
            decoded = [decode(items[i]).to(device) for i in raw]
        for i, x in zip(raw, decoded):
            out[i] = x
    return out  # type: ignore[return-value]


def to_model_input(images: torch.Tensor | list[torch.Tensor], draws: torch.Tensor, device: torch.device | str,
                   resolution: int, augment: str, memory_format: torch.memory_format = torch.preserve_format,
                   ) -> torch.Tensor:
    """A collated batch's images -> (b, 3, r, r) float32 on ``device``, flipped where the draw says, normalised.

    ``images``: (b, 3, r, r) uint8 (cropped by the workers) or a list of bytes / full pixels (decoded and
    cropped here, :func:`decode_batch` and :func:`resize_crop`). ``draws``: (b,) int64 on the host.
    """
    if isinstance(images, list):
        pixels = decode_batch(images, device)
        images = torch.stack([resize_crop(p, d, resolution, augment) for p, d in zip(pixels, draws.tolist())])
    x = images.to(device, non_blocking=True)                                           # (b, 3, r, r) uint8
    d = draws.to(device, non_blocking=True)
    flip = ((d >= 0) & (d % 2 == 1)).view(-1, 1, 1, 1)                                 # (b, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    # ToTensor + Normalize: (x / 255 - mean) / std, as one scale and one shift, in place (one float buffer)
    x = x.float().mul_(1 / (255 * std)).add_(-mean / std)
    return x.contiguous(memory_format=memory_format)


# ------------------------------------------------------------------------------------------------ draws

class DrawSampler(Sampler):
    """Pairs each index of ``sampler`` with its draw: ``(index, draw)``, for datasets with ``seeded_draws``.

    The draws of an epoch are one vector over the dataset's indices from NumPy's generator seeded with
    (seed, epoch): an example's draw depends on the trial seed, the epoch and its index, not on the order,
    the loader workers, or where a resumed epoch starts. ``set_epoch`` is passed on to ``sampler``.
    """

    def __init__(self, sampler: Sampler, size: int, seed: int):
        self.sampler, self.size, self.seed = sampler, size, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self._draws = np.random.default_rng((self.seed, epoch)).integers(0, DRAW_HIGH, self.size)   # (size,) int64

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draws = self._draws
        for i in self.sampler:
            yield i, int(draws[i])

    def __len__(self) -> int:
        return len(self.sampler)
