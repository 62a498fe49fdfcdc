"""Interleaved step timing: one worker process per compared setup, stepped in turn (issue 12).

On a machine shared with other work the speed of the cores changes from minute to minute, so
timing setup A for a minute and then B for a minute compares the minutes as much as the setups.
Here each setup lives in its own process, built once, and the processes take turns, one step
at a time, in the order A B B A A B ... (each round reverses the last, so neither side always
runs first): a slow spell falls on both. Only one process computes at a time.

    workers = {"tgdp": ("tgdp_core.stepbench:TGDPStepper", (cfg.to_dict(), 8)), ...}
    rows = interleaved(workers, warmup=1, steps=3, threads=2)

A stepper is built in its worker by ``factory(*args)`` (a "module:name" string, so any module
can supply one, the official-code harness included) and has ``step() -> float`` (the step's
loss) and ``device`` (a torch.device). Each process is fresh (multiprocessing's fork server), so
its peak memory is its setup's own: CUDA's max_memory_allocated, or the process's peak RSS on a
CPU (``baseline_rss_bytes`` is its RSS before the setup was built: imports and the interpreter).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import multiprocessing
import resource
import shlex
import statistics
import sys
import time
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .model import build_model
from .trainer import autocast_for, compile_blocks, make_optimizer, make_teacher, mask_generator, resolve_device, train_step

_STEPPER: Any = None  # the worker process's stepper (each worker holds one)
_BASELINE_RSS = 0


# ---------------------------------------------------------------------- in the worker
def _build(factory: str, args: tuple, threads: int) -> None:
    global _STEPPER, _BASELINE_RSS
    if threads:
        torch.set_num_threads(threads)
    _BASELINE_RSS = peak_rss()
    module, name = factory.split(":")
    _STEPPER = getattr(importlib.import_module(module), name)(*args)
    if _STEPPER.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(_STEPPER.device)


def _step() -> tuple[float, float, float]:
    """One step: (wall seconds, this process's CPU seconds over all its threads, loss)."""
    device = _STEPPER.device
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = _STEPPER.step()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, loss


def _count_flops() -> float:
    return count_flops(_STEPPER)


def count_flops(stepper, batch: int = 2) -> float:
    """FLOPs per sample of one of ``stepper``'s steps as torch's FlopCounterMode counts them:
    one step on the first ``batch`` rows of its inputs, under SDPA's math backend (whose
    matmuls the counter sees). Every op but the (B, B) InfoNCE logits is linear in the batch.
    The step is a real one (an optimiser update on random inputs), so count before timing.
    """
    full = stepper.fbank, stepper.frames
    stepper.fbank, stepper.frames = (t[:batch] for t in full)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            stepper.step()
    finally:
        stepper.fbank, stepper.frames = full
    return counter.get_total_flops() / batch


def _memory() -> dict[str, Any]:
    device = _STEPPER.device
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "memory_measure": "cuda max_memory_allocated"}
    return {"peak_memory_bytes": peak_rss(), "baseline_rss_bytes": _BASELINE_RSS,
            "memory_measure": "peak RSS of a fresh process (before building the setup: baseline_rss_bytes)"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss() -> int:
    """This process's peak resident set size in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports kilobytes


# ---------------------------------------------------------------------- the driver
def interleaved(workers: dict[str, tuple[str, tuple]], warmup: int, steps: int, threads: int = 0,
                progress=None, flops: bool = False) -> dict[str, dict[str, Any]]:
    """Build each setup in its own fresh process, then step them in turn; per setup: the median
    step time over ``steps`` after ``warmup``, every time, the losses and the peak memory.

    ``threads``: torch threads per worker (0: torch's default). ``progress``: called with a line
    after each step (e.g. ``print``). ``flops``: also count each setup's FLOPs per sample
    (``count_flops``, before the timing).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with contextlib.ExitStack() as stack:
        pools = {name: stack.enter_context(concurrent.futures.ProcessPoolExecutor(1, mp_context=context))
                 for name in workers}
        for future in [pools[name].submit(_build, factory, args, threads) for name, (factory, args) in workers.items()]:
            future.result()  # built in parallel; a failure raises here, naming its cause
        counted = {name: pool.submit(_count_flops).result() for name, pool in pools.items()} if flops else {}
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in workers}
        order = list(workers)
        for i in range(warmup + steps):
            for name in order:
                runs[name].append(pools[name].submit(_step).result())
                if progress:
                    kind, number = ("warm-up", i + 1) if i < warmup else ("step", i + 1 - warmup)
                    took, cpu, loss = runs[name][-1]
                    progress(f"{kind} {number}: {name} {took:.2f} s (CPU {cpu:.2f} s), loss {loss:.4f}")
            order.reverse()
        memory = {name: pool.submit(_memory).result() for name, pool in pools.items()}
    return {name: _row(runs[name], warmup, memory[name], counted.get(name)) for name in workers}


def _row(runs: list[tuple[float, float, float]], warmup: int, memory: dict, flops: float | None) -> dict[str, Any]:
    wall, cpu, losses = (list(column) for column in zip(*runs))
    row = {"step_s": statistics.median(wall[warmup:]), "step_cpu_s": statistics.median(cpu[warmup:]),
           "step_times_s": wall[warmup:], "step_cpu_times_s": cpu[warmup:], "warmup_times_s": wall[:warmup],
           "losses": losses, **memory}
    if flops is not None:
        row["flops_per_sample"] = flops
    return row


def paired_ratio(a: dict[str, Any], b: dict[str, Any], key: str = "step_times_s") -> float:
    """The median over the timed rounds of a's time / b's time in the same round (the two ran
    back to back, so a slow spell of the machine mostly cancels)."""
    return statistics.median(x / y for x, y in zip(a[key], b[key]))


# ---------------------------------------------------------------------- tgdp's step
class TGDPStepper:
    """tgdp's training step (``trainer.train_step``) on fixed random inputs, as ``bench`` times it:
    a fresh model of ``cfg``, its teacher and Adam, steps from ``first_step`` on (past the
    guidance warm-up and the contrastive curriculum, so the steps cost what most of a run costs).
    ``ddp``: step the model through DistributedDataParallel (the process group must exist)."""

    def __init__(self, cfg_dict: dict, batch: int, first_step: int | None = None, ddp: bool = False):
        self.cfg = cfg = Config.from_dict(cfg_dict)
        self.device = resolve_device(cfg)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg).to(self.device).train()
        self.teacher = make_teacher(self.model)
        self.optimizer = make_optimizer(self.model, cfg)
        if cfg.train.compile:
            compile_blocks(self.model, self.teacher)
        self.runner = self.model
        if ddp:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.runner = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.autocast = autocast_for(cfg, self.device)
        self.fbank, self.frames = random_inputs(cfg, batch, self.device)
        self.next_step = steady_step(cfg) if first_step is None else first_step

    def step(self) -> float:
        step, self.next_step = self.next_step, self.next_step + 1
        record = train_step(self.runner, self.teacher, self.optimizer, self.fbank, self.frames, step,
                            generator=mask_generator(self.cfg, step, self.device), student=self.model,
                            autocast=self.autocast)
        return record["loss"]


