"""Write a small synthetic GLUE in the exact Hub layout and schema of ``nyu-mll/glue`` (offline stand-in).

``ROOT/<task>/<split>-00000-of-00001.parquet`` for the eight tasks of ``smear.data.glue.TASKS``, same
columns, dtypes (ClassLabel int64 / float32 STS-B label, int32 idx) and split names (mnli: train,
validation_matched, validation_mismatched, test_matched, test_mismatched), test labels -1 as in GLUE.
Each task follows a deterministic rule that needs a different skill, so routing has something to
specialise on. Texts are short (< 60 characters per field, for byte-level tokenizers). Labels are
balanced to within one example per split; no source text repeats within a task (no train/test copies).

- cola (acceptability): a sentence in the order det [adj] noun verb det [adj] noun -> acceptable;
  the same words scrambled into any other part-of-speech order -> unacceptable.
- sst2 (sentiment): "the film was w1, w2 and w3" with three sentiment words; majority positive ->
  positive, majority negative -> negative.
- mrpc (paraphrase): sentence2 = sentence1 with some words replaced by synonyms -> equivalent; the same
  but one slot replaced by a word of another meaning -> not_equivalent (needs the synonym lexicon).
- qqp (duplicate questions): question2 asks the same (verb, object, place) in another word order or
  template -> duplicate; one of the three slots changed -> not_duplicate.
- stsb (similarity): sentence2 = sentence1 (4-6 words) with k words replaced; label = 5 x (shared / length).
- mnli (3-way NLI): premise "the adj noun verb the obj"; hypothesis drops a modifier or generalises a slot
  -> entailment; negates it -> contradiction; changes the subject / object / adds an adjective -> neutral.
  Matched and mismatched splits come from the same generator (different draws).
- qnli (question answering NLI): "what does the N V?" / "who Vs the O?" against a sentence; the sentence
  states the asked entity and relation -> entailment, one of them differs -> not_entailment.
- rte (lexical entailment): the hypothesis words are an ordered subset of the premise's -> entailment;
  one hypothesis word is absent from the premise -> not_entailment.

Majority-class baselines (``majority_baseline``, default sizes, protocol test split, majority label of
the protocol train split; exact class balance makes class 0 the majority on ties): about 0.5 accuracy on
the binary tasks, 1/3 on mnli, MCC 0 on cola, F1 0 on mrpc/qqp (class 0 = not_equivalent / not_duplicate),
Pearson/Spearman 0 on stsb (constant prediction). Run the CLI to print the exact values.

    python -m smear.data.synthetic_glue ROOT [--scale 1.0]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from smear.data.domainnet import DataError
from smear.data.glue import COLUMNS, LABEL_NAMES, SPLITS, TASKS, _quiet_datasets

MARKER = "SYNTHETIC_GLUE_OK"  # written last: a root without it is incomplete
SEED = 1234

_SMALL = {"train": 400, "validation": 200, "test": 100}
_LARGE = {"train": 600, "validation": 150, "test": 100}
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "cola": _SMALL, "rte": _SMALL, "mrpc": _SMALL, "stsb": _SMALL,
    "sst2": _LARGE, "qqp": _LARGE, "qnli": _LARGE,
    "mnli": {"train": 600, "validation_matched": 150, "validation_mismatched": 150,
             "test_matched": 100, "test_mismatched": 100},
}

# ------------------------------------------------------------------------------------------ lexicon
ADJ = ("big", "small", "red", "old", "young", "happy", "quiet", "brave", "shy", "tall", "calm", "busy")
NOUN = ("dog", "cat", "bird", "fox", "man", "girl", "boy", "horse", "cow", "king", "nurse", "chef",
        "pilot", "baker", "farmer", "judge")
OBJ = ("ball", "box", "book", "cake", "hat", "car", "map", "key", "lamp", "cup", "kite", "coat")
VERB = (("see", "sees"), ("like", "likes"), ("find", "finds"), ("take", "takes"), ("hold", "holds"),
        ("want", "wants"), ("make", "makes"), ("move", "moves"), ("buy", "buys"), ("drop", "drops"))
PLACE = ("home", "work", "school", "night", "camp", "sea", "noon", "dawn")
POS_WORDS = ("good", "great", "fun", "lovely", "superb", "warm", "funny", "bright")
NEG_WORDS = ("bad", "dull", "awful", "boring", "weak", "sad", "ugly", "slow")
TOPICS = ("film", "movie", "show", "play", "book", "song", "meal", "trip")
SYN = {  # mrpc slots: each entry is one meaning with two surface forms
    "adj": (("big", "large"), ("small", "little"), ("happy", "glad"), ("quick", "fast"), ("quiet", "silent"),
            ("angry", "mad"), ("smart", "clever"), ("rich", "wealthy")),
    "noun": (("man", "guy"), ("kid", "child"), ("doctor", "medic"), ("cop", "officer"), ("lady", "woman"),
             ("pupil", "student")),
    "verb": (("likes", "enjoys"), ("sees", "spots"), ("takes", "grabs"), ("finds", "locates"),
             ("makes", "builds"), ("fixes", "repairs"), ("starts", "begins")),
    "obj": (("car", "auto"), ("cup", "mug"), ("hat", "cap"), ("cab", "taxi"), ("sofa", "couch"),
            ("gift", "present"), ("rock", "stone")),
}
QQP_VERB = ("fix", "paint", "clean", "sell", "build", "find", "buy", "wash", "cook", "ship")
QQP_OBJ = ("bike", "car", "boat", "cake", "desk", "lamp", "sofa", "kite", "door", "shoe")
QQP_TEMPLATES = ("how do i {v} a {o} at {p}?", "at {p}, how do i {v} a {o}?",
                 "what is the way to {v} a {o} at {p}?", "how can one {v} a {o} at {p}?")
STSB_POOL = tuple(sorted(set(ADJ + NOUN + OBJ + PLACE + tuple(v for _, v in VERB))))
GRAMMATICAL = {("det", "adj", "noun", "verb", "det", "adj", "noun"), ("det", "noun", "verb", "det", "noun"),
               ("det", "adj", "noun", "verb", "det", "noun"), ("det", "noun", "verb", "det", "adj", "noun")}

Rng = np.random.Generator


def _pick(rng: Rng, xs, exclude=()):
    xs = [x for x in xs if x not in exclude]
    return xs[int(rng.integers(len(xs)))]


# ------------------------------------------------------------------------------------------ rules
# Each generator: (rng, label) -> row dict of the task's text fields, consistent with ``label``.

def _cola(rng: Rng, label: int) -> dict:
    a1, a2 = rng.random() < 0.5, rng.random() < 0.5
    words = [("det", _pick(rng, ("the", "a")))] + ([("adj", _pick(rng, ADJ))] if a1 else []) + \
        [("noun", _pick(rng, NOUN)), ("verb", _pick(rng, VERB)[1]), ("det", _pick(rng, ("the", "a")))] + \
        ([("adj", _pick(rng, ADJ))] if a2 else []) + [("noun", _pick(rng, OBJ))]
    if label == 0:  # scramble until the part-of-speech order is not a grammatical one
        while tuple(p for p, _ in words) in GRAMMATICAL:
            words = [words[i] for i in rng.permutation(len(words))]
    return {"sentence": " ".join(w for _, w in words) + "."}


def _sst2(rng: Rng, label: int) -> dict:
    n_pos = int(rng.integers(2, 4)) if label == 1 else int(rng.integers(0, 2))
    ws = [_pick(rng, POS_WORDS) for _ in range(n_pos)] + [_pick(rng, NEG_WORDS) for _ in range(3 - n_pos)]
    ws = [ws[i] for i in rng.permutation(3)]
    return {"sentence": f"the {_pick(rng, TOPICS)} was {ws[0]}, {ws[1]} and {ws[2]}."}


def _mrpc(rng: Rng, label: int) -> dict:
    slots = ("adj", "noun", "verb", "obj")
    meaning = {s: int(rng.integers(len(SYN[s]))) for s in slots}
    form1 = {s: int(rng.integers(2)) for s in slots}
    while True:  # sentence 2: flip some surface forms (synonyms), at least one
        form2 = {s: int(rng.integers(2)) for s in slots}
        if form2 != form1:
            break
    meaning2 = dict(meaning)
    if label == 0:  # one slot takes a different meaning
        s = slots[int(rng.integers(4))]
        meaning2[s] = _pick(rng, range(len(SYN[s])), exclude=(meaning[s],))

    def say(m, f):
        w = {s: SYN[s][m[s]][f[s]] for s in slots}
        return f"the {w['adj']} {w['noun']} {w['verb']} the {w['obj']}."
    return {"sentence1": say(meaning, form1), "sentence2": say(meaning2, form2)}


def _qqp(rng: Rng, label: int) -> dict:
    slot = {"v": _pick(rng, QQP_VERB), "o": _pick(rng, QQP_OBJ), "p": _pick(rng, PLACE)}
    i, j = (int(x) for x in rng.choice(len(QQP_TEMPLATES), size=2, replace=False))
    slot2 = dict(slot)
    if label == 0:
        k = _pick(rng, ("v", "o", "p"))
        slot2[k] = _pick(rng, {"v": QQP_VERB, "o": QQP_OBJ, "p": PLACE}[k], exclude=(slot[k],))
    return {"question1": QQP_TEMPLATES[i].format(**slot), "question2": QQP_TEMPLATES[j].format(**slot2)}


def _stsb(rng: Rng, _label: int) -> tuple[dict, float]:
    n = int(rng.integers(4, 7))
    w1 = list(rng.choice(STSB_POOL, size=n, replace=False))
    k = int(rng.integers(0, n + 1))
    fresh = iter(rng.choice([w for w in STSB_POOL if w not in w1], size=k, replace=False))
    w2 = list(w1)
    for pos in rng.choice(n, size=k, replace=False):
        w2[pos] = next(fresh)
    return {"sentence1": " ".join(w1) + ".", "sentence2": " ".join(w2) + "."}, 5.0 * (n - k) / n


def _mnli(rng: Rng, label: int) -> dict:
    adj, noun, (vb, v3), obj = _pick(rng, ADJ), _pick(rng, NOUN), _pick(rng, VERB), _pick(rng, OBJ)
    premise = f"the {adj} {noun} {v3} the {obj}."
    form = int(rng.integers(3))
    if label == 0:    # entailment: drop the adjective, or generalise the subject / object
        hyp = (f"the {noun} {v3} the {obj}.", f"someone {v3} the {obj}.", f"the {noun} {v3} something.")[form]
    elif label == 2:  # contradiction: negate the premise
        hyp = (f"the {noun} does not {vb} the {obj}.", f"nobody {v3} the {obj}.",
               f"the {adj} {noun} does not {vb} the {obj}.")[form]
    else:             # neutral: another subject, another object, or an unstated property
        hyp = (f"the {_pick(rng, NOUN, (noun,))} {v3} the {obj}.", f"the {noun} {v3} the {_pick(rng, OBJ, (obj,))}.",
               f"the {_pick(rng, ADJ, (adj,))} {noun} {v3} the {obj}.")[form]
    return {"premise": premise, "hypothesis": hyp}


def _qnli(rng: Rng, label: int) -> dict:
    noun, (vb, v3), obj, place = _pick(rng, NOUN), _pick(rng, VERB), _pick(rng, OBJ), _pick(rng, PLACE)
    who = rng.random() < 0.5
    q = f"who {v3} the {obj}?" if who else f"what does the {noun} {vb}?"
    if label == 1:    # the sentence is about another entity or relation
        if rng.random() < 0.5:
            vb, v3 = _pick(rng, VERB, ((vb, v3),))
        elif who:
            obj = _pick(rng, OBJ, (obj,))
        else:
            noun = _pick(rng, NOUN, (noun,))
    return {"question": q, "sentence": f"the {noun} {v3} the {obj} at {place}."}


def _rte(rng: Rng, label: int) -> dict:
    adj, noun, v3, adj2, obj, place = (_pick(rng, ADJ), _pick(rng, NOUN), _pick(rng, VERB)[1],
                                       _pick(rng, ADJ), _pick(rng, OBJ), _pick(rng, PLACE))
    prem = ["the", adj, noun, v3, "the", adj2, obj, "at", place]
    drop = {i for group in ((1,), (5,), (7, 8)) if rng.random() < 0.5 for i in group}  # optional modifiers
    keep = [i for i in range(len(prem)) if i not in drop]                               # ordered subset
    hyp = [prem[i] for i in keep]
    if label == 1:    # swap one content word for one the premise does not contain
        i = int(rng.choice([j for j, w in enumerate(hyp) if w not in ("the", "at")]))
        pool = {adj: ADJ, adj2: ADJ, noun: NOUN, v3: tuple(v for _, v in VERB), obj: OBJ, place: PLACE}[hyp[i]]
        hyp[i] = _pick(rng, pool, exclude=set(prem))
    return {"sentence1": " ".join(prem) + ".", "sentence2": " ".join(hyp) + "."}


_RULES: dict[str, Callable] = {"cola": _cola, "sst2": _sst2, "mrpc": _mrpc, "qqp": _qqp, "stsb": _stsb,
                               "mnli": _mnli, "qnli": _qnli, "rte": _rte}


# ------------------------------------------------------------------------------------------ writer

def _features(task: str):
    from datasets import ClassLabel, Features, Value

    label = Value("float32") if LABEL_NAMES[task] is None else ClassLabel(names=list(LABEL_NAMES[task]))
    return Features({c: label if c == "label" else Value("int32") if c == "idx" else Value("string")
                     for c in COLUMNS[task]})


def _rows(task: str, n: int, rng: Rng, seen: set) -> dict[str, list]:
    names = LABEL_NAMES[task]
    labels = rng.permutation(np.arange(n) % len(names)) if names is not None else np.zeros(n, int)
    cols: dict[str, list] = {c: [] for c in COLUMNS[task]}
    for i, lab in enumerate(labels):
        for _ in range(1000):
            out = _RULES[task](rng, int(lab))
            row, y = out if isinstance(out, tuple) else (out, int(lab))
            key = tuple(row.values())
            if key not in seen:
                break
        else:
            raise DataError(f"synthetic {task}: could not draw {n} distinct examples (lexicon too small)")
        seen.add(key)
        for f, v in row.items():
            cols[f].append(v)
        cols["label"].append(y)
        cols["idx"].append(i)
    return cols


def split_sizes(scale: float = 1.0, sizes: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, dict[str, int]]:
    """Rows per task and Hub split: the defaults (or ``sizes`` overrides per task/split) times ``scale``."""
    if scale <= 0:
        raise DataError(f"scale must be > 0, got {scale}")
    out = {t: dict(DEFAULT_SIZES[t]) for t in TASKS}
    for t, per in (sizes or {}).items():
        if t not in out:
            raise DataError(f"unknown task {t!r} in sizes; valid: {', '.join(TASKS)}")
        for s, n in per.items():
            if s not in SPLITS[t]:
                raise DataError(f"unknown split {s!r} for {t} in sizes; valid: {', '.join(SPLITS[t])}")
            out[t][s] = int(n)
    out = {t: {s: max(1, int(round(n * scale))) for s, n in per.items()} for t, per in out.items()}
    return out


def is_complete(root: str | os.PathLike) -> bool:
    return (Path(root) / MARKER).exists()


def write_synthetic_glue(root: str | os.PathLike, *, scale: float = 1.0,
                         sizes: Mapping[str, Mapping[str, int]] | None = None, seed: int = SEED) -> Path:
    """Write the dataset under ``root`` (atomically: built in a temp folder, then renamed). Idempotent: a
    complete root with the same parameters is returned as is; one with other parameters is an error."""
    root = Path(root).resolve()
    plan = split_sizes(scale, sizes)
    params = {"seed": seed, "sizes": plan}
    if is_complete(root):
        if json.loads((root / MARKER).read_text()) != params:
            raise DataError(f"{root} holds synthetic GLUE written with other sizes/seed; delete it or use another root")
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-glue-", dir=root.parent))
    try:
        from datasets import Dataset

        with _quiet_datasets():
            for ti, task in enumerate(TASKS):
                rng, seen = np.random.default_rng([seed, ti]), set()
                (tmp / task).mkdir()
                for split in SPLITS[task]:
                    cols = _rows(task, plan[task][split], rng, seen)
                    if split.startswith("test"):   # GLUE's test labels are hidden
                        cols["label"] = [-1.0 if task == "stsb" else -1] * len(cols["label"])
                    Dataset.from_dict(cols, features=_features(task)).to_parquet(
                        str(tmp / task / f"{split}-00000-of-00001.parquet"))
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        if root.exists() and not is_complete(root):
            shutil.rmtree(root)   # an incomplete leftover (complete roots are never replaced)
        try:
            os.replace(tmp, root)
        except OSError:
            if not is_complete(root):   # a concurrent writer finished first: keep its copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def majority_baseline(root: str | os.PathLike, tasks=TASKS, *, heldout: int = 1000,
                      cache_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Per task, the metrics of always answering the protocol train split's majority label (STS-B: its mean
    score) on the protocol test split. Works for any GLUE root in the Hub layout."""
    from smear.data.glue import GlueMixture
    from smear.metrics import glue_task_metrics

    out = {}
    for t in tasks:
        train = GlueMixture(root, [t], "train", heldout=heldout, cache_dir=cache_dir).labels(t)
        test = GlueMixture(root, [t], "test", heldout=heldout, cache_dir=cache_dir).labels(t)
        guess = float(np.mean(train)) if LABEL_NAMES[t] is None else int(np.bincount(train).argmax())
        out[t] = glue_task_metrics(t, [guess] * len(test), test)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every split size")
    ap.add_argument("--baseline", action="store_true", help="also print the majority-class baselines")
    args = ap.parse_args()
    root = write_synthetic_glue(args.root, scale=args.scale)
    print(root)
    if args.baseline:
        from smear.metrics import average

        base = majority_baseline(root)
        for t, m in base.items():
            print(f"{t:5s} " + " ".join(f"{k}={v:.3f}" for k, v in m.items()))
        print(f"average {average(base):.3f}")


if __name__ == "__main__":
    main()
