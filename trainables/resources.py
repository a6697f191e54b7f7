"""What one trial asks of Ray, in one place: :class:`TrialResources` gives the Tune trial's own resource
request (its placement group), its Ray Train workers' bundles and scaling config, and the totals the
launcher checks against this machine or the cluster."""
from __future__ import annotations

import math
from dataclasses import dataclass

from smear.configs import ConfigError
from trainables.config import TrainConfig

DRIVER_CPU = 0.01  # what a data-parallel trial itself holds while its Ray Train workers run (it only waits)

Bundle = tuple[float, float]  # (CPUs, GPUs) that land on one node


def device_share(gpu: float, workers: int = 1) -> float:
    """The device share of one trial: ``resources.gpu`` x its workers (0.25: four trials share a GPU), or 1
    for a CPU-only trial (the "device" is then the trial's CPUs). The unit of every device-hour figure: the
    bill (``service/estimate.py``) and the running sweep's progress display (``service/progress.py``)."""
    return gpu * workers if gpu > 0 else 1.0


@dataclass(frozen=True)
class TrialResources:
    """A trial's request: ``cpu`` / ``gpu`` per worker (the declaration's ``resources``, or the flags'), for
    ``num_workers`` workers. One worker: the Tune trial itself holds them. Several: the trial holds
    :data:`DRIVER_CPU` (Tune refuses an all-zero request) and starts a Ray Train ``TorchTrainer`` whose
    workers hold ``cpu`` / ``gpu`` each (whole GPUs only: NCCL)."""

    cpu: float
    gpu: float
    num_workers: int = 1
    use_gpu: bool = False

    @classmethod
    def of(cls, cfg: TrainConfig, per_worker: dict[str, float]) -> "TrialResources":
        """The request of the trial ``cfg`` with ``per_worker`` = {cpu, gpu}; a fractional GPU with several
        workers is a one-line ConfigError."""
        cpu, gpu = float(per_worker.get("cpu", 1.0)), float(per_worker.get("gpu", 0.0))
        if not (math.isfinite(cpu) and math.isfinite(gpu) and cpu >= 0 and gpu >= 0):
            raise ConfigError(f"resources cpu={cpu:g}, gpu={gpu:g}; valid: finite numbers >= 0")
        if cpu == 0 and gpu == 0:  # Ray refuses a request for nothing
            raise ConfigError("resources cpu=0 with gpu=0 (resources / --cpus-per-trial / --gpus-per-trial): a "
                              "trial must hold something; valid: cpu > 0 or gpu > 0")
        if cfg.num_workers > 1 and 0 < gpu < 1:
            raise ConfigError(f"resources.gpu={gpu:g} is fractional with num_workers={cfg.num_workers}; "
                              "multi-worker trials need whole GPUs")
        return cls(cpu=cpu, gpu=gpu, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu)

    @property
    def data_parallel(self) -> bool:
        return self.num_workers > 1

    @property
    def device_share(self) -> float:
        return device_share(self.gpu, self.num_workers)

    @property
    def own(self) -> Bundle:
        """What the Tune trial itself holds."""
        return (DRIVER_CPU, 0.0) if self.data_parallel else (self.cpu, self.gpu)

    @property
    def bundles(self) -> list[Bundle]:
        """Each bundle the trial holds: its own, then one per Ray Train worker when it has several (each
        bundle lands on one node; a trial's bundles may spread over nodes)."""
        return [self.own] + ([(self.cpu, self.gpu)] * self.num_workers if self.data_parallel else [])

    @property
    def total(self) -> Bundle:
        """CPUs and GPUs the trial holds in all."""
        return sum(b[0] for b in self.bundles), sum(b[1] for b in self.bundles)

    def tune_request(self) -> dict[str, float]:
        """The Tune trial's own request, in Ray's resource names."""
        cpu, gpu = self.own
        return {"CPU": cpu, **({"GPU": gpu} if gpu else {})}

    def placement_group(self):
        """Tune's placement group for the trial (its own bundle; Ray Train reserves its workers' itself)."""
        from ray.tune import PlacementGroupFactory

        return PlacementGroupFactory([self.tune_request()])

    def worker_request(self) -> dict[str, float]:
        """Each Ray Train worker's request, in Ray's resource names."""
        return {"CPU": self.cpu, **({"GPU": self.gpu} if self.gpu else {})}

    def scaling_config(self):
        """Ray Train's scaling config for a data-parallel trial."""
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker=self.worker_request())
