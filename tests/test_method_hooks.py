"""Issue 11, item 4: the routing contract's hooks replace method branches in the loop and the package face.

A method that needs loop machinery (a per-step scalar, a second pass, an epoch order) declares it in its
own file; the train loop and ``smear.routing`` ask the hooks and name no method.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from smear.routing import available_methods, epoch_sampler, step_scalars
from smear.routing._registry import _METHODS, register_method
from smear.routing.methods.adapter import Adapter

REPO = Path(__file__).resolve().parent.parent


def _string_constants(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


# that no file outside a method's own names it: tests/test_architecture.py (every source file)


def test_every_method_is_one_file_of_the_methods_package():
    files = {p.stem for p in (REPO / "smear" / "routing" / "methods").glob("*.py") if p.stem != "__init__"}
    assert files == set(available_methods())


class _Order:
    """A toy EpochSampler: the reverse order, recording what the loop tells it."""

    def __init__(self, n: int):
        self.n, self.epochs, self.observed = n, [], 0

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def observe(self, blocks, example_ids):
        assert blocks and example_ids.dim() == 1
        self.observed += len(example_ids)

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


@pytest.fixture
def toy_method():
    """A method added as one class: a dense adapter with a per-step scalar and its own epoch order."""
    orders: list[_Order] = []

    class ToyHooks(Adapter):
        def step_scalars(self, out, step):
            return {"toy_scalar": 0.5 * step}

        def epoch_sampler(self, *, num_examples, num_blocks, seed):
            if not orders:
                orders.append(_Order(num_examples))
            return orders[0]

    register_method("toy_hooks")(ToyHooks)
    try:
        yield orders
    finally:
        _METHODS.pop("toy_hooks")


def test_a_new_method_gets_its_loop_machinery_through_hooks_alone(toy_method, digits_root, tmp_path):
    from trainables.loop import LocalSession, train_loop

    s = LocalSession(str(tmp_path))
    train_loop({"steps": 4, "eval_every": 2, "batch_size": 8, "torch_threads": 1, "routing": {"method": "toy_hooks"},
                "data": {"root": str(digits_root), "resolution": 16, "augment": "none", "domains": ["real"]}}, s)
    evals = [r for r in s.reports if "val/accuracy" in r]
    assert [r["routing/toy_scalar"] for r in evals] == [0.5 * 1, 0.5 * 3]   # logged at each evaluation (last step)
    (order,) = toy_method
    assert order.observed == 4 * 8 and order.epochs[0] == 0               # fed every trained batch


def test_model_level_helpers_ask_the_hooks():
    from smear.routing import ExpertRoutingBlock, RoutingConfig, RoutingContext

    ctx = RoutingContext(step=3000)
    blocks = torch.nn.Sequential(
        ExpertRoutingBlock(8, RoutingConfig(method="smear", num_experts=2, rank=2), layout="sequence", context=ctx),
        ExpertRoutingBlock(8, RoutingConfig(method="st_gumbel", num_experts=2, rank=2), layout="sequence", context=ctx))
    # before any forward, ST-Gumbel reports the temperature at the context's step: K = 3, 10 exp(-1e-4 (6000 - 3))
    assert step_scalars(blocks) == pytest.approx({"temperature": 10 * 2.718281828459045 ** (-0.5997)})
    assert epoch_sampler(blocks, 10, seed=0) is None
    cur = ExpertRoutingBlock(8, RoutingConfig(method="adaptive_gating", num_experts=2, rank=2, adaptive_curriculum=True),
                             layout="sequence")
    assert len(epoch_sampler(torch.nn.Sequential(cur), 10, seed=0)) == 10


def test_each_method_declares_its_own_fields_in_its_own_file():
    import dataclasses
    import inspect

    from smear.routing import RoutingCommon, RoutingConfig, get_method_class

    common = {f.name for f in dataclasses.fields(RoutingCommon)}
    owners: dict[str, str] = {}
    for name in available_methods():
        cls = get_method_class(name)
        if cls.Params is None or cls.Params is getattr(cls.__mro__[1], "Params", None):
            continue  # no fields of its own (smear_2x reuses smear's, adapter_large adapter's)
        assert inspect.getsourcefile(cls.Params) == inspect.getsourcefile(cls), name
        for f in dataclasses.fields(cls.Params):
            assert f.name not in common and f.name not in owners, f.name
            owners[f.name] = name
    assert {f.name for f in dataclasses.fields(RoutingConfig)} == common | set(owners)   # one flat config
    assert owners["gumbel_tau0"] == "st_gumbel" and owners["hash_num_examples"] == "hash"
