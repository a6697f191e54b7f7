"""GLUE metrics as pure functions (scikit-learn / scipy), per task and averaged the T5 way.

Scales are raw: accuracy, F1 in [0, 1]; MCC, Pearson, Spearman in [-1, 1] (not x100).

Degenerate inputs: when predictions or labels are constant, Pearson and Spearman are undefined (scipy
returns NaN); we return 0.0, i.e. "no linear / rank association", so a model that always answers the same
score scores 0, never NaN (NaN would poison the GLUE average and checkpoint selection). MCC does the
same (scikit-learn already returns 0.0), F1 with no predicted and no true positives is 0.0.

Invalid predictions (None: decoded text that maps to no label) count wrong, never skipped:
- classification: None is replaced by a class that differs from the gold label (binary: ``1 - label``),
  so it is a false negative when the label is 1 and a false positive when it is 0 (T5's
  ``f1_score_with_invalid`` does the same); for accuracy it is simply a miss.
- STS-B: None is replaced by the end of the score range farthest from the gold score (0.0 when the gold
  score is >= 2.5, else 5.0), the worst valid answer. A fixed value such as 0.0 or the range mean would
  instead be uncorrelated noise whose effect on Pearson depends on the other predictions.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "rte": ("accuracy",), "sst2": ("accuracy",), "mnli": ("accuracy",), "qnli": ("accuracy",),
    "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "cola": ("mcc",),
}
NUM_CLASSES = {"rte": 2, "sst2": 2, "mnli": 3, "qnli": 2, "mrpc": 2, "qqp": 2, "cola": 2}
STSB_RANGE = (0.0, 5.0)


def _pair(preds: Sequence, labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must be 1-d and the same length")
    if len(y) == 0:
        raise ValueError("no examples to score")
    return p, y


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Binary F1 of the positive class 1: 2 TP / (2 TP + FP + FN); 0.0 when that is 0/0."""
    p, y = _pair(preds, labels)
    return float(skm.f1_score(y, p, pos_label=1, average="binary", labels=[0, 1], zero_division=0.0))


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0.0 when a margin is empty."""
    p, y = _pair(preds, labels)
    return float(skm.matthews_corrcoef(y, p))


def _corr(fn, preds: Sequence[float], labels: Sequence[float]) -> float:
    p, y = _pair(preds, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    if len(p) < 2 or np.all(p == p[0]) or np.all(y == y[0]):
        return 0.0   # undefined for constant inputs: report no association (see module docstring)
    r = float(fn(p, y)[0])
    return 0.0 if math.isnan(r) else r


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson's r; 0.0 when either side is constant."""
    return _corr(stats.pearsonr, preds, labels)


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman's rho (Pearson of average ranks); 0.0 when either side is constant."""
    return _corr(stats.spearmanr, preds, labels)


def _fill_invalid(task: str, preds: Sequence, labels: Sequence) -> tuple[list, list]:
    """Replace None predictions by a wrong answer (see module docstring)."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if task == "stsb":
        lo, hi = STSB_RANGE
        y = [float(v) for v in labels]
        return [float(p) if p is not None else (lo if t >= (lo + hi) / 2 else hi) for p, t in zip(preds, y)], y
    k = NUM_CLASSES[task]
    y = [int(v) for v in labels]
    return [int(p) if p is not None else (t + 1) % k for p, t in zip(preds, y)], y


def glue_task_metrics(task: str, preds: Sequence[int | float | None], labels: Sequence[int | float]) -> dict[str, float]:
    """The task's GLUE metrics: rte/sst2/mnli/qnli {accuracy}; mrpc/qqp {f1, accuracy}; stsb {pearson,
    spearman}; cola {mcc}. None predictions count wrong."""
    if task not in TASK_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; valid: {', '.join(TASK_METRICS)}")
    p, y = _fill_invalid(task, preds, labels)
    fns = {"accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}
    return {m: fns[m](p, y) for m in TASK_METRICS[task]}


def glue_score(task_metrics: Mapping[str, float]) -> float:
    """One task's score: the mean of its metrics (T5's convention, e.g. STS-B = (pearson + spearman) / 2)."""
    if not task_metrics:
        raise ValueError("no metrics to average")
    return float(np.mean(list(task_metrics.values())))


def average(per_task: Mapping[str, Mapping[str, float]]) -> float:
    """The GLUE average: the mean over tasks of ``glue_score``."""
    if not per_task:
        raise ValueError("no tasks to average")
    return float(np.mean([glue_score(m) for m in per_task.values()]))
