"""WebDataset shards of CAV-MAE clips: writing them (``shard``, ``prepare --shards``) and finding them.

    python -m tgdp_core shard MANIFEST OUT [--shard-size 1000] [--fbank] [--audio-format wav|flac]

OUT holds (written with webdataset's ``TarWriter``; one sample per clip):

    shard-000000.tar            --shard-size samples each, the last one fewer; members of a sample:
        KEY.json                {"video_id", "labels": [mid, ...], "position" (the clip's place in
                                the manifest), "num_frames", "sample_rate"; "frame_labels" when
                                the manifest has them}
        KEY.wav | KEY.flac      the clip's audio, 16 kHz (data.sample_rate) mono PCM16
        KEY.frame_00.jpg ...    the manifest's frames, their JPEG bytes as they are (other
        KEY.frame_15.jpg        image formats are converted to JPEG, quality 90)
        KEY.fbank.npy           with --fbank: the normalised fbank (clip_frames, mel_bins) float16
    shard-000000.clips.json     the shard's clips (key, video_id, labels, position): evaluation
                                chooses clips from these without reading the tars
    index.json                  format, settings, the shards with their sample counts and bytes;
                                "complete": false while writing
    labels.csv, rejects.csv     the manifest's label CSV (copied); path,reason of every clip left out

Against the official layout (``src/preprocess/wds_create.py`` in the first commit of
wanglg20/TG-DP: members ``VIDEO_ID/frame_00.jpg`` .. ``frame_15.jpg``, ``audio.wav``,
``meta.json``; 5,000 samples per tar; the clips shuffled with a fixed seed first):
- members are ``KEY.frame_00.jpg``, ``KEY.wav``, ``KEY.json``: WebDataset groups a tar's files
  into samples by the name up to the first dot of the base name, so the official names make
  every file a sample of its own (its loader, not released, grouped them otherwise). KEY is
  the video id with anything but ``[A-Za-z0-9_-]`` replaced by ``_`` and, where that changed
  it, 8 hex digits of its sha1 appended: AudioSet ids such as ``00W1lcxW-WU_40.000`` hold dots;
- 1,000 samples per shard (about 0.65 GB at ``base``) instead of 5,000: the loader splits
  shards over ranks x workers, and more shards split more evenly and resume faster;
- the JSON leaves out the writing machine's paths and adds the manifest position (the
  official protocol's "first K clips per class in manifest order" needs it);
- the audio may be FLAC (about half the bytes of speech-like audio, slower to decode) and the
  fbank may be stored, so a loader skips the filterbank.
The clips are shuffled (seed ``ORDER_SEED``) before sharding, as there: a shard is then a
random sample of the corpus, and a training batch drawn from a few shards is one too.

Writing resumes: each shard is written under a temporary name and renamed, then index.json
records it and how far through the shuffled clip order it reaches; a rerun continues after
the last recorded shard (rewriting, byte for byte, a shard renamed but not yet recorded).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import multiprocessing
import re
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf
import torch
import webdataset as wds
from tqdm.auto import tqdm
from webdataset.shardlists import expand_urls

from . import media
from .config import Config
from .dataset import Clip, label_csv_for, read_manifest

FORMAT = "tgdp-shards"
VERSION = 1
INDEX = "index.json"
DEFAULT_SHARD_SIZE = 1000
ORDER_SEED = 0  # the clip order's shuffle (the official writer fixes its seed too)
AUDIO_FORMATS = ("wav", "flac")
TAR_MTIME = 0  # fixed member times (an int: a float mtime makes tarfile add a PAX header to every member): the same clips give the same bytes (resume rewrites a shard identically)
SHOWN_REJECTS = 20


def shard_name(n: int) -> str:
    return f"shard-{n:06d}.tar"


def sample_key(video_id: str) -> str:
    """A WebDataset key for a video id: no dots or slashes (see the module docstring)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", video_id)
    return safe if safe == video_id else f"{safe}_{hashlib.sha1(video_id.encode()).hexdigest()[:8]}"


def frame_member(i: int) -> str:
    return f"frame_{i:02d}.jpg"


# ---------------------------------------------------------------------- one clip -> one sample
def fbank_settings(cfg: Config) -> dict[str, Any]:
    """The settings that shape a stored fbank; the loader uses it only when they equal its own."""
    d = cfg.data
    return {"sample_rate": d.sample_rate, "clip_frames": d.clip_frames, "mel_bins": cfg.model.mel_bins,
            "mean": d.fbank_mean, "std": d.fbank_std, "dtype": "float16"}


