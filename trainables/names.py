"""The names of what a trial reports that the driver reads (the tracker, the report, the tests): torch-free, so
that the driver side imports them without torch. A name is written here once; the trial and the driver both
import it."""
from __future__ import annotations

STEP, EPOCH, DONE = "step", "epoch", "done"
TRAIN_LOSS, TRAIN_LR = "train/loss", "train/lr"
SYSTEM_BF16 = "system/bf16"  # 1.0 / 0.0: the precision that ran (first report; again after a resume if it changed)

SECONDS_PER_STEP, TRAIN_HOURS = "compute/seconds_per_step", "compute/train_hours"  # measured, so never bit-equal
# the final report's key for where the specialisation heatmaps are: a JSON file the trial wrote beside its
# checkpoints (its session's artifact, trainables/session.py), never the heatmaps themselves (not a Tune result)
ROUTING_HEATMAP = "routing_heatmap"
HEATMAP_FILE = "routing_heatmaps.json"

# compute accounting (trainables/accounting.py): parameters and FLOPs of one training step, in the first report
PARAMS_TRAINABLE = "compute/params_trainable"
PARAMS_TOTAL = "compute/params_total"
FLOPS_PER_EXAMPLE = "compute/flops_per_example"
ROUTING_FLOPS_PER_EXAMPLE = "compute/routing_flops_per_example"
FORWARD_PASSES = "compute/forward_passes"
BATCH_SIZE = "compute/batch_size"
METRIC_NAMES: tuple[str, ...] = (PARAMS_TRAINABLE, PARAMS_TOTAL, FLOPS_PER_EXAMPLE, ROUTING_FLOPS_PER_EXAMPLE,
                                 FORWARD_PASSES, BATCH_SIZE)


def best(metric: str) -> str:
    """The running best of a validation metric, reported at each evaluation and at the end."""
    return f"val/best_{metric}"
