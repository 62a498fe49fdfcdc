"""Guidance diagnostics during training: does the teacher's priority find the content?

Every ``train.probe_every`` steps, and at the last step, the trainer measures on a fixed probe
batch (every frame of the first ``PROBE_CLIPS`` training clips, with AV-Digits' relevance masks:
the digit's patches in a frame, the time columns where a digit is spoken), for both score
directions (``patch_to_global``, ``global_to_patch``) and both modalities:

    probe/{modality}/{direction}/guided   share of the priority's top-k (at PROBE_RATIO) on relevant tokens
    probe/{modality}/{direction}/random   the same for a random selection of as many tokens
    probe/{modality}/{direction}/auc      ROC AUC of the priority as a detector of the relevant tokens
    probe/{modality}/chance               share of relevant tokens (what a uniform choice expects)

The encoder measured is the EMA teacher's (the student's for rows without a teacher, whose
teacher would be its average). Corpora without relevance masks log nothing. The probe runs
inside ``torch.random.fork_rng`` and draws its random selection from its own generator, so a
run with diagnostics trains exactly as one without (tests/test_diagnostics.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import avdigits
from .analysis import Pairs, kept_relevant_share, load_pairs, priority_auc, select_tokens, token_priority
from .config import SCORE_DIRECTIONS, Config
from .dataset import AVDataset
from .model import AVEncoder

# training clips in the probe batch, x frames_per_clip pairs: 64 at the tiny preset, two teacher passes
# (one per score direction) of 64 pairs per probe, a few batches' worth of one training step
PROBE_CLIPS = 8
PROBE_RATIO = 0.5  # share removed by the probe's selections: the paper's contrastive ratio, the same for every row
PROBE_SEED = 0  # the probe's random selection: the same tokens at every probe step


@dataclass
class GuidanceProbe:
    """The fixed probe batch of a run and when to measure it."""

    pairs: Pairs
    every: int  # train.probe_every
    last_step: int  # train.steps: the final model is measured as well

    def due(self, step: int) -> bool:
        """Whether the model after ``step`` steps is measured."""
        return step % self.every == 0 or step == self.last_step

    def __call__(self, encoder: AVEncoder) -> dict[str, float]:
        device = next(encoder.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return guidance_diagnostics(encoder, self.pairs)


def probe_for(cfg: Config) -> GuidanceProbe | None:
    """The probe batch of ``cfg``'s training set, or None: diagnostics off, no feature cache, or
    a set without relevance masks (relevance_{split}.npz beside the manifest: AV-Digits)."""
    if cfg.train.probe_every == 0 or not cfg.data.cache or not cfg.data.train_manifest:
        return None
    manifest = Path(cfg.data.train_manifest)
    if not (manifest.parent / f"relevance_{manifest.stem}.npz").exists():
        return None
    dataset = AVDataset(manifest, cfg, train=False)
    truth = avdigits.load_relevance(manifest.parent, manifest.stem)
    clips = range(min(PROBE_CLIPS, len(dataset)))
    ids = [dataset.clips[dataset.valid[i]].video_id for i in clips]
    if [truth.video_ids[dataset.valid[i]] for i in clips] != ids:
        raise ValueError(f"{manifest.parent}/relevance_{manifest.stem}.npz does not list the clips of {manifest} "
                         "in order: regenerate the set (python -m tgdp_core avdigits) or set train.probe_every=0")
    return GuidanceProbe(load_pairs(dataset, truth, clips), cfg.train.probe_every, cfg.train.steps)


@torch.no_grad()
def guidance_diagnostics(encoder: AVEncoder, pairs: Pairs, ratio: float = PROBE_RATIO,
                         seed: int = PROBE_SEED) -> dict[str, float]:
    """The ``probe/...`` record (module docstring) of ``encoder`` on ``pairs``: fractions in [0, 1]."""
    device = next(encoder.parameters()).device
    relevant = {"audio": pairs.audio_relevant, "visual": pairs.visual_relevant}
    record = {f"probe/{m}/chance": r.float().mean().item() for m, r in relevant.items()}
    for direction in SCORE_DIRECTIONS:
        priorities = token_priority(encoder, pairs.fbank.to(device), pairs.frames.to(device), direction)
        for (modality, r), priority in zip(relevant.items(), priorities):
            priority = priority.float().cpu()
            masks = select_tokens(priority, ratio, seed)
            key = f"probe/{modality}/{direction}"
            record[f"{key}/guided"] = kept_relevant_share(masks["guided"], r).mean().item()
            record[f"{key}/random"] = kept_relevant_share(masks["random"], r).mean().item()
            record[f"{key}/auc"] = priority_auc(priority, r)
    return record
