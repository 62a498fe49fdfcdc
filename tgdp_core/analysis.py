"""Measurements behind the notebooks: run plumbing, token relevance, embedding geometry, attributions.

    scale = notebook_scale()                       # $TGDP_NOTEBOOK_SCALE: full (default) | smoke
    cfg = notebook_config(scale, preset="tiny")    # the preset on AV-Digits, sized by the scale
    result = notebook_run(cfg, scale)              # trains once; later calls reuse the run
    pairs = load_pairs(test_set, relevance, clips) # frame/segment pairs with their ground truth
    relevance_report(priority, pairs, ratio)       # kept tokens on the digit: guided vs random
    embedding_stats(audio, visual)                 # modality gap, paired / unpaired cosine
    similarity_attributions(model, fbank, frames)  # captum, per patch

Everything here is a plain function of tensors or files, so the notebooks' numbers come from
code the tests check (tests/test_analysis.py); the plots live in ``viz``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import avdigits
from .checkpoint import load_model, load_teacher_encoder
from .config import Config
from .dataset import AVDataset, segment_bounds
from .masking import (guided_masking, gumbel_top_k_masking, num_kept, patchify, probabilistic_masking, random_masking,
                      softmax_logits, softmax_probabilities)
from .model import AVEncoder, TGDPModel, build_model
from .trainer import TrainResult, train

REPO_ROOT = Path(__file__).resolve().parents[1]  # runs/ and docs/ of a source checkout
SELECTIONS = ("guided", "random", "probabilistic")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # the output of a displayed widget


# ---------------------------------------------------------------------- the size knob
@dataclass(frozen=True)
class NotebookScale:
    """How much a notebook computes: ``full`` for the committed outputs, ``smoke`` for the tests."""

    name: str
    root: Path  # runs go to root/runs/notebooks/<name>; full-scale figures to root/docs/figures
    clips: int  # test clips the analyses read (embeddings, relevance shares, attributions)
    # (train, test) clips of a small AV-Digits set generated for this scale; None: the default set
    data_clips: tuple[int, int] | None = None
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the tiny preset's train section
    data: dict[str, Any] = field(default_factory=dict)  # overrides of its data section
    snapshots: int = 4  # checkpoints kept along a run (the "selection over training" notebook)

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs" / "notebooks" / self.name

    @property
    def figure_dir(self) -> Path:
        """README's figures at full scale; a scratch folder otherwise, so tests never overwrite them."""
        return self.root / "docs" / "figures" if self.name == "full" else self.runs_dir / "figures"


SCALES: dict[str, dict[str, Any]] = {
    # the tiny preset's own run length and batch on the default AV-Digits set
    "full": dict(clips=200),
    # seconds per notebook: a few steps on a 48-clip set
    "smoke": dict(clips=4, data_clips=(48, 16), train=dict(steps=4, batch_size=8, log_every=1, warmup_steps=1),
                  data=dict(workers=0)),
}


def notebook_scale(name: str | None = None) -> NotebookScale:
    """The scale named by ``name``, else by ``$TGDP_NOTEBOOK_SCALE`` (default "full").

    ``$TGDP_NOTEBOOK_ROOT`` moves runs and figures away from the repository (the tests use a
    temporary folder).
    """
    name = name or os.environ.get("TGDP_NOTEBOOK_SCALE", "full")
    if name not in SCALES:
        raise ValueError(f"unknown notebook scale {name!r}; valid: {', '.join(SCALES)}")
    root = Path(os.environ.get("TGDP_NOTEBOOK_ROOT", REPO_ROOT)).resolve()
    return NotebookScale(name=name, root=root, **SCALES[name])


def notebook_data(scale: NotebookScale, cfg: Config) -> dict[str, Path]:
    """AV-Digits paths ("root", "train", "test", "labels") for the scale.

    Full scale uses the default set (``avdigits.ensure_default``); smaller scales generate a
    small set with the same (current default) knobs once and reuse it while those knobs hold.
    """
    if scale.data_clips is None:
        return avdigits.ensure_default(cfg)
    root = scale.runs_dir / "avdigits"
    n_train, n_test = scale.data_clips
    wanted = dict(n_train=n_train, n_test=n_test, seed=0, **vars(avdigits.Knobs()))
    meta_path = root / "avdigits.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("version") != avdigits.VERSION or meta.get("arguments") != wanted:
        avdigits.generate(root, n_train=n_train, n_test=n_test, workers=1)
    return dict(root=root, train=root / "train.json", test=root / "test.json", labels=root / "labels.csv")


