"""``python -m tgdp_core bench --loaders``: what one loader worker delivers at ``base`` (issue 13).

Makes ``clips`` clips in the base layout (16 frames of 224 px, JPEG quality 90 as ``prepare``
writes them: drifting crops of scikit-learn's two sample photographs; 10 s of AV-Digits speech
stems at 16 kHz under a faint noise bed), then times each way of loading them in this process
with one thread, which is what one DataLoader worker does (samples/s per worker; the copy of a
batch from a worker to the trainer is not included). Base settings: 224 px, 16 frames, 1,024-
frame fbank, one frame and its 416-frame segment per sample:

    cache          AVDataset with the feature cache (built before the clock starts)
    raw            AVDataset with data.cache=false: per sample the wav, the clip's fbank, one JPEG (PIL)
    shards         ShardTrainSet, wav audio: the segment's fbank alone and one JPEG (simplejpeg)
    shards+fbank   ShardTrainSet, the fbank stored in the shards (--fbank)
    shards flac    ShardTrainSet, FLAC audio

It also times the stages one sample costs (JPEG decode by PIL and simplejpeg, audio decode,
the fbank of the clip and of the segment, normalisation), the bytes per clip of each format
(and for AudioSet-2M), and how many workers keep one H200 busy: a base TG-DP step's FLOPs per
sample (``flops.step_flops``) at 40 % of the H200's dense bf16 peak from NVIDIA's datasheet.
The files are read from the page cache (just written): disk or network reads come on top.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image

from . import media, shards
from .config import Config
from .dataset import AVDataset, train_loader
from .flops import step_flops
from .shardset import ShardTrainSet, ShardReader

H200_BF16_DENSE_FLOPS = 989e12  # NVIDIA H200 datasheet: 1,979 TFLOPS bf16 with sparsity, half of it dense
GPU_SHARE = 0.40  # the step runs at 40 % of that peak (the assumption)
AUDIOSET_2M = 2_000_000  # clips (AudioSet's unbalanced train set is about 2.0 M)
PATHS = ("cache", "raw", "shards", "shards+fbank", "shards flac")


# ---------------------------------------------------------------------- the clips
def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images  # two photographs (427 x 640) shipped with scikit-learn

    return list(load_sample_images().images)


def _speech(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """``seconds`` of AV-Digits voices (committed stems), a random stretch of one voice, looped."""
    from .avdigits import STEMS_DIR

    voices = sorted((STEMS_DIR / "voices").glob("*.ogg"))
    wave, source_rate = sf.read(voices[rng.integers(len(voices))], dtype="float32", always_2d=True)  # (T, C)
    wave = torchaudio.functional.resample(torch.from_numpy(wave.mean(1)), source_rate, rate).numpy()
    n = round(seconds * rate)
    start = rng.integers(max(1, len(wave) - n))
    wave = np.resize(wave[start:], n)  # loops when the voice is shorter
    return (0.8 * wave / max(1e-6, np.abs(wave).max()) + 0.003 * rng.standard_normal(n)).astype(np.float32)


def _wav_bytes(wave: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.clip(wave, -1, 1), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def make_clips(folder: Path, clips: int, cfg: Config, seed: int = 0) -> Path:
    """``clips`` clips in the CAV-MAE layout at ``cfg``'s settings; returns the manifest."""
    rng = np.random.default_rng(seed)
    photos, d, size = _photos(), cfg.data, cfg.model.image_size
    seconds = d.clip_frames * media.FRAME_SHIFT_MS / 1000
    entries = []
    for n in range(clips):
        vid = f"bench{n:04d}"
        photo = Image.fromarray(photos[n % len(photos)])
        w, h = photo.size
        scale = rng.uniform(0.4, 0.9)
        cw, ch = int(w * scale), int(h * scale)
        x0, y0, dx, dy = rng.integers(0, w - cw), rng.integers(0, h - ch), rng.normal(0, 3), rng.normal(0, 2)
        for i in range(d.frames_per_clip):  # a slowly panning camera
            x, y = int(np.clip(x0 + dx * i, 0, w - cw)), int(np.clip(y0 + dy * i, 0, h - ch))
            path = folder / "frames" / f"frame_{i}" / f"{vid}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            frame = media.resize_center_crop(photo.crop((x, y, x + cw, y + ch)), size)
            frame.save(path, format="JPEG", quality=media.JPEG_QUALITY)
        wav = folder / "audio" / f"{vid}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        wav.write_bytes(_wav_bytes(_speech(rng, seconds, d.sample_rate), d.sample_rate))
        entries.append({"video_id": vid, "wav": str(wav), "video_path": str(folder / "frames"),
                        "labels": f"c{n % 4}"})
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"data": entries}))
    (folder / "labels.csv").write_text("index,mid,display_name\n" + "".join(f"{k},c{k},class {k}\n" for k in range(4)))
    return manifest


