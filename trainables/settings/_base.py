"""The contract between the train loop (and the service) and a setting: ResNet-DomainNet, T5-GLUE, ...

A setting is one module in ``trainables/settings/`` that registers a :class:`Setting` subclass. The class
owns everything the rest of the code base asks about the setting:

- class level (the driver, before any trial): its typed config (``config_class``, a ``TrainConfig``
  subclass with the setting's own sections: a ResNet trial carries and logs no T5 field), its paper
  defaults (``defaults``), its offline smoke profile (``smoke``), its metric names (``primary_metric``, ``group_metric``, ``group_kind``),
  which groups a config trains on (:meth:`groups_of`), and its data check / offline stand-in
  (:meth:`prepare_data`);
- its measurement recipe (the throughput measurement and ``--dry-run --estimate``): the paper's shapes
  (``paper_shape``), what a step's work counts (``work_unit``, :meth:`batch_work`) and how a declared config
  runs on a machine without its data or weights (:meth:`calibration_config`);
- instance level (inside the trial): building the model and the data, the per-example loss, predictions
  and metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from smear.configs import ConfigError
from smear.routing import RoutingConfig
from trainables.config import TrainConfig


@dataclass
class Batch:
    inputs: dict[str, Any]   # what the model consumes
    targets: Any             # (b,) labels or (b, t) target token ids
    groups: torch.Tensor     # (b,) task / domain ids
    ids: torch.Tensor        # (b,) example ids (hash routing, curriculum)
    labels: list | None = None  # task labels for metrics when targets are token ids


class Setting:
    """Base class of every setting; subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]                    # registry key, the value of ``setting`` in a config
    config_class: ClassVar[type[TrainConfig]]
    defaults: ClassVar[dict[str, Any]]     # the paper's values, applied under whatever a declaration sets
    smoke: ClassVar[dict[str, Any]]        # --smoke: dotted overrides that make any trial run offline on a laptop
    primary_metric: ClassVar[str]          # val/<primary_metric> selects the best checkpoint; test/<it> is reported
    group_metric: ClassVar[str]            # test/<group>/<group_metric> per domain / task
    group_kind: ClassVar[str]              # "domain", "task": what a group is, for tables
    paper_shape: ClassVar[dict[str, Any]] = {}  # the paper's batch and input shapes (nested overrides)
    work_unit: ClassVar[str] = "examples"  # what batch_work counts: "images", "tokens", ...

    # --- the driver's questions (plain config dicts, nothing built) -----------------------------------
    @classmethod
    def groups_of(cls, config: dict[str, Any]) -> list[str]:
        """The groups (domains, tasks) a resolved config trains on, in task-id order."""
        raise NotImplementedError

    @classmethod
    def prepare_data(cls, config: dict[str, Any], *, create: bool, images: str = "header") -> None:
        """Check the data a resolved config needs (raise ``DataError``/``ConfigError`` with one line), or,
        for the offline stand-in (empty root), generate it here when ``create``. ``images``: "header" (every
        listed image's header) or "full" (every image decoded; ``--check-images``). A root this machine
        cannot see (a cluster's worker-only disk) is left to :meth:`verify_data` in each trial."""
        raise NotImplementedError

    @classmethod
    def check_reachable(cls, configs: list[dict[str, Any]]) -> None:
        """Before a local sweep starts: what these resolved configs need from outside the data (pretrained
        weights) is on this machine or downloadable from it; a one-line ``ConfigError`` when not. Nothing
        by default."""

    def verify_data(self) -> None:
        """The trial's first act, before any training: check the data if this node has not yet (cheap when
        it has). Nothing by default."""

    @classmethod
    def batch_work(cls, raw, batch_size: int) -> float:
        """The work in one raw (CPU) training batch, in ``work_unit``, without a device read: its examples by
        default."""
        return float(batch_size)

    @classmethod
    def calibration_config(cls, config: dict[str, Any], *, data_dir: Path, lines: int, local: bool) -> dict[str, Any]:
        """``config`` (a resolved trial config, a copy to change) made runnable on this machine at the same
        shapes: weights that would be downloaded replaced by random ones of the same architecture and, unless
        its data root is ``local``, data in the real format generated under ``data_dir`` with ``lines``
        training examples (``smear.data.calibration``)."""
        raise ConfigError(f"setting={cls.name!r}: no calibration recipe; valid: a setting that defines "
                          "calibration_config")

    @classmethod
    def data_key(cls, config: dict[str, Any]) -> tuple:
        """Configs with the same key need the same data check (the launcher checks each key once)."""
        return (cls.name, config["data"]["root"], tuple(cls.groups_of(config)))

    @classmethod
    def record_tags(cls, config: dict[str, Any]) -> dict[str, str]:
        """Tags each trial's MLflow run carries, so that a report needs no copy of the metric names."""
        return {"setting": cls.name, "primary_metric": cls.primary_metric, "group_metric": cls.group_metric,
                "group_kind": cls.group_kind, "groups": ",".join(cls.groups_of(config))}

    # --- the trial's side ----------------------------------------------------------------------------
    group_names: list[str]                 # tasks or domains, indexed by task id
    collate: Callable | None = None

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def build_model(self, routing: RoutingConfig) -> nn.Module:
        """The routed model; ``routing`` is the trial's routing config sized to the data (hash tables)."""
        raise NotImplementedError

    def place_model(self, model: nn.Module, device: torch.device | str) -> nn.Module:
        """``model`` on ``device``, in the layout that runs fastest there (ResNet: channels_last on CUDA)."""
        return model.to(device)

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def batch_to_model(self, batch, device) -> Batch:
        raise NotImplementedError

    def per_example_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(per-example loss (b,), output logits, mask over the logits' positions or None). The loop may call it
        under a bf16 autocast: the loss is computed from ``logits.float()``, so it is float32 either way."""
        raise NotImplementedError

    def predict(self, model: nn.Module, batch: Batch) -> list:
        raise NotImplementedError

    def metrics(self, preds: list, targets: list, groups: list[int], prefix: str) -> dict[str, float]:
        raise NotImplementedError
