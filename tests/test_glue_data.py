"""GLUE data layer on the offline synthetic GLUE: Hub layout and schema, the split protocol, T5 formatting
and parsing, the mixture, the collate function, determinism and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from smear.data import glue as G
from smear.data.domainnet import DataError
from smear.data.synthetic_glue import (DEFAULT_SIZES, MARKER, majority_baseline, split_sizes,
                                       write_synthetic_glue)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic_glue(tmp_path_factory.mktemp("data") / "synthetic-glue")


@pytest.fixture(scope="module")
def tok():
    import transformers

    return transformers.ByT5Tokenizer()


def _table(root: Path, task: str, split: str):
    return pq.read_table(root / task / f"{split}-00000-of-00001.parquet")


# ------------------------------------------------------------------------------------------ layout

@pytest.mark.parametrize("task", G.TASKS)
def test_synthetic_layout_columns_dtypes_splits(root, task):
    files = sorted(p.name for p in (root / task).iterdir())
    assert files == sorted(f"{s}-00000-of-00001.parquet" for s in G.SPLITS[task])
    for split in G.SPLITS[task]:
        t = _table(root, task, split)
        assert tuple(t.column_names) == G.COLUMNS[task]
        types = {f.name: str(f.type) for f in t.schema}
        assert types["idx"] == "int32"
        assert types["label"] == ("float" if task == "stsb" else "int64")
        assert all(types[c] == "string" for c in G.TEXT_FIELDS[task])
        feats = json.loads(t.schema.metadata[b"huggingface"])["info"]["features"]   # as the Hub's files
        if task != "stsb":
            assert feats["label"]["_type"] == "ClassLabel" and tuple(feats["label"]["names"]) == G.LABEL_NAMES[task]
        assert t.num_rows == DEFAULT_SIZES[task][split]
        assert t.column("idx").to_pylist() == list(range(t.num_rows))
        labels = np.asarray(t.column("label").to_pylist())
        if split.startswith("test"):
            assert (labels == -1).all()                 # hidden, as in GLUE
        elif task == "stsb":
            assert labels.min() >= 0 and labels.max() <= 5 and len(np.unique(labels)) > 5
        else:                                           # balanced to within one example
            counts = np.bincount(labels, minlength=len(G.LABEL_NAMES[task]))
            assert counts.max() - counts.min() <= 1
        for c in G.TEXT_FIELDS[task]:
            assert max(len(s) for s in t.column(c).to_pylist()) < 60


def test_no_source_repeats_within_a_task(root):
    for task in G.TASKS:
        seen = [tuple(r[c] for c in G.TEXT_FIELDS[task]) for s in G.SPLITS[task]
                for r in _table(root, task, s).to_pylist()]
        assert len(seen) == len(set(seen)), task


def test_generator_is_deterministic_and_idempotent(tmp_path):
    a = write_synthetic_glue(tmp_path / "a", scale=0.1)
    b = write_synthetic_glue(tmp_path / "b", scale=0.1)
    for task in G.TASKS:
        for s in G.SPLITS[task]:
            assert _table(a, task, s).equals(_table(b, task, s))
    mtime = (a / MARKER).stat().st_mtime_ns
    assert write_synthetic_glue(a, scale=0.1) == a and (a / MARKER).stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no temp folders left
    with pytest.raises(DataError, match="other sizes/seed"):
        write_synthetic_glue(a, scale=0.2)


def test_split_sizes_overrides_and_scale():
    s = split_sizes(0.5, {"rte": {"train": 100}})
    assert s["rte"] == {"train": 50, "validation": 100, "test": 50}
    with pytest.raises(DataError, match="unknown split 'validation' for mnli"):
        split_sizes(1.0, {"mnli": {"validation": 3}})


# ------------------------------------------------------------------------------------------ splits

def _rows(root, task, split, cache_dir, **kw):
    m = G.GlueMixture(root, [task], split, cache_dir=cache_dir, **kw)
    return [m[i]["source"] for i in range(len(m))]


@pytest.mark.parametrize("task", G.SMALL_TASKS)
def test_small_sets_halve_the_validation_split(root, cache_dir, task):
    n = DEFAULT_SIZES[task]["validation"]
    val, test = (_rows(root, task, s, cache_dir) for s in ("validation", "test"))
    assert (len(val), len(test)) == (n // 2, n - n // 2)
    orig = [G.format_example(task, r)[0] for r in _table(root, task, "validation").to_pylist()]
    assert sorted(val + test) == sorted(orig) and not set(val) & set(test)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(42)).tolist()   # the reference's draw
    assert val == [orig[i] for i in sorted(perm[: n // 2])]
    assert len(_rows(root, task, "train", cache_dir)) == DEFAULT_SIZES[task]["train"]


@pytest.mark.parametrize("task", G.LARGE_TASKS)
def test_large_sets_hold_out_training_examples(root, cache_dir, task):
    n = DEFAULT_SIZES[task]["train"]
    k = G.effective_heldout(n)                       # 1000 clamped to n // 5 on tiny data
    assert k == min(1000, n // 5) == 120
    train, val = (_rows(root, task, s, cache_dir) for s in ("train", "validation"))
    assert (len(train), len(val)) == (n - k, k) and not set(train) & set(val)
    orig_val = [G.format_example(task, r)[0] for r in _table(root, task, "validation").to_pylist()]
    assert _rows(root, task, "test", cache_dir) == orig_val
    assert len(_rows(root, task, "validation", cache_dir, heldout=50)) == 50


def test_mnli_uses_mismatched_for_validation_and_matched_for_test(root, cache_dir):
    for split, src in (("validation", "validation_mismatched"), ("test", "validation_matched")):
        orig = [G.format_example("mnli", r)[0] for r in _table(root, "mnli", src).to_pylist()]
        assert _rows(root, "mnli", split, cache_dir) == orig


def test_split_indices_reference_protocol_on_full_glue_sizes():
    # real GLUE counts: SST-2 67,349 train / 872 validation; RTE 2,490 / 277
    src, idx = G.split_indices("sst2", "validation", {"train": 67349, "validation": 872})
    assert src == "train" and len(idx) == 1000
    assert len(G.split_indices("sst2", "train", {"train": 67349, "validation": 872})[1]) == 66349
    assert [len(G.split_indices("rte", s, {"train": 2490, "validation": 277})[1]) for s in ("validation", "test")] == [138, 139]


def test_heldout_errors():
    with pytest.raises(DataError, match="too small"):
        G.effective_heldout(4)
    with pytest.raises(DataError, match="heldout must be >= 1"):
        G.effective_heldout(100, 0)


# ------------------------------------------------------------------------------------------ format

ROWS = {
    "cola": {"sentence": "A b."}, "sst2": {"sentence": "A b."},
    "mrpc": {"sentence1": "A.", "sentence2": "B."}, "stsb": {"sentence1": "A.", "sentence2": "B."},
    "rte": {"sentence1": "A.", "sentence2": "B."}, "qqp": {"question1": "A?", "question2": "B?"},
    "qnli": {"question": "A?", "sentence": "B."}, "mnli": {"premise": "P.", "hypothesis": "H."},
}
SOURCES = {
    "cola": "cola sentence: A b.", "sst2": "sst2 sentence: A b.",
    "mrpc": "mrpc sentence1: A. sentence2: B.", "stsb": "stsb sentence1: A. sentence2: B.",
    "rte": "rte sentence1: A. sentence2: B.", "qqp": "qqp question1: A? question2: B?",
    "qnli": "qnli question: A? sentence: B.", "mnli": "mnli hypothesis: H. premise: P.",
}


@pytest.mark.parametrize("task", G.TASKS)
def test_t5_prefixes(task):
    src, _ = G.format_example(task, ROWS[task] | {"label": 1})
    assert src == SOURCES[task]


@pytest.mark.parametrize("task", [t for t in G.TASKS if t != "stsb"])
def test_every_label_round_trips(task):
    names = G.LABEL_NAMES[task]
    for label in range(len(names)):
        _, target = G.format_example(task, ROWS[task] | {"label": label})
        assert target == names[label]
        assert G.parse_prediction(task, target) == label
        assert G.parse_prediction(task, f" {target}\n") == label
    for junk in ("", "maybe", names[0].upper(), names[0] + "s", "0", "1"):
        assert G.parse_prediction(task, junk) is None


def test_stsb_targets_round_to_point_two_and_round_trip():
    for k in range(26):                                 # every score on the 0.2 grid, 0.0 .. 5.0
        y = k / 5
        target = G.target_text("stsb", y)
        assert target == "%.1f" % y and G.parse_prediction("stsb", target) == pytest.approx(y)
    # 3.33 * 5 = 16.65 -> 17 -> 3.4; 0.8333 * 5 = 4.17 -> 4 -> 0.8; 2.5 * 5 = 12.5 -> 12 (half to even, as tf.round)
    assert [G.target_text("stsb", y) for y in (3.33, 0.8333, 2.5, 5.0)] == ["3.4", "0.8", "2.4", "5.0"]
    for junk in ("", "high", "nan", "inf", "3.4.1"):
        assert G.parse_prediction("stsb", junk) is None


def test_bad_labels_and_tasks():
    with pytest.raises(DataError, match="cola label 2"):
        G.target_text("cola", 2)
    with pytest.raises(DataError, match="stsb label -1"):
        G.target_text("stsb", -1.0)
    with pytest.raises(DataError, match="unknown GLUE task 'wnli'"):
        G.parse_prediction("wnli", "x")
    with pytest.raises(DataError, match="lacks field 'sentence2'"):
        G.format_example("rte", {"sentence1": "a", "label": 0})


# ------------------------------------------------------------------------------------------ mixture

def test_mixture_concatenates_tasks_and_scores_gold(root, cache_dir):
    m = G.GlueMixture(root, G.TASKS, "validation", cache_dir=cache_dir)
    sizes = m.task_sizes()
    assert list(sizes) == list(G.TASKS) and len(m) == sum(sizes.values())
    for t, sl in m.task_slices.items():
        for i in (sl.start, sl.stop - 1):
            item = m[i]
            assert item["task_id"] == G.TASKS.index(t) and item["example_id"] == i
            assert item["source"].startswith(t + " ")
            assert G.parse_prediction(t, item["target"]) == pytest.approx(item["label"], abs=0.1)
    scores = G.score_predictions(m, [m[i]["target"] for i in range(len(m))])
    assert all(v > 0.99 for per in scores.values() for v in per.values())    # stsb targets are rounded


def test_mixture_limit_and_task_order(root, cache_dir):
    m = G.GlueMixture(root, ["mnli", "rte"], "train", limit=7, cache_dir=cache_dir)
    assert m.task_sizes() == {"mnli": 7, "rte": 7}
    assert [m[i]["task_id"] for i in (0, 6, 7, 13)] == [0, 0, 1, 1]


def test_mixing_cap_sampler_rates(root, cache_dir):
    m = G.GlueMixture(root, ["mnli", "rte"], "train", mixing_cap=200, cache_dir=cache_dir)
    w = m.sampler().weights
    # mnli 600 -> min(600, 200) = 200, rte 400 -> 200: equal total rates after the cap
    assert float(w[m.task_slices["mnli"]].sum()) == pytest.approx(float(w[m.task_slices["rte"]].sum()))
    assert isinstance(G.GlueMixture(root, ["rte"], "train", cache_dir=cache_dir).sampler(),
                      torch.utils.data.RandomSampler)


def test_majority_baseline(root, cache_dir):
    base = majority_baseline(root, cache_dir=cache_dir)
    assert base["mnli"]["accuracy"] == pytest.approx(1 / 3, abs=0.02)
    assert base["cola"]["mcc"] == 0.0 and base["stsb"] == {"pearson": 0.0, "spearman": 0.0}
    assert all(0.4 <= base[t]["accuracy"] <= 0.6 for t in ("rte", "sst2", "qnli", "mrpc", "qqp"))


# ------------------------------------------------------------------------------------------ collate

def test_collate_shapes_and_padding(root, cache_dir, tok):
    m = G.GlueMixture(root, G.TASKS, "test", cache_dir=cache_dir)
    items = [m[m.task_slices[t].start] for t in G.TASKS]
    b = G.make_collate(tok)(items)
    B = len(items)
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == B
    assert b["input_ids"].shape[1] == max(len(i["source"].encode()) + 1 for i in items)   # bytes + </s>
    assert b["labels"].shape == (B, max(len(i["target"].encode()) + 1 for i in items))
    assert b["task_ids"].tolist() == list(range(B)) and b["example_ids"].dtype == torch.long
    for row, item in zip(b["labels"], items):
        n = len(item["target"].encode()) + 1
        assert (row[n:] == -100).all() and (row[:n] >= 0).all()
        assert tok.decode(row[:n], skip_special_tokens=True) == item["target"]
    assert b["target_texts"] == [i["target"] for i in items] and b["gold"] == [i["label"] for i in items]


def test_synthetic_sources_fit_the_default_source_length(root, cache_dir, tok):
    m = G.GlueMixture(root, G.TASKS, "train", cache_dir=cache_dir)
    assert max(len(m[i]["source"].encode()) for i in range(len(m))) + 1 <= 128


def test_collate_truncates_sources_and_rejects_long_targets(tok):
    item = {"source": "x" * 50, "target": "not_equivalent", "task_id": 0, "label": 0, "example_id": 3}
    assert G.make_collate(tok, max_source_len=16)([item])["input_ids"].shape == (1, 16)
    with pytest.raises(DataError, match="longer than max_target_len=8"):
        G.make_collate(tok, max_target_len=8)([item])


# ------------------------------------------------------------------------------------------ bad roots

def test_check_root_names_what_is_missing(tmp_path, root):
    with pytest.raises(DataError, match="does not exist"):
        G.check_root(tmp_path / "nope", ["rte"])
    with pytest.raises(DataError, match="has no folder rte/"):
        G.check_root(tmp_path, ["rte"])
    (tmp_path / "mnli").mkdir()
    (tmp_path / "mnli" / "train-00000-of-00001.parquet").write_bytes((root / "mnli" / "train-00000-of-00001.parquet").read_bytes())
    with pytest.raises(DataError, match=r"missing .*mnli/validation_matched-\*\.parquet"):
        G.check_root(tmp_path, ["mnli"])
    with pytest.raises(DataError, match="unknown GLUE task 'ax'"):
        G.check_root(root, ["ax"])
    assert G.check_root(root, G.TASKS) == root


def test_wrong_columns_and_unlabelled_splits_are_rejected(tmp_path, root, cache_dir):
    bad = tmp_path / "bad"
    (bad / "rte").mkdir(parents=True)
    for s in ("train", "validation"):            # qnli's files under rte/: wrong column names
        (bad / "rte" / f"{s}-00000-of-00001.parquet").write_bytes((root / "qnli" / f"{s}-00000-of-00001.parquet").read_bytes())
    with pytest.raises(DataError, match="lacks column"):
        G.load_raw("rte", bad, cache_dir=cache_dir)
    (bad / "cola").mkdir()
    for s in ("train", "validation"):            # test split (label -1) posing as validation
        (bad / "cola" / f"{s}-00000-of-00001.parquet").write_bytes((root / "cola" / "test-00000-of-00001.parquet").read_bytes())
    with pytest.raises(DataError, match="unlabelled rows"):
        G.GlueMixture(bad, ["cola"], "validation", cache_dir=cache_dir)
