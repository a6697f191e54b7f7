"""One trial's end-to-end training throughput at the paper's shapes, through the trial's own code (issue 13).

    python -m benchmarks.trial_throughput [--setting resnet,t5] [--methods smear,adapter] [--device cpu|cuda]
        [--precision fp32,bf16] [--steps N] [--warmup N] [--loader-workers N] [--pack 1,4] [--threads N]
        [--batch-size N] [--quick] [--data-dir DIR] [--timeout S] [--json PATH]

Shapes (``trainables.throughput.PAPER_SHAPES``): ResNet-18 (random weights: the same shapes as ImageNet's),
batch 128, 224 px, the paper's augmentation, on DomainNet-format JPEGs generated into a temporary root
(official layout and split files, 345 classes, photo-like JPEGs 300-500 px a side); T5 with the
dimensions of ``google/t5-v1_1-base`` (12+12 layers, d_model 768, d_ff 2048, 12 heads, vocabulary 32128)
and random weights, ByT5's byte tokenizer (no download), batch 128, every source 128 tokens (a generated
GLUE root in the Hub's layout with long texts). ``--quick`` keeps the models and images and shrinks the
batch (ResNet 16, T5 4) so that a shared 2-core CPU finishes in a few minutes.

Every measurement runs in fresh processes (``trainables.throughput.measure_packed``): the setting's
datasets and model, the loop's DataLoader (``--loader-workers``), ``batch_to_model``, ``training_loss``
under the precision, backward, clipping, the optimiser step. ``--pack K`` runs K trials in K processes on
the one device, their timed steps lined up by a barrier, and reports their summed throughput. Columns:
steps/s, images/s or source tokens/s (summed over packed trials), the fraction of step time blocked
waiting for the next batch, peak memory (CUDA max allocated, else the process's peak RSS; the largest
packed trial's). With two precisions or two packings, the ratios follow the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from trainables.throughput import calibration_config, measure_packed, paper_config, scratch_data

SETTINGS = {"resnet": "resnet_domainnet", "t5": "t5_glue"}
QUICK_BATCH = {"resnet_domainnet": 16, "t5_glue": 4}


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", default="resnet", help="resnet, t5, or both comma-separated")
    ap.add_argument("--methods", default="smear,adapter", help="comma-separated registered routing methods")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", help="fp32, bf16, or fp32,bf16 (then the bf16/fp32 ratio)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--loader-workers", type=int, default=None, help="data.loader_workers (default: the config's)")
    ap.add_argument("--pack", default="1", help="trials per device, e.g. 1,4 (summed throughput)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads per trial (0: torch's default)")
    ap.add_argument("--batch-size", type=int, default=None, help="override the paper's batch of 128")
    ap.add_argument("--quick", action="store_true", help="small batches (ResNet 16, T5 4) for a CPU")
    ap.add_argument("--data-dir", type=Path, default=None, help="where the generated data goes (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per measurement")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    from smear.routing import available_methods

    args.settings = _list(args.setting)
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad or not args.settings:
        ap.error(f"--setting {bad[0] if bad else args.setting!r} is not valid; valid: {', '.join(SETTINGS)}")
    args.method_list = _list(args.methods)
    bad = [m for m in args.method_list if m not in available_methods()]
    if bad or not args.method_list:
        ap.error(f"--methods has unknown method {bad[0] if bad else ''!r}; valid: {', '.join(available_methods())}")
    args.precisions = _list(args.precision)
    if not args.precisions or any(p not in ("fp32", "bf16") for p in args.precisions):
        ap.error(f"--precision {args.precision!r} is not valid; valid: fp32, bf16, fp32,bf16")
    try:
        args.packs = [int(k) for k in _list(args.pack)]
    except ValueError:
        args.packs = []
    if not args.packs or min(args.packs) < 1:
        ap.error(f"--pack {args.pack!r} is not valid; valid: positive integers, e.g. 1 or 1,4")
    for flag in ("steps", "warmup"):
        if getattr(args, flag) < (1 if flag == "steps" else 0):
            ap.error(f"--{flag}={getattr(args, flag)} is too small")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    return args


def run(args) -> list[dict]:
    results = []
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="smear-throughput-"))
    try:
        with scratch_data(data_dir):
            for short in args.settings:
                setting = SETTINGS[short]
                batch = args.batch_size or (QUICK_BATCH[setting] if args.quick else None)
                for method in args.method_list:
                    for precision in args.precisions:
                        for k in args.packs:
                            results.append(_measure(args, setting, method, precision, k, batch, data_dir))
                            print(_row(results[-1]), flush=True)
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    return results


def _measure(args, setting: str, method: str, precision: str, k: int, batch: int | None, data_dir: Path) -> dict:
    over = {"precision": precision, "torch_threads": args.threads}
    if args.loader_workers is not None:
        over["data"] = {"loader_workers": args.loader_workers}
    cfg = calibration_config(paper_config(setting, method), device=args.device, data_dir=data_dir,
                             steps=args.steps + args.warmup, batch_size=batch, overrides=over)
    t0 = time.perf_counter()
    row = measure_packed(cfg, k=k, steps=args.steps, warmup=args.warmup, timeout=args.timeout).as_dict()
    row.update(wall_s=time.perf_counter() - t0, loadavg_1min=os.getloadavg()[0])
    return row


HEADER = ("| setting | method | precision | pack | batch | loader workers | steps/s | work/s | data wait | "
          "peak MB | load |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def _row(r: dict) -> str:
    return (f"| {r['setting']} | {r['method']} | {r['precision']} | {r['pack']} | {r['batch_size']} | "
            f"{r['loader_workers']} | {r['steps_per_s']:.3g} | {_n(r['work_per_s'])} {r['unit']}/s | "
            f"{100 * r['data_wait_fraction']:.1f}% | {r['peak_mem_mb']:,.0f} | {r['loadavg_1min']:.1f} |")


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def ratios(results: list[dict]) -> list[str]:
    """bf16 / fp32 throughput per (setting, method, pack); pack K / pack 1 per (setting, method, precision)."""
    by = {(r["setting"], r["method"], r["precision"], r["pack"]): r for r in results}
    out = []
    for (s, m, p, k), r in by.items():
        if p == "bf16" and (s, m, "fp32", k) in by:
            f = by[(s, m, "fp32", k)]
            compute = (1 - f["data_wait_fraction"]) / f["steps_per_s"] / ((1 - r["data_wait_fraction"]) / r["steps_per_s"])
            out.append(f"{s} {m} pack {k}: bf16 / fp32 throughput (= fp32 / bf16 step time) = "
                       f"{r['work_per_s'] / f['work_per_s']:.2f}x; without the data wait: {compute:.2f}x")
        if k > 1 and (s, m, p, 1) in by:
            one = by[(s, m, p, 1)]
            out.append(f"{s} {m} {p}: {k} packed trials / one trial, summed throughput = "
                       f"{r['work_per_s'] / one['work_per_s']:.2f}x")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    print(f"# trial_throughput: device={args.device}{' (' + meta['gpu'] + ')' if meta['gpu'] else ''} "
          f"cores={meta['cores']} torch={torch.__version__} steps={args.steps} warmup={args.warmup} "
          f"quick={args.quick} 1-min load {os.getloadavg()[0]:.1f}")
    print(HEADER, flush=True)
    results = run(args)
    lines = ratios(results)
    if lines:
        print("\n" + "\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results, "ratios": lines}, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
