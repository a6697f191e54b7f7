"""The up-front DomainNet check (smear.data.check) and image conversion (smear.data.images.to_rgb).

Each check test breaks one thing in a tiny generated root. Two domains x two splits, 3 lines each,
classes c0..c2, 4x4 PNGs. The test asserts the exact one-line message: split file, line number, value.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smear.data.check import DataCheckError, check_domainnet
from smear.data.digits_domainnet import DOMAINS as ALL_DOMAINS
from smear.data.domainnet import DataError, DomainNetDataset, num_classes, split_records
from smear.data.images import inspect_image, to_rgb

DOMAINS = ("clipart", "sketch")


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, value, value)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _lines(domain: str, split: str) -> list[str]:
    return [f"{domain}/c{c}/{split}{c}.png {c}" for c in range(3)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A clean root: every list holds one image of each class c0, c1, c2."""
    for d in DOMAINS:
        for s in ("train", "test"):
            for i, line in enumerate(_lines(d, s)):
                f = tmp_path / line.split()[0]
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(_png(40 * i))
            (tmp_path / f"{d}_{s}.txt").write_text("\n".join(_lines(d, s)) + "\n")
    return tmp_path


def _append(root: Path, name: str, *lines: str) -> None:
    with open(root / name, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def _image(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def _error(root: Path, domains=DOMAINS, **kw) -> str:
    with pytest.raises(DataCheckError) as e:
        check_domainnet(root, domains, **kw)
    assert isinstance(e.value, DataError) and "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------------ clean roots

def test_clean_root_passes_with_a_summary(root):
    s = check_domainnet(root, DOMAINS)
    assert s.lines == {"clipart": {"train": 3, "test": 3}, "sketch": {"train": 3, "test": 3}}
    assert s.classes == {"clipart": {"train": 3, "test": 3}, "sketch": {"train": 3, "test": 3}}
    assert (s.images, s.formats, s.decode) == (12, {"PNG": 12}, "header")
    assert (s.num_classes, s.num_classes_from) == (3, "lists")
    assert s.num_classes == num_classes(root, DOMAINS)          # the head the trainable would build
    full = check_domainnet(root, DOMAINS, decode="full")
    assert (full.images, full.formats, full.decode) == (12, {"PNG": 12}, "full")


def test_generated_digits_root_passes(digits_root):
    seen: list[tuple[int, int]] = []
    s = check_domainnet(digits_root, ALL_DOMAINS, progress=lambda done, total: seen.append((done, total)))
    assert (s.images, s.num_classes, s.formats) == (1797, 10, {"PNG": 1797})
    assert seen[0] == (0, 1797) and seen[-1] == (1797, 1797)
    assert sum(n for d in s.lines.values() for n in d.values()) == 1797


def test_bom_crlf_and_blank_lines_are_accepted(root):
    text = "\r\n".join(_lines("clipart", "train")) + "\r\n\r\n  \r\n\r\n"
    (root / "clipart_train.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert check_domainnet(root, DOMAINS).lines["clipart"]["train"] == 3
    # the dataset reads the same file the same way: no BOM or CR left in the paths
    assert [r.path for r in split_records(root, ["clipart"], "test")] == [
        line.split()[0] for line in _lines("clipart", "test")]
    assert sorted(r.path for r in split_records(root, ["clipart"], "train") + split_records(root, ["clipart"], "val")) \
        == [line.split()[0] for line in _lines("clipart", "train")]


# ------------------------------------------------------------------------------------------ split files

def test_missing_or_non_integer_label(root):
    _append(root, "clipart_train.txt", "clipart/c0/train0.png")
    assert _error(root) == ("clipart_train.txt line 4: expected '<relative path> <label>', "
                            "got 'clipart/c0/train0.png'")
    (root / "clipart_train.txt").write_text("\n".join(_lines("clipart", "train")) + "\nclipart/c0/train0.png 0.5\n")
    assert _error(root) == "clipart_train.txt line 4: label '0.5' is not an integer"
    # the dataset's loader refuses the same line with the same words
    with pytest.raises(DataError, match=re.escape("clipart_train.txt line 4: label '0.5' is not an integer")):
        split_records(root, ["clipart"], "train")


def test_non_utf8_split_file(root):
    data = "\n".join(_lines("sketch", "test")).encode().replace(b"test1.png", b"test1\xff.png")
    (root / "sketch_test.txt").write_bytes(data)
    assert _error(root) == "sketch_test.txt line 2: not UTF-8 (byte 0xff at column 16)"
    (root / "sketch_test.txt").write_bytes("\n".join(_lines("sketch", "test")).encode("utf-16"))
    assert _error(root) == "sketch_test.txt line 1: is UTF-16 (byte-order mark 0xfffe); expected UTF-8"


def test_empty_split_file(root):
    (root / "sketch_train.txt").write_text("\n\n")
    assert _error(root) == "sketch_train.txt: no '<relative path> <label>' lines"


# ------------------------------------------------------------------------------------------------ paths

def test_absolute_path(root):
    _append(root, "clipart_train.txt", f"{root}/clipart/c1/train1.png 1")
    assert _error(root) == (f"clipart_train.txt line 4: path '{root}/clipart/c1/train1.png' is absolute; "
                            "paths must be relative to the root")
    (root / "clipart_train.txt").write_text("C:\\data\\clipart\\c1\\x.png 1\n" + "\n".join(_lines("clipart", "train")))
    assert _error(root) == ("clipart_train.txt line 1: path 'C:\\\\data\\\\clipart\\\\c1\\\\x.png' is absolute; "
                            "paths must be relative to the root")


def test_dotdot_path_leaving_the_root(root):
    outside = root.parent / f"{root.name}-outside.png"
    outside.write_bytes(_png(0))             # it exists: refused for where it is, not for being missing
    _append(root, "sketch_test.txt", f"sketch/c0/../../../{outside.name} 0")
    assert _error(root) == f"sketch_test.txt line 4: path 'sketch/c0/../../../{outside.name}' leaves the root"
    # '..' that stays inside the root is fine
    (root / "sketch_test.txt").write_text("\n".join(_lines("sketch", "test")).replace("sketch/c0/", "sketch/c1/../c0/"))
    assert check_domainnet(root, DOMAINS).images == 12


def test_missing_file(root):
    (root / "sketch" / "c2" / "train2.png").unlink()
    assert _error(root) == "sketch_train.txt line 3: image 'sketch/c2/train2.png' does not exist"


# ----------------------------------------------------------------------------------------------- images

def test_truncated_png(root):
    f = root / "clipart" / "c1" / "test1.png"
    data = f.read_bytes()
    f.write_bytes(data[:50])                                    # cut inside the image data
    assert _error(root) == ("clipart_test.txt line 2: image 'clipart/c1/test1.png' cannot be decoded "
                            "(OSError: image file is truncated)")
    f.write_bytes(data[:40])                                    # cut before the image data
    assert _error(root) == "clipart_test.txt line 2: image 'clipart/c1/test1.png' is a damaged PNG (PIL cannot identify it)"


def test_truncated_jpeg_in_header_and_full_mode(root):
    _image(root, "sketch/c0/extra.jpg", _jpeg()[:900])       # header intact, scan cut short
    _append(root, "sketch_train.txt", "sketch/c0/extra.jpg 0")
    pattern = (r"sketch_train\.txt line 4: image 'sketch/c0/extra\.jpg' cannot be decoded "
               r"\(OSError: image file is truncated \(\d+ bytes not processed\)\)")
    assert re.fullmatch(pattern, _error(root))
    seen: list[tuple[int, int]] = []
    assert re.fullmatch(pattern, _error(root, decode="full", workers=2, progress=lambda *a: seen.append(a)))
    assert seen[-1] == (13, 13)


def test_file_that_is_not_an_image(root):
    (root / "sketch" / "c1" / "test1.png").write_bytes(b"<!DOCTYPE html><html>404</html>")
    assert _error(root) == ("sketch_test.txt line 2: image 'sketch/c1/test1.png' is not an image "
                            "(PIL cannot identify it; it starts with b'<!DOCTYP')")


def test_empty_file_and_folder(root):
    (root / "clipart" / "c0" / "test0.png").write_bytes(b"")
    (root / "sketch" / "c1" / "train1.png").unlink()
    (root / "sketch" / "c1" / "train1.png").mkdir()
    with pytest.raises(DataCheckError) as e:
        check_domainnet(root, DOMAINS)
    assert e.value.count == 2 and e.value.problems == [
        "clipart_test.txt line 1: image 'clipart/c0/test0.png' is empty (0 bytes)",
        "sketch_train.txt line 2: image 'sketch/c1/train1.png' is not a regular file"]
    assert str(e.value) == "clipart_test.txt line 1: image 'clipart/c0/test0.png' is empty (0 bytes) (and 1 more problem)"


def test_fast_header_path_agrees_with_pil(tmp_path):
    """JPEG and PNG are judged without PIL when sound; anything doubtful is left to PIL."""
    good, p = _jpeg(), tmp_path / "x.jpg"
    p.write_bytes(good)
    assert inspect_image(str(p)) == (None, "JPEG")
    p.write_bytes(good + b"trailing bytes PIL ignores")        # no FFD9 at the end, yet PIL loads it
    assert inspect_image(str(p)) == (None, "JPEG")
    bad = bytearray(good)
    bad[bad.index(b"\xff\xc0") + 4] = 12                      # a 12-bit frame: PIL's opener refuses it
    p.write_bytes(bad)
    assert inspect_image(str(p)) == ("is a damaged JPEG (PIL cannot identify it)", "?")
    png = bytearray(_png(40))
    png[20] ^= 1                                                # IHDR width changed: its CRC no longer matches
    p.write_bytes(png)
    assert inspect_image(str(p)) == ("is a damaged PNG (PIL cannot identify it)", "?")


def test_fast_header_path_never_passes_what_pil_cannot_open(tmp_path):
    """Random byte changes and cuts in JPEG/PNG headers: whatever the fast path accepts, PIL opens."""
    rng = np.random.default_rng(3)
    sources = [_jpeg(), _png(40)]
    for mode, kw in (("RGB", {"progressive": True}), ("L", {})):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).convert(mode).save(buf, "JPEG", **kw)
        sources.append(buf.getvalue())
    p, accepted = tmp_path / "f", 0
    for i in range(400):
        data = bytearray(sources[i % len(sources)])
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, min(len(data), 700)))] = int(rng.integers(0, 256))
        if i % 5 == 0:
            data = data[:int(rng.integers(1, len(data)))]
        p.write_bytes(data)
        if inspect_image(str(p))[0] is None:
            accepted += 1
            with Image.open(p) as im:                           # raises if the fast path was wrong
                assert im.size[0] > 0 and im.mode
    assert accepted > 100                                       # the fast path did accept most


