"""The DomainNet data path (smear.data.pipeline): worker decode, device-side finish, draws, loaders, and the
pre-resized copy (smear.data.prepare), on tiny generated roots."""
from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF1
from PIL import Image
from torchvision import transforms as T

from smear.data import pipeline
from smear.data.check import check_domainnet
from smear.data.domainnet import DomainNetDataset
from smear.data.images import plain_format, to_rgb
from smear.data.prepare import main as prepare_main
from tests.helpers import REPO

LEVEL = 1 / 255 / min(pipeline.IMAGENET_STD)   # one 8-bit level, normalised: the resize rounding difference


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 with smooth structure and noise, like a photo (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(h // 8 + 1, w // 8 + 1, 3))
    img = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w] * 50 + 128 + rng.normal(scale=10, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


# --- worker decode: torchvision for plain files, PIL + to_rgb for the rest ----------------------------------

def _grey16() -> Image.Image:
    return Image.fromarray(np.array([[0, 257 * 100], [65535, 30000]], np.uint16))          # mode I;16


def _palette_transparent() -> Image.Image:
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    im.putdata([0, 1])
    im.info["transparency"] = 0
    return im


CASES = {  # name: (image, format, save options, the fast decoder that takes it or None for PIL)
    "jpeg_rgb": (lambda: Image.fromarray(_photo(40, 56)), "JPEG", {"quality": 90}, "JPEG"),
    "jpeg_grey": (lambda: Image.fromarray(_photo(40, 56)).convert("L"), "JPEG", {}, "JPEG"),
    "jpeg_progressive": (lambda: Image.fromarray(_photo(40, 56)), "JPEG", {"progressive": True}, "JPEG"),
    "jpeg_cmyk": (lambda: Image.fromarray(_photo(40, 56)).convert("CMYK"), "JPEG", {}, None),
    "png_rgb": (lambda: Image.fromarray(_photo(9, 7)), "PNG", {}, "PNG"),
    "png_grey": (lambda: Image.fromarray(_photo(9, 7)).convert("L"), "PNG", {}, "PNG"),
    "png_palette": (lambda: Image.fromarray(_photo(9, 7)).convert("P"), "PNG", {}, "PNG"),
    "png_rgba": (lambda: Image.fromarray(np.dstack([_photo(9, 7), np.arange(63, dtype=np.uint8).reshape(9, 7) * 4]),
                                         "RGBA"), "PNG", {}, None),
    "png_la": (lambda: Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA"), "PNG", {}, None),
    "png_grey16": (_grey16, "PNG", {}, None),
    "png_palette_transparency": (_palette_transparent, "PNG", {"transparency": 0}, None),
    "png_rgb_trns": (lambda: Image.fromarray(_photo(4, 4)), "PNG", {"transparency": (0, 0, 0)}, None),
    "gif": (lambda: Image.fromarray(_photo(9, 7)).convert("P"), "GIF", {}, None),
}


@pytest.mark.parametrize("name", CASES)
def test_worker_decode_equals_to_rgb(name):
    make, fmt, opts, fast = CASES[name]
    data = _encode(make(), fmt, **opts)
    assert plain_format(data) == fast                       # which decoder takes it
    out = pipeline.decode(_tensor(data))
    with Image.open(io.BytesIO(data)) as im:
        ref = np.asarray(to_rgb(im))                        # the conversion the model has always seen
    assert out.dtype == torch.uint8 and out.shape == (3, *ref.shape[:2])
    np.testing.assert_array_equal(_hwc(out), ref)           # libjpeg-turbo on both sides: bit-equal


def test_the_conversions_that_pil_keeps_are_the_right_ones():
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [10, 200, 30, 255]]], np.uint8), "RGBA")
    assert _hwc(pipeline.decode(_tensor(_encode(rgba, "PNG")))).tolist() == [[[255, 255, 255], [10, 200, 30]]]
    grey = _hwc(pipeline.decode(_tensor(_encode(_grey16(), "PNG"))))
    assert grey[..., 0].tolist() == [[0, 100], [255, 117]] and (grey == grey[..., :1]).all()  # round(v / 257)
    pal = _hwc(pipeline.decode(_tensor(_encode(_palette_transparent(), "PNG", transparency=0))))
    assert pal.tolist() == [[[255, 255, 255], [200, 10, 10]]]


# --- the training and evaluation transforms against torchvision's PIL reference -----------------------------

