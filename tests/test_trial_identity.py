"""What a trial asks of Ray (trainables/resources.py), the sweep's one trial identity (trainables/identity.py), and a
failure's kind found by its type (trainables/ray_trainable.py)."""
from __future__ import annotations

import pickle

import pytest

from smear.configs import ConfigError
from trainables.identity import TRIAL_KEY, SweepTrials
from trainables.resources import DRIVER_CPU, TrialResources
from trainables.settings import make_config


def test_one_worker_trial_holds_its_own_resources():
    r = TrialResources.of(make_config({"num_workers": 1}), {"cpu": 2, "gpu": 0.25})
    assert r.own == (2.0, 0.25) and r.bundles == [(2.0, 0.25)] and r.total == (2.0, 0.25)
    assert r.tune_request() == {"CPU": 2.0, "GPU": 0.25}
    assert r.placement_group().bundles == [{"CPU": 2.0, "GPU": 0.25}]


def test_data_parallel_trial_holds_almost_nothing_and_its_workers_the_rest():
    r = TrialResources.of(make_config({"num_workers": 4, "batch_size": 128, "use_gpu": True}), {"cpu": 8, "gpu": 1})
    assert r.own == (DRIVER_CPU, 0.0)
    assert r.bundles == [(DRIVER_CPU, 0.0)] + [(8.0, 1.0)] * 4
    assert r.total == pytest.approx((DRIVER_CPU + 32, 4.0))
    assert r.tune_request() == {"CPU": DRIVER_CPU}
    sc = r.scaling_config()
    assert (sc.num_workers, sc.use_gpu, sc.resources_per_worker) == (4, True, {"CPU": 8.0, "GPU": 1.0})


def test_fractional_gpus_with_several_workers_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"resources.gpu=0.5 is fractional with num_workers=2; .*whole GPUs"):
        TrialResources.of(make_config({"num_workers": 2, "batch_size": 8}), {"cpu": 1, "gpu": 0.5})


def test_the_trial_identity_resolves_an_index_and_an_optuna_config_alike():
    configs = [{"setting": "resnet_domainnet", "seed": s, "routing": {"method": m}} for s in (0, 1) for m in ("smear", "tag")]
    trials = SweepTrials(configs, {"resnet_domainnet": {"cpu": 1.5, "gpu": 0.0}})
    assert trials.config({TRIAL_KEY: 3}) is configs[3]
    typed = trials.typed({TRIAL_KEY: 3})
    assert (typed.seed, typed.routing.method) == (1, "tag") and trials.typed({TRIAL_KEY: 3}) is typed  # built once
    assert trials.run_name({TRIAL_KEY: 2}, "abc_00002") == "smear-s1-abc_00002"
    assert trials.resources_of({TRIAL_KEY: 0}).total == (1.5, 0.0)
    optuna = SweepTrials(None, {"resnet_domainnet": {"cpu": 1, "gpu": 0}})
    assert optuna.typed(configs[1]).routing.method == "tag" and optuna.method(configs[1]) == "tag"
    again = pickle.loads(pickle.dumps(trials))  # Tune pickles it into the trainable and the tracker's state
    assert again.configs == configs and again.resources == trials.resources and again._typed == {}


def test_a_failure_kind_is_found_by_type_through_ray_trains_wrappers():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from trainables.ray_trainable import raised
    from trainables.step import NonFiniteLoss

    diverged = NonFiniteLoss("non-finite training loss nan at step 7")
    group = WorkerGroupError("training failed", {0: RuntimeError("other"), 1: diverged})
    assert raised(group, NonFiniteLoss) is diverged
    assert raised(ControllerError(group), NonFiniteLoss) is diverged
    try:
        try:
            raise diverged
        except NonFiniteLoss as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert raised(outer, NonFiniteLoss) is diverged
    # a message that merely mentions the name is not that failure
    assert raised(RuntimeError("NonFiniteLoss: mentioned, not raised"), NonFiniteLoss) is None
