"""Training and evaluation items from WebDataset shards (written by ``tgdp_core.shards``).

    data = ShardTrainSet(cfg.data.train_shards, cfg)        # what dataset.train_data(cfg) returns
    loader = shard_train_loader(data, cfg, start_step, rank, world)  # train.steps - start_step batches
    test = ShardEvalSet(cfg.data.test_shards, cfg)          # AVDataset(train=False)'s items

Training items are AVDataset's: {"fbank": (T, F), "frames": (3, S, S), "labels": (C,), "index": (),
"frame": ()}; "index" is the clip's position in the manifest the shards were written from. Per
sample only what the step uses is read and decoded: the JSON, the audio (or the stored fbank)
and the one frame of the step (its JPEG through simplejpeg); the fbank is computed for the
frame's segment alone (``media.fbank_segment``, equal to slicing the clip's fbank).

The order. Let W = max(1, data.workers) and S = ranks x W "slots", slot s = rank * W + w.
- Epoch e permutes the shards with (train.seed, e); slot s reads every S-th shard of that
  order, passes its samples through a shuffle window of data.shuffle_buffer samples (filled,
  permuted with (seed, e, s, window), emptied) and picks each sample's frame and augmentation
  seed with (seed, e, key). The order is a function of (seed, epoch) and the S slots.
- Each worker batches its own samples (batch train.batch_size / ranks); the DataLoader takes
  batches from its workers in turn, so step t of a rank comes from its worker t % W.
Exact:
- every sample of the shards is read exactly once per epoch over all ranks and workers
  (tests: 2 ranks x 2 workers cover every sample once);
- a run resumed at step t0 with the same ranks and workers sees the batches an uninterrupted
  run sees from t0 on: each slot skips whole shards by their counts in index.json, reads the
  samples of one shuffle window before its position (bytes only, no decoding) and goes on.
Approximate:
- epochs end per slot: shards of unequal size (the last one) or a shard count not divisible by
  S give slots shares that differ by up to a shard, so at a given step slots can be in
  different epochs;
- mixing reaches one window: a batch holds samples of data.shuffle_buffer consecutive samples
  of one slot's shards (the writer shuffles the clips, so a shard is a random sample already);
- with data.on_error=skip a skipped sample moves every later sample of its slot one place
  earlier, and a resumed run may repeat or miss as many samples as were skipped before t0;
- resuming with other ranks or workers changes the split: the run goes on from step t0 with
  each new slot's share of t0 * batch samples skipped, so samples of that epoch can repeat or
  be missed.
At least S shards are needed (an error says so).

Bad input (a truncated shard, a sample without its audio or a frame, a JSON that does not
parse, a member that does not decode): with data.on_error=raise a ShardError naming the shard
and the sample's key; with skip the sample (for a truncated shard, the rest of the shard) is
left out and logged with a running count on the ``tgdp_core.shardset`` logger, and, when the
set has a ``skip_log`` (the trainer sets ``out_dir/skipped.csv``), appended there as a row
(video_id, reason): one row per skip, so a sample bad in every epoch is listed once per epoch.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import tarfile
import zlib
from itertools import count, islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; rows from several workers may interleave
    fcntl = None

from . import media
from .config import Config
from .dataset import random_resized_crop_flip, read_label_csv, segment_bounds
from .shards import AUDIO_FORMATS, ShardSource, fbank_settings, frame_member, open_shards

log = logging.getLogger(__name__)


class ShardError(ValueError):
    """A shard or one of its samples cannot be used; the message names the shard and the key."""


def _seed(*parts: int) -> int:
    """One 63-bit seed from integers (seed, epoch, slot, ...), the same in every process."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return value


def _key_hash(key: str) -> int:
    return zlib.crc32(key.encode())


SKIP_HEADER = ["video_id", "reason"]  # trainer.report_skipped writes a manifest's skips in the same columns