def random_inputs(cfg: Config, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of normal noise in the model's input shapes: fbank (B, T, F), frames (B, 3, H, W)."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    fbank = torch.randn(batch, m.audio_frames, m.mel_bins, generator=g)
    frames = torch.randn(batch, 3, m.image_size, m.image_size, generator=g)
    return fbank.to(device), frames.to(device)


def steady_step(cfg: Config) -> int:
    """The first step after the guidance warm-up and the mask-ratio curricula: the bench times
    steps from here on, the cost of most of a run (a fresh model costs the same at any step)."""
    o = cfg.objective
    return cfg.steps_of(max(cfg.teacher.guidance_warmup_fraction, o.contrastive_mask_warmup_fraction,
                            o.single_pass_mask_warmup_fraction))


# ---------------------------------------------------------------------- config variants
def compare_variants(base: Config, variants: list[str], batch: int, warmup: int, steps: int, threads: int = 0,
                     progress=None) -> dict[str, Any]:
    """tgdp's step at ``base`` with each variant's overrides (space-separated ``section.field=value``;
    "" = ``base`` itself), interleaved; the first variant is the reference: each row carries its
    speed relative to it and the largest difference of the losses at the same steps."""
    configs = {}
    for variant in variants:
        cfg = Config.from_dict(base.to_dict()).override(*shlex.split(variant))
        configs[variant.strip() or "as configured"] = cfg
    workers = {name: ("tgdp_core.stepbench:TGDPStepper", (cfg.to_dict(), batch)) for name, cfg in configs.items()}
    rows = interleaved(workers, warmup, steps, threads, progress=progress)
    reference = next(iter(rows.values()))
    for row in rows.values():
        row["speedup"] = reference["step_s"] / row["step_s"]
        row["speedup_paired"] = paired_ratio(reference, row)
        row["speedup_cpu"] = reference["step_cpu_s"] / row["step_cpu_s"]
        row["max_loss_difference"] = max(abs(a - b) for a, b in zip(row["losses"], reference["losses"]))
    return {"setup": {"preset": base.preset_name, "method": base.method, "precision": base.train.precision,
                      "batch": batch, "warmup": warmup, "steps": steps, "threads": threads or torch.get_num_threads(),
                      "device": base.train.device, "torch": torch.__version__}, "variants": rows}


def variants_markdown(report: dict, machine: str = "") -> str:
    s = report["setup"]
    lines = [f"tgdp variants: preset {s['preset']}, method {s['method']}, precision {s['precision']}, batch "
             f"{s['batch']}, {s['device']}{f' ({machine})' if machine else ''}, {s['threads']} threads, median of "
             f"{s['steps']} steps after {s['warmup']} warm-up, the variants taking turns step by step", "",
             "| variant | step (s) | steps (s) | CPU (s) | peak memory (GB) | speed vs first | per round | CPU time "
             "| max abs loss difference vs first |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["variants"].items():
        times = ", ".join(f"{t:.2f}" for t in r["step_times_s"])
        lines.append(f"| {name} | {r['step_s']:.2f} | {times} | {r['step_cpu_s']:.2f} | "
                     f"{r['peak_memory_bytes'] / 1e9:.2f} | {r['speedup']:.2f}x | {r['speedup_paired']:.2f}x | "
                     f"{r['speedup_cpu']:.2f}x | {r['max_loss_difference']:.2e} |")
    first = next(iter(report["variants"].values()))
    notes = ["speed: the first variant's median step time / this one's; per round: the median of that ratio over "
             "the rounds (steps run back to back); CPU time: the same with each process's CPU seconds",
             f"memory: {first['memory_measure']}"]
    return "\n".join(lines + [""] + notes) + "\n"