def notebook_config(scale: NotebookScale, preset: str = "tiny", method: str = "tgdp", **overrides: Any) -> Config:
    """``preset`` for ``method`` on the scale's AV-Digits set, with ``snapshots`` checkpoints kept.

    ``overrides`` as in ``Config.preset``; the scale's train/data sizes are applied after them.
    """
    sized = {f"{section}.{key}": value for section, values in (("train", scale.train), ("data", scale.data))
             for key, value in values.items()}
    cfg = Config.preset(preset, method=method, **overrides, **sized)
    paths = notebook_data(scale, cfg)
    cfg.data.train_manifest, cfg.data.test_manifest = str(paths["train"]), str(paths["test"])
    cfg.data.label_csv = str(paths["labels"])
    cfg.train.checkpoint_every = max(1, cfg.train.steps // scale.snapshots)
    cfg.train.keep_checkpoints = scale.snapshots + 1
    cfg.validate()
    return cfg


def run_key(cfg: Config) -> str:
    """A short hash of the config and of the AV-Digits set it reads: a changed preset or
    regenerated data gets a fresh run folder instead of a stale checkpoint."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    meta = Path(cfg.data.train_manifest).parent / "avdigits.json"
    if meta.exists():
        digest.update(meta.read_bytes())
    return digest.hexdigest()[:10]


def notebook_run(cfg: Config, scale: NotebookScale, callbacks: Iterable[Callable[[dict], Any]] = ()) -> TrainResult:
    """``tgdp_core.train`` into ``runs/notebooks/<scale>/<method>-<key>``; a finished run returns at once."""
    return train(cfg, scale.runs_dir / f"{cfg.method}-{run_key(cfg)}", callbacks)


def snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of a run's kept step checkpoints, oldest first."""
    paths = sorted(Path(run_dir).glob("step*.pt"))
    return [(int(p.stem.removeprefix("step")), p) for p in paths]


# ---------------------------------------------------------------------- encoders and priorities
def initial_model(cfg: Config) -> TGDPModel:
    """The model a run of ``cfg`` starts from (the trainer seeds, then builds), without touching
    the global RNG: the untrained baseline, and its encoder is the teacher at step 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg).eval()


def guide_encoder(checkpoint: str | Path) -> AVEncoder:
    """The EMA teacher's encoder saved in a training checkpoint (the student's if it has none)."""
    model = load_model(checkpoint)
    return load_teacher_encoder(checkpoint, model) or model.encoder.eval()


@torch.no_grad()
def token_priority(encoder: AVEncoder, fbank: torch.Tensor, frames: torch.Tensor, direction: str = "patch_to_global",
                   batch: int = 256, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's token priority, as training reads it: (B, T, F), (B, 3, S, S) -> (B, Na), (B, Nv).

    ``raw``: the head-mean attention weights before their normalisation over the patches
    (``Guide.attention_*``: the logits of the released code's softmax sampling) instead.
    """
    audio, visual = [], []
    for lo in range(0, fbank.shape[0], batch):
        guide = encoder.guide(fbank[lo:lo + batch], frames[lo:lo + batch], direction)
        audio.append(guide.attention_a if raw else guide.priority_a)
        visual.append(guide.attention_v if raw else guide.priority_v)
    return torch.cat(audio), torch.cat(visual)


