"""One typed config tree for every method, preset and ablation.

    cfg = Config.preset("tiny", method="sync", **{"model.embed_dim": 192})
    cfg = Config.preset("base", objective={"contrastive_mask_ratio": 0.65})
    cfg.override("objective.selection=random")        # CLI form
    Config.from_dict(cfg.to_dict()) == cfg             # JSON-safe round trip

Methods (docs/method.md, "Methods"):
  tgdp    two passes: random 0.75 reconstruction path + teacher-guided 0.50 contrastive path
  sync    one pass, CAV-MAE Sync: random 0.75 mask, reconstruction + InfoNCE on global tokens
  cavmae  one pass, CAV-MAE: no global/register tokens, InfoNCE on mean-pooled joint tokens,
          full 10 s audio
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import FBANK_MEAN, FBANK_STD, SAMPLE_RATE

METHODS = ("tgdp", "sync", "cavmae")
SELECTIONS = ("guided", "random", "probabilistic", "probabilistic_softmax")
REC_SELECTIONS = ("random", "guided", "guided_inverse")
SCORE_DIRECTIONS = ("patch_to_global", "global_to_patch")
LOG_TARGETS = ("jsonl", "tensorboard", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
# The metrics `evaluate.evaluate_model` reports that train.keep_best can choose from (P@k needs
# a label CSV, "pair P@1" per-frame labels as AV-Digits has).
EVAL_METRICS = tuple(f"{d} {m}" for d in ("A->V", "V->A")
                     for m in ("R@1", "R@5", "R@10", "MedR", "P@1", "P@5", "P@10", "pair P@1"))
TEACHER_PRECISIONS = ("same", "bf16")


@dataclass
class ModelConfig:
    """The backbone (CAV-MAE Sync layout: modality-specific blocks, one joint block, MAE decoder)."""

    embed_dim: int = 768  # encoder width D
    num_heads: int = 12  # encoder attention heads (head dim D / heads)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * D
    specific_depth: int = 11  # modality-specific blocks per modality; one joint block follows
    decoder_dim: int = 512  # MAE decoder width
    decoder_depth: int = 8  # MAE decoder blocks
    decoder_heads: int = 16  # MAE decoder attention heads
    patch_size: int = 16  # square patches for both modalities (conv stride = kernel)
    image_size: int = 224  # frames are image_size x image_size RGB
    mel_bins: int = 128  # fbank bins: the audio "image" is mel_bins x audio_frames
    audio_frames: int = 416  # fbank frames per sample (416 = one 4.16 s Sync segment)
    global_token: bool = True  # one learnable global (CLS) token per modality; cavmae: False
    num_registers: int = 8  # register tokens per modality, dropped before the joint block
    norm_pix_loss: bool = True  # reconstruct per-patch normalised targets (MAE)
    # Activation checkpointing: every transformer block of the student (encoder and decoder)
    # keeps only its input and recomputes its activations in the backward. Less memory (a
    # larger batch per GPU), one more forward of the blocks per step: off by default (`base`,
    # batch 8, CPU: 15-20 % slower for 0.7-1.6 GB less; README, "Memory and speed switches").
    # Not part of the architecture: a run resumes with it switched either way.
    grad_checkpointing: bool = False

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(frequency rows, time columns) of the audio patch grid; tokens are frequency-major."""
        return self.mel_bins // self.patch_size, self.audio_frames // self.patch_size

    @property
    def visual_grid(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    @property
    def num_audio_patches(self) -> int:
        return math.prod(self.audio_grid)

    @property
    def num_visual_patches(self) -> int:
        return math.prod(self.visual_grid)


@dataclass
class ObjectiveConfig:
    """What a training step computes: masking of each path and the loss weights."""

    rec_mask_ratio: float = 0.75  # reconstruction path: share of patches removed (random)
    # TG-DP contrastive path: share removed; paper ablation 0.00 / 0.50 / 0.65 / 0.75.
    contrastive_mask_ratio: float = 0.5
    # Curriculum (the paper's future work): the contrastive ratio ramps linearly from 0 (full
    # views) at step 0 to contrastive_mask_ratio at this share of train.steps (rounded to a
    # step, ``Config.steps_of``), then stays; 0 = the full ratio from the first step (the
    # paper). From scratch, masked InfoNCE leaves its collapsed start later than full views do
    # (README, "Learning from scratch"), so the from-scratch CPU presets ramp.
    contrastive_mask_warmup_fraction: float = 0.0
    # The same ramp for the single-pass methods (sync, cavmae), whose one view is also their
    # contrastive view: its mask ratio rises linearly from 0 to rec_mask_ratio over this share
    # of train.steps (trainer.rec_ratio_at), so an ablation can give every row an equal
    # curriculum (issue 14); 0 = the full ratio from the first step (CAV-MAE Sync). tgdp
    # ignores it: its reconstruction view stays at rec_mask_ratio, its contrastive view ramps
    # by contrastive_mask_warmup_fraction.
    single_pass_mask_warmup_fraction: float = 0.0
    # Which tokens the contrastive path keeps: the teacher's top-k ("guided", the paper),
    # uniformly at random ("random", ablation), sampled without replacement in proportion to
    # the teacher's priority ("probabilistic", ablation), or the released code's "prob" mode
    # ("probabilistic_softmax"): Gumbel top-k from softmax(head-mean attention / T), T =
    # selection_temperature (docs/method.md, "The teacher and the token priority").
    selection: str = "guided"
    # T of "probabilistic_softmax". 1.0 is the released code's default; the attention weights
    # are ~1/N, so at T = 1 the draw is nearly uniform (max/min probability ~1.005 on the
    # reference tensors): smaller T moves it towards the top-k.
    selection_temperature: float = 1.0
    # Which tokens the reconstruction view keeps (the paper's future work, issue 14): uniformly
    # at random ("random", the paper), the teacher's top-k ("guided") or all but the teacher's
    # top tokens ("guided_inverse": the informative ones are masked and must be inferred).
    # Guided choices follow teacher.guidance_warmup_fraction like the contrastive selection.
    rec_selection: str = "random"
    # Token priority read off the teacher's joint-block attention: how much each patch (as
    # query) attends to the global token (the official code's reading), or the global token's
    # attention row over the patches (the DINO-style reading).
    score_direction: str = "patch_to_global"
    rec_weight: float = 1.0  # l1, weight of the reconstruction loss (CAV-MAE recipe)
    # l2, weight of the distillation term; the paper leaves it open. The term is an element
    # mean, MSE over the D feature dimensions (summed over the two modalities): the paper's
    # ||g - g_teacher||^2 divided by D, so a weight w here is w / D in the paper's form (D = 768 at base).
    # 0 switches the teacher's full-view targets off (the "without distillation" ablation).
    distill_weight: float = 1.0
    contrastive_weight: float = 0.01  # l3, weight of InfoNCE (CAV-MAE recipe)
    # InfoNCE temperature. 0.05 is the paper's; small models collapse there (issue 4: a small
    # model sat at ln(batch) at 0.07 and escaped at 0.2), so the small presets use more.
    temperature: float = 0.05


@dataclass
class TeacherConfig:
    """The EMA teacher (TG-DP only)."""

    # Momentum ramps from momentum_start to momentum_end on a cosine over the run (DINO).
    momentum_start: float = 0.996
    momentum_end: float = 1.0
    # Share of train.steps with random selection before the teacher's guidance starts
    # (rounded to a step, ``Config.steps_of``): a fresh teacher attends almost at random
    # (docs/method.md, "The teacher") and on tiny its early top-k picked worse views than
    # random masks (README, "Learning from scratch"). 0 = guidance from the first step (the
    # released code).
    guidance_warmup_fraction: float = 0.0
    # The teacher's no-grad pass: "same" runs it at the student's precision (train.precision),
    # "bf16" under bf16 autocast even while the student trains in fp32 (its matmuls at the bf16
    # rate; its targets and priorities come back as fp32). "same" by default: bf16 was 1.07-1.16x
    # faster at `base` on a CPU, but its rounded targets and bf16 features change the guided
    # views and the losses (README, "Memory and speed switches").
    precision: str = "same"


@dataclass
class DataConfig:
    """Where the clips come from and how they become model inputs (docs/method.md, "Inputs")."""

    # CAV-MAE manifests ({"data": [{"video_id", "wav", "video_path", "labels"}]}) and label CSV.
    # Empty: the built-in AV-Digits benchmark, generated under data/generated on first use.
    train_manifest: str = ""
    test_manifest: str = ""
    # WebDataset shards instead of a manifest (issue 13; written by `python -m tgdp_core shard` or
    # `prepare --shards`): their folder, its index.json, or a brace pattern of some of its shards
    # (OUT/shard-{000000..000099}.tar). Streamed, split over ranks and workers (shardset.py).
    train_shards: str = ""
    test_shards: str = ""
    # Shuffle window of the shard loader, in samples: each worker permutes this many consecutive
    # samples of its shards at a time. 1,000: webdataset's shuffle default (open_clip uses 5,000);
    # memory: about 0.35 MB per sample at base (wav + one JPEG), per worker.
    shuffle_buffer: int = 1000
    label_csv: str = ""
    sample_rate: int = SAMPLE_RATE  # audio is resampled to this rate, mono (16 kHz)
    clip_frames: int = 1024  # fbank frames per clip after pad/crop (10 ms shift: 1024 = 10.24 s)
    # Video frames per clip; frame i pairs with the audio segment centred at fbank frame
    # round(i * clip_frames / frames_per_clip) (64 * i for the reference 1024 / 16).
    frames_per_clip: int = 16
    fbank_mean: float = FBANK_MEAN  # AudioSet statistics, also used for VGGSound: (x - mean) / std
    fbank_std: float = FBANK_STD
    # Compute fbanks and resized frames once and memory-map them (turn off for corpora too
    # large to cache: frames are then decoded per step).
    cache: bool = True
    cache_dir: str = ""  # "" = a .tgdp_cache folder beside the manifest
    workers: int = 2  # loader processes
    # RandomResizedCrop (scale 0.08-1, ratio 0.9-1.1) + horizontal flip on training frames, the
    # reference's optional augmentation; off by default (it flips glyphs on AV-Digits).
    visual_augment: bool = False
    on_error: str = "raise"  # missing/corrupt clip: "raise" (name the file) or "skip" (and report)


@dataclass
class TrainConfig:
    """Optimiser and run length (CAV-MAE recipe: Adam, wd 5e-7, betas (0.95, 0.999))."""

    batch_size: int = 48  # global batch (summed over ranks)
    steps: int = 1000  # optimiser steps in the run
    lr: float = 5e-5  # peak learning rate
    # Linear warm-up, then cosine decay to zero (MAE's schedule: CAV-MAE's x0.5 every 5
    # epochs is tied to epochs of 2 M clips, a cosine over steps works at every scale).
    warmup_steps: int = 100
    weight_decay: float = 5e-7
    betas: tuple[float, float] = (0.95, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # "auto": bf16 autocast on CUDA, fp32 on CPU (until bf16 on CPU is shown to train as well);
    # "bf16" / "fp32" force it.
    precision: str = "auto"
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda"
    # torch.compile of every transformer block of the student and the teacher ("regional"
    # compilation: one block's graph is compiled and reused by the blocks of its shape, so it
    # compiles in a fraction of the whole model's time; masking and losses stay eager). Off by
    # default: at `base` on a CPU the compiled step was no faster and the first step took ~100 s
    # longer (README, "Memory and speed switches"); `bench --suite gpu` measures it on a GPU.
    compile: bool = False
    log_every: int = 10  # steps between metrics.jsonl records (and callbacks)
    # Where each record goes (rank 0): "jsonl" (run folder/metrics.jsonl), "tensorboard"
    # (run folder/tensorboard, `tensorboard --logdir runs`), "wandb" (the optional extra
    # tgdp_core[wandb]; offline unless wandb_mode says otherwise). Issue 15.
    log_to: tuple[str, ...] = ("jsonl", "tensorboard")
    wandb_project: str = "tgdp"  # W&B project of the run (only with "wandb" in log_to)
    # "offline" (default: files under the run folder, no network; `wandb sync` uploads them
    # later), "online" or "disabled".
    wandb_mode: str = "offline"
    # Steps between evaluations during training (0 = none): zero-shot retrieval on
    # data.test_shards or data.test_manifest, the metrics of `python -m tgdp_core eval`, logged
    # as "eval/<metric>".
    eval_every: int = 0
    eval_clips: int = 0  # evaluate on the first N test clips, in manifest order (0 = all)
    # Keep the best checkpoint by this evaluation metric, e.g. "A->V R@1" (run folder/best.pt;
    # MedR: lower is better, every other metric higher). "" = keep none.
    keep_best: str = ""
    # Steps between guidance diagnostics in metrics.jsonl ("probe/..." keys, diagnostics.py):
    # the teacher's localisation on a fixed batch of training pairs, against the relevance
    # masks only AV-Digits sets carry, so other corpora log nothing; 0 = off. Also at the
    # last step. 50: eight points over the tiny preset's 400 steps, each two teacher passes over
    # 64 pairs (diagnostics.PROBE_CLIPS), small beside 50 training steps.
    probe_every: int = 50
    checkpoint_every: int = 200  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # the newest k step checkpoints are kept, besides last.pt
    seed: int = 0
    # Weights loaded into the model before step 0 (checkpoint.load_pretrained): a tgdp
    # checkpoint or exported weights, an official CAV-MAE / Sync / TG-DP state dict, or
    # ImageNet MAE ViT weights (CAV-MAE's start); the optimiser and step start fresh and the
    # teacher is a copy of the loaded student. A resumed run (out_dir/last.pt) keeps its own
    # weights. "" = the random initialisation (CAV-MAE's: xavier linears, N(0, 0.02) tokens).
    init_from: str = ""

    def problems(self) -> list[str]:
        """What is wrong with the tracking and evaluation fields (``Config.validate`` reports it)."""
        out = []
        unknown = [t for t in self.log_to if t not in LOG_TARGETS]
        if unknown or len(set(self.log_to)) != len(self.log_to):
            out.append(f"train.log_to {list(self.log_to)} must name each of {', '.join(LOG_TARGETS)} at most once")
        if self.wandb_mode not in WANDB_MODES:
            out.append(f"train.wandb_mode {self.wandb_mode!r} is not one of {', '.join(WANDB_MODES)}")
        if self.eval_every < 0 or self.eval_clips < 0:
            out.append("train.eval_every and train.eval_clips must be >= 0 (0: off / all clips)")
        if self.keep_best and self.keep_best not in EVAL_METRICS:
            out.append(f"train.keep_best {self.keep_best!r} is not one of {', '.join(EVAL_METRICS)}")
        if self.keep_best and not self.eval_every:
            out.append("train.keep_best needs evaluations: set train.eval_every > 0")
        return out


@dataclass
class Config:
    method: str = "tgdp"  # "tgdp" | "sync" | "cavmae"
    preset_name: str = "base"  # the preset this config started from (informational)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---------------------------------------------------------------- construction
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Config":
        """A named preset with keyword overrides.

        Overrides are top-level fields (``method="sync"``), whole sections as dicts
        (``model={"embed_dim": 128}``) or dotted names (``**{"model.embed_dim": 128}``).
        The method's own defaults (CAV-MAE: no global token, 10 s audio) are applied
        before the overrides, so an override always wins.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        cfg = cls.from_dict({"preset_name": name, **PRESETS[name]})
        method = overrides.get("method", cfg.method)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
        cfg.method = method
        for key, value in METHOD_DEFAULTS[method](cfg).items():
            cfg._set(key, value)
        for key, value in overrides.items():
            if isinstance(value, dict) and key in _sections():
                for sub, sub_value in value.items():
                    cfg._set(f"{key}.{sub}", sub_value)
            else:
                cfg._set(key, value)
        cfg.validate()
        return cfg

    def override(self, *assignments: str) -> "Config":
        """Apply CLI-style ``section.field=value`` strings (values parsed by the field's type)."""
        for item in assignments:
            key, sep, text = item.lstrip("-").partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not of the form section.field=value")
            self._set(key, _parse(text, self._field_type(key)))
        self.validate()
        return self

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Inverse of to_dict; unknown sections or fields are rejected with the valid names.

        Configs saved before a field was renamed load as well (``_upgrade``).
        """
        return _build(cls, _upgrade(data), "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def steps_of(self, fraction: float) -> int:
        """A share of the run in whole steps: round(fraction * train.steps)."""
        return round(fraction * self.train.steps)

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        m, o = self.model, self.objective
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if o.selection not in SELECTIONS:
            problems.append(f"objective.selection {o.selection!r} is not one of {', '.join(SELECTIONS)}")
        if o.rec_selection not in REC_SELECTIONS:
            problems.append(f"objective.rec_selection {o.rec_selection!r} is not one of {', '.join(REC_SELECTIONS)}")
        elif o.rec_selection != "random" and self.method != "tgdp":
            problems.append(f"objective.rec_selection={o.rec_selection!r} needs the EMA teacher of method 'tgdp'")
        if o.selection_temperature <= 0:
            problems.append(f"objective.selection_temperature must be positive, got {o.selection_temperature}")
        if o.score_direction not in SCORE_DIRECTIONS:
            problems.append(
                f"objective.score_direction {o.score_direction!r} is not one of {', '.join(SCORE_DIRECTIONS)}"
            )
        if m.embed_dim % m.num_heads or m.decoder_dim % m.decoder_heads:
            problems.append("model.embed_dim / decoder_dim must be divisible by their head counts")
        for name, size in (("image_size", m.image_size), ("mel_bins", m.mel_bins), ("audio_frames", m.audio_frames)):
            if size % m.patch_size:
                problems.append(f"model.{name}={size} is not a multiple of patch_size={m.patch_size}")
        if not 0.0 <= o.rec_mask_ratio < 1.0 or not 0.0 <= o.contrastive_mask_ratio < 1.0:
            problems.append("mask ratios must lie in [0, 1)")
        for name, share in (("objective.contrastive_mask_warmup_fraction", o.contrastive_mask_warmup_fraction),
                            ("objective.single_pass_mask_warmup_fraction", o.single_pass_mask_warmup_fraction),
                            ("teacher.guidance_warmup_fraction", self.teacher.guidance_warmup_fraction)):
            if not 0.0 <= share <= 1.0:
                problems.append(f"{name}={share} is a share of train.steps: it must lie in [0, 1]")
        if self.train.probe_every < 0:
            problems.append(f"train.probe_every must be >= 0 (0 = off), got {self.train.probe_every}")
        if not (math.isfinite(o.temperature) and o.temperature > 0):
            problems.append(f"objective.temperature={o.temperature} must be a finite number > 0")
        if self.method in ("tgdp", "sync") and not m.global_token:
            problems.append(f"method {self.method!r} needs model.global_token=True (its features are global tokens)")
        if self.method == "cavmae" and m.global_token:
            problems.append("method 'cavmae' pools its patch tokens: set model.global_token=False")
        if self.train.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"train.precision {self.train.precision!r} is not one of auto, bf16, fp32")
        if self.teacher.precision not in TEACHER_PRECISIONS:
            problems.append(f"teacher.precision {self.teacher.precision!r} is not one of {', '.join(TEACHER_PRECISIONS)}")
        if self.train.device not in ("auto", "cpu", "cuda"):
            problems.append(f"train.device {self.train.device!r} is not one of auto, cpu, cuda")
        if self.data.train_manifest and self.data.train_shards:
            problems.append("set one of data.train_manifest and data.train_shards, not both")
        if self.data.test_manifest and self.data.test_shards:
            problems.append("set one of data.test_manifest and data.test_shards, not both")
        if self.data.shuffle_buffer < 1:
            problems.append(f"data.shuffle_buffer={self.data.shuffle_buffer} must be >= 1")
        if self.data.on_error not in ("raise", "skip"):
            problems.append(f"data.on_error {self.data.on_error!r} is not one of raise, skip")
        if m.audio_frames > self.data.clip_frames:
            problems.append(f"model.audio_frames={m.audio_frames} exceeds data.clip_frames={self.data.clip_frames}")
        if not 0.0 <= self.teacher.momentum_start <= self.teacher.momentum_end <= 1.0:
            problems.append("teacher momentum must satisfy 0 <= momentum_start <= momentum_end <= 1")
        problems += self.train.problems()
        problems += _range_problems(self)
        if problems:
            raise ValueError("invalid config: " + "; ".join(problems))

    def differences(self, other: "Config") -> dict[str, tuple[Any, Any]]:
        """{"section.field": (value here, value in ``other``)} for every field that differs."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return {k: (mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)}

    def check_field(self, key: str) -> str:
        """``key`` if it names a field ("train.steps"); else ValueError with the valid names."""
        self._resolve(key)
        return key

    # ---------------------------------------------------------------- helpers
    def _field_type(self, key: str) -> Any:
        owner, name = self._resolve(key)
        return typing.get_type_hints(type(owner))[name]

    def _resolve(self, key: str) -> tuple[Any, str]:
        parts = key.split(".")
        owner: Any = self
        for part in parts[:-1]:
            if part not in _sections():
                raise ValueError(f"unknown config section {part!r}; valid sections: {', '.join(_sections())}")
            owner = getattr(owner, part)
        names = [f.name for f in dataclasses.fields(owner)]
        if parts[-1] not in names:
            where = ".".join(parts[:-1]) or "config"
            raise ValueError(f"unknown field {parts[-1]!r} in {where}; valid fields: {', '.join(names)}")
        return owner, parts[-1]

    def _get(self, key: str) -> Any:
        owner, name = self._resolve(key)
        return getattr(owner, name)

    def _set(self, key: str, value: Any) -> None:
        owner, name = self._resolve(key)
        if dataclasses.is_dataclass(getattr(owner, name)):
            raise ValueError(f"{key!r} is a section: set its fields, e.g. {key}.<field>=value")
        if isinstance(value, list):
            value = tuple(value)
        setattr(owner, name, value)


# Step counts that became shares of the run (issue 12): section, old field, new field.
_STEPS_TO_FRACTIONS = (("objective", "contrastive_mask_warmup_steps", "contrastive_mask_warmup_fraction"),
                       ("teacher", "guidance_warmup_steps", "guidance_warmup_fraction"))


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict saved by an earlier version in today's field names.

    ``preset`` became ``preset_name``; the warm-up step counts became shares of the run
    (steps / train.steps, capped at 1: a warm-up as long as the run never ends either way).
    """
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if "preset" in data and "preset_name" not in data:  # the field's name in the first checkpoints
        data["preset_name"] = data.pop("preset")
    steps = (data.get("train") or {}).get("steps", TrainConfig.steps)
    for section, old, new in _STEPS_TO_FRACTIONS:
        if isinstance(data.get(section), dict) and old in data[section]:
            part = dict(data[section])
            part[new] = min(1.0, part.pop(old) / max(steps, 1))
            data[section] = part
    return data


# (field, lowest valid value): counts and sizes that make no sense below it (issue 17)
_AT_LEAST = [("train.batch_size", 1), ("train.steps", 1), ("train.log_every", 1), ("train.checkpoint_every", 1),
             ("train.keep_checkpoints", 1), ("train.warmup_steps", 0), ("data.workers", 0), ("data.frames_per_clip", 1),
             ("data.clip_frames", 1), ("data.sample_rate", 1)]
# (field, strictly positive?): floats that must be finite, and > 0 or >= 0 (lr 0: weights held
# where they start, a test of the loop)
_FINITE = [("train.lr", False), ("data.fbank_std", True), ("train.weight_decay", False), ("train.grad_clip", False)]


def _range_problems(cfg: "Config") -> list[str]:
    problems = []
    for key, low in _AT_LEAST:
        value = cfg._get(key)
        if value < low:
            problems.append(f"{key}={value} must be >= {low}")
    for key, positive in _FINITE:
        value = cfg._get(key)
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            problems.append(f"{key}={value} must be a finite number {'> 0' if positive else '>= 0'}")
    if not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        problems.append(f"train.betas={tuple(cfg.train.betas)} must lie in [0, 1)")
    return problems


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _sections() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING)


def _build(kind: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} in {where}; valid fields: {', '.join(fields)}")
    hints = typing.get_type_hints(kind)
    values = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], value, f"{where}.{name}" if where != "config" else name)
        else:
            values[name] = tuple(value) if isinstance(value, list) else value
    return kind(**values)


def _parse(text: str, kind: Any) -> Any:
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if kind in (int, float, str):
        return kind(text)
    return json.loads(text)  # tuples and anything structured: JSON, e.g. [0.9,0.999]


# Presets. `base` is the paper's CAV-MAE Sync architecture; `small` and `tiny` keep its layout
# at CPU sizes (tiny: seconds per step on 2 cores, for tests, notebooks and the quickstart).

# tiny's and small's inputs: 96 px frames, 64 x 128 fbank segments, 4 registers
_CPU_INPUTS = dict(image_size=96, mel_bins=64, audio_frames=128, num_registers=4)
# Learning from scratch in a few hundred CPU steps, measured on tiny (README, "Learning from
# scratch"): the contrastive term must lead (l3 = 1, l1 = l2 = 0.1; at l1 = 1 or l2 = 1 InfoNCE
# stayed at ln(batch) for 400 steps), the contrastive view starts full and reaches its 0.5
# masking at 62.5 % of the run (step 250 of 400), guided selection starts there too (from step
# 100 it cut seed 0's pair P@1 from 44/50 to 27/29: a 100-step teacher picks worse views than
# random masking), and the teacher averages over ~100 steps (momentum 0.99; DINO's 0.996 suits
# 10^5 steps).
_FROM_SCRATCH: dict[str, dict[str, Any]] = {
    "objective": dict(temperature=0.2, rec_weight=0.1, distill_weight=0.1, contrastive_weight=1.0,
                      contrastive_mask_warmup_fraction=0.625),
    "teacher": dict(guidance_warmup_fraction=0.625, momentum_start=0.99),
    # the AV-Digits layout: 5.12 s clips, 8 frames, one every 0.64 s
    "data": dict(clip_frames=512, frames_per_clip=8),
    # batch 128 and beta1 0.9: at batch 32, or with CAV-MAE's beta1 0.95, InfoNCE did not leave
    # ln(batch) within 1,000 steps (README)
    "train": dict(batch_size=128, lr=1e-3, betas=(0.9, 0.999), steps=400, warmup_steps=30,
                  checkpoint_every=100),
}

PRESETS: dict[str, dict[str, Any]] = {
    "base": {
        # Guidance from 10 % of the run, random selection before: the released code guides from
        # step 0, but a teacher that has not learned picks worse views than random masks (tiny,
        # README), and the EMA lags the student by ~1 / (1 - 0.996) = 250 steps. 10 % of a
        # paper-scale run is 2.5 of 25 epochs (VGGSound at batch 48: ~10^4 steps, ~40 of those
        # lags) and leaves guidance 90 % of the run; not measured at base.
        # The contrastive view keeps the paper's 0.5 from the first step (no curriculum): the
        # curriculum is for InfoNCE's collapsed start from scratch, base starts from pretrained
        # weights (train.init_from).
        "teacher": dict(guidance_warmup_fraction=0.1),
    },
    "small": {
        # ViT-S width (384, 6 heads) and depth (5 + 1 joint block) on tiny's inputs and recipe,
        # the learning rate halved for the wider model (README, "The small recipe": measured
        # choices). A CPU step at batch 128 (bench --variants, 2 threads) took 6.0 s at 96 px,
        # 7.7 s at 128 px, 8.0 s with 128 mel bins: 400 steps in 40 minutes on 2 cores.
        "model": dict(embed_dim=384, num_heads=6, specific_depth=5, decoder_dim=256, decoder_depth=2,
                      decoder_heads=8, **_CPU_INPUTS),
        **_FROM_SCRATCH,
        "train": {**_FROM_SCRATCH["train"], "lr": 5e-4},
    },
    "tiny": {
        "model": dict(embed_dim=128, num_heads=4, specific_depth=2, decoder_dim=64, decoder_depth=1,
                      decoder_heads=4, **_CPU_INPUTS),
        **_FROM_SCRATCH,
    },
}


def _method_defaults_cavmae(cfg: Config) -> dict[str, Any]:
    # CAV-MAE: mean-pooled features, no global or register tokens, and the whole clip's audio
    # (1024 fbank frames = 10 s at `base`) instead of one segment aligned to a frame.
    return {"model.global_token": False, "model.num_registers": 0, "model.audio_frames": cfg.data.clip_frames}


METHOD_DEFAULTS = {
    "tgdp": lambda cfg: {},
    "sync": lambda cfg: {},
    "cavmae": _method_defaults_cavmae,
}