def append_skip(path: Path, key: str, reason: str) -> None:
    """One (video_id, reason) row appended to ``path`` (the header first if the file is new).
    Loader workers and ranks append to one file: an exclusive lock keeps rows whole and the header first."""
    row = io.StringIO()
    csv.writer(row, lineterminator="\n").writerow([key, reason])
    with open(path, "a", encoding="utf-8") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.fstat(f.fileno()).st_size == 0:
                f.write(",".join(SKIP_HEADER) + "\n")
            f.write(row.getvalue())
            f.flush()
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------- reading one shard
class ShardReader:
    """Raw samples of shards ({"__key__", suffix: bytes, "__shard__"}) with only the wanted members
    read, every sample checked for its JSON, audio and frames; errors per data.on_error."""

    def __init__(self, source: ShardSource, cfg: Config, use_fbank: bool, skip_log: Path | None = None):
        self.source, self.on_error = source, cfg.data.on_error
        self.frames = cfg.data.frames_per_clip
        self.audio = source.settings["audio_format"]
        self.use_fbank = use_fbank
        self.skipped = 0
        self.skip_log = skip_log

    def skip_or_raise(self, shard: Path, key: str, reason: str, lost: int = 1) -> None:
        message = f"shard {shard}, sample {key}: {reason}"
        if self.on_error == "raise":
            raise ShardError(message + " (set data.on_error=skip to leave such samples out)")
        self.skipped += lost
        log.warning("%s; skipped (%d sample(s) skipped so far in this process)", message, self.skipped)
        if self.skip_log is not None:
            append_skip(self.skip_log, key, f"shard {shard}: {reason}" + (f" ({lost} samples lost)" if lost > 1 else ""))

    def read(self, shard: Path, expected: int, wanted, skip: int = 0) -> Iterator[dict]:
        """The shard's samples from its ``skip``-th on; ``wanted(key, suffix)`` picks the members
        whose bytes are read (the others are passed over; a sample with none is not yielded)."""
        members: dict[str, set[str]] = {}  # every member name of the samples not yet yielded
        ordinal: dict[str, int] = {}  # each key's place in the shard

        def select(fname: str) -> bool:
            key, suffix = base_plus_ext(fname)
            if key is None:
                return False
            ordinal.setdefault(key, len(ordinal))
            members.setdefault(key, set()).add(suffix)
            return ordinal[key] >= skip and wanted(key, suffix)

        pending = None  # the last sample is checked once the tar is known to be whole
        try:
            with open(shard, "rb") as stream:
                files = tar_file_expander([{"url": str(shard), "stream": stream}], select_files=select)
                for sample in group_by_keys(files):
                    if pending is not None:
                        yield from self._checked(shard, pending, members)
                    pending = sample
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            if isinstance(err, ShardError):
                raise
            if pending is not None:  # complete: the error came with a later sample
                yield from self._checked(shard, pending, members)
            self.skip_or_raise(shard, next(reversed(ordinal), "(its first sample)"),
                               f"unreadable or truncated tar ({type(err).__name__}: {err})",
                               lost=max(1, expected - max(0, len(ordinal) - 1)))
            return
        short = len(ordinal) < expected
        if pending is not None and not (short and self._check(members.get(pending["__key__"], set()))):
            yield from self._checked(shard, pending, members)
            pending = None
        if short:  # the tar ends early: cut at a member's end (its last sample, if incomplete, is lost too)
            where = pending["__key__"] if pending is not None else f"after {next(reversed(ordinal), '(none)')}"
            self.skip_or_raise(shard, where, f"the tar ends after {len(ordinal)} of the {expected} samples "
                               "index.json lists (truncated)", lost=expected - len(ordinal) + (pending is not None))

    def _checked(self, shard: Path, sample: dict, members: dict[str, set[str]]) -> Iterator[dict]:
        problem = self._check(members.pop(sample["__key__"], set()))
        if problem:
            self.skip_or_raise(shard, sample["__key__"], problem)
        else:
            yield {**sample, "__shard__": shard}

    def _check(self, suffixes: set[str]) -> str:
        """What a sample lacks ("" if nothing)."""
        missing = [frame_member(i) for i in range(self.frames) if frame_member(i) not in suffixes]
        if "json" not in suffixes:
            return "no JSON member"
        if not (self.use_fbank and "fbank.npy" in suffixes) and self.audio not in suffixes:
            return f"no audio member ({self.audio})"
        if missing:
            return f"missing frame member(s) {', '.join(missing)}"
        return ""


