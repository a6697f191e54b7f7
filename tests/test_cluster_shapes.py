"""Issue 12: on a cluster (RAY_ADDRESS), a trial no node the cluster has or can start could hold is refused
before anything starts. The node shapes from each source's real format: the repository's own
ray_cluster.yaml (the autoscaler config `ray up` writes to the head), an autoscaler v2 ClusterConfig record,
and `ray.nodes()` entries (a real cluster's: tests/test_job_submit.py)."""
from __future__ import annotations

import math

import pytest
import yaml

from service.cluster_shapes import (Shape, Shapes, live_shapes, shapes_from_autoscaling_yaml,
                                    shapes_from_cluster_config)
from service.preflight import check_cluster_resources
from service.spaces import load_sweep
from smear.configs import ConfigError
from tests.helpers import REPO


@pytest.fixture(scope="module")
def shipped_cluster() -> Shapes:
    """ray_cluster.yaml's node types, as the autoscaler on its head reads them, plus its live CPU head."""
    types, unknown = shapes_from_autoscaling_yaml(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    return Shapes(live=[Shape("node head", 0, 0)], types=types, unknown=unknown)


def test_node_types_of_the_shipped_cluster_config(shipped_cluster):
    by_name = {s.name: s for s in shipped_cluster.types}
    assert by_name["gpu_1x_a10g"] == Shape("gpu_1x_a10g", 4, 1, 8)
    assert by_name["gpu_4x_a10g"] == Shape("gpu_4x_a10g", 48, 4, 2)
    assert by_name["head"].count == 1 and not shipped_cluster.unknown
    assert shipped_cluster.room_for(0.01, 0) == 8 * 4 / 0.01 + 2 * 48 / 0.01     # not on the CPU: 0 head
    assert shipped_cluster.room_for(1, 0.25) == 8 * 4 + 2 * 16 and shipped_cluster.room_for(8, 1) == 2 * 4
    assert "gpu_1x_a10g cpu=4 gpu=1 (max 8)" in shipped_cluster.describe()


@pytest.mark.parametrize("name", ["resnet-domainnet", "t5-glue", "default"])
def test_shipped_declarations_fit_the_shipped_cluster(shipped_cluster, name):
    check_cluster_resources(load_sweep(name), shipped_cluster)


def _sweep(name="resnet-domainnet", **resources):
    sweep = load_sweep(name)
    for res in sweep.resources.values():
        res.update(resources)
    return sweep


def test_a_trial_larger_than_every_node_type_is_refused_naming_them(shipped_cluster):
    with pytest.raises(ConfigError) as e:
        check_cluster_resources(_sweep(cpu=1, gpu=8), shipped_cluster)
    msg = str(e.value)
    assert "\n" not in msg and "gpu=8 on one node" in msg
    assert "gpu_4x_a10g cpu=48 gpu=4 (max 2)" in msg and "valid:" in msg
    with pytest.raises(ConfigError, match=r"cpu=64, gpu=1 on one node"):
        check_cluster_resources(_sweep("t5-glue", cpu=64, gpu=1), shipped_cluster)


def test_workers_spread_over_nodes_but_not_beyond_the_cluster(shipped_cluster):
    def workers(n, cpu):
        sweep = _sweep("t5-glue", cpu=cpu, gpu=1)
        for t in sweep.trials:
            t.config["num_workers"] = n
        return sweep

    check_cluster_resources(workers(16, 4), shipped_cluster)  # 8 one-GPU nodes + 2 four-GPU nodes
    with pytest.raises(ConfigError, match=r"32 workers of cpu=4, gpu=1.* at most 16 of them"):
        check_cluster_resources(workers(32, 4), shipped_cluster)
    check_cluster_resources(workers(8, 8), shipped_cluster)   # 8 CPUs: only the four-GPU nodes hold one
    with pytest.raises(ConfigError, match=r"16 workers of cpu=8, gpu=1.* at most 8 of them"):
        check_cluster_resources(workers(16, 8), shipped_cluster)


def test_live_nodes_only_a_cpu_cluster_refuses_gpus_and_use_gpu():
    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 2.0, "memory": 1e9}},
             {"Alive": False, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    shapes = Shapes(live=live_shapes(nodes))
    assert shapes.describe() == "live nodes: 1x cpu=2 gpu=0"        # the dead node does not count
    with pytest.raises(ConfigError, match=r"gpu=0.25 on one node.*live nodes: 1x cpu=2 gpu=0"):
        check_cluster_resources(_sweep(), shapes)
    sweep = _sweep(cpu=2, gpu=0)
    assert all(t.config["use_gpu"] for t in sweep.trials)     # the declaration's, for its GPU nodes
    with pytest.raises(ConfigError, match=r"use_gpu=True but no node .* a GPU: live nodes: 1x cpu=2 gpu=0"):
        check_cluster_resources(sweep, shapes)
    for t in sweep.trials:
        t.config["use_gpu"] = False
    check_cluster_resources(sweep, shapes)


def test_autoscaler_v2_node_groups():
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, res, max_count in (("cpu", {"CPU": 8}, -1), ("a100", {"CPU": 96, "GPU": 8}, 2),
                                 ("off", {"CPU": 8, "GPU": 8}, 0)):
        g = config.node_group_configs.add(name=name, max_count=max_count)
        g.resources.update(res)
    config = autoscaler_pb2.ClusterConfig.FromString(config.SerializeToString())   # as the GCS stores it
    shapes = Shapes(types=shapes_from_cluster_config(config))
    assert [s.name for s in shapes.types] == ["cpu", "a100"] and shapes.types[0].count == math.inf
    assert shapes.room_for(1, 0) == math.inf and shapes.room_for(1, 1) == 16
    assert "cpu cpu=8 gpu=0 (max unlimited)" in shapes.describe()
    check_cluster_resources(_sweep(cpu=8, gpu=8), shapes)
    with pytest.raises(ConfigError, match="gpu=9 on one node"):
        check_cluster_resources(_sweep(cpu=8, gpu=9), shapes)


def test_a_node_type_of_unknown_size_refuses_nothing(capsys):
    types, unknown = shapes_from_autoscaling_yaml({
        "max_workers": 4, "head_node_type": "head",
        "available_node_types": {"head": {"resources": {"CPU": 0}}, "gpu": {"max_workers": 2, "node_config": {}},
                                 "never": {"max_workers": 0, "resources": {"CPU": 1}}}})
    assert unknown == ["gpu"] and [s.name for s in types] == ["head"]
    check_cluster_resources(_sweep(cpu=1, gpu=8), Shapes(types=types, unknown=unknown))
    assert "note: trial resources not checked against the cluster: gpu unknown" in capsys.readouterr().err
    capped, _ = shapes_from_autoscaling_yaml({"max_workers": 3, "available_node_types": {
        "w": {"resources": {"CPU": 4, "GPU": 1}}}})
    assert capped == [Shape("w", 4, 1, 3)]     # a type's max_workers defaults to the cluster's


def test_an_autoscaler_that_starts_nodes_is_told_from_the_read_only_mirror_of_a_plain_cluster():
    from service.cluster_shapes import runs_node_starting_autoscaler

    node = "b65fbccc36b0fd450c225566552386e1fc4e991b4807dbe5f03bcb10"
    plain = {"autoscaler_report": {"active_nodes": {f"node_{node}": 1}, "node_type_mapping": {node: f"node_{node}"},
                                   "pending_launches": {}, "legacy": True}}   # `ray start --head`, as read there
    assert not runs_node_starting_autoscaler(plain)
    kuberay = {"autoscaler_report": {"active_nodes": {"headgroup": 1}, "node_type_mapping": {node: "headgroup"}}}
    assert runs_node_starting_autoscaler(kuberay)
    assert not runs_node_starting_autoscaler(None) and not runs_node_starting_autoscaler({"load_metrics_report": {}})
