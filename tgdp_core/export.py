"""Weights without pickle: a folder with ``model.safetensors`` and ``config.json`` (issue 15).

    python -m tgdp_core export runs/x/last.pt exported/ [--teacher]
    model = tgdp_core.load_model("exported/")           # or the .safetensors file itself

``model.safetensors`` holds the ``TGDPModel`` state dict (encoder and MAE decoder, float32,
the fixed sin-cos tables included) and, in its header, where it came from (source, step, which
encoder). ``config.json`` is the training config (``Config.load`` reads it). No optimiser,
teacher or history: a training run resumes from its ``last.pt``, not from an export.

``--teacher`` writes the EMA teacher's encoder in place of the student's; the decoder stays the
student's (the teacher has none, and ``encode_audio`` / ``encode_visual`` use only the encoder).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .checkpoint import CheckpointError, load_state_strict, model_from_checkpoint, read_checkpoint, teacher_encoder_from
from .config import Config
from .model import TGDPModel

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, teacher: bool = False) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` from a tgdp checkpoint,
    an official state dict or another export; ``teacher``: the EMA teacher's encoder (see above)."""
    metadata = {"source": str(checkpoint), "encoder": "student"}
    if is_export(checkpoint):
        model, data = load_export(checkpoint), {}
    else:
        data = read_checkpoint(checkpoint)  # read once: a base last.pt with its optimiser is ~2 GB
        model = model_from_checkpoint(data, path=str(checkpoint))
    if teacher:
        encoder = teacher_encoder_from(data, model, str(checkpoint))
        if encoder is None:
            raise CheckpointError(f"{checkpoint} holds no EMA teacher (official weights, an export, or a method "
                                  "without one); export it without --teacher")
        model.encoder.load_state_dict(encoder.state_dict())
        metadata["encoder"] = "EMA teacher"
    if data.get("step") is not None:
        metadata["step"] = str(data["step"])
    return save_export(model, out_dir, metadata)


def save_export(model: TGDPModel, out_dir: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``model``'s weights and config into ``out_dir`` (created), each file written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic(out_dir / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "tgdp", **(metadata or {})}))
    _atomic(out_dir / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n"))
    return out_dir


def is_export(path: str | Path) -> bool:
    """Whether ``path`` names an export: a folder, or a .safetensors file."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".safetensors"


def load_export(path: str | Path, cfg: Config | None = None) -> TGDPModel:
    """The model of an export folder (or its model.safetensors); strict: every tensor must fit."""
    path = Path(path)
    folder, weights = (path, path / WEIGHTS) if path.is_dir() else (path.parent, path)
    if cfg is None:
        if not (folder / CONFIG).is_file():
            raise CheckpointError(f"{folder}: no {CONFIG} beside the weights, so the architecture is unknown; "
                                  f"re-export with `python -m tgdp_core export CKPT {folder}` (it writes both files), "
                                  "or pass cfg= to load_model")
        cfg = Config.load(folder / CONFIG)
    if not weights.is_file():
        hint = f"; a run folder? load {folder / 'last.pt'}" if (folder / "last.pt").exists() else ""
        raise CheckpointError(f"{weights}: no such file{hint}; make an export with "
                              f"`python -m tgdp_core export CKPT {folder}`")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: cannot be read as safetensors ({err}); export it again") from err
    model = TGDPModel(cfg)
    try:
        load_state_strict(model, state, where=str(weights))
    except CheckpointError as err:
        raise CheckpointError(f"{err}\nthe weights and {folder / CONFIG} must come from the same export: "
                              f"re-export with `python -m tgdp_core export CKPT {folder}`") from None
    return model


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename: a crash leaves the old file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
