"""Downstream probes of a checkpoint on frozen features (issue 15).

    python -m tgdp_core probe CKPT TRAIN TEST --kind attention linear knn --features audio visual both
    results = tgdp_core.probe.run_probes(CKPT, TRAIN, TEST, kinds=("knn",), features=("both",))

TRAIN / TEST are CAV-MAE manifests (labels from a label CSV: ``label_csv``, ``data.label_csv``
or ``labels.csv`` beside the train manifest) or evaluation-mode dataset objects (items as
``AVDataset(..., train=False)`` gives them: "fbank" (K, T, F), "frames" (K, 3, S, S), "labels"
(C,) multi-hot, "frame_labels" (K,), "index").

Features are the checkpoint's ``encode_audio`` / ``encode_visual`` embeddings of every aligned
frame/segment pair of a clip (``evaluate.embed_clips``), computed once per checkpoint and split
and cached (``frozen_features``). The probes (``evaluate``):
  attention  DESIGN.md's: a learnable token and two transformer blocks over the clip's K
             per-frame features (audio, visual, or both: the 2K audio and visual ones together)
  linear     LayerNorm + linear on the clip's mean feature (both: audio and visual concatenated)
  knn        cosine k-NN, k = 20, votes weighted exp(sim / 0.07) (DINO), on the same features
Multi-label sets (some clip has no label or several: AudioSet, AV-Digits) report macro mAP,
single-label sets (VGGSound) top-1 accuracy, both in percent.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from . import evaluate
from .checkpoint import load_model
from .config import Config

KINDS = ("attention", "linear", "knn")
FEATURES = ("audio", "visual", "both")
CACHE_VERSION = 1
PROBES = {"attention": evaluate.attention_probe, "linear": evaluate.linear_probe, "knn": evaluate.knn_probe}


# ---------------------------------------------------------------------- inputs
def check_labels(manifest: str | Path, label_csv: str | Path | None) -> Path:
    """The label CSV for a probe manifest, after checking it lists every label the manifest uses."""
    from .dataset import read_label_csv, read_manifest

    if label_csv is None or not Path(label_csv).is_file():
        where = f"{label_csv} does not exist" if label_csv else "none was given"
        raise ValueError(f"{manifest}: a probe needs the clips' labels, but {where}; pass --labels CSV "
                         "(index,mid,display_name) or put labels.csv beside the train manifest")
    index, _ = read_label_csv(label_csv)
    unknown: dict[str, str] = {}  # label -> first clip that has it
    for clip in read_manifest(manifest):
        for mid in clip.labels:
            if mid not in index:
                unknown.setdefault(mid, clip.video_id)
    if unknown:
        shown = ", ".join(f"{mid!r} (clip {vid})" for mid, vid in list(unknown.items())[:10])
        raise ValueError(f"{manifest}: {len(unknown)} label(s) not in the label CSV {label_csv}: {shown}; add them "
                         "to the CSV (index,mid,display_name) or pass the CSV that lists them with --labels")
    return Path(label_csv)


def probe_dataset(source, cfg: Config, label_csv: Path | None):
    """An evaluation-mode dataset: ``source`` itself, ``AVDataset`` of a manifest path, or ``ShardEvalSet`` of shards."""
    if not isinstance(source, (str, Path)):
        return source
    from .dataset import AVDataset
    from .shards import is_shard_spec

    if is_shard_spec(source):  # shards (issue 13): each sample's labels are checked as it is read
        from .shardset import ShardEvalSet

        return ShardEvalSet(source, cfg)
    check_labels(source, label_csv)
    return AVDataset(source, cfg, train=False)


def probe_inputs(emb: evaluate.ClipEmbeddings, kind: str, features: str) -> torch.Tensor:
    """The probe's input: attention (N, K, D) per-frame features (both: (N, 2K, D), audio
    then visual); linear / knn (N, D) clip means (both: (N, 2D), audio then visual)."""
    if kind not in KINDS or features not in FEATURES:
        raise ValueError(f"probe kind {kind!r} / features {features!r}: choose from {KINDS} / {FEATURES}")
    parts = {"audio": [emb.audio], "visual": [emb.visual], "both": [emb.audio, emb.visual]}[features]
    if kind == "attention":
        return torch.cat(parts, dim=1)
    return torch.cat([p.mean(1) for p in parts], dim=1)


def probe_targets(train_labels: torch.Tensor, test_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(train_y, test_y, multilabel) from (N, C) multi-hot labels: class ids where every clip
    of both splits has exactly one label, else the multi-hot rows."""
    if train_labels.shape[1] == 0:
        raise ValueError("the probe's clips carry no labels (no label CSV was found for them)")
    single = all(bool(((y != 0).sum(1) == 1).all()) for y in (train_labels, test_labels))
    if single:
        return train_labels.argmax(1), test_labels.argmax(1), False
    return train_labels, test_labels, True