# ----------------------------------------------------------------------------------------------- labels

def test_negative_label(root):
    _append(root, "clipart_test.txt", "clipart/c0/test0.png -1")
    assert _error(root) == "clipart_test.txt line 4: label -1 is out of range; valid: 0..2"


def test_label_only_one_list_uses_is_out_of_range(root):
    _image(root, "sketch/c3/test3.png", _png(9))
    _append(root, "sketch_test.txt", "sketch/c3/test3.png 3")
    assert _error(root) == "sketch_test.txt line 4: label 3 is out of range; valid: 0..2"
    # with one domain, its train and test lists vote: the train list does not use 3
    assert _error(root, ["sketch"]) == "sketch_test.txt line 4: label 3 is out of range; valid: 0..2"
    # a caller that knows better sets the count
    assert check_domainnet(root, DOMAINS, num_classes=4).num_classes_from == "argument"


def test_differing_class_counts_across_domains(root):
    """sketch's lists imply 4 classes, clipart's 3: the class only one domain has is refused."""
    for s in ("train", "test"):
        _image(root, f"sketch/c3/{s}3.png", _png(9))
        _append(root, f"sketch_{s}.txt", f"sketch/c3/{s}3.png 3")
    assert _error(root) == "sketch_train.txt line 4: label 3 is out of range; valid: 0..2 (and 1 more problem)"
    # a list that lacks a class is allowed (counted in the summary)
    (root / "clipart_test.txt").write_text("\n".join(_lines("clipart", "test")[:2]) + "\n")
    (root / "sketch_train.txt").write_text("\n".join(_lines("sketch", "train")) + "\n")
    (root / "sketch_test.txt").write_text("\n".join(_lines("sketch", "test")) + "\n")
    s = check_domainnet(root, DOMAINS)
    assert s.num_classes == 3 and s.classes["clipart"]["test"] == 2


