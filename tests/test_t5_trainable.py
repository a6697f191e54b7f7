"""The T5-GLUE setting through the train loop (no Ray): per-task metrics, routing, AdaMix's two passes."""
from __future__ import annotations

import pytest

from smear.data.glue import TASKS
from smear.metrics import TASK_METRICS
from trainables.loop import LocalSession, train_loop


def _cfg(method="smear", **over):
    cfg = {"setting": "t5_glue", "steps": 2, "eval_every": 2, "batch_size": 8, "eval_batch_size": 64,
           "warmup_steps": 1, "torch_threads": 1, "routing": {"method": method},
           "t5": {"val_holdout": 20, "eval_limit": 4, "max_target_len": 16}}
    cfg.update(over)
    return cfg


def test_every_task_metric_and_the_average(offline_data, tmp_path):
    s = LocalSession(str(tmp_path))
    final = train_loop(_cfg(), s)
    val = s.reports[0]
    for prefix, rep in (("val", val), ("test", final)):
        for task in TASKS:
            for m in TASK_METRICS[task]:
                assert f"{prefix}/{task}/{m}" in rep, (prefix, task, m)
        assert f"{prefix}/average" in rep
    assert "val/best_average" in final and final["step"] == 2
    assert any(k.startswith("routing/decoder.") and k.endswith("/entropy") for k in val)
    assert any(k.startswith("routing/encoder.") and k.endswith("/load_7") for k in val)  # 8 experts


@pytest.mark.parametrize("method", ["adamix", "soft_moe", "reinforce"])
def test_methods_with_extra_machinery_run_in_t5(offline_data, tmp_path, method):
    final = train_loop(_cfg(method), LocalSession(str(tmp_path)))
    assert -1.0 <= final["test/average"] <= 1.0


def test_rte_uses_mnli_expert_in_encoder_blocks_only(offline_data):
    from smear.routing import routing_blocks
    from trainables.settings import make_config
    from trainables.settings.t5_glue import T5Glue

    cfg = make_config(_cfg("tag"))
    assert cfg.t5.rte_to_mnli                                     # the official default
    setting = T5Glue(cfg)
    model = setting.build_model(cfg.routing)
    rte, mnli = TASKS.index("rte"), TASKS.index("mnli")
    for _, blk in routing_blocks(model):
        expected = mnli if blk.route_from == "self" else rte
        assert int(blk.method.task_to_expert[rte]) == expected
    own = make_config(_cfg("tag", t5={"rte_to_mnli": False}))    # the switch: RTE keeps its own expert
    for _, blk in routing_blocks(T5Glue(own).build_model(own.routing)):
        assert int(blk.method.task_to_expert[rte]) == rte


def test_token_granularity_refused_in_decoder(offline_data):
    from smear.configs import ConfigError
    from trainables.settings import make_config

    with pytest.raises(ConfigError, match="adaptive_granularity='token' is not valid in T5 decoder blocks"):
        make_config(_cfg(routing={"method": "adaptive_gating", "adaptive_granularity": "token"}))


def _decoded(setting, model, dataset) -> tuple[dict[int, str], list[list[int]]]:
    """Greedy decodes of ``dataset`` by example id, and each evaluation batch's source lengths (tokens)."""
    from torch.utils.data import DataLoader

    texts, lengths = {}, []
    for raw in DataLoader(dataset, batch_size=8, collate_fn=setting.collate):
        b = setting.batch_to_model(raw, "cpu")
        out = model.generate(b.inputs["input_ids"], b.inputs["attention_mask"], 16)
        texts.update(zip(b.ids.tolist(), setting.tokenizer.batch_decode(out, skip_special_tokens=True)))
        lengths.append(raw["attention_mask"].sum(1).tolist())
    return texts, lengths


def test_evaluation_sorted_by_length_changes_no_prediction_and_no_metric(offline_data):
    """Issue 13: evaluation splits run longest source first; each example decodes to the same text as in the
    file order, and the metrics, computed on the same pairs in another order, are identical."""
    import torch

    from smear.routing import set_context
    from trainables.settings import make_config
    from trainables.evaluation import evaluate
    from trainables.settings.t5_glue import T5Glue

    cfg = make_config(_cfg(eval_batch_size=8))
    setting = T5Glue(cfg)
    model = setting.build_model(cfg.routing).eval()
    ordered = setting.dataset("test")
    plain = ordered.dataset                                   # the GlueMixture in file order
    assert list(ordered.indices) != list(range(len(plain)))  # the order did change
    set_context(model, task_ids=torch.zeros(1, dtype=torch.long))
    sorted_texts, sorted_lengths = _decoded(setting, model, ordered)
    plain_texts, _ = _decoded(setting, model, plain)
    assert sorted_texts == plain_texts
    flat = [n for batch in sorted_lengths for n in batch]
    assert flat == sorted(flat, reverse=True)                 # longest first, so batches pad little
    from torch.utils.data import DataLoader

    def metrics(ds):
        return evaluate(setting, model, DataLoader(ds, batch_size=8, collate_fn=setting.collate), "cpu", "test")[0]

    assert metrics(ordered) == metrics(plain)


def test_glue_metrics_do_not_depend_on_the_order_of_the_examples(offline_data):
    """Correlations sum in float: the setting computes them on the pairs in a canonical order."""
    import random

    from trainables.settings import make_config
    from trainables.settings.t5_glue import T5Glue

    setting = T5Glue(make_config(_cfg()))
    rng = random.Random(0)
    stsb, cola = setting.group_names.index("stsb"), setting.group_names.index("cola")
    rows = [(round(rng.uniform(0, 5), 1), round(rng.uniform(0, 5), 6), stsb) for _ in range(200)]
    rows += [(rng.choice([0, 1, None]), rng.choice([0, 1]), cola) for _ in range(200)]
    first = setting.metrics(*map(list, zip(*rows)), "test")
    for _ in range(5):
        rng.shuffle(rows)
        assert setting.metrics(*map(list, zip(*rows)), "test") == first
    assert 0 < abs(first["test/stsb/pearson"]) < 1 and first["test/cola/score"] != 0
