"""Evaluation during training (issue 15): every ``train.eval_every`` steps the student's
zero-shot retrieval on the test clips, the best checkpoint by ``train.keep_best``, and the two
masked views of a fixed test sample for TensorBoard / W&B.

The metrics are ``evaluate.evaluate_model``'s, the ones ``python -m tgdp_core eval`` prints,
on ``data.test_shards`` or ``data.test_manifest`` (its first ``train.eval_clips`` clips in
manifest order; 0 = all), logged as
"eval/<metric>" in the step's record. ``best.pt`` (run folder) is a model checkpoint, not a
resume point: config, student weights, EMA teacher, the step, the chosen metric and its value
and every metric of that evaluation; ``load_model``, ``load_teacher_encoder``, ``eval`` and
``export`` read it.

Evaluation leaves the training's random streams alone: it runs under
``torch.random.fork_rng`` (CPU and the training GPU), on its own loader in the main process
(never the training loader or its workers), and the sample's masks come from their own
generator, so a run's losses are the same with and without it (tests/test_tracking.py).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, Subset

from . import checkpoint as ckpt
from . import formats
from .config import Config
from .dataset import segment_bounds
from .evaluate import evaluate_model
from .model import Guide
from .teacher import guidance_active
from .trainer import contrastive_ratio_at, rec_ratio_at

EVAL_BATCH = 16  # clips per batch, as `python -m tgdp_core eval`
SAMPLE_SEED = 0  # the fixed sample's random masks: the same draw at every evaluation


@contextmanager
def _own_rng(device: torch.device):
    """Global CPU (and this GPU's) RNG state restored on exit: what runs inside is invisible to training."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


class PeriodicEval:
    """The evaluations of one run: ``due(step)``, ``evaluate(run, step)``, ``masked_views`` / ``figure``."""

    def __init__(self, cfg: Config, out_dir: Path, dataset, device: torch.device, resumed: bool = False):
        self.cfg, self.device = cfg, device
        if cfg.train.eval_clips:
            dataset = _first_clips(dataset, cfg.train.eval_clips)
        self.dataset = dataset
        self.best_path = out_dir / "best.pt"
        # a resumed run goes on from the best it kept; a fresh one replaces an old best.pt
        self.best = _saved_best(self.best_path, cfg.train.keep_best) if resumed else None
        _check_metric_available(cfg.train.keep_best, dataset)
        self.sample = _fixed_sample(dataset, cfg)

    def due(self, step: int) -> bool:
        """Whether the step that ends at ``step`` is followed by an evaluation."""
        return step % self.cfg.train.eval_every == 0

    def evaluate(self, run, step: int) -> dict[str, float]:
        """Retrieval metrics of the student after ``step`` as {"eval/<metric>": value}; best.pt
        rewritten when ``train.keep_best`` improved. Rank 0 only."""
        model = run.student
        was_training = model.training
        try:
            with _own_rng(self.device):
                metrics = evaluate_model(model, self.dataset, batch_size=EVAL_BATCH, progress=False)
        finally:
            model.train(was_training)
        name = self.cfg.train.keep_best
        if name:
            if name not in metrics:
                raise ValueError(f"train.keep_best {name!r} is not among the evaluation's metrics "
                                 f"({', '.join(metrics)}); choose one of those")
            if _better(name, metrics[name], self.best):
                self.best = metrics[name]
                payload = ckpt.model_payload(model, step=step, metric=name, value=metrics[name], metrics=metrics,
                                             teacher=run.teacher.state_dict() if run.teacher else None)
                ckpt.save_checkpoint(payload, self.best_path)
        return {f"eval/{k}": v for k, v in metrics.items()}

    @torch.no_grad()
    def masked_views(self, run, step: int) -> dict[str, Any]:
        """The masks the next training step (index ``step``) would give the fixed sample, and
        the teacher's priority over it. Every rank calls this (the step's InfoNCE gathers
        across ranks), the figure is drawn on rank 0."""
        cfg, model = self.cfg, run.student
        fbank, frames = (x.to(self.device) for x in self.sample["inputs"])
        guide, priority = None, None
        if run.teacher is not None:
            shown = run.teacher(fbank, frames, cfg.objective.score_direction)
            priority = (shown.priority_a, shown.priority_v)
            guide = shown if guidance_active(cfg, step) else Guide(shown.audio, shown.visual)
        generator = torch.Generator(self.device).manual_seed(SAMPLE_SEED)
        ratio = contrastive_ratio_at(step, cfg)
        was_training = model.training
        try:
            with _own_rng(self.device):
                out = model.eval()(fbank, frames, guide, generator, contrastive_ratio=ratio,
                                   rec_ratio=rec_ratio_at(step, cfg))
        finally:
            model.train(was_training)
        guided = guide is not None and guide.priority_a is not None and cfg.objective.selection != "random"
        return dict(masks=out.masks, priority=priority, ratio=ratio,
                    selection=cfg.objective.selection if guided else "random")

    def figure(self, views: dict[str, Any]):
        """``viz.masked_views_figure`` of the fixed sample."""
        from .analysis import Pairs
        from .viz import masked_views_figure

        s = self.sample
        pairs = Pairs(clips=[0], frame=[s["frame"]], fbank=s["inputs"][0], frames=s["inputs"][1],
                      images=s["image"][None], audio_relevant=None, visual_relevant=None, start_s=[s["start_s"]])
        return masked_views_figure(pairs, 0, views["masks"], views["priority"],
                                   (self.cfg.objective.rec_mask_ratio, views["ratio"]), self.cfg.model.patch_size,
                                   selection=views["selection"])


def periodic_eval_for(cfg: Config, out_dir: Path, device: torch.device, dataset=None,
                      resumed: bool = False) -> PeriodicEval | None:
    """The run's evaluations, or None when ``train.eval_every`` is 0. ``dataset``: an
    evaluation-mode dataset in place of ``data.test_manifest`` (built here, its feature cache
    too, without touching the global RNG)."""
    if not cfg.train.eval_every:
        return None
    with _own_rng(device):
        if dataset is None:
            source = cfg.data.test_shards or cfg.data.test_manifest
            if not source:
                raise ValueError("train.eval_every needs test clips: set data.test_shards or data.test_manifest "
                                 "(or pass eval_dataset to tgdp_core.train)")
            from .dataset import eval_data

            dataset = eval_data(source, cfg)
        return PeriodicEval(cfg, out_dir, dataset, device, resumed)


def _better(name: str, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if name.endswith("MedR") else value > best


def _saved_best(path: Path, metric: str) -> float | None:
    """The value best.pt was kept for, if it was kept for ``metric``."""
    if not metric or not path.exists():
        return None
    data = ckpt.read_checkpoint(path)
    return float(data["value"]) if data.get("metric") == metric else None


def _first_clips(dataset, n: int):
    """The first ``n`` clips of an evaluation set: a Subset of a map-style one; of shards
    (``ShardEvalSet``), the first ``n`` in manifest order."""
    from .dataset import choose_clips
    from .shardset import ShardEvalSet

    if isinstance(dataset, ShardEvalSet):
        return choose_clips(dataset, max_clips=n)[0]
    return Subset(dataset, range(min(n, len(dataset))))


def _check_metric_available(metric: str, dataset) -> None:
    """Refuse, before training, a keep_best metric the test set's labels cannot give (shards:
    their per-frame labels are only known once read, so only the label CSV is checked)."""
    from .shardset import ShardEvalSet

    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(base, ShardEvalSet):
        if "P@" in metric and "pair" not in metric and not base.decoder.label_index:
            raise ValueError(f"train.keep_best {metric!r} needs labels: give the shards a label CSV "
                             "(data.label_csv) or choose an R@k / MedR metric")
        return
    labels, frame_labels = getattr(base, "labels", None), getattr(base, "frame_labels", None)
    if "pair" in metric and frame_labels is not None and not bool((frame_labels >= 0).all()):
        raise ValueError(f"train.keep_best {metric!r} needs per-frame labels (frame_labels) in the test manifest")
    if "P@" in metric and "pair" not in metric and labels is not None and labels.shape[1] == 0:
        raise ValueError(f"train.keep_best {metric!r} needs labels: give the test manifest a label CSV "
                         "(data.label_csv, or labels.csv beside it) or choose an R@k / MedR metric")


def _fixed_sample(dataset, cfg: Config) -> dict[str, Any]:
    """The middle frame of the first test clip with its aligned segment: model inputs
    ((1, T, F), (1, 3, S, S)), the frame as a picture (S, S, 3) uint8, where the segment starts."""
    d, m = cfg.data, cfg.model
    item = next(iter(dataset)) if isinstance(dataset, IterableDataset) else dataset[0]
    k = d.frames_per_clip // 2
    fbank, frames = item["fbank"][k:k + 1].float(), item["frames"][k:k + 1].float()
    mean = torch.tensor(formats.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(formats.IMAGENET_STD).view(3, 1, 1)
    image = ((frames[0] * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    start = segment_bounds(k, d.frames_per_clip, d.clip_frames, m.audio_frames)[0] * formats.FRAME_SHIFT_MS / 1000
    return dict(inputs=(fbank, frames), image=image, frame=k, start_s=start)
