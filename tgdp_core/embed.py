"""Per-clip, per-frame embeddings for downstream work (``python -m tgdp_core embed CKPT CLIPS OUT``).

OUT is a safetensors file (``safetensors.torch.load_file(OUT)``; the metadata through
``safetensors.safe_open(OUT, "pt").metadata()``), one row per clip:

    audio           (N, K, D) float32   L2-normalised audio embeddings, one per aligned segment
                                        (what ``encode_audio`` gives for that segment)
    visual          (N, K, D) float32   L2-normalised visual embeddings, one per frame (``encode_visual``)
    audio_global    (N, K, D) float32   the same before normalisation (``AVEncoder.encode``'s global feature)
    visual_global   (N, K, D) float32
    labels          (N, C)    float32   multi-hot clip labels (C = 0 without a label CSV)
    frame_labels    (N, K)    int64     class of each frame, -1 where the manifest has none
    index           (N,)      int64     each clip's position in its manifest
    metadata        clip_ids (a JSON list, in row order), encoder ("student" or "teacher"),
                    checkpoint, clips (the manifest or shards), config (JSON)

K is data.frames_per_clip (16 at ``base``); rows come in the evaluation set's order (a manifest's
order; shard order for shards, ``index`` gives the manifest's).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .dataset import clip_ids
from .evaluate import clip_features


def write_embeddings(encoder, dataset, path: str | Path, batch_size: int = 16, progress: bool = True,
                     metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Embed every clip of an evaluation set with ``encoder`` (an ``AVEncoder``) and save the
    tensors above (with ``metadata`` added to the file's); returns them."""
    f = clip_features(encoder, dataset, batch_size, progress=progress)
    tensors = {"audio": F.normalize(f.audio, dim=-1), "visual": F.normalize(f.visual, dim=-1),
               "audio_global": f.audio, "visual_global": f.visual, "labels": f.labels.float(),
               "frame_labels": f.frame_labels.long(), "index": f.index.long()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"clip_ids": json.dumps(clip_ids(dataset, f.index)), **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # a crash mid-write leaves no half file under the name
    return tensors
