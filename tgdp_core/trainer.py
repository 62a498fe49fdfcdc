"""Training: the step (guidance, losses, backward, clipping, Adam, EMA) and the loop around it.

    result = tgdp_core.train(cfg, out_dir="runs/mine", callbacks=[print])
    result.out_dir, result.checkpoint, result.history

The same call runs in a notebook cell, from ``python -m tgdp_core train`` and under
``torchrun --nproc_per_node N -m tgdp_core train`` (DDP: gloo on CPU, NCCL on GPU; negatives
gathered across ranks; the teacher follows the unwrapped student; only rank 0 writes).
Every random draw is a function of (seed, step, rank): a resumed run repeats an uninterrupted
one step for step.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import dist
from .config import Config
from .layers import Block
from .masking import BatchSlice
from .model import TGDPModel, build_model
from .teacher import EMATeacher, guidance_active, momentum_at, needs_teacher


# ---------------------------------------------------------------------- pieces
def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam with the CAV-MAE recipe's weight decay and betas.

    Fused kernels on CPU as on CUDA: one pass over each tensor instead of a chain of
    temporaries (``base`` on one CPU core: ~0.17 s per update instead of ~0.6 s).
    """
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=True)


def make_teacher(model: TGDPModel) -> EMATeacher | None:
    """The EMA teacher when the method needs one (TG-DP with guidance or distillation), else None."""
    return EMATeacher(model.encoder) if needs_teacher(model.cfg) else None


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to ``train.lr`` over ``warmup_steps``, then cosine decay to zero."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def contrastive_ratio_at(step: int, cfg: Config) -> float:
    """The contrastive view's mask ratio at ``step``: linear from 0 to ``contrastive_mask_ratio``
    over ``contrastive_mask_warmup_steps``, then constant (the whole run when the warm-up is 0)."""
    o = cfg.objective
    if step >= o.contrastive_mask_warmup_steps:
        return o.contrastive_mask_ratio
    return o.contrastive_mask_ratio * step / o.contrastive_mask_warmup_steps


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def trains_in_bf16(precision: str, device_type: str) -> bool:
    """Whether ``train.precision`` means bf16 autocast on this device type ("auto": on CUDA only)."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast where the config asks for it (`trains_in_bf16`), else a no-op context."""
    if trains_in_bf16(cfg.train.precision, device.type):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def teacher_autocast(cfg: Config, device: torch.device):
    """The teacher pass's precision inside the student's context: bf16 autocast when
    ``teacher.precision`` is "bf16", else a no-op (the student's own context applies)."""
    if cfg.teacher.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def compile_blocks(*modules: torch.nn.Module | None) -> None:
    """``train.compile``: torch.compile every transformer Block of ``modules`` in place.

    Regional compilation (the PyTorch recipe for repeated blocks): one compiled graph per
    block shape, reused by every block of that shape, instead of one graph of the whole step
    with masking, gathers and losses in it; state-dict names stay unchanged.
    """
    for module in (m for m in modules if m is not None):  # the teacher is None for sync / cavmae
        for block in module.modules():
            if isinstance(block, Block):
                block.compile(dynamic=True)  # the views' token counts differ: one graph for all


