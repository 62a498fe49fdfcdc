"""Token selection (random, teacher-guided, inverse-guided, probabilistic) and patchify / unpatchify.

All selections share MAE's convention: a per-sample ordering ``ids_shuffle`` of the N tokens
whose first ``keep = int(N * (1 - ratio))`` entries are kept, and return

    kept         (B, keep, D)  the kept tokens, in selection order
    mask         (B, N)        1 = removed, 0 = kept, in the original token order
    ids_restore  (B, N)        argsort(ids_shuffle): gathers [kept, removed] back to the original order

Masks are pure functions of their inputs: noise is drawn on ``x.device`` from ``generator``
when given (a generator on that device makes a mask repeatable), never from hidden state.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class BatchSlice(NamedTuple):
    """Which rows of the global batch this process holds (one rank's share under DDP):
    rows ``offset .. offset + B`` of a global batch of ``global_size``. Masks draw the whole
    global batch's noise and keep these rows, so every sample gets the mask it would get in a
    single process."""

    offset: int
    global_size: int


def num_kept(num_tokens: int, ratio: float) -> int:
    """Tokens kept at a mask ratio (MAE rounding: int(N * (1 - ratio)))."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1), got {ratio}")
    return int(num_tokens * (1 - ratio))


def select(x: torch.Tensor, ids_shuffle: torch.Tensor, keep: int):
    """Keep the first ``keep`` tokens of the ordering ``ids_shuffle`` (B, N)."""
    B, N, D = x.shape
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(B, keep, D))  # (B, keep, D)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, N, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original token order
    return kept, mask, ids_restore


def random_masking(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None,
                   batch_slice: BatchSlice | None = None):
    """Keep a uniformly random subset of int(N * (1 - ratio)) tokens per sample.

    ``batch_slice``: this batch is one rank's rows of a larger global batch (``BatchSlice``).
    """
    _check_tokens(x)
    noise = _uniform(x.shape[:2], x.device, generator, batch_slice)
    return select(x, torch.argsort(noise, dim=1), num_kept(x.shape[1], ratio))


def guided_masking(x: torch.Tensor, scores: torch.Tensor, ratio: float):
    """Keep exactly the top-k tokens by ``scores`` (B, N); ties broken by token index."""
    _check_tokens(x, scores)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    return select(x, order, num_kept(x.shape[1], ratio))


def inverse_guided_masking(x: torch.Tensor, scores: torch.Tensor, ratio: float):
    """Remove exactly the top tokens by ``scores`` (B, N) and keep the rest: the kept tokens are
    the complement of the top (N - keep) of ``guided_masking``'s order (ties as there)."""
    _check_tokens(x, scores)
    order = torch.argsort(scores, dim=1, descending=True, stable=True).flip(1)  # the top tokens last
    return select(x, order, num_kept(x.shape[1], ratio))


def softmax_probabilities(weights: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(weights / T) over the tokens, (B, N) -> (B, N): the released TG-DP code's
    sampling distribution for its "prob" selection, from the head-mean attention weights."""
    return torch.softmax(softmax_logits(weights, temperature), dim=-1)


def softmax_logits(weights: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """weights / T (float32): log-probabilities of ``softmax_probabilities`` up to a per-row
    constant, which is all ``gumbel_top_k_masking`` needs (and exact where a tiny T would
    underflow the probabilities)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return weights.float() / temperature


def probabilistic_masking(x: torch.Tensor, scores: torch.Tensor, ratio: float,
                          generator: torch.Generator | None = None, batch_slice: BatchSlice | None = None):
    """Sample tokens without replacement with probability proportional to ``scores`` (B, N) >= 0."""
    _check_tokens(x, scores)
    return gumbel_top_k_masking(x, scores.float().clamp_min(1e-30).log(), ratio, generator, batch_slice)


def gumbel_top_k_masking(x: torch.Tensor, logits: torch.Tensor, ratio: float,
                         generator: torch.Generator | None = None, batch_slice: BatchSlice | None = None):
    """Sample tokens without replacement with probability softmax(``logits``) (B, N).

    Gumbel top-k: adding Gumbel noise to the logits and taking the top-k draws k items
    sequentially without replacement in proportion to their probabilities.
    """
    _check_tokens(x, logits)
    uniform = _uniform(logits.shape, x.device, generator, batch_slice)
    gumbel = -torch.log((-torch.log(uniform.clamp_min(1e-20))).clamp_min(1e-20))
    return select(x, torch.argsort(logits.float() + gumbel, dim=1, descending=True), num_kept(x.shape[1], ratio))


def _uniform(shape: torch.Size, device: torch.device, generator: torch.Generator | None,
             batch_slice: BatchSlice | None) -> torch.Tensor:
    """U[0, 1) noise of ``shape`` (B, N), or this rank's rows of the global batch's noise."""
    if batch_slice is None:
        return torch.rand(shape, device=device, generator=generator)
    offset, total = batch_slice
    return torch.rand((total, shape[1]), device=device, generator=generator)[offset:offset + shape[0]]


def _check_tokens(x: torch.Tensor, scores: torch.Tensor | None = None) -> None:
    if x.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, N, D), got {tuple(x.shape)}")
    if scores is not None and scores.shape != x.shape[:2]:
        raise ValueError(f"expected scores of shape {tuple(x.shape[:2])} (B, N), got {tuple(scores.shape)}")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), raster patch order, values ordered (row, col, channel).

    Works for 1 x F x T spectrograms as well as 3 x H x W frames (rows = frequency for audio).
    """
    B, C, H, W = images.shape
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of patchify: (B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    B = patches.shape[0]
    h, w = grid
    x = patches.reshape(B, h, w, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * patch, w * patch)