def test_test_label_past_the_train_lists(root):
    """Both domains' test lists use class 3 but no train list does: the head would lack it."""
    for d in DOMAINS:
        _image(root, f"{d}/c3/test3.png", _png(9))
        _append(root, f"{d}_test.txt", f"{d}/c3/test3.png 3")
    assert _error(root) == "clipart_test.txt line 4: label 3 is out of range; valid: 0..2 (and 1 more problem)"


def test_label_past_domainnets_345_classes(root):
    """All lists agree on label 345 (e.g. labels numbered from 1): DomainNet has 345 classes."""
    for d in DOMAINS:
        for s in ("train", "test"):
            _image(root, f"{d}/last/{s}.png", _png(9))
            _append(root, f"{d}_{s}.txt", f"{d}/last/{s}.png 345")
    assert _error(root) == "clipart_train.txt line 4: label 345 is out of range; valid: 0..344 (and 3 more problems)"
    assert check_domainnet(root, DOMAINS, num_classes=346).num_classes == 346


def test_class_folder_with_two_labels(root):
    """A domain numbered differently: the folder c1 is label 1 in clipart but 2 in sketch."""
    (root / "sketch_test.txt").write_text("sketch/c0/test0.png 0\nsketch/c1/test1.png 2\nsketch/c2/test2.png 1\n")
    with pytest.raises(DataCheckError) as e:
        check_domainnet(root, DOMAINS)
    assert e.value.problems == [
        "sketch_test.txt line 2: class folder 'c1' has label 2, but clipart_train.txt line 2 gives it label 1",
        "sketch_test.txt line 3: class folder 'c2' has label 1, but clipart_train.txt line 3 gives it label 2"]


