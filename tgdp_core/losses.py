"""The three TG-DP losses as pure functions: reconstruction, InfoNCE, distillation."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import dist


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        norm_pix: bool = True) -> torch.Tensor:
    """MSE per patch, averaged over the removed patches only (MAE).

    pred, target (B, N, P) patch values; mask (B, N), 1 = removed. With ``norm_pix`` each
    target patch is standardised by its own mean and (unbiased) variance first.
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


def info_nce(a: torch.Tensor, v: torch.Tensor, temperature: float,
             gather: Callable[[torch.Tensor], torch.Tensor] = dist.all_gather_with_grad,
             rank: int | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between paired audio and visual features (B, D) of this rank.

    Local rows are scored against the columns of every rank (negatives gathered with their
    gradients); the positive of local row i sits at column rank * B + i. Averaged over the two
    directions. ``gather`` and ``rank`` exist so tests can fake the collective.
    """
    a = F.normalize(a.float(), dim=-1)
    v = F.normalize(v.float(), dim=-1)
    all_a, all_v = gather(a), gather(v)
    offset = (dist.rank() if rank is None else rank) * a.shape[0]
    labels = torch.arange(a.shape[0], device=a.device) + offset
    logits_av = a @ all_v.T / temperature  # (B, world * B): audio query -> all visuals
    logits_va = v @ all_a.T / temperature
    return 0.5 * (F.cross_entropy(logits_av, labels) + F.cross_entropy(logits_va, labels))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of student global features (B, D) to detached teacher targets."""
    return F.mse_loss(student.float(), teacher.detach().float())
