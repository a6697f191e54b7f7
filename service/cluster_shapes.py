"""The nodes a Ray cluster has or can start: the shapes the launcher checks each trial's resources against.

Three sources, all of the cluster in use (RAY_ADDRESS):
- its live nodes (``ray.nodes()``);
- the node groups its autoscaler reported to the GCS (Ray's autoscaler v2, KubeRay):
  ``autoscaler_pb2.ClusterConfig.node_group_configs``, the record Ray Data reads for the same purpose;
- the autoscaler config ``ray up`` writes on the head, ``~/ray_bootstrap_config.yaml`` (ray_cluster.yaml
  hands it to ``ray start --autoscaling-config``): read when the driver runs on the head, as it does under
  ``ray job submit``. ``SMEAR_AUTOSCALING_CONFIG`` names another path (an autoscaler config in the same
  format, e.g. ray_cluster.yaml itself).
A node type whose resources the config does not state (left to the cloud provider) is ``unknown``, and so
is everything an autoscaler could start when its node types cannot be read from here (KubeRay's autoscaler
v1 reads them from the RayCluster resource): the launcher then refuses nothing, since it cannot be sure.
Whether an autoscaler runs: v2 says so in the GCS; v1's monitor writes its status there every few seconds,
and a cluster without an autoscaler config gets a read-only one that names each live node's type
``node_<node id>`` (Ray's ``format_readonly_node_type``), which starts nothing.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

AUTOSCALING_CONFIG_ENV = "SMEAR_AUTOSCALING_CONFIG"
DEFAULT_AUTOSCALING_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class Shape:
    """One kind of node: its CPUs and GPUs, and how many of it the cluster has or can start (inf: no cap)."""
    name: str
    cpu: float
    gpu: float
    count: float = 1


@dataclass
class Shapes:
    live: list[Shape] = field(default_factory=list)       # one per live node
    types: list[Shape] = field(default_factory=list)      # the autoscaler's node types (count = max nodes)
    unknown: list[str] = field(default_factory=list)      # what could start nodes of sizes not known here

    @property
    def all(self) -> list[Shape]:
        return self.live + self.types

    def room_for(self, cpu: float, gpu: float) -> float:
        """How many bundles of ``cpu`` CPUs and ``gpu`` GPUs the nodes the cluster has or can start hold at
        most (live nodes may be of the node types too: an upper bound; inf: no cap)."""
        room = 0.0
        for s in self.all:
            per_node = min((math.floor(have / need + 1e-9) for have, need in ((s.cpu, cpu), (s.gpu, gpu)) if need),
                           default=math.inf)
            room += per_node * s.count if per_node else 0.0
        return room

    def describe(self) -> str:
        """One clause, e.g. ``live nodes: 1x cpu=2 gpu=0; node types: gpu_1x cpu=4 gpu=1 (max 8)``."""
        live = Counter((s.cpu, s.gpu) for s in self.live)
        parts = []
        if live:
            parts.append("live nodes: " + ", ".join(f"{n}x cpu={c:g} gpu={g:g}" for (c, g), n in sorted(live.items())))
        if self.types:
            parts.append("node types: " + ", ".join(
                f"{s.name} cpu={s.cpu:g} gpu={s.gpu:g} (max {'unlimited' if s.count == math.inf else f'{s.count:g}'})"
                for s in self.types))
        return "; ".join(parts) or "no live node and no node type"


def live_shapes(nodes: list[dict]) -> list[Shape]:
    """``ray.nodes()`` entries: the alive ones, with their total resources."""
    return [Shape(f"node {n.get('NodeManagerAddress', '?')}", float(n["Resources"].get("CPU", 0)),
                  float(n["Resources"].get("GPU", 0)))
            for n in nodes if n.get("Alive")]


def shapes_from_cluster_config(config) -> list[Shape]:
    """An ``autoscaler_pb2.ClusterConfig``'s node groups that can have a node (max_count -1: no cap)."""
    out = []
    for g in config.node_group_configs:
        if g.max_count == 0:
            continue
        count = math.inf if g.max_count < 0 else float(g.max_count)
        out.append(Shape(g.name, float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)), count))
    return out


