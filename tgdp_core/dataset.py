"""Manifest datasets, frame/segment alignment, the feature cache and the loaders.

A clip of a CAV-MAE manifest has one wav and ``frames_per_clip`` frames
(``video_path/frame_{i}/{video_id}.jpg``). Sync and TG-DP train on one frame per clip and step,
paired with the fbank segment centred on it (docs/method.md, "Inputs"): frame i sits at fbank frame
``round(i * clip_frames / frames_per_clip)`` and its segment is ``audio_frames`` long, shifted
back to fit inside the clip. Evaluation uses every frame with its segment.

The feature cache computes each clip's normalised fbank (float16) and resized frames (uint8)
once and memory-maps them, so a training step reads a few kilobytes instead of decoding a wav
and a JPEG; it is keyed by the manifest's content and the settings that shape the features.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import media
from .config import Config
from .folders import check_writable

CACHE_VERSION = 1


# ---------------------------------------------------------------------- manifests and labels
@dataclass(frozen=True)
class Clip:
    video_id: str
    wav: str
    video_path: str  # frame root: frames are video_path/frame_{i}/{video_id}.jpg
    labels: tuple[str, ...]  # label mids
    frame_labels: tuple[str, ...] = ()  # optional: the label mid each frame shows (one per frame)

    def frame_path(self, i: int) -> str:
        return os.path.join(self.video_path, f"frame_{i}", f"{self.video_id}.jpg")


MANIFEST_SHAPE = '{"data": [{"video_id": ..., "wav": ..., "video_path": ..., "labels": ...}, ...]}'


def read_manifest(path: str | Path) -> list[Clip]:
    """Clips of a CAV-MAE manifest JSON; a malformed file or entry raises naming both."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest (make one with `python -m tgdp_core prepare VIDEOS OUT`)")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a CAV-MAE manifest ({MANIFEST_SHAPE} expected): {err}") from err
    entries = document.get("data") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        found = f"its \"data\" is {type(entries).__name__}" if isinstance(document, dict) and "data" in document \
            else f"it holds {type(document).__name__} {_brief(document)}"
        raise ValueError(f"{path}: not a CAV-MAE manifest: expected {MANIFEST_SHAPE}, a list of clip objects, "
                         f"but {found}")
    clips = []
    for n, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: entry {n} is {type(e).__name__} {_brief(e)}, not an object with video_id, "
                             f"wav, video_path ({MANIFEST_SHAPE})")
        missing = [k for k in ("video_id", "wav", "video_path") if k not in e]
        if missing:
            raise ValueError(f"{path}: entry {n} lacks {', '.join(missing)}")
        labels = tuple(s.strip() for s in str(e.get("labels", "")).split(",") if s.strip())
        frame_labels = tuple(s.strip() for s in str(e.get("frame_labels", "")).split(",") if s.strip())
        clips.append(Clip(str(e["video_id"]), str(e["wav"]), str(e["video_path"]), labels, frame_labels))
    if not clips:
        raise ValueError(f"{path}: the manifest holds no clips")
    return clips


