"""The train loop without Ray: metrics, learning signal, checkpoint/restore, config validation."""
from __future__ import annotations

import os

import pytest
import torch

from smear.configs import ConfigError
from trainables.settings import make_config
from tests.helpers import without_timing
from trainables.loop import CheckpointMismatch, LocalSession, NoGPU, NonFiniteLoss, train_loop


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


class _Killed(Exception):
    """Stands for the trial process dying right after a checkpoint was registered."""


class _DyingSession(LocalSession):
    def __init__(self, root, die_after: int):
        super().__init__(root)
        self.die_after = die_after

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None and self._saved == self.die_after:
            raise _Killed


def test_resume_continues_from_the_checkpoint_step_exactly(digits_root, tmp_path):
    cfg = _cfg(digits_root, steps=9)
    whole = LocalSession(str(tmp_path / "whole"))
    train_loop(cfg, whole)
    s = _DyingSession(str(tmp_path / "resumed"), die_after=1)
    with pytest.raises(_Killed):
        train_loop(cfg, s)                                       # dies after the step-3 checkpoint
    first_ckpt = s.latest_checkpoint_dir()
    assert torch.load(f"{first_ckpt}/state.pt", weights_only=True)["step"] == 3
    train_loop(cfg, s)                                           # the restarted trial: same session, same config
    steps = [r["step"] for r in s.reports]
    assert steps == [3, 6, 9, 9]                                 # no step repeated, none restarted from 0
    # and the resumed trial is the uninterrupted one, bit for bit (weights, optimiser, RNG, data order)
    assert without_timing(whole.reports) == without_timing(s.reports)


class _RemoteStorageSession(_DyingSession):
    """Checkpoints read back as from remote storage (Tune's Checkpoint on a non-local filesystem): the
    trial gets a temporary local copy (trainables/ray_trainable.py), released once restored."""

    def latest_checkpoint_dir(self):
        import pyarrow.fs
        from ray.tune import Checkpoint

        from trainables.ray_trainable import _local_dir

        latest = super().latest_checkpoint_dir()
        if latest is None:
            return None
        remote = pyarrow.fs.SubTreeFileSystem(self.root, pyarrow.fs.LocalFileSystem())
        self.copies.append(_local_dir(Checkpoint(os.path.basename(latest), filesystem=remote)))
        return self.copies[-1]

    def release_checkpoint_dir(self, path):
        from trainables.ray_trainable import _release

        _release(path)


def test_a_restore_from_remote_storage_leaves_no_temporary_copy(digits_root, tmp_path):
    s = _RemoteStorageSession(str(tmp_path / "remote"), die_after=1)
    s.copies = []
    with pytest.raises(_Killed):
        train_loop(_cfg(digits_root, steps=6), s)
    train_loop(_cfg(digits_root, steps=6), s)
    assert [r["step"] for r in s.reports] == [3, 6, 6]           # restored from the copy at step 3
    assert len(s.copies) == 1 and os.path.basename(s.copies[0]).startswith("smear-restore-")
    assert not os.path.exists(s.copies[0])                      # the copy is gone, the checkpoint kept
    assert os.path.isfile(tmp_path / "remote" / "checkpoint_000001" / "state.pt")


def test_resume_refuses_a_checkpoint_of_another_config_or_model(digits_root, tmp_path):
    s = _DyingSession(str(tmp_path), die_after=1)
    with pytest.raises(_Killed):
        train_loop(_cfg(digits_root, steps=6), s)
    with pytest.raises(CheckpointMismatch, match="steps: 6 in the checkpoint != 9 now"):
        train_loop(_cfg(digits_root, steps=9), s)
    state_file = f"{s.latest_checkpoint_dir()}/state.pt"
    state = torch.load(state_file, weights_only=True)
    state["model"].pop(next(iter(state["model"])))               # a partial checkpoint is never half-restored
    torch.save(state, state_file)
    with pytest.raises(CheckpointMismatch, match="1 missing keys"):
        train_loop(_cfg(digits_root, steps=6), s)


