"""Checkpoints: atomic writes, strict loads, and conversion of official CAV-MAE Sync / TG-DP weights.

A tgdp checkpoint is a plain dict (loadable with ``weights_only=True``):
    {"format": "tgdp", "config": Config.to_dict(), "model": state_dict, ...training state}
Official checkpoints are bare state dicts of the CAVMAE / CAVMAE_DP classes, often saved from
DataParallel (every key prefixed ``module.``).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
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


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str = "state dict") -> None:
    """load_state_dict(strict=True) with an error that lists missing, unexpected and misshapen keys."""
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
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------- official weights
def unwrap_official(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The bare state dict: unwrap a {"state_dict"/"model": ...} container, strip ``module.``."""
    for key in ("state_dict", "model"):
        if key in data and isinstance(data[key], dict):
            data = data[key]
    state = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "blocks_u.0.attn.qkv.weight" not in state:
        raise CheckpointError("not a tgdp checkpoint nor an official CAV-MAE Sync / TG-DP state dict "
                              "(no 'format' entry and no 'blocks_u.0.attn.qkv.weight' key)")
    return state


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key names -> tgdp names. Unknown keys raise; only the unused norms are dropped."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if _UNUSED_OFFICIAL.match(key):
            continue
        if key == "register_tokens":  # one (2R, D) table: rows [0, R) audio, [R, 2R) visual
            half = value.shape[0] // 2
            out["encoder.registers_a"] = value[:half].unsqueeze(0)
            out["encoder.registers_v"] = value[half:].unsqueeze(0)
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                new = re.sub(pattern, repl, key)
                if new.startswith("encoder.global_"):
                    value = value.reshape(1, 1, -1)
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"official state dict has keys tgdp cannot map ({len(unknown)}): "
                              + ", ".join(sorted(unknown)[:20]) + " (contrastive heads or more than one joint block?)")
    return out


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