def mask_generator(cfg: Config, step: int, device: torch.device) -> torch.Generator:
    """The masks' noise source for one step: a function of (seed, step) only. Every rank
    draws the global batch's noise and keeps its rows (``masking.BatchSlice``)."""
    g = torch.Generator(device=device)
    return g.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + 1)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the step was not applied."""


def train_step(model: torch.nn.Module, teacher: EMATeacher | None, optimizer: torch.optim.Optimizer,
               fbank: torch.Tensor, frames: torch.Tensor, step: int, *,
               generator: torch.Generator | None = None, student: TGDPModel | None = None,
               autocast=None, batch_slice: BatchSlice | None = None, log: bool = True) -> dict[str, float]:
    """One optimiser step; returns the loss parts, gradient norm and embedding statistics.

    fbank (B, T, F) and frames (B, 3, H, W) are this process's rows of the global batch.
    ``model`` may be a DDP wrapper of ``student`` (the unwrapped model, whose encoder the
    teacher follows); in one process leave ``student`` None. ``generator`` seeds the masks
    (``mask_generator``); ``batch_slice`` says which rows of the global batch this rank holds,
    so every sample gets the mask it gets in one process. ``autocast``: a context such as
    ``autocast_for(cfg, device)``. With ``log=False`` the statistics (and their all-reduce
    across ranks) are skipped and the record is empty.
    """
    student = student or model
    cfg = student.cfg
    # the last step's gradients are spent: free them before this step's activations (peak memory)
    optimizer.zero_grad(set_to_none=True)
    with autocast or nullcontext():
        guide = None
        if teacher is not None:
            priority = cfg.objective.score_direction if guidance_active(cfg, step) else None
            with teacher_autocast(cfg, fbank.device):
                guide = teacher(fbank, frames, priority)
            if cfg.teacher.precision != "same":
                guide = guide.float()
        out = model(fbank, frames, guide, generator, batch_slice, contrastive_ratio=contrastive_ratio_at(step, cfg))
    if not torch.isfinite(out.loss):
        raise NonFiniteLossError(f"non-finite loss at step {step}: "
                                 + ", ".join(f"{k}={v.item():.4g}" for k, v in out.parts.items()))
    out.loss.backward()
    grad_norm = (torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.grad_clip)
                 if cfg.train.grad_clip > 0 else torch.tensor(math.nan))
    optimizer.step()
    momentum = momentum_at(step, cfg.train.steps, cfg.teacher.momentum_start, cfg.teacher.momentum_end)
    if teacher is not None:
        teacher.update(student.encoder, momentum)
    if not log:
        return {}
    record = _step_statistics(out)
    record["grad_norm"] = float(grad_norm)
    if teacher is not None:
        record["momentum"] = momentum
    return record


@torch.no_grad()
def _step_statistics(out) -> dict[str, float]:
    """The loss, its parts and the collapse watch (mean cosine between different samples'
    audio and visual embeddings), averaged over ranks under DDP (the global batch's values)."""
    a = F.normalize(out.audio.float(), dim=-1)
    v = F.normalize(out.visual.float(), dim=-1)
    B = a.shape[0]
    off_diag = ((a @ v.T).sum() - (a * v).sum()) / max(1, B * (B - 1))
    names = ["loss", *out.parts, "offdiag_cos"]
    values = torch.stack([out.loss.detach().float(), *(p.detach().float() for p in out.parts.values()), off_diag])
    if dist.is_distributed():
        torch_dist.all_reduce(values)
        values /= dist.world_size()
    return dict(zip(names, values.tolist()))


# ---------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path | None  # last.pt of the run (None on ranks other than 0)
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl records


@dataclass
class Run:
    """Everything one training run holds: config, models, optimiser, data and where it stands."""

    cfg: Config
    out_dir: Path
    device: torch.device
    student: TGDPModel  # the model being trained (unwrapped)
    model: torch.nn.Module  # the student, or its DDP wrapper
    teacher: EMATeacher | None
    optimizer: torch.optim.Optimizer
    loader: Iterable[dict[str, torch.Tensor]]
    start_step: int
    history: list[dict[str, Any]]

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pt"


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset_name}-{cfg.method}"


def train(cfg: Config, out_dir: str | Path | None = None, callbacks: Iterable[Callable[[dict], Any]] = (),
          resume: bool = True, dataset=None) -> TrainResult:
    """Pretrain ``cfg.method`` for ``cfg.train.steps`` steps; resumes from ``out_dir/last.pt`` if present.

    ``callbacks`` receive each logged record (a dict: step, losses, lr, samples/s, ...).
    ``dataset`` overrides the manifest of ``cfg.data`` (an ``AVDataset`` in training mode).
    """
    cfg.validate()
    started_dist = _init_distributed()
    try:
        run = setup_run(cfg, out_dir, resume, dataset)
        with RunLog(run, callbacks) as log:
            train_steps(run, log)
        return TrainResult(run.out_dir, run.last if dist.is_main() else None, log.history)
    finally:
        if started_dist:
            torch_dist.destroy_process_group()