def encode_clip(clip: Clip, position: int, spec: dict[str, Any]) -> dict[str, bytes]:
    """One clip as a WebDataset sample ({"__key__", member suffix: bytes}).

    ``spec``: the index's settings. Raises MediaError naming the file that cannot be used.
    """
    rate, frames = spec["sample_rate"], spec["frames_per_clip"]
    wave = media.read_audio(clip.wav, rate)
    audio = io.BytesIO()
    sf.write(audio, wave.clamp(-1.0, 1.0).numpy(), rate, format=spec["audio_format"].upper(), subtype="PCM_16")
    meta = {"video_id": clip.video_id, "labels": list(clip.labels), "position": position,
            "num_frames": frames, "sample_rate": rate}
    if clip.frame_labels:
        meta["frame_labels"] = list(clip.frame_labels)
    sample = {"__key__": sample_key(clip.video_id), "json": json.dumps(meta).encode(),
              spec["audio_format"]: audio.getvalue()}
    for i in range(frames):
        sample[frame_member(i)] = media.jpeg_bytes(clip.frame_path(i))
    if spec["fbank"]:
        f = spec["fbank"]
        features = media.fbank(wave, rate, f["mel_bins"], f["clip_frames"], mean=f["mean"], std=f["std"])
        array = io.BytesIO()
        np.save(array, features.numpy().astype(np.float16))
        sample["fbank.npy"] = array.getvalue()
    return sample


def _encode_or_reject(clip: Clip, position: int, spec: dict[str, Any]) -> tuple[int, dict | None, str, str]:
    """(position, sample, "", "") or (position, None, path, reason): one bad clip must not stop the run."""
    try:
        return position, encode_clip(clip, position, spec), "", ""
    except media.MediaError as err:
        return position, None, err.path or clip.wav, err.reason
    except Exception as err:  # noqa: BLE001 - as prepare: report the odd file, keep going
        return position, None, clip.wav, f"unexpected {type(err).__name__} while reading the clip: {err}"


def _encode_in_order(clips: list[Clip], positions: list[int], spec: dict[str, Any],
                     workers: int) -> Iterator[tuple[int, dict | None, str, str]]:
    """``_encode_or_reject`` of each position, in order, in ``workers`` processes (at most a few
    clips per worker in flight, so memory stays bounded on corpora of millions)."""
    if workers <= 1:
        for n in positions:
            yield _encode_or_reject(clips[n], n, spec)
        return
    # spawn and one thread per process, as prepare: a fork of a process running torch's threads can deadlock
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=torch.set_num_threads, initargs=(1,))
    try:
        pending: deque = deque()
        queue = iter(positions)
        for n in queue:
            pending.append(pool.submit(_encode_or_reject, clips[n], n, spec))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------------- writing
@dataclass
class ShardSummary:
    """What a shard run did; ``str(summary)`` is the report the CLI prints."""

    out: Path
    clips: int  # clips in the finished set
    shards: int
    written: int  # clips this run wrote (the rest were there from an interrupted run)
    rejects: list[tuple[str, str]]
    elapsed: float
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"shard: {self.clips} clips in {self.shards} shards ({self.written} written by this run, "
                 f"{len(self.rejects)} rejected) in {self.elapsed:.1f} s"]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  rejected {path}: {reason}" for path, reason in self.rejects[:SHOWN_REJECTS]]
        if len(self.rejects) > SHOWN_REJECTS:
            lines.append(f"  ... and {len(self.rejects) - SHOWN_REJECTS} more")
        lines.append(f"  index {self.out / INDEX}" + (f", rejects {self.out / 'rejects.csv'}" if self.rejects else ""))
        lines.append(f"  train from them with --data.train_shards={self.out}")
        return "\n".join(lines)