def _reference(img: np.ndarray, draw: int, resolution: int) -> torch.Tensor:
    """What the path computed before issue 13 for this draw: torchvision's PIL transforms, float, normalised."""
    pil = Image.fromarray(img)
    if draw >= 0:
        box = pipeline.crop_box(img.shape[0], img.shape[1], random.Random(draw >> 1))
        pil = TF1.resized_crop(pil, *box, [resolution, resolution])
        pil = TF1.hflip(pil) if draw % 2 else pil
    else:
        pil = T.CenterCrop(resolution)(T.Resize(round(resolution * 256 / 224))(pil))
    return T.Normalize(pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD)(T.ToTensor()(pil))


def test_crop_flip_and_normalise_match_the_pil_reference():
    img = _photo(90, 130, seed=3)
    pixels = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    draws = [6, 7, 1234, 98_765, pipeline.NO_DRAW]                 # even: no flip, odd: flip, -1: evaluation
    crops = torch.stack([pipeline.resize_crop(pixels, d, 32, "paper") for d in draws])
    assert crops.dtype == torch.uint8 and crops.shape == (5, 3, 32, 32)
    out = pipeline.to_model_input(crops, torch.tensor(draws), "cpu", 32, "paper")
    ref = torch.stack([_reference(img, d, 32) for d in draws])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=LEVEL * 1.01, rtol=0)  # antialiased resizes round within a level
    assert (out - ref).abs().mean() < LEVEL / 20
    assert torch.equal(out, pipeline.to_model_input(crops, torch.tensor(draws), "cpu", 32, "paper"))  # deterministic


def test_device_finish_is_torchvision_normalise_and_flip():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 5, 4), dtype=torch.uint8, generator=gen)
    draws = torch.tensor([0, 1, 2, 3, -1, 2 ** 61 + 1])
    out = pipeline.to_model_input(images, draws, "cpu", 5, "none", torch.channels_last)
    norm = T.Normalize(pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD)
    ref = torch.stack([norm(TF1.hflip(x) if d >= 0 and d % 2 else x).clone() for x, d in
                       zip(images.float() / 255, draws.tolist())])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_crop_box_is_random_resized_crop():
    boxes = [pipeline.crop_box(300, 400, random.Random(s)) for s in range(2000)]
    assert boxes == [pipeline.crop_box(300, 400, random.Random(s)) for s in range(2000)]   # a seed is a seed
    assert len(set(boxes)) > 1900
    for top, left, h, w in boxes:
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        assert 0.08 * 0.97 <= h * w / 120_000 <= 1 and 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    area = np.array([h * w / 120_000 for _, _, h, w in boxes])
    torch.manual_seed(0)                                      # torchvision's own sampler, the same distribution
    ref = np.array([h * w / 120_000 for h, w in (T.RandomResizedCrop.get_params(torch.empty(1, 300, 400),
                                                  [0.08, 1.0], [3 / 4, 4 / 3])[2:] for _ in range(2000))])
    assert abs(area.mean() - ref.mean()) < 0.03 and abs(np.median(area) - np.median(ref)) < 0.04
    # no try fits (a 10 x 1000 strip): the centred crop of the whole strip with the ratio clamped to 4/3
    assert pipeline.crop_box(10, 1000, random.Random(0)) == (0, 493, 10, 13)


def test_draws_depend_on_the_seed_the_epoch_and_the_index_only():
    def draws(order, seed=0, epoch=0):
        s = pipeline.DrawSampler(order, 50, seed)
        s.set_epoch(epoch)
        return dict(iter(s))

    forward, backward = draws(range(50)), draws(range(49, -1, -1))
    assert forward == backward and sorted(forward) == list(range(50))         # the order does not matter
    assert forward != draws(range(50), epoch=1) and forward != draws(range(50), seed=1)
    assert forward == draws(range(50))
    assert all(0 <= d < pipeline.DRAW_HIGH for d in forward.values())
    flips = np.mean([d % 2 for d in draws(range(50), epoch=7).values()] + [d % 2 for d in backward.values()])
    assert 0.25 < flips < 0.75


# --- a root with JPEGs and PNGs: decoding in the workers or on the device ----------------------------------