# ---------------------------------------------------------------------- the feature cache
def checkpoint_identity(path: str | Path) -> str:
    """Resolved path, size and modification time of the checkpoint's weights file: a retrained
    or re-exported checkpoint gets fresh features."""
    path = Path(path).resolve()
    weights = path / "model.safetensors" if path.is_dir() else path
    st = os.stat(weights)
    return f"{weights}:{st.st_size}:{st.st_mtime_ns}"


def dataset_identity(dataset) -> str | None:
    """What the dataset's features depend on: ``dataset.identity()`` when it has one (a hook for
    other dataset types), for ``AVDataset`` its clips' files and settings and its labels; None
    (nothing is cached) otherwise."""
    if callable(getattr(dataset, "identity", None)):
        return str(dataset.identity())
    from .dataset import AVDataset, FeatureCache

    if not isinstance(dataset, AVDataset):
        return None
    digest = hashlib.sha256(FeatureCache.key(dataset.clips, dataset.cfg).encode())
    for t in (dataset.labels, dataset.frame_labels, torch.tensor(dataset.valid)):
        digest.update(t.numpy().tobytes())
    digest.update(json.dumps([dataset.cfg.to_dict()["data"], dataset.cfg.to_dict()["model"]], sort_keys=True).encode())
    return digest.hexdigest()


def frozen_features(model, dataset, cache_dir: str | Path | None, checkpoint_id: str, batch_size: int = 16,
                    progress: bool = True) -> evaluate.ClipEmbeddings:
    """``evaluate.embed_clips`` of ``dataset``, read from ``cache_dir`` when this checkpoint
    already embedded it (key: checkpoint identity, dataset identity, cache version)."""
    data_id = dataset_identity(dataset)
    path = None
    if cache_dir is not None and data_id is not None:
        key = hashlib.sha256(json.dumps([CACHE_VERSION, checkpoint_id, data_id]).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"{key}.safetensors"
    from safetensors.torch import load_file, save_file

    if path is not None and path.is_file():
        return evaluate.ClipEmbeddings(**load_file(path))
    emb = evaluate.embed_clips(model, dataset, batch_size, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file({k: v.contiguous() for k, v in emb._asdict().items()}, tmp)
        os.replace(tmp, path)  # atomic: a half-written file is never found under the key
    return emb


def default_cache_dir(source, cfg: Config) -> Path | None:
    """``data.cache_dir`` or ``.tgdp_cache`` beside the manifest (as the clip cache), /probe_features."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir) / "probe_features"
    if isinstance(source, (str, Path)):
        return Path(source).parent / ".tgdp_cache" / "probe_features"
    return None


# ---------------------------------------------------------------------- probes
def run_probes(checkpoint: str | Path, train, test, kinds: Iterable[str] = ("attention",),
               features: Iterable[str] = ("both",), *, label_csv: str | Path | None = None,
               cache_dir: str | Path | None = None, cache: bool = True, batch_size: int = 16,
               device: str | torch.device = "cpu", options: dict[str, dict[str, Any]] | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Every probe in ``kinds`` x ``features`` on one checkpoint's frozen features.

    ``options``: keyword arguments per kind, e.g. {"knn": {"k": 10}, "linear": {"epochs": 50}}.
    Returns {"rows": {"<kind> <features>": {"mAP" or "top1": percent}}, "task", "train clips",
    "test clips", "label_csv", "options"}.
    """
    kinds, features = tuple(kinds), tuple(features)
    for name, values, valid in (("kind", kinds, KINDS), ("features", features, FEATURES)):
        if not values or any(v not in valid for v in values):
            raise ValueError(f"probe {name} {list(values)}: choose from {', '.join(valid)}")
    model = load_model(checkpoint, map_location=device)
    cfg = Config.from_dict(model.cfg.to_dict())
    manifest = next((s for s in (train, test) if isinstance(s, (str, Path))), None)
    if manifest is not None:  # both splits read one label CSV, so class indices agree
        from .dataset import label_csv_for

        label_csv = Path(label_csv) if label_csv else label_csv_for(cfg, manifest)
        cfg.data.label_csv = str(label_csv) if label_csv else ""
    ckpt_id = checkpoint_identity(checkpoint)
    emb = {}
    for split, source in (("train", train), ("test", test)):
        dataset = probe_dataset(source, cfg, label_csv)
        folder = (Path(cache_dir) if cache_dir else default_cache_dir(source, cfg)) if cache else None
        emb[split] = frozen_features(model, dataset, folder, ckpt_id, batch_size, progress)
    train_y, test_y, multilabel = probe_targets(emb["train"].labels, emb["test"].labels)
    options = options or {}
    rows = {}
    for kind in kinds:
        for feat in features:
            rows[f"{kind} {feat}"] = PROBES[kind](probe_inputs(emb["train"], kind, feat), train_y,
                                                  probe_inputs(emb["test"], kind, feat), test_y,
                                                  multilabel=multilabel, **options.get(kind, {}))
    return {"rows": rows, "task": "multi-label (mAP)" if multilabel else "single-label (top-1)",
            "train clips": len(train_y), "test clips": len(test_y),
            "label_csv": str(label_csv) if label_csv else None, "options": options}
