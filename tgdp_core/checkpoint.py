"""Checkpoints: atomic writes, strict loads, conversion of official CAV-MAE Sync / TG-DP weights,
and pretrained starts (``load_pretrained``: tgdp, official or ImageNet MAE weights before step 0).

A tgdp checkpoint is a plain dict (loadable with ``weights_only=True``):
    {"format": "tgdp", "config": Config.to_dict(), "model": state_dict, ...training state}
Official checkpoints are bare state dicts of the CAVMAE / CAVMAE_DP classes, often saved from
DataParallel (every key prefixed ``module.``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .model import AVEncoder, TGDPModel

FORMAT = "tgdp"

# Every official Block owns six LayerNorms, but only the joint block uses the audio/visual
# pairs; tgdp's blocks do not carry the four unused ones, so conversion drops exactly these.
_UNUSED_OFFICIAL = re.compile(r"^(blocks_[av]\.\d+|decoder_blocks\.\d+)\.norm[12]_[av]\.(weight|bias)$")
_RENAMES = [  # (official pattern, tgdp replacement), first match wins
    (r"^cls_token_([av])$", r"encoder.global_\1"),
    (r"^(modality_[av]|pos_embed_[av]|norm_[av]|norm)(\.weight|\.bias)?$", r"encoder.\1\2"),
    (r"^(patch_embed_[av]\.proj\.(?:weight|bias))$", r"encoder.\1"),
    (r"^(blocks_[av]\.\d+\.(?:norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.(?:weight|bias))$", r"encoder.\1"),
    (r"^blocks_u\.0\.(.+)$", r"encoder.joint.\1"),
    (r"^decoder_embed\.(weight|bias)$", r"decoder.embed.\1"),
    (r"^mask_token$", r"decoder.mask_token"),
    (r"^decoder_(modality_[av]|pos_embed_[av])$", r"decoder.\1"),
    (r"^decoder_blocks\.(\d+\.(?:norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.(?:weight|bias))$", r"decoder.blocks.\1"),
    (r"^decoder_norm\.(weight|bias)$", r"decoder.norm.\1"),
    (r"^decoder_pred_([av])\.(weight|bias)$", r"decoder.pred_\1.\2"),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


# ---------------------------------------------------------------------- writing
def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` atomically: a temporary file in the same folder, fsync, rename.

    A crash mid-write leaves the previous file at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def link_atomically(source: Path, path: Path) -> Path:
    """Make ``path`` a hard link to ``source`` (a copy where links are not supported), atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    return path


def model_payload(model: TGDPModel, **extra: Any) -> dict[str, Any]:
    """The minimal tgdp checkpoint of a model (training adds optimiser, teacher, step, ...)."""
    return {"format": FORMAT, "config": model.cfg.to_dict(), "model": model.state_dict(), **extra}


# ---------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holds arbitrary objects
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(data).__name__}")
    return data


def load_model(path: str | Path, cfg: Config | None = None, map_location: str | torch.device = "cpu") -> TGDPModel:
    """A model from a tgdp checkpoint, an export (a folder with model.safetensors and
    config.json, ``export.py``) or an official CAV-MAE Sync / TG-DP state dict.

    Official weights: the architecture is read off the tensor shapes (the ``base`` preset for
    the released checkpoints); pass ``cfg`` for other sizes, whose head counts shapes cannot tell.
    Loading is strict: missing or unexpected keys raise with their names.
    """
    from .export import is_export, load_export

    if is_export(path):
        return load_export(path, cfg).to(map_location).eval()
    return model_from_checkpoint(read_checkpoint(path), cfg, str(path)).to(map_location).eval()


def model_from_checkpoint(data: dict[str, Any], cfg: Config | None = None, path: str = "checkpoint") -> TGDPModel:
    """``load_model`` on a checkpoint already read (``read_checkpoint``)."""
    if data.get("format") == FORMAT:
        cfg = cfg or Config.from_dict(data["config"])
        state = data["model"]
    else:
        official = unwrap_official(data)
        cfg = cfg or config_from_official(official, where=path)
        state = convert_official_state_dict(official)
    model = TGDPModel(cfg)
    load_state_strict(model, state, where=path)
    return model


def load_teacher_encoder(path: str | Path, model: TGDPModel | None = None,
                         map_location: str | torch.device = "cpu") -> AVEncoder | None:
    """The EMA teacher's encoder saved in a tgdp training checkpoint, or None when it holds none
    (official weights, exported student weights, methods without a teacher).

    ``model``: the student already loaded from ``path`` (its architecture is reused); by default
    the checkpoint's config builds one.
    """
    from .export import is_export

    if is_export(path):  # an export holds one encoder, which load_model loads
        return None
    encoder = teacher_encoder_from(read_checkpoint(path), model, str(path))
    return encoder.to(map_location) if encoder is not None else None


