"""The EMA teacher of TG-DP: a frozen copy of the student's encoder, moved only by EMA.

It sees the full, unmasked input and hands the student a ``Guide``: full-view global features
(distillation targets) and the token priority read off its joint-block attention. It is a
training-time object: checkpoints keep it for resuming, inference never builds it.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .config import Config
from .model import AVEncoder, Guide


def momentum_at(step: int, total_steps: int, start: float, end: float = 1.0) -> float:
    """Cosine ramp of the EMA momentum from ``start`` (step 0) to ``end`` (last step), DINO."""
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


def uses_priority(cfg: Config) -> bool:
    """Whether a view of ``cfg`` selects its tokens by the teacher's priority: a non-random
    contrastive selection or a guided reconstruction view (TG-DP only)."""
    o = cfg.objective
    return cfg.method == "tgdp" and (o.selection != "random" or o.rec_selection != "random")


def guidance_active(cfg: Config, step: int) -> bool:
    """Whether the teacher computes its priority at ``step``: a view uses it, and the warm-up
    (``teacher.guidance_warmup_fraction`` of the run) is over."""
    return uses_priority(cfg) and step >= cfg.steps_of(cfg.teacher.guidance_warmup_fraction)


def needs_teacher(cfg: Config) -> bool:
    """TG-DP needs a teacher for a priority-driven selection or for distillation targets."""
    return uses_priority(cfg) or (cfg.method == "tgdp" and cfg.objective.distill_weight > 0)


class EMATeacher(nn.Module):
    def __init__(self, student: AVEncoder):
        super().__init__()
        self.encoder = copy.deepcopy(student).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        return super().train(False)  # always in eval mode

    @torch.no_grad()
    def update(self, student: AVEncoder, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter."""
        teacher_params = list(self.encoder.parameters())
        student_params = [p.detach() for p in student.parameters()]
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)

    @torch.no_grad()
    def forward(self, fbank: torch.Tensor, frames: torch.Tensor, priority: str | None) -> Guide:
        """Full-view pass: global features and, unless ``priority`` is None, token priorities."""
        return self.encoder.guide(fbank, frames, priority)