def write_shards(manifest: str | Path, out_dir: str | Path, cfg: Config, shard_size: int = DEFAULT_SHARD_SIZE,
                 fbank: bool = False, audio_format: str = "wav", workers: int = 2) -> ShardSummary:
    """Write the clips of a CAV-MAE manifest into WebDataset shards under ``out_dir`` (module docstring).

    ``cfg`` gives data.sample_rate and data.frames_per_clip, and with ``fbank`` the filterbank
    settings. Resumes an interrupted run into the same ``out_dir``; refuses one written from
    another manifest or with other settings. Unusable clips go to rejects.csv, as in prepare.
    """
    start = time.perf_counter()
    if shard_size < 1 or audio_format not in AUDIO_FORMATS:
        raise ValueError(f"shard_size ({shard_size}) must be >= 1 and audio_format ({audio_format!r}) one of "
                         f"{', '.join(AUDIO_FORMATS)}")
    clips = read_manifest(manifest)
    out = Path(out_dir).resolve()
    spec = {"sample_rate": cfg.data.sample_rate, "frames_per_clip": cfg.data.frames_per_clip,
            "audio_format": audio_format, "shard_size": shard_size, "fbank": fbank_settings(cfg) if fbank else None,
            "order_seed": ORDER_SEED, "manifest_sha256": hashlib.sha256(Path(manifest).read_bytes()).hexdigest()}
    index = _claim(out, spec, manifest, len(clips))
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(ORDER_SEED)).tolist()
    already = sum(s["samples"] for s in index["shards"])
    if not index["complete"]:
        _write_all(out, index, clips, order, spec, workers)
    labels = label_csv_for(cfg, manifest)
    if labels is not None and labels.is_file():
        shutil.copyfile(labels, out / "labels.csv")
    rejects = [tuple(r) for r in index["rejects"]]
    _write_csv(out / "rejects.csv", ["path", "reason"], sorted(rejects))
    notes = [] if labels else ["no label CSV beside the manifest (nor data.label_csv): the shards carry label "
                               "ids, but evaluation cannot name classes"]
    return ShardSummary(out, index["samples"], len(index["shards"]), index["samples"] - already, sorted(rejects),
                        time.perf_counter() - start, notes)


def _write_all(out: Path, index: dict, clips: list[Clip], order: list[int], spec: dict, workers: int) -> None:
    """Fill shards from ``index["next"]`` on; index.json is rewritten after every shard."""
    for stale in out.glob(".shard-*.tmp"):
        stale.unlink()  # a shard an interrupted run was writing
    samples: list[dict] = []
    rejects: list[list[str]] = []  # of the clips since the last recorded shard
    consumed = index["next"]
    with tqdm(total=len(order), initial=consumed, desc="shard", unit="clip") as bar:
        for position, sample, path, reason in _encode_in_order(clips, order[consumed:], spec, workers):
            consumed += 1
            bar.update()
            if sample is None:
                rejects.append([path, reason])
            else:
                samples.append(sample)
            if len(samples) == spec["shard_size"] or (consumed == len(order) and samples):
                _flush(out, index, samples, rejects, consumed)
                samples, rejects = [], []
    index["rejects"] += rejects  # rejects after the last shard
    index["next"], index["complete"] = consumed, True
    _save_index(out, index)


def _flush(out: Path, index: dict, samples: list[dict], rejects: list[list[str]], consumed: int) -> None:
    """Write one shard and its clip list atomically, then record both in index.json."""
    name = shard_name(len(index["shards"]))
    clips = [{"key": s["__key__"], **{k: v for k, v in json.loads(s["json"]).items()
                                      if k in ("video_id", "labels", "position")}} for s in samples]
    media.write_atomic(out / name.replace(".tar", ".clips.json"),
                       lambda tmp: Path(tmp).write_text(json.dumps({"shard": name, "clips": clips}) + "\n"))
    tmp = out / f".{name}.tmp"
    with open(tmp, "wb") as stream:
        with wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
            for sample in samples:
                writer.write(sample)
    tmp.replace(out / name)
    index["shards"].append({"name": name, "samples": len(samples), "bytes": (out / name).stat().st_size})
    index["samples"] += len(samples)
    index["rejects"] += rejects
    index["next"] = consumed
    _save_index(out, index)


def _claim(out: Path, spec: dict, manifest: str | Path, clips: int) -> dict:
    """The index of ``out``: a new one, or the one an earlier run with the same settings left."""
    path = out / INDEX
    if path.exists():
        index = read_index(path)
        if index["settings"] != spec:
            raise ValueError(f"{out} holds shards written with {index['settings']}; this run asks for {spec}. "
                             "Use the same manifest and settings to resume, or another OUT folder")
        return index
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "version": VERSION, "settings": spec, "manifest": str(Path(manifest).resolve()),
             "manifest_clips": clips, "complete": False, "next": 0, "samples": 0, "shards": [], "rejects": []}
    _save_index(out, index)
    return index