@pytest.fixture
def mixed_root(tmp_path) -> Path:
    """Two domains; JPEGs of several sizes (one grey) and an RGBA PNG; every class in every list."""
    root = tmp_path / "root"
    files = {
        "clipart/c0/a.jpg": Image.fromarray(_photo(60, 80, 1)), "clipart/c1/b.jpg": Image.fromarray(_photo(40, 30, 2)),
        "clipart/c0/c.png": Image.fromarray(np.dstack([_photo(40, 40, 3), np.full((40, 40), 128, np.uint8)]), "RGBA"),
        "sketch/c1/d.jpg": Image.fromarray(_photo(64, 64, 4)).convert("L"),
        "sketch/c0/e.jpg": Image.fromarray(_photo(300, 280, 5)),
    }
    for rel, im in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel)
    lines = {d: [f"{rel} {rel.split('/')[1][1]}" for rel in files if rel.startswith(d)] for d in ("clipart", "sketch")}
    for d, ls in lines.items():
        for split in ("train", "test"):
            (root / f"{d}_{split}.txt").write_text("\n".join(ls) + "\n")
    return root


@pytest.mark.parametrize("split,augment", [("train", "paper"), ("test", "paper"), ("train", "none")])
def test_decoding_on_the_device_equals_decoding_in_the_workers(mixed_root, split, augment):
    """The bytes-reading worker path and the batched decode_jpeg of a list (device='cpu' here; nvJPEG on a GPU)."""
    ds = {on: DomainNetDataset(mixed_root, ["clipart", "sketch"], "test", resolution=24, augment=augment, decode_on=on)
          for on in ("workers", "device")}
    for d in ds.values():   # the tiny lists' train split (80%) would be 3 images: train on the test list's 5
        d.random = split == "train" and augment == "paper"
    keys = [(i, 1000 + 7 * i) for i in range(len(ds["workers"]))]
    raw = [ds["device"][k] for k in keys]
    assert [x[0].dim() for x in raw] == [1, 1, 3, 1, 1]         # JPEG bytes; the RGBA PNG decoded in the worker
    batches = {"workers": pipeline.collate([ds["workers"][k] for k in keys]), "device": pipeline.collate_raw(raw)}
    assert batches["workers"][0].dtype == torch.uint8 and batches["workers"][0].shape == (5, 3, 24, 24)
    assert isinstance(batches["device"][0], list)
    outs = [pipeline.to_model_input(b[0], b[4], "cpu", 24, augment) for b in batches.values()]
    assert torch.equal(outs[0], outs[1])
    for col in range(1, 5):
        assert torch.equal(batches["workers"][col], batches["device"][col])
    expect_random = split == "train" and augment == "paper"
    assert (batches["workers"][4] >= 0).all() == expect_random and (batches["workers"][4] < 0).all() != expect_random


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG); the CPU run is above")
def test_decoding_on_a_gpu_matches_the_workers(mixed_root):
    ds = {on: DomainNetDataset(mixed_root, ["clipart", "sketch"], "test", resolution=24, augment="paper", decode_on=on)
          for on in ("workers", "device")}
    keys = [(i, 1000 + 7 * i) for i in range(5)]
    cpu = pipeline.collate([ds["workers"][k] for k in keys])
    gpu = pipeline.collate_raw([ds["device"][k] for k in keys])
    out_cpu = pipeline.to_model_input(cpu[0], cpu[4], "cpu", 24, "paper")
    out_gpu = pipeline.to_model_input(gpu[0], gpu[4], "cuda", 24, "paper", torch.channels_last)
    assert out_gpu.is_cuda and out_gpu.is_contiguous(memory_format=torch.channels_last)
    # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a few levels; the crops are the same
    assert (out_gpu.cpu() - out_cpu).abs().mean() < 4 * LEVEL


def test_the_trial_loader_gives_the_same_batches_with_any_worker_count(digits_root):
    from trainables.settings import make_config
    from trainables.session import LocalSession
    from trainables.trial import make_loader as _loader, set_epoch as _set_epoch
    from trainables.settings.resnet_domainnet import ResNetDomainNet

    def epochs(workers: int) -> list[list[torch.Tensor]]:
        cfg = make_config({"batch_size": 16, "data": {"root": str(digits_root), "resolution": 16, "augment": "paper",
                                                      "domains": ["real"], "loader_workers": workers}})
        setting = ResNetDomainNet(cfg)
        loader = _loader(setting.dataset("train"), cfg, LocalSession(""), train=True, collate=setting.collate)
        assert loader.persistent_workers == (workers > 0) and loader.num_workers == workers
        out = []
        for epoch in (0, 1):
            _set_epoch(loader, epoch)
            out.append([torch.cat([setting.batch_to_model(b, "cpu").inputs["images"].flatten(), b[3].float()])
                        for _, b in zip(range(3), loader)])
        return out

    none, two = epochs(0), epochs(2)
    assert all(torch.equal(a, b) for e0, e1 in zip(none, two) for a, b in zip(e0, e1))
    assert not torch.equal(none[0][0], none[1][0])          # another epoch: another order and other crops


