"""The training step: teacher guidance, the method's losses, backward, clipping, optimiser, EMA.

``train_step`` is the explicit body of the loop (MAE's ``train_one_epoch`` minus the wiring),
usable on its own from a notebook cell.
"""
from __future__ import annotations

import math

import torch

from .config import Config
from .model import TGDPModel
from .teacher import EMATeacher, guidance_active, momentum_at, needs_teacher


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam with the CAV-MAE recipe's weight decay and betas (fused kernels on CUDA)."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    return torch.optim.Adam(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                            **({"fused": True} if fused else {}))


def make_teacher(model: TGDPModel) -> EMATeacher | None:
    """The EMA teacher when the method needs one (TG-DP with guidance or distillation), else None."""
    return EMATeacher(model.encoder) if needs_teacher(model.cfg) else None


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the step was not applied."""


def train_step(model: TGDPModel, teacher: EMATeacher | None, optimizer: torch.optim.Optimizer,
               fbank: torch.Tensor, frames: torch.Tensor, step: int,
               generator: torch.Generator | None = None, student: TGDPModel | None = None) -> dict[str, float]:
    """One optimiser step; returns the loss parts as floats.

    ``model`` may be a DDP wrapper of ``student`` (the unwrapped model, whose encoder the
    teacher follows); in one process leave ``student`` None.
    """
    student = student or model
    cfg = student.cfg
    guide = None
    if teacher is not None:
        priority = cfg.objective.score_direction if guidance_active(cfg, step) else None
        guide = teacher(fbank, frames, priority)
    out = model(fbank, frames, guide, generator)
    if not torch.isfinite(out.loss):
        raise NonFiniteLossError(f"non-finite loss at step {step}: "
                                 + ", ".join(f"{k}={v.item():.4g}" for k, v in out.parts.items()))
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = (torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.grad_clip)
                 if cfg.train.grad_clip > 0 else torch.tensor(math.nan))
    optimizer.step()
    record = {"loss": out.loss.item(), **{k: v.item() for k, v in out.parts.items()},
              "grad_norm": float(grad_norm)}
    if teacher is not None:
        momentum = momentum_at(step, cfg.train.steps, cfg.teacher.momentum_start, cfg.teacher.momentum_end)
        teacher.update(student.encoder, momentum)
        record["momentum"] = momentum
    return record
