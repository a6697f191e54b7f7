"""DomainNet loader on the generated offline dataset: layout, split sizes, labels, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from smear.data.digits_domainnet import CLASS_NAMES, DOMAINS, write_digits_domainnet
from smear.data.domainnet import DataError, DomainNetDataset, check_root, num_classes, split_records


def test_layout_is_domainnet_official(digits_root):
    for d in DOMAINS:
        for which in ("train", "test"):
            lines = (digits_root / f"{d}_{which}.txt").read_text().splitlines()
            assert lines
            rel, label = lines[0].rsplit(" ", 1)
            assert rel.startswith(f"{d}/") and rel.split("/")[1] == CLASS_NAMES[int(label)]
            assert (digits_root / rel).is_file()


def test_split_sizes_follow_the_protocol(digits_root):
    for d in DOMAINS:
        n_train_list = len((digits_root / f"{d}_train.txt").read_text().splitlines())
        n_test_list = len((digits_root / f"{d}_test.txt").read_text().splitlines())
        tr, va, te = (split_records(digits_root, [d], s) for s in ("train", "val", "test"))
        assert len(va) == round(0.2 * n_train_list)                  # 20% of the official train list
        assert len(tr) + len(va) == n_train_list and len(te) == n_test_list
        assert not {r.path for r in tr} & {r.path for r in va}       # disjoint
    # deterministic (seed 42)
    assert split_records(digits_root, DOMAINS, "val") == split_records(digits_root, DOMAINS, "val")
    assert 1797 == sum(len(split_records(digits_root, DOMAINS, s)) for s in ("train", "val", "test"))


def test_items_labels_and_domains(digits_root):
    ds = DomainNetDataset(digits_root, ["sketch", "real"], "test", resolution=24, augment="none")
    img, label, domain, idx, draw = ds[0]
    assert img.shape == (3, 24, 24) and img.dtype == torch.uint8     # the workers' crop; floats on the device
    assert domain == 0 and idx == 0 and draw == -1                   # evaluation: no random draw
    rec = ds.records[0]
    assert rec.path.split("/")[1] == CLASS_NAMES[label]
    assert {r.domain for r in ds.records} == {0, 1}
    assert num_classes(digits_root, DOMAINS) == 10
    # the paper's augmentation path works on the same files
    aug = DomainNetDataset(digits_root, ["sketch"], "train", resolution=32, augment="paper")
    assert aug[0][0].shape == (3, 32, 32)


def test_domains_look_different(digits_root):
    means = []
    for d in DOMAINS:
        rel = (digits_root / f"{d}_train.txt").read_text().split()[0]
        pixels = torch.from_numpy(np.asarray(Image.open(digits_root / rel).convert("RGB"), dtype=np.float32))
        means.append(tuple(round(float(v), 1) for v in pixels.mean(dim=(0, 1))))
    assert len(set(means)) == len(DOMAINS)


def test_missing_root_and_list_files_are_named(tmp_path, digits_root):
    with pytest.raises(DataError, match="does not exist"):
        check_root(tmp_path / "nope", DOMAINS)
    with pytest.raises(DataError, match="has no clipart_train.txt"):
        check_root(tmp_path, DOMAINS)
    with pytest.raises(DataError, match="unknown domain 'photos'"):
        check_root(digits_root, ["photos"])


def test_generation_is_idempotent(digits_root):
    assert write_digits_domainnet(digits_root) == digits_root