def teacher_encoder_from(data: dict[str, Any], model: TGDPModel | None = None,
                         path: str = "checkpoint") -> AVEncoder | None:
    """``load_teacher_encoder`` on a checkpoint already read (``read_checkpoint``)."""
    if data.get("format") != FORMAT or not data.get("teacher"):
        return None
    from .teacher import EMATeacher

    student = model if model is not None else TGDPModel(Config.from_dict(data["config"]))
    teacher = EMATeacher(student.encoder)
    load_state_strict(teacher, data["teacher"], f"{path} (teacher)")
    return teacher.encoder


def non_finite(tree: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity anywhere in ``tree`` (a state
    dict, an optimiser state, a checkpoint payload: nested dicts, lists and tensors)."""
    if isinstance(tree, torch.Tensor):
        return [prefix] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    if isinstance(tree, dict):
        return [name for k, v in tree.items() for name in non_finite(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(tree, (list, tuple)):
        return [name for i, v in enumerate(tree) for name in non_finite(v, f"{prefix}[{i}]")]
    return []


def describe_non_finite(bad: list[str], total: int | None = None) -> str:
    """"3 of 111 tensors hold NaN or infinite values (a, b, c)" for ``non_finite``'s names."""
    count = f"{len(bad)} of {total}" if total is not None else f"{len(bad)}"
    return f"{count} tensors hold NaN or infinite values (" + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") + ")"


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str = "state dict") -> None:
    """load_state_dict(strict=True) with an error that lists missing, unexpected and misshapen keys.

    Weights holding NaN or infinity are refused too: a model built from them answers every
    query with "nan" (a diverged run's last checkpoint, issue 17).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or misshapen:
        lines = [f"{where} does not fit the model ({type(model).__name__}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    bad = non_finite(state)
    if bad:
        raise CheckpointError(f"{where}: {describe_non_finite(bad, len(state))}: the run that saved it diverged; "
                              "use an earlier checkpoint")
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------- official weights
def bare_state_dict(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict: unwrap a {"state_dict"/"model": ...} container, strip ``module.``."""
    for key in ("state_dict", "model"):
        if key in data and isinstance(data[key], dict):
            data = data[key]
    state = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def unwrap_official(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The bare official state dict (``bare_state_dict``), checked to be one."""
    state = bare_state_dict(data)
    if "blocks_u.0.attn.qkv.weight" not in state:
        raise CheckpointError("not a tgdp checkpoint nor an official CAV-MAE Sync / TG-DP state dict "
                              "(no 'format' entry and no 'blocks_u.0.attn.qkv.weight' key)")
    return state


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key names -> tgdp names. Unknown keys raise; only the unused norms are dropped."""
    return {name: value for name, (_, value) in _official_pairs(state)[0].items()}


def _official_pairs(state: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[str, str]]:
    """Official names -> ({tgdp name: (official name, tensor)}, {dropped official name: why})."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    dropped, unknown = {}, []
    for key, value in state.items():
        if _UNUSED_OFFICIAL.match(key):
            dropped[key] = "a LayerNorm the official Block creates but never uses"
            continue
        if key == "register_tokens":  # one (2R, D) table: rows [0, R) audio, [R, 2R) visual
            half = value.shape[0] // 2
            out["encoder.registers_a"] = (key, value[:half].unsqueeze(0))
            out["encoder.registers_v"] = (key, value[half:].unsqueeze(0))
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                new = re.sub(pattern, repl, key)
                out[new] = (key, value.reshape(1, 1, -1) if new.startswith("encoder.global_") else value)
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"official state dict has keys tgdp cannot map ({len(unknown)}): "
                              + ", ".join(sorted(unknown)[:20]) + " (contrastive heads or more than one joint block?)")
    return out, dropped


def config_from_official(state: dict[str, torch.Tensor], where: str = "checkpoint") -> Config:
    """Read the architecture off an official state dict's shapes; heads must match ``base``."""
    base = Config.preset("base")
    D = state["patch_embed_a.proj.weight"].shape[0]
    Dd = state["decoder_embed.weight"].shape[0]
    p = state["patch_embed_a.proj.weight"].shape[-1]
    rows_a = base.model.mel_bins // p
    model = dict(
        embed_dim=D,
        decoder_dim=Dd,
        patch_size=p,
        specific_depth=len({k.split(".")[1] for k in state if k.startswith("blocks_a.")}),
        decoder_depth=len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")}),
        mlp_ratio=state["blocks_u.0.mlp.fc1.weight"].shape[0] / D,
        audio_frames=state["pos_embed_a"].shape[1] // rows_a * p,
        image_size=round(state["pos_embed_v"].shape[1] ** 0.5) * p,
        global_token="cls_token_a" in state,
        num_registers=state["register_tokens"].shape[0] // 2 if "register_tokens" in state else 0,
    )
    if (D, Dd) != (base.model.embed_dim, base.model.decoder_dim):
        raise CheckpointError(f"{where}: width {D} / decoder {Dd} is not the base architecture; "
                              "head counts cannot be read from weights, so pass cfg=Config.preset(...) "
                              "with the checkpoint's sizes")
    method = "tgdp" if model["global_token"] else "cavmae"
    return Config.preset("base", method=method, model=model)


# ---------------------------------------------------------------------- pretrained starts
_POSITION_TABLES = ("encoder.pos_embed_a", "encoder.pos_embed_v", "decoder.pos_embed_a", "decoder.pos_embed_v")
_FIXED_TABLE = "a fixed sin-cos position table: the model builds its own for its grid"
# Tensors of CAV-MAE's IN-initial.pth no model class uses (its adaptation script adds them).
_OFFICIAL_EXTRA = {"cls_token_av": "CAV-MAE's audio-visual CLS token, which no model class uses"}


@dataclass
class PretrainedReport:
    """What ``load_pretrained`` did. Every model tensor is in ``loaded`` or ``fresh``; every
    source tensor fed ``loaded`` or is in ``dropped`` with the reason."""

    path: str
    source: str  # "tgdp", "official" (CAV-MAE / CAV-MAE Sync / TG-DP) or "mae" (ImageNet MAE ViT)
    loaded: dict[str, str] = field(default_factory=dict)  # model tensor -> the source tensor it came from
    fresh: list[str] = field(default_factory=list)  # model tensors left as build_model made them
    dropped: dict[str, str] = field(default_factory=dict)  # source tensor -> why it is not used

    def summary(self) -> str:
        """A few lines for the run log: counts per module, what starts fresh, what was dropped."""
        lines = [f"init_from {self.path} ({self.source} weights; model only: optimiser, teacher and step start fresh)",
                 f"  loaded {len(self.loaded)} tensors: {_grouped(self.loaded)}"]
        if self.fresh:
            lines.append(f"  fresh {len(self.fresh)}: {_grouped(self.fresh)}")
        if self.dropped:
            lines.append(f"  dropped {len(self.dropped)}: " + "; ".join(
                f"{_grouped(names)} ({why})" for why, names in _by_reason(self.dropped).items()))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def load_pretrained(model: TGDPModel, path: str | Path) -> PretrainedReport:
    """Load weights into ``model`` before training (``train.init_from``); returns what went where.

    Sources, told apart by their keys:
      - a tgdp checkpoint (its ``model``; optimiser, teacher and step are ignored), or exported
        weights: a ``.safetensors`` file, or a folder with ``model.safetensors`` (and ``config.json``);
      - an official CAV-MAE / CAV-MAE Sync / TG-DP state dict, with or without ``module.``,
        converted as ``load_model`` does (CAV-MAE's ``IN-initial.pth`` too);
      - ImageNet MAE ViT weights in the MAE release's names (timm's ``vit_base_patch16_224.mae``
        uses the same), mapped as CAV-MAE's ``src/adapt_vmae_weights.py`` built ``IN-initial.pth``:

        ====================================  ===============================================
        MAE                                   tgdp
        ====================================  ===============================================
        patch_embed.proj.weight (D, 3, p, p)  encoder.patch_embed_v.proj.weight (a copy) and
                                              encoder.patch_embed_a.proj.weight = its sum over
                                              the 3 RGB input channels, (D, 1, p, p): a grey
                                              image gives the RGB kernel's response
        patch_embed.proj.bias                 both patch embeddings' biases
        cls_token                             encoder.global_a and encoder.global_v
        blocks.i.*, i < specific_depth        encoder.blocks_a.i.* and encoder.blocks_v.i.*
        blocks.{specific_depth}.*             encoder.joint.*; its norm1 / norm2 also into the
                                              joint block's audio and visual pairs (norm1_a, ...)
        norm.*                                encoder.norm, encoder.norm_a and encoder.norm_v
        pos_embed                             dropped: tgdp keeps its fixed sin-cos tables (MAE's
                                              are sin-cos too, with a CLS row)
        decoder_embed, mask_token,            decoder.embed, decoder.mask_token,
        decoder_blocks.i.*, decoder_norm      decoder.blocks.i.*, decoder.norm (full MAE
                                              checkpoints only; CAV-MAE maps them the same way)
        decoder_pred (p*p*3 outputs)          decoder.pred_v, and its first p*p rows into
                                              decoder.pred_a (as CAV-MAE does)
        decoder_pos_embed                     dropped (fixed sin-cos, as pos_embed)
        ====================================  ===============================================

        Modality embeddings and registers (and the decoder, for encoder-only weights) start fresh.

    Position tables are never taken from a source: they are fixed functions of the patch grid.
    A source tensor with no place in the model, or of another shape than its place, is an error
    naming them; the model is left untouched then. The teacher is built afterwards from the
    loaded student (``trainer.setup_run``).
    """
    state, source, saved_model = _read_pretrained(Path(path))
    if saved_model:
        _check_heads(saved_model, model.cfg, str(path))
    if source == "tgdp":
        pairs, dropped = {k: (k, v) for k, v in state.items()}, {}
    elif source == "official":
        extra = {k: why for k, why in _OFFICIAL_EXTRA.items() if k in state}
        pairs, dropped = _official_pairs({k: v for k, v in state.items() if k not in extra})
        dropped.update(extra)
    else:
        pairs, dropped = _mae_pairs(state, model.cfg)
    for name in _POSITION_TABLES:
        if name in pairs:
            dropped[pairs.pop(name)[0]] = _FIXED_TABLE
    report = PretrainedReport(str(path), source, dropped=dropped)
    _copy_into(model, pairs, report)
    return report


def _read_pretrained(path: Path) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    """(tensors in the source's own names, source kind, the source's model config or None)."""
    saved = None
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise CheckpointError(f"{path}: a weights folder holds model.safetensors (and config.json); found neither")
        if (path / "config.json").is_file():
            saved = json.loads((path / "config.json").read_text()).get("model")
        state = _read_safetensors(path / "model.safetensors")
    elif path.suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        data = read_checkpoint(path)
        if data.get("format") == FORMAT:
            return data["model"], "tgdp", data["config"]["model"]
        state = bare_state_dict(data)
    if any(k.startswith(("encoder.", "decoder.")) for k in state):
        return state, "tgdp", saved
    if "blocks_u.0.attn.qkv.weight" in state:
        return state, "official", saved
    if "patch_embed.proj.weight" in state:
        return state, "mae", saved
    raise CheckpointError(f"{path}: not tgdp, official CAV-MAE / Sync / TG-DP or MAE ViT weights (no 'encoder.*', "
                          "'blocks_u.0.attn.qkv.weight' or 'patch_embed.proj.weight' key)")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from err
    try:
        return load_file(path)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({err})") from err


def _check_heads(saved: dict, cfg: Config, where: str) -> None:
    """Head counts are the one architecture fact shapes cannot tell: compare them."""
    for name in ("num_heads", "decoder_heads"):
        if name in saved and saved[name] != getattr(cfg.model, name):
            raise CheckpointError(f"{where} was saved with model.{name}={saved[name]}, the model has "
                                  f"{getattr(cfg.model, name)}: build the model with the source's model config")


def _mae_pairs(state: dict[str, torch.Tensor], cfg: Config) -> tuple[dict, dict[str, str]]:
    """MAE names -> ({tgdp name: (MAE name, tensor)}, {dropped MAE name: why}); see load_pretrained."""
    S, p = cfg.model.specific_depth, cfg.model.patch_size
    pairs: dict[str, tuple[str, torch.Tensor]] = {}
    dropped, unknown = {}, []
    for key, value in state.items():
        targets = _mae_targets(key, value, S, p)
        if targets is None:
            unknown.append(key)
        elif isinstance(targets, str):
            dropped[key] = targets
        for name, tensor in (targets.items() if isinstance(targets, dict) else ()):
            pairs[name] = (key, tensor)
    if not cfg.model.global_token and "cls_token" in state:
        for name in ("encoder.global_a", "encoder.global_v"):
            pairs.pop(name, None)
        dropped["cls_token"] = "the model has no global token (method cavmae)"
    extra = sorted({int(k.split(".")[1]) for k in unknown if re.match(r"^blocks\.\d+\.", k)})
    others = sorted(k for k in unknown if not re.match(r"^blocks\.\d+\.", k))
    problems = ([f"blocks {extra[0]}..{extra[-1]} (the model takes blocks 0..{S}: specific_depth={S} "
                 "modality-specific blocks, then the joint block)"] if extra else [])
    if others:
        problems.append(", ".join(others[:20]) + " (classifier heads have no place in a pretraining model)")
    if problems:
        raise CheckpointError("MAE weights have tensors tgdp cannot place: " + "; ".join(problems))
    return pairs, dropped


def _mae_targets(key: str, value: torch.Tensor, S: int, p: int):
    """One MAE tensor's places: {tgdp name: tensor}, a reason to drop it (str), or None (no place)."""
    if key in ("pos_embed", "decoder_pos_embed"):
        return _FIXED_TABLE
    if key == "cls_token":
        return {"encoder.global_a": value.reshape(1, 1, -1), "encoder.global_v": value.reshape(1, 1, -1)}
    if key == "patch_embed.proj.weight":  # (D, 3, p, p); audio: the sum over RGB, as CAV-MAE
        return {"encoder.patch_embed_v.proj.weight": value, "encoder.patch_embed_a.proj.weight": value.sum(1, keepdim=True)}
    if key == "patch_embed.proj.bias":
        return {"encoder.patch_embed_v.proj.bias": value, "encoder.patch_embed_a.proj.bias": value}
    if key.startswith("norm."):
        return {f"encoder.{n}.{key[5:]}": value for n in ("norm", "norm_a", "norm_v")}
    block = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if block:
        i, rest = int(block[1]), block[2]
        if i < S:
            return {f"encoder.blocks_a.{i}.{rest}": value, f"encoder.blocks_v.{i}.{rest}": value}
        if i > S:
            return None
        norm = re.match(r"^(norm[12])\.(weight|bias)$", rest)
        names = [rest] + ([f"{norm[1]}_{m}.{norm[2]}" for m in "av"] if norm else [])
        return {f"encoder.joint.{n}": value for n in names}
    decoder = {"decoder_embed.weight": "decoder.embed.weight", "decoder_embed.bias": "decoder.embed.bias",
               "mask_token": "decoder.mask_token", "decoder_norm.weight": "decoder.norm.weight",
               "decoder_norm.bias": "decoder.norm.bias"}
    if key in decoder:
        return {decoder[key]: value}
    if key.startswith("decoder_blocks."):
        return {"decoder.blocks." + key[len("decoder_blocks."):]: value}
    if key in ("decoder_pred.weight", "decoder_pred.bias"):  # (p*p*3, Dd): values in (row, col, channel) order
        kind = key.split(".")[1]
        return {f"decoder.pred_v.{kind}": value, f"decoder.pred_a.{kind}": value[: p * p]}
    return None


def _copy_into(model: torch.nn.Module, pairs: dict[str, tuple[str, torch.Tensor]], report: PretrainedReport) -> None:
    """Check every pair against the model, then copy them all (nothing is copied on an error)."""
    own = model.state_dict()
    nowhere = sorted(f"{src} -> {name}" for name, (src, _) in pairs.items() if name not in own)
    misshapen = sorted(f"{src} {tuple(v.shape)} -> {name} {tuple(own[name].shape)}"
                       for name, (src, v) in pairs.items() if name in own and own[name].shape != v.shape)
    # a source with NaN or infinite weights would train from step 0 to NaN losses: refuse it here
    broken = sorted(f"{src} ({int((~torch.isfinite(v)).sum())} of {v.numel()})" for name, (src, v) in pairs.items()
                    if name in own and v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if nowhere or misshapen or broken or not pairs:
        lines = [f"{report.path} does not fit the model ({report.source} weights):"]
        for title, items in (("no such tensor in the model", nowhere), ("wrong shape", misshapen),
                             ("NaN or infinite values (a diverged run's weights?)", broken)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        if not pairs:
            lines.append("  no tensor to load")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for name, (src, value) in pairs.items():
            own[name].copy_(value)
            report.loaded[name] = src
    report.fresh = sorted(set(own) - set(pairs))


def _grouped(names) -> str:
    """'encoder.blocks_a (24), decoder (40)': names counted by their first two components."""
    counts = Counter(".".join(n.split(".")[:2]) for n in names)
    return ", ".join(f"{group} ({n})" if n > 1 else group for group, n in counts.items())


def _by_reason(dropped: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, why in dropped.items():
        out.setdefault(why, []).append(name)
    return out
