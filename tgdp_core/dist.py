"""Process-group helpers that are no-ops in one process (a notebook, a CPU test)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0, keeping the autograd graph.

    torch.distributed.nn's all_gather sends gradients back to the rank that produced each
    slice, so negatives from other ranks train this rank's encoder too (open_clip's
    ``gather_with_grad``). In one process it returns ``x`` itself.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)