def _meta(sample: dict) -> dict[str, Any]:
    """The sample's JSON; ValueError when it does not parse or lacks video_id and position."""
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"the JSON member does not parse ({err})") from None
    if not isinstance(meta, dict) or not {"video_id", "position"} <= set(meta):
        raise ValueError("the JSON member lacks video_id or position")
    return meta


# ---------------------------------------------------------------------- shared decoding
class _Decoder:
    """Audio features, frames and labels of raw samples, at the run's settings."""

    def __init__(self, source: ShardSource, cfg: Config):
        d = cfg.data
        self.cfg, self.source = cfg, source
        settings = source.settings
        if settings["frames_per_clip"] != d.frames_per_clip:
            raise ValueError(f"{source.folder}: shards hold {settings['frames_per_clip']} frames per clip, the "
                             f"config data.frames_per_clip={d.frames_per_clip}")
        self.use_fbank = settings["fbank"] == fbank_settings(cfg)
        if settings["fbank"] and not self.use_fbank:
            log.warning("%s: the stored fbank was made with %s, this run uses %s: computing it from the audio",
                        source.folder, settings["fbank"], fbank_settings(cfg))
        self.audio = settings["audio_format"]
        if self.audio not in AUDIO_FORMATS:
            raise ValueError(f"{source.folder}: audio format {self.audio!r} in index.json is not one of "
                             f"{', '.join(AUDIO_FORMATS)}")
        label_csv = Path(d.label_csv) if d.label_csv else source.label_csv
        self.label_index = read_label_csv(label_csv)[0] if label_csv else None
        self.classes = max(self.label_index.values()) + 1 if self.label_index else 0

    def labels(self, mids: list[str]) -> torch.Tensor:
        """(C,) multi-hot; C = 0 without a label CSV."""
        out = torch.zeros(self.classes)
        for mid in mids if self.label_index else ():
            if mid not in self.label_index:
                raise ValueError(f"label {mid!r} is not in the label CSV")
            out[self.label_index[mid]] = 1
        return out

    def clip_fbank(self, sample: dict, start: int = 0, length: int | None = None) -> torch.Tensor:
        """(length, F) float32 rows [start, start + length) of the clip's normalised fbank."""
        d, m = self.cfg.data, self.cfg.model
        length = d.clip_frames - start if length is None else length
        where = f"member {sample['__key__']}"
        if self.use_fbank:
            array = np.load(io.BytesIO(sample["fbank.npy"]), allow_pickle=False)
            if array.shape != (d.clip_frames, m.mel_bins):
                raise ValueError(f"{where}.fbank.npy has shape {array.shape}, expected {(d.clip_frames, m.mel_bins)}")
            return torch.from_numpy(array[start:start + length].astype(np.float32))
        wave = media.decode_audio(sample[self.audio], d.sample_rate, name=f"{where}.{self.audio}")
        return media.fbank_segment(wave, start, length, d.sample_rate, m.mel_bins, d.clip_frames,
                                   mean=d.fbank_mean, std=d.fbank_std)

    def frame(self, sample: dict, i: int) -> np.ndarray:
        where = f"member {sample['__key__']}.{frame_member(i)}"
        return media.decode_frame(sample[frame_member(i)], self.cfg.model.image_size, name=where)

    def wanted(self, suffix: str) -> bool:
        """Members every item needs: the JSON and the audio features."""
        return suffix == "json" or suffix == ("fbank.npy" if self.use_fbank else self.audio)


