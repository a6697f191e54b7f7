"""Cost of one expert routing block, forward + backward, for every registered routing method.

Usage:
    python -m benchmarks.routing_cost [--quick] [--json PATH] [--methods a,b] [--reps N]
                                      [--warmup N] [--threads N] [--device cpu|cuda]
                                      [--malloc reuse|default] [--breakdown]

Two settings at the SMEAR paper's shapes (methods.md section 1):
  t5      -- sequence layout, x (B=128, S=128, C=768), rank 24, 8 experts, 8 tasks (one T5 block)
  resnet  -- image layout, x (B=128, C=512, 7, 7), rank 32, 6 experts, 6 domains (ResNet-18 last stage)
``--quick`` shrinks only the batch (t5 B=16, resnet B=32) so a 2-core CPU finishes in about a minute.

What one measurement is: ``block.train()``; input x with ``requires_grad`` (as for a block inside a
network, so dx is computed too); parameter grads set to None first (as after ``optimizer.zero_grad()``);
forward; per-example loss ``(y * g).mean`` over non-batch axes with a fixed random g; loss = its mean +
``smear.routing.aux_loss(block, per_example_loss)`` (the methods' auxiliary and REINFORCE-style terms);
backward. Every method gets the same routing context: task_ids random in [0, num_tasks), example_ids =
arange(B), step = round index.

Timing: all blocks live in one process; after ``--warmup`` rounds, each of ``--reps`` rounds runs every
method once, round-robin, with the starting method rotated every round (so drift and cache effects hit
all methods alike). Reported: median ms; ``ratio`` = median / median(adapter); ``ratio_tag`` =
median / median(tag); ``ratio_paired`` (``ratio_tag_paired``) = median over rounds of (method ms /
adapter (tag) ms in the same round), which is less sensitive to slow drift on a noisy machine. On CUDA, torch.cuda.synchronize()
brackets each timed region.

Threads: ``torch.set_num_threads(--threads)`` (default: every core this process may run on, from
``os.sched_getaffinity``) and one inter-op thread; recorded in the JSON metadata. On a shared machine,
intra-op threads = all cores is fragile: when another process takes a core, every parallel op waits
at its barrier for the descheduled thread, and times inflate several-fold. Each setting records the
1-minute load average and the cores this process actually used (``settings.<name>.run`` in the
JSON); if the load average exceeds the core count, re-run, or use ``--threads 1``, which degrades
gracefully under contention.

CPU allocator (``--malloc``, CPU only): glibc serves every allocation above 32 MiB (a full-shape T5
activation is 48 MiB) with a fresh mmap, so each step page-faults its activations in again; on the
2-core VM this benchmark was written on that costs ~16 ms per 48 MiB (3x the multiply that fills it)
and dominated full-shape timings. ``reuse`` (default) re-executes the script with
MALLOC_MMAP_MAX_=0 and a huge MALLOC_TRIM_THRESHOLD_, so freed memory is kept and reused, as the
CUDA caching allocator does; ``default`` leaves glibc alone (what a plain CPU training process sees).

Memory (``peak_mb``), measured in one extra, untimed fwd+bwd per method:
  cuda -- torch.cuda.max_memory_allocated() during fwd+bwd minus memory allocated just before
          (inputs and parameters already resident; includes activations, output, dx and param grads).
  cpu  -- the same quantity from the CPU allocator's event stream: torch.profiler with
          profile_memory=True records every allocation and free; peak_mb is the maximum running sum
          over fwd+bwd, i.e. the peak of bytes allocated above the pre-step baseline. If the profiler's
          event stream is unavailable, peak_mb falls back to saved_mb + output size.
  saved_mb (both devices) -- bytes of tensors autograd saves for backward (saved_tensors_hooks,
          each storage counted once, parameters and the input x excluded): the activation memory a
          method keeps between forward and backward.

Targets (printed with PASS/MISS): smear <= 1.15x min(adapter, tag); hash, top_k, st_gumbel,
reinforce <= 1.10x tag; ensemble and dselect_k are reported against N x adapter (no pass/fail).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import smear.routing as routing
from smear.routing import ExpertRoutingBlock, RoutingConfig, available_methods, set_context
from trainables.throughput import cpu_model


@dataclass
class Setting:
    name: str
    layout: str
    batch: int
    dim: int
    rank: int
    num_experts: int
    num_tasks: int
    seq: int = 0        # sequence layout: tokens per example
    spatial: int = 0    # image layout: H = W

    def input_shape(self) -> tuple[int, ...]:
        if self.layout == "sequence":
            return (self.batch, self.seq, self.dim)
        return (self.batch, self.dim, self.spatial, self.spatial)

    def describe(self) -> dict:
        return {"layout": self.layout, "x": list(self.input_shape()), "C": self.dim, "r": self.rank,
                "N": self.num_experts, "num_tasks": self.num_tasks}


def settings(quick: bool) -> list[Setting]:
    return [
        Setting("t5", "sequence", 16 if quick else 128, 768, 24, 8, 8, seq=128),
        Setting("resnet", "image", 32 if quick else 128, 512, 32, 6, 6, spatial=7),
    ]


# --- building blocks ------------------------------------------------------------------------------

def make_config(method: str, s: Setting) -> RoutingConfig:
    kw = dict(method=method, num_experts=s.num_experts, rank=s.rank)
    fields = RoutingConfig.__dataclass_fields__
    if "hash_num_examples" in fields:
        # hash routing assigns example ids < hash_num_examples; the benchmark's ids are arange(B)
        default = getattr(RoutingConfig(), "hash_num_examples", None)
        if not isinstance(default, int) or default < s.batch:
            kw["hash_num_examples"] = s.batch
    cfg = RoutingConfig(**kw)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


_aux_loss = getattr(routing, "aux_loss", None)


class Case:
    """One method's block in one setting, with everything needed to run a training step on it."""

    def __init__(self, method: str, s: Setting, x: torch.Tensor, g: torch.Tensor, task_ids: torch.Tensor,
                 device: torch.device):
        self.method, self.s, self.x, self.g = method, s, x, g
        torch.manual_seed(0)
        self.block = ExpertRoutingBlock(s.dim, make_config(method, s), layout=s.layout,
                                        num_tasks=s.num_tasks).to(device)
        self.block.train()
        self.task_ids = task_ids
        self.example_ids = torch.arange(s.batch, device=device)
        self.params = [p for p in self.block.parameters() if p.requires_grad]
        self.num_experts = self.block.num_experts

    def step(self, step: int) -> None:
        """One training step's forward + backward (no optimizer update)."""
        block = self.block
        for p in self.params:
            p.grad = None
        self.x.grad = None
        block.last = None
        set_context(block, task_ids=self.task_ids, example_ids=self.example_ids, step=step)
        y = block(self.x)
        per_example = (y * self.g).flatten(1).mean(1)                    # (b,)
        loss = per_example.mean()
        if _aux_loss is not None:
            loss = loss + _aux_loss(block, per_example)
        loss.backward()


