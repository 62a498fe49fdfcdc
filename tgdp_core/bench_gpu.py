"""``python -m tgdp_core bench --suite gpu --device cuda``: the one-GPU check of issue 12.

Everything trains in bf16 autocast, on random inputs, each measurement in a fresh process:

    steps     tgdp's and sync's step at ``--batch`` (default: the preset's, 48 at base): s/step,
              samples/s, the share of the bf16 matmul peak measured in the same run (analytic
              FLOPs, ``flops.py``), peak memory
    batch     the largest batch per device a tgdp step trains at, without and with
              ``model.grad_checkpointing``: doubling from ``--batch`` until a step runs out of
              memory, then bisection to within 1/8; ``--max-batch`` caps the search
    compile   tgdp with ``train.compile=true`` beside the uncompiled row of "steps": the first
              step (the compilation in it) and the steady step
    ddp       one tgdp step through DistributedDataParallel at world size 1 (NCCL on CUDA, gloo
              on a CPU), beside the plain step

On one H200 at ``base`` the suite is meant to take under 8 minutes (``seconds`` in the report).
``--device cpu --preset tiny`` runs the same code on a CPU (tests/test_bench.py), where no step
runs out of memory and the search stops at the cap.
"""
from __future__ import annotations

import gc
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as torch_dist

from .bench import _machine, bench_config, in_fresh_process, measure_peaks, training_row
from .config import Config
from .stepbench import TGDPStepper, random_inputs, sync

PARTS = ("steps", "batch", "compile", "ddp")
PEAK_TARGET = 40.0  # percent of the bf16 matmul peak a base bf16 TG-DP step should reach (issue 12)
SUITE_BUDGET_S = 480  # the suite's time budget on one H200 (issue 12)


