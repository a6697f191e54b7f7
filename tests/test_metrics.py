"""GLUE metrics on hand-worked examples (arithmetic in the comments), invalid predictions, averaging."""
from __future__ import annotations

import math
import warnings

import pytest

from smear import metrics as M


def test_accuracy():
    # matches at positions 0 and 2 -> 2 / 4
    assert M.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_f1_binary_positive_class_one():
    # pairs (pred, label): (1,1) TP, (1,0) FP, (0,0) TN, (1,1) TP, (0,1) FN
    # F1 = 2TP / (2TP + FP + FN) = 4 / (4 + 1 + 1) = 2/3
    assert M.f1([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)


def test_f1_no_positives_is_zero_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.f1([0, 0], [0, 0]) == 0.0          # 0 / 0 -> 0


def test_mcc_on_a_two_by_two_table():
    # TP=3, TN=2, FP=1, FN=1
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 1) / sqrt(4*4*3*3) = 5/12
    preds = [1, 1, 1, 0, 0, 1, 0]
    labels = [1, 1, 1, 0, 0, 0, 1]
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(5 / 12)


def test_pearson_three_points():
    # x = [1,2,3], y = [1,3,2]; deviations dx = [-1,0,1], dy = [-1,1,0]
    # r = sum(dx dy) / sqrt(sum dx^2 * sum dy^2) = 1 / sqrt(2 * 2) = 0.5
    assert M.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_spearman_four_points():
    # ranks x = [1,2,3,4], ranks y = [1,3,2,4]; d = [0,-1,1,0], sum d^2 = 2
    # rho = 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 12 / 60 = 0.8
    assert M.spearman([10, 20, 30, 40], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_spearman_with_ties_uses_average_ranks():
    # ranks x = [1, 2.5, 2.5, 4], ranks y = [1,2,3,4]; centred: dx = [-1.5,0,0,1.5], dy = [-1.5,-.5,.5,1.5]
    # rho = 4.5 / sqrt(4.5 * 5) = 0.948683...
    assert M.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_constant_predictions_give_zero_not_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # no ConstantInputWarning either
        assert M.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
        assert M.spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
        assert M.pearson([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) == 0.0
        assert M.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0


@pytest.mark.parametrize("task", list(M.TASK_METRICS))
def test_metric_names_per_task(task):
    labels = [0.0, 2.0, 5.0] if task == "stsb" else [0, 1, 0]
    out = M.glue_task_metrics(task, labels, labels)
    assert tuple(out) == M.TASK_METRICS[task]
    assert all(v == pytest.approx(1.0) for v in out.values())   # perfect predictions


def test_invalid_binary_prediction_counts_wrong_both_ways():
    # mrpc: preds [1, None, 0, None], labels [1, 1, 0, 0] -> None becomes the other class: [1, 0, 0, 1]
    # TP=1, FN=1 (None on a 1), TN=1, FP=1 (None on a 0): F1 = 2 / (2 + 1 + 1) = 0.5, accuracy 2/4
    out = M.glue_task_metrics("mrpc", [1, None, 0, None], [1, 1, 0, 0])
    assert out == {"f1": pytest.approx(0.5), "accuracy": pytest.approx(0.5)}


def test_invalid_prediction_in_cola():
    # preds [1, None, 0, 0], labels [1, 1, 0, 0] -> [1, 0, 0, 0]: TP=1, FN=1, TN=2, FP=0
    # MCC = (1*2 - 0*1) / sqrt((1+0)(1+1)(2+0)(2+1)) = 2 / sqrt(12)
    assert M.glue_task_metrics("cola", [1, None, 0, 0], [1, 1, 0, 0])["mcc"] == pytest.approx(2 / math.sqrt(12))


def test_invalid_prediction_in_mnli_is_a_miss():
    assert M.glue_task_metrics("mnli", [0, None, 2], [0, 1, 2])["accuracy"] == pytest.approx(2 / 3)


def test_invalid_stsb_prediction_takes_the_far_end_of_the_range():
    # preds [None, 1, 4], labels [4, 1, 4]: gold 4 >= 2.5 so None -> 0.0; x = [0, 1, 4], y = [4, 1, 4]
    # dx = [-5/3, -2/3, 7/3], dy = [1, -2, 1]; sum dx dy = 2; sum dx^2 = 78/9; sum dy^2 = 6
    # pearson = 2 / sqrt(78/9 * 6) = 2 / sqrt(52)
    # spearman: ranks x = [1,2,3], ranks y = [2.5,1,2.5]; centred dy = [.5,-1,.5], dx = [-1,0,1]: cov 0 -> 0
    out = M.glue_task_metrics("stsb", [None, 1.0, 4.0], [4.0, 1.0, 4.0])
    assert out["pearson"] == pytest.approx(2 / math.sqrt(52))
    assert out["spearman"] == pytest.approx(0.0, abs=1e-12)
    # a gold score below 2.5 gets 5.0: x = [5, 1, 4], y = [1, 1, 4]; dx = [5/3, -7/3, 2/3], dy = [-1, -1, 2]
    # sum dx dy = (-5 + 7 + 4) / 3 = 2; sum dx^2 = 78/9; sum dy^2 = 6 -> pearson = 2 / sqrt(52) (1.0 if answered 1.0)
    assert M.glue_task_metrics("stsb", [None, 1.0, 4.0], [1.0, 1.0, 4.0])["pearson"] == pytest.approx(2 / math.sqrt(52))


def test_glue_score_and_average():
    # mrpc: (0.8 + 0.7) / 2 = 0.75; cola: 0.25; average = (0.75 + 0.25) / 2 = 0.5
    per_task = {"mrpc": {"f1": 0.8, "accuracy": 0.7}, "cola": {"mcc": 0.25}}
    assert M.glue_score(per_task["mrpc"]) == pytest.approx(0.75)
    assert M.average(per_task) == pytest.approx(0.5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'"):
        M.glue_task_metrics("wnli", [0], [0])
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        M.glue_task_metrics("rte", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="no examples"):
        M.accuracy([], [])
    with pytest.raises(ValueError):
        M.glue_score({})
    with pytest.raises(ValueError):
        M.average({})
