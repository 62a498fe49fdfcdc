"""Building blocks: sin-cos tables, patch embedding, the transformer Block.

The Block is pre-norm with one fused ``qkv`` linear and scaled-dot-product attention. The joint
block of the backbone owns three LayerNorm pairs (shared, audio, visual) and is called with
``norm="a" | "v" | None``; the other blocks own one pair.

``Block.forward_global`` runs the block for the global token alone (the token at index 0): keys
and values come from every token, but only the global query, attention row, projection and MLP
are computed. With ``priority=...`` it also returns the head-averaged attention weights between
global and patch tokens (TG-DP's token priority before normalisation) without forming an
N x N attention matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(P,) positions -> (P, dim) table: [sin(p * w_i), cos(p * w_i)], w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (P, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Fixed 2-D table (rows * cols, dim) for a raster grid, token k = r * cols + c.

    The first half of the channels encodes the column index, the second half the row index
    (MAE's layout; for audio the columns are time, the rows frequency).
    """
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, c.flatten()), sincos_1d(dim // 2, r.flatten())], dim=1)
    return table.float()


class PatchEmbed(nn.Module):
    """Conv patchifier: (B, C, H, W) -> (B, H/p * W/p, D), raster order."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.heads, -1).transpose(1, 2)  # (B, H, N, Dh)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        B, H, N, Dh = t.shape
        return t.transpose(1, 2).reshape(B, N, H * Dh)  # (B, N, D), head-major channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        return self.proj(self._merge(F.scaled_dot_product_attention(q, k, v)))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        # unbind, not indexing: its backward stacks the three gradients into one buffer instead
        # of zero-filling and summing three qkv-sized tensors
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).unbind(2)  # each (B, N, H, Dh)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (B, H, N, Dh)

    def forward_global(self, x: torch.Tensor, priority: str | None = None):
        """Attention output of token 0 only: (B, N, D) -> (B, 1, D), and attention weights (B, N-1).

        priority "patch_to_global": each patch query's attention weight on the global key
        (``attn[:, :, 1:, 0]``, the official reading). It needs every query's softmax
        normaliser, so all queries run, against values extended by a one-hot channel that is
        1 at the global key: that channel's output *is* the weight on the global key, and one
        fused kernel call gives it together with the global token's output.
        priority "global_to_patch": the global query's attention row (``attn[:, :, 0, 1:]``),
        one query against all keys.
        Both are attention weights averaged over heads, not renormalised over the patches
        (``AVEncoder.global_feature`` does that for the priority; the released code's "prob"
        selection takes the raw weights as its logits).

        With a priority the attention runs in fp32 even under bf16 autocast: the weights are
        all near 1/N, and bf16's 8-bit mantissa rounds them onto a few dozen values at base
        width (issue 12), so the top-k cut fell inside ties broken by token index. The fp32
        projections cost one block's q/k/v in the teacher's pass; without autocast nothing changes.
        """
        if priority is None:
            return self._forward_global(x, None)
        with torch.autocast(x.device.type, enabled=False):
            return self._forward_global(x, priority, dtype=torch.float32)

    def _forward_global(self, x: torch.Tensor, priority: str | None, dtype: torch.dtype | None = None):
        """forward_global's computation, in ``dtype`` when given (else the ambient one)."""
        B, N, D = x.shape
        H, Dh = self.heads, D // self.heads
        w_q, w_kv = self.qkv.weight.split([D, 2 * D])
        b_q, b_kv = self.qkv.bias.split([D, 2 * D])
        if dtype is not None:
            x, w_q, w_kv, b_q, b_kv = (t.to(dtype) for t in (x, w_q, w_kv, b_q, b_kv))
        kv = F.linear(x, w_kv, b_kv).view(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # (B, H, N, Dh)
        scores = None
        if priority == "patch_to_global":
            q = self._split(F.linear(x, w_q, b_q))  # (B, H, N, Dh)
            # q and k get a zero channel too (the scores and, with the scale given, their
            # scaling are unchanged): with every head dim Dh + 1, SDPA keeps its fused kernel;
            # a value dim other than the query's sends it to the math kernel, which forms the
            # N x N matrix (issue 12, tests/test_speed.py)
            zero = torch.zeros(B, H, N, 1, dtype=v.dtype, device=v.device)
            onehot = zero.clone()
            onehot[:, :, 0] = 1
            q, k, v = (torch.cat([t, pad], dim=-1) for t, pad in ((q, zero), (k, zero), (v, onehot)))
            out = F.scaled_dot_product_attention(q, k, v, scale=Dh**-0.5)  # (B, H, N, Dh+1)
            scores = out[:, :, 1:, Dh].mean(1)  # (B, N-1): weight of patch i's query on the global key
            out = out[:, :, :1, :Dh]  # (B, H, 1, Dh)
        else:
            q = self._split(F.linear(x[:, :1], w_q, b_q))  # (B, H, 1, Dh)
            if priority == "global_to_patch":
                attn = torch.softmax((q * Dh**-0.5) @ k.transpose(-2, -1), dim=-1)  # (B, H, 1, N)
                scores = attn[:, :, 0, 1:].mean(1)  # (B, N-1)
                out = attn @ v
            elif priority is None:
                out = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, Dh)
            else:
                raise ValueError(f"unknown priority {priority!r}; use 'patch_to_global' or 'global_to_patch'")
        return self.proj(self._merge(out)), scores


class Block(nn.Module):
    """Pre-norm transformer block; ``modality_norms`` adds the audio/visual LayerNorm pairs.

    With ``checkpointing`` a training forward that records gradients keeps only the block's
    input and recomputes its activations in the backward (``model.grad_checkpointing``).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, modality_norms: bool = False,
                 checkpointing: bool = False):
        super().__init__()
        self.checkpointing = checkpointing
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if modality_norms:
            self.norm1_a, self.norm2_a = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.norm1_v, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def _norms(self, norm: str | None) -> tuple[nn.LayerNorm, nn.LayerNorm]:
        if norm is None:
            return self.norm1, self.norm2
        return getattr(self, f"norm1_{norm}"), getattr(self, f"norm2_{norm}")

    def forward(self, x: torch.Tensor, norm: str | None = None) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, norm, use_reentrant=False)
        return self._forward(x, norm)

    def _forward(self, x: torch.Tensor, norm: str | None) -> torch.Tensor:
        n1, n2 = self._norms(norm)
        x = x + self.attn(n1(x))
        return x + self.mlp(n2(x))

    def forward_global(self, x: torch.Tensor, norm: str | None = None, priority: str | None = None):
        """The block's output for token 0 only, (B, N, D) -> (B, 1, D), plus optional attention weights."""
        n1, n2 = self._norms(norm)
        y, scores = self.attn.forward_global(n1(x), priority)
        g = x[:, :1] + y
        return g + self.mlp(n2(g)), scores


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linears with zero bias, unit LayerNorms (MAE / CAV-MAE initialisation)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):  # patch embedding: initialised like a linear layer
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.zeros_(module.bias)


