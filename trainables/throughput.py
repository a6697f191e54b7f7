"""One trial's end-to-end training throughput, measured through the trial's own code path (issue 13).

:func:`measure` builds a trial exactly as ``trainables.loop.train_loop`` does (the setting's datasets and
routed model, ``place_model``, the optimiser, the loop's DataLoader, ``batch_to_model``, ``training_loss``
under the resolved precision, backward, clipping, the optimiser step) and times ``steps`` optimiser steps
after ``warmup`` untimed ones. It reports steps/s, the work per second (images for ResNet, non-padding
source tokens for T5), the fraction of step time spent waiting for the next batch (time blocked in the
DataLoader's ``next``), and peak memory (CUDA ``max_memory_allocated``; on the CPU the process's peak RSS).
On CUDA each step ends with ``torch.cuda.synchronize()``, so a step's time is the device's time for it
plus whatever the data path adds; the training loop itself never syncs per step.

:func:`measure_packed` runs ``k`` such trials in ``k`` processes on one device (as Ray packs trials with
``resources.gpu: 1/k``), lined up by a barrier so that their timed steps overlap, and sums their
throughput. Each measurement runs in a fresh process, so peak memory is that trial's alone.

:func:`calibration_config` turns a declared trial config into one that runs on this machine at the same
shapes (generated data in the real format where the declared data is not here, random weights of the
declared architecture where they would be downloaded); ``benchmarks/trial_throughput.py`` and
``service/estimate.py`` (``launch.py --dry-run --estimate``) both measure through this module.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import queue
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from smear.configs import to_dict
from trainables.session import LocalSession
from trainables.settings import get_setting, make_config
from trainables.step import NonFiniteLoss
from trainables.trial import assemble, set_epoch

@dataclass
class Measurement:
    """One trial's (or, packed, one process's) timed steps."""

    setting: str
    method: str
    device: str
    precision: str            # what ran: "bf16" or "fp32"
    batch_size: int
    loader_workers: int
    steps: int                # timed steps
    warmup: int
    seconds: float            # wall time of the timed steps
    data_wait_s: float        # of which blocked in the DataLoader's next()
    work: float               # images or source tokens over the timed steps
    unit: str
    peak_mem_mb: float
    peak_mem_kind: str        # "cuda_max_allocated" or "cpu_peak_rss"
    final_loss: float

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds

    @property
    def work_per_s(self) -> float:
        return self.work / self.seconds

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_s / self.seconds


@dataclass
class Packed:
    """``k`` trials measured together on one device: their per-process measurements and the sums."""

    runs: list[Measurement]

    @property
    def k(self) -> int:
        return len(self.runs)

    @property
    def steps_per_s(self) -> float:        # summed over the packed trials
        return sum(r.steps_per_s for r in self.runs)

    @property
    def work_per_s(self) -> float:
        return sum(r.work_per_s for r in self.runs)

    @property
    def data_wait_fraction(self) -> float:  # mean over the packed trials
        return sum(r.data_wait_fraction for r in self.runs) / self.k

    @property
    def peak_mem_mb(self) -> float:         # the largest trial's
        return max(r.peak_mem_mb for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        first = self.runs[0]
        return {"setting": first.setting, "method": first.method, "device": first.device,
                "precision": first.precision, "batch_size": first.batch_size, "loader_workers": first.loader_workers,
                "pack": self.k, "steps": first.steps, "warmup": first.warmup, "unit": first.unit,
                "steps_per_s": self.steps_per_s, "work_per_s": self.work_per_s,
                "data_wait_fraction": self.data_wait_fraction, "peak_mem_mb": self.peak_mem_mb,
                "peak_mem_kind": first.peak_mem_kind, "runs": [asdict(r) for r in self.runs]}


# ------------------------------------------------------------------------------------------ data in the real format

# ------------------------------------------------------------------------------------------ configs

def data_lines(config: dict[str, Any], steps: int) -> int:
    """Training examples a root needs so that ``steps`` batches fit in one epoch (validation takes 20% of
    DomainNet's train lists, and up to a fifth of the large GLUE tasks' training rows)."""
    return math.ceil(config["batch_size"] * (steps + 1) / 0.8) + 8


def calibration_config(config: dict[str, Any], *, device: str, data_dir: str | os.PathLike, steps: int,
                       batch_size: int | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config`` (a resolved trial config) made runnable here at the same shapes, for ``steps`` steps.

    - Data and weights: the setting's recipe (``Setting.calibration_config``): a declared root that exists on
      this machine is used; otherwise (a cluster path, the hub, or the offline stand-in, which is for smoke
      runs, not bills) data in the real format is generated under ``data_dir`` (``smear.data.calibration``),
      and downloaded weights are replaced by random ones of the same shapes.
    - ``device`` cpu|cuda sets ``use_gpu``; ``batch_size`` overrides the declared one (``service/estimate.py``
      scales the time back); ``overrides`` (nested) go on last.
    """
    cfg = copy.deepcopy(config)
    cfg["use_gpu"] = device == "cuda"
    cfg["steps"] = cfg["eval_every"] = steps
    if batch_size:
        cfg["batch_size"] = batch_size
    root = cfg.get("data", {}).get("root", "")
    local = root not in ("", "hub") and Path(root).exists()
    cfg = get_setting(cfg["setting"]).calibration_config(cfg, data_dir=Path(data_dir), lines=data_lines(cfg, steps),
                                                         local=local)
    for k, v in (overrides or {}).items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    return cfg