# ---------------------------------------------------------------------- training
class ShardTrainSet(IterableDataset):
    """Training items from shards (module docstring: the order, what is exact and what approximate).

    Build the loader with ``shard_train_loader``; iterating the set itself gives the samples of
    one process (rank 0 of 1, one worker) from step 0 on, without end.
    """

    def __init__(self, source: str | ShardSource, cfg: Config):
        self.source = open_shards(source) if not isinstance(source, ShardSource) else source
        self.cfg = cfg
        self.decoder = _Decoder(self.source, cfg)
        self.window = cfg.data.shuffle_buffer
        self.plan = {"start_step": 0, "total_steps": None, "rank": 0, "world": 1, "workers": 1, "batch": 1}
        self.skip_log: Path | None = None  # where skipped samples are listed (trainer: out_dir/skipped.csv)

    def __len__(self) -> int:
        """Samples this set yields: a rank's share of the run's steps after ``for_run``; before, one
        epoch's samples over all ranks."""
        p = self.plan
        if p["total_steps"] is None:
            return self.source.samples
        return max(0, p["total_steps"] - p["start_step"]) * p["batch"]

    def for_run(self, start_step: int, total_steps: int, rank: int, world: int, workers: int,
                batch: int) -> "ShardTrainSet":
        """A copy that yields this rank's samples for steps start_step .. total_steps - 1."""
        if len(self.source.shards) < world * workers:
            raise ValueError(f"{self.source.folder}: {len(self.source.shards)} shards cannot feed {world} rank(s) x "
                             f"{workers} worker(s); write smaller shards (--shard-size) or use fewer data.workers")
        out = object.__new__(ShardTrainSet)
        out.__dict__.update(self.__dict__)
        out.plan = {"start_step": start_step, "total_steps": total_steps, "rank": rank, "world": world,
                    "workers": workers, "batch": batch}
        return out

    def slot_shards(self, epoch: int, slot: int, slots: int) -> list[int]:
        """Indices of the shards slot ``slot`` of ``slots`` reads in ``epoch``, in order."""
        g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, epoch, 17))
        return torch.randperm(len(self.source.shards), generator=g).tolist()[slot::slots]

    def frame_and_seed(self, key: str, epoch: int) -> tuple[int, int]:
        """The frame a sample shows in ``epoch`` and its augmentation seed."""
        g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, epoch, _key_hash(key), 29))
        frame = int(torch.randint(0, self.cfg.data.frames_per_clip, (), generator=g))
        return frame, int(torch.randint(0, 2**31 - 1, (), generator=g))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        p = self.plan
        info = get_worker_info()
        worker = info.id if info else 0
        if (info.num_workers if info else 1) != p["workers"]:
            raise RuntimeError(f"built for {p['workers']} loader workers, run by {info.num_workers if info else 1}: "
                               "use shard_train_loader")
        logical = (p["start_step"] + worker) % p["workers"]  # the worker that owned these steps from step 0
        first = (p["start_step"] + worker) // p["workers"]  # ... and how many batches it has made by then
        slot, slots = p["rank"] * p["workers"] + logical, p["world"] * p["workers"]
        samples = self._stream(slot, slots, skip=first * p["batch"])
        if p["total_steps"] is None:
            yield from samples
            return
        batches = len(range(p["start_step"] + worker, p["total_steps"], p["workers"]))
        yield from islice(samples, batches * p["batch"])

    def _stream(self, slot: int, slots: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """The slot's decoded samples over epochs 0, 1, ..., from its ``skip``-th sample on."""
        reader = ShardReader(self.source, self.cfg, self.decoder.use_fbank, self.skip_log)
        for epoch in count():
            shards = self.slot_shards(epoch, slot, slots)
            total = sum(self.source.shards[i].samples for i in shards)
            if skip >= total:
                skip -= total
                continue
            produced = 0
            for raw in self._epoch(reader, epoch, slot, shards, skip):
                item = self._item(reader, raw, epoch)
                if item is not None:
                    produced += 1
                    yield item
            if not produced and not skip:
                raise ShardError(f"{self.source.folder}: no usable sample in epoch {epoch} of slot {slot} "
                                 f"(shards {[self.source.shards[i].path.name for i in shards]})")
            skip = 0

    def _epoch(self, reader: ShardReader, epoch: int, slot: int, shards: list[int], skip: int) -> Iterator[dict]:
        """Raw samples of one epoch of a slot, through the shuffle window, from output ``skip`` on."""
        first_window = skip // self.window
        raw = self._raw(reader, epoch, shards, start=first_window * self.window)
        for w in count(first_window):
            window = list(islice(raw, self.window))
            if not window:
                return
            g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, epoch, slot, w, 31))
            order = torch.randperm(len(window), generator=g).tolist()
            begin = skip - w * self.window if w == first_window else 0
            for j in order[begin:]:
                yield window[j]

    def _raw(self, reader: ShardReader, epoch: int, shards: list[int], start: int) -> Iterator[dict]:
        """Raw samples of the epoch's shards from input position ``start`` (whole shards before it unread)."""
        frames: dict[str, str] = {}

        def wanted(key: str, suffix: str) -> bool:
            if key not in frames:
                frames.clear()  # one sample at a time: keys of the shard go by in order
                frames[key] = frame_member(self.frame_and_seed(key, epoch)[0])
            return self.decoder.wanted(suffix) or suffix == frames[key]

        for i in shards:
            shard = self.source.shards[i]
            if start >= shard.samples:
                start -= shard.samples
                continue
            yield from reader.read(shard.path, shard.samples, wanted, skip=start)
            start = 0

    def _item(self, reader: ShardReader, raw: dict, epoch: int) -> dict[str, torch.Tensor] | None:
        """The training item of a raw sample, or None when it is skipped (data.on_error=skip)."""
        d, T = self.cfg.data, self.cfg.model.audio_frames
        key = raw["__key__"]
        frame, seed = self.frame_and_seed(key, epoch)
        start, end = segment_bounds(frame, d.frames_per_clip, d.clip_frames, T)
        try:
            meta = _meta(raw)
            fbank = self.decoder.clip_fbank(raw, start, end - start)
            image = torch.from_numpy(self.decoder.frame(raw, frame))  # (S, S, 3) uint8
            labels = self.decoder.labels(meta.get("labels", []))
        except (ValueError, KeyError) as err:  # MediaError and ShardError are ValueErrors
            reader.skip_or_raise(raw["__shard__"], key, str(err))
            return None
        if d.visual_augment:
            image = random_resized_crop_flip(image, torch.Generator().manual_seed(seed))
        return {"fbank": fbank, "frames": media.normalize_frames(image), "labels": labels,
                "index": torch.tensor(int(meta.get("position", -1))), "frame": torch.tensor(frame)}


