"""The T5-GLUE setting: routed T5 v1.1 on the eight GLUE tasks, text-to-text, task id = GLUE task.

methods.md section 2. Training: token cross-entropy with label smoothing, summed over target tokens
as in the reference (``t5.loss_reduction="mean"`` averages instead), mean over examples. Evaluation:
greedy generation, decoded text mapped back to a label (text that maps to no label counts wrong),
per-task metrics (accuracy, F1, MCC, Pearson/Spearman), each task's score = mean of its metrics,
``average`` = mean over tasks (the best checkpoint is chosen on ``val/average``).
Data root: ``""`` = the offline synthetic GLUE stand-in, ``"hub"`` = ``nyu-mll/glue`` (internet), else a
local copy in the Hub's layout.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from smear.backbones.t5 import architecture, build_routed_t5, check_decoder_support, check_pretrained
from smear.configs import ConfigError, field
from smear.data import glue, offline_synthetic_glue
from smear.data.glue import GlueMixture, make_collate, parse_prediction
from smear.metrics import glue_score, glue_task_metrics
from smear.routing import RoutingConfig, share_task_experts
from trainables.config import TrainConfig
from trainables.settings import Batch, Setting, register_setting


def load_tokenizer(name: str):
    if name == "byt5":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def glue_root(root: str) -> str | None:
    return offline_synthetic_glue() if root == "" else (None if root == "hub" else root)


def by_source_length(mixture: GlueMixture) -> Dataset:
    """``mixture`` reordered by the character length of each example's source, longest first (ties by example
    id). Characters stand in for tokens: monotone for ByT5's bytes, close for T5's sentencepiece, and cheap."""
    lengths = [len(mixture[i]["source"]) for i in range(len(mixture))]
    return Subset(mixture, sorted(range(len(mixture)), key=lambda i: (-lengths[i], i)))


def _canonical(pair: tuple) -> tuple:
    """A sort key of (prediction, gold) pairs; an unparsed prediction (None) sorts first."""
    p, y = pair
    return (p is not None, p if p is not None else 0, y)


@dataclass
class T5Settings:
    model: str = field("tiny", doc="'tiny' (random T5 v1.1-shaped, offline) or a name/path, e.g. google/t5-v1_1-base")
    tokenizer: str = field("byt5", doc="'byt5' (ByT5Tokenizer, no files needed) or a name/path")
    d_model: int = field(64, ge=8, doc="tiny model only")
    d_ff: int = field(128, ge=8, doc="tiny model only")
    num_layers: int = field(2, ge=1, doc="tiny model only: encoder and decoder layers each")
    num_heads: int = field(4, ge=1, doc="tiny model only")
    d_kv: int = field(0, ge=0, doc="tiny model only: size of one attention head; 0 = d_model // num_heads")
    vocab_size: int = field(0, ge=0, doc="tiny model only: output vocabulary; 0 = the tokenizer's (T5 v1.1: 32128, "
                                         "for random weights of the paper's shapes)")
    tasks: list[str] = field(["rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola"])
    max_source_len: int = field(128, ge=8)
    max_target_len: int = field(16, ge=2)
    loss_reduction: str = field("sum", choices=("sum", "mean"), doc="over target tokens: sum (reference) or mean")
    rte_to_mnli: bool = field(True, doc="tag routing: RTE uses MNLI's expert in encoder blocks (official: "
                                        "task_routing_same_rte_mnli_onlyencoder.json); false = RTE's own expert")
    val_holdout: int = field(1000, ge=1, doc="training examples held out as validation for qqp, qnli, sst2")
    eval_limit: int = field(0, ge=0, doc="evaluate on the first N examples of each task's split; 0 = all")

    def validate(self) -> None:
        valid = ("rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola")
        bad = [t for t in self.tasks if t not in valid]
        if bad or not self.tasks:
            raise ConfigError(f"t5.tasks has unknown task {(bad or [''])[0]!r}; valid: {', '.join(valid)}")
        dup = next((t for i, t in enumerate(self.tasks) if t in self.tasks[:i]), None)
        if dup is not None:
            raise ConfigError(f"t5.tasks has {dup!r} twice; valid: each task once")
        if self.rte_to_mnli and "rte" in self.tasks and "mnli" not in self.tasks:
            raise ConfigError("t5.rte_to_mnli=True routes RTE with MNLI's expert, but mnli is not in t5.tasks; "
                              "valid: add mnli to t5.tasks, or set t5.rte_to_mnli: false")


@dataclass
class T5GlueConfig(TrainConfig):
    t5: T5Settings = dc_field(default_factory=lambda: T5Settings())

    def validate(self) -> None:
        super().validate()
        check_decoder_support(self.routing)
        if self.t5.model == "tiny" and self.routing.rank > self.t5.d_model:  # a named model: checked with its files
            raise ConfigError(f"routing.rank={self.routing.rank} exceeds the blocks' width t5.d_model="
                              f"{self.t5.d_model}; valid: 1 to {self.t5.d_model}")


@register_setting
class T5Glue(Setting):
    name = "t5_glue"
    config_class = T5GlueConfig
    defaults = {  # the paper's values (methods.md section 2; the official configs/adapter/*.json and trainer)
        "steps": 600_000, "eval_every": 5_000, "batch_size": 128, "optimizer": "adamw", "lr": 3e-4,
        "warmup_steps": 2_000, "grad_clip": 1.0, "label_smoothing": 0.1, "batch_loss": "sum",
        "routing": {"num_experts": 8, "rank": 24, "gumbel_anneal_rate": 1e-6, "gumbel_update_every": 5_000,
                    "gumbel_step_offset": 1},
    }
    smoke = {  # the tiny random T5 with ByT5's tokenizer, the synthetic GLUE stand-in, CPU
        "t5.model": "tiny", "t5.tokenizer": "byt5", "data.root": "", "use_gpu": False, "torch_threads": 1,
    }
    primary_metric, group_metric, group_kind = "average", "score", "task"
    # methods.md section 2: T5 v1.1-base, batch 128, 128 source tokens
    paper_shape = {"batch_size": 128, "t5": {"model": "google/t5-v1_1-base", "max_source_len": 128}}
    work_unit = "tokens"  # non-padding source tokens

    @classmethod
    def groups_of(cls, config: dict[str, Any]) -> list[str]:
        return list(config["t5"]["tasks"])

    @classmethod
    def prepare_data(cls, config: dict[str, Any], *, create: bool, images: str = "header") -> None:
        """A local copy in the Hub's layout is checked; "hub" is fetched in the trial; "" = the synthetic
        stand-in, generated here."""
        root = config["data"]["root"]
        if root == "":
            if create:
                offline_synthetic_glue()
        elif root != "hub":
            glue.check_root(root, config["t5"]["tasks"])

    @classmethod
    def batch_work(cls, raw, batch_size: int) -> float:
        return float(raw["attention_mask"].sum())

    @classmethod
    def calibration_config(cls, config: dict[str, Any], *, data_dir: Path, lines: int, local: bool) -> dict[str, Any]:
        """A named T5: random weights of its architecture (``smear.backbones.t5.architecture``) with ByT5's
        tokenizer (no download); GLUE texts long enough that every batch is the full ``max_source_len``."""
        shape = architecture(config["t5"]["model"])
        if shape is not None:
            config["t5"].update(model="tiny", tokenizer="byt5", **shape)
        elif config["t5"].get("tokenizer") != "byt5":
            config["t5"]["tokenizer"] = "byt5"
        if not local:
            from smear.data.calibration import write_glue_long

            per_task = max(64, math.ceil(lines * 1.25 / len(config["t5"]["tasks"])))
            config["data"]["root"] = str(write_glue_long(data_dir / "glue", per_task))
        return config

    @classmethod
    def check_reachable(cls, configs: list[dict[str, Any]]) -> None:
        """A named model's and tokenizer's files (local folder, Hugging Face cache, or downloadable); with
        the model's config at hand, the routing rank against its width (``d_model``)."""
        for source in dict.fromkeys(c["t5"]["model"] for c in configs if c["t5"]["model"] != "tiny"):
            d_model = check_pretrained(source, "model").get("d_model")
            rank = max(c["routing"]["rank"] for c in configs if c["t5"]["model"] == source)
            if d_model is not None and rank > d_model:
                raise ConfigError(f"routing.rank={rank} exceeds the blocks' width d_model={d_model} of "
                                  f"t5.model={source!r}; valid: 1 to {d_model}")
        for source in dict.fromkeys(c["t5"]["tokenizer"] for c in configs if c["t5"]["tokenizer"] != "byt5"):
            check_pretrained(source, "tokenizer")

    def __init__(self, cfg: T5GlueConfig):
        super().__init__(cfg)
        self.t5cfg = cfg.t5
        self.group_names = list(cfg.t5.tasks)
        self.root = glue_root(cfg.data.root)
        self.tokenizer = load_tokenizer(cfg.t5.tokenizer)
        self.collate = make_collate(self.tokenizer, cfg.t5.max_source_len, cfg.t5.max_target_len)

    def encoder_task_aliases(self) -> dict[int, int]:
        """Task ids routed as another task's in encoder blocks, for methods that route by task (the reference's
        task_routing_same_rte_mnli_onlyencoder.json: RTE as MNLI, with ``t5.rte_to_mnli``)."""
        if self.t5cfg.rte_to_mnli and {"rte", "mnli"} <= set(self.group_names):
            return {self.group_names.index("rte"): self.group_names.index("mnli")}
        return {}

    def build_model(self, routing: RoutingConfig) -> nn.Module:
        t = self.t5cfg
        vocab = len(self.tokenizer)
        if t.vocab_size and t.vocab_size < vocab:
            raise ConfigError(f"t5.vocab_size={t.vocab_size} is smaller than the tokenizer's {vocab} tokens; "
                              f"valid: 0 (the tokenizer's) or >= {vocab}")
        tiny = {"d_model": t.d_model, "d_ff": t.d_ff, "num_layers": t.num_layers, "num_decoder_layers": t.num_layers,
                "num_heads": t.num_heads, "d_kv": t.d_kv or max(1, t.d_model // t.num_heads),
                "vocab_size": t.vocab_size or vocab}
        model = build_routed_t5(routing, num_tasks=len(self.group_names), source=t.model, tiny=tiny)
        share_task_experts(model, self.encoder_task_aliases(), route_from="self")
        return model

    def dataset(self, split: str) -> Dataset:
        """The split's GlueMixture; evaluation splits in order of source length, longest first (issue 13), so that
        each evaluation batch pads (dynamic padding) to a length close to its examples' own and the first batch
        is the largest. Items keep their example ids, and :meth:`metrics` does not depend on the order."""
        limit = self.t5cfg.eval_limit if split != "train" and self.t5cfg.eval_limit else None
        mixture = GlueMixture(self.root, self.group_names, {"val": "validation"}.get(split, split),
                              heldout=self.t5cfg.val_holdout, limit=limit)
        return mixture if split == "train" else by_source_length(mixture)

    def batch_to_model(self, batch, device) -> Batch:
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        labels = batch["labels"].to(device)                                               # (b, t), -100 = pad
        return Batch(inputs, labels, batch["task_ids"].to(device), batch["example_ids"].to(device), labels=batch["gold"])

    def per_example_loss(self, model, batch: Batch):
        logits = model(batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.targets)  # (b, t, v)
        mask = batch.targets != -100                                                               # (b, t)
        tok = F.cross_entropy(logits.float().transpose(1, 2), batch.targets, reduction="none", ignore_index=-100,
                              label_smoothing=self.cfg.label_smoothing)                            # (b, t) float32
        per_ex = tok.sum(1)
        if self.t5cfg.loss_reduction == "mean":
            per_ex = per_ex / mask.sum(1).clamp_min(1)
        return per_ex, logits, mask

    @torch.no_grad()
    def predict(self, model, batch: Batch) -> list:
        core = model.module if hasattr(model, "module") else model
        out = core.generate(batch.inputs["input_ids"], batch.inputs["attention_mask"], self.t5cfg.max_target_len)
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [parse_prediction(self.group_names[g], t) for g, t in zip(batch.groups.tolist(), texts)]

    def metrics(self, preds: list, targets: list, groups: list[int], prefix: str) -> dict[str, float]:
        """Per task its GLUE metrics, on the (prediction, gold) pairs in a canonical order, so that the values do
        not depend on the order of evaluation (the sums inside a correlation would round differently)."""
        out, scores = {}, []
        for i, task in enumerate(self.group_names):
            pairs = sorted(((x, y) for x, y, g in zip(preds, targets, groups) if g == i), key=_canonical)
            if not pairs:
                continue
            m = glue_task_metrics(task, [x for x, _ in pairs], [y for _, y in pairs])
            out.update({f"{prefix}/{task}/{k}": v for k, v in m.items()})
            scores.append(glue_score(m))
            out[f"{prefix}/{task}/score"] = scores[-1]
        out[f"{prefix}/average"] = statistics.fmean(scores) if scores else 0.0
        return out