def _save_index(out: Path, index: dict) -> None:
    media.write_atomic(out / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1) + "\n"))


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    media.write_atomic(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


# ---------------------------------------------------------------------- finding shards
def read_index(path: str | Path) -> dict:
    path = Path(path)
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the shard index ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tgdp shard index (write shards with `python -m tgdp_core shard MANIFEST OUT`)")
    if index.get("version") != VERSION:
        raise ValueError(f"{path}: shard index version {index.get('version')}, this tgdp reads {VERSION}; "
                         "write the shards again")
    return index


@dataclass(frozen=True)
class Shard:
    path: Path
    samples: int  # as index.json records it


@dataclass
class ShardSource:
    """A set of shards with its index: ``open_shards(spec)``."""

    folder: Path
    index: dict
    shards: list[Shard]

    @property
    def settings(self) -> dict[str, Any]:
        return self.index["settings"]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def label_csv(self) -> Path | None:
        path = self.folder / "labels.csv"
        return path if path.is_file() else None

    def clips(self) -> list[dict[str, Any]]:
        """Every clip of these shards, in shard order: {"key", "video_id", "labels", "position", "shard"}."""
        out = []
        for shard in self.shards:
            listing = shard.path.with_name(shard.path.name.replace(".tar", ".clips.json"))
            try:
                entries = json.loads(listing.read_text())["clips"]
            except (OSError, json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{listing}: cannot read the clip list of {shard.path.name} ({err}); "
                                 "write the shards again with `python -m tgdp_core shard`") from None
            out += [{**entry, "shard": shard.path} for entry in entries]
        return out


def is_shard_spec(spec: str | Path) -> bool:
    """Whether ``spec`` names shards (a .tar, a brace pattern, an index.json, a folder holding
    one) rather than a CAV-MAE manifest."""
    text = str(spec)
    if text.endswith(".tar") or "{" in text:
        return True
    path = Path(text)
    if path.is_dir():
        path = path / INDEX
    if path.name != INDEX or not path.is_file():
        return False
    with open(path, "rb") as f:  # a manifest could be called index.json too: look for the shard format
        return f'"format": "{FORMAT}"'.encode() in f.read(256)


def open_shards(spec: str | Path) -> ShardSource:
    """Shards by their folder, its index.json, a shard path or a brace pattern
    (``OUT/shard-{000000..000009}.tar``: a subset of the indexed shards, e.g. a held-out split)."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        path = path / INDEX
    if path.name == INDEX:
        index, folder = read_index(path), path.parent
        names = [s["name"] for s in index["shards"]]
    else:
        paths = [Path(p) for p in expand_urls(text)]  # webdataset's brace (and ::) expansion
        folders = {p.parent for p in paths}
        if len(folders) != 1:
            raise ValueError(f"{text}: shards from several folders; name one folder's shards (each has its {INDEX})")
        folder = folders.pop()
        if not (folder / INDEX).is_file():
            raise ValueError(f"{folder}: no {INDEX} beside the shards (write them with `python -m tgdp_core shard`)")
        index, names = read_index(folder / INDEX), [p.name for p in paths]
    if not index["complete"]:
        raise ValueError(f"{folder / INDEX}: writing these shards did not finish; run the same "
                         f"`python -m tgdp_core shard` (or prepare --shards) command again to complete them")
    counts = {s["name"]: s["samples"] for s in index["shards"]}
    unknown = [n for n in names if n not in counts]
    if unknown:
        raise ValueError(f"{folder / INDEX} does not list {', '.join(unknown[:5])}; it lists "
                         f"{len(counts)} shards ({', '.join(list(counts)[:3])}, ...)")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"{folder}: missing shard file(s) {', '.join(missing[:5])}")
    if not names:
        raise ValueError(f"{text}: no shards")
    return ShardSource(folder, index, [Shard(folder / n, counts[n]) for n in names])


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """Register the shard options (``positional``: also MANIFEST and OUT, for the ``shard`` command)."""
    if positional:
        parser.description = __doc__.split("\n\n")[0].replace("``", "")
        parser.add_argument("manifest", metavar="MANIFEST", help="a CAV-MAE manifest JSON")
        parser.add_argument("out", metavar="OUT", help="folder for the shards, index.json, labels.csv, rejects.csv")
        parser.add_argument("--workers", type=int, default=2, metavar="N",
                            help="encoding processes; 0 or 1 encodes in this process (default: 2)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                        help=f"samples per shard (default: {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--fbank", action="store_true",
                        help="also store each clip's normalised fbank (float16), so loaders skip the filterbank")
    parser.add_argument("--audio-format", choices=AUDIO_FORMATS, default="wav",
                        help="how the audio is stored (default: wav; flac is smaller, slower to decode)")


def main(args: argparse.Namespace, cfg: Config) -> int:
    summary = write_shards(args.manifest, args.out, cfg, shard_size=args.shard_size, fbank=args.fbank,
                           audio_format=args.audio_format, workers=args.workers)
    print(summary)
    return 0 if summary.clips else 1