def select_tokens(priority: torch.Tensor, ratio: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Masks (B, N), 1 = removed, of each selection at ``ratio`` from a priority (B, N):
    the teacher's top-k ("guided"), uniform ("random") and priority-proportional ("probabilistic")."""
    tokens = priority.unsqueeze(-1)  # (B, N, 1): the masks only need the token count
    g = torch.Generator(device=priority.device)
    return {"guided": guided_masking(tokens, priority, ratio)[1],
            "random": random_masking(tokens, ratio, g.manual_seed(seed))[1],
            "probabilistic": probabilistic_masking(tokens, priority, ratio, g.manual_seed(seed + 1))[1]}


def softmax_uniformity(attention: torch.Tensor, temperature: float = 1.0, ratio: float = 0.5,
                       draws: int = 32, seed: int = 0) -> dict[str, float]:
    """How close the released code's sampling distribution softmax(attention / T) is to uniform,
    from head-mean attention weights (B, N) (``Guide.attention_a`` / ``_v``, or the reference's
    ``score_patch_to_cls_*``):

    "max/min"        median over rows of the largest over the smallest probability (1: uniform;
                     at most e^(1/T) for any weights in [0, 1])
    "entropy"        mean of H(p) / ln N (1: uniform)
    "top-k overlap"  mean share of the top-k tokens (keep = int(N * (1 - ratio))) that a Gumbel
                     top-k draw of as many keeps, over ``draws`` draws per row
    "chance overlap" keep / N: the same share for a uniform draw (1 would be the deterministic top-k)
    """
    probs = softmax_probabilities(attention, temperature).double()  # (B, N)
    B, N = probs.shape
    keep = num_kept(N, ratio)
    entropy = -(probs * probs.log()).sum(1) / math.log(N)
    top = torch.zeros(B, N, dtype=torch.bool)
    top.scatter_(1, probs.topk(keep, dim=1).indices, True)
    g = torch.Generator().manual_seed(seed)
    tokens, logits = probs.unsqueeze(-1).float(), softmax_logits(attention, temperature)  # (B, N, 1): a token count
    overlap = [((gumbel_top_k_masking(tokens, logits, ratio, g)[1] == 0) & top).sum(1).double() / keep
               for _ in range(draws)]
    return {"max/min": (probs.max(1).values / probs.min(1).values).median().item(),
            "entropy": entropy.mean().item(), "top-k overlap": torch.stack(overlap).mean().item(),
            "chance overlap": keep / N}


# ---------------------------------------------------------------------- relevance of kept tokens
@dataclass
class Pairs:
    """Aligned (segment, frame) pairs of some test clips, as the model sees them and as pictures."""

    clips: list[int]  # dataset index of each pair's clip
    frame: list[int]  # frame index within the clip
    fbank: torch.Tensor  # (P, T, F) normalised segments
    frames: torch.Tensor  # (P, 3, S, S) normalised frames
    images: np.ndarray  # (P, S, S, 3) uint8 frames
    # (P, Na) bool: the token's time column overlaps a spoken digit; None without ground truth
    audio_relevant: torch.Tensor | None
    visual_relevant: torch.Tensor | None  # (P, Nv) bool: the digit covers the patch (avdigits.MIN_COVER)
    start_s: list[float]  # where each segment starts in its clip, seconds


def load_pairs(dataset: AVDataset, relevance: avdigits.Relevance, clips: Iterable[int],
               frames: Iterable[int] | None = None) -> Pairs:
    """Every listed frame (default: all) of each clip with its segment and AV-Digits' ground truth.

    ``dataset``: an evaluation-mode ``AVDataset`` with its feature cache (the pictures come from
    it); ``relevance``: ``avdigits.load_relevance`` of the same split (clips in manifest order).
    """
    d, m = dataset.cfg.data, dataset.cfg.model
    rows = []
    for i in clips:
        item, n = dataset[i], dataset.valid[i]
        for k in range(d.frames_per_clip) if frames is None else frames:
            start = segment_bounds(k, d.frames_per_clip, d.clip_frames, m.audio_frames)[0] * avdigits.FBANK_SHIFT_S
            audio = avdigits.audio_relevance(relevance.speech[n], start, m.audio_frames, m.mel_bins, m.patch_size)
            visual = avdigits.visual_relevance(relevance.mask(n, k), m.image_size, m.patch_size)
            rows.append((i, k, item["fbank"][k], item["frames"][k], np.asarray(dataset.cache.frames[n, k]),
                         torch.from_numpy(audio), torch.from_numpy(visual), start))
    clip, frame, fbank, normed, images, audio, visual, start = zip(*rows)
    return Pairs(list(clip), list(frame), torch.stack(fbank), torch.stack(normed), np.stack(images),
                 torch.stack(audio), torch.stack(visual), list(start))


def clip_view(dataset: AVDataset, relevance: avdigits.Relevance, i: int) -> dict[str, np.ndarray]:
    """Clip ``i`` whole, for pictures: "images" (K, S, S, 3) uint8, "fbank" (clip_frames, F)
    normalised, "speech" (4, 2) spoken digits' [onset, offset) s, "digits" (4,)."""
    n = dataset.valid[i]
    return dict(images=np.asarray(dataset.cache.frames[n]), fbank=np.asarray(dataset.cache.fbank[n], np.float32),
                speech=relevance.speech[n], digits=relevance.digits[n])


def kept_relevant_share(mask: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Share of the kept tokens that hold relevant content: mask (B, N), 1 = removed; relevant (B, N) bool -> (B,)."""
    kept = 1 - mask.float()
    return (kept * relevant.float()).sum(1) / kept.sum(1)


def priority_auc(priority: torch.Tensor, relevant: torch.Tensor) -> float:
    """ROC AUC of a priority (B, N) as a detector of the relevant tokens (B, N) bool, averaged
    over rows: the chance that a relevant token outranks an irrelevant one, ties counting half
    (0.5: no localisation; below 0.5: the priority prefers the background). Rows with one
    class only (a segment without speech) are left out; NaN when none is left."""
    both = relevant.any(1) & (~relevant).any(1)
    if not both.any():
        return math.nan
    s, pos = priority[both].float(), relevant[both].bool()
    above = (s.unsqueeze(2) > s.unsqueeze(1)).float() + 0.5 * (s.unsqueeze(2) == s.unsqueeze(1)).float()  # (B, N, N)
    pairs = (pos.unsqueeze(2) & ~pos.unsqueeze(1)).float()  # (B, N, N): token i relevant, token j not
    return ((above * pairs).sum((1, 2)) / pairs.sum((1, 2))).mean().item()


def select_pair_tokens(priority: tuple[torch.Tensor, torch.Tensor], ratio: float,
                       seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``select_tokens`` for both modalities: {selection: (audio mask (B, Na), visual mask (B, Nv))}."""
    audio, visual = (select_tokens(p, ratio, seed) for p in priority)
    return {name: (audio[name], visual[name]) for name in SELECTIONS}


def relevance_report(priority: tuple[torch.Tensor, torch.Tensor], pairs: Pairs, ratio: float,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Per modality, the mean share of kept tokens on the relevant content for each selection
    at ``ratio``, beside the share of relevant tokens (what a uniform choice expects).

    priority: the teacher's (audio (P, Na), visual (P, Nv)) for the pairs (``token_priority``).
    Returns {"visual": {"guided", "random", "probabilistic", "chance"}, "audio": {...}},
    fractions in [0, 1].
    """
    masks = select_pair_tokens(priority, ratio, seed)
    report = {}
    for m, (modality, relevant) in enumerate((("audio", pairs.audio_relevant), ("visual", pairs.visual_relevant))):
        row = {name: kept_relevant_share(both[m], relevant).mean().item() for name, both in masks.items()}
        row["chance"] = relevant.float().mean().item()
        report[modality] = row
    return report


# ---------------------------------------------------------------------- embedding geometry
def modality_gap(audio: torch.Tensor, visual: torch.Tensor) -> float:
    """Distance between the centroids of the L2-normalised audio and visual embeddings (N, D)
    (Liang et al., 2022, "Mind the gap"): 0 when the modalities share one cloud."""
    a, v = F.normalize(audio.float(), dim=-1), F.normalize(visual.float(), dim=-1)
    return (a.mean(0) - v.mean(0)).norm().item()


def embedding_stats(audio: torch.Tensor, visual: torch.Tensor) -> dict[str, float]:
    """Gap and alignment of paired embeddings (N, D), row i of each a pair.

    "gap": ``modality_gap``; "paired cos": mean cosine of the pairs; "unpaired cos": mean cosine
    of a's and v's of different pairs; "margin": their difference (> 0 when pairs are closer
    than strangers, which retrieval needs).
    """
    a, v = F.normalize(audio.float(), dim=-1), F.normalize(visual.float(), dim=-1)
    sim = a @ v.T  # (N, N)
    n = sim.shape[0]
    paired = sim.diagonal().mean().item()
    unpaired = ((sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1))).item()
    return {"gap": modality_gap(a, v), "paired cos": paired, "unpaired cos": unpaired, "margin": paired - unpaired}


def joint_umap(audio: torch.Tensor, visual: torch.Tensor, seed: int = 0, neighbours: int = 15) -> np.ndarray:
    """One 2-D UMAP (cosine metric) of the audio and visual embeddings together: (N, D) each ->
    (2N, 2), audio rows first, so both modalities and the gap between them share the map."""
    import umap  # slow to import (numba): only where a map is drawn

    x = torch.cat([audio, visual]).float().numpy()
    reducer = umap.UMAP(n_neighbors=min(neighbours, len(x) - 1), metric="cosine", random_state=seed, n_jobs=1)
    return reducer.fit_transform(x)


# ---------------------------------------------------------------------- attributions
def pair_similarity(model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """f(fbank (B, T, F), frames (B, 3, S, S)) -> (B,) cosine of each pair's embeddings."""
    return lambda fbank, frames: (model.encode_audio(fbank) * model.encode_visual(frames)).sum(-1)


def patch_scores(attr_audio: torch.Tensor, attr_visual: torch.Tensor, patch: int,
                 reduce: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element attributions -> per-token scores in the model's token order.

    attr_audio (B, T, F) -> (B, Na) frequency-major; attr_visual (B, 3, S, S) -> (B, Nv) raster.
    ``reduce``: "sum" (integrated gradients: the patch's total contribution) or "mean"
    (occlusion: every element of a patch carries the patch's score).
    """
    a = patchify(attr_audio.transpose(1, 2).unsqueeze(1), patch)  # (B, Na, p*p): rows = mel bins
    v = patchify(attr_visual, patch)  # (B, Nv, p*p*3)
    return (a.sum(-1), v.sum(-1)) if reduce == "sum" else (a.mean(-1), v.mean(-1))


def similarity_attributions(model, fbank: torch.Tensor, frames: torch.Tensor, method: str = "integrated_gradients",
                            steps: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Attribution of each pair's audio-visual cosine onto its patches (captum): (B, Na), (B, Nv).

    "integrated_gradients": from an all-zero baseline (the dataset mean after normalisation),
    ``steps`` points, summed per patch, so the tokens' scores add up to f(x) - f(0).
    "occlusion": the drop in similarity when one patch is set to zero (patch-sized windows).
    """
    from captum.attr import IntegratedGradients, Occlusion

    model.eval()
    forward = pair_similarity(model)
    inputs = (fbank.detach(), frames.detach())
    p = model.cfg.model.patch_size
    if method == "integrated_gradients":
        attr = IntegratedGradients(forward).attribute(inputs, baselines=(0.0, 0.0), n_steps=steps,
                                                      internal_batch_size=max(1, 8 * fbank.shape[0]))
        return patch_scores(*attr, p, "sum")
    if method == "occlusion":
        windows = ((p, p), (3, p, p))
        attr = Occlusion(forward).attribute(inputs, sliding_window_shapes=windows, strides=windows, baselines=(0.0, 0.0))
        return patch_scores(*attr, p, "mean")
    raise ValueError(f"unknown attribution method {method!r}; use integrated_gradients or occlusion")


def correlations(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Mean over rows of the Pearson and Spearman correlations of x and y (B, N).

    Rows where either is constant (no correlation defined, e.g. a segment without speech
    against its relevance) are left out; NaN when none is left.
    """
    from scipy.stats import pearsonr, spearmanr

    x, y = x.detach().double().cpu().numpy(), y.detach().double().cpu().numpy()
    rows = [(a, b) for a, b in zip(x, y) if a.std() > 0 and b.std() > 0]
    if not rows:
        return {"pearson": math.nan, "spearman": math.nan}
    return {"pearson": float(np.mean([pearsonr(a, b).statistic for a, b in rows])),
            "spearman": float(np.mean([spearmanr(a, b).statistic for a, b in rows]))}


# ---------------------------------------------------------------------- one step's losses
def step_loss_table(parts: dict[str, torch.Tensor], cfg: Config) -> str:
    """Markdown table of one step's loss parts, their weights (l1, l2, l3) and weighted sum."""
    o = cfg.objective
    weights = {"rec": o.rec_weight, "distill": o.distill_weight, "contrastive": o.contrastive_weight}
    lines = ["| part | value | weight | weighted |", "|---|---:|---:|---:|"]
    total = 0.0
    for name, value in parts.items():
        weighted = weights[name] * value.item()
        total += weighted
        lines.append(f"| {name} | {value.item():.4f} | {weights[name]:g} | {weighted:.4f} |")
    lines.append(f"| **loss** | | | **{total:.4f}** |")
    return "\n".join(lines)


SHIPPED_RESULTS = REPO_ROOT / "docs" / "results"  # the ablation CSVs committed with the repository


def find_ablation_csv(curriculum: str, folders: Iterable[str | Path]) -> Path | None:
    """The first ``ablation-<curriculum>.csv`` (what ``python -m tgdp_core ablate --curriculum``
    writes) in ``folders``, in their order; None when none has one."""
    for folder in folders:
        path = Path(folder) / f"ablation-{curriculum}.csv"
        if path.is_file():
            return path
    return None


def read_ablation_csv(path: str | Path) -> dict[str, dict[str, float]]:
    """The summary ``experiments.ablate`` wrote to ablation-<curriculum>.csv: {row: {metric: value}}."""
    import csv

    with open(path, newline="") as f:
        return {r.pop("row"): {k: float(v) for k, v in r.items()} for r in csv.DictReader(f)}


def strip_widget_outputs(*paths: str | Path) -> None:
    """Drop widget outputs and saved widget state from executed notebooks, in place.

    Widgets (sliders, progress bars) need a running kernel; saved without their state they show
    as stale text ("0%|") or not at all, and with it they carry every frame they drew. The
    notebooks draw a static figure beside each widget instead.
    """
    import nbformat

    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nb.metadata.pop("widgets", None)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]
        nbformat.write(nb, path)
