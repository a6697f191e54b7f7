"""The projected device-hours and cost of a declaration, from a short calibration on this machine (issue 13).

    python service/launch.py --sweep NAME --dry-run --estimate [--price-per-gpu-hour USD]
                             [--calibration-steps N] [--calibration-batch B]

For each distinct (setting, method) of the sweep, the first such trial's config is measured for
``--calibration-steps`` steps after one warm-up step, through the trial's own code path
(``trainables.throughput``: random weights of the declared architecture, data in the real format where the
declared data is not on this machine). Then, per row:

- trial-hours = sum over its trials of steps / (steps/s of one trial) / 3600;
- device-hours = trial-hours x the device share of a trial: ``resources.gpu`` (0.25 = four trials share a
  GPU; x ``num_workers`` for data-parallel trials), or 1 for CPU-only trials (then the "device" is the
  trial's CPUs);
- cost = device-hours x ``--price-per-gpu-hour``.

On a GPU with packed trials (``resources.gpu`` < 1) the calibration runs the K = 1/gpu trials together on
the one GPU, so that the rate is the one a packed trial gets. On a CPU it measures one trial alone, and
packing is assumed free: a CPU bill is an upper bound in hours and says so. ``--calibration-batch B`` runs
the calibration at batch B and scales the step time by declared batch / B (fine on a CPU, which is
compute-bound; not on a GPU). Early stopping (ASHA) only shortens trials: the bill is then an upper bound.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from service.spaces import Sweep
from trainables.resources import device_share

WARMUP = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    """launch.py's flags of the estimate."""
    p.add_argument("--estimate", action="store_true",
                   help="with --dry-run: calibrate each (setting, method) on this machine for a few steps and print "
                        "the sweep's projected device-hours and cost")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="USD per device-hour, for the cost column")
    p.add_argument("--calibration-steps", type=int, default=3, help="timed steps per (setting, method), after one "
                                                                     "warm-up step (default 3)")
    p.add_argument("--calibration-batch", type=int, default=None,
                   help="calibrate at this batch and scale the step time to the declared batch (a slow CPU)")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors (``p.error``: exit 2) for flags of the estimate that cannot work."""
    if args.estimate and not args.dry_run:
        p.error("--estimate needs --dry-run: it prints a bill and starts no sweep")
    estimate_only = [f for f in ("price_per_gpu_hour", "calibration_batch") if getattr(args, f) is not None]
    if estimate_only and not args.estimate:
        p.error(f"--{estimate_only[0].replace('_', '-')} needs --estimate")
    price = args.price_per_gpu_hour
    if price is not None and not (math.isfinite(price) and price >= 0):
        p.error(f"--price-per-gpu-hour={price} is not valid; valid: a price >= 0 (USD per GPU-hour)")
    if args.calibration_steps < 1:
        p.error(f"--calibration-steps={args.calibration_steps} is not valid; valid: >= 1")
    if args.calibration_batch is not None and args.calibration_batch < 1:
        p.error(f"--calibration-batch={args.calibration_batch} is not valid; valid: >= 1")



@dataclass
class Row:
    setting: str
    method: str
    trials: int
    steps: list[int]              # each trial's steps
    steps_per_s: float            # one trial's (a packed trial's, when packing was measured)
    data_wait: float              # fraction of step time waiting for data
    gpu: float                    # resources.gpu of a trial's worker (0: a CPU-only trial)
    workers: int                  # num_workers (data-parallel workers of a trial)
    packed: int                   # trials measured together (1 = alone)
    weight: float = 1.0           # trials each listed one stands for (optuna: num_trials / example trials)

    @property
    def share(self) -> float:
        """The device share of one trial (:func:`trainables.resources.device_share`)."""
        return device_share(self.gpu, self.workers)

    @property
    def per_gpu(self) -> str:
        if self.gpu == 0:
            return "CPU trial"
        return f"{1 / self.share:.4g}" if self.share <= 1 else f"{self.share:.4g} GPUs per trial"

    @property
    def trial_hours(self) -> float:
        return sum(self.steps) * self.weight / self.steps_per_s / 3600

    @property
    def device_hours(self) -> float:
        return self.trial_hours * self.share


@dataclass
class Bill:
    sweep: str
    device: str                   # "cuda" or "cpu": where the calibration ran
    device_name: str
    steps: int
    batch_note: str
    price: float | None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def device_hours(self) -> float:
        return sum(r.device_hours for r in self.rows)

    @property
    def trial_hours(self) -> float:
        return sum(r.trial_hours for r in self.rows)


def _device_for(config: dict) -> str:
    import torch

    return "cuda" if config.get("use_gpu") and torch.cuda.is_available() else "cpu"


def calibrate(sweep: Sweep, *, steps: int = 3, batch: int | None = None, price: float | None = None,
              timeout: float | None = None) -> Bill:
    """Measure each distinct (setting, method) of ``sweep`` and project its trials (see the module doc)."""
    import torch

    from trainables.settings import make_config
    from trainables.throughput import calibration_config, cpu_model, measure_series, scratch_data

    groups: dict[tuple[str, str], list[dict]] = {}
    for t in sweep.trials:
        groups.setdefault((t.config["setting"], t.config["routing"]["method"]), []).append(t.config)
    scale = sweep.num_trials / len(sweep.trials)   # optuna: the example trials stand for num_samples x seeds
    devices = {_device_for(c) for cs in groups.values() for c in cs}
    device = "cuda" if "cuda" in devices else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores"
    bill = Bill(sweep.name, device, name, steps, f"at batch {batch}, scaled to the declared batch" if batch
                else "at the declared batch", price)
    scratch = Path(tempfile.mkdtemp(prefix="smear-estimate-"))
    try:
        with scratch_data(scratch):
            for setting in dict.fromkeys(s for s, _ in groups):   # one series of processes per setting
                keys = [key for key in groups if key[0] == setting]
                firsts = [groups[key][0] for key in keys]
                dev = _device_for(firsts[0])
                gpu = float(sweep.resources[setting].get("gpu", 0) or 0)
                k = max(1, int(1 / gpu + 1e-9)) if dev == "cuda" and 0 < gpu < 1 else 1  # packed, as Ray packs them
                cfgs = [calibration_config(c, device=dev, data_dir=scratch, steps=steps + WARMUP, batch_size=batch)
                        for c in firsts]
                for key, first, cfg, packed in zip(keys, firsts, cfgs, measure_series(cfgs, k=k, steps=steps,
                                                                                     warmup=WARMUP, timeout=timeout)):
                    configs = groups[key]
                    rate = packed.steps_per_s / k * (cfg["batch_size"] / first["batch_size"])
                    bill.rows.append(Row(setting, key[1], round(len(configs) * scale), [c["steps"] for c in configs],
                                         rate, packed.data_wait_fraction, gpu, make_config(first).num_workers, k,
                                         scale))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if device == "cpu":
        bill.notes.append("calibrated on CPU: GPU hours will be far lower; run on a GPU node for a real bill")
        if any(0 < r.share < 1 for r in bill.rows):
            bill.notes.append("packing not measured on a CPU: packed trials are assumed to keep one trial's speed")
    if sweep.scheduler == "asha":
        bill.notes.append("ASHA stops poor trials early: every trial is counted in full, so this is an upper bound")
    if sweep.search == "optuna":
        bill.notes.append(f"optuna: {sweep.num_trials} trials projected from the space's example trials")
    return bill


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.4g}"


def format_bill(bill: Bill) -> str:
    """The bill as text: a header, a markdown table (one row per (setting, method), then the total), notes."""
    priced = bill.price is not None
    out = [f"estimate for sweep {bill.sweep!r}: {sum(r.trials for r in bill.rows)} trials, calibrated on "
           f"{bill.device.upper()} ({bill.device_name}) with {bill.steps} timed steps after {WARMUP} warm-up per "
           f"(setting, method), {bill.batch_note}"]
    out += [n for n in bill.notes if n.startswith("calibrated on CPU")]
    out += ["", "| setting | method | trials | steps per trial | steps/s per trial | data wait | trials per GPU | "
                "trial-hours | device-hours | cost USD |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in bill.rows:
        steps = sorted(set(r.steps))
        out.append(f"| {r.setting} | {r.method} | {r.trials} | {'/'.join(_num(s) for s in steps)} | "
                   f"{r.steps_per_s:.4g} | {100 * r.data_wait:.1f}% | {r.per_gpu} | {_num(r.trial_hours)} | "
                   f"{_num(r.device_hours)} | {_num(r.device_hours * bill.price) if priced else '-'} |")
    out.append(f"| total | | {sum(r.trials for r in bill.rows)} | | | | | {_num(bill.trial_hours)} | "
               f"{_num(bill.device_hours)} | {_num(bill.device_hours * bill.price) if priced else '-'} |")
    out.append("")
    out.append("device-hours = trials x steps / (steps/s per trial) / 3600 x the device share of a trial "
               "(resources.gpu; 1 for a CPU-only trial)" +
               (f"; cost = device-hours x ${bill.price:g} per GPU-hour" if priced
                else "; pass --price-per-gpu-hour USD for the cost"))
    out += [f"note: {n}" for n in bill.notes if not n.startswith("calibrated on CPU")]
    return "\n".join(out)


def seed_plan(bill: Bill, tracking_uri: str, pilot: str, experiment: str | None = None) -> list[str]:
    """``--dry-run --estimate --name PILOT``: from the finished sweep PILOT's paired differences (each method -
    the reference, over the seeds both have), the seeds each comparison needs to detect delta at 80% power
    (:func:`service.sequential.plan_seeds`: a fixed design, and the group-sequential one), the seeds still to
    run, and their device-hours at this bill's rate per trial (the method's and the reference's trial at each
    new seed). Lines of text; a pilot that is not there or cannot tell is one note."""
    from service.report.stats import default_reference, paired_differences
    from service.report.tables import seed_scores
    from service.report.trials import ReportError, find_sweep, open_store, read_trials
    from service.sequential import DEFAULT_DELTA, POWER, plan_seeds

    try:
        client = open_store(tracking_uri)
        parent, _ = find_sweep(client, pilot, experiment)
        scores = seed_scores(read_trials(client, parent))
    except ReportError as e:
        return [f"note: no seed plan from --name {pilot!r}: {e}"]
    reference = default_reference()
    others = [m for m in scores if m != reference]
    if reference not in scores or not others:
        return [f"note: no seed plan from --name {pilot!r}: it has no comparison with the reference `{reference}`"]
    plans = plan_seeds({m: paired_differences(m, scores[m], reference, scores[reference]) for m in others})
    hours = {r.method: r.device_hours / r.trials for r in bill.rows if r.trials}
    out = ["", f"seed plan from the finished sweep {pilot!r} (reference `{reference}`): the seeds to detect a "
               f"difference of {DEFAULT_DELTA:g} with {POWER:.0%} power, the pilot's SD taken as the truth "
               "(docs/seeds.md)", "",
           "| method | pilot pairs | SD | fixed design | sequential: at most / expected | more seeds (fixed) | "
           "their device-hours |", "|---|---:|---:|---:|---:|---:|---:|"]
    total_ref, total = 0, 0.0
    for p in plans.values():
        more = None if p.fixed is None else max(0, p.fixed - p.pilot)
        cost = None if more is None or p.method not in hours else more * hours[p.method]
        if more is not None and reference in hours:
            total_ref = max(total_ref, more)
        total += cost or 0.0
        seq = "-" if p.sequential is None else f"{p.sequential} / {p.expected:.1f}"
        out.append(f"| {p.method} | {p.pilot} | {'-' if p.sd is None else f'{p.sd:.4f}'} | "
                   f"{'-' if p.fixed is None else p.fixed} | {seq} | {'-' if more is None else more} | "
                   f"{'-' if cost is None else _num(cost)} |" + (f" {p.note}" if p.note else ""))
    total += total_ref * hours.get(reference, 0.0)
    out += ["", f"device-hours for every comparison to reach its fixed design: {_num(total)} (the reference's "
                f"{total_ref} more seeds included once)"]
    return out


def run(sweep: Sweep, args: argparse.Namespace, tracking_uri: str | None = None) -> int:
    """``--dry-run --estimate``: calibrate, print the bill (and with ``--name`` of a finished sweep, the seed plan
    its seeds give: :func:`seed_plan`). A config that cannot be calibrated here is a ConfigError (launch.py: one
    line, exit 2)."""
    bill = calibrate(sweep, steps=args.calibration_steps, batch=args.calibration_batch, price=args.price_per_gpu_hour)
    print()
    print(format_bill(bill), flush=True)
    if args.name and tracking_uri:
        from service.record import experiment_name

        print("\n".join(seed_plan(bill, tracking_uri, args.name, experiment_name(sweep))), flush=True)
    return 0