def setup_run(cfg: Config, out_dir: str | Path | None, resume: bool, dataset=None) -> Run:
    """Device, data, models, optimiser and run folder; restores ``out_dir/last.pt`` when resuming."""
    from .dataset import AVDataset, train_loader

    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dataset is None:
        cfg = resolve_data(cfg)
    out_dir = _shared_run_dir(Path(out_dir) if out_dir else default_run_dir(cfg))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    student = build_model(cfg).to(device).train()
    teacher = make_teacher(student)
    optimizer = make_optimizer(student, cfg)
    if cfg.train.compile:
        compile_blocks(student, teacher)
    start_step, history = 0, []
    if resume and (out_dir / "last.pt").exists():
        start_step, history = _restore(out_dir / "last.pt", cfg, student, teacher, optimizer, device)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.json")
    model = student
    if dist.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    data = dataset or _rank0_first(lambda: AVDataset(cfg.data.train_manifest, cfg, train=True))
    loader = train_loader(data, cfg, start_step, dist.rank(), dist.world_size())
    return Run(cfg, out_dir, device, student, model, teacher, optimizer, loader, start_step, history)


def train_steps(run: Run, log: "RunLog") -> None:
    """The loop: one ``train_step`` per batch, records to ``log``, checkpoints every
    ``train.checkpoint_every`` steps and at the end."""
    cfg, device = run.cfg, run.device
    autocast = autocast_for(cfg, device)
    step = run.start_step
    try:
        for batch in run.loader:
            fbank = batch["fbank"].to(device, non_blocking=True)
            frames = batch["frames"].to(device, non_blocking=True)
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            record = train_step(run.model, run.teacher, run.optimizer, fbank, frames, step,
                                generator=mask_generator(cfg, step, device), student=run.student,
                                autocast=autocast, log=log.due(step + 1),
                                batch_slice=BatchSlice(dist.rank() * fbank.shape[0], cfg.train.batch_size))
            step += 1
            log.step_done(step, record, fbank.shape[0] * dist.world_size())
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                save_run(run, step, log.history)
    except NonFiniteLossError as err:
        good = f"; the last good checkpoint is {run.last}" if run.last.exists() else ""
        raise NonFiniteLossError(f"{err}{good}") from None


class RunLog:
    """The run's records: metrics.jsonl (rank 0), the progress bar, callbacks, the collapse warning.

    A resumed run's file is rewritten with the restored history first, so records logged
    after the checkpoint it resumes from are dropped, not duplicated.
    """

    def __init__(self, run: Run, callbacks: Iterable[Callable[[dict], Any]] = ()):
        self.cfg, self.callbacks, self.history = run.cfg, list(callbacks), run.history
        self.file = None
        if dist.is_main():
            self.file = open(run.out_dir / "metrics.jsonl", "w")
            self.file.writelines(json.dumps(r) + "\n" for r in self.history)
        self.bar = tqdm(total=self.cfg.train.steps, initial=run.start_step, unit="step",
                        desc=f"{self.cfg.method} {self.cfg.preset_name}", disable=not dist.is_main())
        self.window_start, self.window_samples, self.collapse_warned = time.perf_counter(), 0, False

    def due(self, step: int) -> bool:
        """Whether the step that ends at ``step`` is logged."""
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps

    def step_done(self, step: int, record: dict[str, float], samples: int) -> None:
        self.window_samples += samples
        self.bar.update(1)
        if not record:
            return
        now = time.perf_counter()
        record.update(step=step, lr=lr_at(step - 1, self.cfg),
                      samples_per_s=self.window_samples / max(now - self.window_start, 1e-9))
        self.window_start, self.window_samples = now, 0
        self.collapse_warned |= _warn_on_collapse(record, self.cfg, self.collapse_warned)
        self.history.append(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", con=f"{record['contrastive']:.3f}",
                             sps=f"{record['samples_per_s']:.0f}")
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        for callback in self.callbacks:
            callback(record)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.file:
            self.file.close()