def run(preset: str = "base", methods: tuple[str, ...] = ("tgdp", "sync"), batch: int | None = None, steps: int = 10,
        warmup: int = 3, device: str = "cuda", max_batch: int = 4096, skip: tuple[str, ...] = (),
        overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every part of the suite not in ``skip``; returns the report (``markdown`` reads it)."""
    bad = [s for s in skip if s not in PARTS]
    if bad:
        raise ValueError(f"--skip: unknown {', '.join(bad)}; --suite gpu has the parts {', '.join(PARTS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (run the suite on a CPU with --device cpu)")
    start = time.perf_counter()
    configs = {m: bench_config(preset, m, "bf16", device, list(overrides)) for m in methods}
    tgdp = configs.get("tgdp") or bench_config(preset, "tgdp", "bf16", device, list(overrides))
    batch = batch or tgdp.train.batch_size
    report: dict[str, Any] = {"setup": {"preset": preset, "batch": batch, "steps": steps, "warmup": warmup,
                                        "device": device, "machine": _machine(device), "torch": torch.__version__,
                                        "threads": torch.get_num_threads(), "overrides": list(overrides)},
                              "peak_flops_per_s": measure_peaks(device, "bf16")}
    peaks = report["peak_flops_per_s"]
    if "steps" not in skip:
        report["steps"] = {m: training_row(cfg, batch, steps, warmup, peaks) for m, cfg in configs.items()}
    if "batch" not in skip:
        report["largest_batch"] = {
            name: in_fresh_process(largest_batch, _with(tgdp, f"model.grad_checkpointing={on}"), batch, max_batch)
            for name, on in (("without checkpointing", False), ("with checkpointing", True))}
    if "compile" not in skip:
        compiled = bench_config(preset, "tgdp", "bf16", device, [*overrides, "train.compile=true"])
        report["compiled"] = training_row(compiled, batch, steps, warmup, peaks)
    if "ddp" not in skip:
        report["ddp"] = in_fresh_process(ddp_steps, tgdp.to_dict(), batch, steps, warmup)
    report["seconds"] = time.perf_counter() - start
    report["targets"] = targets(report)
    return report


def _with(cfg: Config, *overrides: str) -> dict:
    """A copy of ``cfg`` with ``overrides``, as a dict (``cfg`` itself stays as it is)."""
    return Config.from_dict(cfg.to_dict()).override(*overrides).to_dict()


# ---------------------------------------------------------------------- the batch search
def largest_batch(cfg_dict: dict, start: int, cap: int) -> dict[str, Any]:
    """The largest batch (<= ``cap``) at which two tgdp steps run without running out of memory.

    One model, teacher and optimiser; each tried batch gets new inputs. Doubling from
    ``start``, then bisection between the last batch that fit and the first that did not, to
    within an eighth of the former. Each fitted batch's step time and peak memory are kept.
    """
    stepper = TGDPStepper(cfg_dict, min(start, cap))
    tried: dict[int, dict[str, Any] | None] = {}
    fits, fails, size = 0, None, min(start, cap)
    while True:
        tried[size] = _try_batch(stepper, size)
        if tried[size] is None:
            fails = size
            break
        fits = size
        if size >= cap:
            break
        size = min(2 * size, cap)
    while fails is not None and fits and fails - fits > max(1, fits // 8):
        mid = (fits + fails) // 2
        tried[mid] = _try_batch(stepper, mid)
        fits, fails = (mid, fails) if tried[mid] is not None else (fits, mid)
    return {"largest": fits, "first_failed": fails, "capped": fails is None, "cap": cap,
            "at_largest": tried.get(fits), "tried": {str(k): v for k, v in sorted(tried.items())}}


def _try_batch(stepper: TGDPStepper, size: int) -> dict[str, Any] | None:
    """Two steps at ``size``: the second's time and the peak memory, or None when out of memory."""
    stepper.fbank, stepper.frames = random_inputs(stepper.cfg, size, stepper.device)
    cuda = stepper.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(stepper.device)
    out_of_memory = False
    try:
        stepper.step()
        sync(stepper.device)
        start = time.perf_counter()
        stepper.step()
        sync(stepper.device)
    except torch.OutOfMemoryError:
        out_of_memory = True
    if out_of_memory:  # outside the except block: its traceback no longer holds the step's tensors
        stepper.optimizer.zero_grad(set_to_none=True)
        stepper.fbank = stepper.frames = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return None
    took = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(stepper.device) if cuda else None
    return {"step_s": took, "samples_per_s": size / took, "peak_memory_bytes": memory}


# ---------------------------------------------------------------------- one DDP step
def ddp_steps(cfg_dict: dict, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """tgdp's step through DistributedDataParallel in a process group of one (NCCL on CUDA,
    gloo on a CPU) on 127.0.0.1: the median of ``steps`` steps after ``warmup``."""
    cuda = torch.cuda.is_available() and cfg_dict["train"]["device"] != "cpu"
    backend = "nccl" if cuda else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    if cuda:
        torch.cuda.set_device(0)
    torch_dist.init_process_group(backend, rank=0, world_size=1)
    try:
        stepper = TGDPStepper(cfg_dict, batch, ddp=True)
        times = []
        for _ in range(warmup + max(1, steps)):
            sync(stepper.device)
            begin = time.perf_counter()
            stepper.step()
            sync(stepper.device)
            times.append(time.perf_counter() - begin)
    finally:
        torch_dist.destroy_process_group()
    timed = sorted(times[warmup:])
    return {"backend": backend, "world_size": 1, "step_s": timed[len(timed) // 2], "step_times_s": times[warmup:],
            "warmup_times_s": times[:warmup]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- reading the report
def targets(report: dict) -> list[dict[str, Any]]:
    """The issue's targets: base bf16 TG-DP >= 40 % of the bf16 peak (on CUDA at base), the suite
    in under 8 minutes (on CUDA); elsewhere the values come without a verdict."""
    s, out = report["setup"], []
    on_gpu = s["device"] == "cuda" and s["preset"] == "base"
    row = report.get("steps", {}).get("tgdp")
    if row:
        out.append({"name": f"TG-DP at {s['preset']}, bf16, >= {PEAK_TARGET:.0f} % of the bf16 matmul peak",
                    "value": row["percent_of_peak"], "bound": PEAK_TARGET,
                    "pass": row["percent_of_peak"] >= PEAK_TARGET if on_gpu else None})
    out.append({"name": "the suite in under 8 minutes (s)", "value": report["seconds"], "bound": SUITE_BUDGET_S,
                "pass": report["seconds"] < SUITE_BUDGET_S if on_gpu else None})
    return out


def markdown(report: dict) -> str:
    s = report["setup"]
    peak = report["peak_flops_per_s"]["bf16"]
    lines = [f"tgdp GPU check: preset {s['preset']}, bf16 autocast, {s['device']} ({s['machine']}), batch {s['batch']}, "
             f"median of {s['steps']} steps after {s['warmup']}; bf16 matmul peak {_rate(peak)}; the "
             f"suite took {report['seconds']:.0f} s", "",
             "| step | s/step | samples/s | % of bf16 peak | peak memory (GB) | first step (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = dict(report.get("steps", {}))
    if "compiled" in report:
        rows["tgdp, train.compile=true"] = report["compiled"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {r['percent_of_peak']:.1f} | "
                     f"{r['peak_memory_bytes'] / 1e9:.2f} | {r['warmup_times_s'][0]:.1f} |")
    if "ddp" in report:
        d = report["ddp"]
        lines.append(f"| tgdp, DDP world size 1 ({d['backend']}) | {d['step_s']:.3f} | {s['batch'] / d['step_s']:.1f} "
                     f"| | | {d['warmup_times_s'][0] if d['warmup_times_s'] else float('nan'):.1f} |")
    lines.append("")
    for name, r in report.get("largest_batch", {}).items():
        at = r["at_largest"] or {}
        tail = (f"the cap {r['cap']} reached" if r["capped"] else f"{r['first_failed']} ran out of memory")
        speed = f", {at['samples_per_s']:.1f} samples/s there" if at else ""
        lines.append(f"- largest tgdp batch {name}: {r['largest']} ({tail}{speed})")
    if rows:
        lines.append(f"- memory: {next(iter(rows.values()))['memory_measure']}")
    lines += ["", "targets:"]
    for t in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"- {verdict}: {t['name']}: {t['value']:.1f} (bound {t['bound']:.0f})")
    return "\n".join(lines) + "\n"


def _rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.0f} GFLOP/s"