# --- measurement ----------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(case: Case, step: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    case.step(step)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def saved_bytes(case: Case, step: int) -> int:
    """Bytes of tensors saved for backward (unique storages; parameters and the input excluded)."""
    exclude = {p.untyped_storage().data_ptr() for p in case.params}
    exclude.add(case.x.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in exclude and ptr != 0:
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except Exception:  # noqa: BLE001 -- sparse or exotic tensors: not counted
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        case.step(step)
    return sum(seen.values())


def cpu_peak_bytes(case: Case, step: int) -> int | None:
    """Peak of CPU-allocator bytes above the pre-step baseline during fwd+bwd (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            case.step(step)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU] or events
    except Exception:  # noqa: BLE001 -- private profiler API; fall back to saved-tensor accounting
        return None
    if not events:
        return None
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def peak_memory(case: Case, step: int, device: torch.device) -> tuple[float, float, str]:
    """(peak_mb, saved_mb, how peak_mb was measured)."""
    gc.collect()
    saved = saved_bytes(case, step) / 2**20
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        case.step(step)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, saved, "cuda_max_allocated"
    case.block.last = None
    for p in case.params:
        p.grad = None
    case.x.grad = None
    gc.collect()
    peak = cpu_peak_bytes(case, step)
    if peak is None:
        out = case.x.numel() * case.x.element_size() / 2**20
        return saved + out, saved, "saved_plus_output"
    return peak / 2**20, saved, "cpu_allocator_peak"


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_setting(s: Setting, methods: list[str], args, device: torch.device) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(*s.input_shape(), generator=gen).to(device).requires_grad_(True)
    g = torch.randn(*s.input_shape(), generator=gen).to(device)
    task_ids = torch.randint(0, s.num_tasks, (s.batch,), generator=gen).to(device)

    cases: dict[str, Case] = {}
    errors: dict[str, str] = {}
    for m in methods:
        try:
            case = Case(m, s, x, g, task_ids, device)
            case.step(0)  # fails early on methods that cannot run at these shapes
            cases[m] = case
        except Exception as e:  # noqa: BLE001 -- report and keep benchmarking the others
            errors[m] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            print(f"  [{s.name}] {m}: skipped ({errors[m]})", flush=True)

    names = list(cases)
    times: dict[str, list[float]] = {m: [] for m in names}
    step = 1
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rnd in range(args.warmup + args.reps):
            k = rnd % max(len(names), 1)
            order = names[k:] + names[:k]
            for m in order:
                ms = time_step(cases[m], step, device)
                if rnd >= args.warmup:
                    times[m].append(ms)
            step += 1
            if rnd >= args.warmup and (rnd - args.warmup + 1) % max(args.reps // 4, 1) == 0:
                print(f"  [{s.name}] round {rnd - args.warmup + 1}/{args.reps}", flush=True)
    finally:
        if gc_was_enabled:
            gc.enable()

    res: dict[str, dict] = {}
    for m in names:
        peak, saved, how = peak_memory(cases[m], step, device)
        ts = times[m]
        res[m] = {"ms": statistics.median(ts), "p25_ms": quantile(ts, 0.25), "p75_ms": quantile(ts, 0.75),
                  "peak_mb": peak, "saved_mb": saved, "peak_mb_measure": how,
                  "num_experts": cases[m].num_experts,
                  "params": sum(p.numel() for p in cases[m].params)}
    for ref, key in (("adapter", "ratio"), ("tag", "ratio_tag")):
        for m in names:
            res[m][key] = res[m]["ms"] / res[ref]["ms"] if ref in res else None
    for ref, key in (("adapter", "ratio_paired"), ("tag", "ratio_tag_paired")):
        for m in names:
            res[m][key] = (statistics.median(a / b for a, b in zip(times[m], times[ref]))
                           if ref in res else None)
    for m, err in errors.items():
        res[m] = {"error": err}

    breakdown = component_breakdown(cases, s, args, device) if args.breakdown else {}
    return res, breakdown


# --- optional: where smear / tag / adapter spend their time ----------------------------------------

def component_breakdown(cases: dict[str, Case], s: Setting, args, device: torch.device) -> dict:
    """fwd+bwd ms of the pieces of the smear, tag and adapter paths on the block's own (b, s, c) tokens."""
    from smear.routing._base import ExpertBank
    from smear.routing.block import masked_mean

    b = s.batch
    tokens = s.seq if s.layout == "sequence" else s.spatial * s.spatial
    gen = torch.Generator().manual_seed(7)
    xt = torch.randn(b, tokens, s.dim, generator=gen).to(device).requires_grad_(True)
    gt = torch.randn(b, tokens, s.dim, generator=gen).to(device)
    bank = ExpertBank(s.num_experts, s.dim, s.rank).to(device)
    one = ExpertBank(1, s.dim, s.rank).to(device)
    p = torch.softmax(torch.randn(b, s.num_experts, generator=gen), -1).to(device).requires_grad_(True)
    idx = torch.randint(0, s.num_experts, (b,), generator=gen).to(device)
    merged = [t.detach().requires_grad_(True) for t in bank.merge(p)]
    gate = torch.rand(b, 1, generator=gen).to(device).requires_grad_(True)
    extra = list(cases["smear"].block.router.parameters()) if "smear" in cases and cases["smear"].block.router else []

    def fb(fn):
        def run():
            for t in (xt, p, gate, *merged, *bank.parameters(), *one.parameters(), *extra):
                t.grad = None
            out = fn()
            if out.dim() == 3 and out.shape == gt.shape:
                (out * gt).mean().backward()
            else:
                out.sum().backward()
        return run

    parts = {
        "adapter: apply_shared (one GEMM)": fb(lambda: one.apply_shared(xt)),
        "tag: gather + apply (bmm)": fb(lambda: bank.apply(xt, *bank.gather(idx))),
        "apply (bmm) alone, given merged weights": fb(lambda: bank.apply(xt, *merged)),
        "smear: merge alone": fb(lambda: sum(t.sum() for t in bank.merge(p))),
        "smear: merge + apply": fb(lambda: bank.apply(xt, *bank.merge(p))),
    }
    parts["candidate: tag via index_select gather + apply"] = fb(lambda: bank.apply(
        xt, bank.w_down.index_select(0, idx), bank.b_down.index_select(0, idx), bank.w_up.index_select(0, idx)))
    parts["gate multiply y * gate[:, :, None] (top_k, st_gumbel)"] = fb(lambda: xt * gate[:, :, None])
    if "smear" in cases and cases["smear"].block.router is not None:
        router = cases["smear"].block.router
        full = torch.ones(b, tokens, dtype=torch.bool, device=device)
        u = xt.detach().mean(1)
        parts["router alone: softmax(LayerNorm(u) . W_hat)"] = fb(lambda: router(u).softmax(-1).sum())
        parts["router incl. u = masked_mean(x), grad to x"] = fb(
            lambda: router(masked_mean(xt, full)).softmax(-1).sum())
    out: dict[str, list[float]] = {k: [] for k in parts}
    keys = list(parts)
    for rnd in range(args.warmup + args.reps):
        for k in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
            sync(device)
            t0 = time.perf_counter()
            parts[k]()
            sync(device)
            if rnd >= args.warmup:
                out[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


# --- reporting ------------------------------------------------------------------------------------

def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(res: dict) -> str:
    lines = ["| method | ms (median) | p25-p75 ms | ratio to adapter | ratio to tag | peak_mb | saved_mb "
             "| paired ratio to adapter | paired ratio to tag |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ok = sorted((m for m in res if "error" not in res[m]), key=lambda m: res[m]["ms"])
    for m in ok:
        r = res[m]
        lines.append(f"| {m} | {r['ms']:.1f} | {r['p25_ms']:.1f}-{r['p75_ms']:.1f} | {fmt(r['ratio'])} | "
                     f"{fmt(r['ratio_tag'])} | {r['peak_mb']:.1f} | {r['saved_mb']:.1f} | "
                     f"{fmt(r['ratio_paired'])} | {fmt(r['ratio_tag_paired'])} |")
    for m in sorted(m for m in res if "error" in res[m]):
        lines.append(f"| {m} | error: {res[m]['error']} | | | | | | | |")
    return "\n".join(lines)


def check_targets(res: dict, setting: Setting) -> list[dict]:
    """Targets from the brief; ``status`` is PASS, MISS, INFO (report only) or N/A (method missing).

    ``value`` (which decides PASS/MISS) is a ratio of medians; ``paired`` is the median of per-round
    ratios against the same baseline, shown alongside as a noise check.
    """
    def ok(m):
        return m in res and "error" not in res[m]

    def paired(m, ref):
        return res[m]["ratio_paired" if ref == "adapter" else "ratio_tag_paired"]

    out = []
    bases = [m for m in ("adapter", "tag") if ok(m)]
    if ok("smear") and bases:
        ref = min(bases, key=lambda m: res[m]["ms"])
        r = res["smear"]["ms"] / res[ref]["ms"]
        out.append({"method": "smear", "target": f"<= 1.15x min(adapter, tag) [{ref}]", "value": r,
                    "paired": paired("smear", ref), "status": "PASS" if r <= 1.15 else "MISS"})
    else:
        out.append({"method": "smear", "target": "<= 1.15x min(adapter, tag)", "value": None, "paired": None,
                    "status": "N/A"})
    for m in ("hash", "top_k", "st_gumbel", "reinforce"):
        if ok(m) and ok("tag"):
            r = res[m]["ms"] / res["tag"]["ms"]
            out.append({"method": m, "target": "<= 1.10x tag", "value": r, "paired": paired(m, "tag"),
                        "status": "PASS" if r <= 1.10 else "MISS"})
        else:
            out.append({"method": m, "target": "<= 1.10x tag", "value": None, "paired": None, "status": "N/A"})
    for m in ("ensemble", "dselect_k"):
        if ok(m) and ok("adapter"):
            n = res[m].get("num_experts", setting.num_experts)
            out.append({"method": m, "target": f"about N x adapter (N={n})", "value": res[m]["ms"] / res["adapter"]["ms"],
                        "paired": paired(m, "adapter"), "status": "INFO"})
        else:
            out.append({"method": m, "target": "about N x adapter", "value": None, "paired": None, "status": "N/A"})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batches (t5 B=16, resnet B=32) for CPU")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--methods", default=None, help="comma-separated subset (adapter and tag are always added "
                                                     "when registered, as the ratio baselines)")
    ap.add_argument("--settings", default="t5,resnet", help="comma-separated subset of t5,resnet")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 15 full, 25 quick)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all usable cores)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--malloc", default="reuse", choices=("reuse", "default"),
                    help="CPU: reuse freed memory instead of page-faulting fresh mmaps every step (see module doc)")
    ap.add_argument("--breakdown", action="store_true", help="also time the pieces of smear/tag/adapter")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 25 if args.quick else 15

    if args.device == "cpu" and args.malloc == "reuse" and os.environ.get("MALLOC_MMAP_MAX_") != "0" \
            and platform.system() == "Linux":
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40))
        sys.stdout.flush()
        again = ["-m", __spec__.name] if __spec__ else [sys.argv[0]]  # python -m benchmarks.routing_cost
        os.execve(sys.executable, [sys.executable, *again, *sys.argv[1:]], env)  # glibc reads these only at start-up

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")

    registered = available_methods()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in registered]
        if unknown:
            ap.error(f"unknown method(s) {unknown}; registered: {registered}")
        methods = [m for m in registered if m in wanted or m in ("adapter", "tag")]
    else:
        methods = registered

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "node_cpus": os.cpu_count(), "cpu_model": cpu_model(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": args.device, "threads": threads, "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "quick": args.quick, "reps": args.reps, "warmup": args.warmup,
        "malloc": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
        if args.device == "cpu" else None,
        "registered_methods": registered, "methods": methods, "dtype": "float32",
        "peak_mb": ("torch.cuda.max_memory_allocated during fwd+bwd minus allocated before" if device.type == "cuda"
                    else "CPU allocator peak above the pre-step baseline during fwd+bwd (torch.profiler memory events)"),
    }
    print(f"# routing_cost: device={args.device} threads={threads} torch={torch.__version__} "
          f"reps={args.reps} warmup={args.warmup} quick={args.quick} malloc={args.malloc}")
    print(f"# methods ({len(methods)} of {len(registered)} registered): {', '.join(methods)}")

    want_settings = {x.strip() for x in args.settings.split(",")}
    report: dict = {"metadata": meta, "settings": {}, "targets": {}, "breakdown": {}}
    results: dict = {}
    t_all = time.perf_counter()
    for s in settings(args.quick):
        if s.name not in want_settings:
            continue
        report["settings"][s.name] = s.describe()
        print(f"\n## {s.name}: {s.layout} layout, x {tuple(s.input_shape())}, C={s.dim}, r={s.rank}, "
              f"N={s.num_experts}, tasks={s.num_tasks}", flush=True)
        t0, cpu0, load0 = time.perf_counter(), os.times(), os.getloadavg()[0]
        res, breakdown = run_setting(s, methods, args, device)
        results[s.name] = res
        wall, cpu1 = time.perf_counter() - t0, os.times()
        busy = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / wall
        report["settings"][s.name]["run"] = {
            "wall_s": wall, "loadavg_1min_start": load0, "loadavg_1min_end": os.getloadavg()[0],
            "process_cpu_per_wall": busy,
            "system_cpu_fraction": (cpu1.system - cpu0.system) / max(cpu1.user - cpu0.user + cpu1.system - cpu0.system, 1e-9)}
        print(f"  ({wall:.0f}s; 1-min load average {load0:.1f} -> {os.getloadavg()[0]:.1f}; "
              f"process used {busy:.2f} cores on average, {threads} threads)\n")
        print(table(res))
        report["targets"][s.name] = check_targets(res, s)
        if breakdown:
            report["breakdown"][s.name] = breakdown
            print("\ncomponents, fwd+bwd median ms:")
            for k, v in breakdown.items():
                print(f"  {k:55s} {v:8.2f}")

    print("\n## targets")
    for name, rows in report["targets"].items():
        for r in rows:
            v = "-" if r["value"] is None else f"{r['value']:.3f}x"
            pv = "" if r["paired"] is None else f"(paired {r['paired']:.3f}x)"
            print(f"  [{name}] {r['method']:10s} {r['target']:38s} {v:>7s} {pv:16s} {r['status']}")
    if len(registered) < 15:
        print(f"\nNOTE: only {len(registered)} of 15 routing methods registered; re-run when all 15 are.")
    meta["wall_s"] = time.perf_counter() - t_all

    if args.json:
        out = dict(results)
        out["_meta"] = report
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