def shard_train_loader(data: ShardTrainSet, cfg: Config, start_step: int = 0, rank: int = 0,
                       world: int = 1) -> DataLoader:
    """Batches of this rank for steps start_step .. train.steps - 1 (``dataset.train_loader``'s contract)."""
    if cfg.train.batch_size % world:
        raise ValueError(f"global batch {cfg.train.batch_size} is not divisible by {world} ranks")
    batch = cfg.train.batch_size // world
    workers = cfg.data.workers
    run = data.for_run(start_step, cfg.train.steps, rank, world, max(1, workers), batch)
    return DataLoader(run, batch_size=batch, num_workers=workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())


# ---------------------------------------------------------------------- evaluation
class ShardEvalSet(IterableDataset):
    """Evaluation items from shards, as AVDataset(train=False) gives them:
    {"fbank": (K, T, F), "frames": (K, 3, S, S), "labels": (C,), "frame_labels": (K,), "index": ()}.

    Every frame with its segment; the fbank is computed (or loaded) once per clip and sliced.
    ``positions`` (manifest positions) restricts the set; ``video_ids`` and ``positions`` list
    the clips in the order they come (shard order). Read in one process: a loader's workers
    would each read every shard.
    """

    def __init__(self, source: str | ShardSource, cfg: Config, positions: list[int] | None = None):
        self.source = open_shards(source) if not isinstance(source, ShardSource) else source
        self.cfg = cfg
        self.decoder = _Decoder(self.source, cfg)
        all_clips = self.source.clips()
        keep = set(positions) if positions is not None else None
        self.entries = [c for c in all_clips if keep is None or c["position"] in keep]
        self.video_ids = [c["video_id"] for c in self.entries]
        self.positions = [c["position"] for c in self.entries]
        self.skipped: dict[str, str] = {}

    def manifest_order(self) -> list[tuple[int, str, tuple[str, ...]]]:
        """(position, video id, labels) of the set's clips, in manifest order."""
        return sorted((c["position"], c["video_id"], tuple(c["labels"])) for c in self.entries)

    def subset(self, positions: list[int]) -> "ShardEvalSet":
        out = object.__new__(ShardEvalSet)
        out.__dict__.update(self.__dict__)
        keep = set(positions)
        out.entries = [c for c in self.entries if c["position"] in keep]
        out.video_ids = [c["video_id"] for c in out.entries]
        out.positions = [c["position"] for c in out.entries]
        return out

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError("ShardEvalSet reads its shards in one process: use a loader with workers=0 or 1")
        reader = ShardReader(self.source, self.cfg, self.decoder.use_fbank)
        wanted_keys: dict[Path, set[str]] = {}
        for c in self.entries:
            wanted_keys.setdefault(c["shard"], set()).add(c["key"])
        for shard in self.source.shards:
            if shard.path not in wanted_keys:
                continue
            keys = wanted_keys[shard.path]
            for raw in reader.read(shard.path, shard.samples, lambda key, suffix: key in keys):
                if raw["__key__"] in keys:
                    item = self._item(reader, raw)
                    if item is not None:
                        yield item

    def _item(self, reader: ShardReader, raw: dict) -> dict[str, torch.Tensor] | None:
        d, T = self.cfg.data, self.cfg.model.audio_frames
        K = d.frames_per_clip
        try:
            meta = _meta(raw)
            fbank = self.decoder.clip_fbank(raw)  # (clip_frames, F), once per clip
            frames = np.stack([self.decoder.frame(raw, i) for i in range(K)])  # (K, S, S, 3)
            labels = self.decoder.labels(meta.get("labels", []))
            frame_labels = self._frame_labels(meta.get("frame_labels", []))
        except (ValueError, KeyError) as err:
            reader.skip_or_raise(raw["__shard__"], raw["__key__"], str(err))
            self.skipped[raw["__key__"]] = str(err)
            return None
        bounds = [segment_bounds(i, K, d.clip_frames, T) for i in range(K)]
        return {"fbank": torch.stack([fbank[s:e] for s, e in bounds]), "frames": media.normalize_frames(frames),
                "labels": labels, "frame_labels": frame_labels, "index": torch.tensor(int(meta["position"]))}

    def _frame_labels(self, mids: list[str]) -> torch.Tensor:
        K = self.cfg.data.frames_per_clip
        if not mids or not self.decoder.label_index:
            return torch.full((K,), -1, dtype=torch.long)
        if len(mids) != K or any(mid not in self.decoder.label_index for mid in mids):
            raise ValueError(f"frame_labels {mids} are not {K} labels of the label CSV")
        return torch.tensor([self.decoder.label_index[mid] for mid in mids])