def shapes_from_autoscaling_yaml(config: dict) -> tuple[list[Shape], list[str]]:
    """An autoscaler config's ``available_node_types`` (node types that can have a node), and the names of
    those whose ``resources`` do not state CPU. A worker type's ``max_workers`` defaults to the cluster's,
    and is capped by it; the head type has one node."""
    types = config.get("available_node_types") or {}
    cluster_max = config.get("max_workers", math.inf)
    head = config.get("head_node_type")
    shapes, unknown = [], []
    for name, t in types.items():
        t = t or {}
        count = 1.0 if name == head else float(min(t.get("max_workers", cluster_max), cluster_max))
        if count == 0:
            continue
        res = t.get("resources") or {}
        if "CPU" not in res:
            unknown.append(name)
            continue
        shapes.append(Shape(name, float(res["CPU"]), float(res.get("GPU", 0)), count))
    return shapes, unknown


def runs_node_starting_autoscaler(status: dict | None) -> bool:
    """From autoscaler v1's status record (``__autoscaling_status`` in the GCS): whether it manages node types
    of a config (it can start nodes), not the read-only mirror of the live nodes a plain ``ray start`` gets."""
    report = (status or {}).get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    types = set(mapping.values()) | set(report.get("active_nodes") or {})
    return any(t != f"node_{node_id}" for node_id, t in mapping.items()) or any(not t.startswith("node_") for t in types)


STATUS_WAIT_S = 20  # autoscaler v1 writes its first status a few seconds after the head starts


def _autoscaler_starts_nodes(wait_s: float = STATUS_WAIT_S) -> bool:
    """Whether the connected cluster runs an autoscaler that can start nodes (see the module's docstring)."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return True
    except Exception:
        pass
    deadline = time.monotonic() + wait_s
    while True:
        try:
            raw = _internal_kv_get("__autoscaling_status")
            status = json.loads(raw) if raw else None
        except Exception:  # not readable (e.g. through Ray Client): it may start nodes, refuse nothing
            return True
        if status and status.get("autoscaler_report") is not None:
            return runs_node_starting_autoscaler(status)
        if time.monotonic() > deadline:
            return False  # no monitor: nothing starts nodes
        time.sleep(1.0)


def autoscaling_yaml() -> dict | None:
    """The autoscaler config on this node (see the module's docstring), or None where there is none."""
    import yaml

    path = Path(os.environ.get(AUTOSCALING_CONFIG_ENV) or DEFAULT_AUTOSCALING_CONFIG).expanduser()
    if not path.is_file():
        return None
    with open(path) as f:
        config = yaml.safe_load(f)
    return config if isinstance(config, dict) else None


def cluster_shapes() -> Shapes:
    """Connects to the cluster at RAY_ADDRESS (service.runner.connect_ray; nothing is started) and reads
    its shapes from the three sources."""
    import ray

    from service.runner import connect_ray

    connect_ray()
    shapes = Shapes(live=live_shapes(ray.nodes()))
    try:  # the GCS record (absent without autoscaler v2; not readable through Ray Client)
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:
        config = None
    if config is not None:
        shapes.types = shapes_from_cluster_config(config)
    yaml_config = autoscaling_yaml()
    if yaml_config is not None:
        named = {s.name for s in shapes.types}
        types, unknown = shapes_from_autoscaling_yaml(yaml_config)
        shapes.types += [s for s in types if s.name not in named]
        shapes.unknown = [n for n in unknown if n not in named]
    if not shapes.types and _autoscaler_starts_nodes():
        shapes.unknown.append("the autoscaler's node types (not readable from this node)")
    return shapes
