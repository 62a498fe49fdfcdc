"""The audio-visual backbone (CAV-MAE Sync layout), its MAE decoder, and each method's step.

Shapes (base preset): fbank (B, 416, 128) -> audio patches (B, 208, D), frequency-major
(token k = f * 26 + t); frames (B, 3, 224, 224) -> visual patches (B, 196, D), raster order.

    AVEncoder     patch embeddings, fixed sin-cos positions, modality embeddings, global and
                  register tokens, modality-specific blocks, the joint block, final norms
    MAEDecoder    fills removed slots with the mask token and predicts every patch
    TGDPModel     encoder + decoder; ``forward`` computes one training step's losses for
                  ``cfg.method``; ``encode_audio`` / ``encode_visual`` for inference

Every training pass computes only what its loss uses: the reconstruction view never runs the
per-modality global pass; the contrastive view never runs the decoder or the concatenated
joint pass; the joint block of a global pass computes the global token's row alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .config import Config, ModelConfig
from .layers import Block, PatchEmbed, init_weights, sincos_2d
from .masking import (BatchSlice, guided_masking, gumbel_top_k_masking, inverse_guided_masking, patchify,
                      probabilistic_masking, random_masking, softmax_logits)


@dataclass
class Features:
    """Full-view encoder output (no masking)."""

    audio: torch.Tensor  # (B, D) global audio feature (normed global token, or mean of patches)
    visual: torch.Tensor  # (B, D)
    audio_tokens: torch.Tensor  # (B, Na, D) patch tokens after the joint block and audio norm
    visual_tokens: torch.Tensor  # (B, Nv, D)


@dataclass
class Guide:
    """What the EMA teacher hands the student: full-view targets and token priorities."""

    audio: torch.Tensor  # (B, D) teacher's full-view global audio feature (distillation target)
    visual: torch.Tensor  # (B, D)
    priority_a: torch.Tensor | None = None  # (B, Na) sums to 1 over patches; None: not computed
    priority_v: torch.Tensor | None = None  # (B, Nv)
    # the same head-mean attention weights before that normalisation: the released code's
    # logits for its "prob" selection (objective.selection="probabilistic_softmax")
    attention_a: torch.Tensor | None = None  # (B, Na)
    attention_v: torch.Tensor | None = None  # (B, Nv)

    def float(self) -> "Guide":
        """The same guide in fp32 (a teacher that ran under bf16 autocast hands back bf16)."""
        def f(t):
            return None if t is None else t.float()
        return Guide(f(self.audio), f(self.visual), f(self.priority_a), f(self.priority_v),
                     f(self.attention_a), f(self.attention_v))


@dataclass
class StepOutput:
    """One training step: the weighted total and its unweighted parts."""

    loss: torch.Tensor  # scalar to backpropagate
    parts: dict[str, torch.Tensor]  # "rec", "contrastive" and, for tgdp, "distill" (unweighted)
    audio: torch.Tensor  # (B, D) global features the contrastive loss saw (for collapse checks)
    visual: torch.Tensor
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # "rec_a", "con_a", ...: (B, N), 1 = removed


def _check_input(x: torch.Tensor, name: str, shape: tuple, finite: bool = False) -> None:
    """Raise a ValueError naming the expected shape; ``shape`` uses None for the batch."""
    want = "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {want}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape {want}, got dtype {x.dtype}")
    if x.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if finite and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


_MODALITIES = {"a": "a", "audio": "a", "v": "v", "visual": "v"}


class AVEncoder(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.m = m
        D, p = m.embed_dim, m.patch_size
        self.patch_embed_a = PatchEmbed(1, D, p)
        self.patch_embed_v = PatchEmbed(3, D, p)
        # Fixed 2-D sin-cos tables: buffers, saved with the weights but never trained.
        self.register_buffer("pos_embed_a", sincos_2d(D, *m.audio_grid)[None])  # (1, Na, D)
        self.register_buffer("pos_embed_v", sincos_2d(D, *m.visual_grid)[None])  # (1, Nv, D)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, D))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, D))
        if m.global_token:
            self.global_a = nn.Parameter(torch.zeros(1, 1, D))
            self.global_v = nn.Parameter(torch.zeros(1, 1, D))
        if m.num_registers:
            self.registers_a = nn.Parameter(torch.zeros(1, m.num_registers, D))
            self.registers_v = nn.Parameter(torch.zeros(1, m.num_registers, D))
        ckpt = m.grad_checkpointing
        self.blocks_a = nn.ModuleList(Block(D, m.num_heads, m.mlp_ratio, checkpointing=ckpt)
                                      for _ in range(m.specific_depth))
        self.blocks_v = nn.ModuleList(Block(D, m.num_heads, m.mlp_ratio, checkpointing=ckpt)
                                      for _ in range(m.specific_depth))
        # The joint block: shared attention and MLP, LayerNorms per stream (joint, audio, visual).
        self.joint = Block(D, m.num_heads, m.mlp_ratio, modality_norms=True, checkpointing=ckpt)
        self.norm, self.norm_a, self.norm_v = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.apply(init_weights)
        for param in (self.modality_a, self.modality_v, *self._extra_tokens()):
            nn.init.normal_(param, std=0.02)

    def _extra_tokens(self) -> list[nn.Parameter]:
        names = ("global_a", "global_v", "registers_a", "registers_v")
        return [getattr(self, n) for n in names if hasattr(self, n)]

    # ------------------------------------------------------------------ embeddings
    def embed_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, T, F) normalised fbank -> (B, Na, D) audio patch tokens, frequency-major."""
        _check_input(fbank, "fbank", (None, self.m.audio_frames, self.m.mel_bins))
        image = fbank.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T): rows = mel bins, cols = time
        return self.patch_embed_a(image) + self.pos_embed_a + self.modality_a

    def embed_visual(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised frames -> (B, Nv, D) visual patch tokens, raster order."""
        _check_input(frames, "frames", (None, 3, self.m.image_size, self.m.image_size))
        return self.patch_embed_v(frames) + self.pos_embed_v + self.modality_v

    # ------------------------------------------------------------------ encoder stages
    def specific(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        """Modality-specific blocks: (B, n, D) patches -> (B, g + n, D), g = 1 with a global token.

        The global token is prepended and the registers appended for these blocks only; the
        registers are dropped on return (they never reach the joint block or the decoder).
        """
        B = tokens.shape[0]
        parts = [tokens]
        if self.m.global_token:
            parts.insert(0, getattr(self, f"global_{modality}").expand(B, -1, -1))
        if self.m.num_registers:
            parts.append(getattr(self, f"registers_{modality}").expand(B, -1, -1))
        x = torch.cat(parts, dim=1)  # (B, g + n + R, D)
        for block in getattr(self, f"blocks_{modality}"):
            x = block(x)
        return x[:, : x.shape[1] - self.m.num_registers]

    def global_feature(self, x: torch.Tensor, modality: str, priority: str | None = None):
        """Per-modality joint pass -> ((B, D) global feature, (B, n) token priority or None).

        With a global token only its row of the joint block is computed; without one (CAV-MAE)
        the feature is the mean of the modality-normed joint tokens. The priority is the
        head-mean attention (``global_attention``) normalised to sum to one over the patches.
        """
        g, weights = self.global_attention(x, modality, priority)
        return g, _normalised(weights)

    def global_attention(self, x: torch.Tensor, modality: str, priority: str | None = None):
        """``global_feature`` with the head-mean attention weights (B, n) as they are (or None)."""
        norm = getattr(self, f"norm_{modality}")
        if not self.m.global_token:
            if priority is not None:
                raise ValueError("token priority needs a global token (model.global_token=True)")
            return norm(self.joint(x, norm=modality)).mean(dim=1), None
        g, scores = self.joint.forward_global(x, norm=modality, priority=priority)
        return norm(g[:, 0]), scores

    def joint_tokens(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Full per-modality joint pass: (B, g + n, D) -> (B, g + n, D), every token normed."""
        return getattr(self, f"norm_{modality}")(self.joint(x, norm=modality))

    def joint_concat(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Joint pass over [audio patches, visual patches] (no global tokens) for the decoder."""
        return self.norm(self.joint(torch.cat([audio, visual], dim=1)))

    # ------------------------------------------------------------------ full view
    def forward_features(self, fbank: torch.Tensor, frames: torch.Tensor) -> Features:
        g = int(self.m.global_token)
        ta = self.joint_tokens(self.specific(self.embed_audio(fbank), "a"), "a")
        tv = self.joint_tokens(self.specific(self.embed_visual(frames), "v"), "v")
        if g:
            return Features(ta[:, 0], tv[:, 0], ta[:, 1:], tv[:, 1:])
        return Features(ta.mean(1), tv.mean(1), ta, tv)

    def encode(self, x: torch.Tensor, modality: str, priority: str | None = None):
        """One modality's full view -> ((B, D) global feature, not normalised; (B, n) priority or None).

        The one entry point for a modality's global feature: x is the normalised fbank (B, T, F)
        for ``modality="a"`` (or "audio"), the normalised frames (B, 3, H, W) for "v" ("visual").
        ``priority`` ("patch_to_global" / "global_to_patch") also returns the token priority.
        """
        g, weights = self._encode_attention(x, modality, priority)
        return g, _normalised(weights)

    def _encode_attention(self, x: torch.Tensor, modality: str, priority: str | None):
        """``encode`` with the raw head-mean attention weights instead of the priority."""
        m = _MODALITIES.get(modality)
        if m is None:
            raise ValueError(f"unknown modality {modality!r}; use 'a' / 'audio' or 'v' / 'visual'")
        embed = self.embed_audio if m == "a" else self.embed_visual
        return self.global_attention(self.specific(embed(x), m), m, priority)

    def guide(self, fbank: torch.Tensor, frames: torch.Tensor, priority: str | None) -> Guide:
        """The teacher's pass: full view, global features and (optionally) token priorities."""
        ga, wa = self._encode_attention(fbank, "a", priority)
        gv, wv = self._encode_attention(frames, "v", priority)
        return Guide(ga, gv, _normalised(wa), _normalised(wv), wa, wv)


def _normalised(weights: torch.Tensor | None) -> torch.Tensor | None:
    """(B, n) non-negative weights scaled to sum to one over the patches (None passes through)."""
    return None if weights is None else weights / weights.sum(-1, keepdim=True)


class MAEDecoder(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        D, Dd, p = m.embed_dim, m.decoder_dim, m.patch_size
        self.embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.modality_a = nn.Parameter(torch.zeros(1, 1, Dd))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, Dd))
        self.register_buffer("pos_embed_a", sincos_2d(Dd, *m.audio_grid)[None])
        self.register_buffer("pos_embed_v", sincos_2d(Dd, *m.visual_grid)[None])
        self.blocks = nn.ModuleList(Block(Dd, m.decoder_heads, m.mlp_ratio, checkpointing=m.grad_checkpointing)
                                    for _ in range(m.decoder_depth))
        self.norm = nn.LayerNorm(Dd)
        self.pred_a = nn.Linear(Dd, p * p * 1)
        self.pred_v = nn.Linear(Dd, p * p * 3)
        self.apply(init_weights)
        for param in (self.mask_token, self.modality_a, self.modality_v):
            nn.init.normal_(param, std=0.02)

    def _unshuffle(self, kept: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, keep, Dd) kept tokens -> (B, N, Dd) in original order, mask tokens elsewhere."""
        B, keep, Dd = kept.shape
        N = ids_restore.shape[1]
        x = torch.cat([kept, self.mask_token.expand(B, N - keep, -1)], dim=1)
        return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(B, N, Dd))

    def forward(self, latent: torch.Tensor, keep_a: int, ids_restore_a: torch.Tensor,
                ids_restore_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (B, keep_a + keep_v, D) -> predictions (B, Na, p*p) and (B, Nv, p*p*3)."""
        d = self.embed(latent)
        a = self._unshuffle(d[:, :keep_a], ids_restore_a) + self.pos_embed_a + self.modality_a
        v = self._unshuffle(d[:, keep_a:], ids_restore_v) + self.pos_embed_v + self.modality_v
        x = torch.cat([a, v], dim=1)  # (B, Na + Nv, Dd)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        Na = ids_restore_a.shape[1]
        return self.pred_a(x[:, :Na]), self.pred_v(x[:, Na:])


class TGDPModel(nn.Module):
    """Encoder + decoder. ``forward`` is the training step of ``cfg.method``."""

    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = AVEncoder(cfg.model)
        self.decoder = MAEDecoder(cfg.model)

    # ------------------------------------------------------------------ inference API
    def forward_features(self, fbank: torch.Tensor, frames: torch.Tensor) -> Features:
        return self.encoder.forward_features(fbank, frames)

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, T, F) normalised fbank -> (B, D) L2-normalised audio embeddings."""
        _check_input(fbank, "fbank", (None, self.cfg.model.audio_frames, self.cfg.model.mel_bins), finite=True)
        return F.normalize(self.encoder.encode(fbank, "a")[0], dim=-1)

    def encode_visual(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised frames -> (B, D) L2-normalised visual embeddings."""
        size = self.cfg.model.image_size
        _check_input(frames, "frames", (None, 3, size, size), finite=True)
        return F.normalize(self.encoder.encode(frames, "v")[0], dim=-1)

    # ------------------------------------------------------------------ training step
    def forward(self, fbank: torch.Tensor, frames: torch.Tensor, guide: Guide | None = None,
                generator: torch.Generator | None = None, batch_slice: BatchSlice | None = None,
                contrastive_ratio: float | None = None, rec_ratio: float | None = None) -> StepOutput:
        """One training step's losses.

        fbank (B, T, F), frames (B, 3, H, W). For ``tgdp`` pass the teacher's ``guide``
        (priorities None = random selection, e.g. during the guidance warm-up).
        ``generator`` makes the random masks repeatable; ``batch_slice`` says which rows of the
        global batch this rank holds (``masking.BatchSlice``), so its masks match one process.
        ``contrastive_ratio`` and ``rec_ratio`` override ``objective.contrastive_mask_ratio`` and
        ``objective.rec_mask_ratio`` for this step (the trainer's curricula,
        ``trainer.contrastive_ratio_at`` / ``trainer.rec_ratio_at``).
        """
        cfg, o = self.cfg, self.cfg.objective
        patches_a, patches_v = self.encoder.embed_audio(fbank), self.encoder.embed_visual(frames)
        ratio = o.rec_mask_ratio if rec_ratio is None else rec_ratio
        rec = self._reconstruction_view(fbank, frames, patches_a, patches_v, guide, ratio, generator, batch_slice)
        parts, masks = {"rec": rec.loss}, {"rec_a": rec.mask_a, "rec_v": rec.mask_v}
        if cfg.method == "tgdp":  # a second pass with its own (guided) selection, no decoder
            ratio = o.contrastive_mask_ratio if contrastive_ratio is None else contrastive_ratio
            con = self._contrastive_view(patches_a, patches_v, guide, ratio, generator, batch_slice)
            masks.update(con_a=con.mask_a, con_v=con.mask_v)
            if o.distill_weight > 0:
                if guide is None:
                    raise ValueError("method 'tgdp' with distill_weight > 0 needs the teacher's guide")
                parts["distill"] = (losses.distillation_loss(con.audio, guide.audio)
                                    + losses.distillation_loss(con.visual, guide.visual))
            global_a, global_v = con.audio, con.visual
        else:  # single pass (CAV-MAE Sync / CAV-MAE): the contrastive features of the same masked view
            global_a, _ = self.encoder.global_feature(rec.specific_a, "a")
            global_v, _ = self.encoder.global_feature(rec.specific_v, "v")
        parts["contrastive"] = losses.info_nce(global_a, global_v, o.temperature)

        loss = o.rec_weight * parts["rec"] + o.contrastive_weight * parts["contrastive"]
        if "distill" in parts:
            loss = loss + o.distill_weight * parts["distill"]
        return StepOutput(loss, parts, global_a, global_v, masks)

    def _reconstruction_view(self, fbank, frames, patches_a, patches_v, guide: Guide | None, ratio: float,
                             generator, batch_slice) -> "_RecView":
        """Masking at ``ratio`` (``objective.rec_selection``), the concatenated joint pass, the decoder, L_rec."""
        cfg, enc = self.cfg, self.encoder
        norm_pix = cfg.model.norm_pix_loss
        priority_a, priority_v = (guide.priority_a, guide.priority_v) if guide is not None else (None, None)
        kept_a, mask_a, restore_a = self._select_rec(patches_a, priority_a, ratio, generator, batch_slice)
        kept_v, mask_v, restore_v = self._select_rec(patches_v, priority_v, ratio, generator, batch_slice)
        specific_a, specific_v = enc.specific(kept_a, "a"), enc.specific(kept_v, "v")  # (B, g + keep, D)
        g = int(cfg.model.global_token)
        latent = enc.joint_concat(specific_a[:, g:], specific_v[:, g:])  # (B, keep_a + keep_v, D)
        pred_a, pred_v = self.decoder(latent, kept_a.shape[1], restore_a, restore_v)
        p = cfg.model.patch_size
        target_a = patchify(fbank.transpose(1, 2).unsqueeze(1), p)  # (B, Na, p*p)
        target_v = patchify(frames, p)  # (B, Nv, p*p*3)
        loss = (losses.reconstruction_loss(pred_a, target_a, mask_a, norm_pix)
                + losses.reconstruction_loss(pred_v, target_v, mask_v, norm_pix))
        return _RecView(loss, mask_a, mask_v, specific_a, specific_v)

    def _contrastive_view(self, patches_a, patches_v, guide: Guide | None, ratio: float,
                          generator, batch_slice) -> "_ContrastiveView":
        """The contrastive path's selection (``objective.selection``) and global features."""
        kept_a, mask_a = self._select(patches_a, *_modality(guide, "a"), ratio, generator, batch_slice)
        kept_v, mask_v = self._select(patches_v, *_modality(guide, "v"), ratio, generator, batch_slice)
        global_a, _ = self.encoder.global_feature(self.encoder.specific(kept_a, "a"), "a")
        global_v, _ = self.encoder.global_feature(self.encoder.specific(kept_v, "v"), "v")
        return _ContrastiveView(global_a, global_v, mask_a, mask_v)

    def _select(self, tokens: torch.Tensor, priority: torch.Tensor | None, attention: torch.Tensor | None,
                ratio: float, generator: torch.Generator | None, batch_slice: BatchSlice | None):
        """The contrastive view's kept tokens (B, keep, D) and mask (B, N); random without a priority."""
        o = self.cfg.objective
        if o.selection == "guided" and priority is not None:
            kept, mask, _ = guided_masking(tokens, priority, ratio)
        elif o.selection == "probabilistic" and priority is not None:
            kept, mask, _ = probabilistic_masking(tokens, priority, ratio, generator, batch_slice)
        elif o.selection == "probabilistic_softmax" and attention is not None:
            logits = softmax_logits(attention, o.selection_temperature)  # softmax(attention / T), as logits
            kept, mask, _ = gumbel_top_k_masking(tokens, logits, ratio, generator, batch_slice)
        else:
            kept, mask, _ = random_masking(tokens, ratio, generator, batch_slice)
        return kept, mask

    def _select_rec(self, tokens: torch.Tensor, priority: torch.Tensor | None, ratio: float,
                    generator: torch.Generator | None, batch_slice: BatchSlice | None):
        """The reconstruction view's (kept, mask, ids_restore): random, or by the teacher's priority."""
        kind = self.cfg.objective.rec_selection
        if kind == "guided" and priority is not None:
            return guided_masking(tokens, priority, ratio)
        if kind == "guided_inverse" and priority is not None:
            return inverse_guided_masking(tokens, priority, ratio)
        return random_masking(tokens, ratio, generator, batch_slice)


def _modality(guide: Guide | None, m: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(priority, attention weights) of modality ``m`` ("a" / "v") in ``guide``; (None, None) without one."""
    return (None, None) if guide is None else (getattr(guide, f"priority_{m}"), getattr(guide, f"attention_{m}"))


@dataclass
class _RecView:
    """What the reconstruction view computes."""

    loss: torch.Tensor  # L_rec, audio + visual (unweighted)
    mask_a: torch.Tensor  # (B, Na) 1 = removed
    mask_v: torch.Tensor  # (B, Nv)
    specific_a: torch.Tensor  # (B, g + keep_a, D) modality-specific output (single pass reuses it)
    specific_v: torch.Tensor  # (B, g + keep_v, D)


@dataclass
class _ContrastiveView:
    """What the contrastive view computes."""

    audio: torch.Tensor  # (B, D) global features of the masked view
    visual: torch.Tensor
    mask_a: torch.Tensor  # (B, Na) 1 = removed
    mask_v: torch.Tensor


def build_model(cfg: Config) -> TGDPModel:
    """The model for ``cfg`` (initialised as in CAV-MAE: xavier linears, N(0, 0.02) tokens)."""
    return TGDPModel(cfg)
