"""Analytic FLOPs of one training step of each method, from the config alone.

Counts the matrix products of a step the way ``torch.utils.flop_counter`` does (2 FLOPs per
multiply-add; LayerNorm, GELU, softmax, masking and the optimiser are not counted) and follows
``TGDPModel.forward`` / ``EMATeacher`` pass by pass:

    patch embeddings        student (and teacher) convs over every patch
    reconstruction view     specific blocks on the kept 25 %, the concatenated joint block, decoder
    contrastive features    sync: the joint block's global row on the same view;
                            cavmae: the per-modality joint block on it (mean-pooled);
                            tgdp: a second view (specific blocks + global row on the kept 50 %)
    teacher (tgdp)          full-view specific blocks and the joint block's global row, plus the
                            token priority when guidance is on: forward only
    losses                  the InfoNCE logits (negligible, counted for exactness)

Backward is twice the forward wherever gradients flow (input and weight gradients), except for
the patch embeddings, whose inputs need no gradient (weight gradient only: once the forward).
Attention backward is counted as the two products per forward product, without the
recomputation a fused kernel does, so the figure is the model's work, not a kernel's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config, ModelConfig
from .masking import num_kept
from .teacher import needs_teacher, uses_priority


@dataclass
class StepFlops:
    """FLOPs of one training step, by part: {name: (forward, backward)}."""

    parts: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, name: str, forward: int, backward_factor: int = 2) -> None:
        """Count ``forward`` FLOPs as part ``name``, and ``backward_factor`` times them as its backward."""
        self.parts[name] = (forward, backward_factor * forward)

    def scaled(self, factor: int) -> StepFlops:
        """Every part times ``factor`` (per-sample counts -> a batch's)."""
        return StepFlops({k: (factor * f, factor * b) for k, (f, b) in self.parts.items()})

    @property
    def forward(self) -> int:
        return sum(f for f, _ in self.parts.values())

    @property
    def backward(self) -> int:
        return sum(b for _, b in self.parts.values())

    @property
    def total(self) -> int:
        return self.forward + self.backward


# ---------------------------------------------------------------------- building blocks (forward)
def linear(tokens: int, d_in: int, d_out: int) -> int:
    """A (tokens, d_in) x (d_in, d_out) product."""
    return 2 * tokens * d_in * d_out


def block(tokens: int, dim: int, hidden: int) -> int:
    """A full pre-norm block on ``tokens`` tokens: qkv, QK^T, AV, projection, MLP."""
    return (linear(tokens, dim, 3 * dim) + 2 * 2 * tokens * tokens * dim
            + linear(tokens, dim, dim) + 2 * linear(tokens, dim, hidden))


def global_row(tokens: int, dim: int, hidden: int, heads: int, priority: str | None) -> int:
    """``Block.forward_global`` on ``tokens`` tokens (global token first), see layers.Attention.

    Keys and values of every token; the query, attention row, projection and MLP of the global
    token. "patch_to_global" runs every query against values with one extra (one-hot) channel
    per head; "global_to_patch" and None run the global query alone.
    """
    kv = linear(tokens, dim, 2 * dim)
    tail = linear(1, dim, dim) + 2 * linear(1, dim, hidden)  # projection and MLP of the global token
    if priority == "patch_to_global":
        q = linear(tokens, dim, dim)
        attention = 2 * tokens * tokens * dim + 2 * tokens * tokens * (dim + heads)
    else:
        q = linear(1, dim, dim)
        attention = 2 * 2 * tokens * dim
    return kv + q + attention + tail


def patch_embed(m: ModelConfig) -> int:
    """Both modalities' patch convolutions (a p x p x C dot product per patch and channel)."""
    p2 = m.patch_size ** 2
    return 2 * m.embed_dim * p2 * (m.num_audio_patches * 1 + m.num_visual_patches * 3)


# ---------------------------------------------------------------------- passes
def _specific(m: ModelConfig, patches: int) -> int:
    """Modality-specific blocks of one modality on ``patches`` patch tokens (+ global + registers)."""
    tokens = int(m.global_token) + patches + m.num_registers
    return m.specific_depth * block(tokens, m.embed_dim, _hidden(m.embed_dim, m))


def _global(m: ModelConfig, patches: int, priority: str | None = None) -> int:
    """The joint block's global row over the global token and ``patches`` patch tokens."""
    return global_row(1 + patches, m.embed_dim, _hidden(m.embed_dim, m), m.num_heads, priority)


def _decoder(m: ModelConfig, kept: int) -> int:
    """Embedding of the ``kept`` latent tokens, the decoder blocks on every patch, both heads."""
    n, Dd, p2 = m.num_audio_patches + m.num_visual_patches, m.decoder_dim, m.patch_size ** 2
    return (linear(kept, m.embed_dim, Dd) + m.decoder_depth * block(n, Dd, _hidden(Dd, m))
            + linear(m.num_audio_patches, Dd, p2) + linear(m.num_visual_patches, Dd, 3 * p2))


def _hidden(dim: int, m: ModelConfig) -> int:
    """MLP width of a block of width ``dim`` (as layers.Block rounds it)."""
    return int(dim * m.mlp_ratio)


def step_flops(cfg: Config, batch: int, guided: bool = True, contrastive_ratio: float | None = None,
               rec_ratio: float | None = None) -> StepFlops:
    """FLOPs of one ``train_step`` of ``cfg.method`` on ``batch`` samples.

    ``guided``: whether the teacher computes the token priority at this step (after the
    guidance warm-up; ignored unless a view of the method selects by priority).
    ``contrastive_ratio`` / ``rec_ratio``: the contrastive and reconstruction views' mask ratios
    at this step (``trainer.contrastive_ratio_at`` / ``rec_ratio_at``; default: the configured
    ratios, as after the curricula).
    """
    out = _per_sample(cfg, guided, contrastive_ratio, rec_ratio).scaled(batch)
    # both directions' logits (B, D) x (D, B); the only product that grows with batch squared
    out.add("InfoNCE logits", 2 * linear(batch, cfg.model.embed_dim, batch))
    return out


def _per_sample(cfg: Config, guided: bool, contrastive_ratio: float | None, rec_ratio: float | None) -> StepFlops:
    """Every part of ``step_flops`` that scales with the batch, for one sample."""
    m, o = cfg.model, cfg.objective
    na, nv, D = m.num_audio_patches, m.num_visual_patches, m.embed_dim
    rec = o.rec_mask_ratio if rec_ratio is None else rec_ratio
    ka, kv = num_kept(na, rec), num_kept(nv, rec)
    out = StepFlops()
    out.add("student patch embeddings", patch_embed(m), backward_factor=1)  # no input gradient
    out.add("reconstruction view: specific blocks", _specific(m, ka) + _specific(m, kv))
    out.add("reconstruction view: joint block", block(ka + kv, D, _hidden(D, m)))
    out.add("decoder", _decoder(m, ka + kv))
    if cfg.method == "tgdp":
        ratio = o.contrastive_mask_ratio if contrastive_ratio is None else contrastive_ratio
        ca, cv = num_kept(na, ratio), num_kept(nv, ratio)
        out.add("contrastive view: specific blocks", _specific(m, ca) + _specific(m, cv))
        out.add("contrastive view: joint global rows", _global(m, ca) + _global(m, cv))
    elif m.global_token:  # sync: the global row on the reconstruction view's tokens
        out.add("contrastive features: joint global rows", _global(m, ka) + _global(m, kv))
    else:  # cavmae: the per-modality joint block, mean-pooled
        out.add("contrastive features: joint blocks", block(ka, D, _hidden(D, m)) + block(kv, D, _hidden(D, m)))
    if needs_teacher(cfg):
        priority = o.score_direction if guided and uses_priority(cfg) else None
        teacher = (patch_embed(m) + _specific(m, na) + _specific(m, nv)
                   + _global(m, na, priority) + _global(m, nv, priority))
        out.add("EMA teacher (forward only)", teacher, backward_factor=0)
    return out