def test_a_gpu_trial_on_a_node_without_cuda_fails_at_once(digits_root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this node has CUDA: the refusal is for nodes without it")
    s = LocalSession(str(tmp_path))
    with pytest.raises(NoGPU, match="use_gpu=True but torch sees no CUDA device"):
        train_loop(_cfg(digits_root, use_gpu=True), s)
    assert s.reports == []


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


NAN_STEP = 7  # the 0-indexed step whose loss the toy method makes NaN


@pytest.fixture
def nan_at_step():
    """A method registered for one test: a dense adapter whose auxiliary loss is NaN at training step NAN_STEP
    (decided from the context's Python step: no host read)."""
    from smear.routing._registry import _METHODS, register_method
    from smear.routing.methods.adapter import Adapter

    class NanAtStep(Adapter):
        def forward(self, experts, inp, logits):
            out = super().forward(experts, inp, logits)
            if inp.training and inp.ctx.step == NAN_STEP:
                out.aux_loss = torch.full((), float("nan"), device=out.y.device)
            return out

    register_method("nan_at_step")(NanAtStep)
    try:
        yield {"method": "nan_at_step"}
    finally:
        _METHODS.pop("nan_at_step")


@pytest.mark.parametrize("check_every,eval_every,reports", [
    (5, 20, 0),     # read at step 10 by the periodic check, no evaluation yet
    (1, 20, 0),     # read at once, as before the flag moved to the device
    (50, 4, 1),     # read before the evaluation at step 8: the step-4 report only; NaN weights are never reported
])
def test_the_first_nan_step_is_reported_whatever_the_check_interval(digits_root, tmp_path, nan_at_step, check_every,
                                                                    eval_every, reports):
    s = LocalSession(str(tmp_path))
    with pytest.raises(NonFiniteLoss, match=f"non-finite training loss nan at step {NAN_STEP}$"):
        train_loop(_cfg(digits_root, steps=20, eval_every=eval_every, nonfinite_check_every=check_every,
                        routing=nan_at_step), s)
    assert [r["step"] for r in s.reports] == [4] * reports


def test_a_diverged_reinforce_trial_keeps_running_until_the_check_names_the_step(digits_root, tmp_path):
    # the NaN router of the steps before the check must not stop the trial elsewhere (multinomial on NaN p)
    with pytest.raises(NonFiniteLoss, match=r"non-finite training loss (nan|-?inf) at step 1$"):
        train_loop(_cfg(digits_root, lr=1e30, steps=12, eval_every=12, routing={"method": "reinforce"}),
                   LocalSession(str(tmp_path)))


def test_the_resolved_precision_is_reported_once(digits_root, tmp_path):
    s = LocalSession(str(tmp_path))
    train_loop(_cfg(digits_root), s)                             # auto on the CPU: fp32
    assert [r.get("system/bf16") for r in s.reports] == [0.0, None, None]


def test_the_newest_complete_checkpoint_is_chosen_and_a_partial_copy_is_not(digits_root, tmp_path):
    """What a restored trial continues from (trainables/checkpoints.py): the highest step whose manifest lists
    every file at its size. A copy cut short (a driver killed mid-copy) and a folder without a manifest are
    passed over, whatever their names say."""
    from pathlib import Path

    from trainables.checkpoints import MANIFEST_FILE, STATE_FILE, checkpoint_step, newest_complete

    s = LocalSession(str(tmp_path))
    train_loop(_cfg(digits_root, steps=9), s)
    folders = sorted(Path(tmp_path).glob("checkpoint_*"))
    assert [checkpoint_step(f) for f in folders] == [3, 6, 9]
    assert newest_complete(reversed(folders)) == str(folders[2])
    state = folders[2] / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])         # the newest copy, cut short
    assert checkpoint_step(folders[2]) is None and newest_complete(folders) == str(folders[1])
    (folders[1] / MANIFEST_FILE).unlink()                                         # no manifest: not known complete
    assert newest_complete(folders) == str(folders[0])
    assert newest_complete([tmp_path / "absent"]) is None


def test_a_checkpoint_copied_over_another_of_the_same_name_is_complete_only_when_whole(digits_root, tmp_path):
    """After a resume from a checkpoint Tune never registered, Tune's next checkpoint takes a name already on
    disk: a copy cut short there mixes two checkpoints' files of equal sizes. The digests tell."""
    import shutil
    from pathlib import Path

    from trainables.checkpoints import MANIFEST_FILE, STATE_FILE, checkpoint_step

    s = LocalSession(str(tmp_path))
    train_loop(_cfg(digits_root, steps=6), s)
    old, new = sorted(Path(tmp_path).glob("checkpoint_*"))
    assert (old / STATE_FILE).stat().st_size == (new / STATE_FILE).stat().st_size   # same shapes, same sizes
    shutil.copy(new / MANIFEST_FILE, old / MANIFEST_FILE)     # the new manifest landed, the old state.pt stayed
    assert checkpoint_step(old) is None
    for f in new.iterdir():                                   # the copy completes
        shutil.copy(f, old / f.name)
    assert checkpoint_step(old) == 6