def resolve_data(cfg: Config) -> Config:
    """``cfg`` with its manifests filled in: the built-in AV-Digits set when none is given
    (generated on first use, by rank 0 while the others wait)."""
    if cfg.data.train_manifest:
        return cfg
    from .avdigits import ensure_default

    paths = _rank0_first(lambda: ensure_default(cfg))
    cfg = Config.from_dict(cfg.to_dict())
    cfg.data.train_manifest, cfg.data.test_manifest = str(paths["train"]), str(paths["test"])
    cfg.data.label_csv = str(paths["labels"])
    return cfg


def _rank0_first(make: Callable[[], Any]) -> Any:
    """Run ``make`` on rank 0, then on the other ranks (which then find its files, caches)."""
    if not dist.is_distributed():
        return make()
    if dist.is_main():
        result = make()
        torch_dist.barrier()
        return result
    torch_dist.barrier()
    return make()


def _shared_run_dir(out_dir: Path) -> Path:
    """Rank 0's run folder on every rank (default folder names carry the time)."""
    if dist.is_distributed():
        box = [str(out_dir)]
        torch_dist.broadcast_object_list(box, src=0)
        out_dir = Path(box[0])
    return out_dir


def _init_distributed() -> bool:
    """Join torchrun's process group when its environment says so; False if nothing started."""
    if dist.is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend)
    return True


def _warn_on_collapse(record: dict, cfg: Config, already: bool) -> bool:
    """Warn once when InfoNCE sits at ln(batch) with near-identical embeddings."""
    chance = math.log(cfg.train.batch_size)
    if not already and record["step"] >= 50 and abs(record["contrastive"] - chance) < 0.02 * chance \
            and record["offdiag_cos"] > 0.9:
        warnings.warn(f"contrastive loss {record['contrastive']:.3f} sits at ln(batch)={chance:.3f} and the "
                      f"embeddings are nearly identical (mean off-diagonal cosine {record['offdiag_cos']:.2f}): "
                      "the model may have collapsed; try a higher objective.temperature", stacklevel=3)
        return True
    return False


def save_run(run: Run, step: int, history: list) -> None:
    """step{step}.pt with everything a resume needs, last.pt linked to it, old steps pruned (rank 0)."""
    if not dist.is_main():
        return
    out_dir, cfg = run.out_dir, run.cfg
    payload = ckpt.model_payload(
        run.student, step=step, teacher=run.teacher.state_dict() if run.teacher else None,
        optimizer=run.optimizer.state_dict(), history=history,
        rng={"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})})
    step_file = ckpt.save_checkpoint(payload, out_dir / f"step{step:07d}.pt")
    ckpt.link_atomically(step_file, out_dir / "last.pt")  # the same bytes, serialised once
    for old in sorted(out_dir.glob("step*.pt"))[:-cfg.train.keep_checkpoints]:
        old.unlink()


def _restore(path: Path, cfg: Config, student: TGDPModel, teacher: EMATeacher | None,
             optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[int, list]:
    data = ckpt.read_checkpoint(path)
    saved = Config.from_dict(data["config"])
    saved.model.grad_checkpointing = cfg.model.grad_checkpointing  # a memory switch, not architecture
    if saved.model != cfg.model or saved.method != cfg.method:
        raise ckpt.CheckpointError(f"{path} was trained with another model or method; "
                                   "resume with its config.json or choose a new out_dir")
    ckpt.load_state_strict(student, data["model"], str(path))
    if teacher is not None:
        teacher.load_state_dict(data["teacher"])
    optimizer.load_state_dict(data["optimizer"])
    torch.set_rng_state(data["rng"]["torch"])
    if "cuda" in data["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(data["rng"]["cuda"])
    return int(data["step"]), list(data["history"])