# ---------------------------------------------------------------------- timing
def _one_thread(fn: Callable[[], Any]) -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def time_loader(make_loader: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Samples/s of the fastest of ``repeats`` passes over a fresh loader's batches after its first
    (warm-up), by the wall clock and per CPU second (this process's CPU time: on a machine whose
    cores other work shares, what a worker with a core of its own would deliver)."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        batches = iter(make_loader())
        next(batches)
        wall, cpu, samples = time.perf_counter(), time.process_time(), 0
        for batch in batches:
            samples += batch["fbank"].shape[0]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if not best or samples / wall > best["samples_per_s"]:
            best = {"samples_per_s": samples / wall, "samples_per_cpu_s": samples / cpu, "samples": samples,
                    "cpu_share": cpu / wall}
    return best


def _loader_for(path: str, manifest: Path, folders: dict[str, Path], cfg: Config):
    if path in ("cache", "raw"):
        run = copy.deepcopy(cfg)
        run.data.cache = path == "cache"
        return train_loader(AVDataset(manifest, run, train=True, cache_dir=manifest.parent / "cache"), run)
    return train_loader(ShardTrainSet(folders[path], cfg), cfg)


def median_ms(fn: Callable[[], Any], repeats: int = 30) -> float:
    """Median CPU milliseconds of ``fn`` (CPU time: other work on the core does not count)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1000 * statistics.median(times)


def stages(manifest: Path, folders: dict[str, Path], cfg: Config) -> dict[str, float]:
    """Median CPU ms of each step one sample can cost, on the first clip."""
    from .dataset import read_manifest

    d, m = cfg.data, cfg.model
    clip = read_manifest(manifest)[0]
    jpeg = Path(clip.frame_path(3)).read_bytes()
    wav = Path(clip.wav).read_bytes()
    flac = io.BytesIO()
    sf.write(flac, media.decode_audio(wav).numpy(), d.sample_rate, format="FLAC", subtype="PCM_16")
    wave = media.decode_audio(wav, d.sample_rate)
    full = media.fbank(wave, d.sample_rate, m.mel_bins, d.clip_frames)
    npy = io.BytesIO()
    np.save(npy, full.numpy().astype(np.float16))
    frame = media.decode_frame(jpeg, m.image_size)

    source = shards.open_shards(folders["shards"])
    reader = ShardReader(source, cfg, use_fbank=False)
    shard = source.shards[0]

    def read_shard() -> int:  # what the training path reads: the JSON, the audio, one frame
        wanted = {"json", "wav", "frame_03.jpg"}
        return sum(1 for _ in reader.read(shard.path, shard.samples, lambda key, suffix: suffix in wanted))

    def pil() -> np.ndarray:
        with Image.open(io.BytesIO(jpeg)) as image:
            return np.asarray(image.convert("RGB"))

    return {
        "JPEG decode, PIL": median_ms(pil),
        "JPEG decode, simplejpeg": median_ms(lambda: media.decode_frame(jpeg, m.image_size)),
        "wav decode (10 s)": median_ms(lambda: media.decode_audio(wav, d.sample_rate)),
        "flac decode (10 s)": median_ms(lambda: media.decode_audio(flac.getvalue(), d.sample_rate)),
        f"fbank, whole clip ({d.clip_frames} frames)": median_ms(
            lambda: media.fbank(wave, d.sample_rate, m.mel_bins, d.clip_frames), 10),
        f"fbank, one segment ({m.audio_frames} frames)": median_ms(
            lambda: media.fbank_segment(wave, 304, m.audio_frames, d.sample_rate, m.mel_bins, d.clip_frames), 10),
        "stored fbank load (npy, float16 -> float32)": median_ms(
            lambda: np.load(io.BytesIO(npy.getvalue())).astype(np.float32)),
        "normalise one frame": median_ms(lambda: media.normalize_frames(frame)),
        f"read one sample's members from a shard ({d.frames_per_clip + 2} in the tar)":
            median_ms(read_shard, 5) / shard.samples,
    }


# ---------------------------------------------------------------------- sizes and the H200
def clip_bytes(manifest: Path, folders: dict[str, Path], cfg: Config, clips: int) -> dict[str, float]:
    """Mean bytes per clip of each format."""
    from .dataset import read_manifest

    d, m = cfg.data, cfg.model
    raw = sum(Path(c.wav).stat().st_size + sum(Path(c.frame_path(i)).stat().st_size for i in range(d.frames_per_clip))
              for c in read_manifest(manifest)) / clips
    cache = d.clip_frames * m.mel_bins * 2 + d.frames_per_clip * m.image_size ** 2 * 3  # float16 fbank + uint8 frames
    out = {"cache": float(cache), "raw": raw}
    for path, folder in folders.items():
        out[path] = sum(p.stat().st_size for p in folder.glob("shard-*.tar")) / clips
    return out


def h200_workers(samples_per_s: dict[str, float]) -> dict[str, Any]:
    """The consumption of a base TG-DP step at GPU_SHARE of the H200's peak, and the workers per path."""
    base = Config.preset("base")
    per_sample = step_flops(base, 1).total  # FLOPs of one sample's share of a step (batch-independent but the logits)
    need = GPU_SHARE * H200_BF16_DENSE_FLOPS / per_sample
    return {"flops_per_sample": per_sample, "peak_flops": H200_BF16_DENSE_FLOPS, "share": GPU_SHARE,
            "samples_per_s": need, "workers": {p: math.ceil(need / r) for p, r in samples_per_s.items()}}


# ---------------------------------------------------------------------- the run
def run(clips: int = 64, samples: int = 256, batch: int = 16, repeats: int = 3, machine: str = "") -> dict[str, Any]:
    """Every measurement; ``samples`` timed per path (plus one warm-up batch), the best of ``repeats``.
    ``machine`` names the CPU in the report (the bench command passes it)."""
    cfg = Config.preset("base", data={"workers": 0})
    cfg.train.batch_size = batch
    cfg.train.steps = 1 + -(-samples // batch)
    with tempfile.TemporaryDirectory(prefix="tgdp-loadbench-") as tmp:
        folder = Path(tmp)
        manifest = make_clips(folder / "clips", clips, cfg)
        options = {"shards": {}, "shards+fbank": {"fbank": True}, "shards flac": {"audio_format": "flac"}}
        folders = {}
        for path, kw in options.items():
            folders[path] = folder / path.replace(" ", "_").replace("+", "_")
            shards.write_shards(manifest, folders[path], cfg, shard_size=max(1, clips // 4), workers=0, **kw)
        AVDataset(manifest, cfg, train=True, cache_dir=folder / "clips" / "cache")  # build the cache untimed
        rates = {p: _one_thread(lambda p=p: time_loader(lambda: _loader_for(p, manifest, folders, cfg), repeats))
                 for p in PATHS}
        report = {"setup": {"clips": clips, "batch": batch, "timed_samples": rates["cache"]["samples"],
                            "image_size": cfg.model.image_size, "frames_per_clip": cfg.data.frames_per_clip,
                            "clip_frames": cfg.data.clip_frames, "segment_frames": cfg.model.audio_frames,
                            "repeats": repeats, "threads": 1, "machine": machine or "this CPU",
                            "load_average": _load_average()},
                  "paths": rates, "stages_ms": _one_thread(lambda: stages(manifest, folders, cfg)),
                  "bytes_per_clip": clip_bytes(manifest, folders, cfg, clips)}
    report["h200"] = h200_workers({p: r["samples_per_s"] for p, r in rates.items()})
    report["h200_per_cpu_s"] = h200_workers({p: r["samples_per_cpu_s"] for p, r in rates.items()})
    return report


def _load_average() -> list[float]:
    """The 1, 5 and 15 min load averages (Linux): how busy the machine's cores were."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def markdown(report: dict) -> str:
    s, h, hc = report["setup"], report["h200"], report["h200_per_cpu_s"]
    cores = f"{os.cpu_count()} cores, load average {', '.join(f'{x:.1f}' for x in s['load_average'])}"
    lines = [f"tgdp bench --loaders: {s['clips']} base clips ({s['image_size']} px, {s['frames_per_clip']} frames, "
             f"{s['clip_frames']}-frame fbank, one frame + its {s['segment_frames']}-frame segment per sample), "
             f"batch {s['batch']}, {s['timed_samples']} timed samples per path, best of {s['repeats']}, one thread; "
             f"{s['machine']}, {cores}", "",
             "| path | samples/s per worker | per CPU second | CPU share | bytes/clip | AudioSet-2M | "
             "workers for one H200 (wall / CPU) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for path, r in report["paths"].items():
        size = report["bytes_per_clip"][path]
        lines.append(f"| {path} | {r['samples_per_s']:.0f} | {r['samples_per_cpu_s']:.0f} | {r['cpu_share']:.2f} | "
                     f"{size / 1e6:.2f} MB | {size * AUDIOSET_2M / 1e12:.1f} TB | "
                     f"{h['workers'][path]} / {hc['workers'][path]} |")
    lines += ["", "CPU share: this process's CPU time over the wall time; below 1, other work held the core "
              "(the per-CPU-second figure is then what a worker with a core of its own delivers)", "",
              "| stage (one sample) | CPU ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in report["stages_ms"].items()]
    lines += ["", f"H200: a base TG-DP step costs {h['flops_per_sample'] / 1e9:.1f} GFLOP per sample (flops.py); "
              f"{h['share']:.0%} of {h['peak_flops'] / 1e12:.0f} TFLOP/s (dense bf16, NVIDIA's datasheet) is "
              f"{h['samples_per_s']:.0f} samples/s; workers = that / samples/s per worker, rounded up"]
    return "\n".join(lines) + "\n"
