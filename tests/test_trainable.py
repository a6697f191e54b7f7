"""The train loop without Ray: metrics, learning signal, checkpoint/restore, config validation."""
from __future__ import annotations

import pytest
import torch

from smear.configs import ConfigError
from trainables.config import make_config
from trainables.loop import LocalSession, NonFiniteLoss, train_loop


def _cfg(root, **over):
    cfg = {"steps": 6, "eval_every": 3, "batch_size": 16, "eval_batch_size": 128, "torch_threads": 1,
           "routing": {"method": "smear"},
           "data": {"root": str(root), "resolution": 16, "augment": "none", "domains": ["real", "sketch"]}}
    cfg.update(over)
    return cfg


def test_reports_metrics_and_checkpoints(digits_root, tmp_path):
    s = LocalSession(str(tmp_path))
    final = train_loop(_cfg(digits_root), s)
    assert [r["step"] for r in s.reports] == [3, 6, 6]
    for r in s.reports[:2]:
        assert {"train/loss", "val/accuracy", "val/real/accuracy", "val/sketch/accuracy"} <= set(r)
        assert any(k.startswith("routing/layer4.1/load_") for k in r)
    assert {"test/accuracy", "test/real/accuracy", "test/sketch/accuracy"} <= set(final)
    assert 0.0 <= final["test/accuracy"] <= 1.0
    assert s.latest_checkpoint_dir() is not None


def test_resume_from_checkpoint_continues_where_it_stopped(digits_root, tmp_path):
    s = LocalSession(str(tmp_path))
    train_loop(_cfg(digits_root, steps=3), s)
    first_ckpt = s.latest_checkpoint_dir()
    s.reports.clear()
    train_loop(_cfg(digits_root, steps=6), s)                   # restores step 3, trains 3 more
    assert [r["step"] for r in s.reports] == [6, 6]
    state = torch.load(f"{first_ckpt}/state.pt", weights_only=False)
    assert state["step"] == 3


def test_same_seed_same_result(digits_root, tmp_path):
    a = train_loop(_cfg(digits_root, steps=3), LocalSession(str(tmp_path / "a")))
    b = train_loop(_cfg(digits_root, steps=3), LocalSession(str(tmp_path / "b")))
    assert a["test/accuracy"] == b["test/accuracy"]


def test_nan_loss_fails_the_trial(digits_root, tmp_path):
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        train_loop(_cfg(digits_root, lr=1e30, steps=30, eval_every=30), LocalSession(str(tmp_path)))


@pytest.mark.parametrize("over,msg", [
    ({"steps": 0}, "steps=0 is out of range"),
    ({"optimiser": "sgd"}, "unknown key 'optimiser'"),
    ({"routing": {"method": "moe"}}, "routing.method='moe' is not valid; valid:"),
    ({"data": {"domains": ["photos"]}}, "unknown domain 'photos'"),
    ({"batch_size": "big"}, "batch_size='big' has the wrong type"),
])
def test_config_errors_name_the_bad_value(over, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        make_config(over)