def paper_config(setting: str, method: str, **overrides: Any) -> dict[str, Any]:
    """A trial config of ``setting`` at the paper's shapes (``Setting.paper_shape``) for ``method``."""
    cfg = make_config({"setting": setting, **copy.deepcopy(get_setting(setting).paper_shape),
                       "routing": {"method": method}})
    out = to_dict(cfg)
    for k, v in overrides.items():
        if isinstance(v, dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


# ------------------------------------------------------------------------------------------ measuring

class _Timed:
    """The DataLoader's iterator, with the time spent blocked in ``next`` added up."""

    def __init__(self, it: Iterator):
        self.it, self.waited = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.waited += time.perf_counter() - t


def measure(config: dict[str, Any], *, steps: int, warmup: int = 1, barrier=None) -> Measurement:
    """Time ``steps`` training steps of the trial ``config`` (after ``warmup`` untimed ones) in this process,
    assembled as the train loop assembles it (``trainables.trial.assemble``) and stepped by the loop's own
    step. ``barrier`` (packed runs) is waited on between warm-up and timing."""
    trial = assemble(config, LocalSession(root=os.devnull))
    cfg, setting, device = trial.cfg, trial.setting, trial.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    workers = cfg.data.workers(trial.session.cpus)
    loader = trial.loader("train", workers=workers)

    def batches() -> Iterator:  # the trial's loader: built once, workers persist, the next epoch's order
        epoch = 0
        while True:
            set_epoch(loader, epoch)
            yield from loader
            epoch += 1

    timed = _Timed(batches())
    work, loss = 0.0, torch.zeros(())
    start, waited0 = time.perf_counter(), 0.0
    for step in range(warmup + steps):
        if step == warmup:  # the timed steps start here, with the wait for their first batch
            if barrier is not None:
                barrier.wait()
            start, waited0, work = time.perf_counter(), timed.waited, 0.0
        raw = next(timed)
        work += setting.batch_work(raw, cfg.batch_size)
        loss = trial.step(raw, step)
        if cuda:
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"
    final = float(loss.detach())
    if not math.isfinite(final):
        raise NonFiniteLoss(f"non-finite training loss {final} in the throughput measurement")
    return Measurement(setting=cfg.setting, method=cfg.routing.method, device=device.type,
                       precision="bf16" if trial.precision.bf16 else "fp32", batch_size=cfg.batch_size,
                       loader_workers=workers, steps=steps, warmup=warmup, seconds=seconds,
                       data_wait_s=timed.waited - waited0, work=work, unit=setting.work_unit,
                       peak_mem_mb=peak, peak_mem_kind=kind, final_loss=final)


def _child(configs, steps, warmup, barrier, out) -> None:
    import multiprocessing as mp

    if "fork" in mp.get_all_start_methods():  # a spawned process defaults to spawn; a Ray trial's loader forks
        mp.set_start_method("fork", force=True)
    i = 0
    try:
        for i, config in enumerate(configs):
            out.put(("ok", i, measure(config, steps=steps, warmup=warmup, barrier=barrier)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        if barrier is not None:
            barrier.abort()
        method = configs[i].get("routing", {}).get("method")
        out.put(("error", i, f"{configs[i]['setting']}/{method}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"))


class MeasurementFailed(RuntimeError):
    """A measuring process failed, timed out or died; the message says which and why."""


def measure_series(configs: list[dict[str, Any]], *, k: int = 1, steps: int, warmup: int = 1,
                   timeout: float | None = None) -> list[Packed]:
    """Each of ``configs`` in turn, in ``k`` fresh processes on one device (copies with seeds ``seed``..
    ``seed+k-1``), the processes' timed steps lined up by a barrier; one :class:`Packed` per config. A series
    shares its processes' start-up (imports, CUDA context): the estimate measures all of a setting's methods
    in one series. ``timeout``: seconds for the whole series."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    barrier = ctx.Barrier(k) if k > 1 else None
    procs = []
    for j in range(k):
        mine = [copy.deepcopy(c) for c in configs]
        for c in mine:
            c["seed"] = int(c.get("seed", 0)) + j
        p = ctx.Process(target=_child, args=(mine, steps, warmup, barrier, out))
        p.start()
        procs.append(p)
    runs: list[list[Measurement]] = [[] for _ in configs]
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while sum(map(len, runs)) < k * len(configs):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise MeasurementFailed(f"measuring {len(configs)} config(s) x {k} process(es) took over {timeout:.0f} s")
            try:
                status, i, value = out.get(timeout=min(left, 5.0) if left is not None else 5.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and out.empty():
                    raise MeasurementFailed(f"a measuring process died (exit code {dead[0].exitcode})") from None
                continue
            if status != "ok":
                raise MeasurementFailed(value)
            runs[i].append(value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [Packed(r) for r in runs]


def measure_packed(config: dict[str, Any], *, k: int = 1, steps: int, warmup: int = 1,
                   timeout: float | None = None) -> Packed:
    """One config in ``k`` fresh processes (:func:`measure_series`); ``k = 1``: one trial alone in a clean process,
    so that its peak memory is its own."""
    return measure_series([config], k=k, steps=steps, warmup=warmup, timeout=timeout)[0]


@contextlib.contextmanager
def scratch_data(folder: str | os.PathLike) -> Iterator[Path]:
    """Within: the offline stand-ins, the data-check markers and the datasets cache live under ``folder``
    (and so in the measuring processes, which inherit the environment), so that a measurement leaves
    nothing in the user's caches."""
    folder = Path(folder)
    names = {"SMEAR_DATA_DIR": folder / "home", "SMEAR_CACHE_DIR": folder / "cache", "HF_DATASETS_CACHE": folder / "hf"}
    was = {k: os.environ.get(k) for k in names}
    os.environ.update({k: str(v) for k, v in names.items()})
    try:
        yield folder
    finally:
        for k, v in was.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpu_model() -> str:
    """This machine's CPU model (/proc/cpuinfo), for the records of measurements."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