def test_problems_are_capped_but_counted(root):
    _append(root, "clipart_train.txt", *[f"clipart/c0/gone{i}.png 0" for i in range(30)])
    with pytest.raises(DataCheckError) as e:
        check_domainnet(root, DOMAINS, max_problems=5)
    assert e.value.count == 30 and len(e.value.problems) == 5
    assert str(e.value) == "clipart_train.txt line 4: image 'clipart/c0/gone0.png' does not exist (and 29 more problems)"


def test_bad_arguments(root):
    with pytest.raises(ValueError, match="decode='fast'"):
        check_domainnet(root, DOMAINS, decode="fast")
    with pytest.raises(DataError, match="unknown domain 'photos'"):
        check_domainnet(root, ["photos"])


# ------------------------------------------------------------------------------------------- conversion

def _rgb_via_dataset(tmp_path: Path, im: Image.Image) -> np.ndarray:
    """Save ``im`` as a PNG in a one-image root and read it back as a loader worker decodes it
    (``DomainNetDataset._data``: the full (3, H, W) uint8 pixels), as (H, W, 3)."""
    im.save(tmp_path / "x.png")
    for s in ("train", "test"):
        (tmp_path / f"clipart_{s}.txt").write_text("x.png 0\n")
    ds = DomainNetDataset(tmp_path, ["clipart"], "test", resolution=2, augment="none")
    out = ds._data(0)
    assert out.dtype == torch.uint8 and out.shape == (3, im.height, im.width)
    return out.permute(1, 2, 0).numpy()


def test_rgba_is_composited_on_white(tmp_path):
    px = np.array([[[255, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 128], [10, 200, 30, 255]]], np.uint8)
    out = _rgb_via_dataset(tmp_path, Image.fromarray(px, "RGBA"))
    assert out.tolist() == [[[255, 255, 255], [255, 255, 255]], [[127, 127, 127], [10, 200, 30]]]