def test_loader_workers_default_is_the_trials_cpus_minus_one():
    import os

    from smear.configs import ConfigError
    from trainables.settings import make_config

    data = make_config({}).data
    assert data.loader_workers == -1                                        # DomainNet: auto
    assert (data.workers(4), data.workers(1), data.workers(0.5), data.workers(2.0)) == (3, 0, 0, 1)
    assert data.workers(None) == max(len(os.sched_getaffinity(0)) - 1, 0)   # a local run: this process's CPUs
    assert make_config({"data": {"loader_workers": 2}}).data.workers(16) == 2
    assert make_config({"setting": "t5_glue"}).data.loader_workers == 0
    with pytest.raises(ConfigError, match="loader_workers=-2 is out of range"):
        make_config({"data": {"loader_workers": -2}})
    with pytest.raises(ConfigError, match="decode_on"):
        make_config({"data": {"decode_on": "gpu"}})


# --- the pre-resized copy -------------------------------------------------------------------------------------

def test_prepare_writes_a_smaller_root_that_loads_and_passes_the_check(mixed_root, tmp_path):
    dst = tmp_path / "out" / "small"
    small = (mixed_root / "clipart/c1/b.jpg").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "smear.data.prepare", str(mixed_root), str(dst), "--short-side", "48",
                           "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 5 images to {dst} (3 resized to short side 48)"
    lines = (dst / "clipart_train.txt").read_text().splitlines()
    assert lines == ["clipart/c0/a.jpg 0", "clipart/c1/b.jpg 1", "clipart/c0/c.png.jpg 0"]
    with Image.open(dst / "sketch/c0/e.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 51)        # 300 x 280 -> short side 48
    with Image.open(dst / "clipart/c0/c.png.jpg") as im:                               # RGBA, alpha 128 on white
        src = np.asarray(to_rgb(Image.open(mixed_root / "clipart/c0/c.png")).resize(im.size, Image.LANCZOS), float)
        assert np.abs(np.asarray(im, float) - src).mean() < 6 and np.asarray(im).mean() > 150
    assert (dst / "clipart/c1/b.jpg").read_bytes() == small                        # 40 x 30: small enough, copied
    with Image.open(dst / "sketch/c1/d.jpg") as im:                                    # grey 64 x 64 -> RGB 48 x 48
        assert im.mode == "RGB" and im.size == (48, 48)
    check_domainnet(dst, ["clipart", "sketch"])
    ds = DomainNetDataset(dst, ["clipart", "sketch"], "test", resolution=24, augment="paper")
    assert all(ds[i][0].shape == (3, 24, 24) for i in range(len(ds)))
    assert sorted(p.name for p in dst.parent.iterdir()) == ["small"]                   # no temporary folder left


@pytest.mark.parametrize("case", ["no_src", "src_not_domainnet", "dst_not_empty", "dst_inside_src", "bad_list",
                                  "bad_flag"])
def test_prepare_refuses_bad_arguments_in_one_line_with_exit_2(mixed_root, tmp_path, case, capsys):
    dst = tmp_path / "dst"
    src = mixed_root
    extra: list[str] = []
    if case == "no_src":
        src = tmp_path / "nope"
    elif case == "src_not_domainnet":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "dst_not_empty":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    elif case == "dst_inside_src":
        dst = mixed_root / "copy"
    elif case == "bad_list":
        with open(mixed_root / "sketch_test.txt", "a") as f:
            f.write("sketch/c0/gone.jpg 0\n")
    else:
        extra = ["--quality", "0"]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        prepare_main([str(src), str(dst), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    expect = {"no_src": "does not exist", "src_not_domainnet": "holds no <domain>_train.txt",
              "dst_not_empty": "exists and is not an empty directory", "dst_inside_src": "is inside SRC",
              "bad_list": "sketch_test.txt line 3: image 'sketch/c0/gone.jpg' does not exist",
              "bad_flag": "--quality=0 is out of range; valid: 1 to 95"}[case]
    assert expect in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before                   # nothing written
    if case == "dst_not_empty":
        assert [p.name for p in dst.iterdir()] == ["keep.txt"]