def _brief(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_label_csv(path: str | Path) -> tuple[dict[str, int], list[str]]:
    """(mid -> index, display names by index) from an ``index,mid,display_name`` CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with columns index,mid,display_name")
    index = {r["mid"]: int(r["index"]) for r in rows}
    names = [""] * (max(index.values()) + 1)
    for r in rows:
        names[int(r["index"])] = r["display_name"]
    return index, names


def label_csv_for(cfg: Config, manifest: str | Path) -> Path | None:
    """The configured label CSV, else ``labels.csv`` beside the manifest (in the folder of shards), else None."""
    if cfg.data.label_csv:
        return Path(cfg.data.label_csv)
    from .shards import is_shard_spec, open_shards

    if is_shard_spec(manifest):
        return open_shards(manifest).label_csv
    beside = Path(manifest).parent / "labels.csv"
    return beside if beside.exists() else None


def frame_label_ids(clips: list[Clip], label_index: dict[str, int] | None, frames: int) -> torch.Tensor:
    """(N, K) class index of each frame from the manifests' optional ``frame_labels``; -1 where absent."""
    out = torch.full((len(clips), frames), -1, dtype=torch.long)
    if label_index is None:
        return out
    for n, clip in enumerate(clips):
        if clip.frame_labels:
            if len(clip.frame_labels) != frames:
                raise ValueError(f"clip {clip.video_id}: {len(clip.frame_labels)} frame_labels for {frames} frames")
            out[n] = torch.tensor([label_index[mid] for mid in clip.frame_labels])
    return out


def multi_hot(clips: list[Clip], label_index: dict[str, int] | None) -> torch.Tensor:
    """(N, C) float multi-hot labels; (N, 0) without a label CSV."""
    if label_index is None:
        return torch.zeros(len(clips), 0)
    out = torch.zeros(len(clips), max(label_index.values()) + 1)
    for n, clip in enumerate(clips):
        for mid in clip.labels:
            if mid not in label_index:
                raise ValueError(f"clip {clip.video_id}: label {mid!r} is not in the label CSV")
            out[n, label_index[mid]] = 1
    return out


# ---------------------------------------------------------------------- alignment
def segment_bounds(frame: int, frames_per_clip: int, clip_frames: int, segment_frames: int) -> tuple[int, int]:
    """[start, end) fbank frames of the segment aligned to video frame ``frame``.

    Centred at round(frame * clip_frames / frames_per_clip), shifted back to fit the clip.
    """
    centre = int(round(frame * clip_frames / frames_per_clip))
    start = max(0, centre - segment_frames // 2)
    end = start + segment_frames
    if end > clip_frames:
        end = clip_frames
        start = max(0, end - segment_frames)
    return start, end


# ---------------------------------------------------------------------- clip decoding
class ClipReader:
    """Decodes one clip into model-ready arrays: fbank (clip_frames, F) and frames (K, S, S, 3) uint8."""

    def __init__(self, cfg: Config):
        self.d, self.m = cfg.data, cfg.model

    def fbank(self, clip: Clip) -> torch.Tensor:
        return self.fbank_segment(clip, 0, self.d.clip_frames)

    def fbank_segment(self, clip: Clip, start: int, length: int) -> torch.Tensor:
        """Rows [start, start + length) of the clip's fbank, computing only those (media.fbank_segment)."""
        wave = media.read_audio(clip.wav, self.d.sample_rate)  # refuses absurd sample values
        features = media.fbank_segment(wave, start, length, self.d.sample_rate, self.m.mel_bins, self.d.clip_frames,
                                       mean=self.d.fbank_mean, std=self.d.fbank_std)
        if not torch.isfinite(features).all():  # would train to NaN at the first step (issue 17)
            raise media.MediaError(clip.wav, "its fbank holds NaN or infinite values")
        return features

    def frame(self, clip: Clip, i: int) -> np.ndarray:
        return media.load_frame(clip.frame_path(i), self.m.image_size)

    def frames(self, clip: Clip) -> np.ndarray:
        return np.stack([self.frame(clip, i) for i in range(self.d.frames_per_clip)])


def check_layout(clips: list[Clip], cfg: Config, manifest: str | Path) -> None:
    """Compare the first clip's files with what ``cfg.data`` reads (issue 17): fewer frames per
    clip than ``frames_per_clip`` is an error giving both counts and the fix; more frames, or
    more audio than ``clip_frames`` holds, is a warning saying what is used."""
    d, clip = cfg.data, clips[0]
    have = 0
    while have <= d.frames_per_clip and os.path.isfile(clip.frame_path(have)):
        have += 1
    folder = Path(clip.video_path)
    if 0 < have < d.frames_per_clip and not (folder / f"frame_{have}").is_dir():
        raise ValueError(f"{manifest}: the data has {have} frames per clip (frame_0 .. frame_{have - 1} in {folder}), "
                         f"the config reads {d.frames_per_clip} (data.frames_per_clip): set "
                         f"--data.frames_per_clip={have}, or prepare the videos with --num-frames {d.frames_per_clip}")
    if have > d.frames_per_clip:
        warnings.warn(f"{manifest}: the data has more than {d.frames_per_clip} frames per clip; only frame_0 .. "
                      f"frame_{d.frames_per_clip - 1} are used (data.frames_per_clip={d.frames_per_clip})", stacklevel=3)
    try:
        info = sf.info(clip.wav)
    except (sf.SoundFileError, RuntimeError, OSError):
        return  # the cache build reports the file
    available = media.fbank_frame_count(round(info.frames / info.samplerate * d.sample_rate), d.sample_rate)
    if available > d.clip_frames:
        warnings.warn(f"{manifest}: {clip.wav} holds {info.frames / info.samplerate:.2f} s of audio; only the first "
                      f"{d.clip_frames * media.FRAME_SHIFT_MS / 1000:.2f} s are used (data.clip_frames={d.clip_frames}; "
                      f"{available} would hold it all)", stacklevel=3)


# ---------------------------------------------------------------------- feature cache
class FeatureCache:
    """Memory-mapped fbanks (N, clip_frames, F) float16 and frames (N, K, S, S, 3) uint8."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.fbank = np.load(folder / "fbank.npy", mmap_mode="r")
        self.frames = np.load(folder / "frames.npy", mmap_mode="r")
        self.failed: dict[int, str] = {int(k): v for k, v in self.meta["failed"].items()}

    @staticmethod
    def key(clips: list[Clip], cfg: Config) -> str:
        """Hash of the clips, their files' sizes and modification times, and every setting that
        shapes the cached arrays: a regenerated or edited file gets a fresh cache."""
        d, m = cfg.data, cfg.model
        settings = [CACHE_VERSION, d.sample_rate, d.clip_frames, d.frames_per_clip, d.fbank_mean, d.fbank_std,
                    m.mel_bins, m.image_size]
        digest = hashlib.sha256(json.dumps(settings).encode())
        for c in clips:
            digest.update(f"{c.video_id}\0{c.wav}\0{c.video_path}\n".encode())
            for path in (c.wav, *(c.frame_path(i) for i in range(d.frames_per_clip))):
                try:
                    st = os.stat(path)
                    digest.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
                except OSError:
                    digest.update(b"missing\n")  # the build reports it (or skips the clip)
        return digest.hexdigest()[:16]

    @classmethod
    def open_or_build(cls, clips: list[Clip], cfg: Config, folder: str | Path, desc: str = "caching") -> "FeatureCache":
        folder = Path(folder) / cls.key(clips, cfg)
        if not (folder / "meta.json").exists():
            check_writable(folder.parent, "set data.cache_dir to a writable folder (--data.cache_dir=DIR), "
                                          "or data.cache=false")
            cls._build(clips, cfg, folder, desc)
        return cls(folder)

    @staticmethod
    def _build(clips: list[Clip], cfg: Config, folder: Path, desc: str) -> None:
        d, m = cfg.data, cfg.model
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        S = m.image_size
        fb = np.lib.format.open_memmap(tmp / "fbank.npy", "w+", np.float16, (len(clips), d.clip_frames, m.mel_bins))
        fr = np.lib.format.open_memmap(tmp / "frames.npy", "w+", np.uint8, (len(clips), d.frames_per_clip, S, S, 3))
        failed: dict[int, str] = {}
        loader = DataLoader(_DecodeAll(clips, ClipReader(cfg)), batch_size=None, num_workers=d.workers,
                            shuffle=False, persistent_workers=False)
        for n, (fbank, frames, error) in enumerate(tqdm(loader, total=len(clips), desc=desc, unit="clip")):
            if error:
                if d.on_error == "raise":
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise media.MediaError(error + " (set data.on_error=skip to leave such clips out)")
                failed[n] = error
                continue
            fb[n] = fbank.numpy()
            fr[n] = frames
        fb.flush()
        fr.flush()
        del fb, fr
        meta = {"version": CACHE_VERSION, "clips": len(clips), "failed": {str(k): v for k, v in failed.items()},
                "settings": cfg.data.__dict__ | {"mel_bins": m.mel_bins, "image_size": S}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, folder)  # atomic: a half-built cache is never found under the key
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)


class _DecodeAll(Dataset):
    def __init__(self, clips: list[Clip], reader: ClipReader):
        self.clips, self.reader = clips, reader

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, n: int):
        try:
            return self.reader.fbank(self.clips[n]).half(), self.reader.frames(self.clips[n]), ""
        except (media.MediaError, OSError, ValueError) as err:
            return torch.zeros(0), np.zeros(0, np.uint8), f"{self.clips[n].video_id}: {err}"


# ---------------------------------------------------------------------- datasets
class AVDataset(Dataset):
    """Clips of one manifest as model inputs.

    Training items are ``(clip, frame, seed)`` triples from ``StepSampler`` and give
        {"fbank": (T, F), "frames": (3, S, S), "labels": (C,), "index": (), "frame": ()};
    evaluation items are clip indices and give every frame with its segment,
        {"fbank": (K, T, F), "frames": (K, 3, S, S), "labels": (C,), "frame_labels": (K,), "index": ()}.
    """

    def __init__(self, manifest: str | Path, cfg: Config, train: bool, cache_dir: str | Path | None = None):
        self.cfg, self.train = cfg, train
        self.clips = read_manifest(manifest)
        check_layout(self.clips, cfg, manifest)
        label_csv = label_csv_for(cfg, manifest)
        self.label_index, self.label_names = read_label_csv(label_csv) if label_csv else (None, [])
        self.labels = multi_hot(self.clips, self.label_index)
        self.frame_labels = frame_label_ids(self.clips, self.label_index, cfg.data.frames_per_clip)
        self.reader = ClipReader(cfg)
        self.cache = None
        if cfg.data.cache:
            folder = cache_dir or cfg.data.cache_dir or Path(manifest).parent / ".tgdp_cache"
            self.cache = FeatureCache.open_or_build(self.clips, cfg, folder, desc=f"caching {Path(manifest).name}")
        failed = self.cache.failed if self.cache else {}
        self.valid = [n for n in range(len(self.clips)) if n not in failed]
        self.skipped = {self.clips[n].video_id: reason.removeprefix(f"{self.clips[n].video_id}: ")
                        for n, reason in failed.items()}
        self._check_usable(manifest, failed)

    def _check_usable(self, manifest: str | Path, failed: dict[int, str]) -> None:
        """Clips the cache recorded as failed: an error under ``on_error=raise`` (the cache may
        have been built with ``skip``), a warning with the count under ``skip``; no usable clip
        at all is an error either way."""
        if failed and self.cfg.data.on_error == "raise":
            raise media.MediaError(f"{next(iter(failed.values()))} (recorded when the feature cache "
                                   f"{self.cache.folder} was built with data.on_error=skip; fix the file, or set "
                                   "data.on_error=skip to leave such clips out)")
        first = "; ".join(f"{vid}: {why}" for vid, why in list(self.skipped.items())[:3])
        if not self.valid:
            raise ValueError(f"{manifest}: no usable clips: all {len(self.clips)} were skipped (data.on_error=skip), "
                             f"e.g. {first}; fix the files or the manifest")
        if failed:
            warnings.warn(f"{manifest}: {len(failed)} of {len(self.clips)} clips were skipped (data.on_error=skip) "
                          f"and are left out, e.g. {first}", stacklevel=3)

    def __len__(self) -> int:
        return len(self.valid)

    def _fbank(self, n: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """(end - start, F) rows of clip n's fbank: read from the cache, or computed for those rows alone."""
        end = self.cfg.data.clip_frames if end is None else end
        if self.cache is not None:
            return torch.from_numpy(np.asarray(self.cache.fbank[n, start:end], dtype=np.float32))
        return self.reader.fbank_segment(self.clips[n], start, end - start)

    def _frame(self, n: int, i: int) -> np.ndarray:
        return np.asarray(self.cache.frames[n, i]) if self.cache is not None else self.reader.frame(self.clips[n], i)

    def __getitem__(self, item):
        d, T = self.cfg.data, self.cfg.model.audio_frames
        if self.train:
            pos, frame, seed = item
            n = self.valid[pos]
            start, end = segment_bounds(frame, d.frames_per_clip, d.clip_frames, T)
            image = torch.from_numpy(self._frame(n, frame).copy())  # (S, S, 3) uint8
            if d.visual_augment:
                image = random_resized_crop_flip(image, torch.Generator().manual_seed(seed))
            return {"fbank": self._fbank(n, start, end), "frames": media.normalize_frames(image),
                    "labels": self.labels[n], "index": torch.tensor(n), "frame": torch.tensor(frame)}
        n = self.valid[item]
        fbank = self._fbank(n)
        bounds = [segment_bounds(i, d.frames_per_clip, d.clip_frames, T) for i in range(d.frames_per_clip)]
        frames = np.stack([self._frame(n, i) for i in range(d.frames_per_clip)])
        return {"fbank": torch.stack([fbank[s:e] for s, e in bounds]),
                "frames": media.normalize_frames(torch.from_numpy(frames)),
                "labels": self.labels[n], "frame_labels": self.frame_labels[n], "index": torch.tensor(n)}


def random_resized_crop_flip(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(S, S, 3) uint8 -> same size: a random crop of 8-100 % area, aspect 0.9-1.1, resized back, 50 % flip."""
    S = image.shape[0]
    area = S * S * (0.08 + 0.92 * torch.rand((), generator=generator).item())
    aspect = float(np.exp(np.log(0.9) + (np.log(1.1) - np.log(0.9)) * torch.rand((), generator=generator).item()))
    h = min(S, max(1, int(round((area / aspect) ** 0.5))))
    w = min(S, max(1, int(round((area * aspect) ** 0.5))))
    top = int(torch.randint(0, S - h + 1, (), generator=generator))
    left = int(torch.randint(0, S - w + 1, (), generator=generator))
    crop = image[top:top + h, left:left + w].permute(2, 0, 1)[None].float()  # (1, 3, h, w)
    out = F.interpolate(crop, size=(S, S), mode="bicubic", align_corners=False)[0]
    if torch.rand((), generator=generator) < 0.5:
        out = out.flip(-1)
    return out.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


# ---------------------------------------------------------------------- sampling and loaders
class StepSampler(Sampler):
    """Batches of (clip, frame, seed) for steps ``start_step .. total_steps - 1``; a pure function of the step.

    The global batch of step s is a slice of the seeded permutation of its epoch, each sample
    with a random frame and an augmentation seed; rank r takes its contiguous share. Resuming
    at step s therefore sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, num_clips: int, frames_per_clip: int, global_batch: int, seed: int,
                 start_step: int, total_steps: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} ranks")
        if num_clips < 1:
            raise ValueError("the training set holds no usable clips")
        self.n, self.k, self.batch, self.seed = num_clips, frames_per_clip, global_batch, seed
        self.start, self.total, self.rank, self.world = start_step, total_steps, rank, world

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def _permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's clip order; the last one is kept, so a step costs no randperm of the corpus."""
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def batch_at(self, step: int) -> list[tuple[int, int, int]]:
        positions = range(step * self.batch, (step + 1) * self.batch)
        clips = self._clips(positions)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * step + 1)
        frames = torch.randint(0, self.k, (self.batch,), generator=g).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.batch,), generator=g).tolist()
        share = self.batch // self.world
        lo = self.rank * share
        return list(zip(clips[lo:lo + share], frames[lo:lo + share], seeds[lo:lo + share]))

    def _clips(self, positions: range) -> list[int]:
        return [self._permutation(p // self.n)[p % self.n] for p in positions]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start, self.total):
            yield self.batch_at(step)


def train_data(cfg: Config):
    """The training set ``cfg.data`` names: a ``shardset.ShardTrainSet`` for data.train_shards,
    else an ``AVDataset`` of data.train_manifest."""
    if cfg.data.train_shards:
        from .shardset import ShardTrainSet

        return ShardTrainSet(cfg.data.train_shards, cfg)
    return AVDataset(cfg.data.train_manifest, cfg, train=True)


def eval_data(source: str | Path, cfg: Config):
    """Evaluation items of a manifest or of shards (``shards.is_shard_spec``): every frame of each
    clip with its segment (``AVDataset(train=False)`` or ``shardset.ShardEvalSet``)."""
    from .shards import is_shard_spec

    if is_shard_spec(source):
        from .shardset import ShardEvalSet

        return ShardEvalSet(source, cfg)
    return AVDataset(source, cfg, train=False)


def train_loader(dataset, cfg: Config, start_step: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    """This rank's batches for steps start_step .. train.steps - 1, of an ``AVDataset`` (``StepSampler``)
    or of a ``ShardTrainSet`` (``shardset.shard_train_loader``)."""
    from .shardset import ShardTrainSet, shard_train_loader

    if isinstance(dataset, ShardTrainSet):
        return shard_train_loader(dataset, cfg, start_step, rank, world)
    sampler = StepSampler(len(dataset), cfg.data.frames_per_clip, cfg.train.batch_size, cfg.train.seed,
                          start_step, cfg.train.steps, rank, world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.workers,
                      persistent_workers=cfg.data.workers > 0, pin_memory=torch.cuda.is_available())


def eval_loader(dataset: AVDataset, batch_size: int = 16, workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


# ---------------------------------------------------------------------- choosing evaluation clips
def first_per_class(labels: list[tuple[str, ...]], per_class: int) -> list[int]:
    """Indices of the first ``per_class`` clips of each label, in the given (manifest) order: the
    union over labels, so a clip with several labels counts for each of them (VGGSound's clips
    have one: the official `vgg_partition_test_5_per_class` is the first 5 of each class)."""
    taken: dict[str, int] = {}
    chosen = []
    for n, clip_labels in enumerate(labels):
        wanted = [mid for mid in clip_labels if taken.get(mid, 0) < per_class]
        for mid in wanted:
            taken[mid] = taken.get(mid, 0) + 1
        if wanted:
            chosen.append(n)
    return chosen


def choose_clips(dataset, per_class: int = 0, max_clips: int = 0):
    """(the evaluation set restricted to the first ``per_class`` clips of each label, then to the
    first ``max_clips`` of those, in manifest order; the chosen clips' video ids). 0 = no limit.

    ``dataset``: an ``AVDataset(train=False)`` (-> a Subset of it) or a ``ShardEvalSet``.
    """
    from .shardset import ShardEvalSet

    if isinstance(dataset, ShardEvalSet):
        table = dataset.manifest_order()  # (position, video id, labels)
    else:
        table = [(i, dataset.clips[n].video_id, dataset.clips[n].labels) for i, n in enumerate(dataset.valid)]
    rows = list(range(len(table)))
    if per_class:
        rows = first_per_class([table[r][2] for r in rows], per_class)
    if max_clips:
        rows = rows[:max_clips]
    if not rows:
        raise ValueError(f"no clips chosen (per_class={per_class}, max_clips={max_clips}): do the clips carry labels?")
    ids = [table[r][1] for r in rows]
    if isinstance(dataset, ShardEvalSet):
        return dataset.subset([table[r][0] for r in rows]), ids
    return torch.utils.data.Subset(dataset, [table[r][0] for r in rows]), ids


def clip_ids(dataset, indices: torch.Tensor) -> list[str]:
    """The video ids of evaluation items by their "index" (a clip's manifest position)."""
    base = getattr(dataset, "dataset", dataset)  # a Subset's dataset
    from .shardset import ShardEvalSet

    if isinstance(base, ShardEvalSet):
        by_position = dict(zip(base.positions, base.video_ids))
        return [by_position[int(i)] for i in indices]
    return [base.clips[int(i)].video_id for i in indices]