def test_grey_with_alpha_is_composited_on_white(tmp_path):
    px = np.array([[[0, 0], [0, 255]]], np.uint8)              # LA: transparent black, opaque black
    out = _rgb_via_dataset(tmp_path, Image.fromarray(px, "LA"))
    assert out.tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_palette_transparency_is_white(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    im.putdata([0, 1])
    im.info["transparency"] = 0                                 # index 0 (black) is transparent
    out = _rgb_via_dataset(tmp_path, im)
    assert out.tolist() == [[[255, 255, 255], [200, 10, 10]]]
    assert Image.open(tmp_path / "x.png").convert("RGB").getpixel((0, 0)) == (0, 0, 0)  # PIL's default


def test_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
    wide = np.array([[0, 257, 32896, 65535]], np.uint16)       # 0, 1, 128, 255 in 8 bits
    im = Image.fromarray(wide)
    assert im.mode == "I;16"
    out = _rgb_via_dataset(tmp_path, im)
    assert out[..., 0].tolist() == [[0, 1, 128, 255]] and (out[..., 0] == out[..., 2]).all()
    assert Image.open(tmp_path / "x.png").convert("RGB").getpixel((2, 0)) == (255, 255, 255)  # white before


def test_16_bit_big_endian_and_32_bit_grey_modes():
    big = Image.frombytes("I;16B", (3, 1), bytes([0x00, 0x00, 0x80, 0x80, 0xFF, 0xFF]))
    assert np.asarray(to_rgb(big))[..., 1].tolist() == [[0, 128, 255]]
    i32 = Image.fromarray(np.array([[-5, 257, 65535, 70000]], np.int32))
    assert i32.mode == "I"
    assert np.asarray(to_rgb(i32))[..., 0].tolist() == [[0, 1, 255, 255]]


def test_16_bit_grey_with_a_transparent_value(tmp_path):
    im = Image.fromarray(np.array([[1000, 65535]], np.uint16))
    im.info["transparency"] = 1000
    assert np.asarray(to_rgb(im)).tolist() == [[[255, 255, 255], [255, 255, 255]]]
    im = Image.fromarray(np.array([[1000, 0]], np.uint16))
    im.info["transparency"] = 1000
    assert np.asarray(to_rgb(im)).tolist() == [[[255, 255, 255], [0, 0, 0]]]


# --- wired in: the launcher before any trial, and each trial's first act ---------------------------------

def test_launcher_refuses_a_bad_image_before_anything_starts(tmp_path, digits_root, offline_data, monkeypatch, capsys):
    """A listed image that is not an image: exit 2, one line naming the split file and line, nothing written."""
    import shutil

    from service.launch import main

    root = tmp_path / "dn"
    shutil.copytree(digits_root, root)
    first = (root / "real_test.txt").read_text().splitlines()[0].split()[0]
    (root / first).write_bytes(b"not an image")
    monkeypatch.setenv("SMEAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    rc = main(["--sweep", "default", "--data-root", str(root), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
               "--storage", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("launch.py: error: real_test.txt line 1: "), err
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "results").exists()


def test_a_trial_checks_an_unchecked_root_first_and_once_per_node(tmp_path, digits_root, monkeypatch):
    import shutil

    from trainables.loop import LocalSession, train_loop

    root = tmp_path / "dn"
    shutil.copytree(digits_root, root)
    monkeypatch.setenv("SMEAR_CACHE_DIR", str(tmp_path / "cache"))
    cfg = {"steps": 2, "eval_every": 2, "batch_size": 8, "torch_threads": 1, "routing": {"method": "adapter"},
           "data": {"root": str(root), "resolution": 16, "augment": "none", "domains": ["real"]}}
    (root / (root / "real_train.txt").read_text().splitlines()[-1].split()[0]).unlink()  # a missing image
    s = LocalSession(str(tmp_path / "a"))
    with pytest.raises(DataError, match=r"real_train.txt line \d+: image .* does not exist"):
        train_loop(cfg, s)
    assert s.reports == []                                                    # failed before any training
    shutil.rmtree(root)
    shutil.copytree(digits_root, root)
    train_loop(cfg, LocalSession(str(tmp_path / "b")))                         # checked, marker written
    assert len(list((tmp_path / "cache" / "data-checked").iterdir())) == 1
    train_loop(cfg, LocalSession(str(tmp_path / "c")))                         # the node's marker: no re-check
    assert len(list((tmp_path / "cache" / "data-checked").iterdir())) == 1
