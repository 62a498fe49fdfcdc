"""One typed config tree for every method, preset and ablation.

    cfg = Config.preset("tiny", method="sync", **{"model.embed_dim": 192})
    cfg = Config.preset("base", objective={"contrastive_mask_ratio": 0.65})
    cfg.override("objective.selection=random")        # CLI form
    Config.from_dict(cfg.to_dict()) == cfg             # JSON-safe round trip

Methods (DESIGN.md, "Methods are one config field"):
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

METHODS = ("tgdp", "sync", "cavmae")
SELECTIONS = ("guided", "random", "probabilistic")
SCORE_DIRECTIONS = ("patch_to_global", "global_to_patch")
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
    # larger batch per GPU), one more forward of the blocks per step; off by default: at
    # `base`, batch 8, it saved memory and cost time on a CPU (README, "Performance"). Not part
    # of the architecture: a run resumes with it switched either way.
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
    # views) at step 0 to contrastive_mask_ratio at this step; 0 = the full ratio from the
    # first step (the paper). From scratch, masked InfoNCE leaves its collapsed start later
    # than full views do (README, "Learning from scratch"), so the CPU presets ramp.
    contrastive_mask_warmup_steps: int = 0
    # Which tokens the contrastive path keeps: the teacher's top-k ("guided", the paper),
    # uniformly at random ("random", ablation) or sampled in proportion to the teacher's
    # priority without replacement ("probabilistic", ablation).
    selection: str = "guided"
    # Token priority read off the teacher's joint-block attention: how much each patch (as
    # query) attends to the global token (the official code's reading), or the global token's
    # attention row over the patches (the DINO-style reading).
    score_direction: str = "patch_to_global"
    rec_weight: float = 1.0  # l1, weight of the reconstruction loss (CAV-MAE recipe)
    # l2, weight of the distillation MSE; the paper leaves it open. 0 switches the teacher's
    # full-view targets off (the "without distillation" ablation).
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
    # Steps of random selection before the teacher's guidance starts: a fresh teacher
    # attends almost at random (DESIGN.md), so early guidance adds nothing.
    guidance_warmup_steps: int = 0
    # The teacher's no-grad pass: "same" runs it at the student's precision (train.precision),
    # "bf16" under bf16 autocast even while the student trains in fp32 (its matmuls at the bf16
    # rate; its targets and priorities come back as fp32). "same" by default: bf16 targets are
    # rounded to 8 mantissa bits, so the losses are not those of an fp32 run (README, "Performance").
    precision: str = "same"


@dataclass
class DataConfig:
    """Where the clips come from and how they become model inputs (DESIGN.md, "Backbone")."""

    # CAV-MAE manifests ({"data": [{"video_id", "wav", "video_path", "labels"}]}) and label CSV.
    # Empty: the built-in AV-Digits benchmark, generated under data/generated on first use.
    train_manifest: str = ""
    test_manifest: str = ""
    label_csv: str = ""
    sample_rate: int = 16000  # audio is resampled to this rate, mono
    clip_frames: int = 1024  # fbank frames per clip after pad/crop (10 ms shift: 1024 = 10.24 s)
    # Video frames per clip; frame i pairs with the audio segment centred at fbank frame
    # round(i * clip_frames / frames_per_clip) (64 * i for the reference 1024 / 16).
    frames_per_clip: int = 16
    fbank_mean: float = -5.081  # AudioSet statistics, also used for VGGSound: (x - mean) / std
    fbank_std: float = 4.4849
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
    # default: on a CPU the compiled step was no faster (README, "Performance").
    compile: bool = False
    log_every: int = 10  # steps between metrics.jsonl records (and callbacks)
    checkpoint_every: int = 200  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # the newest k step checkpoints are kept, besides last.pt
    seed: int = 0


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
        """Inverse of to_dict; unknown sections or fields are rejected with the valid names."""
        if "preset" in data and "preset_name" not in data:  # the field's name in the first checkpoints
            data = {("preset_name" if k == "preset" else k): v for k, v in data.items()}
        return _build(cls, data, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        m, o = self.model, self.objective
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if o.selection not in SELECTIONS:
            problems.append(f"objective.selection {o.selection!r} is not one of {', '.join(SELECTIONS)}")
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
        if o.contrastive_mask_warmup_steps < 0 or self.teacher.guidance_warmup_steps < 0:
            problems.append("warm-up step counts must be >= 0")
        if o.temperature <= 0:
            problems.append("objective.temperature must be positive")
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
        if self.data.on_error not in ("raise", "skip"):
            problems.append(f"data.on_error {self.data.on_error!r} is not one of raise, skip")
        if m.audio_frames > self.data.clip_frames:
            problems.append(f"model.audio_frames={m.audio_frames} exceeds data.clip_frames={self.data.clip_frames}")
        if not 0.0 <= self.teacher.momentum_start <= self.teacher.momentum_end <= 1.0:
            problems.append("teacher momentum must satisfy 0 <= momentum_start <= momentum_end <= 1")
        if problems:
            raise ValueError("invalid config: " + "; ".join(problems))

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

    def _set(self, key: str, value: Any) -> None:
        owner, name = self._resolve(key)
        if dataclasses.is_dataclass(getattr(owner, name)):
            raise ValueError(f"{key!r} is a section: set its fields, e.g. {key}.<field>=value")
        if isinstance(value, list):
            value = tuple(value)
        setattr(owner, name, value)


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
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "small": {
        "model": dict(embed_dim=384, num_heads=6, specific_depth=5, decoder_dim=256, decoder_depth=2,
                      decoder_heads=8),
        "objective": dict(temperature=0.1),
        "train": dict(batch_size=32, lr=2e-4),
    },
    "tiny": {
        "model": dict(embed_dim=128, num_heads=4, specific_depth=2, decoder_dim=64, decoder_depth=1,
                      decoder_heads=4, image_size=96, mel_bins=64, audio_frames=128, num_registers=4),
        # Learning from scratch in a few hundred CPU steps (README, "Learning from scratch"): the
        # contrastive term must lead (l3 = 1, l1 = l2 = 0.1; at l1 = 1 or l2 = 1 InfoNCE stayed at
        # ln(batch) for 400 steps), the contrastive view starts full and reaches its 0.5 masking
        # at step 250, guided selection starts there too (from step 100 it cut seed 0's pair P@1
        # from 44/50 to 27/29: a 100-step teacher picks worse views than random masking), and
        # the teacher averages over ~100 steps (momentum 0.99; DINO's 0.996 suits 10^5 steps).
        "objective": dict(temperature=0.2, rec_weight=0.1, distill_weight=0.1, contrastive_weight=1.0,
                          contrastive_mask_warmup_steps=250),
        "teacher": dict(guidance_warmup_steps=250, momentum_start=0.99),
        # the AV-Digits layout: 5.12 s clips, 8 frames, one every 0.64 s
        "data": dict(clip_frames=512, frames_per_clip=8),
        # batch 128 and beta1 0.9: at batch 32, or with CAV-MAE's beta1 0.95, InfoNCE did not leave
        # ln(batch) within 1,000 steps (README)
        "train": dict(batch_size=128, lr=1e-3, betas=(0.9, 0.999), steps=400, warmup_steps=30,
                      checkpoint_every=100),
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
